//! Kafka record batch v2: header access, validation and offset assignment.
//!
//! Batches are stored exactly as the producer sent them; the broker only rewrites the fields that
//! the CRC does not cover (base offset, partition leader epoch), so stored bytes never need
//! re-encoding.

use bytes::Bytes;
use kafka_protocol::compression::{Decompressor, Gzip, Lz4, Snappy, Zstd};
use kafka_protocol::records::Compression;

/// Bytes before the records in a v2 batch.
pub const HEADER_LEN: usize = 61;
/// The part of the header every batch (any magic) starts with: base offset + batch length.
pub const LOG_OVERHEAD: usize = 12;

const BASE_OFFSET: usize = 0;
const BATCH_LENGTH: usize = 8;
const LEADER_EPOCH: usize = 12;
const MAGIC: usize = 16;
const CRC: usize = 17;
const ATTRIBUTES: usize = 21;
const LAST_OFFSET_DELTA: usize = 23;
const BASE_TIMESTAMP: usize = 27;
const MAX_TIMESTAMP: usize = 35;
const PRODUCER_ID: usize = 43;
const PRODUCER_EPOCH: usize = 51;
const BASE_SEQUENCE: usize = 53;
const RECORD_COUNT: usize = 57;

const ATTR_COMPRESSION_MASK: i16 = 0x07;
const ATTR_TRANSACTIONAL: i16 = 1 << 4;
const ATTR_CONTROL: i16 = 1 << 5;

/// Why a batch was refused; each maps to the Kafka error code a client understands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("corrupt record batch: {0}")]
    Corrupt(String),
    #[error("invalid record: {0}")]
    InvalidRecord(String),
    #[error("unsupported compression codec {0}")]
    UnsupportedCompression(i16),
    #[error("record batch of {size} bytes exceeds max.message.bytes {max}")]
    TooLarge { size: usize, max: usize },
}

fn corrupt(msg: impl Into<String>) -> BatchError {
    BatchError::Corrupt(msg.into())
}

fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be_i64(b: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// A view of one complete v2 batch (header and records) in a byte slice.
#[derive(Clone, Copy)]
pub struct BatchView<'a> {
    bytes: &'a [u8],
}

impl<'a> BatchView<'a> {
    /// Wraps a slice that holds at least a full header; call [`validate`] before trusting it.
    pub fn new(bytes: &'a [u8]) -> Self {
        debug_assert!(bytes.len() >= HEADER_LEN);
        BatchView { bytes }
    }
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
    pub fn base_offset(&self) -> i64 {
        be_i64(self.bytes, BASE_OFFSET)
    }
    pub fn last_offset_delta(&self) -> i32 {
        be_i32(self.bytes, LAST_OFFSET_DELTA)
    }
    pub fn last_offset(&self) -> i64 {
        self.base_offset() + self.last_offset_delta() as i64
    }
    pub fn next_offset(&self) -> i64 {
        self.last_offset() + 1
    }
    pub fn leader_epoch(&self) -> i32 {
        be_i32(self.bytes, LEADER_EPOCH)
    }
    pub fn attributes(&self) -> i16 {
        be_i16(self.bytes, ATTRIBUTES)
    }
    pub fn compression_id(&self) -> i16 {
        self.attributes() & ATTR_COMPRESSION_MASK
    }
    pub fn is_transactional(&self) -> bool {
        self.attributes() & ATTR_TRANSACTIONAL != 0
    }
    pub fn is_control(&self) -> bool {
        self.attributes() & ATTR_CONTROL != 0
    }
    pub fn base_timestamp(&self) -> i64 {
        be_i64(self.bytes, BASE_TIMESTAMP)
    }
    pub fn max_timestamp(&self) -> i64 {
        be_i64(self.bytes, MAX_TIMESTAMP)
    }
    pub fn producer_id(&self) -> i64 {
        be_i64(self.bytes, PRODUCER_ID)
    }
    pub fn producer_epoch(&self) -> i16 {
        be_i16(self.bytes, PRODUCER_EPOCH)
    }
    pub fn base_sequence(&self) -> i32 {
        be_i32(self.bytes, BASE_SEQUENCE)
    }
    pub fn record_count(&self) -> i32 {
        be_i32(self.bytes, RECORD_COUNT)
    }

    /// Checks what a stored batch must satisfy to be served: magic 2, consistent length, CRC.
    pub fn check_integrity(&self) -> Result<(), BatchError> {
        let b = self.bytes;
        if b[MAGIC] != 2 {
            return Err(corrupt(format!(
                "unsupported magic byte {}",
                b[MAGIC] as i8
            )));
        }
        let declared = be_i32(b, BATCH_LENGTH);
        if declared as i64 + LOG_OVERHEAD as i64 != b.len() as i64 {
            return Err(corrupt("batch length does not match its bytes"));
        }
        let stored = u32::from_be_bytes(b[CRC..CRC + 4].try_into().unwrap());
        if crc32c::crc32c(&b[ATTRIBUTES..]) != stored {
            return Err(corrupt("CRC mismatch"));
        }
        Ok(())
    }

