//! The file source against real files in temporary directories.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use weir_connectors::file::{FileSource, FileSourceConfig, SourceFormat, StartAt, WatchMode};
use weir_connectors::{now_ms, ConnectorError, Lag, Record, Source, SourceBatch};

/// A polling configuration with short intervals, so that tests run fast and do not depend on
/// change notifications (one test covers those).
fn config(patterns: &[&Path]) -> FileSourceConfig {
    let mut c = FileSourceConfig::new(patterns.iter().map(|p| p.to_str().unwrap().to_string()));
    c.watch = WatchMode::Poll;
    c.poll_interval_ms = 10;
    c.glob_interval_ms = 30;
    c.rotate_wait_ms = 300;
    c
}

async fn started(c: FileSourceConfig, resume: Option<serde_json::Value>) -> FileSource {
    let mut s = FileSource::new(c).expect("valid config");
    s.start(resume).await.expect("start");
    s
}

fn append(path: &Path, text: &str) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn value(r: &Record) -> String {
    String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap()
}

fn header<'a>(r: &'a Record, name: &str) -> Option<&'a [u8]> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_deref())
}

/// Next batch, or None when nothing comes within `wait`.
async fn batch_within(s: &mut FileSource, max: usize, wait: Duration) -> Option<SourceBatch> {
    match tokio::time::timeout(wait, s.next_batch(max)).await {
        Ok(r) => Some(r.expect("next_batch").expect("unbounded source")),
        Err(_) => None,
    }
}

/// Reads until `n` records have come (panics after 10 s), returning them with the offset after
/// the last batch.
async fn read_n(s: &mut FileSource, n: usize) -> (Vec<Record>, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut records = Vec::new();
    let mut offset = serde_json::Value::Null;
    while records.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(b) = batch_within(s, n - records.len(), left).await else {
            panic!(
                "only {} of {n} records: {:?}",
                records.len(),
                records.iter().map(value).collect::<Vec<_>>()
            );
        };
        assert!(!b.records.is_empty());
        records.extend(b.records);
        offset = b.offset;
    }
    (records, offset)
}

async fn read_values(s: &mut FileSource, n: usize) -> Vec<String> {
    read_n(s, n).await.0.iter().map(value).collect()
}

async fn assert_quiet(s: &mut FileSource) {
    if let Some(b) = batch_within(s, 100, Duration::from_millis(300)).await {
        panic!(
            "unexpected records: {:?}",
            b.records.iter().map(value).collect::<Vec<_>>()
        );
    }
}

fn lines(range: std::ops::Range<usize>) -> String {
    range.map(|i| format!("line-{i:04}\n")).collect()
}

fn names(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("line-{i:04}")).collect()
}

#[tokio::test]
async fn lag_counts_the_bytes_not_handed_out_yet() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    append(&path, &lines(0..10)); // 10 bytes a line
    let mut s = started(config(&[&dir.path().join("*.log")]), None).await;
    assert_eq!(read_values(&mut s, 4).await, names(0..4));
    assert_eq!(s.lag(), Some(Lag::Bytes(60)));
    append(&path, &lines(10..15));
    assert_eq!(s.lag(), Some(Lag::Bytes(110)));
    assert_eq!(read_values(&mut s, 11).await, names(4..15));
    assert_eq!(s.lag(), Some(Lag::Bytes(0)));
}

#[tokio::test]
async fn reads_lines_with_the_path_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    append(&path, "first\nsecond\r\n\nlast\n");
    let before = now_ms();
    let mut s = started(config(&[&dir.path().join("*.log")]), None).await;
    let (records, _) = read_n(&mut s, 4).await;
    assert_eq!(
        records.iter().map(value).collect::<Vec<_>>(),
        ["first", "second", "", "last"]
    );
    for r in &records {
        assert_eq!(header(r, "file"), Some(path.to_str().unwrap().as_bytes()));
        assert!(r.timestamp >= before && r.timestamp <= now_ms());
        assert!(r.key.is_none());
    }
    append(&path, "more\n");
    assert_eq!(read_values(&mut s, 1).await, ["more"]);
    assert_quiet(&mut s).await;
}

