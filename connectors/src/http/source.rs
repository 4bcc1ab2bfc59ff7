//! The HTTP polling source: GETs a URL every interval, passing the cursor it has reached as a
//! query parameter, and takes the records from an array in the JSON response.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use anyhow::anyhow;
use async_trait::async_trait;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

use super::{client, header_map, parse_url, retry_after, snippet};
use crate::{ConnectorError, Record, Result, Source, SourceBatch};

fn default_interval_ms() -> u64 {
    5_000
}
fn default_timeout_ms() -> u64 {
    30_000
}

/// A polling HTTP source. docs/connectors/http.md documents every field.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpPollSourceConfig {
    /// The URL to GET (http:// or https://); its own query parameters are kept.
    pub url: String,
    /// Wait between polls that brought nothing new.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// The query parameter the cursor is sent in (absent: no cursor, every poll reads the
    /// same resource).
    #[serde(default)]
    pub cursor_param: Option<String>,
    /// The next cursor is this field of the last record (a field name, or a JSON pointer
    /// starting with /). Exclusive with cursor_pointer.
    #[serde(default)]
    pub cursor_field: Option<String>,
    /// The next cursor is at this JSON pointer in the response (e.g. /next). Exclusive with
    /// cursor_field.
    #[serde(default)]
    pub cursor_pointer: Option<String>,
    /// JSON pointer to the array of records in the response; "" (the default) is the whole
    /// response.
    #[serde(default)]
    pub records_pointer: String,
    /// The cursor of the first poll (absent: the first poll sends no cursor).
    #[serde(default)]
    pub initial_cursor: Option<Value>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// CA certificates (PEM) trusted for an https:// URL besides the system's.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

pub struct HttpPollSource {
    config: HttpPollSourceConfig,
    url: reqwest::Url,
    client: reqwest::Client,
    headers: HeaderMap,
    /// The cursor the next poll sends.
    cursor: Option<Value>,
    /// The offset of the last batch handed out.
    emitted: Value,
    pending: VecDeque<(Record, Option<Value>)>,
    next_poll: Option<Instant>,
    started: bool,
}

impl HttpPollSource {
    /// Checks the configuration and builds the client (nothing is fetched yet).
    pub fn new(config: HttpPollSourceConfig) -> Result<HttpPollSource> {
        let what = "http poll source";
        let bad = |m: &str| Err(ConnectorError::Fatal(anyhow!("{what}: {m}")));
        let url = parse_url(&config.url, what)?;
        if config.cursor_field.is_some() && config.cursor_pointer.is_some() {
            return bad("give cursor_field or cursor_pointer, not both");
        }
        let follows = config.cursor_field.is_some() || config.cursor_pointer.is_some();
        if follows != config.cursor_param.is_some() {
            return bad("cursor_param goes with cursor_field or cursor_pointer (all or none)");
        }
        for pointer in [
            &config.cursor_pointer,
            &Some(config.records_pointer.clone()),
        ]
        .into_iter()
        .flatten()
        {
            if !pointer.is_empty() && !pointer.starts_with('/') {
                return bad(&format!(
                    "{pointer:?} is not a JSON pointer (they start with /)"
                ));
            }
        }
        if config.timeout_ms == 0 {
            return bad("timeout_ms must be at least 1");
        }
        let headers = header_map(&config.headers, what)?;
        let client = client(
            Duration::from_millis(config.timeout_ms),
            config.ca_file.as_deref(),
            what,
        )?;
        Ok(HttpPollSource {
            cursor: config.initial_cursor.clone(),
            config,
            url,
            client,
            headers,
            emitted: Value::Null,
            pending: VecDeque::new(),
            next_poll: None,
            started: false,
        })
    }

