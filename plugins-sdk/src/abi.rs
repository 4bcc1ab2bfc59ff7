//! The binary interface between the weir host and a plugin module, version [`ABI_VERSION`].
//!
//! docs/plugins.md describes it for authors of plugins in other languages; this module is the
//! reference implementation, used by both sides (the SDK inside the module, the host in weir).
//!
//! All integers are little-endian. `bytes?` is a `u32` length followed by that many bytes, where
//! the length [`NULL_LEN`] (`0xFFFF_FFFF`) stands for null and is followed by nothing; `str` is
//! the same with UTF-8 content and no null.
//!
//! ```text
//! record  := timestamp:i64 partition:i32 offset:i64 topic:bytes? key:bytes? value:bytes?
//!            header_count:u32 (name:str value:bytes?)*        partition/offset -1 = none
//! batch   := count:u32 record*                                  input of weir_process
//! output  := 0x00 count:u32 entry*  |  0x01 message:str         result of weir_process
//! entry   := input_index:u32 (0x00 record | 0x01 message:str)   a record, or that input's error
//! init    := 0x00  |  0x01 message:str                          result of weir_init
//! ```

use std::fmt;

use crate::{Header, Record};

/// The ABI version this crate implements; the module exports it as `weir_abi_version`.
pub const ABI_VERSION: u32 = 1;

/// The length that encodes a null `bytes?`.
pub const NULL_LEN: u32 = u32::MAX;

/// First byte of an output or init result: the call succeeded.
pub const STATUS_OK: u8 = 0;
/// First byte of an output or init result: the call failed as a whole; a message follows.
pub const STATUS_FAILED: u8 = 1;

/// Output entry tag: a record produced from the input at `input_index`.
pub const ENTRY_RECORD: u8 = 0;
/// Output entry tag: the input at `input_index` failed; a message follows.
pub const ENTRY_ERROR: u8 = 1;

/// Log levels of the `weir.log` import.
pub mod level {
    pub const ERROR: u32 = 1;
    pub const WARN: u32 = 2;
    pub const INFO: u32 = 3;
    pub const DEBUG: u32 = 4;
    pub const TRACE: u32 = 5;
}

/// The smallest encoded record: fixed fields, three null `bytes?` and no headers.
pub const MIN_RECORD_LEN: usize = 8 + 4 + 8 + 4 + 4 + 4 + 4;

/// Bytes that do not follow the encoding above.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// Byte offset in the buffer where decoding stopped.
    pub offset: usize,
    pub what: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at byte {})", self.what, self.offset)
    }
}

impl std::error::Error for DecodeError {}

/// A decoded record whose fields borrow the buffer it was decoded from: decoding one costs no
/// copy. [`RecordView::to_record`] makes an owned [`Record`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub timestamp: i64,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub topic: Option<&'a str>,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: Vec<(&'a str, Option<&'a [u8]>)>,
}

impl RecordView<'_> {
    pub fn to_record(&self) -> Record {
        Record {
            key: self.key.map(<[u8]>::to_vec),
            value: self.value.map(<[u8]>::to_vec),
            headers: self
                .headers
                .iter()
                .map(|(name, value)| Header {
                    name: name.to_string(),
                    value: value.map(<[u8]>::to_vec),
                })
                .collect(),
            timestamp: self.timestamp,
            topic: self.topic.map(str::to_string),
            partition: self.partition,
            offset: self.offset,
        }
    }
}

impl EncodeRecord for RecordView<'_> {
    fn timestamp(&self) -> i64 {
        self.timestamp
    }
    fn topic(&self) -> Option<&str> {
        self.topic
    }
    fn partition(&self) -> i32 {
        self.partition.unwrap_or(-1)
    }
    fn offset(&self) -> i64 {
        self.offset.unwrap_or(-1)
    }
    fn key(&self) -> Option<&[u8]> {
        self.key
    }
    fn value(&self) -> Option<&[u8]> {
        self.value
    }
    fn header_count(&self) -> usize {
        self.headers.len()
    }
    fn header(&self, i: usize) -> (&str, Option<&[u8]>) {
        self.headers[i]
    }
}

