//! The HTTP sink: POSTs records in batches, one partition per request, retrying with
//! exponential backoff and full jitter; each request carries an Idempotency-Key derived from
//! the topic, partition and its first and last offsets, the same on every retry.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::anyhow;
use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use reqwest::StatusCode;
use serde::Deserialize;

use super::{client, header_map, parse_url, retry_after, snippet, Backoff};
use crate::{ConnectorError, Guarantee, Result, Sink, SinkRecord, TopicPartition};

fn default_batch_size() -> usize {
    500
}
fn default_timeout_ms() -> u64 {
    30_000
}
fn default_max_retries() -> u32 {
    5
}
fn default_backoff_initial_ms() -> u64 {
    100
}
fn default_backoff_max_ms() -> u64 {
    10_000
}
fn default_max_retry_after_ms() -> u64 {
    60_000
}

/// `sinks: - http: {...}` in a pipeline file. docs/connectors/http.md documents every field.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// Where batches are POSTed (http:// or https://).
    pub url: String,
    #[serde(default)]
    pub format: HttpFormat,
    /// Most records per request.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Per request, connecting included.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Extra request headers (authorization, say). A Content-Type here replaces the format's.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Retries of one request (connection errors, timeouts, 408, 429, 5xx) before the write
    /// fails as transient and the runtime takes over.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Backoff before retry n: random in [0, min(backoff_max_ms, backoff_initial_ms * 2^n)].
    #[serde(default = "default_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// A Retry-After header is honoured up to this long.
    #[serde(default = "default_max_retry_after_ms")]
    pub max_retry_after_ms: u64,
    /// CA certificates (PEM) trusted for an https:// URL besides the system's.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Prefix of the Idempotency-Key. Not read from the pipeline file: the runtime sets it to
    /// `<pipeline>/<sink index>`.
    #[serde(skip)]
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpFormat {
    /// One JSON value per line (application/x-ndjson).
    #[default]
    Ndjson,
    /// One JSON array of the values (application/json).
    JsonArray,
}

pub struct HttpSink {
    config: HttpSinkConfig,
    url: reqwest::Url,
    client: reqwest::Client,
    headers: HeaderMap,
    backoff: Backoff,
}

/// How a request ended, when it did not succeed.
enum PostError {
    /// 400, 413 or 422: the content is refused.
    Rejected(String),
    Fatal(anyhow::Error),
    Transient(anyhow::Error),
}

