//! The module side of the ABI: what the `export_*!` macros' exported functions do. Plugin code
//! does not call this directly; [`crate::testing`] runs the same code natively.

use crate::abi::{encode_failure, BatchReader, OutputWriter, STATUS_OK};
use crate::{Config, Error, Record};

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
    fn apply(&self, index: u32, record: Record, w: &mut OutputWriter<'_>) {
        match self {
            Transform::Filter(f) => match f(&record) {
                Ok(true) => w.record(index, &record),
                Ok(false) => {}
                Err(e) => w.error(index, e.message()),
            },
            Transform::Map(f) => match f(record) {
                Ok(r) => w.record(index, &r),
                Err(e) => w.error(index, e.message()),
            },
            Transform::FlatMap(f) => match f(record) {
                Ok(rs) => {
                    for r in &rs {
                        w.record(index, r);
                    }
                }
                Err(e) => w.error(index, e.message()),
            },
        }
    }
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
    let mut failure = None;
    {
        let mut w = OutputWriter::new(out);
        for (i, rec) in reader.enumerate() {
            match rec {
                Ok(r) => t.apply(i as u32, r, &mut w),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() {
            w.finish();
        }
    }
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
