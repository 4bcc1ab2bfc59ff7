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
    /// Run the daemon (a single node, or a node of a cluster with --voters).
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
        /// This node's id in a cluster (its Kafka broker id) [default: 0]
        #[arg(long)]
        node_id: Option<i32>,
        /// This node's Raft and cluster listener [default: its entry in --voters]
        #[arg(long)]
        cluster_addr: Option<String>,
        /// The cluster's controller voters: ID@HOST:PORT,... (their cluster listeners)
        #[arg(long)]
        voters: Option<String>,
        /// This node's rack; replicas of a partition are spread over racks
        #[arg(long)]
        rack: Option<String>,
        /// A Kafka listener, NAME=PROTOCOL://HOST:PORT (PLAINTEXT, SSL, SASL_PLAINTEXT,
        /// SASL_SSL; NAME defaults to the protocol); repeatable; replaces the file's listeners
        #[arg(long = "listener", value_name = "[NAME=]PROTOCOL://HOST:PORT")]
        listeners: Vec<String>,
        /// TLS certificate chain (PEM) of the SSL and SASL_SSL listeners
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM)
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// CAs (PEM) that sign client certificates; clients must then present one
        #[arg(long)]
        tls_client_ca: Option<PathBuf>,
        /// Check every request against the ACLs (`weir acl`)
        #[arg(long)]
        authorizer: bool,
        /// A principal allowed everything (User:admin); repeatable; adds to the file's
        #[arg(long = "super-user", value_name = "PRINCIPAL")]
        super_users: Vec<String>,
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
    /// The state of a cluster: nodes, the Raft leader, under-replicated partitions.
    Cluster {
        #[command(subcommand)]
        command: cli::cluster::ClusterCommand,
    },
    /// Create, list and delete the SCRAM users of SASL listeners.
    User {
        #[command(subcommand)]
        command: cli::user::UserCommand,
        #[command(flatten)]
        conn: cli::ConnectArgs,
    },
    /// Add, list and remove the ACLs the authorizer checks.
    Acl {
        #[command(subcommand)]
        command: cli::acl::AclCommand,
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
    /// Manage a node's pipelines over its HTTP API; validate pipeline files offline.
    Pipeline {
        #[command(subcommand)]
        command: cli::pipeline::PipelineCommand,
    },
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
                // Raft's own logs repeat every retry while a node is down; weir logs leader
                // changes and fencing itself. WEIR_LOG=openraft=info shows them.
                .unwrap_or_else(|_| {
                    EnvFilter::new(if serving {
                        "info,openraft=off"
                    } else {
                        "warn,openraft=off"
                    })
                }),
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
                node_id,
                cluster_addr,
                voters,
                rack,
                listeners,
                tls_cert,
                tls_key,
                tls_client_ca,
                authorizer,
                super_users,
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
                if let Some(n) = node_id {
                    settings.node_id = n;
                }
                if let Some(a) = cluster_addr {
                    settings.cluster_addr = Some(a);
                }
                if let Some(v) = voters {
                    settings.voters = Some(v);
                }
                if let Some(r) = rack {
                    settings.rack = Some(r);
                }
                if !listeners.is_empty() {
                    settings.listeners = listeners
                        .iter()
                        .map(|l| weir::security::ListenerSettings::parse(l))
                        .collect::<Result<_>>()?;
                }
                if let (Some(cert), Some(key)) = (tls_cert, tls_key) {
                    settings.tls = Some(weir::security::tls::TlsSettings::new(cert, key));
                }
                if let Some(ca) = tls_client_ca {
                    let tls = settings.tls.as_mut().ok_or_else(|| {
                        anyhow::anyhow!("--tls-client-ca needs a certificate: --tls-cert and --tls-key, or tls in the config file")
                    })?;
                    tls.client_ca_file = Some(ca);
                }
                settings.authorizer.enabled |= authorizer;
                settings.authorizer.super_users.extend(super_users);
                weir::serve::run(settings).await
            }
            Command::Topic { command, conn } => cli::topic::run(command, &conn).await,
            Command::Group { command, conn } => cli::group::run(command, &conn).await,
            Command::Txn { command, conn } => cli::txn::run(command, &conn).await,
            Command::User { command, conn } => cli::user::run(command, &conn).await,
            Command::Acl { command, conn } => cli::acl::run(command, &conn).await,
            Command::Cluster { command } => cli::cluster::run(command).await,
            Command::Produce(a) => cli::produce::run(a).await,
            Command::Consume(a) => cli::consume::run(a).await,
            Command::Bench(a) => cli::bench::run(a).await,
            Command::Pipeline { command } => cli::pipeline::run(command).await,
            Command::Plugin { command } => cli::plugin::run(command),
        }
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}
