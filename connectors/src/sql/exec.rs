//! Statements with dynamic parameters, run on any of the three pools.
//!
//! The transaction that applies a sink batch is written once and instantiated per backend by
//! a macro, so each copy works with concrete sqlx types.

use serde_json::{Map, Value};
use sqlx::{Column, Executor, Row, Statement, TypeInfo};

use super::decode::{self, JsonColumns};
use super::DbPool;
use crate::TopicPartition;

/// A bind parameter. The PostgreSQL sink statements bind every value as text (or bytes) and
/// cast it to the column's type in SQL; MySQL and SQLite get typed values.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Param {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
}

/// One SQL statement and its parameters.
#[derive(Debug, Clone)]
pub(crate) struct Stmt {
    pub sql: String,
    pub params: Vec<Param>,
}

impl Stmt {
    pub(crate) fn new(sql: impl Into<String>, params: Vec<Param>) -> Stmt {
        Stmt {
            sql: sql.into(),
            params,
        }
    }
}

/// What the offsets table must say per partition before a batch (None: no row yet).
pub(crate) type Expected = Vec<(TopicPartition, Option<i64>)>;

/// Offset statements: (statement, true for an insert of a new row).
pub(crate) type OffsetStmts = Vec<(Stmt, bool)>;

/// A batch to apply in one transaction, fenced by the offsets it expects to find.
pub(crate) struct Apply<'a> {
    /// The statement that opens the transaction (SQLite takes its write lock up front with
    /// BEGIN IMMEDIATE); None for the driver's default.
    pub begin: Option<&'static str>,
    /// Reads (topic, partition, next_offset) of this sink.
    pub read_offsets: &'a Stmt,
    /// What the offsets table must say for the partitions written (None: no row yet).
    pub expected: Expected,
    /// The data statements; `Some(index)` names the one record a statement writes.
    pub writes: &'a [(Stmt, Option<usize>)],
    /// Offset updates: (statement, true for an insert of a new row). An update must change
    /// exactly one row, an insert must not hit an existing one.
    pub offsets: OffsetStmts,
}

#[derive(Debug)]
pub(crate) enum ApplyError {
    /// The offsets table is not what this sink last saw: another writer (or a commit whose
    /// outcome was lost) moved it.
    Conflict,
    Sql {
        error: sqlx::Error,
        /// The record the failing statement writes, when it writes only one.
        index: Option<usize>,
    },
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;
type MyQuery<'q> = sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments>;
type LiteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

fn bind_pg<'q>(q: PgQuery<'q>, p: &Param) -> PgQuery<'q> {
    match p {
        Param::Null => q.bind(None::<String>),
        Param::Bool(b) => q.bind(*b),
        Param::Int(i) => q.bind(*i),
        Param::UInt(u) => q.bind(u.to_string()),
        Param::Float(f) => q.bind(*f),
        Param::Text(s) => q.bind(s.as_str()),
        Param::Bytes(b) => q.bind(b.as_slice()),
    }
}

fn bind_my<'q>(q: MyQuery<'q>, p: &Param) -> MyQuery<'q> {
    match p {
        Param::Null => q.bind(None::<String>),
        Param::Bool(b) => q.bind(*b),
        Param::Int(i) => q.bind(*i),
        Param::UInt(u) => q.bind(*u),
        Param::Float(f) => q.bind(*f),
        Param::Text(s) => q.bind(s.as_str()),
        Param::Bytes(b) => q.bind(b.as_slice()),
    }
}

