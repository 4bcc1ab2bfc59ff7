//! Daemon settings: embedded defaults, then `weir.yaml`, then command-line flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::cluster::{parse_voters, ClusterSettings};
use crate::group::GroupSettings;
use crate::log::config::LogConfig;
use crate::security::acl::AuthorizerSettings;
use crate::security::http::HttpAuthSettings;
use crate::security::tls::TlsSettings;
use crate::security::{AuthSettings, ListenerSettings, SecurityProtocol};
use crate::txn::TxnSettings;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Where topics and metadata live.
    pub data_dir: PathBuf,
    /// Kafka protocol listener, when `listeners` is not given: plaintext.
    pub kafka_addr: String,
    /// Kafka protocol listeners, each with its security protocol; replaces `kafka_addr`.
    pub listeners: Vec<ListenerSettings>,
    /// Certificate and key of the SSL and SASL_SSL listeners.
    pub tls: Option<TlsSettings>,
    /// A failed authentication is answered this late (connection.failed.authentication.delay.ms).
    pub connection_failed_authentication_delay_ms: u64,
    /// Failed authentications from one address within a minute, after which its further
    /// attempts are refused unchecked until the minute is over.
    pub max_failed_authentications_per_minute: u32,
    /// SASL sessions last this long, then clients re-authenticate (connections.max.reauth.ms,
    /// KIP-368); 0: no expiry.
    pub connections_max_reauth_ms: u64,
    /// ACL checks on the Kafka listeners: off by default.
    pub authorizer: AuthorizerSettings,
    /// HTTP API listener (health, metrics, the pipeline API, the console).
    pub http_addr: String,
    /// Serve the HTTP API over TLS with this certificate.
    pub http_tls: Option<TlsSettings>,
    /// Require a token or a user on the HTTP API (all but /health).
    pub http_auth: Option<HttpAuthSettings>,
    /// Host name given to clients in metadata; defaults to the listener's address.
    pub advertised_host: Option<String>,
    /// Port given to clients in metadata (behind a proxy or NAT); defaults to the listener's.
    pub advertised_port: Option<u16>,
    pub node_id: i32,
    /// Create a topic when a client produces to or asks metadata for an unknown one.
    pub auto_create_topics: bool,
    /// Partitions of auto-created topics and of CreateTopics without a count.
    pub default_partitions: i32,
    /// Broker-wide defaults for topic configs, by their Kafka names (retention.ms, ...).
    pub topic_defaults: BTreeMap<String, String>,
    /// Kafka's group.initial.rebalance.delay.ms: how long a new group waits for more members.
    pub group_initial_rebalance_delay_ms: u64,
    /// Allowed range of consumers' session.timeout.ms.
    pub group_min_session_timeout_ms: i32,
    pub group_max_session_timeout_ms: i32,
    /// Consumer-protocol groups (KIP-848): how long a member may go without a heartbeat
    /// (Kafka's group.consumer.session.timeout.ms) and how often members heartbeat
    /// (group.consumer.heartbeat.interval.ms).
    pub group_consumer_session_timeout_ms: u64,
    pub group_consumer_heartbeat_interval_ms: u64,
    /// How often segments past retention.ms / retention.bytes are deleted
    /// (log.retention.check.interval.ms).
    pub log_retention_check_interval_ms: u64,
    /// How often the log cleaner looks for compactable partitions.
    pub log_cleaner_interval_ms: u64,
    /// Memory for the cleaner's key map (Kafka's log.cleaner.dedupe.buffer.size).
    pub log_cleaner_dedupe_buffer_bytes: usize,
    /// Incremental fetch sessions (KIP-227) kept at once; 0 turns them off
    /// (max.incremental.fetch.session.cache.slots).
    pub max_incremental_fetch_session_cache_slots: usize,
    /// The pipelines directory [default: ./pipelines when it exists].
    pub pipelines_dir: Option<PathBuf>,
    /// Longest transaction.timeout.ms a producer may ask for (transaction.max.timeout.ms).
    pub transaction_max_timeout_ms: i32,
    /// An idle transactional id is forgotten after this long (transactional.id.expiration.ms).
    pub transactional_id_expiration_ms: i64,
    /// The controller voters of a cluster, `1@host:port,2@host:port,...` (their cluster
    /// addresses). Unset: a single node.
    pub voters: Option<String>,
    /// Addresses this node dials in place of those other nodes registered (cluster and Kafka
    /// addresses, `host:port` → `host:port`): for a node that reaches the others through NAT,
    /// or through a proxy on the link between two nodes.
    pub peer_routes: BTreeMap<String, String>,
    /// This node's Raft and cluster listener (in a cluster).
    pub cluster_addr: Option<String>,
    /// This node's rack: replicas of a partition are spread over racks.
    pub rack: Option<String>,
    /// Raft heartbeat interval and election timeout; sized for a busy machine.
    pub raft_heartbeat_ms: u64,
    pub raft_election_timeout_ms: u64,
    /// How long a metadata change (topic creation, ...) may wait for the quorum.
    pub metadata_timeout_ms: u64,
    /// A follower not caught up for this long leaves the in-sync set (replica.lag.time.max.ms).
    pub replica_lag_time_max_ms: u64,
    /// A node whose heartbeats stop for this long is fenced: its partitions get new leaders
    /// (broker.session.timeout.ms).
    pub node_session_timeout_ms: u64,
    /// How often partitions go back to their preferred leaders once those are in sync.
    pub preferred_leader_check_ms: u64,
    /// Series per partition in `GET /metrics` (offsets, sizes, group lag by partition); turn
    /// off where partitions are many: per-topic and per-group sums remain.
    pub metrics_per_partition: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_dir: PathBuf::from("./weir-data"),
            kafka_addr: "127.0.0.1:9092".into(),
            listeners: Vec::new(),
            tls: None,
            connection_failed_authentication_delay_ms: 100,
            max_failed_authentications_per_minute: 120,
            connections_max_reauth_ms: 0,
            authorizer: AuthorizerSettings::default(),
            http_addr: "127.0.0.1:8083".into(),
            http_tls: None,
            http_auth: None,
            advertised_host: None,
            advertised_port: None,
            node_id: 0,
            auto_create_topics: true,
            default_partitions: 1,
            topic_defaults: BTreeMap::new(),
            group_initial_rebalance_delay_ms: 3000,
            group_min_session_timeout_ms: 6000,
            group_max_session_timeout_ms: 1_800_000,
            group_consumer_session_timeout_ms: 45_000,
            group_consumer_heartbeat_interval_ms: 5_000,
            log_retention_check_interval_ms: 300_000,
            log_cleaner_interval_ms: 15_000,
            log_cleaner_dedupe_buffer_bytes: 128 << 20,
            max_incremental_fetch_session_cache_slots: crate::kafka::fetch_session::DEFAULT_SLOTS,
            pipelines_dir: None,
            transaction_max_timeout_ms: TxnSettings::default().max_timeout_ms,
            transactional_id_expiration_ms: TxnSettings::default().id_expiration_ms,
            voters: None,
            peer_routes: BTreeMap::new(),
            cluster_addr: None,
            rack: None,
            raft_heartbeat_ms: 250,
            raft_election_timeout_ms: 1500,
            metadata_timeout_ms: 15_000,
            replica_lag_time_max_ms: 10_000,
            node_session_timeout_ms: 6_000,
            preferred_leader_check_ms: 10_000,
            metrics_per_partition: true,
        }
    }
}

