//! Harness for fuzzing weir's Kafka request path (`weir::kafka::server::handle_frame`) and a
//! SASL listener's authentication (`weir::security::sasl::SaslSession`), shared by the
//! `request_frame` and `sasl_frames` fuzz targets and the seed corpus generator
//! (`examples/gen_seeds.rs`).
//!
//! One broker over a scratch data directory serves every input. Automatic topic creation is off,
//! so random Produce/Metadata requests do not create topics; a few topics are pre-created so the
//! produce, fetch and admin paths reach real partitions. The authorizer is on: requests with an
//! even correlation id come from a super user, the others from `User:fuzz`, whom a few ACLs
//! allow some things, so both sides of every authorization check are reached. One SCRAM user
//! exists for the SASL target. Inputs may still change the broker's state (CreateTopics,
//! DeleteTopics, config changes, appended records, ACLs), so the broker is rebuilt from scratch
//! whenever that state drifts too far (see [`Harness::needs_reset`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Encodable, StrBytes};
use kafka_protocol::records::Compression;
use weir::group::{GroupCoordinator, GroupSettings};
use weir::kafka::server::{handle_frame, ConnectionError, Peer};
use weir::kafka::Broker;
use weir::log::batch::BatchBuilder;
use weir::log::manager::LogManager;
use weir::security::acl::{
    AclBinding, Authorizer, AuthorizerSettings, Operation, PatternType, Permission, ResourceType,
};
use weir::security::sasl::{Intercept, SaslSession};
use weir::security::scram::{Mechanism, ScramCredential};
use weir::security::users::CredentialChange;
use weir::security::{AuthSettings, Listener, ListenerSettings, ANONYMOUS};

/// The principal of requests with an odd correlation id.
pub const FUZZ_PRINCIPAL: &str = "User:fuzz";
/// The SCRAM user that exists (SCRAM-SHA-256, and PLAIN).
pub const SASL_USER: &str = "alice";
pub const SASL_PASSWORD: &str = "alice-secret";

/// Topics every broker starts with: (name, partitions).
pub const TOPICS: &[(&str, i32)] = &[("fuzz-a", 1), ("fuzz-b", 3)];

/// How long one input may run. A well-formed long-poll Fetch parks until its max_wait; the clock
/// is paused (it jumps ahead whenever the runtime is idle), so this costs no wall-clock time.
pub const INPUT_TIMEOUT: Duration = Duration::from_millis(10);

