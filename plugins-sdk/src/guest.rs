//! The module side of the ABI: what the `export_*!` macros' exported functions do. Plugin code
//! does not call this directly; [`crate::testing`] runs the same code natively.

use std::cell::RefCell;

use crate::abi::{encode_failure, BatchReader, OutputWriter, RecordView, STATUS_OK};
use crate::{Config, Error, Header, Record};

/// A filter keeps the records for which it returns `true`.
pub type FilterFn = fn(&Record) -> Result<bool, Error>;
/// A map turns each record into one record.
pub type MapFn = fn(Record) -> Result<Record, Error>;
/// A flat-map turns each record into zero or more records.
pub type FlatMapFn = fn(Record) -> Result<Vec<Record>, Error>;
/// Called once per instance, before any record, with the plugin's config.
pub type InitFn = fn(&Config) -> Result<(), Error>;

/// The kind of transform a module exports, with the author's function.
#[derive(Clone, Copy)]
pub enum Transform {
    Filter(FilterFn),
    Map(MapFn),
    FlatMap(FlatMapFn),
}

impl Transform {
    /// Runs the author's function on one record and writes its result; the records written are
    /// handed back to `pool` for the next inputs.
    fn apply(&self, index: u32, record: Record, w: &mut OutputWriter<'_>, pool: &mut Pool) {
        match self {
            Transform::Filter(f) => match f(&record) {
                Ok(true) => {
                    w.record(index, &record);
                    pool.recycle(record);
                }
                Ok(false) => pool.recycle(record),
                Err(e) => {
                    w.error(index, e.message());
                    pool.recycle(record);
                }
            },
            Transform::Map(f) => match f(record) {
                Ok(r) => {
                    w.record(index, &r);
                    pool.recycle(r);
                }
                Err(e) => w.error(index, e.message()),
            },
            Transform::FlatMap(f) => match f(record) {
                Ok(rs) => {
                    for r in rs {
                        w.record(index, &r);
                        pool.recycle(r);
                    }
                }
                Err(e) => w.error(index, e.message()),
            },
        }
    }
}

/// Buffers of records already written to the output, reused for the next records decoded, so
/// that a batch costs no allocation per record once the pool is warm (a plain map hands every
/// buffer back). Bounded in count and in the size of the buffers it keeps.
#[derive(Default)]
struct Pool {
    bytes: Vec<Vec<u8>>,
    strings: Vec<String>,
    headers: Vec<Vec<Header>>,
    /// The capacity of the byte buffers and strings kept, in bytes.
    kept: usize,
}

const POOL_MAX_BUFFERS: usize = 4096;
const POOL_MAX_BUFFER_BYTES: usize = 64 << 10;
/// At most this much memory is kept for reuse, whatever the transform hands back (a flat-map
/// hands back more buffers than it took), so the pool never eats into the module's memory cap.
const POOL_MAX_BYTES: usize = 2 << 20;

impl Pool {
    fn bytes(&mut self, src: &[u8]) -> Vec<u8> {
        let mut b = self.bytes.pop().unwrap_or_default();
        self.kept -= b.capacity();
        b.clear();
        b.extend_from_slice(src);
        b
    }

    fn string(&mut self, src: &str) -> String {
        let mut s = self.strings.pop().unwrap_or_default();
        self.kept -= s.capacity();
        s.clear();
        s.push_str(src);
        s
    }

    fn record(&mut self, v: &RecordView<'_>) -> Record {
        let mut headers = match v.headers.is_empty() {
            true => Vec::new(),
            false => self.headers.pop().unwrap_or_default(),
        };
        for (name, value) in &v.headers {
            let name = self.string(name);
            let value = value.map(|x| self.bytes(x));
            headers.push(Header { name, value });
        }
        Record {
            key: v.key.map(|k| self.bytes(k)),
            value: v.value.map(|x| self.bytes(x)),
            headers,
            timestamp: v.timestamp,
            topic: v.topic.map(|t| self.string(t)),
            partition: v.partition,
            offset: v.offset,
        }
    }

    fn has_room(&self, count: usize, capacity: usize) -> bool {
        count < POOL_MAX_BUFFERS
            && capacity <= POOL_MAX_BUFFER_BYTES
            && self.kept + capacity <= POOL_MAX_BYTES
    }

    fn keep_bytes(&mut self, b: Vec<u8>) {
        if self.has_room(self.bytes.len(), b.capacity()) {
            self.kept += b.capacity();
            self.bytes.push(b);
        }
    }

    fn keep_string(&mut self, s: String) {
        if self.has_room(self.strings.len(), s.capacity()) {
            self.kept += s.capacity();
            self.strings.push(s);
        }
    }

