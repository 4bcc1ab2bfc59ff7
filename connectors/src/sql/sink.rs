//! The SQL sink: JSON object records become rows, inserted or upserted in batches, with the
//! offsets after them written to an offsets table in the same transaction (exactly once).

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::anyhow;
use async_trait::async_trait;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::exec::{Apply, ApplyError, Expected, OffsetStmts, Param, Stmt};
use super::{classified, classify, connect, rfc3339_to_naive_utc, Backend, DbPool, ErrorClass};
use crate::{ConnectorError, Guarantee, Result, Sink, SinkRecord, TopicPartition};

fn default_batch_size() -> usize {
    500
}

fn default_offsets_table() -> String {
    "weir_sink_offsets".to_string()
}

/// `sinks: - sql: {...}` in a pipeline file. docs/connectors/sql.md documents every field.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlSinkConfig {
    /// Database URL; the scheme picks the backend (postgres://, mysql://, mariadb://, sqlite:).
    pub url: String,
    /// Target table, optionally schema-qualified (`schema.table`).
    pub table: String,
    #[serde(default)]
    pub mode: SinkMode,
    /// Key columns: what an upsert matches on (required for upsert) and the primary key of a
    /// table the sink creates.
    #[serde(default)]
    pub key: Vec<String>,
    /// Create the table from the first record's fields when it does not exist.
    #[serde(default)]
    pub create_table: bool,
    /// Most rows per INSERT statement.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Field name -> column name. When set, only the listed fields are written.
    #[serde(default)]
    pub columns: Option<BTreeMap<String, String>>,
    /// Drop fields that have no column instead of failing the record.
    #[serde(default)]
    pub ignore_unknown_fields: bool,
    /// Where the applied offsets live, in the same database (created if missing).
    #[serde(default = "default_offsets_table")]
    pub offsets_table: String,
    /// Identifies this sink in the offsets table. Not read from the pipeline file: the
    /// runtime sets it to `<pipeline>/<sink index>`.
    #[serde(skip)]
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkMode {
    /// Plain INSERT: a duplicate key is a bad record.
    #[default]
    Insert,
    /// INSERT ... ON CONFLICT (key) DO UPDATE (PostgreSQL, SQLite) or ON DUPLICATE KEY UPDATE
    /// (MySQL, MariaDB): the columns present in the record are overwritten.
    Upsert,
}

/// How a column takes JSON values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Number,
    Bool,
    /// json/jsonb (PostgreSQL), JSON (MySQL, and MariaDB's LONGTEXT with a json_valid check),
    /// a declared JSON type (SQLite): every JSON value is stored as JSON text.
    Json,
    /// Binary columns take base64 strings.
    Bytes,
    /// A timestamp without time zone: RFC 3339 values are converted to UTC first.
    NaiveTimestamp,
    /// A PostgreSQL array: JSON arrays become array literals.
    PgArray,
    Other,
}

#[derive(Debug, Clone)]
struct Column {
    name: String,
    quoted: String,
    kind: Kind,
    /// The type to CAST a text parameter to (PostgreSQL).
    cast: String,
}

#[derive(Debug, Clone)]
struct Table {
    columns: Vec<Column>,
    exact: HashMap<String, usize>,
    folded: HashMap<String, usize>,
    /// Key column positions (resolved when upserting).
    key: Vec<usize>,
}

impl Table {
    fn new(columns: Vec<Column>) -> Table {
        let exact = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i))
            .collect();
        let folded = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.to_lowercase(), i))
            .collect();
        Table {
            columns,
            exact,
            folded,
            key: Vec::new(),
        }
    }

    fn find(&self, name: &str, case_insensitive: bool) -> Option<usize> {
        match self.exact.get(name) {
            Some(&i) => Some(i),
            None if case_insensitive => self.folded.get(&name.to_lowercase()).copied(),
            None => None,
        }
    }
}

/// A record ready to be written.
struct Row {
    /// Position in the batch.
    index: usize,
    /// Column positions, ascending.
    columns: Vec<usize>,
    params: Vec<Param>,
    /// Identity of the key values (upsert), so that one statement never touches a key twice.
    key: Option<String>,
}

/// Why a write stopped.
enum Failure {
    Bad { index: usize, message: String },
    Conflict,
    Other(ConnectorError),
}

impl From<ConnectorError> for Failure {
    fn from(e: ConnectorError) -> Failure {
        Failure::Other(e)
    }
}

enum RowError {
    UnknownField(String),
    Bad(String),
}

pub struct SqlSink {
    config: SqlSinkConfig,
    backend: Backend,
    pool: DbPool,
    table_sql: String,
    offsets_sql: String,
    /// None while the table does not exist (create_table).
    table: Option<Table>,
    /// Next offset to apply per partition, as the offsets table says.
    next: BTreeMap<TopicPartition, i64>,
    started: bool,
}

