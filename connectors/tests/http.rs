//! The HTTP sink and polling source against a real local HTTP server (axum on a loopback
//! port), which records every request and answers as each test scripts it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use weir_connectors::http::{HttpPollSource, HttpPollSourceConfig, HttpSink, HttpSinkConfig};
use weir_connectors::{
    ConnectorError, Guarantee, Record, Sink, SinkRecord, Source, TopicPartition,
};

#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    uri: String,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Default)]
struct Server {
    seen: Vec<Seen>,
    /// Answers for the next requests: (status, Retry-After).
    script: VecDeque<(u16, Option<&'static str>)>,
    /// POST bodies containing this are refused with 400.
    refuse: Option<&'static str>,
    /// Events served by GET /events.
    events: Vec<Value>,
}

type Shared = Arc<Mutex<Server>>;

async fn ingest(
    State(state): State<Shared>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut s = state.lock().unwrap();
    s.seen.push(Seen {
        at: Instant::now(),
        uri: uri.to_string(),
        headers,
        body: body.clone(),
    });
    if let Some((status, retry_after)) = s.script.pop_front() {
        let mut response = (StatusCode::from_u16(status).unwrap(), "scripted").into_response();
        if let Some(after) = retry_after {
            response
                .headers_mut()
                .insert("retry-after", after.parse().unwrap());
        }
        return response;
    }
    if let Some(bad) = s.refuse {
        if String::from_utf8_lossy(&body).contains(bad) {
            return (StatusCode::BAD_REQUEST, "bad record in body").into_response();
        }
    }
    (StatusCode::OK, "ok").into_response()
}

/// GET /events?after=N&limit=L: events with id > N, at most L (default 2), and the id of the
/// last one as `next`.
async fn events(State(state): State<Shared>, uri: Uri, headers: HeaderMap) -> Response {
    let mut s = state.lock().unwrap();
    s.seen.push(Seen {
        at: Instant::now(),
        uri: uri.to_string(),
        headers,
        body: Bytes::new(),
    });
    if let Some((status, retry_after)) = s.script.pop_front() {
        let mut response = (StatusCode::from_u16(status).unwrap(), "scripted").into_response();
        if let Some(after) = retry_after {
            response
                .headers_mut()
                .insert("retry-after", after.parse().unwrap());
        }
        return response;
    }
    let query = uri.query().unwrap_or("");
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.parse::<i64>().ok())
    };
    let after = param("after").unwrap_or(0);
    let limit = param("limit").unwrap_or(2) as usize;
    let page: Vec<Value> = s
        .events
        .iter()
        .filter(|e| e["id"].as_i64().unwrap() > after)
        .take(limit)
        .cloned()
        .collect();
    let next = page.last().map(|e| e["id"].clone()).unwrap_or(Value::Null);
    axum::Json(json!({ "data": page, "next": next })).into_response()
}

async fn serve(state: Shared) -> String {
    let app = Router::new()
        .route("/ingest", post(ingest))
        .route("/events", get(events))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("server");
    });
    format!("http://{addr}")
}

fn sink(base: &str, extra: Value) -> HttpSink {
    let mut config = json!({ "url": format!("{base}/ingest"), "backoff_initial_ms": 20,
                             "backoff_max_ms": 100 });
    config
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let mut config: HttpSinkConfig = serde_json::from_value(config).expect("config");
    config.name = "activity/0".into();
    HttpSink::new(config).expect("sink")
}

fn records(partition: i32, offsets: std::ops::Range<i64>) -> Vec<SinkRecord> {
    offsets
        .map(|o| SinkRecord {
            record: Record::new(json!({ "offset": o, "partition": partition }).to_string()),
            position: TopicPartition {
                topic: "activity".into(),
                partition,
            },
            offset: o,
        })
        .collect()
}