    fn recycle(&mut self, r: Record) {
        let Record {
            key,
            value,
            mut headers,
            topic,
            ..
        } = r;
        key.into_iter()
            .chain(value)
            .for_each(|b| self.keep_bytes(b));
        if let Some(t) = topic {
            self.keep_string(t);
        }
        if headers.capacity() > 0 {
            for h in headers.drain(..) {
                self.keep_string(h.name);
                if let Some(v) = h.value {
                    self.keep_bytes(v);
                }
            }
            if self.headers.len() < POOL_MAX_BUFFERS {
                self.headers.push(headers);
            }
        }
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// Run `t` over an encoded input batch, writing the encoded output into `out` (cleared first).
pub fn process_batch(t: &Transform, input: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let reader = match BatchReader::new(input) {
        Ok(r) => r,
        Err(e) => {
            encode_failure(
                out,
                &format!("the plugin could not decode its input batch: {e}"),
            );
            return;
        }
    };
    // An output is about as large as its input for most transforms: grow once, not per record.
    out.reserve(input.len());
    let mut failure = None;
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let mut w = OutputWriter::new(out);
        for (i, rec) in reader.enumerate() {
            match rec {
                Ok(v) => {
                    let r = pool.record(&v);
                    t.apply(i as u32, r, &mut w, &mut pool);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() {
            w.finish();
        }
    });
    if let Some(e) = failure {
        out.clear();
        encode_failure(
            out,
            &format!("the plugin could not decode its input batch: {e}"),
        );
    }
}

/// Parse the config and run the author's init function (if any), writing the init result.
pub fn init_with(f: Option<InitFn>, config_json: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let result = Config::from_json(config_json).and_then(|c| match f {
        Some(f) => f(&c),
        None => Ok(()),
    });
    match result {
        Ok(()) => out.push(STATUS_OK),
        Err(e) => encode_failure(out, e.message()),
    }
}

#[cfg(target_arch = "wasm32")]
pub(crate) mod host {
    #[link(wasm_import_module = "weir")]
    extern "C" {
        /// Log `len` bytes of UTF-8 at `ptr` at `level` (1 error .. 5 trace).
        pub fn log(level: u32, ptr: *const u8, len: u32);
        /// Tell the host why the module is about to trap (a panic message).
        pub fn panic(ptr: *const u8, len: u32);
    }
}

/// The bodies of the exported functions, for wasm32 only.
#[cfg(target_arch = "wasm32")]
pub mod exports {
    use std::cell::RefCell;

    use super::{init_with, process_batch, InitFn, Transform};
    use crate::abi::{encode_failure, pack_ptr_len};

    thread_local! {
        // The input buffer handed out by weir_alloc, and the output of the last call. Both are
        // reused across calls, so a batch costs no allocation here once they have grown.
        static INPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        static OUTPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }

    fn install_panic_hook() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            std::panic::set_hook(Box::new(|info| {
                let msg = info.to_string();
                // SAFETY: the host copies the message out of this module's memory during the
                // call. The module traps right after this hook returns (panic=abort).
                unsafe { super::host::panic(msg.as_ptr(), msg.len() as u32) }
            }))
        });
    }

    pub fn alloc(len: u32) -> u32 {
        INPUT.with(|b| {
            let mut b = b.borrow_mut();
            b.clear();
            b.resize(len as usize, 0);
            b.as_mut_ptr() as u32
        })
    }

    fn with_input(ptr: u32, len: u32, f: impl FnOnce(Option<&[u8]>, &mut Vec<u8>)) -> u64 {
        INPUT.with(|input| {
            OUTPUT.with(|output| {
                let input = input.borrow();
                let mut output = output.borrow_mut();
                let ok = ptr == input.as_ptr() as u32 && len as usize <= input.len();
                f(
                    if ok {
                        Some(&input[..len as usize])
                    } else {
                        None
                    },
                    &mut output,
                );
                pack_ptr_len(output.as_ptr() as u32, output.len() as u32)
            })
        })
    }

    const BAD_BUFFER: &str = "the host passed a buffer that weir_alloc did not hand out";

    pub fn init(ptr: u32, len: u32, f: Option<InitFn>) -> u64 {
        install_panic_hook();
        with_input(ptr, len, |input, out| match input {
            Some(input) => init_with(f, input, out),
            None => {
                out.clear();
                encode_failure(out, BAD_BUFFER)
            }
        })
    }

    pub fn process(ptr: u32, len: u32, t: &Transform) -> u64 {
        install_panic_hook();
        with_input(ptr, len, |input, out| match input {
            Some(input) => process_batch(t, input, out),
            None => {
                out.clear();
                encode_failure(out, BAD_BUFFER)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{records, run_flat_map, run_map};

    fn identity(r: Record) -> Result<Record, Error> {
        Ok(r)
    }

    fn twice(r: Record) -> Result<Vec<Record>, Error> {
        Ok(vec![r.clone(), r])
    }

    fn shapes() -> Vec<Record> {
        let mut with_origin = Record::new(vec![b'x'; 300]).with_key("a-long-key");
        with_origin.topic = Some("a-topic".into());
        with_origin.partition = Some(2);
        with_origin.offset = Some(77);
        vec![
            with_origin.with_header("h1", "v1").with_header("h2", ""),
            Record::new("s"),
            Record {
                value: None,
                headers: vec![Header {
                    name: "n".into(),
                    value: None,
                }],
                ..Record::new("")
            },
            Record::new(Vec::new()).with_key(""),
        ]
    }

    #[test]
    fn the_pool_keeps_a_bounded_amount_of_memory() {
        // A flat-map hands back more buffers than it takes: 20 KB values doubled, many times.
        let input: Vec<Record> = (0..64).map(|_| Record::new(vec![b'v'; 20_000])).collect();
        for _ in 0..20 {
            run_flat_map(twice, &input);
        }
        let kept = POOL.with(|p| {
            let p = p.borrow();
            let actual: usize = p.bytes.iter().map(Vec::capacity).sum::<usize>()
                + p.strings.iter().map(String::capacity).sum::<usize>();
            assert_eq!(actual, p.kept, "the running total matches the buffers");
            actual
        });
        assert!(kept <= POOL_MAX_BYTES, "the pool keeps {kept} bytes");
    }

    #[test]
    fn reused_buffers_never_carry_one_record_into_the_next() {
        // Each round decodes into the buffers the previous rounds handed back, in another
        // order of shapes: long values into short ones, headers into none, null into empty.
        let mut input = shapes();
        for round in 0..6 {
            input.rotate_left(1);
            let out = run_map(identity, &input);
            let got: Vec<Record> = records(&out).into_iter().cloned().collect();
            assert_eq!(got, input, "round {round}");
            let doubled = run_flat_map(twice, &input);
            assert_eq!(records(&doubled).len(), 2 * input.len(), "round {round}");
        }
    }
}
