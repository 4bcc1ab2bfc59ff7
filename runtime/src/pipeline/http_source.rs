//! The HTTP push source: records POSTed to a path on the daemon's HTTP address.
//!
//! A request is answered 200 only once its records are committed to the topic; 400 names the
//! bad line; 413 when the body is over the limit; 503 with Retry-After when the pipeline has
//! `max_pending_requests` requests waiting (the log is the back pressure: the pipeline writes
//! one batch at a time). A request with an `Idempotency-Key` header that was already committed
//! is answered 200 without writing again; the recent keys are part of the source offset, so
//! they survive restarts exactly as the records do.

use std::collections::{HashSet, VecDeque};

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use weir_connectors::{Record, Source, SourceBatch};

use super::spec::{BodyFormat, HttpSourceSpec};

/// How many idempotency keys are remembered.
const REMEMBERED_KEYS: usize = 10_000;

/// What the HTTP handler hands the pipeline.
pub struct IngestRequest {
    pub records: Vec<Record>,
    pub idempotency_key: Option<String>,
    /// Ok once committed; Err with a reason when the pipeline stopped first.
    pub done: oneshot::Sender<Result<(), String>>,
}

/// The handler's side: where a path's requests go.
#[derive(Clone)]
pub struct IngestEndpoint {
    pub pipeline: String,
    pub spec: HttpSourceSpec,
    pub queue: mpsc::Sender<IngestRequest>,
}

pub struct HttpSource {
    queue: mpsc::Receiver<IngestRequest>,
    recent: VecDeque<String>,
    recent_set: HashSet<String>,
    waiting: Vec<oneshot::Sender<Result<(), String>>>,
}

impl HttpSource {
    /// The source and the endpoint the HTTP server routes to it.
    pub fn new(pipeline: &str, spec: &HttpSourceSpec) -> (HttpSource, IngestEndpoint) {
        let (tx, rx) = mpsc::channel(spec.max_pending_requests);
        (
            HttpSource {
                queue: rx,
                recent: VecDeque::new(),
                recent_set: HashSet::new(),
                waiting: Vec::new(),
            },
            IngestEndpoint {
                pipeline: pipeline.to_string(),
                spec: spec.clone(),
                queue: tx,
            },
        )
    }

    fn remember(&mut self, key: String) {
        if self.recent_set.insert(key.clone()) {
            self.recent.push_back(key);
            if self.recent.len() > REMEMBERED_KEYS {
                if let Some(old) = self.recent.pop_front() {
                    self.recent_set.remove(&old);
                }
            }
        }
    }

    fn offset(&self) -> serde_json::Value {
        json!({ "idempotency_keys": self.recent })
    }
}

#[async_trait]
impl Source for HttpSource {
    async fn start(&mut self, resume: Option<serde_json::Value>) -> weir_connectors::Result<()> {
        let keys = resume
            .as_ref()
            .and_then(|v| v.get("idempotency_keys"))
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default();
        for k in keys {
            if let Some(k) = k.as_str() {
                self.remember(k.to_string());
            }
        }
        Ok(())
    }

    async fn next_batch(
        &mut self,
        max_records: usize,
    ) -> weir_connectors::Result<Option<SourceBatch>> {
        let mut records = Vec::new();
        let mut in_batch: HashSet<String> = HashSet::new();
        loop {
            // Wait for the first request, then take what is already queued.
            let next = if records.is_empty() && self.waiting.is_empty() {
                match self.queue.recv().await {
                    Some(r) => r,
                    None => return Ok(None),
                }
            } else {
                match self.queue.try_recv() {
                    Ok(r) => r,
                    Err(_) => break,
                }
            };
            if let Some(key) = &next.idempotency_key {
                if self.recent_set.contains(key) {
                    // Already committed: the retry lands once.
                    let _ = next.done.send(Ok(()));
                    continue;
                }
                if !in_batch.insert(key.clone()) {
                    // The same request twice in one batch: write it once, answer both.
                    self.waiting.push(next.done);
                    continue;
                }
            }
            records.extend(next.records);
            self.waiting.push(next.done);
            if records.len() >= max_records {
                break;
            }
        }
        for key in in_batch {
            self.remember(key);
        }
        Ok(Some(SourceBatch {
            records,
            offset: self.offset(),
        }))
    }

    async fn committed(&mut self, _offset: &serde_json::Value) -> weir_connectors::Result<()> {
        for done in self.waiting.drain(..) {
            let _ = done.send(Ok(()));
        }
        Ok(())
    }
}

impl Drop for HttpSource {
    fn drop(&mut self) {
        for done in self.waiting.drain(..) {
            let _ = done.send(Err(
                "the pipeline stopped before the records were written".into()
            ));
        }
    }
}

/// A body that cannot be taken, as the status and message to answer with.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub message: String,
}

