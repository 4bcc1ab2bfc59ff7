//! The file sink against real files in temporary directories.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use weir_connectors::file::{FileSink, FileSinkConfig, RollConfig, SinkFormat};
use weir_connectors::{ConnectorError, Guarantee, Record, Sink, SinkRecord, TopicPartition};

fn tp(topic: &str, partition: i32) -> TopicPartition {
    TopicPartition {
        topic: topic.to_string(),
        partition,
    }
}

fn rec(partition: i32, offset: i64, value: Option<&[u8]>) -> SinkRecord {
    SinkRecord {
        record: Record {
            key: None,
            value: value.map(Bytes::copy_from_slice),
            headers: Vec::new(),
            timestamp: 0,
        },
        position: tp("t", partition),
        offset,
    }
}

/// Records `p<partition>-<offset>` for offsets in `range`, as JSON strings.
fn batch(partition: i32, range: std::ops::Range<i64>) -> Vec<SinkRecord> {
    range
        .map(|o| {
            rec(
                partition,
                o,
                Some(format!("{{\"id\":\"p{partition}-{o}\"}}").as_bytes()),
            )
        })
        .collect()
}

fn ids(range: std::ops::Range<i64>, partition: i32) -> Vec<String> {
    range
        .map(|o| format!("{{\"id\":\"p{partition}-{o}\"}}"))
        .collect()
}

fn config(path: &Path) -> FileSinkConfig {
    FileSinkConfig {
        path: path.to_path_buf(),
        format: SinkFormat::Ndjson,
        roll: None,
    }
}

async fn started(c: FileSinkConfig) -> (FileSink, BTreeMap<TopicPartition, i64>) {
    let mut s = FileSink::new(c).expect("valid config");
    let offsets = s.start().await.expect("start");
    (s, offsets)
}

fn read_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn ndjson_compacts_json_wraps_text_and_rejects_binary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.ndjson");
    let (mut s, offsets) = started(config(&path)).await;
    assert!(offsets.is_empty());
    assert_eq!(s.guarantee(), Guarantee::ExactlyOnce);
    s.write(&[
        rec(0, 0, Some(b"{ \"a\" : [1, 2],\n \"b\": \"x y\" }")),
        rec(0, 1, Some(b"GET /index.html 200")),
        rec(0, 2, None), // tombstone: nothing written
        rec(0, 3, Some(b"12")),
        rec(0, 4, Some(b"say \"hi\"\n")),
    ])
    .await
    .unwrap();
    assert_eq!(
        read_lines(&path),
        [
            r#"{"a":[1,2],"b":"x y"}"#,
            r#""GET /index.html 200""#,
            "12",
            r#""say \"hi\"\n""#
        ]
    );
    let err = s
        .write(&[rec(0, 5, Some(b"ok")), rec(0, 6, Some(&[0xff, 0xfe]))])
        .await
        .unwrap_err();
    let ConnectorError::BadRecord { index, message } = err else {
        panic!("{err}")
    };
    assert_eq!(index, 1);
    assert!(message.contains("neither JSON nor UTF-8"), "{message}");
    assert_eq!(
        read_lines(&path).len(),
        4,
        "a rejected batch writes nothing"
    );
    drop(s);
    let (_, offsets) = started(config(&path)).await;
    assert_eq!(
        offsets,
        BTreeMap::from([(tp("t", 0), 5)]),
        "the tombstone's offset counts"
    );
}

#[tokio::test]
async fn lines_writes_raw_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.log");
    let mut c = config(&path);
    c.format = SinkFormat::Lines;
    let (mut s, _) = started(c).await;
    s.write(&[
        rec(0, 0, Some(b"{ \"a\": 1 }")),
        rec(0, 1, Some(b"plain")),
        rec(0, 2, Some(&[0xff])),
    ])
    .await
    .unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"{ \"a\": 1 }\nplain\n\xff\n");
}

