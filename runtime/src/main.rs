use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use weir::cli;
use weir::config::Settings;

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "A streaming daemon: a Kafka-compatible log and a connector runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (single node).
    Serve {
        /// Settings file (YAML); flags given here win over it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory [default: ./weir-data]
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Kafka protocol listener [default: 127.0.0.1:9092]
        #[arg(long)]
        kafka_addr: Option<String>,
        /// HTTP API listener [default: 127.0.0.1:8083]
        #[arg(long)]
        http_addr: Option<String>,
        /// Partitions of auto-created topics [default: 1]
        #[arg(long)]
        default_partitions: Option<i32>,
        /// Directory of pipeline files, watched for changes [default: ./pipelines if present]
        #[arg(long)]
        pipelines: Option<PathBuf>,
    },
    /// Create, list, describe and delete topics.
    Topic {
        #[command(subcommand)]
        command: cli::topic::TopicCommand,
        #[command(flatten)]
        conn: cli::ConnectArgs,
    },
    /// List, describe, reset and delete consumer groups.
    Group {
        #[command(subcommand)]
        command: cli::group::GroupCommand,
        #[command(flatten)]
        conn: cli::ConnectArgs,
    },
    /// List and describe transactions.
    Txn {
        #[command(subcommand)]
        command: cli::txn::TxnCommand,
        #[command(flatten)]
        conn: cli::ConnectArgs,
    },
    /// Produce lines from stdin, one record per line.
    Produce(cli::produce::ProduceArgs),
    /// Print records of a topic, one value per line.
    Consume(cli::consume::ConsumeArgs),
    /// Measure produce and consume throughput and latency over the Kafka protocol.
    Bench(cli::bench::BenchArgs),
    /// Write, build, test and benchmark WASM transform plugins.
    Plugin {
        #[command(subcommand)]
        command: cli::plugin::PluginCommand,
    },
}

fn main() -> Result<()> {
    let args = Cli::parse();
    let serving = matches!(args.command, Command::Serve { .. });
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("WEIR_LOG")
                .unwrap_or_else(|_| EnvFilter::new(if serving { "info" } else { "warn" })),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async move {
        match args.command {
            Command::Serve {
                config,
                data_dir,
                kafka_addr,
                http_addr,
                default_partitions,
                pipelines,
            } => {
                let mut settings = match config {
                    Some(path) => Settings::load(&path)?,
                    None => Settings::default(),
                };
                if let Some(d) = data_dir {
                    settings.data_dir = d;
                }
                if let Some(a) = kafka_addr {
                    settings.kafka_addr = a;
                }
                if let Some(a) = http_addr {
                    settings.http_addr = a;
                }
                if let Some(p) = default_partitions {
                    settings.default_partitions = p;
                }
                if let Some(d) = pipelines {
                    settings.pipelines_dir = Some(d);
                }
                weir::serve::run(settings).await
            }
            Command::Topic { command, conn } => cli::topic::run(command, &conn).await,
            Command::Group { command, conn } => cli::group::run(command, &conn).await,
            Command::Txn { command, conn } => cli::txn::run(command, &conn).await,
            Command::Produce(a) => cli::produce::run(a).await,
            Command::Consume(a) => cli::consume::run(a).await,
            Command::Bench(a) => cli::bench::run(a).await,
            Command::Plugin { command } => cli::plugin::run(command),
        }
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}