/// Topics beyond [`TOPICS`] (and `__consumer_offsets`) tolerated before the broker is rebuilt.
const MAX_EXTRA_TOPICS: usize = 32;
/// Partitions in all tolerated before the broker is rebuilt.
const MAX_PARTITIONS_TOTAL: usize = 256;
/// ACLs tolerated (CreateAcls inputs add them) before the broker is rebuilt.
const MAX_ACLS: usize = 64;
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
        let log = Arc::new(
            LogManager::open(dir.path(), Default::default()).expect("cannot open the log"),
        );
        for &(name, partitions) in TOPICS {
            log.create_topic(name, partitions, 1, Default::default())
                .expect("cannot create a seed topic");
        }
        let groups = GroupCoordinator::open(
            log.clone(),
            GroupSettings {
                // Joins complete without waiting for more members.
                initial_rebalance_delay: Duration::ZERO,
                ..Default::default()
            },
        )
        .expect("cannot open the group coordinator");
        let mut broker =
            Broker::local(dir.path(), log, Arc::new(groups)).expect("cannot build the broker");
        broker.auto_create_topics = false;
        broker.authorizer = Authorizer::new(&AuthorizerSettings {
            enabled: true,
            super_users: vec![ANONYMOUS.to_string()],
            allow_everyone_if_no_acl_found: false,
        });
        let allow = |resource_type, name: &str, pattern, operation| AclBinding {
            resource_type,
            resource_name: name.into(),
            pattern,
            principal: FUZZ_PRINCIPAL.into(),
            host: "*".into(),
            operation,
            permission: Permission::Allow,
        };
        broker
            .acls
            .update(|acls| {
                acls.extend([
                    allow(
                        ResourceType::Topic,
                        "fuzz-",
                        PatternType::Prefixed,
                        Operation::Read,
                    ),
                    allow(
                        ResourceType::Topic,
                        "fuzz-a",
                        PatternType::Literal,
                        Operation::All,
                    ),
                    allow(
                        ResourceType::Group,
                        "g",
                        PatternType::Prefixed,
                        Operation::Read,
                    ),
                    allow(
                        ResourceType::TransactionalId,
                        "*",
                        PatternType::Literal,
                        Operation::Write,
                    ),
                ])
            })
            .expect("cannot store the ACLs");
        let m = Mechanism::Sha256;
        let salted = m.salted_password(SASL_PASSWORD.as_bytes(), b"fuzz-salt", 4096);
        broker
            .users
            .alter(&[CredentialChange::Upsert {
                user: SASL_USER.into(),
                mechanism: m,
                credential: ScramCredential::from_salted_password(m, b"fuzz-salt", 4096, &salted),
            }])
            .expect("cannot store the SCRAM user");
        Harness {
            broker,
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
        topics.len() > TOPICS.len() + 1 + MAX_EXTRA_TOPICS
            || topics.iter().map(|t| t.partitions.len()).sum::<usize>() > MAX_PARTITIONS_TOTAL
            || TOPICS
                .iter()
                .any(|&(name, _)| self.broker.log.topic(name).is_none())
            || self.broker.acls.get().len() > MAX_ACLS
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

/// The connection a frame arrives on: a super user for even correlation ids, else the
/// ACL-limited `User:fuzz`.
fn peer_for(frame: &[u8]) -> Peer {
    let odd = frame.get(7).is_some_and(|b| b & 1 == 1);
    Peer {
        addr: peer(),
        listener: "PLAINTEXT".into(),
        principal: if odd { FUZZ_PRINCIPAL } else { ANONYMOUS }.into(),
    }
}

/// Runs one frame (a request without its 4-byte size prefix) through `handle_frame`.
/// None: the input timed out (a parked long poll).
pub fn handle(
    harness: &Harness,
    frame: &[u8],
) -> Option<Result<Option<Vec<weir::kafka::fetch_encode::Piece>>, ConnectionError>> {
    let peer = peer_for(frame);
    let frame = Bytes::copy_from_slice(frame);
    runtime().block_on(async {
        tokio::time::timeout(INPUT_TIMEOUT, handle_frame(&harness.broker, frame, &peer))
            .await
            .ok()
    })
}

/// The shared harness, rebuilt when it has drifted too far.
fn harness() -> std::sync::MutexGuard<'static, Harness> {
    static HARNESS: OnceLock<Mutex<Harness>> = OnceLock::new();
    let mut harness = HARNESS
        .get_or_init(|| Mutex::new(Harness::new()))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if harness.needs_reset() {
        *harness = Harness::new();
    }
    harness.runs += 1;
    harness
}

/// The fuzz target's body: any outcome but a panic (or a crash) is acceptable.
pub fn fuzz_one(data: &[u8]) {
    // The connection reader rejects frames outside this range before handle_frame sees them.
    if data.len() < 8 || data.len() > weir::kafka::server::MAX_FRAME_BYTES as usize {
        return;
    }
    let harness = harness();
    let _ = handle(&harness, data);
    // The daemon runs this every 100 ms: session expiry and joins that came due.
    harness.broker.groups.tick();
}

/// A SASL_PLAINTEXT listener offering every mechanism, answering failures at once.
fn sasl_listener() -> Arc<Listener> {
    static LISTENER: OnceLock<Arc<Listener>> = OnceLock::new();
    LISTENER
        .get_or_init(|| {
            let settings = ListenerSettings::parse("SASL_PLAINTEXT://127.0.0.1:0")
                .expect("cannot parse the listener");
            let auth = AuthSettings {
                failed_delay: Duration::ZERO,
                max_failures_per_minute: u32::MAX,
                max_reauth: None,
            };
            Arc::new(Listener::new(&settings, None, auth).expect("cannot build the listener"))
        })
        .clone()
}