#[tokio::test]
async fn exactly_once_across_a_crash_that_left_an_unrecorded_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("archive.ndjson");
    let (mut s, _) = started(config(&path)).await;
    s.write(&[batch(0, 0..5), batch(1, 0..3)].concat())
        .await
        .unwrap();
    let committed = fs::read(&path).unwrap();
    drop(s);
    // A crash after appending the next batch but before its manifest: an unrecorded tail,
    // torn in the middle of a record.
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"{\"id\":\"p0-5\"}\n{\"id\":\"p0-").unwrap();
    drop(f);

    let (mut s, offsets) = started(config(&path)).await;
    assert_eq!(fs::read(&path).unwrap(), committed, "the tail is cut off");
    assert_eq!(offsets, BTreeMap::from([(tp("t", 0), 5), (tp("t", 1), 3)]));
    // The runtime replays from further back than the sink's offsets (say its group offset
    // lagged): what was written is not written again.
    s.write(&[batch(0, 2..8), batch(1, 0..4)].concat())
        .await
        .unwrap();
    let lines = read_lines(&path);
    let p0: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("p0-"))
        .cloned()
        .collect();
    let p1: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("p1-"))
        .cloned()
        .collect();
    assert_eq!(p0, ids(0..8, 0));
    assert_eq!(p1, ids(0..4, 1));
    drop(s);
    let (_, offsets) = started(config(&path)).await;
    assert_eq!(offsets, BTreeMap::from([(tp("t", 0), 8), (tp("t", 1), 4)]));
}

#[tokio::test]
async fn the_manifest_sits_next_to_the_output_and_a_stale_temp_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/dir/out.ndjson");
    let (mut s, _) = started(config(&path)).await;
    s.write(&batch(0, 0..2)).await.unwrap();
    drop(s);
    let manifest_path = dir.path().join("sub/dir/out.ndjson.manifest.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    assert_eq!(manifest["file"]["name"], "out.ndjson");
    assert_eq!(
        manifest["file"]["bytes"],
        fs::metadata(&path).unwrap().len()
    );
    assert_eq!(
        manifest["offsets"],
        serde_json::json!([{"topic": "t", "partition": 0, "next": 2}])
    );
    // A manifest a crash left in its temp file was never committed.
    fs::write(
        dir.path().join("sub/dir/out.ndjson.manifest.json.tmp"),
        br#"{"version":1,"file":{"name":"out.ndjson","seq":1,"bytes":999,"opened_ms":0},"offsets":[]}"#,
    )
    .unwrap();
    let (_, offsets) = started(config(&path)).await;
    assert_eq!(offsets, BTreeMap::from([(tp("t", 0), 2)]));
    assert!(!dir
        .path()
        .join("sub/dir/out.ndjson.manifest.json.tmp")
        .exists());
}

#[tokio::test]
async fn rolls_by_size_into_numbered_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("archive.ndjson");
    let mut c = config(&path);
    c.roll = Some(RollConfig {
        max_bytes: Some(50),
        max_age_ms: None,
    });
    let (mut s, _) = started(c.clone()).await;
    // Each record is 14 bytes ({"id":"p0-N"} + newline): 3 fit in 50 bytes.
    s.write(&batch(0, 0..5)).await.unwrap();
    s.write(&batch(0, 5..10)).await.unwrap();
    drop(s);
    let name = |n: u32| dir.path().join(format!("archive.{n:06}.ndjson"));
    assert_eq!(read_lines(&name(1)), ids(0..3, 0));
    assert_eq!(read_lines(&name(2)), ids(3..6, 0));
    assert_eq!(read_lines(&name(3)), ids(6..9, 0));
    assert_eq!(read_lines(&name(4)), ids(9..10, 0));
    assert!(!name(5).exists());
    assert!(!path.exists(), "with roll, the files are numbered");
    // After a restart the numbering and the fill of the last file go on.
    let (mut s, offsets) = started(c).await;
    assert_eq!(offsets[&tp("t", 0)], 10);
    s.write(&batch(0, 10..13)).await.unwrap();
    assert_eq!(read_lines(&name(4)), ids(9..12, 0));
    assert_eq!(read_lines(&name(5)), ids(12..13, 0));
    assert_eq!(s.current_file(), Some(name(5)));
}

#[tokio::test]
async fn a_record_larger_than_max_bytes_gets_a_file_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big");
    let mut c = config(&path);
    c.format = SinkFormat::Lines;
    c.roll = Some(RollConfig {
        max_bytes: Some(10),
        max_age_ms: None,
    });
    let (mut s, _) = started(c).await;
    let long = "x".repeat(25);
    s.write(&[
        rec(0, 0, Some(b"a")),
        rec(0, 1, Some(long.as_bytes())),
        rec(0, 2, Some(b"b")),
    ])
    .await
    .unwrap();
    assert_eq!(
        fs::read_to_string(dir.path().join("big.000001")).unwrap(),
        "a\n"
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("big.000002")).unwrap(),
        format!("{long}\n")
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("big.000003")).unwrap(),
        "b\n"
    );
}

