//! Run a plugin's functions natively, through the same batch encoding and dispatch as inside a
//! module, for the plugin's own unit tests (`cargo test`).

use crate::abi::{decode_init_result, decode_output, encode_batch};
pub use crate::abi::{Entry, Outcome};
use crate::guest::{init_with, process_batch, FilterFn, FlatMapFn, InitFn, MapFn, Transform};
use crate::Record;

/// Encode `records` as an input batch, run `t` over it and decode the output entries.
///
/// Panics when the output does not decode or the call failed as a whole: in a test, that is a
/// bug in the SDK, not in the plugin.
pub fn run(t: &Transform, records: &[Record]) -> Vec<Entry> {
    let mut input = Vec::new();
    encode_batch(records, &mut input);
    let mut out = Vec::new();
    process_batch(t, &input, &mut out);
    match decode_output(&out) {
        Ok(Ok(entries)) => entries,
        Ok(Err(message)) => panic!("the batch failed as a whole: {message}"),
        Err(e) => panic!("the output batch does not decode: {e}"),
    }
}

/// [`run`] for a filter.
pub fn run_filter(f: FilterFn, records: &[Record]) -> Vec<Entry> {
    run(&Transform::Filter(f), records)
}

/// [`run`] for a map.
pub fn run_map(f: MapFn, records: &[Record]) -> Vec<Entry> {
    run(&Transform::Map(f), records)
}

/// [`run`] for a flat-map.
pub fn run_flat_map(f: FlatMapFn, records: &[Record]) -> Vec<Entry> {
    run(&Transform::FlatMap(f), records)
}

/// Call `f` with `config_json` the way the host does at start-up; `Err` carries its message.
pub fn init(f: InitFn, config_json: &str) -> Result<(), String> {
    let mut out = Vec::new();
    init_with(Some(f), config_json.as_bytes(), &mut out);
    decode_init_result(&out).expect("the init result decodes")
}

/// The records of `entries`, dropping errors.
pub fn records(entries: &[Entry]) -> Vec<&Record> {
    entries
        .iter()
        .filter_map(|e| match &e.outcome {
            Outcome::Record(r) => Some(r),
            Outcome::Error(_) => None,
        })
        .collect()
}

/// The `(input index, message)` of each error in `entries`.
pub fn errors(entries: &[Entry]) -> Vec<(u32, &str)> {
    entries
        .iter()
        .filter_map(|e| match &e.outcome {
            Outcome::Error(m) => Some((e.input_index, m.as_str())),
            Outcome::Record(_) => None,
        })
        .collect()
}
