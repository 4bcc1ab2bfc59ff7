//! `weir bench`: produce then consume N records over the Kafka protocol and report rates.

use anyhow::Result;

#[derive(clap::Args)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs) -> Result<()> {
    anyhow::bail!("bench is not built yet")
}