    /// Full validation of a batch arriving from a producer: integrity, then the records inside
    /// (decompressing when the codec requires it) must match the header's count and deltas.
    pub fn validate_incoming(&self) -> Result<(), BatchError> {
        self.validate_incoming_with(false)
    }

    /// As [`validate_incoming`]; with `require_keys` (compacted topics) every record needs a key.
    pub fn validate_incoming_with(&self, require_keys: bool) -> Result<(), BatchError> {
        self.check_integrity()?;
        let count = self.record_count();
        if count <= 0 {
            return Err(BatchError::InvalidRecord("batch has no records".into()));
        }
        if self.last_offset_delta() != count - 1 {
            return Err(BatchError::InvalidRecord(format!(
                "last offset delta {} does not match record count {count}",
                self.last_offset_delta()
            )));
        }
        let body = &self.bytes[HEADER_LEN..];
        match self.compression_id() {
            0 => check_records(body, count, require_keys),
            1 => decompress_then(Compression::Gzip, body, |r| {
                check_records(r, count, require_keys)
            }),
            2 => decompress_then(Compression::Snappy, body, |r| {
                check_records(r, count, require_keys)
            }),
            3 => decompress_then(Compression::Lz4, body, |r| {
                check_records(r, count, require_keys)
            }),
            4 => decompress_then(Compression::Zstd, body, |r| {
                check_records(r, count, require_keys)
            }),
            other => Err(BatchError::UnsupportedCompression(other)),
        }
    }

    /// Decodes the batch's records (decompressing if needed) and hands each to `f`.
    pub fn for_each_record(&self, mut f: impl FnMut(RecordView<'_>)) -> Result<(), BatchError> {
        let count = self.record_count();
        let body = &self.bytes[HEADER_LEN..];
        let mut visit = |records: &[u8]| -> Result<(), BatchError> {
            let mut pos = 0;
            for _ in 0..count {
                let (record, len) = RecordView::parse(&records[pos..])?;
                f(record);
                pos += len;
            }
            Ok(())
        };
        match self.compression_id() {
            0 => visit(body),
            1 => decompress_then(Compression::Gzip, body, visit),
            2 => decompress_then(Compression::Snappy, body, visit),
            3 => decompress_then(Compression::Lz4, body, visit),
            4 => decompress_then(Compression::Zstd, body, visit),
            other => Err(BatchError::UnsupportedCompression(other)),
        }
    }
}

/// Sets base offset and partition leader epoch: the fields the CRC does not cover.
pub fn stamp(batch: &mut [u8], base_offset: i64, leader_epoch: i32) {
    batch[BASE_OFFSET..BASE_OFFSET + 8].copy_from_slice(&base_offset.to_be_bytes());
    batch[LEADER_EPOCH..LEADER_EPOCH + 4].copy_from_slice(&leader_epoch.to_be_bytes());
}

/// Batches to append, borrowed as they arrived, with a copy of each one's header to stamp.
/// Only the header changes on append, so the records are written from the request's own
/// buffer (a vectored write of header, records, header, records...) instead of being copied
/// first.
pub struct StampedBatches<'a> {
    bytes: &'a [u8],
    ranges: &'a [(usize, usize)],
    headers: Vec<[u8; HEADER_LEN]>,
}

impl<'a> StampedBatches<'a> {
    /// `ranges` split `bytes` into whole batches, as [`split_batches`] returns them.
    pub fn new(bytes: &'a [u8], ranges: &'a [(usize, usize)]) -> Self {
        let headers = ranges
            .iter()
            .map(|&(s, _)| bytes[s..s + HEADER_LEN].try_into().unwrap())
            .collect();
        StampedBatches {
            bytes,
            ranges,
            headers,
        }
    }

    pub fn count(&self) -> usize {
        self.ranges.len()
    }

    /// The `i`th batch's (stamped) header: every header field, none of the records.
    pub fn header(&self, i: usize) -> BatchView<'_> {
        BatchView::new(&self.headers[i])
    }

    /// Where the `i`th batch starts, relative to the first.
    pub fn position(&self, i: usize) -> usize {
        self.ranges[i].0
    }

    pub fn stamp(&mut self, i: usize, base_offset: i64, leader_epoch: i32) {
        stamp(&mut self.headers[i], base_offset, leader_epoch);
    }

    /// The `i`th batch whole, as it is written.
    pub fn to_vec(&self, i: usize) -> Vec<u8> {
        let (s, e) = self.ranges[i];
        let mut whole = Vec::with_capacity(e - s);
        whole.extend_from_slice(&self.headers[i]);
        whole.extend_from_slice(&self.bytes[s + HEADER_LEN..e]);
        whole
    }

    /// The pieces to write, in order.
    pub fn io_slices(&self) -> Vec<std::io::IoSlice<'_>> {
        let mut parts = Vec::with_capacity(2 * self.ranges.len());
        for (header, &(s, e)) in self.headers.iter().zip(self.ranges) {
            parts.push(std::io::IoSlice::new(header));
            if e > s + HEADER_LEN {
                parts.push(std::io::IoSlice::new(&self.bytes[s + HEADER_LEN..e]));
            }
        }
        parts
    }
}

