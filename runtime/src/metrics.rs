//! Prometheus metrics, served as text at `GET /metrics` (docs/operations.md lists them).
//!
//! Two kinds: instruments updated where things happen (requests, bytes, fsyncs, commits,
//! transactions), held in one process-wide registry; and gauges read from the broker's state
//! when Prometheus scrapes (offsets, sizes, group lag, pipeline counts), so that nothing is kept
//! twice.

use std::collections::HashMap;
use std::sync::{LazyLock, OnceLock};

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::ApiKey;
use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::kafka::Broker;
use crate::pipeline::PipelineManager;

/// Request and fsync latencies: 100 µs to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// The instruments updated as things happen.
pub struct Instruments {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_errors: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub connections: IntGauge,
    pub connections_accepted: IntCounter,
    pub received_bytes: IntCounter,
    pub sent_bytes: IntCounter,
    pub produced_records: IntCounterVec,
    pub produced_bytes: IntCounterVec,
    pub fsync_seconds: Histogram,
    pub retention_deleted_segments: IntCounter,
    pub compactions: IntCounter,
    pub offset_commits: IntCounterVec,
    pub transactions: IntCounterVec,
    pub transaction_timeouts: IntCounter,
    pub hanging_transactions_aborted: IntCounter,
    pub plugin_calls: IntCounterVec,
    pub plugin_records_in: IntCounterVec,
    pub plugin_records_out: IntCounterVec,
    pub plugin_faults: IntCounterVec,
    pub plugin_restarts: IntCounterVec,
    pub plugin_fuel: IntCounterVec,
    pub pipeline_retries: IntCounterVec,
    pub pipeline_commit_seconds: HistogramVec,
    pub pipeline_batch_seconds: HistogramVec,
    pub authentications: IntCounterVec,
    pub authentication_failures: IntCounterVec,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn histogram(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric")
}

impl Instruments {
    fn new() -> Instruments {
        let m = Instruments {
            registry: Registry::new(),
            authentications: counter(
                "weir_kafka_authentications_total",
                "Successful SASL logins (re-authentications included), by listener and mechanism.",
                &["listener", "mechanism"],
            ),
            authentication_failures: counter(
                "weir_kafka_authentication_failures_total",
                "Failed SASL logins (wrong password, unknown user, malformed or throttled), by listener.",
                &["listener"],
            ),
            requests: counter(
                "weir_kafka_requests_total",
                "Kafka protocol requests handled, by API and version.",
                &["api", "version"],
            ),
            request_errors: counter(
                "weir_kafka_request_errors_total",
                "Error codes in Kafka protocol responses (one a partition or a key), by API and Kafka error name.",
                &["api", "error"],
            ),
            request_seconds: histogram(
                "weir_kafka_request_duration_seconds",
                "Time from a decoded request to its response, by API (long polls and acks=all waits included).",
                &["api"],
            ),
            connections: IntGauge::new(
                "weir_kafka_connections",
                "Open Kafka protocol connections.",
            )
            .expect("valid metric"),
            connections_accepted: IntCounter::new(
                "weir_kafka_connections_accepted_total",
                "Kafka protocol connections accepted.",
            )
            .expect("valid metric"),
            received_bytes: IntCounter::new(
                "weir_kafka_received_bytes_total",
                "Bytes of Kafka protocol requests received.",
            )
            .expect("valid metric"),
            sent_bytes: IntCounter::new(
                "weir_kafka_sent_bytes_total",
                "Bytes of Kafka protocol responses sent (fetched records included).",
            )
            .expect("valid metric"),
            produced_records: counter(
                "weir_produced_records_total",
                "Records appended by producers (retried duplicates not counted), by topic.",
                &["topic"],
            ),
            produced_bytes: counter(
                "weir_produced_bytes_total",
                "Bytes of record batches appended by producers, by topic.",
                &["topic"],
            ),
            fsync_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "weir_log_fsync_duration_seconds",
                    "Time an fsync of a partition's segment files took.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            retention_deleted_segments: IntCounter::new(
                "weir_log_retention_deleted_segments_total",
                "Segments deleted by retention (retention.ms, retention.bytes).",
            )
            .expect("valid metric"),
            compactions: IntCounter::new(
                "weir_log_compactions_total",
                "Compaction passes that rewrote a partition.",
            )
            .expect("valid metric"),
            offset_commits: counter(
                "weir_group_offset_commits_total",
                "Partition offsets committed, by group (transactional commits when their transaction commits).",
                &["group"],
            ),
            transactions: counter(
                "weir_transactions_total",
                "Transactions ended (their markers written), by outcome: committed or aborted.",
                &["outcome"],
            ),
            transaction_timeouts: IntCounter::new(
                "weir_transactions_timed_out_total",
                "Transactions the coordinator aborted for exceeding their timeout (also counted as aborted).",
            )
            .expect("valid metric"),
            hanging_transactions_aborted: IntCounter::new(
                "weir_hanging_transactions_aborted_total",
                "Transactions found open in a partition that their coordinator did not hold open there, and aborted.",
            )
            .expect("valid metric"),
            plugin_calls: counter(
                "weir_plugin_calls_total",
                "Batches a pipeline's WASM plugin was called with, by pipeline and plugin.",
                &["pipeline", "plugin"],
            ),
            plugin_records_in: counter(
                "weir_plugin_records_in_total",
                "Records given to a plugin.",
                &["pipeline", "plugin"],
            ),
            plugin_records_out: counter(
                "weir_plugin_records_out_total",
                "Records a plugin produced.",
                &["pipeline", "plugin"],
            ),
            plugin_faults: counter(
                "weir_plugin_faults_total",
                "Records a plugin failed, by kind (plugin-error, panic, cpu-budget, memory-limit, stack-overflow, trap, bad-output).",
                &["pipeline", "plugin", "kind"],
            ),
            plugin_restarts: counter(
                "weir_plugin_restarts_total",
                "Plugin instances replaced after a fault that left them unusable.",
                &["pipeline", "plugin"],
            ),
            plugin_fuel: counter(
                "weir_plugin_fuel_consumed_total",
                "Fuel (wasmtime's count of executed instructions, the unit of the CPU budget) a plugin's calls consumed.",
                &["pipeline", "plugin"],
            ),
            pipeline_retries: counter(
                "weir_pipeline_retries_total",
                "Transient failures a pipeline's stage waited out and retried, by stage (source, sinks[N]).",
                &["pipeline", "stage"],
            ),
            pipeline_commit_seconds: histogram(
                "weir_pipeline_commit_duration_seconds",
                "Time to commit one batch, retries included: the source's transaction (records, dead letters, source offset) or a sink's write and commit, by stage (source, sinks[N]).",
                &["pipeline", "stage"],
            ),
            pipeline_batch_seconds: histogram(
                "weir_pipeline_batch_duration_seconds",
                "Time from a source's batch being read to its commit: transforms, the wait behind the batches before it, and the commit.",
                &["pipeline"],
            ),
        };
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(m.authentications.clone()),
            Box::new(m.authentication_failures.clone()),
            Box::new(m.requests.clone()),
            Box::new(m.request_errors.clone()),
            Box::new(m.request_seconds.clone()),
            Box::new(m.connections.clone()),
            Box::new(m.connections_accepted.clone()),
            Box::new(m.received_bytes.clone()),
            Box::new(m.sent_bytes.clone()),
            Box::new(m.produced_records.clone()),
            Box::new(m.produced_bytes.clone()),
            Box::new(m.fsync_seconds.clone()),
            Box::new(m.retention_deleted_segments.clone()),
            Box::new(m.compactions.clone()),
            Box::new(m.offset_commits.clone()),
            Box::new(m.transactions.clone()),
            Box::new(m.transaction_timeouts.clone()),
            Box::new(m.hanging_transactions_aborted.clone()),
            Box::new(m.plugin_calls.clone()),
            Box::new(m.plugin_records_in.clone()),
            Box::new(m.plugin_records_out.clone()),
            Box::new(m.plugin_faults.clone()),
            Box::new(m.plugin_restarts.clone()),
            Box::new(m.plugin_fuel.clone()),
            Box::new(m.pipeline_retries.clone()),
            Box::new(m.pipeline_commit_seconds.clone()),
            Box::new(m.pipeline_batch_seconds.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("metric names are unique");
        m
    }