#[tokio::test]
async fn rolls_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.ndjson");
    let mut c = config(&path);
    c.roll = Some(RollConfig {
        max_bytes: None,
        max_age_ms: Some(150),
    });
    let (mut s, _) = started(c).await;
    s.write(&batch(0, 0..2)).await.unwrap();
    s.write(&batch(0, 2..3)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write(&batch(0, 3..4)).await.unwrap();
    assert_eq!(
        read_lines(&dir.path().join("a.000001.ndjson")),
        ids(0..3, 0)
    );
    assert_eq!(
        read_lines(&dir.path().join("a.000002.ndjson")),
        ids(3..4, 0)
    );
}

#[tokio::test]
async fn turning_roll_on_continues_in_a_numbered_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.ndjson");
    let (mut s, _) = started(config(&path)).await;
    s.write(&batch(0, 0..2)).await.unwrap();
    drop(s);
    let mut c = config(&path);
    c.roll = Some(RollConfig {
        max_bytes: Some(1 << 20),
        max_age_ms: None,
    });
    let (mut s, offsets) = started(c).await;
    assert_eq!(offsets[&tp("t", 0)], 2);
    s.write(&batch(0, 2..4)).await.unwrap();
    assert_eq!(read_lines(&path), ids(0..2, 0));
    assert_eq!(
        read_lines(&dir.path().join("a.000002.ndjson")),
        ids(2..4, 0)
    );
}

#[tokio::test]
async fn an_existing_file_without_manifest_is_appended_to() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.ndjson");
    fs::write(&path, "{\"old\":true}\n").unwrap();
    let (mut s, offsets) = started(config(&path)).await;
    assert!(offsets.is_empty());
    s.write(&batch(0, 0..1)).await.unwrap();
    assert_eq!(
        read_lines(&path),
        ["{\"old\":true}".to_string(), ids(0..1, 0)[0].clone()]
    );
}

#[tokio::test]
async fn two_sinks_cannot_write_the_same_output() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.ndjson");
    let (first, _) = started(config(&path)).await;
    let mut second = FileSink::new(config(&path)).unwrap();
    let err = second.start().await.unwrap_err();
    assert!(matches!(err, ConnectorError::Transient(_)), "{err}");
    assert!(err.to_string().contains("another file sink"), "{err}");
    drop(first);
    second.start().await.expect("free once the first is gone");
}

#[tokio::test]
async fn a_damaged_manifest_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.ndjson");
    fs::write(dir.path().join("a.ndjson.manifest.json"), "{not json").unwrap();
    let mut s = FileSink::new(config(&path)).unwrap();
    let err = s.start().await.unwrap_err();
    assert!(matches!(err, ConnectorError::Fatal(_)), "{err}");
    assert!(
        err.to_string()
            .contains("a.ndjson.manifest.json is unreadable"),
        "{err}"
    );
}

#[tokio::test]
async fn bad_configuration_is_refused() {
    let e =
        serde_json::from_str::<FileSinkConfig>(r#"{"path": "/x", "fromat": "lines"}"#).unwrap_err();
    assert!(e.to_string().contains("unknown field `fromat`"), "{e}");
    let e = serde_json::from_str::<FileSinkConfig>(r#"{"path": "/x", "roll": {"max_size": 5}}"#)
        .unwrap_err();
    assert!(e.to_string().contains("unknown field `max_size`"), "{e}");
    let c: FileSinkConfig = serde_json::from_str(r#"{"path": "/x/y.ndjson"}"#).unwrap();
    assert_eq!(c.format, SinkFormat::Ndjson);
    assert_eq!(c.roll, None);
    let refused = |c: FileSinkConfig| match FileSink::new(c) {
        Err(ConnectorError::Fatal(e)) => e.to_string(),
        _ => panic!("accepted"),
    };
    let mut c = config(Path::new("/x/y"));
    c.roll = Some(RollConfig {
        max_bytes: None,
        max_age_ms: None,
    });
    assert!(refused(c).contains("needs `max_bytes` or `max_age_ms`"));
    assert!(refused(config(Path::new("/"))).contains("does not name a file"));
}

#[tokio::test]
async fn write_before_start_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = FileSink::new(config(&dir.path().join("a"))).unwrap();
    assert!(matches!(
        s.write(&batch(0, 0..1)).await,
        Err(ConnectorError::Fatal(_))
    ));
}
