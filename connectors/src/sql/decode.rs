//! Rows to JSON objects, one function per backend (the mapping is documented in
//! docs/connectors/sql.md).
//!
//! PostgreSQL values are decoded from their binary wire format by type OID, which keeps
//! numerics exact and makes arrays of any supported element type work the same way.

use std::collections::HashSet;

use base64::Engine;
use serde_json::{Map, Number, Value};
use sqlx::mysql::MySqlRow;
use sqlx::postgres::{PgRow, PgTypeInfo, PgTypeKind, PgValueFormat};
use sqlx::sqlite::SqliteRow;
use sqlx::{Column, Row, TypeInfo, ValueRef};
use time::macros::date;
use time::{Duration, PrimitiveDateTime, Time};

use super::{format_date, format_time_of_day, format_utc};

/// Columns whose text holds JSON (MariaDB's JSON type, SQLite, or as configured), matched
/// case-insensitively.
#[derive(Debug, Clone, Default)]
pub(crate) struct JsonColumns(HashSet<String>);

impl JsonColumns {
    pub(crate) fn new(names: impl IntoIterator<Item = String>) -> JsonColumns {
        JsonColumns(names.into_iter().map(|n| n.to_lowercase()).collect())
    }

    pub(crate) fn insert(&mut self, name: &str) {
        self.0.insert(name.to_lowercase());
    }

    fn contains(&self, name: &str) -> bool {
        !self.0.is_empty() && self.0.contains(&name.to_lowercase())
    }
}

