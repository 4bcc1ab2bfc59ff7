//! One segment of a partition log: `<base>.log` with its sparse `.index` and `.timeindex`.
//!
//! The offset index holds (relative offset u32, file position u32) big-endian pairs; the time
//! index holds (timestamp i64, relative offset u32) where the timestamp is the largest one of all
//! records *before* that offset. Both get an entry every `index.interval.bytes` of log, are kept
//! in memory and are appended to their files when the segment is flushed. An index that cannot
//! be trusted (the segment was not cleanly flushed) is rebuilt from the log by recovery.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, IoSlice, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::batch::{BatchView, HEADER_LEN, LOG_OVERHEAD};

const OFFSET_ENTRY: usize = 8;
const TIME_ENTRY: usize = 12;
/// Bytes of a batch header needed to walk the log (up to and including max timestamp).
const WALK_HEADER: usize = 43;

pub fn file_stem(base_offset: i64) -> String {
    format!("{base_offset:020}")
}

pub fn log_path(dir: &Path, base_offset: i64) -> PathBuf {
    dir.join(format!("{}.log", file_stem(base_offset)))
}

/// What one appended batch contributes to the indexes.
#[derive(Debug, Clone, Copy)]
pub struct AppendedBatch {
    pub base_offset: i64,
    pub next_offset: i64,
    pub max_timestamp: i64,
    /// Position of the batch relative to the start of the appended chunk.
    pub chunk_pos: u64,
}

/// Writes `parts` one after another at `pos` with `pwritev`, as many at a time as the kernel
/// takes, going on after a short write. `parts` is used up on the way (advanced past what was
/// written).
fn write_all_vectored_at(file: &File, parts: &mut [IoSlice<'_>], mut pos: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    /// The most slices one `pwritev` accepts (Linux's IOV_MAX).
    const MAX_SLICES: usize = 1024;
    let mut rest = parts;
    IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        let n = rest.len().min(MAX_SLICES);
        // SAFETY: IoSlice has the layout of `struct iovec` on Unix, and the n slices it points
        // to are borrowed for the duration of the call.
        let written = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                rest.as_ptr().cast::<libc::iovec>(),
                n as libc::c_int,
                pos as libc::off_t,
            )
        };
        if written < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        pos += written as u64;
        IoSlice::advance_slices(&mut rest, written as usize);
    }
    Ok(())
}

pub struct Segment {
    pub base_offset: i64,
    dir: PathBuf,
    file: Arc<File>,
    size: u64,
    next_offset: i64,
    max_timestamp: i64,
    offset_index: Vec<(u32, u32)>,
    time_index: Vec<(i64, u32)>,
    offset_index_persisted: usize,
    time_index_persisted: usize,
    bytes_since_index: u64,
    index_interval: u64,
    first_append: Option<Instant>,
    /// Written since the last fsync.
    dirty: bool,
}

/// The shape of the batch found at a file position while walking a segment.
#[derive(Debug, Clone, Copy)]
struct HeaderAt {
    pos: u64,
    next_offset: i64,
    len: u64,
    max_timestamp: i64,
}