impl SqlSink {
    /// Checks the configuration and connects. Errors: Fatal for a bad configuration or URL,
    /// Transient when the database cannot be reached.
    pub async fn connect(config: SqlSinkConfig) -> Result<SqlSink> {
        validate(&config)?;
        let backend = Backend::from_url(&config.url)?;
        // SQLite has one writer at a time: a second connection would only wait for the first.
        let connections = if backend == Backend::Sqlite { 1 } else { 2 };
        let (backend, pool) = connect(&config.url, connections, true).await?;
        Ok(SqlSink {
            table_sql: backend.quote_path(&config.table),
            offsets_sql: backend.quote_path(&config.offsets_table),
            config,
            backend,
            pool,
            table: None,
            next: BTreeMap::new(),
            started: false,
        })
    }

    /// Closes the connections (they also close when the sink is dropped).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn fatal(&self, message: impl std::fmt::Display) -> ConnectorError {
        ConnectorError::Fatal(anyhow!("sql sink {}: {message}", self.config.name))
    }

    fn read_offsets_stmt(&self) -> Stmt {
        Stmt::new(
            format!(
                "SELECT topic, topic_partition, next_offset FROM {} WHERE sink_name = {}",
                self.offsets_sql,
                self.backend.placeholder(1)
            ),
            vec![Param::Text(self.config.name.clone())],
        )
    }

    async fn load_offsets(&mut self) -> Result<()> {
        let rows = self
            .pool
            .read_offsets(&self.read_offsets_stmt())
            .await
            .map_err(|e| classified(e, &format!("reading {}", self.config.offsets_table)))?;
        self.next = rows.into_iter().collect();
        Ok(())
    }

    async fn ensure_offsets_table(&self) -> Result<()> {
        let text = match self.backend {
            Backend::MySql => "VARCHAR(255)",
            Backend::Postgres | Backend::Sqlite => "TEXT",
        };
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {} (sink_name {text} NOT NULL, topic {text} NOT NULL, \
             topic_partition INTEGER NOT NULL, next_offset BIGINT NOT NULL, \
             PRIMARY KEY (sink_name, topic, topic_partition))",
            self.offsets_sql
        );
        if let Err(e) = self.pool.execute(&Stmt::new(ddl, vec![])).await {
            // Two sinks creating it at once: one of them loses the race, harmlessly.
            if self.introspect(&self.config.offsets_table).await?.is_none() {
                return Err(classified(
                    e,
                    &format!("creating {}", self.config.offsets_table),
                ));
            }
        }
        Ok(())
    }

    /// The columns of `name`, or None when there is no such table.
    async fn introspect(&self, name: &str) -> Result<Option<Table>> {
        let context = format!("reading the columns of {name}");
        let err = |e| classified(e, &context);
        let (schema, table) = match name.rsplit_once('.') {
            Some((s, t)) => (Some(s.to_string()), t.to_string()),
            None => (None, name.to_string()),
        };
        let mut columns = Vec::new();
        match self.backend {
            Backend::Postgres => {
                let stmt = Stmt::new(
                    "SELECT a.attname::text, format_type(a.atttypid, NULL), \
                     format_type(COALESCE(NULLIF(t.typbasetype, 0), a.atttypid), NULL) \
                     FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                     WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
                     ORDER BY a.attnum",
                    vec![Param::Text(self.backend.quote_path(name))],
                );
                for row in self.pool.fetch_strings(&stmt).await.map_err(err)? {
                    let [Some(col), Some(cast), Some(base)] = <[Option<String>; 3]>::try_from(row)
                        .map_err(|_| self.fatal("unexpected catalog row"))?
                    else {
                        continue;
                    };
                    let kind = match base.as_str() {
                        "smallint" | "integer" | "bigint" => Kind::Int,
                        "numeric" | "real" | "double precision" => Kind::Number,
                        "boolean" => Kind::Bool,
                        "json" | "jsonb" => Kind::Json,
                        "bytea" => Kind::Bytes,
                        "timestamp without time zone" => Kind::NaiveTimestamp,
                        b if b.ends_with("[]") => Kind::PgArray,
                        _ => Kind::Other,
                    };
                    columns.push((col, kind, cast));
                }
            }
            Backend::MySql => {
                let schema_param = schema.clone().map(Param::Text).unwrap_or(Param::Null);
                let stmt = Stmt::new(
                    "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR), \
                     CAST(COLUMN_TYPE AS CHAR) FROM information_schema.COLUMNS \
                     WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? \
                     ORDER BY ORDINAL_POSITION",
                    vec![schema_param.clone(), Param::Text(table.clone())],
                );
                let rows = self.pool.fetch_strings(&stmt).await.map_err(err)?;
                // MariaDB's JSON is LONGTEXT with a json_valid(`column`) check. (MySQL has a
                // real JSON type, and no TABLE_NAME in CHECK_CONSTRAINTS: the query fails
                // there and nothing is needed.)
                let checks = Stmt::new(
                    "SELECT CAST(CHECK_CLAUSE AS CHAR) FROM information_schema.CHECK_CONSTRAINTS \
                     WHERE CONSTRAINT_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?",
                    vec![schema_param, Param::Text(table.clone())],
                );
                let checks: Vec<String> = match self.pool.fetch_strings(&checks).await {
                    Ok(rows) => rows
                        .into_iter()
                        .filter_map(|r| r.into_iter().next().flatten())
                        .map(|c| c.to_lowercase())
                        .collect(),
                    Err(_) => Vec::new(),
                };
                for row in rows {
                    let [Some(col), Some(data_type), Some(column_type)] =
                        <[Option<String>; 3]>::try_from(row)
                            .map_err(|_| self.fatal("unexpected catalog row"))?
                    else {
                        continue;
                    };
                    let json_check = format!("json_valid(`{}`)", col.to_lowercase());
                    let data_type = data_type.to_lowercase();
                    let kind = match data_type.as_str() {
                        "tinyint" if column_type.to_lowercase().starts_with("tinyint(1)") => {
                            Kind::Bool
                        }
                        "tinyint" | "smallint" | "mediumint" | "int" | "bigint" => Kind::Int,
                        "decimal" | "float" | "double" => Kind::Number,
                        "json" => Kind::Json,
                        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob"
                        | "longblob" => Kind::Bytes,
                        "datetime" | "timestamp" => Kind::NaiveTimestamp,
                        _ if checks.contains(&json_check) => Kind::Json,
                        _ => Kind::Other,
                    };
                    columns.push((col, kind, column_type));
                }
            }
            Backend::Sqlite => {
                let (sql, params) = match &schema {
                    Some(s) => (
                        "SELECT name, type FROM pragma_table_info(?, ?)",
                        vec![Param::Text(table.clone()), Param::Text(s.clone())],
                    ),
                    None => (
                        "SELECT name, type FROM pragma_table_info(?)",
                        vec![Param::Text(table.clone())],
                    ),
                };
                for row in self
                    .pool
                    .fetch_strings(&Stmt::new(sql, params))
                    .await
                    .map_err(err)?
                {
                    let mut row = row.into_iter();
                    let Some(col) = row.next().flatten() else {
                        continue;
                    };
                    let declared = row.next().flatten().unwrap_or_default().to_uppercase();
                    let kind = if declared.contains("INT") {
                        Kind::Int
                    } else if declared.contains("BOOL") {
                        Kind::Bool
                    } else if declared.contains("JSON") {
                        Kind::Json
                    } else if declared.contains("BLOB") {
                        Kind::Bytes
                    } else if ["REAL", "FLOA", "DOUB"]
                        .iter()
                        .any(|t| declared.contains(t))
                    {
                        Kind::Number
                    } else {
                        Kind::Other
                    };
                    columns.push((col, kind, declared));
                }
            }
        }
        if columns.is_empty() {
            return Ok(None);
        }
        Ok(Some(Table::new(
            columns
                .into_iter()
                .map(|(name, kind, cast)| Column {
                    quoted: self.backend.quote_ident(&name),
                    name,
                    kind,
                    cast,
                })
                .collect(),
        )))
    }

    /// Reads the target table's columns and resolves the key columns.
    async fn refresh_table(&mut self) -> Result<()> {
        let Some(mut table) = self.introspect(&self.config.table).await? else {
            self.table = None;
            return Ok(());
        };
        if self.config.mode == SinkMode::Upsert {
            let ci = self.backend.case_insensitive_names();
            let mut key = Vec::with_capacity(self.config.key.len());
            for k in &self.config.key {
                match table.find(k, ci) {
                    Some(i) => key.push(i),
                    None => {
                        return Err(self.fatal(format!(
                            "key column {k} is not a column of table {}",
                            self.config.table
                        )))
                    }
                }
            }
            table.key = key;
        }
        self.table = Some(table);
        Ok(())
    }

    /// Creates the table from a record's fields (types inferred from the JSON values, key
    /// columns as the primary key).
    async fn create_table(
        &mut self,
        index: usize,
        record: &Map<String, Value>,
    ) -> Result<(), Failure> {
        let mut defs = Vec::new();
        let mut names: Vec<String> = Vec::new();
        for (field, value) in record {
            let Some(column) = self.column_for(field) else {
                continue;
            };
            let is_key = self.config.key.iter().any(|k| k == column);
            let ty = infer_type(self.backend, value, is_key);
            let not_null = if is_key { " NOT NULL" } else { "" };
            defs.push(format!(
                "{} {ty}{not_null}",
                self.backend.quote_ident(column)
            ));
            names.push(column.to_string());
        }
        for k in &self.config.key {
            if !names.contains(k) {
                return Err(Failure::Bad {
                    index,
                    message: format!(
                        "key column {k} is not a field of this record, the first one, from \
                         which table {} would be created",
                        self.config.table
                    ),
                });
            }
        }
        if defs.is_empty() {
            return Err(Failure::Bad {
                index,
                message: format!(
                    "no field of this record maps to a column: cannot create table {}",
                    self.config.table
                ),
            });
        }
        if !self.config.key.is_empty() {
            let key: Vec<String> = self
                .config
                .key
                .iter()
                .map(|k| self.backend.quote_ident(k))
                .collect();
            defs.push(format!("PRIMARY KEY ({})", key.join(", ")));
        }
        let strict = if self.backend == Backend::Sqlite {
            " STRICT"
        } else {
            ""
        };
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {} ({}){strict}",
            self.table_sql,
            defs.join(", ")
        );
        tracing::info!(sink = %self.config.name, table = %self.config.table, "creating table: {ddl}");
        let created = self.pool.execute(&Stmt::new(ddl, vec![])).await;
        self.refresh_table().await?;
        match (created, &self.table) {
            (_, Some(_)) => Ok(()),
            (Err(e), None) => {
                Err(classified(e, &format!("creating table {}", self.config.table)).into())
            }
            (Ok(_), None) => Err(self
                .fatal(format!("table {} was not created", self.config.table))
                .into()),
        }
    }

    /// The column a field goes to (None: the field is not written).
    fn column_for<'a>(&'a self, field: &'a str) -> Option<&'a str> {
        match &self.config.columns {
            Some(map) => map.get(field).map(String::as_str),
            None => Some(field),
        }
    }

    fn prepare_row(
        &self,
        table: &Table,
        index: usize,
        record: &Map<String, Value>,
    ) -> Result<Row, RowError> {
        let ci = self.backend.case_insensitive_names();
        let mut cells: Vec<(usize, Param)> = Vec::with_capacity(record.len());
        for (field, value) in record {
            let Some(column) = self.column_for(field) else {
                continue;
            };
            let Some(c) = table.find(column, ci) else {
                if self.config.ignore_unknown_fields {
                    continue;
                }
                return Err(RowError::UnknownField(format!(
                    "field {field}: table {} has no column {column}",
                    self.config.table
                )));
            };
            if cells.iter().any(|(other, _)| *other == c) {
                return Err(RowError::Bad(format!(
                    "field {field}: column {} is written by another field too",
                    table.columns[c].name
                )));
            }
            let param = to_param(self.backend, &table.columns[c], value).map_err(RowError::Bad)?;
            cells.push((c, param));
        }
        if cells.is_empty() {
            return Err(RowError::Bad(format!(
                "no field of the record matches a column of table {}",
                self.config.table
            )));
        }
        cells.sort_by_key(|(c, _)| *c);
        let key = if self.config.mode == SinkMode::Upsert {
            let mut identity = String::new();
            for &k in &table.key {
                match cells.iter().find(|(c, _)| *c == k) {
                    Some((_, p)) if *p != Param::Null => {
                        identity.push_str(&format!("{p:?}\u{1f}"));
                    }
                    _ => {
                        return Err(RowError::Bad(format!(
                            "key column {} is missing or null",
                            table.columns[k].name
                        )))
                    }
                }
            }
            Some(identity)
        } else {
            None
        };
        let (columns, params) = cells.into_iter().unzip();
        Ok(Row {
            index,
            columns,
            params,
            key,
        })
    }

    /// INSERT (or upsert) statements for `rows`: consecutive rows with the same columns share
    /// a statement, up to batch_size rows and the parameter limit, and never two rows with the
    /// same key. `single`: one statement per row.
    fn statements(&self, table: &Table, rows: &[Row], single: bool) -> Vec<(Stmt, Option<usize>)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < rows.len() {
            let columns = &rows[i].columns;
            let max_rows = if single {
                1
            } else {
                (self.backend.max_params() / columns.len())
                    .min(self.config.batch_size)
                    .max(1)
            };
            let mut keys = HashSet::new();
            let mut j = i;
            while j < rows.len() && j - i < max_rows && rows[j].columns == *columns {
                if let Some(k) = &rows[j].key {
                    if !keys.insert(k.as_str()) {
                        break;
                    }
                }
                j += 1;
            }
            let only = if j - i == 1 {
                Some(rows[i].index)
            } else {
                None
            };
            out.push((self.insert_stmt(table, &rows[i..j]), only));
            i = j;
        }
        out
    }

    fn insert_stmt(&self, table: &Table, rows: &[Row]) -> Stmt {
        let columns = &rows[0].columns;
        let names: Vec<&str> = columns
            .iter()
            .map(|&c| table.columns[c].quoted.as_str())
            .collect();
        let mut sql = format!(
            "INSERT INTO {} ({}) VALUES ",
            self.table_sql,
            names.join(", ")
        );
        let mut params = Vec::with_capacity(rows.len() * columns.len());
        let mut n = 0;
        for (r, row) in rows.iter().enumerate() {
            if r > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for (i, &c) in columns.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                n += 1;
                let placeholder = self.backend.placeholder(n);
                if self.backend == Backend::Postgres {
                    sql.push_str(&format!("CAST({placeholder} AS {})", table.columns[c].cast));
                } else {
                    sql.push_str(&placeholder);
                }
            }
            sql.push(')');
            params.extend(row.params.iter().cloned());
        }
        if self.config.mode == SinkMode::Upsert {
            let updates: Vec<&str> = columns
                .iter()
                .filter(|c| !table.key.contains(c))
                .map(|&c| table.columns[c].quoted.as_str())
                .collect();
            match self.backend {
                Backend::Postgres | Backend::Sqlite => {
                    let key: Vec<&str> = table
                        .key
                        .iter()
                        .map(|&k| table.columns[k].quoted.as_str())
                        .collect();
                    sql.push_str(&format!(" ON CONFLICT ({}) DO ", key.join(", ")));
                    if updates.is_empty() {
                        sql.push_str("NOTHING");
                    } else {
                        let set: Vec<String> = updates
                            .iter()
                            .map(|c| format!("{c} = excluded.{c}"))
                            .collect();
                        sql.push_str(&format!("UPDATE SET {}", set.join(", ")));
                    }
                }
                Backend::MySql => {
                    let set: Vec<String> = if updates.is_empty() {
                        let k = table.columns[table.key[0]].quoted.as_str();
                        vec![format!("{k} = {k}")]
                    } else {
                        updates
                            .iter()
                            .map(|c| format!("{c} = VALUES({c})"))
                            .collect()
                    };
                    sql.push_str(&format!(" ON DUPLICATE KEY UPDATE {}", set.join(", ")));
                }
            }
        }
        Stmt::new(sql, params)
    }

    /// The offset statements after writing up to `last` (inclusive) per partition.
    fn offset_stmts(&self, last: &BTreeMap<TopicPartition, i64>) -> (Expected, OffsetStmts) {
        let p = |n| self.backend.placeholder(n);
        let mut expected = Vec::with_capacity(last.len());
        let mut stmts = Vec::with_capacity(last.len());
        for (tp, &last) in last {
            let old = self.next.get(tp).copied();
            expected.push((tp.clone(), old));
            let name = Param::Text(self.config.name.clone());
            let topic = Param::Text(tp.topic.clone());
            let partition = Param::Int(tp.partition.into());
            let next = Param::Int(last + 1);
            stmts.push(match old {
                Some(old) => (
                    Stmt::new(
                        format!(
                            "UPDATE {} SET next_offset = {} WHERE sink_name = {} AND topic = {} \
                             AND topic_partition = {} AND next_offset = {}",
                            self.offsets_sql,
                            p(1),
                            p(2),
                            p(3),
                            p(4),
                            p(5)
                        ),
                        vec![next, name, topic, partition, Param::Int(old)],
                    ),
                    false,
                ),
                None => (
                    Stmt::new(
                        format!(
                            "INSERT INTO {} (sink_name, topic, topic_partition, next_offset) \
                             VALUES ({}, {}, {}, {})",
                            self.offsets_sql,
                            p(1),
                            p(2),
                            p(3),
                            p(4)
                        ),
                        vec![name, topic, partition, next],
                    ),
                    true,
                ),
            });
        }
        (expected, stmts)
    }

    /// Writes the records not applied yet, with their offsets, in one transaction.
    async fn try_write(&mut self, records: &[SinkRecord]) -> Result<(), Failure> {
        // Records at or after the next offset of their partition, each offset once.
        let mut seen: BTreeMap<&TopicPartition, i64> = BTreeMap::new();
        let mut fresh = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let floor = match seen.get(&r.position) {
                Some(&last) => last + 1,
                None => self.next.get(&r.position).copied().unwrap_or(i64::MIN),
            };
            if r.offset >= floor {
                seen.insert(&r.position, r.offset);
                fresh.push((i, r));
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let mut objects = Vec::with_capacity(fresh.len());
        for &(index, r) in &fresh {
            let object = parse_object(r).map_err(|message| Failure::Bad { index, message })?;
            objects.push((index, object));
        }
        if self.table.is_none() {
            if !self.config.create_table {
                return Err(self
                    .fatal(format!(
                        "table {} does not exist (create it, or set create_table: true)",
                        self.config.table
                    ))
                    .into());
            }
            let (index, first) = &objects[0];
            self.create_table(*index, first).await?;
        }

        let mut rows = Vec::with_capacity(objects.len());
        let mut refreshed = false;
        let mut k = 0;
        while k < objects.len() {
            let (index, object) = &objects[k];
            let table = self.table.as_ref().ok_or_else(|| {
                Failure::Other(self.fatal(format!("table {} disappeared", self.config.table)))
            })?;
            match self.prepare_row(table, *index, object) {
                Ok(row) => {
                    rows.push(row);
                    k += 1;
                }
                // The table may have gained the column since it was read: look once more.
                Err(RowError::UnknownField(_)) if !refreshed => {
                    refreshed = true;
                    self.refresh_table().await?;
                    rows.clear();
                    k = 0;
                }
                Err(RowError::UnknownField(message)) | Err(RowError::Bad(message)) => {
                    return Err(Failure::Bad {
                        index: *index,
                        message,
                    })
                }
            }
        }

        let mut last: BTreeMap<TopicPartition, i64> = BTreeMap::new();
        for (_, r) in &fresh {
            last.insert(r.position.clone(), r.offset);
        }
        let (expected, offsets) = self.offset_stmts(&last);
        let table = self
            .table
            .as_ref()
            .ok_or_else(|| Failure::Other(self.fatal("table disappeared")))?;
        let read_offsets = self.read_offsets_stmt();
        let begin = (self.backend == Backend::Sqlite).then_some("BEGIN IMMEDIATE");

        let batched = self.statements(table, &rows, false);
        let result = self
            .pool
            .apply(&Apply {
                begin,
                read_offsets: &read_offsets,
                expected: expected.clone(),
                writes: &batched,
                offsets: offsets.clone(),
            })
            .await;
        let result = match result {
            Err(ApplyError::Sql { error, .. }) if classify(&error) != ErrorClass::Transient => {
                // Find the record at fault: the same transaction, one row per statement. If
                // every row goes in (the batch failed on an interplay of rows), it commits.
                tracing::debug!(sink = %self.config.name, "batch failed ({error}); writing row by row");
                let single = self.statements(table, &rows, true);
                self.pool
                    .apply(&Apply {
                        begin,
                        read_offsets: &read_offsets,
                        expected,
                        writes: &single,
                        offsets,
                    })
                    .await
            }
            other => other,
        };
        match result {
            Ok(()) => {
                for (tp, last) in last {
                    self.next.insert(tp, last + 1);
                }
                Ok(())
            }
            Err(ApplyError::Conflict) => Err(Failure::Conflict),
            Err(ApplyError::Sql {
                error,
                index: Some(index),
            }) if classify(&error) == ErrorClass::Data => Err(Failure::Bad {
                index,
                message: describe_error(&error, &self.config.table),
            }),
            Err(ApplyError::Sql { error, .. }) => Err(classified(
                error,
                &format!(
                    "sql sink {}: writing to {}",
                    self.config.name, self.config.table
                ),
            )
            .into()),
        }
    }

    /// `try_write`, reloading the offsets when another writer moved them.
    async fn write_prefix(&mut self, records: &[SinkRecord]) -> Result<(), Failure> {
        for _ in 0..5 {
            match self.try_write(records).await {
                Err(Failure::Conflict) => {
                    tracing::warn!(sink = %self.config.name, "offsets moved under this sink; reloading them");
                    self.load_offsets().await?;
                }
                other => return other,
            }
        }
        Err(ConnectorError::Transient(anyhow!(
            "sql sink {}: the offsets in {} keep changing: is another sink writing with the same name?",
            self.config.name,
            self.config.offsets_table
        ))
        .into())
    }
}

