//! SQL connectors: a sink that writes records as rows (insert or upsert, exactly once through an
//! offsets table written in the same transaction) and a source that polls a table or a query
//! for new rows (Kafka Connect JDBC style incrementing / timestamp modes).
//!
//! The database is chosen by the URL scheme: `postgres://` or `postgresql://` (PostgreSQL),
//! `mysql://` or `mariadb://` (MySQL, MariaDB), `sqlite:` (SQLite). Each backend has its own
//! connection pool and its own type mapping; docs/connectors/sql.md documents them.

mod decode;
mod exec;
mod sink;
mod source;

use std::str::FromStr;
use std::time::Duration;

use anyhow::anyhow;
use sqlx::error::DatabaseError;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::Executor;

use crate::ConnectorError;

pub use sink::{SinkMode, SqlSink, SqlSinkConfig};
pub use source::{SourceMode, SqlSource, SqlSourceConfig};

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Postgres,
    MySql,
    Sqlite,
}

impl Backend {
    pub(crate) fn from_url(url: &str) -> Result<Backend, ConnectorError> {
        let scheme = url.split(':').next().unwrap_or("").to_ascii_lowercase();
        match scheme.as_str() {
            "postgres" | "postgresql" => Ok(Backend::Postgres),
            "mysql" | "mariadb" => Ok(Backend::MySql),
            "sqlite" => Ok(Backend::Sqlite),
            _ => Err(ConnectorError::Fatal(anyhow!(
                "url {}: unsupported scheme {scheme:?} (expected postgres://, mysql://, mariadb:// or sqlite:)",
                redact_url(url)
            ))),
        }
    }

    /// Quotes one identifier.
    pub(crate) fn quote_ident(self, name: &str) -> String {
        match self {
            Backend::MySql => format!("`{}`", name.replace('`', "``")),
            Backend::Postgres | Backend::Sqlite => format!("\"{}\"", name.replace('"', "\"\"")),
        }
    }

    /// Quotes a possibly schema-qualified name (`schema.table`): each dot-separated part.
    pub(crate) fn quote_path(self, name: &str) -> String {
        name.split('.')
            .map(|part| self.quote_ident(part))
            .collect::<Vec<_>>()
            .join(".")
    }

    /// The placeholder for the `n`th parameter (1-based).
    pub(crate) fn placeholder(self, n: usize) -> String {
        match self {
            Backend::Postgres => format!("${n}"),
            Backend::MySql | Backend::Sqlite => "?".to_string(),
        }
    }

    /// Most bind parameters one statement may carry.
    pub(crate) fn max_params(self) -> usize {
        match self {
            Backend::Postgres | Backend::MySql => 65_535,
            Backend::Sqlite => 32_766,
        }
    }

    /// Column names compare case-insensitively (MySQL, SQLite) or exactly (PostgreSQL, once
    /// quoted).
    pub(crate) fn case_insensitive_names(self) -> bool {
        !matches!(self, Backend::Postgres)
    }
}

/// A connection pool to one of the supported databases.
#[derive(Clone)]
pub(crate) enum DbPool {
    Postgres(PgPool),
    MySql(MySqlPool),
    Sqlite(SqlitePool),
}

impl DbPool {
    pub(crate) async fn close(&self) {
        match self {
            DbPool::Postgres(p) => p.close().await,
            DbPool::MySql(p) => p.close().await,
            DbPool::Sqlite(p) => p.close().await,
        }
    }
}