    fn request_url(&self) -> reqwest::Url {
        let mut url = self.url.clone();
        if let (Some(param), Some(cursor)) = (&self.config.cursor_param, &self.cursor) {
            let text = match cursor {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let kept: Vec<(String, String)> = url
                .query_pairs()
                .filter(|(k, _)| k != param.as_str())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            url.query_pairs_mut()
                .clear()
                .extend_pairs(kept)
                .append_pair(param, &text);
        }
        url
    }

    /// One GET; the records it brought go to `pending`. Returns whether the poll moved on
    /// (records came and the cursor changed).
    async fn poll(&mut self) -> Result<bool> {
        let url = self.request_url();
        let response = self
            .client
            .get(url.clone())
            .headers(self.headers.clone())
            .send()
            .await
            .map_err(|e| ConnectorError::Transient(anyhow!("http poll source: GET {url}: {e}")))?;
        let status = response.status();
        if !status.is_success() {
            let after = retry_after(response.headers());
            let text = response.text().await.unwrap_or_default();
            let problem = format!(
                "http poll source: HTTP {status} from {url}: {}",
                snippet(&text)
            );
            if status == StatusCode::REQUEST_TIMEOUT
                || status == StatusCode::TOO_MANY_REQUESTS
                || status.is_server_error()
            {
                if let Some(after) = after {
                    self.next_poll = Some(Instant::now() + after);
                }
                return Err(ConnectorError::Transient(anyhow!("{problem}")));
            }
            return Err(ConnectorError::Fatal(anyhow!("{problem}")));
        }
        let body = response.bytes().await.map_err(|e| {
            ConnectorError::Transient(anyhow!("http poll source: reading {url}: {e}"))
        })?;
        let body: Value = serde_json::from_slice(&body).map_err(|e| {
            ConnectorError::Fatal(anyhow!(
                "http poll source: the response from {url} is not JSON: {e}"
            ))
        })?;
        let records = match body.pointer(&self.config.records_pointer) {
            Some(Value::Array(items)) => items,
            Some(Value::Null) | None if !self.config.records_pointer.is_empty() => {
                return Err(ConnectorError::Fatal(anyhow!(
                    "http poll source: the response from {url} has nothing at records_pointer {:?}",
                    self.config.records_pointer
                )))
            }
            _ => {
                return Err(ConnectorError::Fatal(anyhow!(
                    "http poll source: the records in the response from {url} are not an array \
                     (records_pointer {:?})",
                    self.config.records_pointer
                )))
            }
        };
        let before = self.cursor.clone();
        let count = records.len();
        for (i, item) in records.iter().enumerate() {
            let value = serde_json::to_vec(item).map_err(|e| {
                ConnectorError::Fatal(anyhow!("http poll source: encoding a record: {e}"))
            })?;
            let offset = if let Some(field) = &self.config.cursor_field {
                let found = if field.starts_with('/') {
                    item.pointer(field)
                } else {
                    item.get(field)
                };
                match found {
                    Some(c) if !c.is_null() => {
                        self.cursor = Some(c.clone());
                        Some(cursor_offset(c))
                    }
                    _ => None,
                }
            } else if let Some(pointer) = &self.config.cursor_pointer {
                // Only the end of the page is a place to resume.
                match body.pointer(pointer) {
                    Some(c) if !c.is_null() && i + 1 == count => {
                        self.cursor = Some(c.clone());
                        Some(cursor_offset(c))
                    }
                    _ => None,
                }
            } else {
                None
            };
            self.pending.push_back((Record::new(value), offset));
        }
        if count == 0 {
            if let Some(pointer) = &self.config.cursor_pointer {
                if let Some(c) = body.pointer(pointer).filter(|c| !c.is_null()) {
                    self.cursor = Some(c.clone());
                }
            }
        }
        Ok(count > 0 && self.cursor != before)
    }

    fn take(&mut self, max_records: usize) -> SourceBatch {
        let n = max_records.max(1).min(self.pending.len());
        let mut records = Vec::with_capacity(n);
        for (record, offset) in self.pending.drain(..n) {
            records.push(record);
            if let Some(o) = offset {
                self.emitted = o;
            }
        }
        SourceBatch {
            records,
            offset: self.emitted.clone(),
        }
    }
}

fn cursor_offset(cursor: &Value) -> Value {
    serde_json::json!({ "cursor": cursor })
}

#[async_trait]
impl Source for HttpPollSource {
    async fn start(&mut self, resume: Option<Value>) -> Result<()> {
        match resume {
            None | Some(Value::Null) => {
                self.cursor = self.config.initial_cursor.clone();
                self.emitted = Value::Null;
            }
            Some(Value::Object(m)) if m.contains_key("cursor") => {
                self.cursor = m.get("cursor").cloned().filter(|c| !c.is_null());
                self.emitted = Value::Object(m);
            }
            Some(other) => {
                return Err(ConnectorError::Fatal(anyhow!(
                    "http poll source: offset {other} is not {{\"cursor\": ...}}"
                )))
            }
        }
        self.pending.clear();
        self.next_poll = None;
        self.started = true;
        Ok(())
    }

    async fn next_batch(&mut self, max_records: usize) -> Result<Option<SourceBatch>> {
        if !self.started {
            return Err(ConnectorError::Fatal(anyhow!(
                "http poll source: next_batch before start"
            )));
        }
        loop {
            if !self.pending.is_empty() {
                return Ok(Some(self.take(max_records)));
            }
            if let Some(at) = self.next_poll.take() {
                tokio::time::sleep_until(at).await;
            }
            let interval = Duration::from_millis(self.config.interval_ms);
            match self.poll().await {
                Ok(true) => self.next_poll = None,
                Ok(false) => self.next_poll = Some(Instant::now() + interval),
                Err(e) => {
                    if self.next_poll.is_none() {
                        self.next_poll = Some(Instant::now() + interval);
                    }
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: Value) -> HttpPollSourceConfig {
        let mut base = serde_json::json!({ "url": "http://127.0.0.1:9/events" });
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn configuration_is_checked() {
        let both = config(serde_json::json!({
            "cursor_param": "after", "cursor_field": "id", "cursor_pointer": "/next"
        }));
        assert!(HttpPollSource::new(both).is_err());
        let no_param = config(serde_json::json!({ "cursor_field": "id" }));
        assert!(HttpPollSource::new(no_param).is_err());
        let bad_pointer = config(serde_json::json!({ "records_pointer": "data" }));
        assert!(HttpPollSource::new(bad_pointer).is_err());
        let ok = config(serde_json::json!({
            "cursor_param": "after", "cursor_pointer": "/next", "records_pointer": "/data"
        }));
        assert!(HttpPollSource::new(ok).is_ok());
    }

    #[test]
    fn the_cursor_replaces_its_parameter() {
        let mut c = config(serde_json::json!({
            "cursor_param": "after", "cursor_field": "id", "initial_cursor": 7
        }));
        c.url = "http://127.0.0.1:9/events?after=1&limit=5".into();
        let s = HttpPollSource::new(c).unwrap();
        assert_eq!(
            s.request_url().as_str(),
            "http://127.0.0.1:9/events?limit=5&after=7"
        );
    }
}
