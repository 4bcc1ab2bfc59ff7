//! Harness for fuzzing weir's Kafka request path (`weir::kafka::server::handle_frame`), shared by
//! the `request_frame` fuzz target and the seed corpus generator (`examples/gen_seeds.rs`).
//!
//! One broker over a scratch data directory serves every input. Automatic topic creation is off,
//! so random Produce/Metadata requests do not create topics; a few topics are pre-created so the
//! produce, fetch and admin paths reach real partitions. Inputs may still change the broker's
//! state (CreateTopics, DeleteTopics, config changes, appended records), so the broker is rebuilt
//! from scratch whenever that state drifts too far (see [`Harness::needs_reset`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Encodable, StrBytes};
use kafka_protocol::records::Compression;
use weir::kafka::server::{handle_frame, ConnectionError};
use weir::kafka::Broker;
use weir::log::batch::BatchBuilder;
use weir::log::manager::LogManager;

/// Topics every broker starts with: (name, partitions).
pub const TOPICS: &[(&str, i32)] = &[("fuzz-a", 1), ("fuzz-b", 3)];

/// How long one input may run. A well-formed long-poll Fetch parks until its max_wait; the clock
/// is paused (it jumps ahead whenever the runtime is idle), so this costs no wall-clock time.
pub const INPUT_TIMEOUT: Duration = Duration::from_millis(10);

/// Topics beyond [`TOPICS`] tolerated before the broker is rebuilt.
const MAX_EXTRA_TOPICS: usize = 32;
/// Partitions in all tolerated before the broker is rebuilt.
const MAX_PARTITIONS_TOTAL: usize = 256;
/// Inputs one broker serves before it is rebuilt (bounds the data appended by Produce inputs).
const MAX_RUNS_PER_BROKER: u64 = 20_000;

pub struct Harness {
    pub broker: Broker,
    runs: u64,
    // Dropped after the broker: removes the data directory.
    _dir: tempfile::TempDir,
}

impl Harness {
    /// A broker over a fresh data directory (in /dev/shm when available: topic creation fsyncs)
    /// with [`TOPICS`] created.
    pub fn new() -> Harness {
        let dir = tempfile::Builder::new()
            .prefix("weir-fuzz-")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::Builder::new().prefix("weir-fuzz-").tempdir())
            .expect("cannot create a scratch data directory");
        let log = LogManager::open(dir.path(), Default::default()).expect("cannot open the log");
        for &(name, partitions) in TOPICS {
            log.create_topic(name, partitions, 1, Default::default())
                .expect("cannot create a seed topic");
        }
        Harness {
            broker: Broker {
                node_id: 0,
                cluster_id: "weir-fuzz".into(),
                advertised_host: "127.0.0.1".into(),
                advertised_port: 9092,
                log: Arc::new(log),
                auto_create_topics: false,
                default_partitions: 1,
            },
            runs: 0,
            _dir: dir,
        }
    }

    /// Whether inputs have moved the broker too far from its initial state.
    fn needs_reset(&self) -> bool {
        if self.runs >= MAX_RUNS_PER_BROKER {
            return true;
        }
        let topics = self.broker.log.topics();
        topics.len() > TOPICS.len() + MAX_EXTRA_TOPICS
            || topics.iter().map(|t| t.partitions.len()).sum::<usize>() > MAX_PARTITIONS_TOTAL
            || TOPICS
                .iter()
                .any(|&(name, _)| self.broker.log.topic(name).is_none())
    }
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

/// A current-thread runtime on a paused clock, shared by all inputs.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("cannot build the tokio runtime")
    })
}

fn peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40000))
}

/// Runs one frame (a request without its 4-byte size prefix) through `handle_frame`.
/// None: the input timed out (a parked long poll).
pub fn handle(
    harness: &Harness,
    frame: &[u8],
) -> Option<Result<Option<Vec<weir::kafka::fetch_encode::Piece>>, ConnectionError>> {
    let frame = Bytes::copy_from_slice(frame);
    runtime().block_on(async {
        tokio::time::timeout(INPUT_TIMEOUT, handle_frame(&harness.broker, frame, peer()))
            .await
            .ok()
    })
}