/// Connects to `url`. `writer` pools (sinks) create a missing SQLite file and make MySQL
/// refuse bad values instead of truncating them with a warning.
pub(crate) async fn connect(
    url: &str,
    max_connections: u32,
    writer: bool,
) -> Result<(Backend, DbPool), ConnectorError> {
    let backend = Backend::from_url(url)?;
    let shown = redact_url(url);
    let bad_url = |e: sqlx::Error| ConnectorError::Fatal(anyhow!("url {shown}: {e}"));
    let failed = |e: sqlx::Error| classified(e, &format!("cannot connect to {shown}"));
    let acquire_timeout = Duration::from_secs(15);
    let pool = match backend {
        Backend::Postgres => {
            let options = PgConnectOptions::from_str(url)
                .map_err(bad_url)?
                .application_name("weir")
                // Timestamps without a time zone are taken as UTC, in both directions.
                .options([("TimeZone", "UTC")]);
            let pool = PgPoolOptions::new()
                .max_connections(max_connections)
                .min_connections(0)
                .acquire_timeout(acquire_timeout)
                .connect_with(options)
                .await
                .map_err(failed)?;
            DbPool::Postgres(pool)
        }
        Backend::MySql => {
            let url = match url.get(..10) {
                Some(p) if p.eq_ignore_ascii_case("mariadb://") => {
                    format!("mysql://{}", &url[10..])
                }
                _ => url.to_string(),
            };
            // The session time zone is UTC (sqlx's default, said again here on purpose).
            let options = MySqlConnectOptions::from_str(&url)
                .map_err(bad_url)?
                .timezone(Some("+00:00".to_string()));
            let mut pool = MySqlPoolOptions::new()
                .max_connections(max_connections)
                .min_connections(0)
                .acquire_timeout(acquire_timeout);
            if writer {
                pool = pool.after_connect(|conn, _meta| {
                    Box::pin(async move {
                        conn.execute(
                            "SET SESSION sql_mode = \
                             CONCAT_WS(',', NULLIF(@@sql_mode, ''), 'STRICT_ALL_TABLES')",
                        )
                        .await?;
                        Ok(())
                    })
                });
            }
            DbPool::MySql(pool.connect_with(options).await.map_err(failed)?)
        }
        Backend::Sqlite => {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(bad_url)?
                .create_if_missing(writer)
                .busy_timeout(Duration::from_secs(10));
            let pool = SqlitePoolOptions::new()
                .max_connections(max_connections)
                .min_connections(0)
                .acquire_timeout(acquire_timeout)
                .connect_with(options)
                .await
                .map_err(failed)?;
            DbPool::Sqlite(pool)
        }
    };
    Ok((backend, pool))
}

/// How a database error should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// The data is at fault: a constraint, a value the column refuses, an unknown column.
    Data,
    /// Worth retrying: the connection, a deadlock, a lock timeout, a shutdown.
    Transient,
    /// Anything else: permissions, a missing table, bad SQL, a bad URL.
    Fatal,
}

pub(crate) fn classify(e: &sqlx::Error) -> ErrorClass {
    use sqlx::Error as E;
    match e {
        E::Io(_) | E::PoolTimedOut | E::WorkerCrashed | E::Protocol(_) => ErrorClass::Transient,
        E::Encode(_) => ErrorClass::Data,
        E::Database(db) => classify_database(db.as_ref()),
        _ => ErrorClass::Fatal,
    }
}

fn classify_database(db: &dyn DatabaseError) -> ErrorClass {
    use sqlx::error::ErrorKind;
    if matches!(
        db.kind(),
        ErrorKind::UniqueViolation
            | ErrorKind::ForeignKeyViolation
            | ErrorKind::NotNullViolation
            | ErrorKind::CheckViolation
            | ErrorKind::ExclusionViolation
    ) {
        return ErrorClass::Data;
    }
    if let Some(e) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        match e.number() {
            // Bad null, unknown column, duplicate key, value out of range or truncated,
            // incorrect value, data too long, foreign key, invalid JSON, check constraint.
            1048 | 1054 | 1062 | 1136 | 1263 | 1264 | 1265 | 1292 | 1366 | 1367 | 1406 | 1411
            | 1416 | 1451 | 1452 | 1690 | 3140 | 3819 | 4025 => return ErrorClass::Data,
            // Too many connections, shutdown, lock wait timeout, deadlock, killed, network.
            1040 | 1053 | 1158..=1161 | 1205 | 1213 | 1317 | 1927 | 2002 | 2006 | 2013 => {
                return ErrorClass::Transient
            }
            _ => {}
        }
    }
    if let Some(e) = db.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
        let code: i32 = e.code().and_then(|c| c.parse().ok()).unwrap_or(1);
        return match code & 0xff {
            // constraint, datatype mismatch, too big, range
            19 | 20 | 18 | 25 => ErrorClass::Data,
            // busy, locked, I/O error, disk full
            5 | 6 | 10 | 13 => ErrorClass::Transient,
            _ if e.message().contains("has no column named") => ErrorClass::Data,
            _ => ErrorClass::Fatal,
        };
    }
    // SQLSTATE: PostgreSQL, and MySQL's codes not matched above.
    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
    match code.get(..2).unwrap_or("") {
        "21" | "22" | "23" => ErrorClass::Data,
        "08" | "40" | "53" | "57" | "58" => ErrorClass::Transient,
        _ if code == "42703" || code == "42804" => ErrorClass::Data,
        _ if code == "55P03" || code == "HYT00" => ErrorClass::Transient,
        _ => ErrorClass::Fatal,
    }
}