fn decompress_then<R>(
    codec: Compression,
    body: &[u8],
    f: impl FnOnce(&[u8]) -> Result<R, BatchError>,
) -> Result<R, BatchError> {
    let mut input = Bytes::copy_from_slice(body);
    let fail = |e: anyhow::Error| corrupt(format!("cannot decompress {codec:?} records: {e}"));
    let decompressed: Bytes = match codec {
        Compression::Gzip => Gzip::decompress(&mut input, |b| Ok(b.clone())).map_err(fail)?,
        Compression::Snappy => Snappy::decompress(&mut input, |b| Ok(b.clone())).map_err(fail)?,
        Compression::Lz4 => Lz4::decompress(&mut input, |b| Ok(b.clone())).map_err(fail)?,
        Compression::Zstd => Zstd::decompress(&mut input, |b| Ok(b.clone())).map_err(fail)?,
        Compression::None => input,
    };
    f(&decompressed)
}

/// Walks `count` records; each must parse exactly and carry offset delta i.
fn check_records(records: &[u8], count: i32, require_keys: bool) -> Result<(), BatchError> {
    if records_well_formed(records, count, require_keys) {
        return Ok(());
    }
    explain_records(records, count, require_keys)
}

/// `check_records` for well-formed records, in one pass with no error to build: most of
/// the CPU a produce of small records costs is this walk. Accepts nothing
/// `explain_records` refuses; false sends the records there to name what is wrong.
fn records_well_formed(records: &[u8], count: i32, require_keys: bool) -> bool {
    let mut pos = 0;
    for i in 0..count as i64 {
        let Some(length) = zigzag_at(records, &mut pos).filter(|l| *l >= 0) else {
            return false;
        };
        let Some(record) = pos
            .checked_add(length as usize)
            .and_then(|end| records.get(..end))
        else {
            return false;
        };
        pos += 1; // attributes
        let fields_fit = zigzag_at(record, &mut pos).is_some() // timestamp delta
            && zigzag_at(record, &mut pos) == Some(i) // offset delta
            && match skip_nullable(record, &mut pos) {
                Some(key) => key || !require_keys,
                None => false,
            }
            && skip_nullable(record, &mut pos).is_some(); // value
        if !fields_fit {
            return false;
        }
        let Some(headers) =
            zigzag_at(record, &mut pos).filter(|n| (0..=i32::MAX as i64).contains(n))
        else {
            return false;
        };
        for _ in 0..headers {
            let key_fits = match zigzag_at(record, &mut pos) {
                Some(len) if len >= 0 => skip(record, &mut pos, len),
                _ => false,
            };
            if !key_fits || skip_nullable(record, &mut pos).is_none() {
                return false;
            }
        }
        if pos != record.len() {
            return false;
        }
    }
    pos == records.len()
}

/// A zigzag varint at `pos` (up to ten bytes; bits past 64 are dropped), moving `pos` past
/// it; None if it runs past the end or is longer.
#[inline(always)]
fn zigzag_at(buf: &[u8], pos: &mut usize) -> Option<i64> {
    let first = *buf.get(*pos)?;
    // Small lengths and deltas take one byte.
    if first < 0x80 {
        *pos += 1;
        return Some(((first >> 1) as i64) ^ -((first & 1) as i64));
    }
    let mut value: u64 = 0;
    for (i, shift) in (0..70).step_by(7).enumerate() {
        let byte = *buf.get(*pos + i)?;
        value |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            *pos += i + 1;
            return Some(((value >> 1) as i64) ^ -((value & 1) as i64));
        }
    }
    None
}

/// Skips `len` bytes if they are there.
#[inline(always)]
fn skip(buf: &[u8], pos: &mut usize, len: i64) -> bool {
    match pos
        .checked_add(len as usize)
        .filter(|end| *end <= buf.len())
    {
        Some(end) => {
            *pos = end;
            true
        }
        None => false,
    }
}

/// Skips nullable bytes (an int32 length, negative for null); whether they were not null.
#[inline(always)]
fn skip_nullable(buf: &[u8], pos: &mut usize) -> Option<bool> {
    let len = zigzag_at(buf, pos).filter(|l| i32::try_from(*l).is_ok())?;
    if len < 0 {
        return Some(false);
    }
    skip(buf, pos, len).then_some(true)
}

/// The record-by-record walk that says what is wrong with records `records_well_formed`
/// refused.
fn explain_records(mut records: &[u8], count: i32, require_keys: bool) -> Result<(), BatchError> {
    for i in 0..count {
        let (record, len) = RecordView::parse(records)?;
        if require_keys && record.key.is_none() {
            return Err(BatchError::InvalidRecord(
                "compacted topics require a key on every record".into(),
            ));
        }
        if record.offset_delta != i {
            return Err(BatchError::InvalidRecord(format!(
                "record {i} has offset delta {}",
                record.offset_delta
            )));
        }
        records = &records[len..];
    }
    if !records.is_empty() {
        return Err(corrupt(format!(
            "{} trailing bytes after the last record",
            records.len()
        )));
    }
    Ok(())
}