/// The fuzz target's body: any outcome but a panic (or a crash) is acceptable.
pub fn fuzz_one(data: &[u8]) {
    // The connection reader rejects frames outside this range before handle_frame sees them.
    if data.len() < 8 || data.len() > weir::kafka::server::MAX_FRAME_BYTES as usize {
        return;
    }
    static HARNESS: OnceLock<Mutex<Harness>> = OnceLock::new();
    let mut harness = HARNESS
        .get_or_init(|| Mutex::new(Harness::new()))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if harness.needs_reset() {
        *harness = Harness::new();
    }
    harness.runs += 1;
    let _ = handle(&harness, data);
}

// ---- seed corpus ----

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

/// Encodes a request frame (header and body, without the size prefix).
pub fn encode_frame(key: ApiKey, version: i16, correlation_id: i32, request: &RequestKind) -> Vec<u8> {
    let mut buf = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(s("weir-fuzz")))
        .encode(&mut buf, key.request_header_version(version))
        .unwrap_or_else(|e| panic!("cannot encode a {key:?} v{version} header: {e}"));
    request
        .encode(&mut buf, version)
        .unwrap_or_else(|e| panic!("cannot encode a {key:?} v{version} request: {e}"));
    buf.to_vec()
}

fn batch(compression: Compression, records: usize) -> Bytes {
    let mut b = BatchBuilder::new(1_700_000_000_000);
    for i in 0..records {
        let key = format!("key-{i}");
        let value = format!("value-{i}-{}", "x".repeat(i * 7));
        let headers: &[(&[u8], Option<&[u8]>)] = if i % 2 == 0 {
            &[(b"h1", Some(b"v1")), (b"h2", None)]
        } else {
            &[]
        };
        b.push(
            Some(key.as_bytes()),
            (i != 2).then_some(value.as_bytes()),
            headers,
            1_700_000_000_000 + i as i64,
        );
    }
    Bytes::from(b.finish(compression))
}

fn produce(acks: i16, topic: &str, partition: i32, records: Bytes) -> RequestKind {
    RequestKind::Produce(
        ProduceRequest::default()
            .with_acks(acks)
            .with_timeout_ms(1000)
            .with_topic_data(vec![produce_request::TopicProduceData::default()
                .with_name(name(topic))
                .with_partition_data(vec![produce_request::PartitionProduceData::default()
                    .with_index(partition)
                    .with_records(Some(records))])]),
    )
}

fn fetch(max_wait_ms: i32, min_bytes: i32, offset: i64) -> RequestKind {
    RequestKind::Fetch(
        FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_wait_ms(max_wait_ms)
            .with_min_bytes(min_bytes)
            .with_max_bytes(1 << 20)
            .with_topics(vec![
                fetch_request::FetchTopic::default()
                    .with_topic(name("fuzz-a"))
                    .with_partitions(vec![fetch_request::FetchPartition::default()
                        .with_partition(0)
                        .with_fetch_offset(offset)
                        .with_partition_max_bytes(1 << 20)]),
                fetch_request::FetchTopic::default()
                    .with_topic(name("fuzz-b"))
                    .with_partitions(vec![
                        fetch_request::FetchPartition::default()
                            .with_partition(1)
                            .with_partition_max_bytes(4096),
                        fetch_request::FetchPartition::default().with_partition(7),
                    ]),
            ]),
    )
}

fn metadata(topics: Option<&[&str]>) -> RequestKind {
    RequestKind::Metadata(
        MetadataRequest::default()
            .with_topics(topics.map(|ts| {
                ts.iter()
                    .map(|t| metadata_request::MetadataRequestTopic::default().with_name(Some(name(t))))
                    .collect()
            }))
            .with_allow_auto_topic_creation(true),
    )
}

fn list_offsets() -> RequestKind {
    RequestKind::ListOffsets(
        ListOffsetsRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_topics(vec![list_offsets_request::ListOffsetsTopic::default()
                .with_name(name("fuzz-b"))
                .with_partitions(
                    [(0, -1), (1, -2), (2, -3), (0, 1_700_000_000_000)]
                        .iter()
                        .map(|&(p, ts)| {
                            list_offsets_request::ListOffsetsPartition::default()
                                .with_partition_index(p)
                                .with_timestamp(ts)
                        })
                        .collect(),
                )]),
    )
}