/// Text from a JSON column: parsed, or left as a string when it is not JSON.
fn json_text(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

fn base64(bytes: &[u8]) -> Value {
    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn float(f: f64) -> Value {
    match Number::from_f64(f) {
        Some(n) => Value::Number(n),
        None if f.is_nan() => Value::String("NaN".into()),
        None if f > 0.0 => Value::String("Infinity".into()),
        None => Value::String("-Infinity".into()),
    }
}

/// An f32 as the f64 with the same shortest decimal form (0.1f32 becomes 0.1, not
/// 0.100000001490116).
fn float32(f: f32) -> Value {
    if f.is_finite() {
        float(f.to_string().parse::<f64>().unwrap_or(f as f64))
    } else {
        float(f as f64)
    }
}

fn unsupported(column: &str, type_name: &str) -> String {
    format!(
        "column {column}: type {type_name} has no JSON mapping; convert it in `query` \
         (for example CAST({column} AS TEXT) AS {column})"
    )
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

pub(crate) fn pg_row(
    row: &PgRow,
    json_columns: &JsonColumns,
) -> Result<Map<String, Value>, String> {
    let mut map = Map::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let name = column.name();
        let raw = row
            .try_get_raw(i)
            .map_err(|e| format!("column {name}: {e}"))?;
        let value = if raw.is_null() {
            Value::Null
        } else {
            let ty = raw.type_info().into_owned();
            match raw.format() {
                PgValueFormat::Text => {
                    let text = raw.as_str().map_err(|e| format!("column {name}: {e}"))?;
                    Value::String(text.to_string())
                }
                PgValueFormat::Binary => {
                    let bytes = raw.as_bytes().map_err(|e| format!("column {name}: {e}"))?;
                    pg_binary(&ty, bytes).map_err(|e| match e {
                        PgError::Unsupported => unsupported(name, ty.name()),
                        PgError::Bad(m) => format!("column {name} ({}): {m}", ty.name()),
                    })?
                }
            }
        };
        let value = match value {
            Value::String(s) if json_columns.contains(name) => json_text(&s),
            v => v,
        };
        map.insert(name.to_string(), value);
    }
    Ok(map)
}

#[derive(Debug)]
enum PgError {
    Unsupported,
    Bad(String),
}

impl From<String> for PgError {
    fn from(m: String) -> PgError {
        PgError::Bad(m)
    }
}

impl From<&str> for PgError {
    fn from(m: &str) -> PgError {
        PgError::Bad(m.to_string())
    }
}

fn pg_binary(ty: &PgTypeInfo, bytes: &[u8]) -> Result<Value, PgError> {
    match ty.kind() {
        PgTypeKind::Enum(_) => return pg_text(bytes),
        PgTypeKind::Domain(base) => return pg_binary(base, bytes),
        PgTypeKind::Array(_) => return pg_array(bytes),
        _ => {}
    }
    if let Some(oid) = ty.oid() {
        return pg_oid(oid.0, bytes);
    }
    Err(PgError::Unsupported)
}

/// Element OIDs of the array types decoded as JSON arrays.
const PG_ARRAY_OIDS: &[u32] = &[
    199, 651, 1000, 1001, 1002, 1003, 1005, 1007, 1009, 1014, 1015, 1016, 1021, 1022, 1028, 1040,
    1041, 1115, 1182, 1183, 1185, 1187, 1231, 1270, 2951, 3807,
];

fn pg_oid(oid: u32, bytes: &[u8]) -> Result<Value, PgError> {
    let mut b = Reader(bytes);
    Ok(match oid {
        16 => Value::Bool(b.u8()? != 0),
        17 => base64(bytes),
        18 => Value::String(bytes.iter().map(|&c| c as char).collect()),
        // name, text, xml, bpchar, varchar, unknown
        19 | 25 | 142 | 705 | 1042 | 1043 => pg_text(bytes)?,
        20 => Value::from(b.i64()?),
        21 => Value::from(b.i16()?),
        23 => Value::from(b.i32()?),
        26 => Value::from(b.u32()?),
        114 => serde_json::from_slice(bytes).map_err(|e| format!("bad json: {e}"))?,
        3802 => {
            let version = b.u8()?;
            if version != 1 {
                return Err(format!("unknown jsonb version {version}").into());
            }
            serde_json::from_slice(b.rest()).map_err(|e| format!("bad jsonb: {e}"))?
        }
        700 => float32(f32::from_bits(b.u32()?)),
        701 => float(f64::from_bits(b.u64()?)),
        1700 => Value::String(pg_numeric(bytes)?),
        1082 => {
            let days = b.i32()?;
            match days {
                i32::MAX => Value::String("infinity".into()),
                i32::MIN => Value::String("-infinity".into()),
                _ => Value::String(format_date(
                    date!(2000 - 01 - 01)
                        .checked_add(Duration::days(days.into()))
                        .ok_or("date out of range")?,
                )?),
            }
        }
        1083 => Value::String(pg_time_of_day(b.i64()?)?),
        1266 => {
            let micros = b.i64()?;
            // Seconds west of UTC.
            let zone = -b.i32()?;
            let sign = if zone < 0 { '-' } else { '+' };
            let zone = zone.unsigned_abs();
            Value::String(format!(
                "{}{sign}{:02}:{:02}",
                pg_time_of_day(micros)?,
                zone / 3600,
                zone % 3600 / 60
            ))
        }
        // timestamp (taken as UTC) and timestamptz
        1114 | 1184 => {
            let micros = b.i64()?;
            match micros {
                i64::MAX => Value::String("infinity".into()),
                i64::MIN => Value::String("-infinity".into()),
                _ => {
                    let epoch = PrimitiveDateTime::new(date!(2000 - 01 - 01), Time::MIDNIGHT);
                    let dt = epoch
                        .checked_add(Duration::microseconds(micros))
                        .ok_or("timestamp out of range")?;
                    Value::String(format_utc(dt)?)
                }
            }
        }
        1186 => {
            let micros = b.i64()?;
            let days = b.i32()?;
            let months = b.i32()?;
            Value::String(iso_interval(months, days, micros))
        }
        2950 => {
            let u = b.take(16)?;
            let hex: String = u.iter().map(|x| format!("{x:02x}")).collect();
            Value::String(format!(
                "{}-{}-{}-{}-{}",
                &hex[..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..]
            ))
        }
        // inet, cidr
        869 | 650 => {
            let family = b.u8()?;
            let bits = b.u8()?;
            let _is_cidr = b.u8()?;
            let len = b.u8()? as usize;
            let addr = b.take(len)?;
            let (text, max) = match (family, addr.len()) {
                (2, 4) => (
                    std::net::Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]).to_string(),
                    32,
                ),
                (3, 16) => {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(addr);
                    (std::net::Ipv6Addr::from(a).to_string(), 128)
                }
                _ => return Err("bad inet value".into()),
            };
            if oid == 650 || bits != max {
                Value::String(format!("{text}/{bits}"))
            } else {
                Value::String(text)
            }
        }
        // macaddr, macaddr8
        829 | 774 => Value::String(
            bytes
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(":"),
        ),
        // bit, varbit
        1560 | 1562 => {
            let len = b.i32()?;
            let data = b.rest();
            let len = usize::try_from(len).map_err(|_| "bad bit string length")?;
            if data.len() * 8 < len {
                return Err("bad bit string".into());
            }
            Value::String(
                (0..len)
                    .map(|i| {
                        if data[i / 8] & (0x80 >> (i % 8)) != 0 {
                            '1'
                        } else {
                            '0'
                        }
                    })
                    .collect(),
            )
        }
        _ if PG_ARRAY_OIDS.contains(&oid) => pg_array(bytes)?,
        _ => return Err(PgError::Unsupported),
    })
}