/// One record inside a batch, borrowed from the (decompressed) record bytes.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    pub timestamp_delta: i64,
    pub offset_delta: i32,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    headers: &'a [u8],
    header_count: i32,
}

impl<'a> RecordView<'a> {
    /// Parses one record; returns it and the number of bytes it used.
    pub fn parse(buf: &'a [u8]) -> Result<(Self, usize), BatchError> {
        let mut r = Reader { buf, pos: 0 };
        let length = r.varint()?;
        if length < 0 {
            return Err(corrupt("negative record length"));
        }
        let start = r.pos;
        let end = start
            .checked_add(length as usize)
            .filter(|e| *e <= buf.len())
            .ok_or_else(|| corrupt("record length beyond batch end"))?;
        let mut r = Reader {
            buf: &buf[..end],
            pos: start,
        };
        let _attributes = r.take(1)?;
        let timestamp_delta = r.varlong()?;
        let offset_delta = r.varint()?;
        let key = r.nullable_bytes()?;
        let value = r.nullable_bytes()?;
        let header_count = r.varint()?;
        if header_count < 0 {
            return Err(corrupt("negative header count"));
        }
        let headers_start = r.pos;
        for _ in 0..header_count {
            let key_len = r.varint()?;
            if key_len < 0 {
                return Err(corrupt("null header key"));
            }
            r.take(key_len as usize)?;
            r.nullable_bytes()?;
        }
        if r.pos != end {
            return Err(corrupt("record length does not match its fields"));
        }
        let view = RecordView {
            timestamp_delta,
            offset_delta,
            key,
            value,
            headers: &buf[headers_start..end],
            header_count,
        };
        Ok((view, end))
    }

    /// Headers as (key, value) pairs.
    pub fn headers(&self) -> Vec<(&'a [u8], Option<&'a [u8]>)> {
        let mut r = Reader {
            buf: self.headers,
            pos: 0,
        };
        let mut out = Vec::with_capacity(self.header_count as usize);
        for _ in 0..self.header_count {
            // Already validated by parse.
            let key_len = r.varint().unwrap_or(0).max(0) as usize;
            let key = r.take(key_len).unwrap_or_default();
            let value = r.nullable_bytes().unwrap_or(None);
            out.push((key, value));
        }
        out
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BatchError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| corrupt("record field beyond record end"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn varlong(&mut self) -> Result<i64, BatchError> {
        zigzag_at(self.buf, &mut self.pos).ok_or_else(|| {
            // Ten bytes all saying "more follows", or the bytes ran out first.
            let rest = self.buf.get(self.pos..).unwrap_or_default();
            if rest.len() >= 10 && rest[..10].iter().all(|b| b & 0x80 != 0) {
                corrupt("varint too long")
            } else {
                corrupt("truncated varint")
            }
        })
    }
    fn varint(&mut self) -> Result<i32, BatchError> {
        let v = self.varlong()?;
        i32::try_from(v).map_err(|_| corrupt("varint out of range"))
    }
    fn nullable_bytes(&mut self) -> Result<Option<&'a [u8]>, BatchError> {
        let len = self.varint()?;
        if len < 0 {
            return Ok(None);
        }
        self.take(len as usize).map(Some)
    }
}

/// Splits a produce request's record set into batches, validating framing only.
/// Returns (start, end) byte ranges of each batch.
pub fn split_batches(records: &[u8]) -> Result<Vec<(usize, usize)>, BatchError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < records.len() {
        let rest = &records[pos..];
        if rest.len() < HEADER_LEN {
            return Err(corrupt("truncated record batch header"));
        }
        if rest[MAGIC] != 2 {
            return Err(corrupt(format!(
                "message format v{} is not supported, only v2 record batches",
                rest[MAGIC] as i8
            )));
        }
        let len = be_i32(rest, BATCH_LENGTH);
        if len < (HEADER_LEN - LOG_OVERHEAD) as i32 {
            return Err(corrupt(format!("batch length {len} is too small")));
        }
        let total = LOG_OVERHEAD + len as usize;
        if total > rest.len() {
            return Err(corrupt("record batch is truncated"));
        }
        out.push((pos, pos + total));
        pos += total;
    }
    if out.is_empty() {
        return Err(corrupt("empty record set"));
    }
    Ok(out)
}

/// The producer fields of a batch header: who wrote it, with which sequence, in a transaction
/// or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerFields {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub transactional: bool,
}

impl ProducerFields {
    /// A batch from no particular producer (not idempotent, not transactional).
    pub const NONE: ProducerFields = ProducerFields {
        producer_id: -1,
        producer_epoch: -1,
        base_sequence: -1,
        transactional: false,
    };
}

/// Builds one v2 batch record by record into a reusable buffer (the client side of produce).
pub struct BatchBuilder {
    buf: Vec<u8>,
    count: i32,
    base_timestamp: i64,
    max_timestamp: i64,
    producer: ProducerFields,
    control: bool,
}