#[tokio::test]
async fn ndjson_values_are_compacted_and_blank_lines_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.ndjson");
    append(
        &path,
        "{\"a\": 1, \"b\" : [1, 2]}\n\n   \n[ \"x y\" ]\r\n42\n",
    );
    let mut c = config(&[&path]);
    c.format = SourceFormat::Ndjson;
    let mut s = started(c, None).await;
    assert_eq!(
        read_values(&mut s, 3).await,
        [r#"{"a":1,"b":[1,2]}"#, r#"["x y"]"#, "42"]
    );
    assert_quiet(&mut s).await;
}

#[tokio::test]
async fn json_reads_concatenated_and_pretty_printed_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("doc.json");
    append(
        &path,
        "{\n  \"id\": 1,\n  \"tags\": [\"a\", \"b\"]\n}\n{\"id\":2} 3 \"x\"\n[\n  1,\n  2\n",
    );
    let mut c = config(&[&path]);
    c.format = SourceFormat::Json;
    let mut s = started(c, None).await;
    assert_eq!(
        read_values(&mut s, 4).await,
        [r#"{"id":1,"tags":["a","b"]}"#, r#"{"id":2}"#, "3", r#""x""#]
    );
    // The array is not complete yet.
    assert_quiet(&mut s).await;
    append(&path, "]\n7");
    assert_eq!(read_values(&mut s, 1).await, ["[1,2]"]);
    // A number at the end may go on: it is complete once something follows it.
    assert_quiet(&mut s).await;
    append(&path, "0\n");
    assert_eq!(read_values(&mut s, 1).await, ["70"]);
}

