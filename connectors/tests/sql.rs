//! The SQL sink and source against real PostgreSQL, MariaDB (or MySQL) and SQLite.
//!
//! PostgreSQL and MariaDB must be running: WEIR_TEST_POSTGRES_URL (default
//! postgres://postgres@127.0.0.1:5432/test) and WEIR_TEST_MYSQL_URL (default
//! mysql://root@127.0.0.1:3306/test). SQLite runs in a temp dir. Every test uses its own tables.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use support::{merged, raw_record, record, tp, unique, Backend, Db};
use weir_connectors::sql::{SqlSink, SqlSinkConfig, SqlSource, SqlSourceConfig};
use weir_connectors::{ConnectorError, Sink, SinkRecord, Source};

async fn sink(db: &Db, table: &str, extra: Value) -> SqlSink {
    let mut config: SqlSinkConfig =
        serde_json::from_value(merged(json!({ "url": db.url, "table": table }), extra))
            .expect("sink config");
    config.name = format!("tests/{table}");
    SqlSink::connect(config).await.expect("sink connects")
}

async fn source(db: &Db, extra: Value) -> SqlSource {
    let config: SqlSourceConfig = serde_json::from_value(merged(
        json!({ "url": db.url, "poll_interval_ms": 20 }),
        extra,
    ))
    .expect("source config");
    SqlSource::connect(config).await.expect("source connects")
}

/// The next batch, failing the test if none comes within 10 s.
async fn next(src: &mut SqlSource, max: usize) -> (Vec<Value>, Value) {
    let batch = tokio::time::timeout(Duration::from_secs(10), src.next_batch(max))
        .await
        .expect("a batch within 10 s")
        .expect("next_batch")
        .expect("the source does not end");
    let values = batch
        .records
        .iter()
        .map(|r| serde_json::from_slice(r.value.as_deref().expect("value")).expect("json"))
        .collect();
    (values, batch.offset)
}

/// Every row of `table`, read by the source (incrementing on `id`), as JSON objects.
async fn read_table(db: &Db, table: &str, json_columns: &[&str]) -> Vec<Value> {
    let mut src = source(
        db,
        json!({ "table": table, "mode": "incrementing", "incrementing_column": "id",
                "batch_size": 10000, "json_columns": json_columns }),
    )
    .await;
    src.start(None).await.expect("start");
    let total = db.int(&format!("SELECT COUNT(*) FROM {table}")).await as usize;
    let mut rows = Vec::new();
    while rows.len() < total {
        rows.extend(next(&mut src, 10000).await.0);
    }
    src.close().await;
    rows
}

fn orders(partition: i32, offsets: std::ops::Range<i64>) -> Vec<SinkRecord> {
    offsets
        .map(|o| {
            record(
                "orders",
                partition,
                o,
                &json!({ "seq": partition as i64 * 1000 + o, "item": format!("item {o}"),
                         "qty": o, "meta": { "p": partition } }),
            )
        })
        .collect()
}

