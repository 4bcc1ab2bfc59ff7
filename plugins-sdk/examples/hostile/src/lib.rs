//! A deliberately misbehaving plugin for weir's tests (not an example to follow). It passes
//! records through, except when the value asks it to misbehave:
//!
//! - `panic`: panics
//! - `loop`: loops forever
//! - `oom`: allocates until memory runs out
//! - `recurse`: recurses until the call stack overflows
//! - `big-frames`: recurses with large locals until Rust's stack in linear memory overflows
//! - `error`: returns an error (the well-behaved way to refuse a record)
//! - `origin`: replaces the value with where the record came from, `topic/partition/offset`
//!   (`-` for what the host did not say), so tests can check what the host passes in

use std::hint::black_box;

use weir_plugin_sdk::{bail, Error, Record};

/// Overflows WebAssembly's own call stack (wasmtime stops it).
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    black_box(recurse(black_box(depth + 1))) + 1
}

/// Overflows the stack that Rust keeps in linear memory for locals whose address is taken: the
/// module then reads below address 0, an out-of-bounds access.
#[allow(unconditional_recursion)]
fn big_frames(depth: u64) -> u64 {
    let frame = [depth; 512];
    black_box(&frame);
    black_box(big_frames(black_box(depth + 1))) + frame[3]
}

fn misbehave(record: Record) -> Result<Record, Error> {
    match record.value_bytes() {
        b"panic" => panic!("hostile plugin: panic requested"),
        b"loop" => loop {
            black_box(&record);
        },
        b"oom" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                let mut chunk = Vec::with_capacity(1 << 20);
                chunk.push(1u8);
                hoard.push(black_box(chunk));
            }
        }
        b"recurse" => {
            let n = recurse(0);
            bail!("recursion ended at {n}")
        }
        b"big-frames" => {
            let n = big_frames(0);
            bail!("recursion ended at {n}")
        }
        b"error" => bail!("hostile plugin: error requested"),
        b"origin" => {
            let place = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            let origin = format!(
                "{}/{}/{}",
                place(record.topic.clone()),
                place(record.partition.map(|p| p.to_string())),
                place(record.offset.map(|o| o.to_string()))
            );
            Ok(record.with_value(origin))
        }
        _ => Ok(record),
    }
}

weir_plugin_sdk::export_map!(misbehave);

#[cfg(test)]
mod tests {
    use super::*;

    // Only the harmless paths run natively: the others are for the WebAssembly sandbox.
    #[test]
    fn passes_records_and_returns_errors() {
        let out = weir_plugin_sdk::testing::run_map(
            misbehave,
            &[Record::new("ok"), Record::new("error")],
        );
        assert_eq!(weir_plugin_sdk::testing::records(&out).len(), 1);
        let mut r = Record::new("origin");
        r.topic = Some("t".into());
        r.partition = Some(1);
        let origins = weir_plugin_sdk::testing::run_map(misbehave, &[r, Record::new("origin")]);
        let values: Vec<&str> = weir_plugin_sdk::testing::records(&origins)
            .iter()
            .map(|r| r.value_str().unwrap())
            .collect();
        assert_eq!(values, vec!["t/1/-", "-/-/-"]);
        assert_eq!(
            weir_plugin_sdk::testing::errors(&out),
            vec![(1, "hostile plugin: error requested")]
        );
    }
}
