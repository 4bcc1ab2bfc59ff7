//! The SQL source: polls a table or a query for rows past the last seen position
//! (incrementing column, timestamp column, or both), as Kafka Connect's JDBC source does.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::anyhow;
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::time::Instant;

use super::decode::JsonColumns;
use super::exec::{Param, Stmt};
use super::{classified, connect, rfc3339_to_naive_utc, Backend, DbPool};
use crate::{now_ms, ConnectorError, Record, Result, Source, SourceBatch};

fn default_poll_interval_ms() -> u64 {
    1000
}

fn default_batch_size() -> usize {
    1000
}

/// `source: { sql: {...} }` in a pipeline file. docs/connectors/sql.md documents every field.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlSourceConfig {
    /// Database URL; the scheme picks the backend (postgres://, mysql://, mariadb://, sqlite:).
    pub url: String,
    /// The table to read (optionally `schema.table`); exactly one of table and query.
    #[serde(default)]
    pub table: Option<String>,
    /// A SELECT whose rows are read; it is wrapped as a subquery, so its columns (including
    /// the incrementing and timestamp ones) are referred to by their output names.
    #[serde(default)]
    pub query: Option<String>,
    pub mode: SourceMode,
    /// A strictly increasing column (an identity or serial key). Modes incrementing and
    /// timestamp+incrementing.
    #[serde(default)]
    pub incrementing_column: Option<String>,
    /// A column set when a row is written or changed. Modes timestamp and
    /// timestamp+incrementing.
    #[serde(default)]
    pub timestamp_column: Option<String>,
    /// Wait between polls that found nothing new (a poll that fills a batch is followed at
    /// once by the next).
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Most rows per query.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Only read rows whose timestamp is at least this old (database clock), giving
    /// transactions that commit late time to do so. PostgreSQL and MySQL only.
    #[serde(default)]
    pub timestamp_delay_ms: u64,
    /// Text columns holding JSON, emitted as JSON values rather than strings. MariaDB JSON
    /// columns of a `table` are found without this; it is for queries and SQLite.
    #[serde(default)]
    pub json_columns: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SourceMode {
    /// New rows only: `incrementing_column > last`.
    #[serde(rename = "incrementing")]
    Incrementing,
    /// New and updated rows: `timestamp_column > last`.
    #[serde(rename = "timestamp")]
    Timestamp,
    /// New and updated rows, exactly ordered: `(timestamp, incrementing) > last`.
    #[serde(rename = "timestamp+incrementing")]
    TimestampIncrementing,
}

impl SourceMode {
    fn uses_timestamp(self) -> bool {
        matches!(
            self,
            SourceMode::Timestamp | SourceMode::TimestampIncrementing
        )
    }

    fn uses_incrementing(self) -> bool {
        matches!(
            self,
            SourceMode::Incrementing | SourceMode::TimestampIncrementing
        )
    }
}

/// A column the position is kept on.
#[derive(Debug, Clone)]
struct PositionColumn {
    /// As the query returns it.
    name: String,
    quoted: String,
    /// The database's type name (PostgreSQL: what the bound text is cast to).
    type_name: String,
}

/// The last seen values of the position columns, as they appear in the records.
#[derive(Debug, Clone, Default, PartialEq)]
struct Position {
    timestamp: Option<Value>,
    incrementing: Option<Value>,
}

impl Position {
    fn to_offset(&self) -> Value {
        let mut m = Map::new();
        if let Some(t) = &self.timestamp {
            m.insert("timestamp".into(), t.clone());
        }
        if let Some(i) = &self.incrementing {
            m.insert("incrementing".into(), i.clone());
        }
        Value::Object(m)
    }
}

