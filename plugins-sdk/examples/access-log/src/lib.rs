//! Parse web server access-log lines (the "combined" format of nginx and Apache, and the
//! shorter "common" format) into JSON records:
//!
//! ```text
//! 203.0.113.9 - alice [10/Oct/2023:13:55:36 -0700] "GET /a?b=1 HTTP/1.1" 200 2326 "https://ref/" "curl/8.0"
//! → {"remote_addr":"203.0.113.9","remote_user":"alice","time":"2023-10-10T13:55:36-07:00",
//!    "method":"GET","path":"/a?b=1","protocol":"HTTP/1.1","status":200,"bytes":2326,
//!    "referer":"https://ref/","user_agent":"curl/8.0"}
//! ```
//!
//! `-` fields become null (bytes `-` becomes 0). A request line that is not `METHOD PATH
//! PROTOCOL` is kept whole as `request`.
//!
//! Config:
//! - `set_timestamp` (default true): set the record's timestamp to the time in the line.
//! - `keep_raw` (default false): keep the original line as `raw`.
//!
//! A line that is not in either format goes to the dead letters.

use regex::Regex;
use weir_plugin_sdk::serde_json::{json, Map, Value};
use weir_plugin_sdk::{bail, Config, Error, Record, State};

struct Parser {
    line: Regex,
    set_timestamp: bool,
    keep_raw: bool,
}

static PARSER: State<Parser> = State::new();

// host ident user [time] "request" status bytes ["referer" "user agent"] [anything else]
const LINE: &str = concat!(
    r#"^([^ ]+) ([^ ]+) ([^ ]+) \[([^\]]+)\] "((?:[^"\\]|\\.)*)" ([0-9]{3}) ([0-9]+|-)"#,
    r#"(?: "((?:[^"\\]|\\.)*)" "((?:[^"\\]|\\.)*)")?(?: .*)?$"#
);