impl Segment {
    /// Creates a new, empty segment file.
    pub fn create(dir: &Path, base_offset: i64, index_interval: u64) -> io::Result<Segment> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(log_path(dir, base_offset))?;
        for ext in ["index", "timeindex"] {
            File::create(dir.join(format!("{}.{ext}", file_stem(base_offset))))?;
        }
        Ok(Segment {
            base_offset,
            dir: dir.to_path_buf(),
            file: Arc::new(file),
            size: 0,
            next_offset: base_offset,
            max_timestamp: -1,
            offset_index: Vec::new(),
            time_index: Vec::new(),
            offset_index_persisted: 0,
            time_index_persisted: 0,
            bytes_since_index: 0,
            index_interval,
            first_append: None,
            dirty: true,
        })
    }

    /// Opens an existing segment. With `trusted`, the segment was fully flushed before the last
    /// shutdown and its index files are used; otherwise every batch is validated by CRC, a torn
    /// or corrupt tail is truncated away, and the indexes are rebuilt.
    /// Returns the segment and the number of bytes truncated.
    pub fn open(
        dir: &Path,
        base_offset: i64,
        index_interval: u64,
        trusted: bool,
    ) -> io::Result<(Segment, u64)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(log_path(dir, base_offset))?;
        let file_len = file.metadata()?.len();
        let mut seg = Segment {
            base_offset,
            dir: dir.to_path_buf(),
            file: Arc::new(file),
            size: file_len,
            next_offset: base_offset,
            max_timestamp: -1,
            offset_index: Vec::new(),
            time_index: Vec::new(),
            offset_index_persisted: 0,
            time_index_persisted: 0,
            bytes_since_index: 0,
            index_interval,
            first_append: None,
            dirty: false,
        };
        if trusted && seg.load_indexes().is_ok() {
            return Ok((seg, 0));
        }
        let truncated = seg.recover()?;
        Ok((seg, truncated))
    }

    fn index_path(&self, ext: &str) -> PathBuf {
        self.dir
            .join(format!("{}.{ext}", file_stem(self.base_offset)))
    }

    /// Loads the index files and derives the segment's end from the last indexed batch.
    fn load_indexes(&mut self) -> io::Result<()> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let raw = std::fs::read(self.index_path("index"))?;
        if raw.len() % OFFSET_ENTRY != 0 {
            return Err(bad("offset index has a partial entry"));
        }
        let mut offsets = Vec::with_capacity(raw.len() / OFFSET_ENTRY);
        for e in raw.chunks_exact(OFFSET_ENTRY) {
            let rel = u32::from_be_bytes(e[0..4].try_into().unwrap());
            let pos = u32::from_be_bytes(e[4..8].try_into().unwrap());
            if offsets.last().is_some_and(|&(r, p)| r >= rel || p >= pos) || pos as u64 >= self.size
            {
                return Err(bad("offset index is not monotonic"));
            }
            offsets.push((rel, pos));
        }
        let raw = std::fs::read(self.index_path("timeindex"))?;
        if raw.len() % TIME_ENTRY != 0 {
            return Err(bad("time index has a partial entry"));
        }
        let mut times = Vec::with_capacity(raw.len() / TIME_ENTRY);
        for e in raw.chunks_exact(TIME_ENTRY) {
            let ts = i64::from_be_bytes(e[0..8].try_into().unwrap());
            let rel = u32::from_be_bytes(e[8..12].try_into().unwrap());
            times.push((ts, rel));
        }
        // Walk from the last index entry to the end to learn next offset and max timestamp.
        let start = offsets.last().map(|&(_, p)| p as u64).unwrap_or(0);
        let mut pos = start;
        let mut next = self.base_offset;
        let mut max_ts = times.last().map(|&(t, _)| t).unwrap_or(-1);
        while pos < self.size {
            let h = self
                .header_at(pos)?
                .ok_or_else(|| bad("segment ends inside a batch"))?;
            next = h.next_offset;
            max_ts = max_ts.max(h.max_timestamp);
            pos += h.len;
        }
        if pos != self.size {
            return Err(bad("segment ends inside a batch"));
        }
        self.next_offset = next;
        self.max_timestamp = max_ts;
        self.bytes_since_index = self.size - start;
        self.offset_index_persisted = offsets.len();
        self.time_index_persisted = times.len();
        self.offset_index = offsets;
        self.time_index = times;
        Ok(())
    }

    /// Validates every batch by CRC, truncates at the first bad one and rebuilds the indexes.
    fn recover(&mut self) -> io::Result<u64> {
        let file_len = self.size;
        self.offset_index.clear();
        self.time_index.clear();
        self.bytes_since_index = 0;
        self.next_offset = self.base_offset;
        self.max_timestamp = -1;
        let file = self.file.clone();
        // All writes are positional; only recovery uses the cursor, so start it at 0.
        (&*file).seek(SeekFrom::Start(0))?;
        let mut reader = BufReader::with_capacity(1 << 20, &*file);
        let mut pos = 0u64;
        let mut buf = Vec::new();
        loop {
            let mut head = [0u8; LOG_OVERHEAD];
            if read_full(&mut reader, &mut head)? < LOG_OVERHEAD {
                break;
            }
            let len = i32::from_be_bytes(head[8..12].try_into().unwrap());
            if len < (HEADER_LEN - LOG_OVERHEAD) as i32
                || pos + LOG_OVERHEAD as u64 + len as u64 > file_len
            {
                break;
            }
            buf.clear();
            buf.extend_from_slice(&head);
            buf.resize(LOG_OVERHEAD + len as usize, 0);
            if read_full(&mut reader, &mut buf[LOG_OVERHEAD..])? < len as usize {
                break;
            }
            let view = BatchView::new(&buf);
            if view.check_integrity().is_err() || view.base_offset() < self.next_offset {
                break;
            }
            let batch = AppendedBatch {
                base_offset: view.base_offset(),
                next_offset: view.next_offset(),
                max_timestamp: view.max_timestamp(),
                chunk_pos: 0,
            };
            self.index_batch(pos, buf.len() as u64, &batch);
            pos += buf.len() as u64;
        }
        drop(reader);
        self.size = pos;
        let truncated = file_len - pos;
        if truncated > 0 {
            self.file.set_len(pos)?;
        }
        self.rewrite_indexes()?;
        Ok(truncated)
    }

    /// Adds index entries for a batch of `len` bytes at file position `pos`.
    fn index_batch(&mut self, pos: u64, len: u64, batch: &AppendedBatch) {
        if self.offset_index.is_empty() || self.bytes_since_index >= self.index_interval {
            let rel = (batch.base_offset - self.base_offset) as u32;
            self.offset_index.push((rel, pos as u32));
            if self.max_timestamp >= 0
                && self
                    .time_index
                    .last()
                    .is_none_or(|&(t, _)| t < self.max_timestamp)
            {
                self.time_index.push((self.max_timestamp, rel));
            }
            self.bytes_since_index = 0;
        }
        self.bytes_since_index += len;
        self.next_offset = batch.next_offset;
        self.max_timestamp = self.max_timestamp.max(batch.max_timestamp);
    }

    /// Writes a chunk of already-validated, stamped batches, given as the pieces it is made
    /// of (used up by the write), at the current end, and indexes them.
    pub fn append(
        &mut self,
        parts: &mut [IoSlice<'_>],
        batches: &[AppendedBatch],
    ) -> io::Result<()> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        write_all_vectored_at(&self.file, parts, self.size)?;
        let start = self.size;
        for (i, b) in batches.iter().enumerate() {
            let end = batches.get(i + 1).map(|n| n.chunk_pos).unwrap_or(len);
            self.index_batch(start + b.chunk_pos, end - b.chunk_pos, b);
        }
        self.size += len;
        self.dirty = true;
        self.first_append.get_or_insert_with(Instant::now);
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }
    pub fn max_timestamp(&self) -> i64 {
        self.max_timestamp
    }
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }
    pub fn age(&self) -> Option<std::time::Duration> {
        self.first_append.map(|t| t.elapsed())
    }
    /// True when appending `extra` more bytes or offsets would overflow this segment's indexes.
    pub fn would_overflow(&self, extra_bytes: u64, last_offset: i64) -> bool {
        self.size + extra_bytes > u32::MAX as u64
            || last_offset - self.base_offset > u32::MAX as i64
    }

    /// Takes the "written since fsync" mark, returning the file to fsync if it was set.
    pub fn take_dirty(&mut self) -> Option<Arc<File>> {
        std::mem::take(&mut self.dirty).then(|| self.file.clone())
    }

    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Appends index entries added since the last call to the index files.
    pub fn persist_indexes(&mut self) -> io::Result<()> {
        if self.offset_index.len() > self.offset_index_persisted {
            let mut out = Vec::with_capacity(
                (self.offset_index.len() - self.offset_index_persisted) * OFFSET_ENTRY,
            );
            for &(rel, pos) in &self.offset_index[self.offset_index_persisted..] {
                out.extend_from_slice(&rel.to_be_bytes());
                out.extend_from_slice(&pos.to_be_bytes());
            }
            let f = OpenOptions::new()
                .write(true)
                .open(self.index_path("index"))?;
            f.write_all_at(&out, (self.offset_index_persisted * OFFSET_ENTRY) as u64)?;
            f.sync_data()?;
            self.offset_index_persisted = self.offset_index.len();
        }
        if self.time_index.len() > self.time_index_persisted {
            let mut out = Vec::with_capacity(
                (self.time_index.len() - self.time_index_persisted) * TIME_ENTRY,
            );
            for &(ts, rel) in &self.time_index[self.time_index_persisted..] {
                out.extend_from_slice(&ts.to_be_bytes());
                out.extend_from_slice(&rel.to_be_bytes());
            }
            let f = OpenOptions::new()
                .write(true)
                .open(self.index_path("timeindex"))?;
            f.write_all_at(&out, (self.time_index_persisted * TIME_ENTRY) as u64)?;
            f.sync_data()?;
            self.time_index_persisted = self.time_index.len();
        }
        Ok(())
    }

    fn rewrite_indexes(&mut self) -> io::Result<()> {
        for ext in ["index", "timeindex"] {
            File::create(self.index_path(ext))?;
        }
        self.offset_index_persisted = 0;
        self.time_index_persisted = 0;
        self.persist_indexes()
    }

    fn header_at(&self, pos: u64) -> io::Result<Option<HeaderAt>> {
        if pos + WALK_HEADER as u64 > self.size {
            return Ok(None);
        }
        let mut h = [0u8; WALK_HEADER];
        self.file.read_exact_at(&mut h, pos)?;
        let base_offset = i64::from_be_bytes(h[0..8].try_into().unwrap());
        let len = i32::from_be_bytes(h[8..12].try_into().unwrap());
        if len < (HEADER_LEN - LOG_OVERHEAD) as i32 {
            return Ok(None);
        }
        let last_delta = i32::from_be_bytes(h[23..27].try_into().unwrap());
        let max_timestamp = i64::from_be_bytes(h[35..43].try_into().unwrap());
        Ok(Some(HeaderAt {
            pos,
            next_offset: base_offset + last_delta as i64 + 1,
            len: LOG_OVERHEAD as u64 + len as u64,
            max_timestamp,
        }))
    }

    /// Walks batches from `start` until `stop` says yes; returns that batch's header.
    fn walk_from(
        &self,
        start: u64,
        mut stop: impl FnMut(&HeaderAt) -> bool,
    ) -> io::Result<Option<HeaderAt>> {
        let mut pos = start;
        while let Some(h) = self.header_at(pos)? {
            if stop(&h) {
                return Ok(Some(h));
            }
            pos += h.len;
        }
        Ok(None)
    }

    /// Calls `f` with the header (the first HEADER_LEN bytes), file position and length of every
    /// batch from the one holding `offset` to the end of the segment.
    pub fn scan_headers(
        &self,
        offset: i64,
        mut f: impl FnMut(&[u8], u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let Some((mut pos, _)) = self.locate_offset(offset)? else {
            return Ok(());
        };
        let mut header = [0u8; HEADER_LEN];
        while pos + HEADER_LEN as u64 <= self.size {
            self.file.read_exact_at(&mut header, pos)?;
            let len =
                LOG_OVERHEAD as u64 + i32::from_be_bytes(header[8..12].try_into().unwrap()) as u64;
            f(&header, pos, len)?;
            pos += len;
        }
        Ok(())
    }

    /// File position of the batch holding `offset` (or the first batch after it), and that
    /// batch's length; None when no batch in this segment ends after `offset`.
    pub fn locate_offset(&self, offset: i64) -> io::Result<Option<(u64, u64)>> {
        let rel = (offset - self.base_offset).max(0) as u32;
        let idx = self.offset_index.partition_point(|&(r, _)| r <= rel);
        let start = if idx == 0 {
            0
        } else {
            self.offset_index[idx - 1].1 as u64
        };
        Ok(self
            .walk_from(start, |h| h.next_offset > offset)?
            .map(|h| (h.pos, h.len)))
    }

    /// The end of the last whole batch that ends by `limit`, walking from `pos` (a batch
    /// boundary); `pos` itself when not even the first batch fits.
    pub fn whole_batches_end(&self, pos: u64, limit: u64) -> io::Result<u64> {
        let limit = limit.min(self.size);
        // Index entries are batch boundaries: walk only from the last one before the limit.
        let idx = self
            .offset_index
            .partition_point(|&(_, p)| p as u64 <= limit);
        let mut at = match idx {
            0 => pos,
            i => (self.offset_index[i - 1].1 as u64).max(pos),
        };
        while let Some(h) = self.header_at(at)? {
            if at + h.len > limit {
                break;
            }
            at += h.len;
        }
        Ok(at)
    }

    /// Position and base offset of the first batch whose max timestamp is >= `ts`.
    pub fn locate_timestamp(&self, ts: i64) -> io::Result<Option<(u64, u64)>> {
        let idx = self.time_index.partition_point(|&(t, _)| t < ts);
        let start = if idx == 0 {
            0
        } else {
            let rel = self.time_index[idx - 1].1;
            let i = self.offset_index.partition_point(|&(r, _)| r <= rel);
            if i == 0 {
                0
            } else {
                self.offset_index[i - 1].1 as u64
            }
        };
        Ok(self
            .walk_from(start, |h| h.max_timestamp >= ts)?
            .map(|h| (h.pos, h.len)))
    }

    /// Reads `len` bytes at `pos` (bounded by the segment end).
    pub fn read_at(&self, pos: u64, len: u64) -> io::Result<Vec<u8>> {
        let len = len.min(self.size.saturating_sub(pos)) as usize;
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, pos)?;
        Ok(buf)
    }

    /// Cuts the segment at `pos` (a batch boundary) and rebuilds its indexes.
    pub fn truncate_to_position(&mut self, pos: u64) -> io::Result<()> {
        self.file.set_len(pos)?;
        self.size = pos;
        self.recover()?;
        self.dirty = true;
        Ok(())
    }

    /// Removes the segment's files.
    pub fn delete_files(&self) {
        for ext in ["log", "index", "timeindex"] {
            let _ = std::fs::remove_file(self.index_path(ext));
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vectored_write_of_more_slices_than_one_call_takes_lands_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        file.write_all_at(b"kept", 0).unwrap();
        // 3000 pieces of 0 to 6 bytes: empty ones too, and three calls' worth of slices.
        let pieces: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| (0..i % 7).map(|j| (i + j) as u8).collect())
            .collect();
        let mut parts: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
        write_all_vectored_at(&file, &mut parts, 4).unwrap();
        let mut back = Vec::new();
        BufReader::new(&file).read_to_end(&mut back).unwrap();
        assert_eq!(&back[..4], b"kept");
        assert_eq!(back[4..], pieces.concat());
    }
}