// ---------------------------------------------------------------------------------------------
// encoding
// ---------------------------------------------------------------------------------------------

#[inline]
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

#[inline]
fn put_len(out: &mut Vec<u8>, len: usize) {
    // Lengths come from Rust values in memory; on wasm32 they fit in u32 by construction, and a
    // host never encodes a single field of 4 GiB (the guest memory could not hold it).
    put_u32(out, u32::try_from(len).unwrap_or(NULL_LEN - 1));
}

#[inline]
fn put_opt_bytes(out: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        None => put_u32(out, NULL_LEN),
        Some(b) => {
            put_len(out, b.len());
            out.extend_from_slice(b);
        }
    }
}

#[inline]
fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// A record the encoder can write: the SDK's [`Record`], a [`RecordView`], or a host's own
/// record type, so a host encodes its records without converting them first.
pub trait EncodeRecord {
    fn timestamp(&self) -> i64;
    /// The topic the record was read from, if any.
    fn topic(&self) -> Option<&str>;
    /// The partition it was read from, or -1.
    fn partition(&self) -> i32;
    /// Its offset in that partition, or -1.
    fn offset(&self) -> i64;
    fn key(&self) -> Option<&[u8]>;
    fn value(&self) -> Option<&[u8]>;
    fn header_count(&self) -> usize;
    /// Header `i` (`i < header_count()`): name and value.
    fn header(&self, i: usize) -> (&str, Option<&[u8]>);
}

impl EncodeRecord for Record {
    fn timestamp(&self) -> i64 {
        self.timestamp
    }
    fn topic(&self) -> Option<&str> {
        self.topic.as_deref()
    }
    fn partition(&self) -> i32 {
        self.partition.unwrap_or(-1)
    }
    fn offset(&self) -> i64 {
        self.offset.unwrap_or(-1)
    }
    fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }
    fn value(&self) -> Option<&[u8]> {
        self.value.as_deref()
    }
    fn header_count(&self) -> usize {
        self.headers.len()
    }
    fn header(&self, i: usize) -> (&str, Option<&[u8]>) {
        let h = &self.headers[i];
        (&h.name, h.value.as_deref())
    }
}

/// The exact encoded size of `r`.
pub fn encoded_len<R: EncodeRecord + ?Sized>(r: &R) -> usize {
    let opt = |v: Option<usize>| 4 + v.unwrap_or(0);
    MIN_RECORD_LEN - 12
        + opt(r.topic().map(str::len))
        + opt(r.key().map(<[u8]>::len))
        + opt(r.value().map(<[u8]>::len))
        + (0..r.header_count())
            .map(|i| {
                let (name, value) = r.header(i);
                4 + name.len() + opt(value.map(<[u8]>::len))
            })
            .sum::<usize>()
}

/// Append the encoding of one record.
pub fn encode_record<R: EncodeRecord + ?Sized>(r: &R, out: &mut Vec<u8>) {
    out.extend_from_slice(&r.timestamp().to_le_bytes());
    out.extend_from_slice(&r.partition().to_le_bytes());
    out.extend_from_slice(&r.offset().to_le_bytes());
    put_opt_bytes(out, r.topic().map(str::as_bytes));
    put_opt_bytes(out, r.key());
    put_opt_bytes(out, r.value());
    let n = r.header_count();
    put_len(out, n);
    for i in 0..n {
        let (name, value) = r.header(i);
        put_str(out, name);
        put_opt_bytes(out, value);
    }
}

/// Append a whole input batch (`count` then the records).
pub fn encode_batch<R: EncodeRecord>(records: &[R], out: &mut Vec<u8>) {
    out.reserve(4 + records.iter().map(encoded_len).sum::<usize>());
    put_len(out, records.len());
    for r in records {
        encode_record(r, out);
    }
}

/// Writes the output of one `weir_process` call: `0x00`, a count patched in by `finish`, then
/// entries in the order they are added.
pub struct OutputWriter<'a> {
    out: &'a mut Vec<u8>,
    count_at: usize,
    count: u32,
}