fn pg_text(bytes: &[u8]) -> Result<Value, PgError> {
    Ok(Value::String(
        std::str::from_utf8(bytes)
            .map_err(|_| "text is not UTF-8")?
            .to_string(),
    ))
}

fn pg_time_of_day(micros: i64) -> Result<String, String> {
    if micros == 86_400_000_000 {
        return Ok("24:00:00".to_string());
    }
    let t =
        time_from_micros(micros).ok_or_else(|| format!("time of day {micros}us out of range"))?;
    Ok(format_time_of_day(t))
}

/// Microseconds since midnight as a time of day.
fn time_from_micros(micros: i64) -> Option<Time> {
    if !(0..86_400_000_000).contains(&micros) {
        return None;
    }
    let secs = micros / 1_000_000;
    Time::from_hms_micro(
        (secs / 3600) as u8,
        (secs % 3600 / 60) as u8,
        (secs % 60) as u8,
        (micros % 1_000_000) as u32,
    )
    .ok()
}

/// An interval in ISO 8601 form, as PostgreSQL's `iso_8601` style writes it ("P1Y2M3DT4H5M6.5S",
/// "PT0S").
fn iso_interval(months: i32, days: i32, micros: i64) -> String {
    let mut s = String::from("P");
    let (years, months) = (months / 12, months % 12);
    if years != 0 {
        s.push_str(&format!("{years}Y"));
    }
    if months != 0 {
        s.push_str(&format!("{months}M"));
    }
    if days != 0 {
        s.push_str(&format!("{days}D"));
    }
    if micros != 0 {
        s.push('T');
        let hours = micros / 3_600_000_000;
        let minutes = micros % 3_600_000_000 / 60_000_000;
        let rest = micros % 60_000_000;
        if hours != 0 {
            s.push_str(&format!("{hours}H"));
        }
        if minutes != 0 {
            s.push_str(&format!("{minutes}M"));
        }
        if rest != 0 {
            let sign = if rest < 0 { "-" } else { "" };
            let rest = rest.unsigned_abs();
            let (secs, frac) = (rest / 1_000_000, rest % 1_000_000);
            if frac == 0 {
                s.push_str(&format!("{sign}{secs}S"));
            } else {
                let frac = format!("{frac:06}");
                s.push_str(&format!("{sign}{secs}.{}S", frac.trim_end_matches('0')));
            }
        }
    }
    if s == "P" {
        s.push_str("T0S");
    }
    s
}