pub struct SqlSource {
    config: SqlSourceConfig,
    backend: Backend,
    pool: DbPool,
    from: String,
    timestamp: Option<PositionColumn>,
    incrementing: Option<PositionColumn>,
    json_columns: JsonColumns,
    /// Where the next query continues.
    query_position: Position,
    /// The offset of the last batch handed out.
    emitted: Value,
    /// Rows read and not handed out yet, each with the offset to resume after it (None: not
    /// a safe place to resume, in the middle of rows sharing one timestamp).
    pending: VecDeque<(Record, Option<Value>)>,
    next_poll: Option<Instant>,
    started: bool,
    /// Rows in the table after the query position, as last counted and then estimated; None
    /// before the first poll.
    rows_behind: Option<u64>,
    counted_at: Option<Instant>,
}

/// How often a source reading full pages counts the rows still ahead of it (a COUNT query);
/// in between, the count is lowered by the rows it reads.
const LAG_COUNT_INTERVAL: Duration = Duration::from_secs(5);

impl SqlSource {
    /// Checks the configuration and connects. Errors: Fatal for a bad configuration or URL,
    /// Transient when the database cannot be reached.
    pub async fn connect(config: SqlSourceConfig) -> Result<SqlSource> {
        validate(&config)?;
        let (backend, pool) = connect(&config.url, 1, false).await?;
        if backend == Backend::Sqlite && config.timestamp_delay_ms > 0 {
            return Err(ConnectorError::Fatal(anyhow!(
                "sql source: timestamp_delay_ms needs the database clock and is not supported \
                 on SQLite"
            )));
        }
        let from = match (&config.table, &config.query) {
            (Some(table), _) => backend.quote_path(table),
            (None, Some(query)) => {
                format!("({}) AS weir_source", query.trim().trim_end_matches(';'))
            }
            (None, None) => unreachable!("validate() requires table or query"),
        };
        Ok(SqlSource {
            json_columns: JsonColumns::new(config.json_columns.iter().cloned()),
            config,
            backend,
            pool,
            from,
            timestamp: None,
            incrementing: None,
            query_position: Position::default(),
            emitted: Value::Null,
            pending: VecDeque::new(),
            next_poll: None,
            started: false,
            rows_behind: None,
            counted_at: None,
        })
    }