fn create_topics(validate_only: bool) -> RequestKind {
    RequestKind::CreateTopics(
        CreateTopicsRequest::default()
            .with_timeout_ms(1000)
            .with_validate_only(validate_only)
            .with_topics(vec![
                create_topics_request::CreatableTopic::default()
                    .with_name(name("fuzz-new"))
                    .with_num_partitions(2)
                    .with_replication_factor(1)
                    .with_configs(vec![
                        create_topics_request::CreatableTopicConfig::default()
                            .with_name(s("retention.ms"))
                            .with_value(Some(s("60000"))),
                        create_topics_request::CreatableTopicConfig::default()
                            .with_name(s("cleanup.policy"))
                            .with_value(Some(s("compact"))),
                    ]),
                create_topics_request::CreatableTopic::default()
                    .with_name(name("fuzz-a"))
                    .with_num_partitions(-1)
                    .with_replication_factor(-1),
            ]),
    )
}

fn delete_topics(version: i16) -> RequestKind {
    let req = DeleteTopicsRequest::default().with_timeout_ms(1000);
    RequestKind::DeleteTopics(if version >= 6 {
        req.with_topics(vec![delete_topics_request::DeleteTopicState::default()
            .with_name(Some(name("fuzz-new")))])
    } else {
        req.with_topic_names(vec![name("fuzz-new"), name("missing")])
    })
}

fn describe_configs() -> RequestKind {
    RequestKind::DescribeConfigs(
        DescribeConfigsRequest::default()
            .with_include_synonyms(true)
            .with_include_documentation(true)
            .with_resources(vec![
                describe_configs_request::DescribeConfigsResource::default()
                    .with_resource_type(2)
                    .with_resource_name(s("fuzz-a"))
                    .with_configuration_keys(None),
                describe_configs_request::DescribeConfigsResource::default()
                    .with_resource_type(2)
                    .with_resource_name(s("fuzz-b"))
                    .with_configuration_keys(Some(vec![s("retention.ms"), s("segment.bytes")])),
                describe_configs_request::DescribeConfigsResource::default()
                    .with_resource_type(4)
                    .with_resource_name(s("0"))
                    .with_configuration_keys(None),
            ]),
    )
}

fn alter_configs() -> RequestKind {
    RequestKind::AlterConfigs(
        AlterConfigsRequest::default()
            .with_validate_only(false)
            .with_resources(vec![alter_configs_request::AlterConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(s("fuzz-b"))
                .with_configs(vec![
                    alter_configs_request::AlterableConfig::default()
                        .with_name(s("retention.ms"))
                        .with_value(Some(s("3600000"))),
                    alter_configs_request::AlterableConfig::default()
                        .with_name(s("segment.bytes"))
                        .with_value(Some(s("1048576"))),
                ])]),
    )
}

fn incremental_alter_configs() -> RequestKind {
    RequestKind::IncrementalAlterConfigs(
        IncrementalAlterConfigsRequest::default().with_resources(vec![
            incremental_alter_configs_request::AlterConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(s("fuzz-a"))
                .with_configs(vec![
                    incremental_alter_configs_request::AlterableConfig::default()
                        .with_name(s("cleanup.policy"))
                        .with_config_operation(2)
                        .with_value(Some(s("compact"))),
                    incremental_alter_configs_request::AlterableConfig::default()
                        .with_name(s("retention.bytes"))
                        .with_config_operation(1)
                        .with_value(None),
                ]),
        ]),
    )
}

fn create_partitions(validate_only: bool) -> RequestKind {
    RequestKind::CreatePartitions(
        CreatePartitionsRequest::default()
            .with_timeout_ms(1000)
            .with_validate_only(validate_only)
            .with_topics(vec![create_partitions_request::CreatePartitionsTopic::default()
                .with_name(name("fuzz-b"))
                .with_count(4)
                .with_assignments(None)]),
    )
}