fn bind_lite<'q>(q: LiteQuery<'q>, p: &Param) -> LiteQuery<'q> {
    match p {
        Param::Null => q.bind(None::<String>),
        Param::Bool(b) => q.bind(*b),
        Param::Int(i) => q.bind(*i),
        Param::UInt(u) => match i64::try_from(*u) {
            Ok(i) => q.bind(i),
            Err(_) => q.bind(u.to_string()),
        },
        Param::Float(f) => q.bind(*f),
        Param::Text(s) => q.bind(s.clone()),
        Param::Bytes(b) => q.bind(b.clone()),
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

macro_rules! backend_ops {
    ($module:ident, $db:ty, $bind:ident, $decode:path) => {
        mod $module {
            use super::*;

            type Db = $db;

            fn query(
                stmt: &Stmt,
            ) -> sqlx::query::Query<'static, Db, <Db as sqlx::Database>::Arguments> {
                let mut q = sqlx::query(sqlx::AssertSqlSafe(stmt.sql.clone()));
                for p in &stmt.params {
                    q = $bind(q, p);
                }
                q
            }

            pub(super) async fn execute(
                pool: &sqlx::Pool<Db>,
                stmt: &Stmt,
            ) -> Result<u64, sqlx::Error> {
                Ok(query(stmt).execute(pool).await?.rows_affected())
            }

            pub(super) async fn fetch_strings(
                pool: &sqlx::Pool<Db>,
                stmt: &Stmt,
            ) -> Result<Vec<Vec<Option<String>>>, sqlx::Error> {
                let rows = query(stmt).fetch_all(pool).await?;
                rows.iter()
                    .map(|r| {
                        (0..r.len())
                            .map(|i| r.try_get::<Option<String>, _>(i))
                            .collect()
                    })
                    .collect()
            }

            pub(super) async fn fetch_json(
                pool: &sqlx::Pool<Db>,
                stmt: &Stmt,
                json_columns: &JsonColumns,
            ) -> Result<Result<Vec<Map<String, Value>>, String>, sqlx::Error> {
                let rows = query(stmt).fetch_all(pool).await?;
                Ok(rows.iter().map(|r| $decode(r, json_columns)).collect())
            }

            pub(super) async fn columns(
                pool: &sqlx::Pool<Db>,
                sql: &str,
            ) -> Result<Vec<(String, String)>, sqlx::Error> {
                let statement = pool
                    .prepare(sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(
                        sql.to_string(),
                    )))
                    .await?;
                Ok(statement
                    .columns()
                    .iter()
                    .map(|c| (c.name().to_string(), c.type_info().name().to_string()))
                    .collect())
            }

            fn offsets_of(
                rows: &[<Db as sqlx::Database>::Row],
            ) -> Result<Vec<(TopicPartition, i64)>, sqlx::Error> {
                rows.iter()
                    .map(|r| {
                        Ok((
                            TopicPartition {
                                topic: r.try_get::<String, _>(0)?,
                                partition: r.try_get::<i32, _>(1)?,
                            },
                            r.try_get::<i64, _>(2)?,
                        ))
                    })
                    .collect()
            }

            pub(super) async fn read_offsets(
                pool: &sqlx::Pool<Db>,
                stmt: &Stmt,
            ) -> Result<Vec<(TopicPartition, i64)>, sqlx::Error> {
                let rows = query(stmt).fetch_all(pool).await?;
                offsets_of(&rows)
            }

            pub(super) async fn apply(
                pool: &sqlx::Pool<Db>,
                a: &Apply<'_>,
            ) -> Result<(), ApplyError> {
                let sql = |index: Option<usize>| move |error| ApplyError::Sql { error, index };
                let mut tx = match a.begin {
                    Some(statement) => pool.begin_with(statement).await,
                    None => pool.begin().await,
                }
                .map_err(sql(None))?;
                let result = async {
                    let rows = query(a.read_offsets)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(sql(None))?;
                    let found = offsets_of(&rows).map_err(sql(None))?;
                    for (tp, expected) in &a.expected {
                        let actual = found.iter().find(|(t, _)| t == tp).map(|(_, o)| *o);
                        if actual != *expected {
                            return Err(ApplyError::Conflict);
                        }
                    }
                    for (stmt, index) in a.writes {
                        query(stmt).execute(&mut *tx).await.map_err(sql(*index))?;
                    }
                    for (stmt, insert) in &a.offsets {
                        match query(stmt).execute(&mut *tx).await {
                            Ok(done) if !insert && done.rows_affected() != 1 => {
                                return Err(ApplyError::Conflict)
                            }
                            Ok(_) => {}
                            Err(e) if *insert && is_unique_violation(&e) => {
                                return Err(ApplyError::Conflict)
                            }
                            Err(e) => return Err(sql(None)(e)),
                        }
                    }
                    Ok(())
                }
                .await;
                match result {
                    Ok(()) => tx.commit().await.map_err(sql(None)),
                    Err(e) => {
                        // Dropping the transaction would roll back too, but only once the
                        // connection is used again; release the locks now.
                        let _ = tx.rollback().await;
                        Err(e)
                    }
                }
            }
        }
    };
}