/// The handshake a SASL conversation opens with: none, SCRAM-SHA-256 (v1), PLAIN (v0, bare
/// tokens follow) or PLAIN (v1).
pub fn sasl_opening(choice: u8) -> Option<Vec<u8>> {
    let (version, mechanism) = match choice % 4 {
        1 => (1, "SCRAM-SHA-256"),
        2 => (0, "PLAIN"),
        3 => (1, "PLAIN"),
        _ => return None,
    };
    let request =
        RequestKind::SaslHandshake(SaslHandshakeRequest::default().with_mechanism(s(mechanism)));
    Some(encode_frame(ApiKey::SaslHandshake, version, 1, &request))
}

/// The `sasl_frames` target's body. The input is one connection to a SASL listener: its first
/// byte picks the opening handshake ([`sasl_opening`]), the rest is cut into frames, each
/// preceded by a one-byte length. The session must answer, pass or close, never panic; while no
/// login has succeeded it passes nothing but ApiVersions, and what it passes after a login is
/// handled as that user's request.
pub fn fuzz_sasl(data: &[u8]) {
    let Some((&choice, mut rest)) = data.split_first() else {
        return;
    };
    let harness = harness();
    let broker = &harness.broker;
    runtime().block_on(async {
        let mut session = SaslSession::new(sasl_listener(), peer());
        let mut frames: Vec<Bytes> = sasl_opening(choice).map(Bytes::from).into_iter().collect();
        while let Some((&len, tail)) = rest.split_first() {
            let (frame, next) = tail.split_at((len as usize).min(tail.len()));
            frames.push(Bytes::copy_from_slice(frame));
            rest = next;
        }
        for frame in frames {
            // The connection reader refuses shorter requests (raw tokens may be any length).
            if frame.len() < 8 && !session.expects_raw_token() {
                continue;
            }
            let outcome =
                tokio::time::timeout(INPUT_TIMEOUT, session.intercept(broker, frame)).await;
            match outcome {
                Ok(Intercept::Pass(request)) => {
                    let principal = session.principal();
                    if &*principal == ANONYMOUS {
                        assert_eq!(
                            i16::from_be_bytes([request[0], request[1]]),
                            ApiKey::ApiVersions as i16,
                            "a request other than ApiVersions passed before a login"
                        );
                    }
                    let peer = Peer {
                        addr: peer(),
                        listener: "SASL_PLAINTEXT".into(),
                        principal,
                    };
                    let _ =
                        tokio::time::timeout(INPUT_TIMEOUT, handle_frame(broker, request, &peer))
                            .await;
                }
                Ok(Intercept::Close(..)) => return,
                Ok(Intercept::Reply(_)) | Err(_) => {}
            }
        }
    });
}

#[cfg(feature = "mask-huge-allocs")]
mod huge_allocs {
    //! Allocations of [`HUGE`] bytes and more are lazily-committed anonymous mappings: only the
    //! pages written cost memory, so a vector pre-sized from a bogus wire count costs nothing.
    use std::alloc::{GlobalAlloc, Layout, System};

    const HUGE: usize = 256 << 20;

    fn is_huge(layout: &Layout) -> bool {
        layout.size() >= HUGE && layout.align() <= 4096
    }

    pub struct Allocator;

    unsafe impl GlobalAlloc for Allocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if !is_huge(&layout) {
                return System.alloc(layout);
            }
            let p = libc::mmap(
                std::ptr::null_mut(),
                layout.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                std::ptr::null_mut()
            } else {
                p.cast()
            }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if is_huge(&layout) {
                libc::munmap(ptr.cast(), layout.size());
            } else {
                System.dealloc(ptr, layout)
            }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let new = Layout::from_size_align_unchecked(new_size, layout.align());
            if !is_huge(&layout) && !is_huge(&new) {
                return System.realloc(ptr, layout, new_size);
            }
            let p = self.alloc(new);
            if !p.is_null() {
                std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            p
        }
    }

    #[global_allocator]
    static ALLOCATOR: Allocator = Allocator;
}

// ---- seed corpus ----

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

/// Encodes a request frame (header and body, without the size prefix).
pub fn encode_frame(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    request: &RequestKind,
) -> Vec<u8> {
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
                .with_partition_data(vec![
                    produce_request::PartitionProduceData::default()
                        .with_index(partition)
                        .with_records(Some(records)),
                ])]),
    )
}