impl BatchBuilder {
    pub fn new(base_timestamp: i64) -> Self {
        let mut buf = Vec::with_capacity(16 * 1024);
        buf.resize(HEADER_LEN, 0);
        BatchBuilder {
            buf,
            count: 0,
            base_timestamp,
            max_timestamp: base_timestamp,
            producer: ProducerFields::NONE,
            control: false,
        }
    }

    /// Marks the batch as written by an idempotent or transactional producer.
    pub fn with_producer(mut self, producer: ProducerFields) -> Self {
        self.producer = producer;
        self
    }

    pub fn count(&self) -> i32 {
        self.count
    }

    /// Bytes so far (uncompressed).
    pub fn size(&self) -> usize {
        self.buf.len()
    }

    pub fn push(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&[u8], Option<&[u8]>)],
        timestamp: i64,
    ) {
        let ts_delta = timestamp - self.base_timestamp;
        let mut body_len = 1 + varlong_len(ts_delta) + varlong_len(self.count as i64);
        body_len += nullable_len(key) + nullable_len(value) + varlong_len(headers.len() as i64);
        for (k, v) in headers {
            body_len += varlong_len(k.len() as i64) + k.len() + nullable_len(*v);
        }
        put_varlong(&mut self.buf, body_len as i64);
        self.buf.push(0);
        put_varlong(&mut self.buf, ts_delta);
        put_varlong(&mut self.buf, self.count as i64);
        put_nullable(&mut self.buf, key);
        put_nullable(&mut self.buf, value);
        put_varlong(&mut self.buf, headers.len() as i64);
        for (k, v) in headers {
            put_varlong(&mut self.buf, k.len() as i64);
            self.buf.extend_from_slice(k);
            put_nullable(&mut self.buf, *v);
        }
        self.count += 1;
        self.max_timestamp = self.max_timestamp.max(timestamp);
    }

    /// Finishes the batch (compressing its records with `codec`) and returns its bytes.
    pub fn finish(mut self, codec: Compression) -> Vec<u8> {
        if codec != Compression::None {
            let out = compress(codec, &self.buf[HEADER_LEN..]);
            self.buf.truncate(HEADER_LEN);
            self.buf.extend_from_slice(&out);
        }
        let b = &mut self.buf;
        let len = (b.len() - LOG_OVERHEAD) as i32;
        b[BASE_OFFSET..BASE_OFFSET + 8].copy_from_slice(&0i64.to_be_bytes());
        b[BATCH_LENGTH..BATCH_LENGTH + 4].copy_from_slice(&len.to_be_bytes());
        b[LEADER_EPOCH..LEADER_EPOCH + 4].copy_from_slice(&(-1i32).to_be_bytes());
        b[MAGIC] = 2;
        let mut attributes = codec as i16;
        if self.producer.transactional {
            attributes |= ATTR_TRANSACTIONAL;
        }
        if self.control {
            attributes |= ATTR_CONTROL;
        }
        b[ATTRIBUTES..ATTRIBUTES + 2].copy_from_slice(&attributes.to_be_bytes());
        b[LAST_OFFSET_DELTA..LAST_OFFSET_DELTA + 4]
            .copy_from_slice(&(self.count - 1).to_be_bytes());
        b[BASE_TIMESTAMP..BASE_TIMESTAMP + 8].copy_from_slice(&self.base_timestamp.to_be_bytes());
        b[MAX_TIMESTAMP..MAX_TIMESTAMP + 8].copy_from_slice(&self.max_timestamp.to_be_bytes());
        let p = self.producer;
        b[PRODUCER_ID..PRODUCER_ID + 8].copy_from_slice(&p.producer_id.to_be_bytes());
        b[PRODUCER_EPOCH..PRODUCER_EPOCH + 2].copy_from_slice(&p.producer_epoch.to_be_bytes());
        b[BASE_SEQUENCE..BASE_SEQUENCE + 4].copy_from_slice(&p.base_sequence.to_be_bytes());
        b[RECORD_COUNT..RECORD_COUNT + 4].copy_from_slice(&self.count.to_be_bytes());
        let crc = crc32c::crc32c(&b[ATTRIBUTES..]);
        b[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
        self.buf
    }
}

/// A transaction marker: a control batch with one record whose key is (version 0, type) and
/// whose value is (version 0, coordinator epoch), as Kafka writes them.
pub fn marker_batch(
    producer_id: i64,
    producer_epoch: i16,
    commit: bool,
    coordinator_epoch: i32,
    timestamp: i64,
) -> Vec<u8> {
    let mut b = BatchBuilder::new(timestamp).with_producer(ProducerFields {
        producer_id,
        producer_epoch,
        base_sequence: -1,
        transactional: true,
    });
    b.control = true;
    let mut key = [0u8; 4];
    key[2..].copy_from_slice(&i16::from(commit).to_be_bytes());
    let mut value = [0u8; 6];
    value[2..].copy_from_slice(&coordinator_epoch.to_be_bytes());
    b.push(Some(&key), Some(&value), &[], timestamp);
    b.finish(Compression::None)
}