#[tokio::test]
async fn json_syntax_error_is_rejected_and_reading_resumes_at_the_next_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("doc.json");
    append(
        &path,
        "{\"a\":1}\n{\n  \"b\": oops,\n  \"c\": {\"d\": 2}\n}\n{\"e\":5}\n",
    );
    let mut c = config(&[&path]);
    c.format = SourceFormat::Json;
    let mut s = started(c, None).await;
    assert_eq!(read_values(&mut s, 1).await, [r#"{"a":1}"#]);
    let err = s.next_batch(10).await.unwrap_err();
    let ConnectorError::BadRecord { index, message } = err else {
        panic!("{err}")
    };
    assert_eq!(index, 0);
    assert!(
        message.starts_with(&format!("{}:3:", path.display())),
        "{message}"
    );
    assert!(message.contains("invalid JSON"), "{message}");
    let rejected = s.take_rejected().expect("the rejected input");
    assert_eq!(
        value(&rejected.records[0]),
        "{\n  \"b\": oops,\n  \"c\": {\"d\": 2}\n}"
    );
    assert_eq!(header(&rejected.records[0], "line"), Some(&b"3"[..]));
    assert_eq!(read_values(&mut s, 1).await, [r#"{"e":5}"#]);
    // An error in a value that starts mid-line: the column counts from the line's start.
    append(&path, "{\"f\":6} {\"g\": x}\n{\"h\":8}\n");
    assert_eq!(read_values(&mut s, 1).await, [r#"{"f":6}"#]);
    let Err(ConnectorError::BadRecord { message, .. }) = s.next_batch(10).await else {
        panic!()
    };
    assert!(
        message.starts_with(&format!(
            "{}:7:15: invalid JSON: expected value",
            path.display()
        )),
        "{message}"
    );
    assert_eq!(value(&s.take_rejected().unwrap().records[0]), r#"{"g": x}"#);
    assert_eq!(read_values(&mut s, 1).await, [r#"{"h":8}"#]);
}

#[tokio::test]
async fn bad_ndjson_line_names_file_and_line_and_reading_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.ndjson");
    append(&path, "{\"a\":1}\n{\"b\":\n{\"c\":3}\n");
    let mut c = config(&[&path]);
    c.format = SourceFormat::Ndjson;
    let mut s = started(c.clone(), None).await;
    let (first, before_bad) = read_n(&mut s, 1).await;
    assert_eq!(value(&first[0]), r#"{"a":1}"#);
    let err = s.next_batch(10).await.unwrap_err();
    let ConnectorError::BadRecord { index: 0, message } = err else {
        panic!("{err}")
    };
    assert!(
        message.starts_with(&format!("{}:2:", path.display())),
        "{message}"
    );
    assert!(
        message.contains("invalid JSON: EOF while parsing"),
        "{message}"
    );
    let rejected = s.take_rejected().expect("rejected input");
    assert!(s.take_rejected().is_none(), "taken once");
    assert_eq!(rejected.records.len(), 1);
    let dead = &rejected.records[0];
    assert_eq!(value(dead), "{\"b\":");
    assert_eq!(
        header(dead, "file"),
        Some(path.to_str().unwrap().as_bytes())
    );
    assert_eq!(header(dead, "line"), Some(&b"2"[..]));
    let (after, _) = read_n(&mut s, 1).await;
    assert_eq!(value(&after[0]), r#"{"c":3}"#);
    drop(s);

    // Resuming from the dead letter's offset goes past the bad line exactly once.
    let mut s = started(c.clone(), Some(rejected.offset.clone())).await;
    assert_eq!(read_values(&mut s, 1).await, [r#"{"c":3}"#]);
    drop(s);
    // Resuming from before it (the dead letter never stored) meets it again.
    let mut s = started(c, Some(before_bad)).await;
    assert!(matches!(
        s.next_batch(10).await,
        Err(ConnectorError::BadRecord { .. })
    ));
    assert_eq!(read_values(&mut s, 1).await, [r#"{"c":3}"#]);
}

#[tokio::test]
async fn a_line_over_max_line_bytes_is_rejected_with_a_bounded_sample() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.log");
    let long = "x".repeat(200_000);
    append(&path, &format!("short\n{long}\nafter\n"));
    let mut c = config(&[&path]);
    c.max_line_bytes = 1000;
    let mut s = started(c, None).await;
    assert_eq!(read_values(&mut s, 1).await, ["short"]);
    let Err(ConnectorError::BadRecord { message, .. }) = s.next_batch(10).await else {
        panic!()
    };
    assert!(
        message.starts_with(&format!("{}:2:", path.display())),
        "{message}"
    );
    assert!(
        message.contains("longer than max_line_bytes (1000)"),
        "{message}"
    );
    let rejected = s.take_rejected().unwrap();
    assert_eq!(value(&rejected.records[0]), "x".repeat(1000));
    assert_eq!(read_values(&mut s, 1).await, ["after"]);
}

#[tokio::test]
async fn resumes_exactly_from_a_batch_offset() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.log");
    let b = dir.path().join("b.log");
    append(&a, &lines(0..10));
    append(&b, &lines(100..105));
    let c = config(&[&dir.path().join("*.log")]);
    let mut s = started(c.clone(), None).await;
    let mut seen = Vec::new();
    let mut offset = serde_json::Value::Null;
    // Batches of 3 until 7 records: the offset after them must resume at the 8th.
    while seen.len() < 7 {
        let b = batch_within(&mut s, 3.min(7 - seen.len()), Duration::from_secs(5))
            .await
            .unwrap();
        seen.extend(b.records.iter().map(value));
        offset = b.offset;
    }
    drop(s);
    let files = offset["files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "{offset}");
    assert!(files
        .iter()
        .all(|f| f["fingerprint"].as_str().unwrap().len() == 16));
    append(&a, &lines(10..12));
    let mut s = started(c.clone(), Some(offset)).await;
    let (rest, end) = read_n(&mut s, 15 + 2 - 7).await;
    seen.extend(rest.iter().map(value));
    assert_quiet(&mut s).await;
    drop(s);
    let mut want_a = names(0..12);
    let mut want_b = names(100..105);
    let mut got_a: Vec<String> = seen
        .iter()
        .filter(|v| !v.starts_with("line-01"))
        .cloned()
        .collect();
    let mut got_b: Vec<String> = seen
        .iter()
        .filter(|v| v.starts_with("line-01"))
        .cloned()
        .collect();
    assert_eq!(got_a, want_a, "order within a file is kept");
    assert_eq!(got_b, want_b);
    got_a.append(&mut got_b);
    want_a.append(&mut want_b);
    assert_eq!(got_a.len(), want_a.len());

    // The final offset: nothing again.
    let mut s = started(c, Some(end)).await;
    assert_quiet(&mut s).await;
}

#[tokio::test]
async fn start_at_end_skips_what_is_there_but_reads_files_created_later() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.log");
    append(&old, "old-1\nold-2\npart");
    let mut c = config(&[&dir.path().join("*.log")]);
    c.start_at = StartAt::End;
    let mut s = started(c, None).await;
    assert_quiet(&mut s).await;
    // A line being written at start is read whole once complete.
    append(&old, "ial\nnew-1\n");
    assert_eq!(read_values(&mut s, 2).await, ["partial", "new-1"]);
    let later = dir.path().join("later.log");
    append(&later, "later-1\nlater-2\n");
    assert_eq!(read_values(&mut s, 2).await, ["later-1", "later-2"]);
}

#[tokio::test]
async fn a_partial_line_is_held_until_complete() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.log");
    append(&path, "abc");
    let mut s = started(config(&[&path]), None).await;
    assert_quiet(&mut s).await;
    append(&path, "def\nxyz");
    let (records, offset) = read_n(&mut s, 1).await;
    assert_eq!(value(&records[0]), "abcdef");
    assert_eq!(
        offset["files"][0]["position"], 7,
        "the offset stops before the partial line: {offset}"
    );
    assert_quiet(&mut s).await;
    append(&path, "\n");
    assert_eq!(read_values(&mut s, 1).await, ["xyz"]);
}

/// Writes `total` lines to `dir/app.log`, rotating by rename+create every `every` lines (the
/// renamed file gets a new name `app.log.N`). With `late`, the writer keeps writing 3 lines to
/// the renamed file before it reopens, as a daemon that reopens its log on a signal does.
fn rotating_writer(
    dir: PathBuf,
    total: usize,
    every: usize,
    late: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let path = dir.join("app.log");
        let mut f = File::create(&path).unwrap();
        let mut rotation = 0;
        let mut i = 0;
        while i < total {
            writeln!(f, "line-{i:04}").unwrap();
            i += 1;
            if i % every == 0 && i < total {
                rotation += 1;
                fs::rename(&path, dir.join(format!("app.log.{rotation}"))).unwrap();
                if late {
                    for _ in 0..3.min(total - i) {
                        writeln!(f, "line-{i:04}").unwrap();
                        i += 1;
                    }
                }
                f = File::create(&path).unwrap();
            }
            if i % 7 == 0 {
                std::thread::sleep(Duration::from_millis(3));
            }
        }
    })
}

async fn rotation_case(pattern: &str, late: bool) {
    let dir = tempfile::tempdir().unwrap();
    let total = 600;
    let mut s = started(config(&[&dir.path().join(pattern)]), None).await;
    let writer = rotating_writer(dir.path().to_path_buf(), total, 97, late);
    let got = read_values(&mut s, total).await;
    writer.join().unwrap();
    assert_eq!(
        got,
        names(0..total),
        "every line once, in the order written"
    );
    assert_quiet(&mut s).await;
}

#[tokio::test]
async fn rename_and_create_rotation_renamed_files_leave_the_glob() {
    rotation_case("app.log", false).await;
}

#[tokio::test]
async fn rename_and_create_rotation_renamed_files_stay_in_the_glob() {
    rotation_case("app.log*", false).await;
}

#[tokio::test]
async fn rename_and_create_rotation_with_writes_after_the_rename() {
    rotation_case("app.log", true).await;
    rotation_case("app.log*", true).await;
}

#[tokio::test]
async fn rotation_while_stopped_resumes_in_the_renamed_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    append(&path, &lines(0..5));
    let c = config(&[&dir.path().join("app.log*")]);
    let mut s = started(c.clone(), None).await;
    let (_, offset) = read_n(&mut s, 5).await;
    drop(s);
    append(&path, &lines(5..8));
    fs::rename(&path, dir.path().join("app.log.1")).unwrap();
    append(&path, &lines(8..10));
    let mut s = started(c, Some(offset)).await;
    assert_eq!(read_values(&mut s, 5).await, names(5..10));
    assert_quiet(&mut s).await;
}

/// logrotate's copytruncate: copy the file, then cut the original to 0; the writer goes on in
/// the original.
fn copytruncate(path: &Path, copy: &Path) {
    fs::copy(path, copy).unwrap();
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(0)
        .unwrap();
}

#[tokio::test]
async fn copytruncate_with_the_copies_in_the_glob_loses_and_repeats_nothing() {
    for new_lines in [3, 40] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, &lines(0..10));
        let mut s = started(config(&[&dir.path().join("app.log*")]), None).await;
        assert_eq!(read_values(&mut s, 10).await, names(0..10));
        // Written before the copy but not read yet: only the copy holds them afterwards.
        append(&path, &lines(10..15));
        copytruncate(&path, &dir.path().join("app.log.1"));
        append(&path, &lines(15..15 + new_lines));
        assert_eq!(
            read_values(&mut s, 5 + new_lines).await,
            names(0..15 + new_lines)[10..]
        );
        assert_quiet(&mut s).await;
    }
}

#[tokio::test]
async fn copytruncate_of_a_single_file_reads_the_new_content_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    append(&path, &lines(0..10));
    let mut s = started(config(&[&path]), None).await;
    assert_eq!(read_values(&mut s, 10).await, names(0..10));
    copytruncate(&path, &dir.path().join("app.log.1"));
    append(&path, &lines(10..13));
    assert_eq!(read_values(&mut s, 3).await, names(10..13));
    // Again, with more new content than the old one had (caught by the fingerprint).
    copytruncate(&path, &dir.path().join("app.log.2"));
    append(&path, &lines(13..40));
    assert_eq!(read_values(&mut s, 27).await, names(13..40));
    assert_quiet(&mut s).await;
}

#[tokio::test]
async fn a_deleted_file_is_read_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gone.log");
    append(&path, &lines(0..3));
    let mut s = started(config(&[&path]), None).await;
    assert_eq!(read_values(&mut s, 3).await, names(0..3));
    append(&path, &lines(3..6));
    fs::remove_file(&path).unwrap();
    assert_eq!(read_values(&mut s, 3).await, names(3..6));
    assert_quiet(&mut s).await;
}

#[tokio::test]
async fn files_that_start_alike_are_both_read_but_a_copy_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.csv");
    let b = dir.path().join("b.csv");
    append(&a, "id,name\n1,ann\n2,bob\n");
    append(&b, "id,name\n7,eve\n");
    let mut s = started(config(&[&dir.path().join("*.csv")]), None).await;
    let mut got = read_values(&mut s, 5).await;
    got.sort();
    assert_eq!(got, ["1,ann", "2,bob", "7,eve", "id,name", "id,name"]);
    fs::copy(&a, dir.path().join("a-copy.csv")).unwrap();
    assert_quiet(&mut s).await;
    append(&a, "3,cid\n");
    assert_eq!(read_values(&mut s, 1).await, ["3,cid"]);
}

#[tokio::test]
async fn exclude_leaves_files_out() {
    let dir = tempfile::tempdir().unwrap();
    append(&dir.path().join("app.log"), "kept\n");
    append(&dir.path().join("app.log.2.gz"), "not text\n");
    let mut c = config(&[&dir.path().join("app.log*")]);
    c.exclude = vec![dir.path().join("*.gz").to_str().unwrap().to_string()];
    let mut s = started(c, None).await;
    assert_eq!(read_values(&mut s, 1).await, ["kept"]);
    assert_quiet(&mut s).await;
}

#[tokio::test]
async fn long_first_line_is_fingerprinted_by_its_first_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wide.log");
    // No newline yet, but past fingerprint_bytes: the file is followed, the line held back.
    append(&path, &"w".repeat(300));
    let mut s = started(config(&[&path]), None).await;
    assert_quiet(&mut s).await;
    append(&path, "\nnext\n");
    let got = read_values(&mut s, 2).await;
    assert_eq!(got, ["w".repeat(300), "next".to_string()]);
}

#[tokio::test]
async fn change_notifications_wake_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("n.log");
    append(&path, "one\n");
    let mut c = FileSourceConfig::new([dir.path().join("*.log").to_str().unwrap()]);
    // Polling so slow that only notifications can explain a prompt read.
    c.poll_interval_ms = 600_000;
    c.glob_interval_ms = 600_000;
    let mut s = started(c, None).await;
    assert_eq!(read_values(&mut s, 1).await, ["one"]);
    let t = Instant::now();
    append(&path, "two\n");
    assert_eq!(read_values(&mut s, 1).await, ["two"]);
    append(&dir.path().join("created.log"), "three\n");
    assert_eq!(read_values(&mut s, 1).await, ["three"]);
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn batches_respect_max_records_and_max_batch_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.log");
    append(&path, &lines(0..1000));
    let mut c = config(&[&path]);
    c.max_batch_bytes = 1000; // "line-0000" is 9 bytes: 112 records reach it
    let mut s = started(c, None).await;
    let b = batch_within(&mut s, 50, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(b.records.len(), 50);
    let b = batch_within(&mut s, 10_000, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(b.records.len(), 112);
    let rest = read_values(&mut s, 1000 - 162).await;
    assert_eq!(rest, names(162..1000));
}

#[tokio::test]
async fn a_cancelled_next_batch_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.log");
    let mut s = started(config(&[&path]), None).await;
    // Cancel many waits while lines arrive: every line must still come out once.
    let writer = {
        let path = path.clone();
        std::thread::spawn(move || {
            for i in 0..300 {
                append(&path, &format!("line-{i:04}\n"));
                if i % 10 == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        })
    };
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 300 && Instant::now() < deadline {
        if let Ok(r) = tokio::time::timeout(Duration::from_micros(300), s.next_batch(7)).await {
            got.extend(r.unwrap().unwrap().records.iter().map(value));
        }
    }
    writer.join().unwrap();
    assert_eq!(got, names(0..300));
}

#[tokio::test]
async fn a_foreign_offset_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = FileSource::new(config(&[&dir.path().join("*.log")])).unwrap();
    let err = s
        .start(Some(serde_json::json!({"lsn": 5})))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Fatal(_)), "{err}");
    assert!(
        err.to_string().contains("not one this source wrote"),
        "{err}"
    );
}

#[tokio::test]
async fn next_batch_before_start_is_an_error() {
    let mut s = FileSource::new(FileSourceConfig::new(["/nonexistent/*.log"])).unwrap();
    assert!(matches!(
        s.next_batch(1).await,
        Err(ConnectorError::Fatal(_))
    ));
}

#[tokio::test]
async fn a_directory_created_after_start_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("later");
    for watch in [WatchMode::Poll, WatchMode::Notify] {
        let _ = fs::remove_dir_all(&sub);
        let mut c = config(&[&sub.join("*.log")]);
        c.watch = watch;
        let mut s = started(c, None).await;
        assert_quiet(&mut s).await;
        fs::create_dir(&sub).unwrap();
        append(&sub.join("a.log"), "hello\n");
        assert_eq!(read_values(&mut s, 1).await, ["hello"]);
    }
}
