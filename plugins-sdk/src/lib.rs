//! Write weir transform plugins in Rust.
//!
//! A plugin is a WebAssembly module (`wasm32-unknown-unknown`) that exports one transform: a
//! **filter** (keep or drop each record), a **map** (one record in, one out) or a **flat-map**
//! (one record in, zero or more out), and optionally an **init** function that receives the
//! pipeline's `config:` map once per instance. Write plain functions and export them with one
//! macro:
//!
//! ```
//! use weir_plugin_sdk::{Config, Error, Record};
//!
//! fn shout(mut r: Record) -> Result<Record, Error> {
//!     let upper = r.value_str()?.to_uppercase();
//!     r.value = Some(upper.into_bytes());
//!     Ok(r)
//! }
//!
//! fn init(config: &Config) -> Result<(), Error> {
//!     weir_plugin_sdk::info!("starting with {} settings", config.as_map().len());
//!     Ok(())
//! }
//!
//! weir_plugin_sdk::export_map!(shout, init = init);
//! ```
//!
//! The host calls the module once per batch of records; the SDK decodes the batch, calls your
//! function for each record and encodes the results. An `Err` from your function sends just that
//! record to the dead letters, with the error's message as the reason; a panic, an endless loop
//! or running out of memory is caught by the host, which retries the batch record by record to
//! find the culprit. See docs/plugins.md in the weir repository for the whole story and
//! [`abi`] for the wire format.

pub mod abi;
mod config;
mod error;
#[doc(hidden)]
pub mod guest;
pub mod json;
pub mod log;
mod record;
mod state;
pub mod testing;

pub use config::Config;
pub use error::Error;
pub use guest::{FilterFn, FlatMapFn, InitFn, MapFn, Transform};
pub use record::{Header, Record};
/// The `serde_json` this SDK uses (for [`Record::value_json`] and [`Config`]).
pub use serde_json;
pub use state::State;

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// Export a filter: `fn(&Record) -> Result<bool, Error>`; records for which it returns `true`
/// are kept. Optionally `init = f` with `fn(&Config) -> Result<(), Error>`.
#[macro_export]
macro_rules! export_filter {
    ($f:path) => {
        $crate::__export_transform!($crate::Transform::Filter($f), ::core::option::Option::None);
    };
    ($f:path, init = $init:path) => {
        $crate::__export_transform!(
            $crate::Transform::Filter($f),
            ::core::option::Option::Some($init)
        );
    };
}

/// Export a map: `fn(Record) -> Result<Record, Error>`. Optionally `init = f`.
#[macro_export]
macro_rules! export_map {
    ($f:path) => {
        $crate::__export_transform!($crate::Transform::Map($f), ::core::option::Option::None);
    };
    ($f:path, init = $init:path) => {
        $crate::__export_transform!(
            $crate::Transform::Map($f),
            ::core::option::Option::Some($init)
        );
    };
}

/// Export a flat-map: `fn(Record) -> Result<Vec<Record>, Error>`. Optionally `init = f`.
#[macro_export]
macro_rules! export_flat_map {
    ($f:path) => {
        $crate::__export_transform!($crate::Transform::FlatMap($f), ::core::option::Option::None);
    };
    ($f:path, init = $init:path) => {
        $crate::__export_transform!(
            $crate::Transform::FlatMap($f),
            ::core::option::Option::Some($init)
        );
    };
}

/// The module exports of ABI version 1 (see docs/plugins.md), compiled for wasm32 only.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_transform {
    ($transform:expr, $init:expr) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            #[no_mangle]
            pub extern "C" fn weir_abi_version() -> u32 {
                $crate::abi::ABI_VERSION
            }

            #[no_mangle]
            pub extern "C" fn weir_alloc(len: u32) -> u32 {
                $crate::guest::exports::alloc(len)
            }

            #[no_mangle]
            pub extern "C" fn weir_init(ptr: u32, len: u32) -> u64 {
                $crate::guest::exports::init(ptr, len, $init)
            }

            #[no_mangle]
            pub extern "C" fn weir_process(ptr: u32, len: u32) -> u64 {
                const TRANSFORM: $crate::Transform = $transform;
                $crate::guest::exports::process(ptr, len, &TRANSFORM)
            }
        };
        // Natively the functions are plain Rust: test them directly or through
        // `weir_plugin_sdk::testing`. This keeps the transform's type checked on every target.
        #[cfg(not(target_arch = "wasm32"))]
        const _: ($crate::Transform, ::core::option::Option<$crate::InitFn>) = ($transform, $init);
    };
}

#[cfg(test)]
mod tests {
    use super::testing::{errors, init, records, run_filter, run_flat_map, run_map};
    use super::*;

    fn keep_even(r: &Record) -> Result<bool> {
        let n: i64 = r.value_str()?.trim().parse()?;
        Ok(n % 2 == 0)
    }

    fn double(mut r: Record) -> Result<Record> {
        let n: i64 = r.value_str()?.parse()?;
        r.value = Some((n * 2).to_string().into_bytes());
        Ok(r)
    }

    fn repeat(r: Record) -> Result<Vec<Record>> {
        let n: usize = r.value_str()?.parse()?;
        if n > 3 {
            bail!("too many: {n}");
        }
        Ok(vec![r; n])
    }

    fn needs_name(c: &Config) -> Result<()> {
        c.require_str("name").map(|_| ())
    }

    export_map!(double, init = needs_name);

    #[test]
    fn filter_keeps_and_reports_per_record_errors() {
        let input: Vec<Record> = ["1", "2", "x", "4"]
            .iter()
            .map(|v| Record::new(*v))
            .collect();
        let out = run_filter(keep_even, &input);
        let kept: Vec<&str> = records(&out)
            .iter()
            .map(|r| r.value_str().unwrap())
            .collect();
        assert_eq!(kept, vec!["2", "4"]);
        let errs = errors(&out);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].0, 2);
        assert!(errs[0].1.contains("invalid digit"), "{}", errs[0].1);
    }

    #[test]
    fn map_keeps_the_rest_of_the_record() {
        let input = vec![Record::new("21").with_key("k").with_header("h", "v")];
        let out = run_map(double, &input);
        let r = records(&out)[0];
        assert_eq!(r.value_str().unwrap(), "42");
        assert_eq!(r.key_str(), Some("k"));
        assert_eq!(r.header("h"), Some(Some(&b"v"[..])));
    }

    #[test]
    fn flat_map_reports_the_input_index_of_every_output() {
        let input: Vec<Record> = ["2", "0", "9", "1"]
            .iter()
            .map(|v| Record::new(*v))
            .collect();
        let out = run_flat_map(repeat, &input);
        let idx: Vec<u32> = out.iter().map(|e| e.input_index).collect();
        assert_eq!(idx, vec![0, 0, 2, 3]);
        assert_eq!(errors(&out), vec![(2, "too many: 9")]);
    }

    #[test]
    fn init_sees_the_config() {
        assert_eq!(init(needs_name, r#"{"name":"x"}"#), Ok(()));
        let e = init(needs_name, "{}").unwrap_err();
        assert!(e.contains("needs `name`"), "{e}");
        assert!(init(needs_name, "[")
            .unwrap_err()
            .contains("not valid JSON"));
    }

    #[test]
    fn a_malformed_batch_fails_as_a_whole() {
        let mut out = Vec::new();
        guest::process_batch(&Transform::Map(double), &[1, 0, 0, 0, 9], &mut out);
        let res = abi::decode_output(&out).unwrap();
        assert!(res.unwrap_err().contains("could not decode"));
    }
}