/// Compresses record bytes with a Kafka codec (the `kafka-protocol` crate's compressors).
pub fn compress(codec: Compression, records: &[u8]) -> Vec<u8> {
    use kafka_protocol::compression::Compressor;
    let mut out = bytes::BytesMut::with_capacity(records.len() / 2 + 64);
    let put = |b: &mut bytes::BytesMut| -> anyhow::Result<()> {
        b.extend_from_slice(records);
        Ok(())
    };
    let result = match codec {
        Compression::Gzip => Gzip::compress(&mut out, put),
        Compression::Snappy => Snappy::compress(&mut out, put),
        Compression::Lz4 => Lz4::compress(&mut out, put),
        Compression::Zstd => Zstd::compress(&mut out, put),
        Compression::None => put(&mut out),
    };
    // Compressing into memory has no failure mode short of allocation failure.
    result.expect("in-memory compression");
    out.to_vec()
}

fn codec_of(id: i16) -> Result<Compression, BatchError> {
    Ok(match id {
        0 => Compression::None,
        1 => Compression::Gzip,
        2 => Compression::Snappy,
        3 => Compression::Lz4,
        4 => Compression::Zstd,
        other => return Err(BatchError::UnsupportedCompression(other)),
    })
}

/// What [`retain_records`] made of a batch.
pub enum Retained {
    /// Every record kept: the batch is unchanged.
    All,
    /// No record kept.
    None,
    /// A rebuilt batch holding the kept records with their original offsets and timestamps.
    Some(Vec<u8>),
}

/// Keeps the records for which `keep(offset delta, record)` says yes. Records are copied
/// verbatim (their deltas are relative to the unchanged base offset and timestamp), so offsets
/// never change; only the count, length and CRC of the header are rewritten.
pub fn retain_records(
    batch: &BatchView<'_>,
    mut keep: impl FnMut(&RecordView<'_>) -> bool,
) -> Result<Retained, BatchError> {
    let codec = codec_of(batch.compression_id())?;
    let body = &batch.bytes[HEADER_LEN..];
    let count = batch.record_count();
    let mut filter = |records: &[u8]| -> Result<(Vec<u8>, i32), BatchError> {
        let mut kept = Vec::with_capacity(records.len());
        let mut n = 0;
        let mut pos = 0;
        for _ in 0..count {
            let (r, len) = RecordView::parse(&records[pos..])?;
            if keep(&r) {
                kept.extend_from_slice(&records[pos..pos + len]);
                n += 1;
            }
            pos += len;
        }
        Ok((kept, n))
    };
    let (kept, n) = match codec {
        Compression::None => filter(body)?,
        c => decompress_then(c, body, filter)?,
    };
    if n == count {
        return Ok(Retained::All);
    }
    if n == 0 {
        return Ok(Retained::None);
    }
    let records = if codec == Compression::None {
        kept
    } else {
        compress(codec, &kept)
    };
    let mut out = Vec::with_capacity(HEADER_LEN + records.len());
    out.extend_from_slice(&batch.bytes[..HEADER_LEN]);
    out.extend_from_slice(&records);
    let len = (out.len() - LOG_OVERHEAD) as i32;
    out[BATCH_LENGTH..BATCH_LENGTH + 4].copy_from_slice(&len.to_be_bytes());
    out[RECORD_COUNT..RECORD_COUNT + 4].copy_from_slice(&n.to_be_bytes());
    let crc = crc32c::crc32c(&out[ATTRIBUTES..]);
    out[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
    Ok(Retained::Some(out))
}

fn varlong_len(v: i64) -> usize {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    let mut n = 1;
    while z >= 0x80 {
        z >>= 7;
        n += 1;
    }
    n
}

fn put_varlong(buf: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        buf.push((z as u8) | 0x80);
        z >>= 7;
    }
    buf.push(z as u8);
}

fn nullable_len(b: Option<&[u8]>) -> usize {
    match b {
        None => 1,
        Some(b) => varlong_len(b.len() as i64) + b.len(),
    }
}

fn put_nullable(buf: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => put_varlong(buf, -1),
        Some(b) => {
            put_varlong(buf, b.len() as i64);
            buf.extend_from_slice(b);
        }
    }
}

/// The complete batches at the start of `records`; a fetch may end with a cut-off batch.
pub fn complete_batches(records: &[u8]) -> impl Iterator<Item = BatchView<'_>> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        let rest = records.get(pos..)?;
        if rest.len() < HEADER_LEN {
            return None;
        }
        let total = LOG_OVERHEAD + usize::try_from(be_i32(rest, BATCH_LENGTH)).ok()?;
        if total < HEADER_LEN || total > rest.len() {
            return None;
        }
        pos += total;
        Some(BatchView::new(&rest[..total]))
    })
}