fn header(seen: &Seen, name: &str) -> String {
    seen.headers
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn retries_keep_the_idempotency_key_and_honour_retry_after() {
    let state = Shared::default();
    state.lock().unwrap().script = VecDeque::from([(503, None), (500, None), (429, Some("1"))]);
    let base = serve(state.clone()).await;
    let mut s = sink(&base, json!({}));
    assert_eq!(s.guarantee(), Guarantee::AtLeastOnce);
    assert!(s.start().await.unwrap().is_empty());
    let batch = records(3, 40..43);
    s.write(&batch).await.expect("delivered after retries");

    let seen = state.lock().unwrap().seen.clone();
    assert_eq!(seen.len(), 4, "three failures, then success");
    let key = header(&seen[0], "idempotency-key");
    assert_eq!(key, "activity/0:activity:3:40-42");
    for request in &seen {
        assert_eq!(header(request, "idempotency-key"), key);
        assert_eq!(request.body, seen[0].body);
        assert_eq!(header(request, "content-type"), "application/x-ndjson");
        assert_eq!(header(request, "weir-partition"), "3");
        assert_eq!(header(request, "weir-first-offset"), "40");
        assert_eq!(header(request, "weir-last-offset"), "42");
    }
    let lines: Vec<Value> = std::str::from_utf8(&seen[0].body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        (40..43)
            .map(|o| json!({"offset": o, "partition": 3}))
            .collect::<Vec<_>>()
    );
    // Backoff retries come quickly (at most 100 ms apart here); Retry-After: 1 is honoured.
    assert!(seen[1].at - seen[0].at <= Duration::from_millis(600));
    assert!(seen[3].at - seen[2].at >= Duration::from_millis(950));
}

#[tokio::test]
async fn a_request_failing_past_max_retries_is_transient() {
    let state = Shared::default();
    state.lock().unwrap().script = (0..10).map(|_| (503, None)).collect();
    let base = serve(state.clone()).await;
    let mut s = sink(&base, json!({ "max_retries": 2 }));
    match s.write(&records(0, 0..2)).await {
        Err(ConnectorError::Transient(e)) => {
            let text = format!("{e:#}");
            assert!(
                text.contains("503") && text.contains("3 attempts"),
                "{text}"
            );
        }
        other => panic!("expected transient, got {other:?}"),
    }
    assert_eq!(state.lock().unwrap().seen.len(), 3);
}

#[tokio::test]
async fn a_refused_record_is_found_by_splitting_the_request() {
    let state = Shared::default();
    state.lock().unwrap().refuse = Some("\"offset\":13");
    let base = serve(state.clone()).await;
    let mut s = sink(&base, json!({ "format": "json_array" }));
    let batch = records(0, 10..15);
    match s.write(&batch).await {
        Err(ConnectorError::BadRecord { index, message }) => {
            assert_eq!(index, 3, "{message}");
            assert!(message.contains("400"), "{message}");
        }
        other => panic!("expected a bad record, got {other:?}"),
    }
    let seen = state.lock().unwrap().seen.clone();
    let delivered: Vec<i64> = seen
        .iter()
        .filter(|r| !String::from_utf8_lossy(&r.body).contains("\"offset\":13"))
        .flat_map(|r| {
            assert_eq!(header(r, "content-type"), "application/json");
            let items: Vec<Value> = serde_json::from_slice(&r.body).expect("a JSON array");
            items.into_iter().map(|v| v["offset"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(
        delivered,
        [10, 11, 12],
        "the records before the bad one went through"
    );
    let keys: Vec<String> = seen.iter().map(|r| header(r, "idempotency-key")).collect();
    assert_eq!(
        keys,
        [
            "activity/0:activity:0:10-14",
            "activity/0:activity:0:10-11",
            "activity/0:activity:0:12-14",
            "activity/0:activity:0:12-12",
            "activity/0:activity:0:13-14",
            "activity/0:activity:0:13-13",
        ]
    );

    // The runtime dead-letters it and sends the rest.
    s.write(&batch[4..]).await.expect("the rest");
}

#[tokio::test]
async fn partitions_and_batch_size_split_requests() {
    let state = Shared::default();
    let base = serve(state.clone()).await;
    let mut s = sink(
        &base,
        json!({ "batch_size": 2, "headers": { "Authorization": "Bearer t0ken" } }),
    );
    let mut batch = records(1, 0..3);
    batch.extend(records(0, 7..8));
    s.write(&batch).await.expect("write");
    let seen = state.lock().unwrap().seen.clone();
    let keys: Vec<String> = seen.iter().map(|r| header(r, "idempotency-key")).collect();
    assert_eq!(
        keys,
        [
            "activity/0:activity:0:7-7",
            "activity/0:activity:1:0-1",
            "activity/0:activity:1:2-2"
        ]
    );
    assert!(seen
        .iter()
        .all(|r| header(r, "authorization") == "Bearer t0ken"));
}

#[tokio::test]
async fn client_errors_other_than_refusals_are_fatal() {
    let state = Shared::default();
    state.lock().unwrap().script = VecDeque::from([(401, None)]);
    let base = serve(state.clone()).await;
    let mut s = sink(&base, json!({}));
    match s.write(&records(0, 0..3)).await {
        Err(ConnectorError::Fatal(e)) => assert!(format!("{e:#}").contains("401"), "{e:#}"),
        other => panic!("expected fatal, got {other:?}"),
    }
    assert_eq!(state.lock().unwrap().seen.len(), 1, "no retry of a 401");
}

#[tokio::test]
async fn a_closed_port_is_transient_after_retries() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let mut s = sink(&base, json!({ "max_retries": 1 }));
    match s.write(&records(0, 0..1)).await {
        Err(ConnectorError::Transient(_)) => {}
        other => panic!("expected transient, got {other:?}"),
    }
}

#[tokio::test]
async fn non_json_values_are_bad_records() {
    let state = Shared::default();
    let base = serve(state.clone()).await;
    let mut s = sink(&base, json!({}));
    let mut batch = records(0, 0..3);
    batch[1].record.value = Some(bytes::Bytes::from_static(b"plain text"));
    match s.write(&batch).await {
        Err(ConnectorError::BadRecord { index: 1, .. }) => {}
        other => panic!("expected bad record 1, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Polling source

fn poll_source(base: &str, extra: Value) -> HttpPollSource {
    let mut config = json!({ "url": format!("{base}/events?limit=2"), "interval_ms": 30,
                             "records_pointer": "/data" });
    config
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let config: HttpPollSourceConfig = serde_json::from_value(config).expect("config");
    HttpPollSource::new(config).expect("source")
}

async fn next(src: &mut HttpPollSource, max: usize) -> (Vec<i64>, Value) {
    let batch = tokio::time::timeout(Duration::from_secs(10), src.next_batch(max))
        .await
        .expect("a batch within 10 s")
        .expect("next_batch")
        .expect("unbounded");
    let ids = batch
        .records
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
            v["id"].as_i64().unwrap()
        })
        .collect();
    (ids, batch.offset)
}

async fn follows_cursor_and_resumes(extra: Value) {
    let state = Shared::default();
    state.lock().unwrap().events = (1..=5)
        .map(|id| json!({ "id": id, "kind": "click" }))
        .collect();
    let base = serve(state.clone()).await;

    let mut src = poll_source(&base, extra.clone());
    src.start(None).await.expect("start");
    assert_eq!(
        next(&mut src, 100).await,
        (vec![1, 2], json!({"cursor": 2}))
    );
    assert_eq!(
        next(&mut src, 100).await,
        (vec![3, 4], json!({"cursor": 4}))
    );
    drop(src);

    let mut src = poll_source(&base, extra);
    src.start(Some(json!({"cursor": 2}))).await.expect("resume");
    assert_eq!(
        next(&mut src, 100).await,
        (vec![3, 4], json!({"cursor": 4}))
    );
    assert_eq!(next(&mut src, 100).await, (vec![5], json!({"cursor": 5})));
    {
        let mut s = state.lock().unwrap();
        s.events.push(json!({ "id": 6 }));
    }
    assert_eq!(next(&mut src, 100).await, (vec![6], json!({"cursor": 6})));
    let uris: Vec<String> = state
        .lock()
        .unwrap()
        .seen
        .iter()
        .map(|r| r.uri.clone())
        .collect();
    assert_eq!(uris[0], "/events?limit=2");
    assert_eq!(uris[1], "/events?limit=2&after=2");
    assert!(uris.contains(&"/events?limit=2&after=5".to_string()));
}

#[tokio::test]
async fn poll_source_follows_a_cursor_in_the_response() {
    follows_cursor_and_resumes(json!({ "cursor_param": "after", "cursor_pointer": "/next" })).await;
}

#[tokio::test]
async fn poll_source_follows_a_cursor_field_of_the_records() {
    follows_cursor_and_resumes(json!({ "cursor_param": "after", "cursor_field": "id" })).await;
}

#[tokio::test]
async fn poll_source_reports_server_errors() {
    let state = Shared::default();
    state.lock().unwrap().script = VecDeque::from([(503, Some("1")), (404, None)]);
    state.lock().unwrap().events = vec![json!({ "id": 1 })];
    let base = serve(state.clone()).await;
    let mut src = poll_source(
        &base,
        json!({ "cursor_param": "after", "cursor_field": "id" }),
    );
    src.start(None).await.expect("start");
    assert!(matches!(
        src.next_batch(10).await,
        Err(ConnectorError::Transient(_))
    ));
    // The next poll waits for Retry-After, then gets the 404.
    let started = Instant::now();
    assert!(matches!(
        src.next_batch(10).await,
        Err(ConnectorError::Fatal(_))
    ));
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(next(&mut src, 10).await, (vec![1], json!({"cursor": 1})));

    let mut wrong = poll_source(&base, json!({ "records_pointer": "/nothing" }));
    wrong.start(None).await.expect("start");
    assert!(matches!(
        wrong.next_batch(10).await,
        Err(ConnectorError::Fatal(_))
    ));
}