impl<'a> OutputWriter<'a> {
    /// Start an output at the end of `out` (normally an empty, reused buffer).
    pub fn new(out: &'a mut Vec<u8>) -> OutputWriter<'a> {
        out.push(STATUS_OK);
        let count_at = out.len();
        put_u32(out, 0);
        OutputWriter {
            out,
            count_at,
            count: 0,
        }
    }

    /// A record produced from input `index`.
    pub fn record<R: EncodeRecord + ?Sized>(&mut self, index: u32, r: &R) {
        put_u32(self.out, index);
        self.out.push(ENTRY_RECORD);
        encode_record(r, self.out);
        self.count += 1;
    }

    /// Input `index` failed with `message`.
    pub fn error(&mut self, index: u32, message: &str) {
        put_u32(self.out, index);
        self.out.push(ENTRY_ERROR);
        put_str(self.out, message);
        self.count += 1;
    }

    /// Patch in the entry count.
    pub fn finish(self) {
        self.out[self.count_at..self.count_at + 4].copy_from_slice(&self.count.to_le_bytes());
    }
}

/// Append a failed result (of `weir_process` or `weir_init`): `0x01` and the message.
pub fn encode_failure(out: &mut Vec<u8>, message: &str) {
    out.push(STATUS_FAILED);
    put_str(out, message);
}

// ---------------------------------------------------------------------------------------------
// decoding
// ---------------------------------------------------------------------------------------------

/// A cursor over an encoded buffer that never reads past its end.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn error(&self, what: impl Into<String>) -> DecodeError {
        DecodeError {
            offset: self.pos,
            what: what.into(),
        }
    }

    // The accessors below run for every field of every record, in the module and in the host:
    // inlined, with the error built out of line.
    #[inline]
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        match self.buf.get(self.pos..self.pos.saturating_add(n)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(self.truncated(n, what)),
        }
    }

    #[cold]
    #[inline(never)]
    fn truncated(&self, n: usize, what: &str) -> DecodeError {
        self.error(format!(
            "truncated {what}: {n} bytes needed, {} left",
            self.remaining()
        ))
    }

    #[inline]
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DecodeError> {
        let s = self.take(N, what)?;
        Ok(s.try_into().expect("take returned N bytes"))
    }

    #[inline]
    pub fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    #[inline]
    pub fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_le_bytes)
    }

    #[inline]
    pub fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_le_bytes)
    }

    #[inline]
    pub fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        self.array(what).map(i64::from_le_bytes)
    }

    /// A `bytes?` field, borrowed from the buffer.
    #[inline]
    pub fn opt_bytes(&mut self, what: &str) -> Result<Option<&'a [u8]>, DecodeError> {
        let len = self.u32(what)?;
        if len == NULL_LEN {
            return Ok(None);
        }
        self.take(len as usize, what).map(Some)
    }

    /// A `str` field.
    pub fn str(&mut self, what: &str) -> Result<&'a str, DecodeError> {
        let start = self.pos;
        match self.opt_bytes(what)? {
            None => Err(DecodeError {
                offset: start,
                what: format!("{what} is null"),
            }),
            Some(b) => std::str::from_utf8(b).map_err(|_| DecodeError {
                offset: start,
                what: format!("{what} is not UTF-8"),
            }),
        }
    }

    /// A `str` field decoded leniently (invalid UTF-8 replaced): for error messages.
    pub fn message(&mut self, what: &str) -> Result<String, DecodeError> {
        let start = self.pos;
        match self.opt_bytes(what)? {
            None => Err(DecodeError {
                offset: start,
                what: format!("{what} is null"),
            }),
            Some(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        }
    }

    /// A count of items that each take at least `min_len` bytes, checked against what is left.
    pub fn count(&mut self, what: &str, min_len: usize) -> Result<u32, DecodeError> {
        let n = self.u32(what)?;
        if (n as usize).saturating_mul(min_len) > self.remaining() {
            return Err(self.error(format!(
                "{what} {n} cannot fit in the {} bytes left",
                self.remaining()
            )));
        }
        Ok(n)
    }

    /// One record, borrowed from the buffer.
    pub fn record(&mut self) -> Result<RecordView<'a>, DecodeError> {
        let timestamp = self.i64("record timestamp")?;
        let partition = self.i32("record partition")?;
        let offset = self.i64("record offset")?;
        let topic_at = self.pos;
        let topic = match self.opt_bytes("record topic")? {
            None => None,
            Some(t) => Some(std::str::from_utf8(t).map_err(|_| DecodeError {
                offset: topic_at,
                what: "record topic is not UTF-8".into(),
            })?),
        };
        let key = self.opt_bytes("record key")?;
        let value = self.opt_bytes("record value")?;
        let n = self.count("header count", 8)?;
        let mut headers = match n {
            0 => Vec::new(),
            n => Vec::with_capacity(n as usize),
        };
        for _ in 0..n {
            let name = self.str("header name")?;
            let value = self.opt_bytes("header value")?;
            headers.push((name, value));
        }
        Ok(RecordView {
            timestamp,
            partition: (partition >= 0).then_some(partition),
            offset: (offset >= 0).then_some(offset),
            topic,
            key,
            value,
            headers,
        })
    }

    fn expect_end(&self, what: &str) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return Err(self.error(format!(
                "{} unexpected bytes after the {what}",
                self.remaining()
            )));
        }
        Ok(())
    }
}