    /// The series of one plugin stage of a pipeline, looked up once.
    pub fn plugin(&self, pipeline: &str, plugin: &str) -> PluginSeries {
        let labels = [pipeline, plugin];
        PluginSeries {
            calls: self.plugin_calls.with_label_values(&labels),
            records_in: self.plugin_records_in.with_label_values(&labels),
            records_out: self.plugin_records_out.with_label_values(&labels),
            restarts: self.plugin_restarts.with_label_values(&labels),
            fuel: self.plugin_fuel.with_label_values(&labels),
            labels: labels.map(str::to_string),
        }
    }

    /// What a plugin stage of a pipeline has counted since this process started, for the
    /// HTTP API: calls, records in and out, faults by kind, fuel and restarts.
    pub fn plugin_counts(&self, pipeline: &str, plugin: &str) -> serde_json::Value {
        let labels = [pipeline, plugin];
        let faults: serde_json::Map<String, serde_json::Value> = weir_wasm::FaultKind::ALL
            .iter()
            .map(|k| {
                let n = self
                    .plugin_faults
                    .with_label_values(&[pipeline, plugin, k.as_str()])
                    .get();
                (k.as_str().to_string(), n)
            })
            .filter(|(_, n)| *n != 0)
            .map(|(k, n)| (k, n.into()))
            .collect();
        serde_json::json!({
            "calls": self.plugin_calls.with_label_values(&labels).get(),
            "records_in": self.plugin_records_in.with_label_values(&labels).get(),
            "records_out": self.plugin_records_out.with_label_values(&labels).get(),
            "faults": faults,
            "fuel": self.plugin_fuel.with_label_values(&labels).get(),
            "restarts": self.plugin_restarts.with_label_values(&labels).get(),
        })
    }