#[async_trait]
impl Sink for SqlSink {
    async fn start(&mut self) -> Result<BTreeMap<TopicPartition, i64>> {
        self.ensure_offsets_table().await?;
        self.refresh_table().await?;
        if self.table.is_none() && !self.config.create_table {
            return Err(self.fatal(format!(
                "table {} does not exist (create it, or set create_table: true)",
                self.config.table
            )));
        }
        self.load_offsets().await?;
        self.started = true;
        Ok(self.next.clone())
    }

    /// Writes the records whose offsets are not applied yet. On `BadRecord { index }`, the
    /// records before `index` are written (and their offsets recorded); the runtime may send
    /// the batch again whole or from `index + 1`, since applied offsets are skipped.
    async fn write(&mut self, batch: &[SinkRecord]) -> Result<()> {
        if !self.started {
            self.start().await?;
        }
        let mut end = batch.len();
        let mut first_bad: Option<(usize, String)> = None;
        loop {
            match self.write_prefix(&batch[..end]).await {
                Ok(()) => {
                    return match first_bad {
                        None => Ok(()),
                        Some((index, message)) => Err(ConnectorError::BadRecord { index, message }),
                    }
                }
                Err(Failure::Bad { index, message }) if index < end => {
                    // Write what comes before it, then report it.
                    end = index;
                    first_bad = Some((index, message));
                }
                Err(Failure::Bad { index, message }) => {
                    return Err(ConnectorError::BadRecord { index, message })
                }
                Err(Failure::Conflict) => {
                    return Err(ConnectorError::Transient(anyhow!(
                        "sql sink {}: offsets changed concurrently",
                        self.config.name
                    )))
                }
                Err(Failure::Other(e)) => return Err(e),
            }
        }
    }

