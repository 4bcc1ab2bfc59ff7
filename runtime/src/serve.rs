//! `weir serve`: open the log, bind the listeners, run until SIGTERM/SIGINT, then flush.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::cluster::image::NodeInfo;
use crate::cluster::Cluster;
use crate::config::Settings;
use crate::group::GroupCoordinator;
use crate::kafka::{self, Broker};
use crate::log::manager::LogManager;
use crate::txn::TxnCoordinator;

pub async fn run(settings: Settings) -> Result<()> {
    let defaults = settings.log_defaults()?;
    let cluster_settings = settings.cluster_settings()?;
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("cannot create data dir {}", settings.data_dir.display()))?;
    let log = Arc::new(
        tokio::task::spawn_blocking({
            let dir = settings.data_dir.clone();
            move || LogManager::open(&dir, defaults)
        })
        .await??,
    );
    let listener_settings = settings.kafka_listeners()?;
    let tls = crate::security::tls::Tls::load_if_set(&settings.tls, "tls")?;
    let http_tls = crate::security::tls::Tls::load_if_set(&settings.http_tls, "http_tls")?;
    let http_auth = settings
        .http_auth
        .as_ref()
        .map(crate::security::http::HttpAuth::load)
        .transpose()?
        .map(Arc::new);
    let mut kafka_listeners = Vec::new();
    let mut endpoints = Vec::new();
    for (i, ls) in listener_settings.iter().enumerate() {
        let socket = TcpListener::bind(&ls.address).await.with_context(|| {
            format!(
                "cannot listen for Kafka clients on {} ({})",
                ls.address,
                ls.name()
            )
        })?;
        let local = socket.local_addr()?;
        // The default listener keeps the older advertised_host/advertised_port settings.
        let fallback_host = (i == 0).then(|| settings.advertised_host.clone()).flatten();
        let fallback_port = (i == 0).then_some(settings.advertised_port).flatten();
        endpoints.push(advertised_endpoint(
            ls,
            local,
            fallback_host,
            fallback_port,
        )?);
        let security = crate::security::Listener::new(ls, tls.clone(), settings.auth_settings())?;
        kafka_listeners.push((socket, Arc::new(security), local));
    }
    let http_listener = TcpListener::bind(&settings.http_addr)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", settings.http_addr))?;
    let kafka_local = kafka_listeners[0].2;
    let advertised_host = endpoints[0].host.clone();
    let advertised_port = endpoints[0].port;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // In a cluster the coordinators' internal topics come from the metadata, so the quorum
    // is joined before they open.
    let cluster_mode = cluster_settings.is_some();
    let cluster = match cluster_settings {
        Some(cs) => {
            let info = NodeInfo {
                id: cs.node_id,
                kafka_host: advertised_host.clone(),
                kafka_port: advertised_port,
                cluster_addr: cs.cluster_addr.clone(),
                rack: cs.rack.clone(),
                incarnation: uuid::Uuid::new_v4(),
                fenced: false,
                listeners: endpoints.clone(),
                http_url: Some(http_url(
                    http_listener.local_addr()?,
                    &advertised_host,
                    settings.http_tls.is_some(),
                )),
            };
            tracing::info!(node = cs.node_id, cluster = %cs.cluster_addr, voters = ?cs.voters, "joining the cluster");
            let cluster = Cluster::start(cs, log.clone(), info, stop_rx.clone()).await?;
            cluster.host_internal_topics()?;
            Some(cluster)
        }
        None => None,
    };
    let groups = Arc::new(
        tokio::task::spawn_blocking({
            let log = log.clone();
            let settings = settings.group_settings();
            move || GroupCoordinator::open(log, settings)
        })
        .await??,
    );
    if cluster_mode {
        // Takes over only while this node leads __consumer_offsets (see below).
        groups.set_active(false)?;
    }
    let txns = Arc::new(
        tokio::task::spawn_blocking({
            let log = log.clone();
            let groups = groups.clone();
            let settings = settings.txn_settings();
            move || TxnCoordinator::open(log, groups, settings)
        })
        .await??,
    );
    let txn_link = cluster.as_ref().map(|c| {
        let link = kafka::txn_cluster::ClusterTxnLink::new(c.clone());
        // Takes over only while this node leads __transaction_state (see below).
        txns.join_cluster(link.clone());
        link
    });
    if txn_link.is_none() {
        // Before any client connects: finish or abort what the previous run left open.
        txns.recover().await?;
    }
    let broker = Arc::new(Broker {
        node_id: settings.node_id,
        cluster_id: kafka::load_cluster_id(&settings.data_dir)?,
        endpoints,
        log: log.clone(),
        groups: groups.clone(),
        txns: txns.clone(),
        auto_create_topics: settings.auto_create_topics,
        default_partitions: settings.default_partitions.max(1),
        cluster,
        peers: Default::default(),
        users: crate::security::users::LocalUsers::open_users(&settings.data_dir)?,
        authorizer: crate::security::acl::Authorizer::new(&settings.authorizer),
        acls: crate::security::local::LocalFile::open(&settings.data_dir, kafka::ACLS_FILE)?,
        fetch_sessions: kafka::fetch_session::FetchSessions::new(
            settings.max_incremental_fetch_session_cache_slots,
        ),
    });
    if let Some(link) = &txn_link {
        link.bind(&broker);
    }

    // On a cluster every node is given the pipelines directory; the image places each
    // pipeline on one node.
    let pipelines = match pipelines_dir(&settings) {
        Some(dir) => {
            let (offsets, cluster) = match &broker.cluster {
                Some(_) => (
                    crate::pipeline::offsets::OffsetStore::Cluster(broker.clone()),
                    Some(broker.clone()),
                ),
                None => (crate::pipeline::offsets::OffsetStore::open(&log)?, None),
            };
            let ctx = crate::pipeline::Context {
                log: log.clone(),
                groups: groups.clone(),
                txns: txns.clone(),
                offsets: Arc::new(offsets),
                default_partitions: settings.default_partitions.max(1),
                plugins: Arc::new(weir_wasm::Host::new(Some(
                    &settings.data_dir.join("plugin-cache"),
                ))?),
                cluster,
            };
            tracing::info!(dir = %dir.display(), "loading pipelines");
            Some(Arc::new(crate::pipeline::PipelineManager::new(ctx, dir)))
        }
        None => None,
    };

    let maintenance = tokio::spawn(log.clone().run_maintenance(
        Duration::from_millis(100),
        Duration::from_millis(settings.log_retention_check_interval_ms.max(10)),
        Duration::from_secs(30),
        stop_rx.clone(),
    ));
    let cleaner = tokio::spawn(log.clone().run_cleaner(
        Duration::from_millis(settings.log_cleaner_interval_ms.max(10)),
        settings.log_cleaner_dedupe_buffer_bytes / 40,
        stop_rx.clone(),
    ));
    let group_timers = tokio::spawn(groups.clone().run_timers(stop_rx.clone()));
    if cluster_mode {
        tokio::spawn(follow_coordinator_leadership(
            broker.clone(),
            stop_rx.clone(),
        ));
    }
    let txn_timers = tokio::spawn(txns.clone().run_timers(stop_rx.clone()));
    for tls in tls.iter().chain(&http_tls) {
        tokio::spawn(tls.clone().watch(stop_rx.clone()));
    }
    let kafka_tasks: Vec<_> = kafka_listeners
        .into_iter()
        .map(|(socket, security, local)| {
            tracing::info!(listener = %security.name, protocol = security.protocol.name(), address = %local, "Kafka listener");
            tokio::spawn(kafka::server::serve(
                socket,
                broker.clone(),
                security,
                stop_rx.clone(),
            ))
        })
        .collect();
    let http_local = http_listener.local_addr()?;
    let http_task = tokio::spawn(crate::http::serve(
        http_listener,
        broker.clone(),
        pipelines.clone(),
        crate::metrics::ScrapeOptions {
            per_partition: settings.metrics_per_partition,
        },
        crate::http::HttpSecurity {
            tls: http_tls,
            auth: http_auth,
        },
        stop_rx.clone(),
    ));
    // Pipelines stop first, so that on a cluster they move to another node only once stopped.
    let (pipelines_stop_tx, pipelines_stop_rx) = tokio::sync::watch::channel(false);
    let pipeline_task = pipelines
        .clone()
        .map(|p| tokio::spawn(p.run(pipelines_stop_rx)));
    tracing::info!(kafka = %kafka_local, http = %http_local, data_dir = %settings.data_dir.display(), "weir is serving");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    // Pipelines finish their current batch while the log (and the cluster) still serve.
    let _ = pipelines_stop_tx.send(true);
    if let Some(t) = pipeline_task {
        let _ = t.await;
    }
    // A cluster node then hands its leaderships to the other in-sync replicas.
    if let Some(c) = &broker.cluster {
        c.leave().await;
    }
    let _ = stop_tx.send(true);
    for t in kafka_tasks {
        let _ = t.await;
    }
    let _ = group_timers.await;
    let _ = txn_timers.await;
    let _ = cleaner.await;
    let _ = tokio::time::timeout(Duration::from_secs(5), http_task).await;
    // The maintenance loop ends with a flush and checkpoint of every partition.
    maintenance.await?;
    tracing::info!("all partitions flushed; bye");
    Ok(())
}

