//! Command-line tools that talk to a node over the Kafka protocol (and, for pipelines and the
//! cluster status, over its HTTP API).

pub mod bench;
pub mod cluster;
pub mod consume;
pub mod group;
pub mod pipeline;
pub mod plugin;
pub mod produce;
pub mod topic;
pub mod txn;

pub use crate::now_ms;

#[derive(clap::Args, Clone)]
pub struct ConnectArgs {
    /// Broker address (host:port)
    #[arg(
        long,
        short = 'b',
        global = true,
        default_value = "127.0.0.1:9092",
        env = "WEIR_BROKERS"
    )]
    pub brokers: String,
}