    fn guarantee(&self) -> Guarantee {
        Guarantee::ExactlyOnce
    }
}

fn validate(config: &SqlSinkConfig) -> Result<()> {
    let bad = |m: String| Err(ConnectorError::Fatal(anyhow!("sql sink: {m}")));
    if config.name.is_empty() {
        return bad(
            "no sink name: the runtime sets SqlSinkConfig::name (<pipeline>/<sink index>) \
                    to key the offsets table"
                .into(),
        );
    }
    if config.table.is_empty() {
        return bad("table: must not be empty".into());
    }
    if config.offsets_table.is_empty() {
        return bad("offsets_table: must not be empty".into());
    }
    if config.batch_size == 0 {
        return bad("batch_size: must be at least 1".into());
    }
    if config.mode == SinkMode::Upsert && config.key.is_empty() {
        return bad("mode upsert needs key: [columns]".into());
    }
    let mut keys = HashSet::new();
    for k in &config.key {
        if k.is_empty() || !keys.insert(k) {
            return bad(format!("key: empty or repeated column {k:?}"));
        }
    }
    if let Some(columns) = &config.columns {
        let mut targets = HashSet::new();
        for (field, column) in columns {
            if column.is_empty() || !targets.insert(column) {
                return bad(format!(
                    "columns: field {field} maps to an empty or repeated column {column:?}"
                ));
            }
        }
        for k in &config.key {
            if !targets.contains(k) {
                return bad(format!("key column {k} is not a target of columns"));
            }
        }
    }
    Ok(())
}