/// In a cluster, this node coordinates groups while it leads `__consumer_offsets`, and
/// transactions while it leads `__transaction_state`: one loop each, so that a transaction
/// operation waiting on its markers never holds up the groups.
async fn follow_coordinator_leadership(
    broker: Arc<Broker>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let groups = follow_leadership(
        broker.clone(),
        crate::group::store::TOPIC,
        stop.clone(),
        |broker, leads| async move {
            if let Err(e) = broker.groups.set_active(leads) {
                tracing::error!(error = %e, "cannot load the consumer groups");
            }
        },
    );
    let txns = follow_leadership(
        broker,
        crate::txn::TOPIC,
        stop,
        |broker, leads| async move {
            if let Err(e) = broker.txns.set_active(leads).await {
                tracing::error!(error = %e, "cannot load the transactions");
            }
        },
    );
    tokio::join!(groups, txns);
}

/// Calls `apply` with whether this node leads partition 0 of `topic`, every 200 ms until stopped.
async fn follow_leadership<F, Fut>(
    broker: Arc<Broker>,
    topic: &'static str,
    mut stop: tokio::sync::watch::Receiver<bool>,
    apply: F,
) where
    F: Fn(Arc<Broker>, bool) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        let leads = broker.leadership(topic, 0).is_ok();
        apply(broker.clone(), leads).await;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Where clients of a listener are told to connect: its `advertised` host:port, else the
