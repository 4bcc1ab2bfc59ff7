//! Fuzzes one connection to a SASL listener through `weir::security::sasl::SaslSession`:
//! handshakes, PLAIN and SCRAM exchanges with truncated, oversized or garbled tokens, and the
//! requests it lets through. Panics, crashes and an unauthenticated request passing are findings.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    weir_fuzz::fuzz_sasl(data);
});