fn parse_object(r: &SinkRecord) -> Result<Map<String, Value>, String> {
    let Some(value) = &r.record.value else {
        return Err("tombstone (no value): the SQL sink writes JSON objects".to_string());
    };
    match serde_json::from_slice::<Value>(value) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(format!(
            "value is a JSON {}, not an object",
            json_kind(&other)
        )),
        Err(e) => Err(format!("value is not JSON: {e}")),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The column type a created table gets for a JSON value.
fn infer_type(backend: Backend, v: &Value, key: bool) -> &'static str {
    match backend {
        Backend::Postgres => match v {
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() => "bigint",
            Value::Number(n) if n.is_u64() => "numeric",
            Value::Number(_) => "double precision",
            Value::Array(_) | Value::Object(_) => "jsonb",
            Value::Null | Value::String(_) => "text",
        },
        Backend::MySql => match v {
            _ if key && !matches!(v, Value::Number(_) | Value::Bool(_)) => "VARCHAR(255)",
            Value::Bool(_) => "BOOLEAN",
            Value::Number(n) if n.is_i64() => "BIGINT",
            Value::Number(n) if n.is_u64() => "BIGINT UNSIGNED",
            Value::Number(_) => "DOUBLE",
            Value::Array(_) | Value::Object(_) => "JSON",
            Value::Null | Value::String(_) => "LONGTEXT",
        },
        Backend::Sqlite => match v {
            Value::Bool(_) => "INTEGER",
            Value::Number(n) if n.is_i64() => "INTEGER",
            Value::Number(n) if n.is_u64() => "TEXT",
            Value::Number(_) => "REAL",
            Value::Array(_) | Value::Object(_) | Value::Null | Value::String(_) => "TEXT",
        },
    }
}