/// bound address (a wildcard address advertised as 127.0.0.1).
fn advertised_endpoint(
    listener: &crate::security::ListenerSettings,
    local: std::net::SocketAddr,
    fallback_host: Option<String>,
    fallback_port: Option<u16>,
) -> Result<crate::security::Endpoint> {
    let (host, port) = match &listener.advertised {
        Some(a) => {
            let (h, p) = a
                .rsplit_once(':')
                .with_context(|| format!("advertised address '{a}' is not host:port"))?;
            let port: u16 = p
                .parse()
                .with_context(|| format!("advertised address '{a}': bad port"))?;
            (h.trim_matches(['[', ']']).to_string(), port)
        }
        None => (
            fallback_host.unwrap_or_else(|| {
                if local.ip().is_unspecified() {
                    "127.0.0.1".to_string()
                } else {
                    local.ip().to_string()
                }
            }),
            fallback_port.unwrap_or(local.port()),
        ),
    };
    Ok(crate::security::Endpoint {
        listener: listener.name(),
        host,
        port: port as i32,
    })
}

/// The configured pipelines directory, or ./pipelines when it exists.
/// Where the other nodes reach this node's HTTP API: its listener's address, with the
/// advertised host when it listens on every interface.
fn http_url(local: std::net::SocketAddr, advertised_host: &str, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    if local.ip().is_unspecified() {
        format!("{scheme}://{advertised_host}:{}", local.port())
    } else {
        format!("{scheme}://{local}")
    }
}

fn pipelines_dir(settings: &Settings) -> Option<std::path::PathBuf> {
    match &settings.pipelines_dir {
        Some(d) => Some(d.clone()),
        None => {
            let d = std::path::PathBuf::from("pipelines");
            d.is_dir().then_some(d)
        }
    }
}