    /// Closes the connection (it also closes when the source is dropped).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn fatal(&self, message: impl std::fmt::Display) -> ConnectorError {
        ConnectorError::Fatal(anyhow!("sql source: {message}"))
    }

    /// Finds the position columns among the query's columns.
    async fn resolve_columns(&mut self) -> Result<()> {
        let sql = format!("SELECT * FROM {}", self.from);
        let columns = self
            .pool
            .columns(&sql)
            .await
            .map_err(|e| classified(e, "sql source: preparing the query"))?;
        let find = |wanted: &Option<String>, field: &str| -> Result<Option<PositionColumn>> {
            let Some(wanted) = wanted else {
                return Ok(None);
            };
            let found = columns
                .iter()
                .find(|(n, _)| n == wanted)
                .or_else(|| columns.iter().find(|(n, _)| n.eq_ignore_ascii_case(wanted)));
            match found {
                Some((name, type_name)) => Ok(Some(PositionColumn {
                    quoted: self.backend.quote_ident(name),
                    name: name.clone(),
                    type_name: type_name.clone(),
                })),
                None => Err(self.fatal(format!(
                    "{field} {wanted} is not a column of the source (it has: {})",
                    columns
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        };
        let timestamp = find(&self.config.timestamp_column, "timestamp_column")?;
        let incrementing = find(&self.config.incrementing_column, "incrementing_column")?;
        self.timestamp = timestamp;
        self.incrementing = incrementing;

        // JSON kept in text columns of a table: MariaDB's JSON type, SQLite's declared JSON.
        if let Some(table) = &self.config.table {
            let (schema, name) = match table.rsplit_once('.') {
                Some((s, t)) => (Some(s.to_string()), t.to_string()),
                None => (None, table.clone()),
            };
            let found = match self.backend {
                Backend::MySql => {
                    let stmt = Stmt::new(
                        "SELECT CAST(CONSTRAINT_NAME AS CHAR), CAST(CHECK_CLAUSE AS CHAR) \
                         FROM information_schema.CHECK_CONSTRAINTS \
                         WHERE CONSTRAINT_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?",
                        vec![
                            schema.map(Param::Text).unwrap_or(Param::Null),
                            Param::Text(name),
                        ],
                    );
                    // MySQL proper has no TABLE_NAME there, and a real JSON type: ignore errors.
                    self.pool.fetch_strings(&stmt).await.unwrap_or_default()
                }
                Backend::Sqlite => {
                    let stmt = Stmt::new(
                        "SELECT name, type FROM pragma_table_info(?)",
                        vec![Param::Text(name)],
                    );
                    self.pool.fetch_strings(&stmt).await.unwrap_or_default()
                }
                Backend::Postgres => Vec::new(),
            };
            for row in found {
                if let [Some(a), Some(b)] = &row[..] {
                    let is_json = match self.backend {
                        Backend::MySql => b.eq_ignore_ascii_case(&format!("json_valid(`{a}`)")),
                        _ => b.to_ascii_uppercase().contains("JSON"),
                    };
                    if is_json {
                        self.json_columns.insert(a);
                    }
                }
            }
        }
        Ok(())
    }

    /// A placeholder for a position value, and the parameter it binds.
    fn bind(&self, column: &PositionColumn, value: &Value, n: &mut usize) -> (String, Param) {
        *n += 1;
        let placeholder = self.backend.placeholder(*n);
        match self.backend {
            Backend::Postgres => {
                let text = match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (
                    format!("CAST({placeholder} AS {})", column.type_name),
                    Param::Text(text),
                )
            }
            Backend::MySql | Backend::Sqlite => {
                let param = match value {
                    Value::String(s) => {
                        let datetime =
                            matches!(column.type_name.as_str(), "DATETIME" | "TIMESTAMP");
                        match (datetime, rfc3339_to_naive_utc(s)) {
                            (true, Some(naive)) => Param::Text(naive),
                            _ => Param::Text(s.clone()),
                        }
                    }
                    Value::Number(num) => match (num.as_i64(), num.as_u64(), num.as_f64()) {
                        (Some(i), _, _) => Param::Int(i),
                        (None, Some(u), _) => Param::UInt(u),
                        (None, None, Some(f)) => Param::Float(f),
                        _ => Param::Text(num.to_string()),
                    },
                    Value::Bool(b) => Param::Bool(*b),
                    other => Param::Text(other.to_string()),
                };
                (placeholder, param)
            }
        }
    }

    fn delay_condition(&self, ts: &PositionColumn) -> Option<String> {
        let ms = self.config.timestamp_delay_ms;
        if ms == 0 {
            return None;
        }
        Some(match self.backend {
            Backend::Postgres => format!(
                "{} <= CURRENT_TIMESTAMP - INTERVAL '{ms} milliseconds'",
                ts.quoted
            ),
            Backend::MySql => format!(
                "{} <= NOW(6) - INTERVAL {} MICROSECOND",
                ts.quoted,
                ms.saturating_mul(1000)
            ),
            Backend::Sqlite => return None,
        })
    }

    /// The query for rows after `position`.
    fn next_rows_query(&self, position: &Position, limit: usize) -> Result<Stmt> {
        let (conditions, params) = self.after(position)?;
        let order: Vec<&str> = [&self.timestamp, &self.incrementing]
            .into_iter()
            .flatten()
            .map(|c| c.quoted.as_str())
            .collect();
        Ok(Stmt::new(
            format!(
                "SELECT * FROM {} WHERE {} ORDER BY {} LIMIT {limit}",
                self.from,
                conditions.join(" AND "),
                order.join(", ")
            ),
            params,
        ))
    }

    /// How many rows come after `position` (the source's lag).
    async fn count_after(&self, position: &Position) -> Result<u64> {
        let (conditions, params) = self.after(position)?;
        let stmt = Stmt::new(
            format!(
                "SELECT COUNT(*) AS n FROM {} WHERE {}",
                self.from,
                conditions.join(" AND ")
            ),
            params,
        );
        let rows = self.fetch(&stmt).await?;
        let n = rows.first().and_then(|r| r.get("n")).and_then(|n| match n {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        });
        n.ok_or_else(|| self.fatal(format!("counting rows: unexpected answer {rows:?}")))
    }

    /// The conditions (and their parameters) that select the rows after `position`.
    fn after(&self, position: &Position) -> Result<(Vec<String>, Vec<Param>)> {
        let mut conditions = Vec::new();
        let mut params = Vec::new();
        let mut n = 0;
        let missing = |c: &str| self.fatal(format!("{c} not resolved"));
        match self.config.mode {
            SourceMode::Incrementing => {
                let inc = self
                    .incrementing
                    .as_ref()
                    .ok_or_else(|| missing("incrementing_column"))?;
                conditions.push(format!("{} IS NOT NULL", inc.quoted));
                if let Some(v) = &position.incrementing {
                    let (p, param) = self.bind(inc, v, &mut n);
                    conditions.push(format!("{} > {p}", inc.quoted));
                    params.push(param);
                }
            }
            SourceMode::Timestamp => {
                let ts = self
                    .timestamp
                    .as_ref()
                    .ok_or_else(|| missing("timestamp_column"))?;
                conditions.push(format!("{} IS NOT NULL", ts.quoted));
                if let Some(v) = &position.timestamp {
                    let (p, param) = self.bind(ts, v, &mut n);
                    conditions.push(format!("{} > {p}", ts.quoted));
                    params.push(param);
                }
            }
            SourceMode::TimestampIncrementing => {
                let ts = self
                    .timestamp
                    .as_ref()
                    .ok_or_else(|| missing("timestamp_column"))?;
                let inc = self
                    .incrementing
                    .as_ref()
                    .ok_or_else(|| missing("incrementing_column"))?;
                conditions.push(format!("{} IS NOT NULL", ts.quoted));
                conditions.push(format!("{} IS NOT NULL", inc.quoted));
                if let (Some(t), Some(i)) = (&position.timestamp, &position.incrementing) {
                    let (p1, a) = self.bind(ts, t, &mut n);
                    let (p2, b) = self.bind(ts, t, &mut n);
                    let (p3, c) = self.bind(inc, i, &mut n);
                    conditions.push(format!(
                        "({ts} > {p1} OR ({ts} = {p2} AND {inc} > {p3}))",
                        ts = ts.quoted,
                        inc = inc.quoted
                    ));
                    params.extend([a, b, c]);
                }
            }
        }
        if let Some(ts) = &self.timestamp {
            conditions.extend(self.delay_condition(ts));
        }
        Ok((conditions, params))
    }

    async fn fetch(&self, stmt: &Stmt) -> Result<Vec<Map<String, Value>>> {
        self.pool
            .fetch_json(stmt, &self.json_columns)
            .await
            .map_err(|e| classified(e, "sql source: polling"))?
            .map_err(|e| self.fatal(e))
    }

    fn position_of(&self, row: &Map<String, Value>) -> Result<Position> {
        let get = |c: &Option<PositionColumn>| -> Result<Option<Value>> {
            let Some(c) = c else {
                return Ok(None);
            };
            match row.get(&c.name) {
                Some(v) => Ok(Some(v.clone())),
                None => Err(self.fatal(format!("rows have no column {}", c.name))),
            }
        };
        Ok(Position {
            timestamp: get(&self.timestamp)?,
            incrementing: get(&self.incrementing)?,
        })
    }

    /// Reads the rows after the query position into `pending`; returns how many rows the
    /// query returned.
    async fn poll(&mut self, limit: usize) -> Result<usize> {
        let stmt = self.next_rows_query(&self.query_position, limit)?;
        let mut rows = self.fetch(&stmt).await?;
        let returned = rows.len();
        if returned == 0 {
            return Ok(0);
        }
        let mut positions = rows
            .iter()
            .map(|r| self.position_of(r))
            .collect::<Result<Vec<_>>>()?;

        if self.config.mode == SourceMode::Timestamp && returned >= limit {
            // The rows sharing the last timestamp may go on past the limit: leave them for
            // the next poll, or, if the whole page has one timestamp, read all of its rows.
            let last = positions[returned - 1].timestamp.clone();
            let keep = positions
                .iter()
                .rposition(|p| p.timestamp != last)
                .map_or(0, |i| i + 1);
            if keep > 0 {
                rows.truncate(keep);
                positions.truncate(keep);
            } else if let (Some(ts), Some(value)) = (&self.timestamp, &last) {
                let mut n = 0;
                let (p, param) = self.bind(ts, value, &mut n);
                let stmt = Stmt::new(
                    format!("SELECT * FROM {} WHERE {} = {p}", self.from, ts.quoted),
                    vec![param],
                );
                rows = self.fetch(&stmt).await?;
                positions = rows
                    .iter()
                    .map(|r| self.position_of(r))
                    .collect::<Result<Vec<_>>>()?;
                if rows.is_empty() {
                    return Ok(returned);
                }
            }
        }

        let now = now_ms();
        let count = rows.len();
        for (i, row) in rows.into_iter().enumerate() {
            // In timestamp mode only the last row of a run of equal timestamps is a safe
            // place to resume.
            let resumable = self.config.mode != SourceMode::Timestamp
                || i + 1 == count
                || positions[i + 1].timestamp != positions[i].timestamp;
            let offset = resumable.then(|| positions[i].to_offset());
            let value = serde_json::to_vec(&Value::Object(row))
                .map_err(|e| self.fatal(format!("encoding a row: {e}")))?;
            self.pending.push_back((
                Record {
                    key: None,
                    value: Some(value.into()),
                    headers: Vec::new(),
                    timestamp: now,
                },
                offset,
            ));
        }
        if let Some(last) = positions.pop() {
            self.query_position = last;
        }
        Ok(returned)
    }

    /// After a poll: a page that was not full means the source has caught up; after a full
    /// one, the rows ahead are counted (at most every [`LAG_COUNT_INTERVAL`]).
    async fn update_rows_behind(&mut self, returned: usize, limit: usize) -> Result<()> {
        if returned < limit {
            self.rows_behind = Some(0);
            return Ok(());
        }
        let due = self
            .counted_at
            .is_none_or(|t| t.elapsed() >= LAG_COUNT_INTERVAL);
        if due {
            let n = self.count_after(&self.query_position).await?;
            self.rows_behind = Some(n);
            self.counted_at = Some(Instant::now());
        } else {
            self.rows_behind = self.rows_behind.map(|b| b.saturating_sub(returned as u64));
        }
        Ok(())
    }

    fn take(&mut self, max_records: usize) -> SourceBatch {
        let n = max_records.max(1).min(self.pending.len());
        let mut records = Vec::with_capacity(n);
        let mut offset = None;
        for (record, o) in self.pending.drain(..n) {
            records.push(record);
            if o.is_some() {
                offset = o;
            }
        }
        if let Some(o) = offset {
            self.emitted = o;
        }
        SourceBatch {
            records,
            offset: self.emitted.clone(),
        }
    }

    fn parse_resume(&self, resume: Option<Value>) -> Result<Position> {
        let object = match resume {
            None | Some(Value::Null) => return Ok(Position::default()),
            Some(Value::Object(m)) => m,
            Some(other) => {
                return Err(self.fatal(format!("offset {other} is not an object")));
            }
        };
        let mode = self.config.mode;
        let take = |key: &str, wanted: bool| -> Result<Option<Value>> {
            match (object.get(key), wanted) {
                (Some(v), true) if !v.is_null() => Ok(Some(v.clone())),
                (None, false) => Ok(None),
                _ => Err(self.fatal(format!(
                    "offset {} does not fit mode {mode:?} (the mode changed?); remove the \
                     pipeline's stored offset to start over",
                    Value::Object(object.clone())
                ))),
            }
        };
        Ok(Position {
            timestamp: take("timestamp", mode.uses_timestamp())?,
            incrementing: take("incrementing", mode.uses_incrementing())?,
        })
    }
}

#[async_trait]
impl Source for SqlSource {
    async fn start(&mut self, resume: Option<Value>) -> Result<()> {
        let position = self.parse_resume(resume)?;
        self.resolve_columns().await?;
        self.emitted = if position == Position::default() {
            Value::Null
        } else {
            position.to_offset()
        };
        self.query_position = position;
        self.pending.clear();
        self.next_poll = None;
        self.rows_behind = None;
        self.counted_at = None;
        self.started = true;
        Ok(())
    }

    /// Rows not handed out yet: read and waiting, and still in the table after the query
    /// position (counted every few seconds while the source reads full pages).
    fn lag(&self) -> Option<crate::Lag> {
        self.rows_behind
            .map(|b| crate::Lag::Records(b + self.pending.len() as u64))
    }

    async fn next_batch(&mut self, max_records: usize) -> Result<Option<SourceBatch>> {
        if !self.started {
            return Err(self.fatal("next_batch before start"));
        }
        loop {
            if !self.pending.is_empty() {
                return Ok(Some(self.take(max_records)));
            }
            if let Some(at) = self.next_poll {
                tokio::time::sleep_until(at).await;
            }
            let limit = self.config.batch_size;
            let returned = self.poll(limit).await?;
            self.next_poll = if returned >= limit {
                None
            } else {
                Some(Instant::now() + Duration::from_millis(self.config.poll_interval_ms))
            };
            self.update_rows_behind(returned, limit).await?;
        }
    }
}

fn validate(config: &SqlSourceConfig) -> Result<()> {
    let bad = |m: &str| Err(ConnectorError::Fatal(anyhow!("sql source: {m}")));
    match (&config.table, &config.query) {
        (Some(_), Some(_)) => return bad("give table or query, not both"),
        (None, None) => return bad("give table or query"),
        (Some(t), None) if t.is_empty() => return bad("table: must not be empty"),
        (None, Some(q)) if q.trim().is_empty() => return bad("query: must not be empty"),
        _ => {}
    }
    if config.mode.uses_timestamp() && config.timestamp_column.is_none() {
        return bad("this mode needs timestamp_column");
    }
    if config.mode.uses_incrementing() && config.incrementing_column.is_none() {
        return bad("this mode needs incrementing_column");
    }
    if !config.mode.uses_timestamp() && config.timestamp_column.is_some() {
        return bad("timestamp_column is only used by modes timestamp and timestamp+incrementing");
    }
    if !config.mode.uses_incrementing() && config.incrementing_column.is_some() {
        return bad(
            "incrementing_column is only used by modes incrementing and timestamp+incrementing",
        );
    }
    if !config.mode.uses_timestamp() && config.timestamp_delay_ms > 0 {
        return bad("timestamp_delay_ms needs a timestamp mode");
    }
    if config.batch_size == 0 {
        return bad("batch_size: must be at least 1");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_from_yaml_names() {
        let c: SqlSourceConfig = serde_json::from_value(serde_json::json!({
            "url": "sqlite::memory:", "table": "t", "mode": "timestamp+incrementing",
            "timestamp_column": "ts", "incrementing_column": "id"
        }))
        .unwrap();
        assert_eq!(c.mode, SourceMode::TimestampIncrementing);
        assert!(validate(&c).is_ok());
        let mut missing = c.clone();
        missing.incrementing_column = None;
        assert!(validate(&missing)
            .unwrap_err()
            .to_string()
            .contains("incrementing_column"));
        let mut both = c.clone();
        both.query = Some("SELECT 1".into());
        assert!(validate(&both)
            .unwrap_err()
            .to_string()
            .contains("not both"));
        let typo = serde_json::from_value::<SqlSourceConfig>(serde_json::json!({
            "url": "x", "table": "t", "mode": "incrementing", "incrementing_colum": "id"
        }));
        assert!(typo.unwrap_err().to_string().contains("incrementing_colum"));
    }
}
