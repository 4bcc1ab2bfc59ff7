//! weir: a Kafka-compatible partitioned log and a connector runtime in one daemon.

pub mod log;