backend_ops!(pg, sqlx::Postgres, bind_pg, decode::pg_row);
backend_ops!(my, sqlx::MySql, bind_my, decode::mysql_row);
backend_ops!(lite, sqlx::Sqlite, bind_lite, decode::sqlite_row);

impl DbPool {
    /// Runs one statement outside any transaction; returns the rows it affected.
    pub(crate) async fn execute(&self, stmt: &Stmt) -> Result<u64, sqlx::Error> {
        match self {
            DbPool::Postgres(p) => pg::execute(p, stmt).await,
            DbPool::MySql(p) => my::execute(p, stmt).await,
            DbPool::Sqlite(p) => lite::execute(p, stmt).await,
        }
    }

    /// Runs a query whose columns are all text (or null).
    pub(crate) async fn fetch_strings(
        &self,
        stmt: &Stmt,
    ) -> Result<Vec<Vec<Option<String>>>, sqlx::Error> {
        match self {
            DbPool::Postgres(p) => pg::fetch_strings(p, stmt).await,
            DbPool::MySql(p) => my::fetch_strings(p, stmt).await,
            DbPool::Sqlite(p) => lite::fetch_strings(p, stmt).await,
        }
    }

    /// Runs a query returning (topic, partition, next_offset) rows.
    pub(crate) async fn read_offsets(
        &self,
        stmt: &Stmt,
    ) -> Result<Vec<(TopicPartition, i64)>, sqlx::Error> {
        match self {
            DbPool::Postgres(p) => pg::read_offsets(p, stmt).await,
            DbPool::MySql(p) => my::read_offsets(p, stmt).await,
            DbPool::Sqlite(p) => lite::read_offsets(p, stmt).await,
        }
    }

    /// Runs a query and maps its rows to JSON objects (the inner error: a value that cannot
    /// be mapped).
    pub(crate) async fn fetch_json(
        &self,
        stmt: &Stmt,
        json_columns: &JsonColumns,
    ) -> Result<Result<Vec<Map<String, Value>>, String>, sqlx::Error> {
        match self {
            DbPool::Postgres(p) => pg::fetch_json(p, stmt, json_columns).await,
            DbPool::MySql(p) => my::fetch_json(p, stmt, json_columns).await,
            DbPool::Sqlite(p) => lite::fetch_json(p, stmt, json_columns).await,
        }
    }

    /// The (name, type name) of the columns a query returns, without running it.
    pub(crate) async fn columns(&self, sql: &str) -> Result<Vec<(String, String)>, sqlx::Error> {
        match self {
            DbPool::Postgres(p) => pg::columns(p, sql).await,
            DbPool::MySql(p) => my::columns(p, sql).await,
            DbPool::Sqlite(p) => lite::columns(p, sql).await,
        }
    }

    pub(crate) async fn apply(&self, a: &Apply<'_>) -> Result<(), ApplyError> {
        match self {
            DbPool::Postgres(p) => pg::apply(p, a).await,
            DbPool::MySql(p) => my::apply(p, a).await,
            DbPool::Sqlite(p) => lite::apply(p, a).await,
        }
    }
}