/// A JSON value as a parameter for a column.
fn to_param(backend: Backend, column: &Column, v: &Value) -> Result<Param, String> {
    if v.is_null() {
        return Ok(Param::Null);
    }
    match column.kind {
        Kind::Bytes => {
            return match v {
                Value::String(s) => base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map(Param::Bytes)
                    .map_err(|e| {
                        format!(
                            "column {}: a binary column takes base64 text: {e}",
                            column.name
                        )
                    }),
                other => Err(format!(
                    "column {}: a binary column takes base64 text, not a JSON {}",
                    column.name,
                    json_kind(other)
                )),
            }
        }
        Kind::Json => return Ok(Param::Text(v.to_string())),
        Kind::PgArray if v.is_array() => return Ok(Param::Text(pg_array_literal(v))),
        Kind::NaiveTimestamp => {
            if let Some(naive) = v.as_str().and_then(rfc3339_to_naive_utc) {
                return Ok(Param::Text(naive));
            }
        }
        _ => {}
    }
    Ok(match backend {
        Backend::Postgres => Param::Text(match v {
            Value::String(s) => s.clone(),
            Value::Bool(b) if matches!(column.kind, Kind::Int | Kind::Number) => {
                u8::from(*b).to_string()
            }
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            other => other.to_string(),
        }),
        Backend::MySql | Backend::Sqlite => match v {
            Value::Bool(b) => Param::Bool(*b),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => Param::Int(i),
                (None, Some(u), _) => Param::UInt(u),
                (None, None, Some(f)) => Param::Float(f),
                _ => Param::Text(n.to_string()),
            },
            Value::String(s) => Param::Text(s.clone()),
            other => Param::Text(other.to_string()),
        },
    })
}