/// A database error outside any particular record: transient or fatal (data errors are fatal
/// here, since no record is to blame).
pub(crate) fn classified(e: sqlx::Error, context: &str) -> ConnectorError {
    match classify(&e) {
        ErrorClass::Transient => ConnectorError::Transient(anyhow!("{context}: {e}")),
        ErrorClass::Data | ErrorClass::Fatal => ConnectorError::Fatal(anyhow!("{context}: {e}")),
    }
}

/// The URL with its password replaced by `***`, for messages.
pub(crate) fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

/// "YYYY-MM-DDTHH:MM:SS[.ffffff]Z": RFC 3339 in UTC, with microseconds when there are any.
pub(crate) fn format_utc(dt: time::PrimitiveDateTime) -> Result<String, String> {
    let (date, t) = (dt.date(), dt.time());
    if !(0..=9999).contains(&date.year()) {
        return Err(format!("timestamp {dt} is outside years 0-9999"));
    }
    Ok(format!(
        "{:04}-{:02}-{:02}T{}Z",
        date.year(),
        u8::from(date.month()),
        date.day(),
        format_time_of_day(t)
    ))
}

/// "HH:MM:SS[.ffffff]" (nine digits if the value has nanoseconds).
pub(crate) fn format_time_of_day(t: time::Time) -> String {
    let base = format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second());
    let nanos = t.nanosecond();
    if nanos == 0 {
        base
    } else if nanos.is_multiple_of(1000) {
        format!("{base}.{:06}", nanos / 1000)
    } else {
        format!("{base}.{nanos:09}")
    }
}

pub(crate) fn format_date(d: time::Date) -> Result<String, String> {
    if !(0..=9999).contains(&d.year()) {
        return Err(format!("date {d} is outside years 0-9999"));
    }
    Ok(format!(
        "{:04}-{:02}-{:02}",
        d.year(),
        u8::from(d.month()),
        d.day()
    ))
}

/// An RFC 3339 timestamp with an offset, converted to UTC and written without a zone
/// ("YYYY-MM-DD HH:MM:SS[.ffffff]"), for columns that hold UTC wall-clock time. None when `s`
/// is not RFC 3339.
pub(crate) fn rfc3339_to_naive_utc(s: &str) -> Option<String> {
    let dt = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    let utc = dt.to_offset(time::UtcOffset::UTC);
    let date = format_date(utc.date()).ok()?;
    Some(format!("{date} {}", format_time_of_day(utc.time())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_picks_the_backend() {
        assert_eq!(
            Backend::from_url("postgres://h/db").unwrap(),
            Backend::Postgres
        );
        assert_eq!(
            Backend::from_url("postgresql://h/db").unwrap(),
            Backend::Postgres
        );
        assert_eq!(Backend::from_url("mysql://h/db").unwrap(), Backend::MySql);
        assert_eq!(Backend::from_url("MariaDB://h/db").unwrap(), Backend::MySql);
        assert_eq!(
            Backend::from_url("sqlite:///tmp/x.db").unwrap(),
            Backend::Sqlite
        );
        let e = Backend::from_url("oracle://u:secret@h/db").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("unsupported scheme"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn quoting_doubles_the_quote_character() {
        assert_eq!(Backend::Postgres.quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(Backend::MySql.quote_ident("a`b"), "`a``b`");
        assert_eq!(
            Backend::Postgres.quote_path("public.orders"),
            "\"public\".\"orders\""
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:pw@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(redact_url("mysql://root@h/test"), "mysql://root@h/test");
        assert_eq!(redact_url("sqlite:///tmp/a.db"), "sqlite:///tmp/a.db");
    }

    #[test]
    fn timestamps_convert_to_naive_utc() {
        assert_eq!(
            rfc3339_to_naive_utc("2024-03-01T10:00:00.25+02:00").as_deref(),
            Some("2024-03-01 08:00:00.250000")
        );
        assert_eq!(
            rfc3339_to_naive_utc("2024-03-01T10:00:00Z").as_deref(),
            Some("2024-03-01 10:00:00")
        );
        assert_eq!(rfc3339_to_naive_utc("2024-03-01 10:00"), None);
        let dt = time::macros::datetime!(2024-02-29 23:59:58.000123);
        assert_eq!(format_utc(dt).unwrap(), "2024-02-29T23:59:58.000123Z");
    }
}