impl HttpSink {
    /// Checks the configuration and builds the client (nothing is sent yet).
    pub fn new(config: HttpSinkConfig) -> Result<HttpSink> {
        let what = "http sink";
        let url = parse_url(&config.url, what)?;
        if config.batch_size == 0 {
            return Err(ConnectorError::Fatal(anyhow!(
                "{what}: batch_size must be at least 1"
            )));
        }
        if config.timeout_ms == 0 {
            return Err(ConnectorError::Fatal(anyhow!(
                "{what}: timeout_ms must be at least 1"
            )));
        }
        let mut headers = header_map(&config.headers, what)?;
        if !headers.contains_key(CONTENT_TYPE) {
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static(match config.format {
                    HttpFormat::Ndjson => "application/x-ndjson",
                    HttpFormat::JsonArray => "application/json",
                }),
            );
        }
        let client = client(
            Duration::from_millis(config.timeout_ms),
            config.ca_file.as_deref(),
            what,
        )?;
        Ok(HttpSink {
            backoff: Backoff {
                initial: Duration::from_millis(config.backoff_initial_ms.max(1)),
                max: Duration::from_millis(config.backoff_max_ms.max(1)),
            },
            config,
            url,
            client,
            headers,
        })
    }

    /// The key of the request carrying offsets `first..=last` of `tp`.
    pub fn idempotency_key(&self, tp: &TopicPartition, first: i64, last: i64) -> String {
        let mut key = String::new();
        if !self.config.name.is_empty() {
            key.push_str(&self.config.name);
            key.push(':');
        }
        key.push_str(&format!("{}:{}:{first}-{last}", tp.topic, tp.partition));
        header_safe(&key)
    }

    fn body(&self, values: &[&Bytes]) -> Bytes {
        let size: usize = values.iter().map(|v| v.len() + 1).sum::<usize>() + 2;
        let mut body = BytesMut::with_capacity(size);
        match self.config.format {
            HttpFormat::Ndjson => {
                for v in values {
                    body.put_slice(v);
                    body.put_u8(b'\n');
                }
            }
            HttpFormat::JsonArray => {
                body.put_u8(b'[');
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        body.put_u8(b',');
                    }
                    body.put_slice(v);
                }
                body.put_u8(b']');
            }
        }
        body.freeze()
    }

    /// POSTs one request, retrying what is worth retrying.
    async fn post(&self, body: Bytes, headers: HeaderMap) -> Result<(), PostError> {
        let mut attempt = 0u32;
        loop {
            let outcome = self
                .client
                .post(self.url.clone())
                .headers(headers.clone())
                .body(body.clone())
                .send()
                .await;
            let (problem, wait) = match outcome {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => {
                    let status = response.status();
                    let after = retry_after(response.headers());
                    let text = response.text().await.unwrap_or_default();
                    let problem = format!("HTTP {status} from {}: {}", self.url, snippet(&text));
                    let retryable = status == StatusCode::REQUEST_TIMEOUT
                        || status == StatusCode::TOO_MANY_REQUESTS
                        || status.is_server_error();
                    if !retryable {
                        return Err(match status.as_u16() {
                            400 | 413 | 422 => PostError::Rejected(problem),
                            _ => PostError::Fatal(anyhow!("{problem}")),
                        });
                    }
                    let cap = Duration::from_millis(self.config.max_retry_after_ms);
                    (problem, after.map(|d| d.min(cap)))
                }
                Err(e) if e.is_builder() => {
                    return Err(PostError::Fatal(anyhow!("building the request: {e}")))
                }
                Err(e) => (format!("POST {}: {e}", self.url), None),
            };
            if attempt >= self.config.max_retries {
                return Err(PostError::Transient(anyhow!(
                    "{problem} (gave up after {} attempts)",
                    attempt + 1
                )));
            }
            let wait = wait.unwrap_or_else(|| self.backoff.delay(attempt));
            tracing::debug!(sink = %self.config.name, attempt, ?wait, "retrying: {problem}");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// Sends the records of one partition (positions into `values`), bisecting a refused
    /// request down to the record at fault.
    async fn send_partition(
        &self,
        tp: &TopicPartition,
        batch: &[SinkRecord],
        values: &[Bytes],
        indexes: &[usize],
    ) -> Result<()> {
        for chunk in indexes.chunks(self.config.batch_size) {
            let mut work = vec![chunk];
            while let Some(part) = work.pop() {
                let first = batch[part[0]].offset;
                let last = batch[part[part.len() - 1]].offset;
                let mut headers = self.headers.clone();
                let key = self.idempotency_key(tp, first, last);
                let pairs = [
                    ("idempotency-key", key),
                    ("weir-topic", header_safe(&tp.topic)),
                    ("weir-partition", tp.partition.to_string()),
                    ("weir-first-offset", first.to_string()),
                    ("weir-last-offset", last.to_string()),
                ];
                for (name, value) in pairs {
                    if let Ok(v) = HeaderValue::from_str(&value) {
                        headers.insert(name, v);
                    }
                }
                let parts: Vec<&Bytes> = part.iter().map(|&i| &values[i]).collect();
                match self.post(self.body(&parts), headers).await {
                    Ok(()) => {}
                    Err(PostError::Rejected(message)) if part.len() == 1 => {
                        return Err(ConnectorError::BadRecord {
                            index: part[0],
                            message,
                        })
                    }
                    Err(PostError::Rejected(message)) => {
                        tracing::debug!(sink = %self.config.name, "request refused ({message}); splitting it");
                        let (left, right) = part.split_at(part.len() / 2);
                        work.push(right);
                        work.push(left);
                    }
                    Err(PostError::Fatal(e)) => {
                        return Err(ConnectorError::Fatal(anyhow!(
                            "http sink {}: {e:#}",
                            self.config.name
                        )))
                    }
                    Err(PostError::Transient(e)) => {
                        return Err(ConnectorError::Transient(anyhow!(
                            "http sink {}: {e:#}",
                            self.config.name
                        )))
                    }
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Sink for HttpSink {
    /// Keeps no offsets of its own: the runtime's consumer group offset is the resume point.
    async fn start(&mut self) -> Result<BTreeMap<TopicPartition, i64>> {
        Ok(BTreeMap::new())
    }

    /// Sends every record, each partition's in offset order. Records are sent at least once;
    /// on `BadRecord { index }` (a record the endpoint refuses with 400, 413 or 422), other
    /// records of the batch may have been delivered already.
    async fn write(&mut self, batch: &[SinkRecord]) -> Result<()> {
        let mut values = Vec::with_capacity(batch.len());
        for (index, r) in batch.iter().enumerate() {
            values.push(
                encode_value(r, self.config.format)
                    .map_err(|message| ConnectorError::BadRecord { index, message })?,
            );
        }
        let mut partitions: BTreeMap<&TopicPartition, Vec<usize>> = BTreeMap::new();
        for (i, r) in batch.iter().enumerate() {
            partitions.entry(&r.position).or_default().push(i);
        }
        for (tp, indexes) in partitions {
            self.send_partition(tp, batch, &values, &indexes).await?;
        }
        Ok(())
    }

    fn guarantee(&self) -> Guarantee {
        Guarantee::AtLeastOnce
    }
}

/// A record's value checked to be JSON; on one line for NDJSON.
fn encode_value(r: &SinkRecord, format: HttpFormat) -> Result<Bytes, String> {
    let Some(value) = &r.record.value else {
        return Err("tombstone (no value): the HTTP sink sends JSON values".to_string());
    };
    let parsed: serde_json::Value =
        serde_json::from_slice(value).map_err(|e| format!("value is not JSON: {e}"))?;
    if format == HttpFormat::Ndjson && value.iter().any(|&b| b == b'\n' || b == b'\r') {
        return serde_json::to_vec(&parsed)
            .map(Bytes::from)
            .map_err(|e| format!("re-encoding the value: {e}"));
    }
    Ok(value.clone())
}

/// Visible ASCII kept, anything else percent-encoded, so the text is a valid header value.
fn header_safe(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Record;

    fn record(value: &str) -> SinkRecord {
        SinkRecord {
            record: Record::new(value.to_string()),
            position: TopicPartition {
                topic: "t".into(),
                partition: 0,
            },
            offset: 0,
        }
    }

    #[test]
    fn values_must_be_json_and_one_line_for_ndjson() {
        assert!(encode_value(&record("{\"a\":1}"), HttpFormat::Ndjson).is_ok());
        assert_eq!(
            encode_value(&record("{\n\"a\": 1\n}"), HttpFormat::Ndjson).unwrap(),
            Bytes::from_static(b"{\"a\":1}")
        );
        assert!(encode_value(&record("nope"), HttpFormat::JsonArray).is_err());
        let mut tombstone = record("1");
        tombstone.record.value = None;
        assert!(encode_value(&tombstone, HttpFormat::Ndjson).is_err());
    }

    #[test]
    fn keys_are_header_safe() {
        assert_eq!(header_safe("p/0:t:1:5-9"), "p/0:t:1:5-9");
        assert_eq!(header_safe("a b%é"), "a%20b%25%C3%A9");
    }
}