/// Iterates over the records of an input batch without collecting them.
pub struct BatchReader<'a> {
    reader: Reader<'a>,
    left: u32,
    failed: bool,
}

impl<'a> BatchReader<'a> {
    pub fn new(buf: &'a [u8]) -> Result<BatchReader<'a>, DecodeError> {
        let mut reader = Reader::new(buf);
        let left = reader.count("record count", MIN_RECORD_LEN)?;
        Ok(BatchReader {
            reader,
            left,
            failed: false,
        })
    }

    /// Records not read yet.
    pub fn remaining(&self) -> u32 {
        self.left
    }
}

impl<'a> Iterator for BatchReader<'a> {
    type Item = Result<RecordView<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if self.left == 0 {
            return match self.reader.expect_end("batch") {
                Ok(()) => None,
                Err(e) => {
                    self.failed = true;
                    Some(Err(e))
                }
            };
        }
        self.left -= 1;
        let r = self.reader.record();
        self.failed = r.is_err();
        Some(r)
    }
}

/// Decode a whole input batch.
pub fn decode_batch(buf: &[u8]) -> Result<Vec<Record>, DecodeError> {
    BatchReader::new(buf)?
        .map(|r| r.map(|v| v.to_record()))
        .collect()
}

/// What one input produced, in a successful output: a record (by default the SDK's [`Record`];
/// see [`decode_output_with`]) or the plugin's error message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome<T = Record> {
    Record(T),
    Error(String),
}

/// One entry of a successful output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry<T = Record> {
    pub input_index: u32,
    pub outcome: Outcome<T>,
}

/// Decode the result of `weir_process`: `Ok(Ok(entries))`, `Ok(Err(message))` when the call
/// failed as a whole, `Err` when the bytes are malformed.
pub fn decode_output(buf: &[u8]) -> Result<Result<Vec<Entry>, String>, DecodeError> {
    decode_output_with(buf, |v| v.to_record())
}

/// [`decode_output`], building each produced record with `build` from a view into `buf` (a host
/// keeps slices of its own copy of the output instead of copying every field).
pub fn decode_output_with<'a, T>(
    buf: &'a [u8],
    mut build: impl FnMut(RecordView<'a>) -> T,
) -> Result<Result<Vec<Entry<T>>, String>, DecodeError> {
    let mut r = Reader::new(buf);
    match r.u8("output status")? {
        STATUS_OK => {}
        STATUS_FAILED => {
            let message = r.message("failure message")?;
            r.expect_end("failure message")?;
            return Ok(Err(message));
        }
        other => return Err(r.error(format!("unknown output status {other}"))),
    }
    let n = r.count("entry count", 9)?;
    let mut entries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let input_index = r.u32("entry input index")?;
        let outcome = match r.u8("entry tag")? {
            ENTRY_RECORD => Outcome::Record(build(r.record()?)),
            ENTRY_ERROR => Outcome::Error(r.message("entry error message")?),
            other => return Err(r.error(format!("unknown entry tag {other}"))),
        };
        entries.push(Entry {
            input_index,
            outcome,
        });
    }
    r.expect_end("output")?;
    Ok(Ok(entries))
}