fn parser_from(config: &Config) -> Result<Parser, Error> {
    Ok(Parser {
        line: Regex::new(LINE).map_err(|e| Error::new(format!("bad built-in pattern: {e}")))?,
        set_timestamp: config.bool("set_timestamp")?.unwrap_or(true),
        keep_raw: config.bool("keep_raw")?.unwrap_or(false),
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the usual era-based computation).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `10/Oct/2000:13:55:36 -0700` → (`2000-10-10T13:55:36-07:00`, milliseconds since the epoch).
fn parse_time(t: &str) -> Result<(String, i64), Error> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let bad = || {
        Error::new(format!(
            "bad time `{t}` (expected like 10/Oct/2000:13:55:36 -0700)"
        ))
    };
    let (stamp, zone) = t.split_once(' ').ok_or_else(bad)?;
    let parts: Vec<&str> = stamp.splitn(3, '/').collect();
    let [day, month, rest] = parts[..] else {
        return Err(bad());
    };
    let hms: Vec<&str> = rest.split(':').collect();
    let [year, hh, mm, ss] = hms[..] else {
        return Err(bad());
    };
    let num = |s: &str, max: i64| s.parse::<i64>().ok().filter(|v| (0..=max).contains(v));
    let month = MONTHS.iter().position(|m| *m == month).ok_or_else(bad)? as i64 + 1;
    let (day, year) = (
        num(day, 31).ok_or_else(bad)?,
        num(year, 9999).ok_or_else(bad)?,
    );
    let (h, mi, s) = (
        num(hh, 23).ok_or_else(bad)?,
        num(mm, 59).ok_or_else(bad)?,
        num(ss, 60).ok_or_else(bad)?,
    );
    let zb = zone.as_bytes();
    if zb.len() != 5 || !(zb[0] == b'+' || zb[0] == b'-') {
        return Err(bad());
    }
    let (zh, zm) = (
        num(&zone[1..3], 23).ok_or_else(bad)?,
        num(&zone[3..5], 59).ok_or_else(bad)?,
    );
    let offset = (zh * 3600 + zm * 60) * if zb[0] == b'-' { -1 } else { 1 };
    let secs = days_from_civil(year, month, day) * 86_400 + h * 3600 + mi * 60 + s - offset;
    let iso = format!(
        "{year:04}-{month:02}-{day:02}T{hh}:{mm}:{ss}{}{}:{}",
        &zone[..1],
        &zone[1..3],
        &zone[3..5]
    );
    Ok((iso, secs * 1000))
}

fn dash_null(s: Option<&str>) -> Value {
    match s {
        None | Some("-") => Value::Null,
        Some(s) => Value::String(s.to_string()),
    }
}

impl Parser {
    fn parse(&self, line: &str) -> Result<(Value, i64), Error> {
        let line = line.trim_end_matches(['\r', '\n']);
        let Some(c) = self.line.captures(line) else {
            let head: String = line.chars().take(80).collect();
            bail!("not an access-log line in combined or common format: {head:?}");
        };
        let field = |i: usize| c.get(i).map(|m| m.as_str());
        let (time, ms) = parse_time(&c[4])?;
        let mut o = Map::new();
        o.insert("remote_addr".into(), json!(&c[1]));
        if &c[2] != "-" {
            o.insert("ident".into(), json!(&c[2]));
        }
        o.insert("remote_user".into(), dash_null(field(3)));
        o.insert("time".into(), json!(time));
        let request = &c[5];
        let parts: Vec<&str> = request.split(' ').collect();
        match parts[..] {
            [method, path, protocol] => {
                o.insert("method".into(), json!(method));
                o.insert("path".into(), json!(path));
                o.insert("protocol".into(), json!(protocol));
            }
            _ => {
                o.insert("request".into(), json!(request));
            }
        }
        let status: u16 = c[6].parse()?;
        o.insert("status".into(), json!(status));
        let bytes: u64 = if &c[7] == "-" { 0 } else { c[7].parse()? };
        o.insert("bytes".into(), json!(bytes));
        o.insert("referer".into(), dash_null(field(8)));
        o.insert("user_agent".into(), dash_null(field(9)));
        if self.keep_raw {
            o.insert("raw".into(), json!(line));
        }
        Ok((Value::Object(o), ms))
    }
}

fn init(config: &Config) -> Result<(), Error> {
    PARSER.set(parser_from(config)?);
    Ok(())
}

fn parse(mut record: Record) -> Result<Record, Error> {
    let p = PARSER.get()?;
    let (doc, ms) = p.parse(record.value_str()?)?;
    record.set_value_json(&doc);
    if p.set_timestamp {
        record.timestamp = ms;
    }
    Ok(record)
}

weir_plugin_sdk::export_map!(parse, init = init);

#[cfg(test)]
mod tests {
    use super::*;

    fn parser() -> Parser {
        parser_from(&Config::default()).unwrap()
    }

    #[test]
    fn combined_format() {
        let (doc, ms) = parser()
            .parse(r#"203.0.113.9 - alice [10/Oct/2023:13:55:36 -0700] "GET /a?b=1 HTTP/1.1" 200 2326 "https://ref.example/" "Mozilla/5.0 (X11; Linux) \"quoted\"""#)
            .unwrap();
        assert_eq!(
            doc,
            json!({
                "remote_addr": "203.0.113.9", "remote_user": "alice",
                "time": "2023-10-10T13:55:36-07:00", "method": "GET", "path": "/a?b=1",
                "protocol": "HTTP/1.1", "status": 200, "bytes": 2326,
                "referer": "https://ref.example/",
                "user_agent": r#"Mozilla/5.0 (X11; Linux) \"quoted\""#
            })
        );
        // 2023-10-10T20:55:36Z
        assert_eq!(ms, 1_696_971_336_000);
    }

    #[test]
    fn common_format_dashes_and_odd_requests() {
        let (doc, _) = parser()
            .parse(r#"::1 - - [01/Jan/1970:00:00:00 +0000] "\x16\x03\x01" 400 - "#)
            .unwrap();
        assert_eq!(doc["remote_user"], Value::Null);
        assert_eq!(doc["request"], json!(r"\x16\x03\x01"));
        assert_eq!(doc["bytes"], json!(0));
        assert_eq!(doc["referer"], Value::Null);
        assert!(doc.get("method").is_none());
    }

    #[test]
    fn time_conversion() {
        assert_eq!(parse_time("01/Jan/1970:00:00:00 +0000").unwrap().1, 0);
        assert_eq!(
            parse_time("29/Feb/2024:23:59:59 +0530").unwrap(),
            ("2024-02-29T23:59:59+05:30".to_string(), 1_709_231_399_000)
        );
        for bad in [
            "",
            "10/Foo/2020:00:00:00 +0000",
            "10/Oct/2020:25:00:00 +0000",
            "10/Oct/2020:00:00:00 0000",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn other_lines_are_per_record_errors() {
        init(&Config::default()).unwrap();
        let input = [
            Record::new(
                r#"10.0.0.1 - - [10/Oct/2023:13:55:36 +0000] "POST /x HTTP/2.0" 201 5 "-" "k6""#,
            ),
            Record::new("hello, world"),
        ];
        let out = weir_plugin_sdk::testing::run_map(parse, &input);
        let recs = weir_plugin_sdk::testing::records(&out);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].value_json().unwrap()["method"], json!("POST"));
        assert_eq!(recs[0].timestamp, 1_696_946_136_000);
        let errs = weir_plugin_sdk::testing::errors(&out);
        assert_eq!(errs[0].0, 1);
        assert!(
            errs[0].1.contains("not an access-log line"),
            "{}",
            errs[0].1
        );
    }
}