impl Settings {
    /// Reads a settings file; errors name the file, line and column.
    pub fn load(path: &Path) -> Result<Settings> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let settings: Settings = serde_yaml::from_str(&text).map_err(|e| match e.location() {
            Some(loc) => {
                anyhow::anyhow!("{}:{}:{}: {}", path.display(), loc.line(), loc.column(), e)
            }
            None => anyhow::anyhow!("{}: {}", path.display(), e),
        })?;
        settings
            .log_defaults()
            .with_context(|| format!("{}: topic_defaults", path.display()))?;
        Ok(settings)
    }

    pub fn group_settings(&self) -> GroupSettings {
        GroupSettings {
            initial_rebalance_delay: std::time::Duration::from_millis(
                self.group_initial_rebalance_delay_ms,
            ),
            min_session_timeout_ms: self.group_min_session_timeout_ms,
            max_session_timeout_ms: self.group_max_session_timeout_ms,
            consumer: crate::group::consumer::ConsumerSettings {
                session_timeout: std::time::Duration::from_millis(
                    self.group_consumer_session_timeout_ms,
                ),
                heartbeat_interval: std::time::Duration::from_millis(
                    self.group_consumer_heartbeat_interval_ms,
                ),
            },
        }
    }

    pub fn txn_settings(&self) -> TxnSettings {
        TxnSettings {
            max_timeout_ms: self.transaction_max_timeout_ms,
            id_expiration_ms: self.transactional_id_expiration_ms,
        }
    }

    /// The cluster settings, when `voters` is set.
    pub fn cluster_settings(&self) -> Result<Option<ClusterSettings>> {
        let Some(voters) = &self.voters else {
            return Ok(None);
        };
        let voters = parse_voters(voters).context("voters")?;
        let cluster_addr = match (&self.cluster_addr, voters.get(&self.node_id)) {
            (Some(a), _) => a.clone(),
            (None, Some(a)) => a.clone(),
            (None, None) => anyhow::bail!(
                "node {} is not among the voters; give it a cluster_addr (--cluster-addr)",
                self.node_id
            ),
        };
        Ok(Some(ClusterSettings {
            node_id: self.node_id,
            cluster_addr,
            voters,
            rack: self.rack.clone(),
            heartbeat_ms: self.raft_heartbeat_ms.max(10),
            election_timeout_ms: self
                .raft_election_timeout_ms
                .max(self.raft_heartbeat_ms * 3),
            propose_timeout: std::time::Duration::from_millis(self.metadata_timeout_ms.max(100)),
            replica_lag_time_max: std::time::Duration::from_millis(self.replica_lag_time_max_ms),
            session_timeout: std::time::Duration::from_millis(
                self.node_session_timeout_ms.max(self.raft_heartbeat_ms * 2),
            ),
            preferred_leader_check: std::time::Duration::from_millis(
                self.preferred_leader_check_ms.max(100),
            ),
            routes: crate::cluster::network::Routes::new(self.peer_routes.clone()),
        }))
    }

    /// The Kafka listeners: `listeners`, or one plaintext listener on `kafka_addr` advertised
    /// as `advertised_host`/`advertised_port`. Names are unique; in a cluster the first carries
    /// the traffic between nodes, which is plaintext for now.
    pub fn kafka_listeners(&self) -> Result<Vec<ListenerSettings>> {
        if self.listeners.is_empty() {
            return Ok(vec![ListenerSettings {
                name: None,
                address: self.kafka_addr.clone(),
                protocol: SecurityProtocol::Plaintext,
                advertised: None,
                sasl_mechanisms: None,
            }]);
        }
        // Mechanisms and TLS files are checked where each listener is built (security::Listener).
        let mut names = std::collections::BTreeSet::new();
        for l in &self.listeners {
            anyhow::ensure!(
                names.insert(l.name()),
                "listener name {} is used twice",
                l.name()
            );
        }
        if self.voters.is_some() && self.listeners[0].protocol != SecurityProtocol::Plaintext {
            anyhow::bail!(
                "in a cluster the first listener carries the traffic between nodes and must be PLAINTEXT; {} is {}",
                self.listeners[0].name(),
                self.listeners[0].protocol.name()
            );
        }
        Ok(self.listeners.clone())
    }

    pub fn auth_settings(&self) -> AuthSettings {
        AuthSettings {
            failed_delay: std::time::Duration::from_millis(
                self.connection_failed_authentication_delay_ms,
            ),
            max_failures_per_minute: self.max_failed_authentications_per_minute.max(1),
            max_reauth: (self.connections_max_reauth_ms > 0)
                .then(|| std::time::Duration::from_millis(self.connections_max_reauth_ms)),
        }
    }

    pub fn log_defaults(&self) -> Result<LogConfig> {
        Ok(LogConfig::default().with_overrides(&self.topic_defaults)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_errors_name_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("weir.yaml");
        std::fs::write(&p, "data_dir: /tmp/x\nkafka_adr: 1\n").unwrap();
        let e = Settings::load(&p).unwrap_err().to_string();
        assert!(e.contains("weir.yaml:2:"), "{e}");
        assert!(e.contains("kafka_adr"), "{e}");
        std::fs::write(&p, "topic_defaults:\n  retention.ms: soon\n").unwrap();
        let e = format!("{:#}", Settings::load(&p).unwrap_err());
        assert!(e.contains("retention.ms"), "{e}");
        std::fs::write(
            &p,
            "default_partitions: 3\ntopic_defaults:\n  segment.bytes: '1048576'\n",
        )
        .unwrap();
        let s = Settings::load(&p).unwrap();
        assert_eq!(s.default_partitions, 3);
        assert_eq!(s.log_defaults().unwrap().segment_bytes, 1 << 20);
    }
}