/// NUMERIC in PostgreSQL's binary form (base-10000 digits, a weight, a sign and a display
/// scale) as exact decimal text.
fn pg_numeric(bytes: &[u8]) -> Result<String, PgError> {
    let mut b = Reader(bytes);
    let ndigits = b.i16()?;
    let weight = b.i16()? as i32;
    let sign = b.u16()?;
    let dscale = b.u16()? as usize;
    let ndigits = usize::try_from(ndigits).map_err(|_| "bad numeric")?;
    let mut digits = Vec::with_capacity(ndigits);
    for _ in 0..ndigits {
        let d = b.i16()?;
        if !(0..10000).contains(&d) {
            return Err("bad numeric digit".into());
        }
        digits.push(d as u32);
    }
    match sign {
        0x0000 | 0x4000 => {}
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        _ => return Err("bad numeric sign".into()),
    }
    let digit = |i: i32| -> u32 {
        if i < 0 {
            0
        } else {
            digits.get(i as usize).copied().unwrap_or(0)
        }
    };
    let mut s = String::new();
    if sign == 0x4000 {
        s.push('-');
    }
    if weight < 0 {
        s.push('0');
    } else {
        for i in 0..=weight {
            if i == 0 {
                s.push_str(&digit(i).to_string());
            } else {
                s.push_str(&format!("{:04}", digit(i)));
            }
        }
    }
    if dscale > 0 {
        let mut frac = String::with_capacity(dscale + 4);
        let mut i = weight + 1;
        while frac.len() < dscale {
            frac.push_str(&format!("{:04}", digit(i)));
            i += 1;
        }
        frac.truncate(dscale);
        s.push('.');
        s.push_str(&frac);
    }
    Ok(s)
}

/// An array in PostgreSQL's binary form: nested JSON arrays, one level per dimension.
fn pg_array(bytes: &[u8]) -> Result<Value, PgError> {
    let mut b = Reader(bytes);
    let ndim = b.i32()?;
    let _flags = b.i32()?;
    let elem = b.u32()?;
    if ndim == 0 {
        return Ok(Value::Array(Vec::new()));
    }
    if !(1..=6).contains(&ndim) {
        return Err("bad array dimensions".into());
    }
    let mut dims = Vec::with_capacity(ndim as usize);
    for _ in 0..ndim {
        let len = b.i32()?;
        let _lower = b.i32()?;
        dims.push(usize::try_from(len).map_err(|_| "bad array length")?);
    }
    let total = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or("array too large")?;
    if total > bytes.len() {
        return Err("bad array length".into());
    }
    let mut items = Vec::with_capacity(total);
    for _ in 0..total {
        let len = b.i32()?;
        if len < 0 {
            items.push(Value::Null);
        } else {
            let data = b.take(len as usize)?;
            items.push(pg_oid(elem, data)?);
        }
    }
    // Fold the flat list into nested arrays, innermost dimension first.
    for &d in dims.iter().skip(1).rev() {
        let mut grouped = Vec::with_capacity(items.len() / d.max(1));
        let mut it = items.into_iter();
        loop {
            let chunk: Vec<Value> = it.by_ref().take(d).collect();
            if chunk.is_empty() {
                break;
            }
            grouped.push(Value::Array(chunk));
        }
        items = grouped;
    }
    Ok(Value::Array(items))
}