/// A fetch from fuzz-a/0 and, unless `long_poll`, fuzz-b/1 and the missing fuzz-b/7 (an error
/// answers at once; a long poll parks until data or its max_wait).
fn fetch(max_wait_ms: i32, min_bytes: i32, offset: i64, long_poll: bool) -> RequestKind {
    let mut topics = vec![fetch_request::FetchTopic::default()
        .with_topic(name("fuzz-a"))
        .with_partitions(vec![fetch_request::FetchPartition::default()
            .with_partition(0)
            .with_fetch_offset(offset)
            .with_partition_max_bytes(1 << 20)])];
    if !long_poll {
        topics.push(
            fetch_request::FetchTopic::default()
                .with_topic(name("fuzz-b"))
                .with_partitions(vec![
                    fetch_request::FetchPartition::default()
                        .with_partition(1)
                        .with_partition_max_bytes(4096),
                    fetch_request::FetchPartition::default().with_partition(7),
                ]),
        );
    }
    RequestKind::Fetch(
        FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_wait_ms(max_wait_ms)
            .with_min_bytes(min_bytes)
            .with_max_bytes(1 << 20)
            .with_topics(topics),
    )
}

fn metadata(topics: Option<&[&str]>) -> RequestKind {
    RequestKind::Metadata(
        MetadataRequest::default()
            .with_topics(topics.map(|ts| {
                ts.iter()
                    .map(|t| {
                        metadata_request::MetadataRequestTopic::default().with_name(Some(name(t)))
                    })
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
        req.with_topics(vec![
            delete_topics_request::DeleteTopicState::default().with_name(Some(name("fuzz-new")))
        ])
    } else {
        req.with_topic_names(vec![name("fuzz-new"), name("missing")])
    })
}

fn describe_configs(version: i16) -> RequestKind {
    RequestKind::DescribeConfigs(
        DescribeConfigsRequest::default()
            .with_include_synonyms(true)
            .with_include_documentation(version >= 3)
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
    RequestKind::IncrementalAlterConfigs(IncrementalAlterConfigsRequest::default().with_resources(
        vec![
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
        ],
    ))
}

fn create_partitions(validate_only: bool) -> RequestKind {
    RequestKind::CreatePartitions(
        CreatePartitionsRequest::default()
            .with_timeout_ms(1000)
            .with_validate_only(validate_only)
            .with_topics(vec![
                create_partitions_request::CreatePartitionsTopic::default()
                    .with_name(name("fuzz-b"))
                    .with_count(4)
                    .with_assignments(None),
            ]),
    )
}

fn subscription(topics: &[&str]) -> Bytes {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&1i16.to_be_bytes());
    ConsumerProtocolSubscription::default()
        .with_topics(topics.iter().map(|t| s(t)).collect())
        .encode(&mut buf, 1)
        .expect("cannot encode a subscription");
    buf.freeze()
}

fn assignment() -> Bytes {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&1i16.to_be_bytes());
    ConsumerProtocolAssignment::default()
        .with_assigned_partitions(vec![consumer_protocol_assignment::TopicPartition::default(
        )
        .with_topic(name("fuzz-b"))
        .with_partitions(vec![0, 1, 2])])
        .encode(&mut buf, 1)
        .expect("cannot encode an assignment");
    buf.freeze()
}

fn find_coordinator(version: i16) -> RequestKind {
    let req = FindCoordinatorRequest::default().with_key_type(0);
    RequestKind::FindCoordinator(if version >= 4 {
        req.with_coordinator_keys(vec![s("fuzz-group"), s("other")])
    } else {
        req.with_key(s("fuzz-group"))
    })
}

fn join_group(member_id: &str, instance: Option<&str>) -> RequestKind {
    RequestKind::JoinGroup(
        JoinGroupRequest::default()
            .with_group_id(GroupId(s("fuzz-group")))
            .with_session_timeout_ms(10_000)
            .with_rebalance_timeout_ms(30_000)
            .with_member_id(s(member_id))
            .with_group_instance_id(instance.map(s))
            .with_protocol_type(s("consumer"))
            .with_protocols(vec![
                join_group_request::JoinGroupRequestProtocol::default()
                    .with_name(s("range"))
                    .with_metadata(subscription(&["fuzz-a", "fuzz-b"])),
                join_group_request::JoinGroupRequestProtocol::default()
                    .with_name(s("roundrobin"))
                    .with_metadata(subscription(&["fuzz-b"])),
            ]),
    )
}

fn sync_group(version: i16) -> RequestKind {
    let req = SyncGroupRequest::default()
        .with_group_id(GroupId(s("fuzz-group")))
        .with_generation_id(1)
        .with_member_id(s("member-1"))
        .with_assignments(vec![
            sync_group_request::SyncGroupRequestAssignment::default()
                .with_member_id(s("member-1"))
                .with_assignment(assignment()),
        ]);
    RequestKind::SyncGroup(if version >= 5 {
        req.with_protocol_type(Some(s("consumer")))
            .with_protocol_name(Some(s("range")))
    } else {
        req
    })
}

fn heartbeat() -> RequestKind {
    RequestKind::Heartbeat(
        HeartbeatRequest::default()
            .with_group_id(GroupId(s("fuzz-group")))
            .with_generation_id(1)
            .with_member_id(s("member-1")),
    )
}

fn leave_group(version: i16) -> RequestKind {
    let req = LeaveGroupRequest::default().with_group_id(GroupId(s("fuzz-group")));
    RequestKind::LeaveGroup(if version >= 3 {
        req.with_members(vec![
            leave_group_request::MemberIdentity::default().with_member_id(s("member-1")),
            leave_group_request::MemberIdentity::default()
                .with_member_id(s(""))
                .with_group_instance_id(Some(s("instance-1"))),
        ])
    } else {
        req.with_member_id(s("member-1"))
    })
}

fn offset_commit(version: i16) -> RequestKind {
    let mut req = OffsetCommitRequest::default()
        .with_group_id(GroupId(s("fuzz-group")))
        .with_generation_id_or_member_epoch(-1)
        .with_member_id(s(""))
        .with_topics(vec![
            offset_commit_request::OffsetCommitRequestTopic::default()
                .with_name(name("fuzz-b"))
                .with_partitions(
                    (0..3)
                        .map(|p| {
                            offset_commit_request::OffsetCommitRequestPartition::default()
                                .with_partition_index(p)
                                .with_committed_offset(p as i64 + 1)
                                .with_committed_metadata(Some(s("meta")))
                        })
                        .collect(),
                ),
            offset_commit_request::OffsetCommitRequestTopic::default()
                .with_name(name("missing"))
                .with_partitions(vec![
                    offset_commit_request::OffsetCommitRequestPartition::default()
                        .with_committed_offset(5),
                ]),
        ]);
    if (2..=4).contains(&version) {
        req = req.with_retention_time_ms(-1);
    }
    RequestKind::OffsetCommit(req)
}

fn offset_fetch(version: i16) -> RequestKind {
    let topics = |all: bool| {
        (!all).then(|| {
            vec![offset_fetch_request::OffsetFetchRequestTopics::default()
                .with_name(name("fuzz-b"))
                .with_partition_indexes(vec![0, 1, 2, 9])]
        })
    };
    RequestKind::OffsetFetch(if version >= 8 {
        OffsetFetchRequest::default().with_groups(vec![
            offset_fetch_request::OffsetFetchRequestGroup::default()
                .with_group_id(GroupId(s("fuzz-group")))
                .with_topics(topics(false)),
            offset_fetch_request::OffsetFetchRequestGroup::default()
                .with_group_id(GroupId(s("other")))
                .with_topics(topics(true)),
        ])
    } else {
        OffsetFetchRequest::default()
            .with_group_id(GroupId(s("fuzz-group")))
            .with_topics(Some(vec![
                offset_fetch_request::OffsetFetchRequestTopic::default()
                    .with_name(name("fuzz-b"))
                    .with_partition_indexes(vec![0, 1, 2, 9]),
            ]))
    })
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
        (
            ApiKey::ApiVersions,
            0,
            "",
            RequestKind::ApiVersions(ApiVersionsRequest::default()),
        ),
        (
            ApiKey::Metadata,
            12,
            "",
            metadata(Some(&["fuzz-a", "fuzz-b", "missing"])),
        ),
        (ApiKey::Metadata, 12, "all", metadata(None)),
        (ApiKey::Metadata, 0, "", metadata(Some(&["fuzz-a"]))),
        (
            ApiKey::Produce,
            9,
            "",
            produce(-1, "fuzz-a", 0, batch(Compression::None, 3)),
        ),
        (
            ApiKey::Produce,
            9,
            "gzip",
            produce(1, "fuzz-b", 1, batch(Compression::Gzip, 4)),
        ),
        (
            ApiKey::Produce,
            9,
            "zstd",
            produce(1, "fuzz-b", 2, batch(Compression::Zstd, 4)),
        ),
        (
            ApiKey::Produce,
            9,
            "acks0",
            produce(0, "fuzz-a", 0, batch(Compression::None, 1)),
        ),
        (
            ApiKey::Produce,
            3,
            "",
            produce(1, "fuzz-b", 0, batch(Compression::Snappy, 2)),
        ),
        (ApiKey::Fetch, 12, "", fetch(0, 0, 0, false)),
        (ApiKey::Fetch, 12, "longpoll", fetch(500, 1 << 16, 0, true)),
        (ApiKey::Fetch, 4, "", fetch(0, 1, 0, false)),
        (ApiKey::ListOffsets, 7, "", list_offsets()),
        (ApiKey::ListOffsets, 1, "", list_offsets()),
        (ApiKey::CreateTopics, 7, "", create_topics(false)),
        (ApiKey::CreateTopics, 2, "validate", create_topics(true)),
        (ApiKey::DeleteTopics, 6, "", delete_topics(6)),
        (ApiKey::DeleteTopics, 1, "", delete_topics(1)),
        (ApiKey::DescribeConfigs, 4, "", describe_configs(4)),
        (ApiKey::DescribeConfigs, 1, "", describe_configs(1)),
        (ApiKey::AlterConfigs, 2, "", alter_configs()),
        (ApiKey::CreatePartitions, 3, "", create_partitions(false)),
        (
            ApiKey::CreatePartitions,
            0,
            "validate",
            create_partitions(true),
        ),
        (
            ApiKey::IncrementalAlterConfigs,
            1,
            "",
            incremental_alter_configs(),
        ),
        (
            ApiKey::DescribeCluster,
            1,
            "",
            RequestKind::DescribeCluster(DescribeClusterRequest::default()),
        ),
        (ApiKey::FindCoordinator, 4, "", find_coordinator(4)),
        (ApiKey::FindCoordinator, 0, "", find_coordinator(0)),
        (ApiKey::JoinGroup, 9, "", join_group("", None)),
        (
            ApiKey::JoinGroup,
            9,
            "static",
            join_group("", Some("instance-1")),
        ),
        (ApiKey::JoinGroup, 3, "", join_group("", None)),
        (ApiKey::JoinGroup, 0, "", join_group("", None)),
        (ApiKey::SyncGroup, 5, "", sync_group(5)),
        (ApiKey::SyncGroup, 0, "", sync_group(0)),
        (ApiKey::Heartbeat, 4, "", heartbeat()),
        (ApiKey::LeaveGroup, 5, "", leave_group(5)),
        (ApiKey::LeaveGroup, 0, "", leave_group(0)),
        (ApiKey::OffsetCommit, 9, "", offset_commit(9)),
        (ApiKey::OffsetCommit, 2, "", offset_commit(2)),
        (ApiKey::OffsetFetch, 9, "", offset_fetch(9)),
        (ApiKey::OffsetFetch, 1, "", offset_fetch(1)),
        (
            ApiKey::ListGroups,
            4,
            "",
            RequestKind::ListGroups(
                ListGroupsRequest::default().with_states_filter(vec![s("Stable"), s("Empty")]),
            ),
        ),
        (
            ApiKey::DescribeGroups,
            5,
            "",
            RequestKind::DescribeGroups(
                DescribeGroupsRequest::default()
                    .with_groups(vec![GroupId(s("fuzz-group")), GroupId(s("missing"))])
                    .with_include_authorized_operations(true),
            ),
        ),
        (
            ApiKey::DeleteGroups,
            2,
            "",
            RequestKind::DeleteGroups(
                DeleteGroupsRequest::default().with_groups_names(vec![GroupId(s("gone"))]),
            ),
        ),
        (
            ApiKey::OffsetDelete,
            0,
            "",
            RequestKind::OffsetDelete(
                OffsetDeleteRequest::default()
                    .with_group_id(GroupId(s("fuzz-group")))
                    .with_topics(vec![
                        offset_delete_request::OffsetDeleteRequestTopic::default()
                            .with_name(name("fuzz-b"))
                            .with_partitions(vec![
                                offset_delete_request::OffsetDeleteRequestPartition::default()
                                    .with_partition_index(0),
                            ]),
                    ]),
            ),
        ),
    ]
    .into_iter()
    .collect();
    let mut out: Vec<(String, Vec<u8>)> = seeds
        .drain(..)
        .enumerate()
        .map(|(i, (key, version, tag, request))| {
            let tag = if tag.is_empty() {
                String::new()
            } else {
                format!("-{tag}")
            };
            (
                format!("{:02}-{key:?}-v{version}{tag}", i),
                encode_frame(key, version, 2 * (i as i32 + 1), &request),
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
    out.push((
        format!("{:02}-ApiVersions-v99-unsupported", out.len()),
        probe,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed is accepted by a fresh broker: it decodes, is handled without a protocol
    /// error, and gets a response (except the acks=0 produce, which gets none, and the long poll,
    /// which parks past the input timeout).
    #[test]
    fn seeds_are_valid_requests() {
        for (file, frame) in seed_frames() {
            let harness = Harness::new();
            let outcome = handle(&harness, &frame);
            if file.contains("longpoll") {
                assert!(outcome.is_none(), "{file}: expected to park");
                continue;
            }
            let outcome = outcome.unwrap_or_else(|| panic!("{file}: timed out"));
            let pieces = outcome.unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(pieces.is_none(), file.contains("acks0"), "{file}");
            if file.contains("Produce") {
                let appended: i64 = TOPICS
                    .iter()
                    .flat_map(|&(t, _)| harness.broker.log.topic(t).unwrap().partitions.clone())
                    .map(|p| p.high_watermark())
                    .sum();
                assert!(appended > 0, "{file}: nothing appended");
            }
        }
    }

    /// The inputs that once aborted the daemon (huge array counts) are now refused.
    #[test]
    fn past_findings_are_refused() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts-found");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let frame = std::fs::read(&path).unwrap();
            let harness = Harness::new();
            let outcome = handle(&harness, &frame).expect("timed out");
            assert!(outcome.is_err(), "{}: accepted", path.display());
        }
    }

    /// A SASL conversation that logs in (PLAIN v1 with the right password) passes the user's
    /// requests on; a wrong password, a truncated token or garbage ends it.
    #[test]
    fn sasl_conversations() {
        let token = |password: &str| format!("\0{SASL_USER}\0{password}").into_bytes();
        let authenticate = |auth: &[u8]| {
            let request = RequestKind::SaslAuthenticate(
                SaslAuthenticateRequest::default().with_auth_bytes(Bytes::copy_from_slice(auth)),
            );
            encode_frame(ApiKey::SaslAuthenticate, 1, 2, &request)
        };
        let metadata = encode_frame(
            ApiKey::Metadata,
            1,
            3,
            &RequestKind::Metadata(MetadataRequest::default().with_topics(None)),
        );
        let conversation = |frames: &[Vec<u8>]| {
            let mut input = vec![3u8]; // opens with a PLAIN v1 handshake
            for f in frames {
                input.push(f.len() as u8);
                input.extend_from_slice(f);
            }
            input
        };
        fuzz_sasl(&conversation(&[
            authenticate(&token(SASL_PASSWORD)),
            metadata.clone(),
        ]));
        fuzz_sasl(&conversation(&[
            authenticate(&token("wrong")),
            metadata.clone(),
        ]));
        fuzz_sasl(&conversation(&[authenticate(&token(SASL_PASSWORD)[..4])]));
        fuzz_sasl(&conversation(&[metadata]));
        fuzz_sasl(&[2, 5, 0, b'a', 0, b'b', 0xff]);
        fuzz_sasl(&[1, 200, 1, 2, 3]);
    }

    #[test]
    fn short_and_garbage_frames_are_skipped_or_rejected() {
        for data in [&b""[..], b"\0\0\0", b"\0\x12\0\x03\0\0\0", &[0xff; 64]] {
            fuzz_one(data);
        }
    }
}