/// Decode the result of `weir_init`.
pub fn decode_init_result(buf: &[u8]) -> Result<Result<(), String>, DecodeError> {
    let mut r = Reader::new(buf);
    let result = match r.u8("init status")? {
        STATUS_OK => Ok(()),
        STATUS_FAILED => Err(r.message("init failure message")?),
        other => return Err(r.error(format!("unknown init status {other}"))),
    };
    r.expect_end("init result")?;
    Ok(result)
}

/// Pack a guest pointer and length into the `i64` that `weir_init` and `weir_process` return.
pub fn pack_ptr_len(ptr: u32, len: u32) -> u64 {
    ((ptr as u64) << 32) | len as u64
}

/// The inverse of [`pack_ptr_len`].
pub fn unpack_ptr_len(v: u64) -> (u32, u32) {
    ((v >> 32) as u32, v as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record::new("hello")
                .with_key("k")
                .with_timestamp(1_700_000_000_000),
            Record {
                key: None,
                value: None,
                headers: vec![
                    Header {
                        name: "h".into(),
                        value: Some(b"v".to_vec()),
                    },
                    Header {
                        name: "nul".into(),
                        value: None,
                    },
                ],
                timestamp: -1,
                topic: Some("orders".into()),
                partition: Some(3),
                offset: Some(42),
            },
            Record::new(Vec::new()),
        ]
    }

    #[test]
    fn batch_round_trips_and_sizes_are_exact() {
        let recs = sample();
        let mut buf = Vec::new();
        encode_batch(&recs, &mut buf);
        assert_eq!(buf.len(), 4 + recs.iter().map(encoded_len).sum::<usize>());
        assert_eq!(decode_batch(&buf).unwrap(), recs);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        encode_batch(&sample(), &mut buf);
        for cut in 0..buf.len() {
            assert!(decode_batch(&buf[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = buf.clone();
        longer.push(0);
        assert!(decode_batch(&longer)
            .unwrap_err()
            .what
            .contains("unexpected bytes"));
    }

    #[test]
    fn hostile_counts_and_lengths_are_refused_without_allocating() {
        let huge_count = u32::MAX.to_le_bytes();
        let e = decode_batch(&huge_count).unwrap_err();
        assert!(e.what.contains("cannot fit"), "{e}");
        let mut buf = Vec::new();
        put_u32(&mut buf, 1);
        buf.extend_from_slice(&[0; 20]);
        put_u32(&mut buf, 0x7fff_ffff); // topic length far beyond the buffer
        buf.extend_from_slice(&[0; 16]); // enough bytes left for one minimal record
        assert!(decode_batch(&buf).unwrap_err().what.contains("truncated"));
    }

    #[test]
    fn output_round_trips_with_errors_and_failures() {
        let recs = sample();
        let mut out = Vec::new();
        let mut w = OutputWriter::new(&mut out);
        w.record(0, &recs[0]);
        w.error(1, "bad field");
        w.record(2, &recs[2]);
        w.record(2, &recs[0]);
        w.finish();
        let entries = decode_output(&out).unwrap().unwrap();
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[1].input_index, 1);
        assert_eq!(entries[1].outcome, Outcome::Error("bad field".into()));
        assert_eq!(entries[3].outcome, Outcome::Record(recs[0].clone()));

        let mut fail = Vec::new();
        encode_failure(&mut fail, "cannot start");
        assert_eq!(
            decode_output(&fail).unwrap(),
            Err("cannot start".to_string())
        );
        assert_eq!(
            decode_init_result(&fail).unwrap(),
            Err("cannot start".to_string())
        );
        assert_eq!(decode_init_result(&[STATUS_OK]).unwrap(), Ok(()));
        assert!(decode_output(&[7]).is_err());
        assert!(decode_output(&[]).is_err());
    }

    #[test]
    fn pointer_packing_round_trips() {
        assert_eq!(
            unpack_ptr_len(pack_ptr_len(0xdead_beef, 17)),
            (0xdead_beef, 17)
        );
    }
}
