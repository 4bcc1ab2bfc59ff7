//! weir: a Kafka-compatible partitioned log and a connector runtime in one daemon.

pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod console;
pub mod group;
pub mod http;
pub mod inspect;
pub mod kafka;
pub mod log;
pub mod metrics;
pub mod pipeline;
pub mod security;
pub mod serve;
pub mod txn;

/// Milliseconds since the Unix epoch (Kafka's timestamp unit).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