/// The seed corpus: (file name, frame). Valid requests for every API weir implements, at its
/// lowest and highest version where they differ in shape, plus one KIP-511 probe (ApiVersions
/// at an unsupported version).
pub fn seed_frames() -> Vec<(String, Vec<u8>)> {
    let mut seeds: Vec<(ApiKey, i16, &str, RequestKind)> = vec![
        (
            ApiKey::ApiVersions,
            3,
            "",
            RequestKind::ApiVersions(
                ApiVersionsRequest::default()
                    .with_client_software_name(s("weir-fuzz"))
                    .with_client_software_version(s("0.0.0")),
            ),
        ),
        (ApiKey::ApiVersions, 0, "", RequestKind::ApiVersions(ApiVersionsRequest::default())),
        (ApiKey::Metadata, 12, "", metadata(Some(&["fuzz-a", "fuzz-b", "missing"]))),
        (ApiKey::Metadata, 12, "all", metadata(None)),
        (ApiKey::Metadata, 0, "", metadata(Some(&["fuzz-a"]))),
        (ApiKey::Produce, 9, "", produce(-1, "fuzz-a", 0, batch(Compression::None, 3))),
        (ApiKey::Produce, 9, "gzip", produce(1, "fuzz-b", 1, batch(Compression::Gzip, 4))),
        (ApiKey::Produce, 9, "zstd", produce(1, "fuzz-b", 2, batch(Compression::Zstd, 4))),
        (ApiKey::Produce, 9, "acks0", produce(0, "fuzz-a", 0, batch(Compression::None, 1))),
        (ApiKey::Produce, 3, "", produce(1, "fuzz-b", 0, batch(Compression::Snappy, 2))),
        (ApiKey::Fetch, 12, "", fetch(0, 0, 0)),
        (ApiKey::Fetch, 12, "longpoll", fetch(500, 1 << 16, 0)),
        (ApiKey::Fetch, 4, "", fetch(0, 1, 0)),
        (ApiKey::ListOffsets, 7, "", list_offsets()),
        (ApiKey::ListOffsets, 1, "", list_offsets()),
        (ApiKey::CreateTopics, 7, "", create_topics(false)),
        (ApiKey::CreateTopics, 2, "validate", create_topics(true)),
        (ApiKey::DeleteTopics, 6, "", delete_topics(6)),
        (ApiKey::DeleteTopics, 1, "", delete_topics(1)),
        (ApiKey::DescribeConfigs, 4, "", describe_configs()),
        (ApiKey::DescribeConfigs, 1, "", describe_configs()),
        (ApiKey::AlterConfigs, 2, "", alter_configs()),
        (ApiKey::CreatePartitions, 3, "", create_partitions(false)),
        (ApiKey::CreatePartitions, 0, "validate", create_partitions(true)),
        (ApiKey::IncrementalAlterConfigs, 1, "", incremental_alter_configs()),
        (ApiKey::DescribeCluster, 1, "", RequestKind::DescribeCluster(DescribeClusterRequest::default())),
    ]
    .into_iter()
    .collect();
    let mut out: Vec<(String, Vec<u8>)> = seeds
        .drain(..)
        .enumerate()
        .map(|(i, (key, version, tag, request))| {
            let tag = if tag.is_empty() { String::new() } else { format!("-{tag}") };
            (
                format!("{:02}-{key:?}-v{version}{tag}", i),
                encode_frame(key, version, i as i32 + 1, &request),
            )
        })
        .collect();
    // ApiVersions v99: answered in v0 with UNSUPPORTED_VERSION before the body is decoded.
    let mut probe = Vec::new();
    probe.extend_from_slice(&(ApiKey::ApiVersions as i16).to_be_bytes());
    probe.extend_from_slice(&99i16.to_be_bytes());
    probe.extend_from_slice(&1000i32.to_be_bytes());
    probe.extend_from_slice(&[0, 9]);
    probe.extend_from_slice(b"weir-fuzz");
    probe.push(0);
    out.push((format!("{:02}-ApiVersions-v99-unsupported", out.len()), probe));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed is accepted: it decodes, is handled without a protocol error, and gets a
    /// response (except the acks=0 produce, which gets none).
    #[test]
    fn seeds_are_valid_requests() {
        let harness = Harness::new();
        for (file, frame) in seed_frames() {
            let outcome = handle(&harness, &frame);
            let outcome = outcome.unwrap_or_else(|| panic!("{file}: timed out"));
            let pieces = outcome.unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(pieces.is_none(), file.contains("acks0"), "{file}");
        }
    }

    #[test]
    fn short_and_garbage_frames_are_skipped_or_rejected() {
        for data in [&b""[..], b"\0\0\0", b"\0\x12\0\x03\0\0\0", &[0xff; 64]] {
            fuzz_one(data);
        }
    }
}