/// Splits a body into records per `format`. Errors name the line (1-based) at fault.
pub fn parse_body(format: BodyFormat, body: &[u8]) -> Result<Vec<Record>, Rejection> {
    let bad = |message: String| Rejection {
        status: 400,
        message,
    };
    let now = crate::now_ms();
    let record = |value: Vec<u8>| Record {
        key: None,
        value: Some(Bytes::from(value)),
        headers: Vec::new(),
        timestamp: now,
    };
    match format {
        BodyFormat::Json => {
            let v: serde_json::Value = serde_json::from_slice(body)
                .map_err(|e| bad(format!("line {}: invalid JSON: {e}", e.line())))?;
            let items = match v {
                serde_json::Value::Array(items) => items,
                other => vec![other],
            };
            Ok(items
                .into_iter()
                .map(|i| record(serde_json::to_vec(&i).expect("JSON values serialise")))
                .collect())
        }
        BodyFormat::Ndjson => {
            let mut out = Vec::new();
            for (n, line) in body.split(|b| *b == b'\n').enumerate() {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_slice(line)
                    .map_err(|e| bad(format!("line {}: invalid JSON: {e}", n + 1)))?;
                out.push(record(
                    serde_json::to_vec(&v).expect("JSON values serialise"),
                ));
            }
            Ok(out)
        }
        BodyFormat::Lines => {
            let text = std::str::from_utf8(body).map_err(|e| {
                let line = body[..e.valid_up_to()]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count()
                    + 1;
                bad(format!("line {line}: not UTF-8"))
            })?;
            Ok(text
                .lines()
                .filter(|l| !l.is_empty())
                .map(|l| record(l.as_bytes().to_vec()))
                .collect())
        }
    }
}

/// Puts a parsed request on the pipeline's queue and waits until its records are committed.
pub async fn submit(
    endpoint: &IngestEndpoint,
    records: Vec<Record>,
    idempotency_key: Option<String>,
) -> Result<usize, Rejection> {
    let n = records.len();
    let (done, wait) = oneshot::channel();
    let request = IngestRequest {
        records,
        idempotency_key,
        done,
    };
    match endpoint.queue.try_send(request) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            return Err(Rejection {
                status: 503,
                message: format!(
                    "pipeline {} has {} requests waiting; retry later",
                    endpoint.pipeline, endpoint.spec.max_pending_requests
                ),
            })
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            return Err(Rejection {
                status: 503,
                message: format!("pipeline {} is not running", endpoint.pipeline),
            })
        }
    }
    match wait.await {
        Ok(Ok(())) => Ok(n),
        Ok(Err(reason)) => Err(Rejection {
            status: 503,
            message: reason,
        }),
        Err(_) => Err(Rejection {
            status: 503,
            message: format!("pipeline {} stopped", endpoint.pipeline),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_split_into_records_and_bad_lines_are_named() {
        let r = parse_body(BodyFormat::Ndjson, b"{\"a\":1}\n\n{\"a\": 2}\r\n").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].value.as_deref(), Some(&b"{\"a\":2}"[..]));
        let e = parse_body(BodyFormat::Ndjson, b"{\"a\":1}\n{oops\n").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.starts_with("line 2:"), "{}", e.message);
        assert_eq!(
            parse_body(BodyFormat::Json, b"[1, {\"b\":2}]")
                .unwrap()
                .len(),
            2
        );
        assert_eq!(parse_body(BodyFormat::Json, b"{\"b\":2}").unwrap().len(), 1);
        let e = parse_body(BodyFormat::Json, b"{\n\"b\":\n}").unwrap_err();
        assert!(e.message.starts_with("line 3:"), "{}", e.message);
        assert_eq!(parse_body(BodyFormat::Lines, b"x\ny\n").unwrap().len(), 2);
        let e = parse_body(BodyFormat::Lines, b"ok\n\xff\n").unwrap_err();
        assert!(e.message.starts_with("line 2:"), "{}", e.message);
    }

    #[tokio::test]
    async fn a_retried_key_lands_once() {
        let spec = HttpSourceSpec {
            path: "/x".into(),
            format: BodyFormat::Json,
            max_body_bytes: 1000,
            max_pending_requests: 4,
            token: None,
        };
        let (mut source, endpoint) = HttpSource::new("p", &spec);
        source.start(None).await.unwrap();
        let send = |key: &str| {
            let endpoint = endpoint.clone();
            let key = key.to_string();
            tokio::spawn(async move { submit(&endpoint, vec![Record::new("v")], Some(key)).await })
        };
        let first = send("k1");
        let batch = source.next_batch(100).await.unwrap().unwrap();
        assert_eq!(batch.records.len(), 1);
        source.committed(&batch.offset).await.unwrap();
        assert_eq!(first.await.unwrap(), Ok(1));
        // After a restart, from the committed offset: the retry is answered, not written.
        let (mut source, endpoint2) = HttpSource::new("p", &spec);
        let _still_mounted = endpoint2.clone();
        source.start(Some(batch.offset)).await.unwrap();
        let retry = tokio::spawn(async move {
            submit(&endpoint2, vec![Record::new("v")], Some("k1".into())).await
        });
        let stop = tokio::time::timeout(
            std::time::Duration::from_millis(300),
            source.next_batch(100),
        )
        .await;
        assert!(stop.is_err(), "nothing new to write");
        assert_eq!(retry.await.unwrap(), Ok(1));
    }
}