fn bad_index(result: weir_connectors::Result<()>) -> (usize, String) {
    match result {
        Err(ConnectorError::BadRecord { index, message }) => (index, message),
        other => panic!("expected a bad record, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Sink: create_table, insert, upsert

async fn upsert_creates_table_and_updates(backend: Backend) {
    let db = Db::open(backend).await;
    let table = unique("upsert");
    let mut s = sink(
        &db,
        &table,
        json!({ "mode": "upsert", "key": ["id"], "create_table": true }),
    )
    .await;
    assert!(s.start().await.expect("start").is_empty());
    s.write(&[
        record(
            "t",
            0,
            0,
            &json!({"id": 1, "name": "a", "qty": 1, "price": 2.5, "ok": true,
                                   "tags": {"x": [1, 2]}}),
        ),
        record(
            "t",
            0,
            1,
            &json!({"id": 2, "name": "b", "qty": 2, "tags": null}),
        ),
        // The same key again in one batch: applied in order.
        record("t", 0, 2, &json!({"id": 1, "name": "a2", "qty": 5})),
    ])
    .await
    .expect("first batch");
    s.write(&[record("t", 0, 3, &json!({"id": 2, "qty": 7}))])
        .await
        .expect("second batch");

    let types: Vec<String> = match backend {
        Backend::Postgres => db
            .strings(&format!(
                "SELECT column_name::text || ' ' || data_type::text FROM information_schema.columns \
                 WHERE table_name = '{table}' ORDER BY column_name"
            ))
            .await,
        Backend::MySql => db
            .strings(&format!(
                "SELECT CAST(CONCAT(COLUMN_NAME, ' ', DATA_TYPE) AS CHAR) FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = '{table}' ORDER BY COLUMN_NAME"
            ))
            .await,
        Backend::Sqlite => db
            .strings(&format!(
                "SELECT name || ' ' || type FROM pragma_table_info('{table}') ORDER BY name"
            ))
            .await,
    }
    .into_iter()
    .map(|r| r[0].clone().expect("text"))
    .collect();
    let expected: &[&str] = match backend {
        Backend::Postgres => &[
            "id bigint",
            "name text",
            "ok boolean",
            "price double precision",
            "qty bigint",
            "tags jsonb",
        ],
        // MariaDB's JSON is LONGTEXT with a json_valid check.
        Backend::MySql => &[
            "id bigint",
            "name longtext",
            "ok tinyint",
            "price double",
            "qty bigint",
            "tags longtext",
        ],
        Backend::Sqlite => &[
            "id INTEGER",
            "name TEXT",
            "ok INTEGER",
            "price REAL",
            "qty INTEGER",
            "tags TEXT",
        ],
    };
    assert_eq!(types, expected, "{backend:?} created columns");

    let rows = read_table(&db, &table, &["tags"]).await;
    let ok = |b: bool| match backend {
        Backend::Sqlite => json!(b as i64),
        _ => json!(b),
    };
    assert_eq!(
        rows,
        vec![
            json!({"id": 1, "name": "a2", "qty": 5, "price": 2.5, "ok": ok(true),
                   "tags": {"x": [1, 2]}}),
            json!({"id": 2, "name": "b", "qty": 7, "price": null, "ok": null, "tags": null}),
        ],
        "{backend:?}"
    );
    // A record of key columns only: inserted, then left alone.
    s.write(&[
        record("t", 0, 4, &json!({"id": 3})),
        record("t", 0, 5, &json!({"id": 3})),
    ])
    .await
    .expect("key-only records");
    assert_eq!(db.int(&format!("SELECT COUNT(*) FROM {table}")).await, 3);
    // Upsert needs the key.
    let (index, message) = bad_index(s.write(&[record("t", 0, 6, &json!({"name": "?"}))]).await);
    assert_eq!(index, 0);
    assert!(message.contains("key column id"), "{message}");
    s.close().await;
    db.drop_table(&table).await;
}

#[tokio::test]
async fn postgres_upsert_creates_table_and_updates() {
    upsert_creates_table_and_updates(Backend::Postgres).await;
}

#[tokio::test]
async fn mysql_upsert_creates_table_and_updates() {
    upsert_creates_table_and_updates(Backend::MySql).await;
}

#[tokio::test]
async fn sqlite_upsert_creates_table_and_updates() {
    upsert_creates_table_and_updates(Backend::Sqlite).await;
}

async fn insert_into_existing_table(backend: Backend) {
    let db = Db::open(backend).await;
    let table = unique("insert");
    let ddl = match backend {
        Backend::Postgres => format!(
            "CREATE TABLE {table} (id BIGINT PRIMARY KEY, label VARCHAR(20), amount NUMERIC(12,2), \
             created TIMESTAMPTZ, local_time TIMESTAMP, doc JSONB, raw BYTEA, flag BOOLEAN, \
             ints INTEGER[], note TEXT DEFAULT 'none')"
        ),
        Backend::MySql => format!(
            "CREATE TABLE {table} (id BIGINT PRIMARY KEY, label VARCHAR(20), amount DECIMAL(12,2), \
             created TIMESTAMP(6) NULL, local_time DATETIME(6), doc JSON, raw BLOB, flag BOOLEAN, \
             ints TEXT, note VARCHAR(20) DEFAULT 'none')"
        ),
        Backend::Sqlite => format!(
            "CREATE TABLE {table} (id INTEGER PRIMARY KEY, label TEXT, amount NUMERIC, \
             created TEXT, local_time TEXT, doc JSON, raw BLOB, flag BOOLEAN, ints TEXT, \
             note TEXT DEFAULT 'none')"
        ),
    };
    db.exec(&ddl).await;
    // Field names in another case, and a rename through `columns`.
    let mut s = sink(
        &db,
        &table,
        json!({ "columns": { "id": "id", "Label": "label", "amount": "amount", "created": "created",
                             "local": "local_time", "doc": "doc", "raw": "raw", "flag": "flag",
                             "ints": "ints" } }),
    )
    .await;
    s.start().await.expect("start");
    s.write(&[
        record("t", 0, 0, &json!({
            "id": 1, "Label": "first", "amount": "1234.50", "created": "2024-05-01T12:00:00+02:00",
            "local": "2024-05-01T12:00:00.25+02:00", "doc": {"a": [1, "two", null]}, "raw": "AP8Q",
            "flag": true, "ints": [1, 2, 3], "ignored": "not in columns"
        })),
        record("t", 0, 1, &json!({"id": 2, "Label": null, "doc": "just a string"})),
    ])
    .await
    .expect("write");

    let text = db.text();
    // SQLite's NUMERIC affinity turns the text into a number.
    let amount = if backend == Backend::Sqlite {
        "1234.5"
    } else {
        "1234.50"
    };
    let rows = db
        .strings(&format!(
            "SELECT CAST(id AS {text}), label, CAST(amount AS {text}), note FROM {table} ORDER BY id"
        ))
        .await;
    assert_eq!(
        rows,
        vec![
            vec![
                Some("1".into()),
                Some("first".into()),
                Some(amount.into()),
                Some("none".into())
            ],
            vec![Some("2".into()), None, None, Some("none".into())],
        ]
    );
    // The instant is kept: 12:00+02:00 is 10:00 UTC.
    let utc = match backend {
        Backend::Postgres => {
            db.strings(&format!(
                "SELECT to_char(created AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), \
                 to_char(local_time, 'YYYY-MM-DD HH24:MI:SS.MS') FROM {table} WHERE id = 1"
            ))
            .await
        }
        Backend::MySql => {
            db.strings(&format!(
                "SELECT CAST(CONVERT_TZ(created, @@session.time_zone, '+00:00') AS CHAR), \
                 CAST(local_time AS CHAR) FROM {table} WHERE id = 1"
            ))
            .await
        }
        Backend::Sqlite => {
            db.strings(&format!(
                "SELECT created, local_time FROM {table} WHERE id = 1"
            ))
            .await
        }
    };
    let expected_utc = match backend {
        Backend::Postgres => ["2024-05-01 10:00:00", "2024-05-01 10:00:00.250"],
        Backend::MySql => ["2024-05-01 10:00:00.000000", "2024-05-01 10:00:00.250000"],
        // SQLite has no timestamp type: the text is stored as sent.
        Backend::Sqlite => ["2024-05-01T12:00:00+02:00", "2024-05-01T12:00:00.25+02:00"],
    };
    assert_eq!(utc[0], expected_utc.map(|s| Some(s.to_string())).to_vec());

    let read = read_table(&db, &table, &["doc"]).await;
    assert_eq!(read[0]["doc"], json!({"a": [1, "two", null]}));
    assert_eq!(read[1]["doc"], json!("just a string"));
    assert_eq!(read[0]["raw"], json!("AP8Q"));
    match backend {
        Backend::Postgres => assert_eq!(read[0]["ints"], json!([1, 2, 3])),
        _ => assert_eq!(read[0]["ints"], json!("[1,2,3]")),
    }
    s.close().await;
    db.drop_table(&table).await;
}

#[tokio::test]
async fn postgres_insert_into_existing_table() {
    insert_into_existing_table(Backend::Postgres).await;
}

#[tokio::test]
async fn mysql_insert_into_existing_table() {
    insert_into_existing_table(Backend::MySql).await;
}

#[tokio::test]
async fn sqlite_insert_into_existing_table() {
    insert_into_existing_table(Backend::Sqlite).await;
}

#[tokio::test]
async fn unknown_fields_can_be_ignored() {
    let db = Db::sqlite().await;
    db.exec("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
        .await;
    let mut s = sink(&db, "t", json!({ "ignore_unknown_fields": true })).await;
    s.start().await.expect("start");
    s.write(&[record(
        "t",
        0,
        0,
        &json!({"id": 1, "name": "a", "extra": [1]}),
    )])
    .await
    .expect("extra fields dropped");
    assert_eq!(
        read_table(&db, "t", &[]).await,
        vec![json!({"id": 1, "name": "a"})]
    );
}

#[tokio::test]
async fn missing_table_without_create_table_is_fatal() {
    let db = Db::sqlite().await;
    let mut s = sink(&db, "nowhere", json!({})).await;
    match s.start().await {
        Err(ConnectorError::Fatal(e)) => {
            assert!(e.to_string().contains("does not exist"), "{e}")
        }
        other => panic!("expected fatal, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Sink: exactly once

async fn replay_after_restart_writes_nothing_twice(backend: Backend) {
    let db = Db::open(backend).await;
    let table = unique("eos");
    let offsets = unique("offsets");
    let config = json!({ "create_table": true, "offsets_table": offsets });
    let p0 = orders(0, 0..14);
    let p1 = orders(1, 0..5);

    let mut first = sink(&db, &table, config.clone()).await;
    assert!(first.start().await.expect("start").is_empty());
    let batch: Vec<SinkRecord> = p0[..5].iter().chain(&p1[..2]).cloned().collect();
    first.write(&batch).await.expect("batch 1");
    let batch: Vec<SinkRecord> = p0[5..10].iter().chain(&p1[2..]).cloned().collect();
    first.write(&batch).await.expect("batch 2");
    // The process dies here: no close, no goodbye.
    drop(first);

    let mut second = sink(&db, &table, config.clone()).await;
    let resume = second.start().await.expect("start");
    assert_eq!(
        resume,
        BTreeMap::from([(tp("orders", 0), 10), (tp("orders", 1), 5)])
    );
    // A runtime that replays from further back changes nothing...
    let everything: Vec<SinkRecord> = p0[..10].iter().chain(&p1).cloned().collect();
    second.write(&everything).await.expect("replay");
    assert_eq!(db.int(&format!("SELECT COUNT(*) FROM {table}")).await, 15);
    // ...and a batch straddling the applied offsets writes only the new part.
    second.write(&p0[8..14]).await.expect("straddling batch");
    assert_eq!(db.int(&format!("SELECT COUNT(*) FROM {table}")).await, 19);
    assert_eq!(
        db.int(&format!("SELECT COUNT(DISTINCT seq) FROM {table}"))
            .await,
        19
    );
    let stored = db
        .strings(&format!(
            "SELECT topic, CAST(topic_partition AS {t}), CAST(next_offset AS {t}) FROM {offsets} \
             WHERE sink_name = 'tests/{table}' ORDER BY topic_partition",
            t = db.text()
        ))
        .await;
    assert_eq!(
        stored,
        vec![
            vec![Some("orders".into()), Some("0".into()), Some("14".into())],
            vec![Some("orders".into()), Some("1".into()), Some("5".into())],
        ]
    );
    second.close().await;
    db.drop_table(&table).await;
    db.drop_table(&offsets).await;
}

#[tokio::test]
async fn postgres_replay_after_restart_writes_nothing_twice() {
    replay_after_restart_writes_nothing_twice(Backend::Postgres).await;
}

#[tokio::test]
async fn mysql_replay_after_restart_writes_nothing_twice() {
    replay_after_restart_writes_nothing_twice(Backend::MySql).await;
}

#[tokio::test]
async fn sqlite_replay_after_restart_writes_nothing_twice() {
    replay_after_restart_writes_nothing_twice(Backend::Sqlite).await;
}

/// The sink's connection dies inside the transaction of a batch, after its rows are written
/// and while it waits to update the offsets: neither the rows nor the offsets of that batch
/// survive, and a restarted sink resumes exactly there.
async fn crash_inside_the_transaction(backend: Backend) {
    let db = Db::open(backend).await;
    let table = unique("crash");
    let offsets = unique("crash_offsets");
    let config = json!({ "create_table": true, "offsets_table": offsets });
    let records = orders(0, 0..10);

    let mut s = sink(&db, &table, config.clone()).await;
    s.start().await.expect("start");
    s.write(&records[..5]).await.expect("batch 1");

    // Another session locks the sink's offsets row, so the next batch stops on it. It holds
    // the lock until the task is aborted (its connection then closes).
    let (locked_tx, locked_rx) = tokio::sync::oneshot::channel::<()>();
    let locker_url = db.url.clone();
    let lock_sql = format!("SELECT * FROM {offsets} FOR UPDATE");
    let lock_task = tokio::spawn(async move {
        use sqlx::Connection;
        macro_rules! hold {
            ($conn:ty) => {{
                let mut c = <$conn>::connect(&locker_url)
                    .await
                    .expect("locker connects");
                sqlx::raw_sql("BEGIN").execute(&mut c).await.expect("begin");
                sqlx::raw_sql(sqlx::AssertSqlSafe(lock_sql))
                    .execute(&mut c)
                    .await
                    .expect("lock");
                let _ = locked_tx.send(());
                tokio::time::sleep(Duration::from_secs(3600)).await;
                drop(c);
            }};
        }
        match backend {
            Backend::Postgres => hold!(sqlx::PgConnection),
            _ => hold!(sqlx::MySqlConnection),
        }
    });
    locked_rx.await.expect("the locker holds the lock");

    let batch2 = records[5..].to_vec();
    let writer = tokio::spawn(async move {
        let result = s.write(&batch2).await;
        (s, result)
    });

    // Find the sink's session waiting on the lock, and kill it.
    let mut killed = false;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waiting = match backend {
            Backend::Postgres => {
                db.strings(&format!(
                    "SELECT pid::text FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                     AND query LIKE 'UPDATE%{offsets}%'"
                ))
                .await
            }
            _ => {
                db.strings(&format!(
                    "SELECT CAST(ID AS CHAR) FROM information_schema.PROCESSLIST \
                     WHERE INFO LIKE 'UPDATE%{offsets}%' AND ID <> CONNECTION_ID()"
                ))
                .await
            }
        };
        if let Some(id) = waiting.first().and_then(|r| r[0].clone()) {
            match backend {
                Backend::Postgres => db.exec(&format!("SELECT pg_terminate_backend({id})")).await,
                _ => db.exec(&format!("KILL {id}")).await,
            }
            killed = true;
            break;
        }
    }
    assert!(killed, "the sink never waited on the locked offsets row");
    lock_task.abort();
    let _ = lock_task.await;
    let (s, result) = writer.await.expect("writer task");
    match result {
        Err(ConnectorError::Transient(e)) => {
            eprintln!("the killed write failed as expected: {e:#}")
        }
        other => panic!("expected a transient error from the killed write, got {other:?}"),
    }
    drop(s);

    assert_eq!(db.int(&format!("SELECT COUNT(*) FROM {table}")).await, 5);
    let mut restarted = sink(&db, &table, config).await;
    assert_eq!(
        restarted.start().await.expect("start"),
        BTreeMap::from([(tp("orders", 0), 5)])
    );
    restarted.write(&records).await.expect("replay everything");
    assert_eq!(db.int(&format!("SELECT COUNT(*) FROM {table}")).await, 10);
    assert_eq!(
        db.int(&format!("SELECT COUNT(DISTINCT seq) FROM {table}"))
            .await,
        10
    );
    restarted.close().await;
    db.drop_table(&table).await;
    db.drop_table(&offsets).await;
}

#[tokio::test]
async fn postgres_crash_inside_the_transaction() {
    crash_inside_the_transaction(Backend::Postgres).await;
}

#[tokio::test]
async fn mysql_crash_inside_the_transaction() {
    crash_inside_the_transaction(Backend::MySql).await;
}

// ---------------------------------------------------------------------------------------------
// Sink: bad records

async fn bad_records_are_reported_by_index(backend: Backend) {
    let db = Db::open(backend).await;
    let table = unique("bad");
    db.exec(&format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, qty INTEGER NOT NULL CHECK (qty >= 0), note TEXT)"
    ))
    .await;
    let mut s = sink(&db, &table, json!({})).await;
    s.start().await.expect("start");
    let batch: Vec<SinkRecord> = [
        json!({"id": 1, "qty": 1}),
        json!({"id": 2, "qty": 2}),
        json!({"id": 3, "qty": 3}),
        json!({"id": 4, "qty": -1}), // the check constraint refuses it
        json!({"id": 5, "qty": 5}),
        json!({"id": 1, "qty": 6}), // duplicate key
        json!({"id": 7, "qty": 7}),
    ]
    .iter()
    .enumerate()
    .map(|(i, v)| record("t", 0, i as i64, v))
    .collect();

    let (index, message) = bad_index(s.write(&batch).await);
    assert_eq!(index, 3, "{message}");
    assert!(!message.is_empty());
    // What came before it is written, with its offsets.
    assert_eq!(db.int(&format!("SELECT COUNT(*) FROM {table}")).await, 3);
    // The runtime dead-letters it and goes on with the rest.
    let (index, message) = bad_index(s.write(&batch[4..]).await);
    assert_eq!(index, 1, "{message}");
    assert_eq!(db.int(&format!("SELECT COUNT(*) FROM {table}")).await, 4);
    s.write(&batch[6..]).await.expect("the rest");
    assert_eq!(db.int(&format!("SELECT COUNT(*) FROM {table}")).await, 5);
    // Sending the whole batch again writes nothing (offsets), so no error either.
    s.write(&batch).await.expect("replay");

    // Records that never reach the database.
    let more = vec![
        record("t", 0, 7, &json!({"id": 8, "qty": 8})),
        raw_record(0, 8, Some(b"[1, 2]")),
        raw_record(0, 9, Some(b"{not json")),
        raw_record(0, 10, None),
        record("t", 0, 11, &json!({"id": 12, "qty": 1, "nope": true})),
        record("t", 0, 12, &json!({"id": 13, "qty": "many"})),
    ];
    let (index, message) = bad_index(s.write(&more).await);
    assert_eq!(
        (index, message.contains("not an object")),
        (1, true),
        "{message}"
    );
    let (index, message) = bad_index(s.write(&more[2..]).await);
    assert_eq!(
        (index, message.contains("not JSON")),
        (0, true),
        "{message}"
    );
    let (index, message) = bad_index(s.write(&more[3..]).await);
    assert_eq!(
        (index, message.contains("tombstone")),
        (0, true),
        "{message}"
    );
    let (index, message) = bad_index(s.write(&more[4..]).await);
    assert_eq!(
        (index, message.contains("no column nope")),
        (0, true),
        "{message}"
    );
    if backend != Backend::Sqlite {
        // SQLite stores text in an INTEGER column of an ordinary table.
        let (index, message) = bad_index(s.write(&more[5..]).await);
        assert_eq!(index, 0, "{message}");
    }
    assert_eq!(db.int(&format!("SELECT COUNT(*) FROM {table}")).await, 6);
    s.close().await;
    db.drop_table(&table).await;
}

#[tokio::test]
async fn postgres_bad_records_are_reported_by_index() {
    bad_records_are_reported_by_index(Backend::Postgres).await;
}

#[tokio::test]
async fn mysql_bad_records_are_reported_by_index() {
    bad_records_are_reported_by_index(Backend::MySql).await;
}

#[tokio::test]
async fn sqlite_bad_records_are_reported_by_index() {
    bad_records_are_reported_by_index(Backend::Sqlite).await;
}

// ---------------------------------------------------------------------------------------------
// Source: type mapping, and a round trip through the sink

#[tokio::test]
async fn postgres_source_type_mapping_round_trip() {
    let db = Db::postgres().await;
    let a = unique("types_a");
    let b = unique("types_b");
    db.exec(&format!(
        "CREATE TABLE {a} (id INTEGER PRIMARY KEY, small SMALLINT, big BIGINT, num NUMERIC(30,10), \
         flag BOOLEAN, name TEXT, code VARCHAR(10), at TIMESTAMPTZ, local_at TIMESTAMP, day DATE, \
         doc JSONB, raw_doc JSON, data BYTEA, uid UUID, ratio DOUBLE PRECISION, real4 REAL, \
         ints INTEGER[], texts TEXT[], nums NUMERIC[], nothing TEXT);
         INSERT INTO {a} VALUES (1, -32768, 9223372036854775807, 12345678901234567890.0123456789, \
         true, 'héllo \"q\"', 'abc', '2024-02-29 23:59:58.123456+02', '2024-01-01 00:00:00', \
         '2024-12-31', '{{\"a\": [1, {{\"b\": null}}]}}', '{{\"z\": 1, \"a\": 2}}', '\\x00ff10', \
         'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 0.1, 0.1, '{{1,NULL,3}}', '{{x,\"y z\"}}', \
         '{{1.50,-2}}', NULL);
         INSERT INTO {a} (id) VALUES (2);
         CREATE TABLE {b} (LIKE {a} INCLUDING ALL);"
    ))
    .await;
    let rows = read_table(&db, &a, &[]).await;
    assert_eq!(
        rows[0],
        json!({
            "id": 1, "small": -32768, "big": 9223372036854775807i64,
            "num": "12345678901234567890.0123456789", "flag": true, "name": "héllo \"q\"",
            "code": "abc", "at": "2024-02-29T21:59:58.123456Z", "local_at": "2024-01-01T00:00:00Z",
            "day": "2024-12-31", "doc": {"a": [1, {"b": null}]}, "raw_doc": {"z": 1, "a": 2},
            "data": "AP8Q", "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "ratio": 0.1,
            "real4": 0.1, "ints": [1, null, 3], "texts": ["x", "y z"], "nums": ["1.50", "-2"],
            "nothing": null
        })
    );
    let nulls: serde_json::Map<String, Value> = rows[0]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| (k.clone(), if k == "id" { json!(2) } else { Value::Null }))
        .collect();
    assert_eq!(rows[1], Value::Object(nulls));

    // Into an identical table through the sink, and compared in SQL.
    let mut s = sink(&db, &b, json!({})).await;
    s.start().await.expect("start");
    let records: Vec<SinkRecord> = rows
        .iter()
        .enumerate()
        .map(|(i, v)| record("types", 0, i as i64, v))
        .collect();
    s.write(&records).await.expect("write");
    let same = db
        .int(&format!(
            "SELECT COUNT(*) FROM {a} x JOIN {b} y USING (id) WHERE \
             x.small IS NOT DISTINCT FROM y.small AND x.big IS NOT DISTINCT FROM y.big AND \
             x.num IS NOT DISTINCT FROM y.num AND x.num::text IS NOT DISTINCT FROM y.num::text AND \
             x.flag IS NOT DISTINCT FROM y.flag AND x.name IS NOT DISTINCT FROM y.name AND \
             x.code IS NOT DISTINCT FROM y.code AND x.at IS NOT DISTINCT FROM y.at AND \
             x.local_at IS NOT DISTINCT FROM y.local_at AND x.day IS NOT DISTINCT FROM y.day AND \
             x.doc IS NOT DISTINCT FROM y.doc AND x.raw_doc::jsonb IS NOT DISTINCT FROM y.raw_doc::jsonb AND \
             x.data IS NOT DISTINCT FROM y.data AND x.uid IS NOT DISTINCT FROM y.uid AND \
             x.ratio IS NOT DISTINCT FROM y.ratio AND x.real4 IS NOT DISTINCT FROM y.real4 AND \
             x.ints IS NOT DISTINCT FROM y.ints AND x.texts IS NOT DISTINCT FROM y.texts AND \
             x.nums IS NOT DISTINCT FROM y.nums AND x.nothing IS NOT DISTINCT FROM y.nothing"
        ))
        .await;
    assert_eq!(same, 2, "every column survives the round trip");
    s.close().await;
    db.drop_table(&a).await;
    db.drop_table(&b).await;
}

#[tokio::test]
async fn mysql_source_type_mapping_round_trip() {
    let db = Db::mysql().await;
    let a = unique("types_a");
    let b = unique("types_b");
    db.exec(&format!(
        "CREATE TABLE {a} (id INT PRIMARY KEY, flag BOOLEAN, tiny TINYINT, big BIGINT, \
         ubig BIGINT UNSIGNED, num DECIMAL(30,10), ratio DOUBLE, real4 FLOAT, name VARCHAR(50), \
         body TEXT, at DATETIME(6), stamp TIMESTAMP(6) NULL, day DATE, tod TIME(6), doc JSON, \
         data BLOB, vb VARBINARY(16), color ENUM('red','green'), yr YEAR, bits BIT(10), nothing TEXT)"
    ))
    .await;
    db.exec(&format!(
        "INSERT INTO {a} VALUES (1, TRUE, -128, -9223372036854775808, 18446744073709551615, \
         12345678901234567890.0123456789, 0.1, 0.1, 'héllo \"q\"', 'long text', \
         '2024-02-29 23:59:58.123456', '2024-03-01 10:00:00.5', '2024-12-31', '-12:34:56.789', \
         '{{\"a\": [1, {{\"b\": null}}]}}', X'00FF10', X'0102', 'green', 2024, b'1000000001', NULL)"
    ))
    .await;
    db.exec(&format!("INSERT INTO {a} (id) VALUES (2)")).await;
    db.exec(&format!("CREATE TABLE {b} LIKE {a}")).await;
    let rows = read_table(&db, &a, &[]).await;
    assert_eq!(
        rows[0],
        json!({
            "id": 1, "flag": true, "tiny": -128, "big": i64::MIN, "ubig": u64::MAX,
            "num": "12345678901234567890.0123456789", "ratio": 0.1, "real4": 0.1,
            "name": "héllo \"q\"", "body": "long text", "at": "2024-02-29T23:59:58.123456Z",
            "stamp": "2024-03-01T10:00:00.500000Z", "day": "2024-12-31", "tod": "-12:34:56.789000",
            "doc": {"a": [1, {"b": null}]}, "data": "AP8Q", "vb": "AQI=", "color": "green",
            "yr": 2024, "bits": 513, "nothing": null
        })
    );
    let nulls: serde_json::Map<String, Value> = rows[0]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| (k.clone(), if k == "id" { json!(2) } else { Value::Null }))
        .collect();
    assert_eq!(rows[1], Value::Object(nulls));

    // BIT takes a number in SQL; the rest goes through the sink as the source emitted it.
    let mut s = sink(&db, &b, json!({})).await;
    s.start().await.expect("start");
    let records: Vec<SinkRecord> = rows
        .iter()
        .enumerate()
        .map(|(i, v)| record("types", 0, i as i64, v))
        .collect();
    s.write(&records).await.expect("write");
    let copied = read_table(&db, &b, &[]).await;
    assert_eq!(copied, rows, "every column survives the round trip");
    let same = db
        .int(&format!(
            "SELECT COUNT(*) FROM {a} x JOIN {b} y USING (id) WHERE x.num <=> y.num AND \
             x.at <=> y.at AND x.stamp <=> y.stamp AND x.data <=> y.data AND x.ubig <=> y.ubig \
             AND x.tod <=> y.tod AND x.bits <=> y.bits"
        ))
        .await;
    assert_eq!(same, 2);
    s.close().await;
    db.drop_table(&a).await;
    db.drop_table(&b).await;
}

#[tokio::test]
async fn sqlite_source_maps_storage_classes() {
    let db = Db::sqlite().await;
    db.exec(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, flag BOOLEAN, n INTEGER, r REAL, s TEXT, \
         b BLOB, doc JSON, empty TEXT);
         INSERT INTO t VALUES (1, 1, -5, 0.25, 'x', X'00FF10', '{\"k\": [1]}', NULL);",
    )
    .await;
    let rows = read_table(&db, "t", &[]).await;
    assert_eq!(
        rows,
        vec![
            json!({"id": 1, "flag": true, "n": -5, "r": 0.25, "s": "x", "b": "AP8Q",
                    "doc": {"k": [1]}, "empty": null})
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Source: modes and resume

async fn incrementing_resumes_after_its_offset(backend: Backend) {
    let db = Db::open(backend).await;
    let table = unique("inc");
    let id_type = if backend == Backend::Sqlite {
        "INTEGER"
    } else {
        "BIGINT"
    };
    db.exec(&format!(
        "CREATE TABLE {table} (id {id_type} PRIMARY KEY, v VARCHAR(20))"
    ))
    .await;
    for id in 1..=5 {
        db.exec(&format!("INSERT INTO {table} VALUES ({id}, 'v{id}')"))
            .await;
    }
    let config = json!({ "table": table, "mode": "incrementing", "incrementing_column": "id",
                         "batch_size": 2 });
    let ids = |rows: &[Value]| {
        rows.iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };

    let mut src = source(&db, config.clone()).await;
    src.start(None).await.expect("start");
    let (rows, offset) = next(&mut src, 100).await;
    assert_eq!(ids(&rows), [1, 2]);
    assert_eq!(rows[0], json!({"id": 1, "v": "v1"}));
    assert_eq!(offset, json!({"incrementing": 2}));
    let (rows, _) = next(&mut src, 100).await;
    assert_eq!(ids(&rows), [3, 4]);
    drop(src);

    // Restart from the first batch's offset: the second batch comes again, then the rest.
    let mut src = source(&db, config).await;
    src.start(Some(offset)).await.expect("resume");
    let (rows, _) = next(&mut src, 100).await;
    assert_eq!(ids(&rows), [3, 4]);
    let (rows, offset) = next(&mut src, 100).await;
    assert_eq!(ids(&rows), [5]);
    assert_eq!(offset, json!({"incrementing": 5}));
    // New rows are picked up by later polls.
    let waiter = tokio::spawn(async move {
        let first = next(&mut src, 1).await;
        let second = next(&mut src, 100).await;
        (first, second)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    db.exec(&format!("INSERT INTO {table} VALUES (6, 'v6')"))
        .await;
    db.exec(&format!("INSERT INTO {table} VALUES (7, 'v7')"))
        .await;
    let ((a, offset_a), (b, offset_b)) = waiter.await.expect("waiter");
    let mut seen = ids(&a);
    seen.extend(ids(&b));
    assert_eq!(seen, [6, 7]);
    assert_eq!(offset_a, json!({"incrementing": 6}));
    assert_eq!(offset_b, json!({"incrementing": 7}));
    db.drop_table(&table).await;
}

/// A source reading full pages counts the rows still ahead of it; a short page means it has
/// caught up.
async fn source_tells_how_many_rows_it_is_behind(backend: Backend) {
    use weir_connectors::Lag;
    let db = Db::open(backend).await;
    let table = unique("lag");
    let id_type = if backend == Backend::Sqlite {
        "INTEGER"
    } else {
        "BIGINT"
    };
    db.exec(&format!("CREATE TABLE {table} (id {id_type} PRIMARY KEY)"))
        .await;
    for id in 1..=25 {
        db.exec(&format!("INSERT INTO {table} VALUES ({id})")).await;
    }
    let mut src = source(
        &db,
        json!({ "table": table, "mode": "incrementing", "incrementing_column": "id",
                "batch_size": 10 }),
    )
    .await;
    src.start(None).await.expect("start");
    assert_eq!(src.lag(), None, "nothing known before the first poll");
    let (rows, _) = next(&mut src, 4).await;
    assert_eq!(rows.len(), 4);
    // Ten rows read, four handed out: six waiting, fifteen still in the table.
    assert_eq!(src.lag(), Some(Lag::Records(21)));
    next(&mut src, 100).await;
    assert_eq!(src.lag(), Some(Lag::Records(15)));
    next(&mut src, 100).await;
    assert_eq!(src.lag(), Some(Lag::Records(5)));
    let (rows, _) = next(&mut src, 100).await;
    assert_eq!(rows.len(), 5);
    assert_eq!(src.lag(), Some(Lag::Records(0)));
    db.drop_table(&table).await;
}

#[tokio::test]
async fn postgres_source_tells_how_many_rows_it_is_behind() {
    source_tells_how_many_rows_it_is_behind(Backend::Postgres).await;
}

#[tokio::test]
async fn mysql_source_tells_how_many_rows_it_is_behind() {
    source_tells_how_many_rows_it_is_behind(Backend::MySql).await;
}

#[tokio::test]
async fn sqlite_source_tells_how_many_rows_it_is_behind() {
    source_tells_how_many_rows_it_is_behind(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_incrementing_resumes_after_its_offset() {
    incrementing_resumes_after_its_offset(Backend::Postgres).await;
}

#[tokio::test]
async fn mysql_incrementing_resumes_after_its_offset() {
    incrementing_resumes_after_its_offset(Backend::MySql).await;
}

#[tokio::test]
async fn sqlite_incrementing_resumes_after_its_offset() {
    incrementing_resumes_after_its_offset(Backend::Sqlite).await;
}

#[tokio::test]
async fn postgres_query_mode_filters_and_renames() {
    let db = Db::postgres().await;
    let table = unique("query");
    db.exec(&format!(
        "CREATE TABLE {table} (id SERIAL PRIMARY KEY, status TEXT, amount NUMERIC(10,2));
         INSERT INTO {table} (status, amount) VALUES ('paid', 10), ('void', 20), ('paid', 30.5);"
    ))
    .await;
    let mut src = source(
        &db,
        json!({ "query": format!("SELECT id AS order_id, amount * 2 AS doubled FROM {table} WHERE status = 'paid';"),
                "mode": "incrementing", "incrementing_column": "order_id" }),
    )
    .await;
    src.start(None).await.expect("start");
    let (rows, offset) = next(&mut src, 100).await;
    assert_eq!(
        rows,
        vec![
            json!({"order_id": 1, "doubled": "20.00"}),
            json!({"order_id": 3, "doubled": "61.00"})
        ]
    );
    assert_eq!(offset, json!({"incrementing": 3}));

    let mut wrong = source(
        &db,
        json!({ "table": table, "mode": "incrementing", "incrementing_column": "nope" }),
    )
    .await;
    match wrong.start(None).await {
        Err(ConnectorError::Fatal(e)) => assert!(e.to_string().contains("nope"), "{e}"),
        other => panic!("expected fatal, got {other:?}"),
    }
    db.drop_table(&table).await;
}

async fn timestamp_incrementing_orders_ties_and_sees_updates(backend: Backend) {
    let db = Db::open(backend).await;
    let table = unique("tsinc");
    let ts_type = match backend {
        Backend::Postgres => "TIMESTAMPTZ",
        Backend::MySql => "DATETIME(6)",
        Backend::Sqlite => "TEXT",
    };
    db.exec(&format!(
        "CREATE TABLE {table} (id INTEGER PRIMARY KEY, updated_at {ts_type}, v VARCHAR(10))"
    ))
    .await;
    // PostgreSQL literals carry their zone: the test's session may not be in UTC.
    let zone = if backend == Backend::Postgres {
        "+00"
    } else {
        ""
    };
    let t1 = "2024-01-01 00:00:00.000001";
    let t2 = "2024-01-01 00:00:01";
    for (id, ts) in [(1, t1), (2, t1), (3, t1), (4, t2), (5, t2)] {
        db.exec(&format!(
            "INSERT INTO {table} VALUES ({id}, '{ts}{zone}', 'v')"
        ))
        .await;
    }
    db.exec(&format!("INSERT INTO {table} VALUES (6, NULL, 'never')"))
        .await;
    let config = json!({ "table": table, "mode": "timestamp+incrementing",
                         "timestamp_column": "updated_at", "incrementing_column": "id",
                         "batch_size": 2 });
    let ids = |rows: &[Value]| {
        rows.iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    let (ts1, ts2) = match backend {
        Backend::Sqlite => (json!(t1), json!(t2)),
        _ => (
            json!("2024-01-01T00:00:00.000001Z"),
            json!("2024-01-01T00:00:01Z"),
        ),
    };

    let mut src = source(&db, config.clone()).await;
    src.start(None).await.expect("start");
    let (rows, offset) = next(&mut src, 100).await;
    assert_eq!(ids(&rows), [1, 2]);
    assert_eq!(offset, json!({"timestamp": ts1, "incrementing": 2}));
    drop(src);

    // Resume in the middle of the rows sharing t1.
    let mut src = source(&db, config).await;
    src.start(Some(offset)).await.expect("resume");
    let (rows, _) = next(&mut src, 100).await;
    assert_eq!(ids(&rows), [3, 4]);
    let (rows, offset) = next(&mut src, 100).await;
    assert_eq!(ids(&rows), [5]);
    assert_eq!(offset, json!({"timestamp": ts2, "incrementing": 5}));

    // An update moves a row's timestamp forward: it is read again.
    db.exec(&format!(
        "UPDATE {table} SET updated_at = '2024-01-02 00:00:00{zone}', v = 'changed' WHERE id = 1"
    ))
    .await;
    let (rows, _) = next(&mut src, 100).await;
    assert_eq!(ids(&rows), [1]);
    assert_eq!(rows[0]["v"], json!("changed"));
    db.drop_table(&table).await;
}

#[tokio::test]
async fn postgres_timestamp_incrementing_orders_ties_and_sees_updates() {
    timestamp_incrementing_orders_ties_and_sees_updates(Backend::Postgres).await;
}

#[tokio::test]
async fn mysql_timestamp_incrementing_orders_ties_and_sees_updates() {
    timestamp_incrementing_orders_ties_and_sees_updates(Backend::MySql).await;
}

#[tokio::test]
async fn sqlite_timestamp_incrementing_orders_ties_and_sees_updates() {
    timestamp_incrementing_orders_ties_and_sees_updates(Backend::Sqlite).await;
}

async fn timestamp_mode_never_splits_equal_timestamps(backend: Backend) {
    let db = Db::open(backend).await;
    let table = unique("ts");
    let ts_type = match backend {
        Backend::Postgres => "TIMESTAMP",
        _ => "DATETIME(6)",
    };
    db.exec(&format!(
        "CREATE TABLE {table} (id INTEGER PRIMARY KEY, changed {ts_type})"
    ))
    .await;
    let times = [
        "2024-01-01 10:00:00",
        "2024-01-01 11:00:00",
        "2024-01-01 12:00:00",
    ];
    for (id, t) in [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 2)] {
        db.exec(&format!(
            "INSERT INTO {table} VALUES ({id}, '{}')",
            times[t]
        ))
        .await;
    }
    let mut src = source(
        &db,
        json!({ "table": table, "mode": "timestamp", "timestamp_column": "changed",
                "batch_size": 2 }),
    )
    .await;
    src.start(None).await.expect("start");
    // One record per batch: only a batch ending a run of equal timestamps moves the offset.
    let mut seen = Vec::new();
    let mut offsets = Vec::new();
    while seen.len() < 6 {
        let (rows, offset) = next(&mut src, 1).await;
        seen.extend(rows.iter().map(|r| r["id"].as_i64().unwrap()));
        offsets.push(offset);
    }
    seen.sort();
    assert_eq!(seen, [1, 2, 3, 4, 5, 6]);
    let t = |h: u32| json!({ "timestamp": format!("2024-01-01T{h}:00:00Z") });
    assert_eq!(
        offsets,
        [Value::Null, Value::Null, t(10), t(10), t(11), t(12)]
    );

    // Resuming after the first run reads the rest once.
    let mut again = source(
        &db,
        json!({ "table": table, "mode": "timestamp", "timestamp_column": "changed",
                "batch_size": 2 }),
    )
    .await;
    again.start(Some(t(10))).await.expect("resume");
    let (rows, offset) = next(&mut again, 100).await;
    let mut ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    ids.sort();
    assert_eq!((ids, offset), (vec![4, 5], t(11)));
    let (rows, offset) = next(&mut again, 100).await;
    assert_eq!((rows.len(), offset), (1, t(12)));
    db.drop_table(&table).await;
}

#[tokio::test]
async fn postgres_timestamp_mode_never_splits_equal_timestamps() {
    timestamp_mode_never_splits_equal_timestamps(Backend::Postgres).await;
}

#[tokio::test]
async fn mysql_timestamp_mode_never_splits_equal_timestamps() {
    timestamp_mode_never_splits_equal_timestamps(Backend::MySql).await;
}

#[tokio::test]
async fn postgres_timestamp_delay_holds_back_recent_rows() {
    let db = Db::postgres().await;
    let table = unique("delay");
    db.exec(&format!(
        "CREATE TABLE {table} (id INTEGER PRIMARY KEY, changed TIMESTAMPTZ);
         INSERT INTO {table} VALUES (1, now() - interval '1 hour'), (2, now());"
    ))
    .await;
    let mut src = source(
        &db,
        json!({ "table": table, "mode": "timestamp", "timestamp_column": "changed",
                "timestamp_delay_ms": 1500 }),
    )
    .await;
    src.start(None).await.expect("start");
    let started = std::time::Instant::now();
    let (rows, _) = next(&mut src, 100).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["id"], json!(1));
    let (rows, _) = next(&mut src, 100).await;
    assert_eq!(rows[0]["id"], json!(2));
    assert!(started.elapsed() >= Duration::from_millis(1000));
    db.drop_table(&table).await;
}
