//! weir: a Kafka-compatible partitioned log and a connector runtime in one daemon.

pub mod cli;
pub mod client;
pub mod config;
pub mod group;
pub mod http;
pub mod kafka;
pub mod log;
pub mod serve;