/// Bounds-checked big-endian reads.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PgError> {
        if self.0.len() < n {
            return Err("value shorter than its type".into());
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PgError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, PgError> {
        Ok(self.take(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, PgError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    fn u16(&mut self) -> Result<u16, PgError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, PgError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, PgError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, PgError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, PgError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}

// ---------------------------------------------------------------------------------------------
// MySQL / MariaDB

pub(crate) fn mysql_row(
    row: &MySqlRow,
    json_columns: &JsonColumns,
) -> Result<Map<String, Value>, String> {
    let mut map = Map::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let name = column.name();
        let raw = row
            .try_get_raw(i)
            .map_err(|e| format!("column {name}: {e}"))?;
        let value = if raw.is_null() {
            Value::Null
        } else {
            let type_info = raw.type_info().into_owned();
            let type_name = type_info.name().to_string();
            // sqlx names a text column with a binary collation (utf8mb4_bin, MariaDB's JSON)
            // BLOB; the character set tells text from bytes.
            let text = <str as sqlx::Type<sqlx::MySql>>::compatible(&type_info);
            mysql_value(row, i, &type_name, text, json_columns.contains(name)).map_err(
                |e| match e {
                    None => unsupported(name, &type_name),
                    Some(e) => format!("column {name} ({type_name}): {e}"),
                },
            )?
        };
        map.insert(name.to_string(), value);
    }
    Ok(map)
}

/// Err(None): the type has no mapping.
fn mysql_value(
    row: &MySqlRow,
    i: usize,
    type_name: &str,
    text: bool,
    json: bool,
) -> Result<Value, Option<String>> {
    let e = |e: sqlx::Error| Some(e.to_string());
    let string_family = matches!(
        type_name,
        "CHAR"
            | "VARCHAR"
            | "TINYTEXT"
            | "TEXT"
            | "MEDIUMTEXT"
            | "LONGTEXT"
            | "ENUM"
            | "SET"
            | "BINARY"
            | "VARBINARY"
            | "TINYBLOB"
            | "BLOB"
            | "MEDIUMBLOB"
            | "LONGBLOB"
    );
    if string_family {
        return Ok(if text {
            let s = row.try_get_unchecked::<String, _>(i).map_err(e)?;
            if json {
                json_text(&s)
            } else {
                Value::String(s)
            }
        } else {
            base64(row.try_get_unchecked::<&[u8], _>(i).map_err(e)?)
        });
    }
    Ok(match type_name {
        "BOOLEAN" => Value::Bool(row.try_get_unchecked::<i64, _>(i).map_err(e)? != 0),
        "TINYINT" | "SMALLINT" | "MEDIUMINT" | "INT" | "BIGINT" | "YEAR" => {
            Value::from(row.try_get_unchecked::<i64, _>(i).map_err(e)?)
        }
        "TINYINT UNSIGNED" | "SMALLINT UNSIGNED" | "MEDIUMINT UNSIGNED" | "INT UNSIGNED"
        | "BIGINT UNSIGNED" => Value::from(row.try_get_unchecked::<u64, _>(i).map_err(e)?),
        "FLOAT" => float32(row.try_get_unchecked::<f32, _>(i).map_err(e)?),
        "DOUBLE" => float(row.try_get_unchecked::<f64, _>(i).map_err(e)?),
        "DECIMAL" => Value::String(row.try_get_unchecked::<String, _>(i).map_err(e)?),
        "JSON" => json_text(&row.try_get_unchecked::<String, _>(i).map_err(e)?),
        "GEOMETRY" => base64(row.try_get_unchecked::<&[u8], _>(i).map_err(e)?),
        "BIT" => {
            let bytes = row.try_get_unchecked::<&[u8], _>(i).map_err(e)?;
            if bytes.len() > 8 {
                return Err(Some("BIT wider than 64".into()));
            }
            Value::from(bytes.iter().fold(0u64, |acc, &b| acc << 8 | b as u64))
        }
        "DATE" => {
            if mysql_zero_date(row, i) {
                Value::Null
            } else {
                let d = row.try_get_unchecked::<time::Date, _>(i).map_err(e)?;
                Value::String(format_date(d).map_err(Some)?)
            }
        }
        // DATETIME is wall-clock time taken as UTC; TIMESTAMP is shown in the session time
        // zone, which is UTC.
        "DATETIME" | "TIMESTAMP" => {
            if mysql_zero_date(row, i) {
                Value::Null
            } else {
                let dt = row
                    .try_get_unchecked::<PrimitiveDateTime, _>(i)
                    .map_err(e)?;
                Value::String(format_utc(dt).map_err(Some)?)
            }
        }
        "TIME" => {
            let t = row
                .try_get_unchecked::<sqlx::mysql::types::MySqlTime, _>(i)
                .map_err(e)?;
            // (MySqlTime::is_negative answers the opposite in sqlx 0.9; the sign itself is right.)
            let sign = if t.sign().is_negative() { "-" } else { "" };
            let base = format!(
                "{sign}{:02}:{:02}:{:02}",
                t.hours(),
                t.minutes(),
                t.seconds()
            );
            Value::String(match t.microseconds() {
                0 => base,
                us => format!("{base}.{us:06}"),
            })
        }
        "NULL" => Value::Null,
        _ => return Err(None),
    })
}

/// MySQL's zero dates ('0000-00-00') have no calendar value: they map to null.
fn mysql_zero_date(row: &MySqlRow, i: usize) -> bool {
    match row.try_get_unchecked::<&[u8], _>(i) {
        Ok(b) => b.is_empty() || b.starts_with(b"0000-00-00") || b.iter().all(|&x| x == 0),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------------
// SQLite

pub(crate) fn sqlite_row(
    row: &SqliteRow,
    json_columns: &JsonColumns,
) -> Result<Map<String, Value>, String> {
    let mut map = Map::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let name = column.name();
        let e = |e: sqlx::Error| format!("column {name}: {e}");
        let raw = row.try_get_raw(i).map_err(e)?;
        let value = if raw.is_null() {
            Value::Null
        } else {
            let storage = raw.type_info().name().to_string();
            let declared = column.type_info().name().to_ascii_uppercase();
            match storage.as_str() {
                "INTEGER" => {
                    let v = row.try_get_unchecked::<i64, _>(i).map_err(e)?;
                    if declared == "BOOLEAN" {
                        Value::Bool(v != 0)
                    } else {
                        Value::from(v)
                    }
                }
                "REAL" => float(row.try_get_unchecked::<f64, _>(i).map_err(e)?),
                "TEXT" => {
                    let s = row.try_get_unchecked::<String, _>(i).map_err(e)?;
                    if json_columns.contains(name) {
                        json_text(&s)
                    } else {
                        Value::String(s)
                    }
                }
                "BLOB" => base64(&row.try_get_unchecked::<Vec<u8>, _>(i).map_err(e)?),
                _ => Value::Null,
            }
        };
        map.insert(name.to_string(), value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(ndigits: i16, weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(ndigits.to_be_bytes());
        v.extend(weight.to_be_bytes());
        v.extend(sign.to_be_bytes());
        v.extend(dscale.to_be_bytes());
        for d in digits {
            v.extend(d.to_be_bytes());
        }
        v
    }

    #[test]
    fn numerics_decode_exactly() {
        // 12345.678: digits 1, 2345, 6780; weight 1; scale 3
        let b = numeric(3, 1, 0, 3, &[1, 2345, 6780]);
        assert_eq!(pg_numeric(&b).unwrap(), "12345.678");
        // -0.0001: digit 1 at weight -1; scale 4
        let b = numeric(1, -1, 0x4000, 4, &[1]);
        assert_eq!(pg_numeric(&b).unwrap(), "-0.0001");
        // 0.00000001 (weight -2)
        let b = numeric(1, -2, 0, 8, &[1]);
        assert_eq!(pg_numeric(&b).unwrap(), "0.00000001");
        // 10000000000 (weight 2, trailing zero groups omitted)
        let b = numeric(1, 2, 0, 0, &[100]);
        assert_eq!(pg_numeric(&b).unwrap(), "10000000000");
        // 0 with scale 2
        let b = numeric(0, 0, 0, 2, &[]);
        assert_eq!(pg_numeric(&b).unwrap(), "0.00");
        let b = numeric(0, 0, 0xC000, 0, &[]);
        assert_eq!(pg_numeric(&b).unwrap(), "NaN");
        assert!(pg_numeric(&[0, 1]).is_err());
    }

    #[test]
    fn intervals_are_iso_8601() {
        assert_eq!(
            iso_interval(14, 3, 4 * 3_600_000_000 + 5 * 60_000_000 + 6_500_000),
            "P1Y2M3DT4H5M6.5S"
        );
        assert_eq!(iso_interval(0, 0, 0), "PT0S");
        assert_eq!(iso_interval(0, -1, 0), "P-1D");
    }

    #[test]
    fn short_values_are_errors_not_panics() {
        assert!(pg_oid(20, &[1, 2]).is_err());
        assert!(pg_oid(2950, &[1; 3]).is_err());
        assert!(pg_array(&[
            0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 23, 0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 1
        ])
        .is_err());
    }

    #[test]
    fn two_dimensional_arrays_nest() {
        let mut v = Vec::new();
        v.extend(2i32.to_be_bytes());
        v.extend(0i32.to_be_bytes());
        v.extend(23u32.to_be_bytes());
        for (len, lower) in [(2i32, 1i32), (3, 1)] {
            v.extend(len.to_be_bytes());
            v.extend(lower.to_be_bytes());
        }
        for x in 1..=6i32 {
            v.extend(4i32.to_be_bytes());
            v.extend(x.to_be_bytes());
        }
        assert_eq!(
            pg_array(&v).unwrap(),
            serde_json::json!([[1, 2, 3], [4, 5, 6]])
        );
    }
}
