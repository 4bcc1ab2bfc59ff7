//! Real databases for the SQL connector tests. Nothing is skipped: a database that cannot be
//! reached fails the test with a message naming it and the variable that points to it.

#![allow(dead_code)]

use std::str::FromStr;

use serde_json::Value;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, Connection, Row};
use weir_connectors::{Record, SinkRecord, TopicPartition};

pub const POSTGRES_VAR: &str = "WEIR_TEST_POSTGRES_URL";
pub const MYSQL_VAR: &str = "WEIR_TEST_MYSQL_URL";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    MySql,
    Sqlite,
}

/// A connection to a test database, for the test's own checks.
pub struct Db {
    pub backend: Backend,
    pub url: String,
    pool: Pool,
    _dir: Option<tempfile::TempDir>,
}

enum Pool {
    Pg(PgPool),
    My(MySqlPool),
    Lite(SqlitePool),
}

impl Db {
    pub async fn open(backend: Backend) -> Db {
        match backend {
            Backend::Postgres => Db::postgres().await,
            Backend::MySql => Db::mysql().await,
            Backend::Sqlite => Db::sqlite().await,
        }
    }

    pub async fn postgres() -> Db {
        let url = std::env::var(POSTGRES_VAR)
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
        let options = PgConnectOptions::from_str(&url)
            .unwrap_or_else(|e| panic!("{POSTGRES_VAR}={url} is not a PostgreSQL URL: {e}"));
        // One plain connection first: its error says why (refused, auth, no database).
        if let Err(e) = sqlx::PgConnection::connect_with(&options).await {
            panic!(
                "PostgreSQL is needed by this test and is not reachable at {url}: {e}\n\
                 Start it, or point {POSTGRES_VAR} at one (trust auth, database test)."
            )
        }
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
        Db {
            backend: Backend::Postgres,
            url,
            pool: Pool::Pg(pool),
            _dir: None,
        }
    }

    pub async fn mysql() -> Db {
        let url = std::env::var(MYSQL_VAR)
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_string());
        let options = MySqlConnectOptions::from_str(&url)
            .unwrap_or_else(|e| panic!("{MYSQL_VAR}={url} is not a MySQL URL: {e}"));
        if let Err(e) = sqlx::MySqlConnection::connect_with(&options).await {
            panic!(
                "MariaDB/MySQL is needed by this test and is not reachable at {url}: {e}\n\
                 Start it, or point {MYSQL_VAR} at one (root without password, database test)."
            )
        }
        let pool = MySqlPoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .unwrap_or_else(|e| panic!("MariaDB/MySQL at {url}: {e}"));
        Db {
            backend: Backend::MySql,
            url,
            pool: Pool::My(pool),
            _dir: None,
        }
    }

    pub async fn sqlite() -> Db {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        let options = SqliteConnectOptions::from_str(&url)
            .expect("sqlite url")
            .create_if_missing(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .expect("SQLite in a temp dir");
        Db {
            backend: Backend::Sqlite,
            url,
            pool: Pool::Lite(pool),
            _dir: Some(dir),
        }
    }

    pub async fn exec(&self, sql: &str) {
        let sql = AssertSqlSafe(sql.to_string());
        let result = match &self.pool {
            Pool::Pg(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
            Pool::My(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
            Pool::Lite(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
        };
        if let Err(e) = result {
            panic!("{:?}: {e}", self.backend);
        }
    }

    /// The first column of the first row, as an integer.
    pub async fn int(&self, sql: &str) -> i64 {
        let sql = AssertSqlSafe(sql.to_string());
        let result = match &self.pool {
            Pool::Pg(p) => sqlx::query(sql)
                .fetch_one(p)
                .await
                .and_then(|r| r.try_get::<i64, _>(0)),
            Pool::My(p) => sqlx::query(sql)
                .fetch_one(p)
                .await
                .and_then(|r| r.try_get::<i64, _>(0)),
            Pool::Lite(p) => sqlx::query(sql)
                .fetch_one(p)
                .await
                .and_then(|r| r.try_get::<i64, _>(0)),
        };
        result.unwrap_or_else(|e| panic!("{:?}: {e}", self.backend))
    }

    /// Every row, each column read as text (the query casts what is not text).
    pub async fn strings(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let sql = AssertSqlSafe(sql.to_string());
        macro_rules! rows {
            ($p:expr) => {
                sqlx::query(sql).fetch_all($p).await.and_then(|rows| {
                    rows.iter()
                        .map(|r| {
                            (0..r.len())
                                .map(|i| r.try_get::<Option<String>, _>(i))
                                .collect()
                        })
                        .collect()
                })
            };
        }
        let result: Result<Vec<Vec<Option<String>>>, sqlx::Error> = match &self.pool {
            Pool::Pg(p) => rows!(p),
            Pool::My(p) => rows!(p),
            Pool::Lite(p) => rows!(p),
        };
        result.unwrap_or_else(|e| panic!("{:?}: {e}", self.backend))
    }

    /// The name of the text type for CAST.
    pub fn text(&self) -> &'static str {
        match self.backend {
            Backend::MySql => "CHAR",
            _ => "TEXT",
        }
    }

    pub async fn drop_table(&self, table: &str) {
        self.exec(&format!("DROP TABLE IF EXISTS {table}")).await;
    }

    pub async fn close(&self) {
        match &self.pool {
            Pool::Pg(p) => p.close().await,
            Pool::My(p) => p.close().await,
            Pool::Lite(p) => p.close().await,
        }
    }
}

/// A table name no other test (or run) uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "weir_{prefix}_{}_{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )
}

pub fn record(topic: &str, partition: i32, offset: i64, value: &Value) -> SinkRecord {
    SinkRecord {
        record: Record::new(serde_json::to_vec(value).expect("json")),
        position: TopicPartition {
            topic: topic.to_string(),
            partition,
        },
        offset,
    }
}

pub fn raw_record(partition: i32, offset: i64, value: Option<&[u8]>) -> SinkRecord {
    let mut r = record("orders", partition, offset, &Value::Null);
    r.record.value = value.map(bytes::Bytes::copy_from_slice);
    r
}

pub fn tp(topic: &str, partition: i32) -> TopicPartition {
    TopicPartition {
        topic: topic.to_string(),
        partition,
    }
}

/// Merges the fields of `extra` into `base` (both JSON objects).
pub fn merged(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    base
}