#[cfg(test)]
pub mod test_support {
    //! Builds real batches with the `kafka-protocol` encoder for tests.
    use bytes::{Bytes, BytesMut};
    use indexmap::IndexMap;
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };

    pub fn batch(values: &[&[u8]], compression: Compression, timestamp: i64) -> Vec<u8> {
        let records: Vec<Record> = values
            .iter()
            .enumerate()
            .map(|(i, v)| Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: -1,
                producer_id: -1,
                producer_epoch: -1,
                timestamp_type: TimestampType::Creation,
                offset: i as i64,
                // The encoder keeps records in one batch while offset - sequence is constant.
                sequence: i as i32 - 1,
                timestamp: timestamp + i as i64,
                key: Some(Bytes::from(format!("k{i}"))),
                value: Some(Bytes::copy_from_slice(v)),
                headers: IndexMap::from([(
                    StrBytes::from_static_str("h"),
                    Some(Bytes::from_static(b"v")),
                )]),
            })
            .collect();
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            &records,
            &RecordEncodeOptions {
                version: 2,
                compression,
            },
        )
        .unwrap();
        buf.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::batch;
    use super::*;

    #[test]
    fn stamped_batches_change_only_their_header_copies_and_write_what_a_stamped_copy_holds() {
        let mut all = batch(&[b"a", b"b"], Compression::None, 10);
        all.extend(batch(&[b"c"], Compression::Gzip, 20));
        all.extend(batch(&[b"d", b"e", b"f"], Compression::None, 30));
        let original = all.clone();
        let ranges = split_batches(&all).unwrap();
        let mut stamped = StampedBatches::new(&all, &ranges);
        let mut expected = all.clone();
        for (i, &(s, e)) in ranges.iter().enumerate() {
            stamped.stamp(i, 100 + 10 * i as i64, 7);
            stamp(&mut expected[s..e], 100 + 10 * i as i64, 7);
        }
        assert_eq!(stamped.count(), 3);
        for (i, &(s, e)) in ranges.iter().enumerate() {
            assert_eq!(stamped.position(i), s);
            assert_eq!(stamped.to_vec(i), &expected[s..e]);
            let header = stamped.header(i);
            assert_eq!(header.base_offset(), 100 + 10 * i as i64);
            assert_eq!(header.leader_epoch(), 7);
            assert_eq!(
                header.next_offset(),
                BatchView::new(&expected[s..e]).next_offset()
            );
        }
        let written: Vec<u8> = stamped
            .io_slices()
            .iter()
            .flat_map(|p| p.to_vec())
            .collect();
        assert_eq!(written, expected);
        // The stamps never reach the borrowed bytes.
        assert_eq!(all, original);
    }

    #[test]
    fn validates_every_codec() {
        assert_eq!(
            split_batches(&batch(&[b"a", b"b"], Compression::None, 0))
                .unwrap()
                .len(),
            1
        );
        for codec in [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let b = batch(&[b"one", b"two", b"three"], codec, 1_000);
            let view = BatchView::new(&b);
            view.validate_incoming().unwrap();
            assert_eq!(view.record_count(), 3);
            let mut values = vec![];
            view.for_each_record(|r| values.push(r.value.unwrap().to_vec()))
                .unwrap();
            assert_eq!(
                values,
                vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
            );
        }
    }

    #[test]
    fn builder_output_decodes_with_the_crate() {
        use kafka_protocol::records::RecordBatchDecoder;
        for codec in [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let mut b = BatchBuilder::new(1_000);
            b.push(Some(b"k1"), Some(b"v1"), &[(b"h", Some(b"x"))], 1_000);
            b.push(None, Some(&[7u8; 300]), &[], 1_005);
            b.push(Some(b""), None, &[], 999);
            let bytes = b.finish(codec);
            BatchView::new(&bytes).validate_incoming().unwrap();
            let set = RecordBatchDecoder::decode(&mut Bytes::from(bytes)).unwrap();
            assert_eq!(set.records.len(), 3);
            assert_eq!(set.records[0].key.as_deref(), Some(&b"k1"[..]));
            assert_eq!(set.records[0].headers.len(), 1);
            assert_eq!(set.records[1].value.as_deref(), Some(&[7u8; 300][..]));
            assert_eq!(set.records[1].timestamp, 1_005);
            assert_eq!(set.records[2].value, None);
            assert_eq!(set.records[2].timestamp, 999);
        }
    }

    #[test]
    fn retain_keeps_offsets_and_crc() {
        for codec in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let mut b = BatchBuilder::new(100);
            for i in 0..5u8 {
                b.push(Some(&[b'k', i]), Some(&[i; 10]), &[], 100 + i as i64);
            }
            let mut bytes = b.finish(codec);
            stamp(&mut bytes, 40, 0);
            let view = BatchView::new(&bytes);
            let Retained::Some(out) = retain_records(&view, |r| r.offset_delta % 2 == 0).unwrap()
            else {
                panic!("expected a rebuilt batch")
            };
            let v = BatchView::new(&out);
            v.check_integrity().unwrap();
            assert_eq!(v.record_count(), 3);
            assert_eq!(v.next_offset(), 45);
            let mut seen = vec![];
            v.for_each_record(|r| {
                seen.push((v.base_offset() + r.offset_delta as i64, r.value.unwrap()[0]))
            })
            .unwrap();
            assert_eq!(seen, vec![(40, 0), (42, 2), (44, 4)]);
            assert!(matches!(
                retain_records(&view, |_| true).unwrap(),
                Retained::All
            ));
            assert!(matches!(
                retain_records(&view, |_| false).unwrap(),
                Retained::None
            ));
        }
    }

    #[test]
    fn compacted_topics_require_keys() {
        let mut b = BatchBuilder::new(0);
        b.push(None, Some(b"v"), &[], 0);
        let bytes = b.finish(Compression::None);
        assert!(BatchView::new(&bytes).validate_incoming().is_ok());
        assert!(matches!(
            BatchView::new(&bytes).validate_incoming_with(true),
            Err(BatchError::InvalidRecord(_))
        ));
    }

    #[test]
    fn rejects_flipped_byte() {
        let mut b = batch(&[b"payload"], Compression::None, 0);
        let last = b.len() - 2;
        b[last] ^= 0xff;
        assert!(matches!(
            BatchView::new(&b).validate_incoming(),
            Err(BatchError::Corrupt(_))
        ));
    }

    #[test]
    fn stamping_keeps_crc_valid() {
        let mut b = batch(&[b"x"], Compression::Lz4, 0);
        stamp(&mut b, 42, 7);
        let view = BatchView::new(&b);
        view.check_integrity().unwrap();
        assert_eq!(view.base_offset(), 42);
        assert_eq!(view.leader_epoch(), 7);
    }

    #[test]
    fn split_rejects_truncation() {
        let b = batch(&[b"abc"], Compression::None, 0);
        assert_eq!(split_batches(&b).unwrap(), vec![(0, b.len())]);
        assert!(split_batches(&b[..b.len() - 1]).is_err());
        assert!(split_batches(&b[..10]).is_err());
    }

    /// A record to build: its key, its value, and whether it carries headers.
    type TestRecord = (Option<Vec<u8>>, Vec<u8>, bool);

    /// Records as a producer would send them: some keys null, headers on some, values whose
    /// lengths take one, two or three bytes.
    fn records_body(records: &[TestRecord]) -> Vec<u8> {
        let mut b = BatchBuilder::new(1_000);
        for (i, (key, value, header)) in records.iter().enumerate() {
            let headers: &[(&[u8], Option<&[u8]>)] = if *header {
                &[(b"trace", Some(b"abc")), (b"empty", None)]
            } else {
                &[]
            };
            b.push(key.as_deref(), Some(value), headers, 1_000 + 7 * i as i64);
        }
        b.finish(Compression::None)[HEADER_LEN..].to_vec()
    }

    #[test]
    fn a_record_longer_than_its_fields_is_refused() {
        let mut body = records_body(&[(Some(b"k".to_vec()), b"v".to_vec(), true)]);
        assert!(records_well_formed(&body, 1, false));
        // One more byte in the record's length (a one-byte varint here), and that byte after
        // its fields.
        assert!(body[0] < 0x7e);
        body[0] += 2;
        body.push(0);
        assert!(!records_well_formed(&body, 1, false));
        let e = explain_records(&body, 1, false).unwrap_err().to_string();
        assert!(e.contains("record length does not match its fields"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(2000))]
        /// The fast walk and the explaining walk agree on every input: valid records, and the
        /// same with a byte nudged (a length, count or delta off by a little) or cut short.
        #[test]
        fn the_fast_record_walk_accepts_exactly_what_the_explaining_walk_accepts(
            records in proptest::collection::vec(
                (
                    proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..20)),
                    proptest::prop_oneof![
                        proptest::collection::vec(proptest::num::u8::ANY, 0..200),
                        proptest::collection::vec(proptest::num::u8::ANY, 8000..8300),
                    ],
                    proptest::bool::ANY,
                ),
                1..6,
            ),
            change in proptest::option::of((proptest::num::usize::ANY, -3i8..=3)),
            cut in proptest::option::of(proptest::num::usize::ANY),
            require_keys in proptest::bool::ANY,
        ) {
            let mut body = records_body(&records);
            let count = records.len() as i32;
            if change.is_none() && cut.is_none() {
                let keyed = records.iter().all(|r| r.0.is_some());
                proptest::prop_assert_eq!(records_well_formed(&body, count, require_keys), keyed || !require_keys);
            }
            if let Some((at, delta)) = change {
                let at = at % body.len();
                body[at] = body[at].wrapping_add_signed(delta);
            }
            if let Some(cut) = cut {
                body.truncate(cut % (body.len() + 1));
            }
            proptest::prop_assert_eq!(
                records_well_formed(&body, count, require_keys),
                explain_records(&body, count, require_keys).is_ok()
            );
        }

        #[test]
        fn parse_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = RecordView::parse(&data);
            if let Ok(ranges) = split_batches(&data) {
                for (s, e) in ranges {
                    let _ = BatchView::new(&data[s..e]).validate_incoming();
                }
            }
        }
    }
}
