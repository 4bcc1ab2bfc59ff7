//! Fuzzes one Kafka request frame (without its 4-byte size prefix) through
//! `weir::kafka::server::handle_frame`: header and body decoding, version checks, dispatch to
//! the handlers and response encoding. Errors are fine; panics and crashes are findings.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    weir_fuzz::fuzz_one(data);
});