    /// Counts the error codes of one response.
    pub fn count_errors(&self, api: &str, codes: impl IntoIterator<Item = i16>) {
        for code in codes {
            if code != 0 {
                self.request_errors
                    .with_label_values(&[api, &error_name(code)])
                    .inc();
            }
        }
    }
}

/// A plugin stage's counters (see [`Instruments::plugin`]).
pub struct PluginSeries {
    pub calls: IntCounter,
    pub records_in: IntCounter,
    pub records_out: IntCounter,
    pub restarts: IntCounter,
    pub fuel: IntCounter,
    labels: [String; 2],
}

impl PluginSeries {
    /// Counts a record the plugin failed, by the fault's kind.
    pub fn fault(&self, kind: &str) {
        get()
            .plugin_faults
            .with_label_values(&[self.labels[0].as_str(), self.labels[1].as_str(), kind])
            .inc();
    }
}

static INSTRUMENTS: LazyLock<Instruments> = LazyLock::new(Instruments::new);

/// One Kafka API's series, each looked up on its first request rather than on every one (a
/// series appears once it has something to count).
pub struct ApiSeries {
    /// The API's name as Kafka spells it in its own metrics (Produce, FindCoordinator).
    pub name: String,
    lowest_version: i16,
    requests: Vec<OnceLock<IntCounter>>,
    seconds: OnceLock<Histogram>,
}

impl ApiSeries {
    /// Counts one request of `version` that took `seconds`.
    pub fn observe(&self, version: i16, seconds: f64) {
        let m = get();
        let index = usize::try_from(version - self.lowest_version).ok();
        if let Some(slot) = index.and_then(|i| self.requests.get(i)) {
            slot.get_or_init(|| {
                m.requests
                    .with_label_values(&[self.name.as_str(), &version.to_string()])
            })
            .inc();
        }
        self.seconds
            .get_or_init(|| m.request_seconds.with_label_values(&[self.name.as_str()]))
            .observe(seconds);
    }
}

/// The series of a supported API (None for others, which are refused before they are handled).
pub fn api(key: ApiKey) -> Option<&'static ApiSeries> {
    static APIS: LazyLock<HashMap<i16, ApiSeries>> = LazyLock::new(|| {
        crate::kafka::apis::SUPPORTED
            .iter()
            .map(|&(k, lo, hi)| {
                let series = ApiSeries {
                    // ApiKey's Debug is its variant name.
                    name: format!("{k:?}"),
                    lowest_version: lo,
                    requests: (lo..=hi).map(|_| OnceLock::new()).collect(),
                    seconds: OnceLock::new(),
                };
                (k as i16, series)
            })
            .collect()
    });
    APIS.get(&(key as i16))
}

/// The process-wide instruments.
pub fn get() -> &'static Instruments {
    &INSTRUMENTS
}

/// Kafka's name of an error code (NOT_LEADER_OR_FOLLOWER), or the number when unknown.
pub fn error_name(code: i16) -> String {
    match ResponseError::try_from_code(code) {
        Some(ResponseError::Unknown(_)) | None => code.to_string(),
        Some(e) => upper_snake(&format!("{e:?}")),
    }
}

fn upper_snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 8);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// What `GET /metrics` includes besides the instruments.
#[derive(Debug, Clone, Copy)]
pub struct ScrapeOptions {
    /// Series per partition (offsets, sizes, group lag by partition); off for large
    /// deployments, where the per-topic and per-group sums remain.
    pub per_partition: bool,
}