/// A JSON array as a PostgreSQL array literal: `{1,2}`, `{"a","b \"q\""}`, `{{1,2},{3,4}}`.
fn pg_array_literal(v: &Value) -> String {
    fn element(v: &Value, out: &mut String) {
        match v {
            Value::Null => out.push_str("NULL"),
            Value::Array(items) => {
                out.push('{');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    element(item, out);
                }
                out.push('}');
            }
            Value::Bool(b) => out.push_str(if *b { "t" } else { "f" }),
            Value::Number(n) => out.push_str(&n.to_string()),
            Value::String(s) => quote(s, out),
            Value::Object(_) => quote(&v.to_string(), out),
        }
    }
    fn quote(s: &str, out: &mut String) {
        out.push('"');
        for ch in s.chars() {
            if ch == '"' || ch == '\\' {
                out.push('\\');
            }
            out.push(ch);
        }
        out.push('"');
    }
    let mut out = String::new();
    element(v, &mut out);
    out
}

/// A database error as a bad-record message.
fn describe_error(e: &sqlx::Error, table: &str) -> String {
    match e {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("table {table}: {} (code {code})", db.message()),
            None => format!("table {table}: {}", db.message()),
        },
        other => format!("table {table}: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(kind: Kind) -> Column {
        Column {
            name: "c".into(),
            quoted: "\"c\"".into(),
            kind,
            cast: "text".into(),
        }
    }

    #[test]
    fn array_literals_quote_strings() {
        let v = serde_json::json!([["a", "b\"c"], [null, "d\\e"]]);
        assert_eq!(pg_array_literal(&v), r#"{{"a","b\"c"},{NULL,"d\\e"}}"#);
        assert_eq!(
            pg_array_literal(&serde_json::json!([1, 2.5, true])),
            "{1,2.5,t}"
        );
    }

    #[test]
    fn values_map_to_params_by_column_kind() {
        let bytes = to_param(
            Backend::MySql,
            &column(Kind::Bytes),
            &serde_json::json!("AAEC"),
        );
        assert_eq!(bytes, Ok(Param::Bytes(vec![0, 1, 2])));
        assert!(to_param(Backend::MySql, &column(Kind::Bytes), &serde_json::json!(5)).is_err());
        assert!(to_param(
            Backend::MySql,
            &column(Kind::Bytes),
            &serde_json::json!("**")
        )
        .is_err());
        assert_eq!(
            to_param(
                Backend::Postgres,
                &column(Kind::Json),
                &serde_json::json!("s")
            ),
            Ok(Param::Text("\"s\"".into()))
        );
        assert_eq!(
            to_param(
                Backend::Postgres,
                &column(Kind::Other),
                &serde_json::json!({"a": 1})
            ),
            Ok(Param::Text("{\"a\":1}".into()))
        );
        assert_eq!(
            to_param(
                Backend::MySql,
                &column(Kind::NaiveTimestamp),
                &serde_json::json!("2024-01-02T03:04:05+01:00")
            ),
            Ok(Param::Text("2024-01-02 02:04:05".into()))
        );
        assert_eq!(
            to_param(
                Backend::Postgres,
                &column(Kind::Int),
                &serde_json::json!(true)
            ),
            Ok(Param::Text("1".into()))
        );
        assert_eq!(
            to_param(
                Backend::Sqlite,
                &column(Kind::Int),
                &serde_json::json!(u64::MAX)
            ),
            Ok(Param::UInt(u64::MAX))
        );
        assert_eq!(
            to_param(
                Backend::MySql,
                &column(Kind::Other),
                &serde_json::Value::Null
            ),
            Ok(Param::Null)
        );
    }

    #[test]
    fn configuration_is_checked() {
        let config: SqlSinkConfig = serde_json::from_value(serde_json::json!({
            "url": "sqlite::memory:", "table": "t", "mode": "upsert"
        }))
        .unwrap();
        let mut named = config.clone();
        named.name = "p/0".into();
        assert!(validate(&config)
            .unwrap_err()
            .to_string()
            .contains("no sink name"));
        assert!(validate(&named)
            .unwrap_err()
            .to_string()
            .contains("needs key"));
        named.key = vec!["id".into()];
        assert!(validate(&named).is_ok());
        let unknown = serde_json::from_value::<SqlSinkConfig>(serde_json::json!({
            "url": "sqlite::memory:", "table": "t", "name": "x"
        }));
        assert!(unknown
            .unwrap_err()
            .to_string()
            .contains("unknown field `name`"));
    }
}