/// The whole exposition, in Prometheus's text format.
pub async fn render(
    broker: &Broker,
    pipelines: Option<&PipelineManager>,
    options: ScrapeOptions,
) -> String {
    let mut families = get().registry.gather();
    families.extend(state_gauges(broker, options));
    if let Some(p) = pipelines {
        families.extend(pipeline_series(p).await);
    }
    // A family with no series (no groups yet, say) is left out: the text format has no way to
    // write it.
    families.retain(|f| !f.get_metric().is_empty());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        tracing::error!(error = %e, "cannot encode the metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

/// Gauges read from the log, the groups, the transactions and the cluster.
fn state_gauges(broker: &Broker, options: ScrapeOptions) -> Vec<MetricFamily> {
    let per_partition = |name: &str, help: &str| gauge(name, help, &["topic", "partition"]);
    let start = per_partition(
        "weir_partition_log_start_offset",
        "First offset a partition holds.",
    );
    let end = per_partition(
        "weir_partition_log_end_offset",
        "Offset the next record of a partition gets.",
    );
    let hw = per_partition(
        "weir_partition_high_watermark",
        "Offset consumers may read up to (replicated to the in-sync replicas).",
    );
    let size = per_partition(
        "weir_partition_size_bytes",
        "Bytes of a partition's segment files.",
    );
    let segments = per_partition("weir_partition_segments", "Segment files of a partition.");
    let topic_size = gauge(
        "weir_topic_size_bytes",
        "Bytes of a topic's segment files on this node.",
        &["topic"],
    );
    let partitions = gauge(
        "weir_topic_partitions",
        "Partitions of a topic held on this node.",
        &["topic"],
    );
    for t in broker.log.topics() {
        let mut total = 0u64;
        for p in &t.partitions {
            let bytes = p.size_bytes();
            total += bytes;
            if options.per_partition {
                let labels = [&*t.name, &p.id.to_string()];
                start.with_label_values(&labels).set(p.log_start_offset());
                end.with_label_values(&labels).set(p.log_end_offset());
                hw.with_label_values(&labels).set(p.high_watermark());
                size.with_label_values(&labels).set(bytes as i64);
                segments
                    .with_label_values(&labels)
                    .set(p.segment_count() as i64);
            }
        }
        topic_size.with_label_values(&[&*t.name]).set(total as i64);
        partitions
            .with_label_values(&[&*t.name])
            .set(t.partitions.len() as i64);
    }

    let members = gauge(
        "weir_group_members",
        "Members of a consumer group coordinated by this node.",
        &["group"],
    );
    let state = gauge(
        "weir_group_state",
        "1 for the state a consumer group is in (Empty, PreparingRebalance, CompletingRebalance, Stable).",
        &["group", "state"],
    );
    let lag = gauge(
        "weir_group_lag_records",
        "Records between a group's committed offsets and the high watermarks of the partitions this node leads.",
        &["group"],
    );
    let partition_lag = gauge(
        "weir_group_partition_lag_records",
        "Records between a group's committed offset and the high watermark, per partition this node leads.",
        &["group", "topic", "partition"],
    );
    if broker.groups.is_active() {
        for (id, _, s) in broker.groups.list() {
            let count = broker
                .groups
                .with_group(&id, |g| g.member_views().len())
                .unwrap_or(0);
            members.with_label_values(&[&id]).set(count as i64);
            state.with_label_values(&[&id, s.name()]).set(1);
            let mut sum = 0i64;
            for l in broker.group_lag(&id) {
                sum += l.lag;
                if options.per_partition {
                    partition_lag
                        .with_label_values(&[&id, &l.topic, &l.partition.to_string()])
                        .set(l.lag);
                }
            }
            lag.with_label_values(&[&id]).set(sum);
        }
    }

    let ongoing = IntGauge::new(
        "weir_transactions_ongoing",
        "Transactions begun and not yet ended, coordinated by this node.",
    )
    .expect("valid metric");
    ongoing.set(broker.txns.ongoing() as i64);

    let fetch_sessions = IntGauge::new(
        "weir_fetch_sessions",
        "Incremental fetch sessions (KIP-227) this node keeps for consumers.",
    )
    .expect("valid metric");
    fetch_sessions.set(broker.fetch_sessions.len() as i64);

    let mut out = Vec::new();
    for c in [
        &start as &dyn Collector,
        &end,
        &hw,
        &size,
        &segments,
        &topic_size,
        &partitions,
        &members,
        &state,
        &lag,
        &partition_lag,
        &ongoing,
        &fetch_sessions,
    ] {
        out.extend(c.collect());
    }
    if let Some(cluster) = &broker.cluster {
        let image = cluster.image();
        let nodes = IntGauge::new("weir_cluster_nodes", "Nodes registered in the cluster.")
            .expect("valid metric");
        nodes.set(image.nodes.len() as i64);
        let fenced = IntGauge::new(
            "weir_cluster_fenced_nodes",
            "Registered nodes fenced for missing their heartbeats.",
        )
        .expect("valid metric");
        fenced.set(image.nodes.values().filter(|n| n.fenced).count() as i64);
        let controller = IntGauge::new(
            "weir_cluster_controller",
            "1 when this node is the controller (the metadata quorum's Raft leader).",
        )
        .expect("valid metric");
        controller.set((cluster.raft_leader() == Some(cluster.node_id)) as i64);
        let leaders = IntGauge::new(
            "weir_cluster_partition_leaders",
            "Partitions this node leads.",
        )
        .expect("valid metric");
        leaders.set(
            image
                .topics
                .values()
                .flat_map(|t| &t.partitions)
                .filter(|p| p.leader == cluster.node_id)
                .count() as i64,
        );
        for g in [&nodes, &fenced, &controller, &leaders] {
            out.extend(g.collect());
        }
    }
    out
}

/// Per pipeline: its state and the counts its status keeps.
async fn pipeline_series(pipelines: &PipelineManager) -> Vec<MetricFamily> {
    let state = gauge(
        "weir_pipeline_state",
        "1 for the state a pipeline is in (running, finished, failed, stopped).",
        &["pipeline", "state"],
    );
    let invalid = gauge(
        "weir_pipeline_file_invalid",
        "1 when a pipeline file's current content is refused (the previous version may still run).",
        &["file"],
    );
    let records_in = counter(
        "weir_pipeline_records_in_total",
        "Records a pipeline's source delivered.",
        &["pipeline"],
    );
    let records_out = counter(
        "weir_pipeline_records_out_total",
        "Records a pipeline's sink wrote, by sink (its index in the file).",
        &["pipeline", "sink"],
    );
    let dead_letters = counter(
        "weir_pipeline_dead_letters_total",
        "Records a pipeline sent to its dead-letter topic.",
        &["pipeline"],
    );
    let lag_bytes = gauge(
        "weir_pipeline_source_lag_bytes",
        "Input bytes a pipeline's file source has not read yet, as of its last committed batch.",
        &["pipeline"],
    );
    let lag_records = gauge(
        "weir_pipeline_source_lag_records",
        "Records a pipeline's topic source (committed records) or SQL source (rows) has not read yet, as of its last committed batch.",
        &["pipeline"],
    );
    for f in pipelines.statuses().await {
        invalid
            .with_label_values(&[&f.file.display().to_string()])
            .set(f.invalid.is_some() as i64);
        let Some(s) = f.pipeline else { continue };
        state.with_label_values(&[&s.name, &s.state]).set(1);
        records_in
            .with_label_values(&[&s.name])
            .inc_by(s.records_in);
        for (i, n) in s.records_out.iter().enumerate() {
            records_out
                .with_label_values(&[&s.name, &i.to_string()])
                .inc_by(*n);
        }
        dead_letters
            .with_label_values(&[&s.name])
            .inc_by(s.dead_letters);
        match s.source_lag {
            Some(weir_connectors::Lag::Bytes(n)) => {
                lag_bytes.with_label_values(&[&s.name]).set(n as i64)
            }
            Some(weir_connectors::Lag::Records(n)) => {
                lag_records.with_label_values(&[&s.name]).set(n as i64)
            }
            None => {}
        }
    }
    let mut out = Vec::new();
    for c in [
        &state as &dyn Collector,
        &invalid,
        &records_in,
        &records_out,
        &dead_letters,
        &lag_bytes,
        &lag_records,
    ] {
        out.extend(c.collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_are_kafkas() {
        assert_eq!(error_name(6), "NOT_LEADER_OR_FOLLOWER");
        assert_eq!(error_name(19), "NOT_ENOUGH_REPLICAS");
        assert_eq!(error_name(-1), "UNKNOWN_SERVER_ERROR");
        assert_eq!(error_name(9999), "9999");
    }

    #[test]
    fn the_instruments_register_once_and_encode() {
        let m = get();
        m.requests.with_label_values(&["Produce", "9"]).inc();
        m.count_errors("Produce", [0, 6, 6]);
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&m.registry.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("weir_kafka_requests_total{api=\"Produce\",version=\"9\"}"));
        assert!(text.contains(
            "weir_kafka_request_errors_total{api=\"Produce\",error=\"NOT_LEADER_OR_FOLLOWER\"} 2"
        ));
        assert!(text.contains("# TYPE weir_log_fsync_duration_seconds histogram"));
    }
}
