//! The Kafka listener: one task per connection, requests answered in order.
//!
//! Like Kafka, a connection's requests are handled one after another, and pipelined requests are
//! answered in the order they were sent; responses are buffered and flushed when the client has
//! nothing more queued. Unlike Kafka, a Produce that waits for its fsync or its in-sync replicas
//! does not hold up the connection: its records are appended, the requests after it are read
//! and handled, and their answers queue behind its own. A malformed frame closes only its own
//! connection, with a logged reason.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseHeader, ResponseKind};
use kafka_protocol::protocol::{Decodable, Encodable};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

use std::os::fd::AsRawFd;

use tokio::io::Interest;

use super::apis::{self, Reply};
use super::fetch_encode::{self, Piece};
use super::{produce, Broker};
use crate::log::partition::FileSlice;
use crate::security::sasl::{Intercept, SaslSession};
use crate::security::tls::certificate_principal;
use crate::security::{Listener, ANONYMOUS};

/// Largest request accepted, as Kafka's socket.request.max.bytes.
pub const MAX_FRAME_BYTES: i32 = 100 * 1024 * 1024;
/// Connections idle this long are closed, as Kafka's connections.max.idle.ms.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Answers a connection may have queued (waiting Produce answers and those behind them) before
/// it stops reading requests; clients keep at most 5 in flight by default.
const MAX_QUEUED_ANSWERS: usize = 32;

pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    security: Arc<Listener>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    crate::metrics::get().connections_accepted.inc();
                    let broker = broker.clone();
                    let security = security.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        match accept(stream, peer, broker, security, shutdown).await {
                            Ok(()) => {}
                            // The client went away mid-response (e.g. closed during a long poll).
                            Err(ConnectionError::Io(e)) if matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset) => {
                                tracing::debug!(%peer, error = %e, "client disconnected");
                            }
                            Err(reason) => tracing::warn!(%peer, %reason, "closed Kafka connection"),
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Why a connection was closed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("{0}")]
    Protocol(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

fn protocol(msg: impl Into<String>) -> ConnectionError {
    ConnectionError::Protocol(msg.into())
}

/// Who is at the other end of a connection, as request handlers see it.
pub struct Peer {
    pub addr: SocketAddr,
    pub listener: Arc<str>,
    pub principal: Arc<str>,
}

async fn accept(
    stream: TcpStream,
    addr: SocketAddr,
    broker: Arc<Broker>,
    security: Arc<Listener>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    stream.set_nodelay(true)?;
    let metrics = crate::metrics::get();
    metrics.connections.inc();
    // Counted down however the connection ends.
    struct Open;
    impl Drop for Open {
        fn drop(&mut self) {
            crate::metrics::get().connections.dec();
        }
    }
    let _open = Open;
    let mut peer = Peer {
        addr,
        listener: security.name.clone(),
        principal: ANONYMOUS.into(),
    };
    match security.tls.as_ref().map(|t| t.acceptor()) {
        None => {
            let (rd, wr) = stream.into_split();
            let reader = BufReader::with_capacity(64 * 1024, rd);
            let writer = BufWriter::with_capacity(64 * 1024, wr);
            connection(reader, writer, peer, broker, security, shutdown).await
        }
        Some(acceptor) => {
            let tls = tokio::time::timeout(
                crate::security::tls::HANDSHAKE_TIMEOUT,
                acceptor.accept(stream),
            )
            .await
            .map_err(|_| protocol("TLS handshake timed out"))?
            .map_err(|e| protocol(format!("TLS handshake failed: {e}")))?;
            if let Some(principal) = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(certificate_principal)
            {
                peer.principal = principal.into();
            }
            let (rd, wr) = tokio::io::split(tls);
            let reader = BufReader::with_capacity(64 * 1024, rd);
            let writer = BufWriter::with_capacity(64 * 1024, wr);
            connection(reader, writer, peer, broker, security, shutdown).await
        }
    }
}

/// The write side of a connection. Fetched segment ranges go out with sendfile(2) on a plain
/// TCP socket; TLS must encrypt them, so there they are read and copied.
trait Transport: AsyncWrite + Unpin + Send {
    fn plain_socket(&self) -> Option<&TcpStream>;
}

impl Transport for tokio::net::tcp::OwnedWriteHalf {
    fn plain_socket(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl Transport for tokio::io::WriteHalf<tokio_rustls::server::TlsStream<TcpStream>> {
    fn plain_socket(&self) -> Option<&TcpStream> {
        None
    }
}

/// A request's answer, as the handler leaves it.
pub enum Answer {
    /// Nothing is sent (acks=0).
    None,
    Ready(Vec<Piece>),
    /// A Produce answer still waiting for its fsync or its in-sync replicas.
    Waiting(WaitingAnswer),
}

/// The encoded answer once its wait is over (None: no response is due).
pub type WaitingAnswer =
    Pin<Box<dyn Future<Output = Result<Option<Vec<Piece>>, ConnectionError>> + Send>>;

/// An answer on its way to the writer, in request order.
struct Outgoing {
    answer: Answer,
    /// The client had more requests queued when this one was handled, so the answers to come
    /// right after may share a flush with this one.
    more_queued: bool,
    /// Told once the answer is written: the reader waits for that before the next request,
    /// except behind a waiting Produce answer.
    written: Option<oneshot::Sender<()>>,
}

async fn connection<R: AsyncRead + Unpin, W: Transport>(
    reader: BufReader<R>,
    writer: BufWriter<W>,
    peer: Peer,
    broker: Arc<Broker>,
    security: Arc<Listener>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    let (answers, queued) = mpsc::channel(MAX_QUEUED_ANSWERS);
    let (read, written) = tokio::join!(
        read_requests(reader, answers, peer, broker, security, shutdown),
        write_answers(writer, queued)
    );
    written.and(read)
}

/// Reads and handles the connection's requests one after another, queueing their answers.
async fn read_requests<R: AsyncRead + Unpin>(
    mut reader: BufReader<R>,
    answers: mpsc::Sender<Outgoing>,
    mut peer: Peer,
    broker: Arc<Broker>,
    security: Arc<Listener>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    let metrics = crate::metrics::get();
    let mut sasl = security
        .protocol
        .sasl()
        .then(|| SaslSession::new(security.clone(), peer.addr));
    // A ready answer is written before the next request is read, as a connection without
    // waiting answers always did; only a waiting Produce answer lets the reader go on.
    let queue = &answers;
    let send = |answer: Answer, more_queued: bool| async move {
        let (written, done) = match answer {
            Answer::Waiting(_) => (None, None),
            _ => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
        };
        queue
            .send(Outgoing {
                answer,
                more_queued,
                written,
            })
            .await
            .map_err(|_| ())?;
        if let Some(done) = done {
            done.await.map_err(|_| ())?;
        }
        Ok(())
    };
    let stopped = |_: ()| protocol("the connection's writer stopped");
    loop {
        let (min, max) = match &sasl {
            None => (8, MAX_FRAME_BYTES),
            Some(s) => (if s.expects_raw_token() { 0 } else { 8 }, s.max_frame()),
        };
        let frame = tokio::select! {
            f = tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut reader, min, max)) => match f {
                Ok(Ok(Some(frame))) => frame,
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(protocol("idle timeout")),
            },
            _ = shutdown.changed() => return Ok(()),
            // The writer failed (the client went away): nothing more can be answered.
            _ = answers.closed() => return Ok(()),
        };
        metrics.received_bytes.inc_by(frame.len() as u64 + 4);
        let frame = match &mut sasl {
            None => frame,
            Some(session) => match session.intercept(&broker, frame).await {
                Intercept::Pass(frame) => frame,
                Intercept::Reply(response) => {
                    // A login only ever ends with a reply: the principal changes here or not at all.
                    peer.principal = session.principal();
                    send(Answer::Ready(vec![Piece::Bytes(response)]), false)
                        .await
                        .map_err(stopped)?;
                    continue;
                }
                Intercept::Close(response, reason) => {
                    if let Some(response) = response {
                        send(Answer::Ready(vec![Piece::Bytes(response)]), false)
                            .await
                            .map_err(stopped)?;
                    }
                    return Err(protocol(reason));
                }
            },
        };
        let answer = handle_frame(&broker, frame, &peer).await?;
        send(answer, !reader.buffer().is_empty())
            .await
            .map_err(stopped)?;
    }
}

/// Writes the answers in request order, waiting for each Produce answer that is not ready.
async fn write_answers<W: Transport>(
    mut writer: BufWriter<W>,
    mut queued: mpsc::Receiver<Outgoing>,
) -> Result<(), ConnectionError> {
    let metrics = crate::metrics::get();
    while let Some(out) = queued.recv().await {
        let pieces = match out.answer {
            Answer::None => None,
            Answer::Ready(pieces) => Some(pieces),
            Answer::Waiting(answer) => {
                // The answers before this one go out now, not after its wait.
                writer.flush().await?;
                answer.await?
            }
        };
        for piece in pieces.into_iter().flatten() {
            match piece {
                Piece::Bytes(b) => {
                    metrics.sent_bytes.inc_by(b.len() as u64);
                    writer.write_all(&b).await?
                }
                Piece::File(f) => {
                    if writer.get_ref().plain_socket().is_some() {
                        writer.flush().await?;
                        if let Some(socket) = writer.get_ref().plain_socket() {
                            send_file(socket, &f).await?;
                        }
                    } else {
                        writer.write_all(&f.read_bytes()?).await?;
                    }
                    metrics.sent_bytes.inc_by(f.len);
                }
            }
        }
        if !out.more_queued {
            writer.flush().await?;
        }
        if let Some(written) = out.written {
            let _ = written.send(());
        }
    }
    writer.flush().await?;
    Ok(())
}

/// Sends a segment file range with sendfile(2): the bytes go from the page cache to the socket
/// without passing through this process.
async fn send_file(socket: &TcpStream, slice: &FileSlice) -> Result<(), ConnectionError> {
    let mut pos = slice.pos as libc::off_t;
    let end = (slice.pos + slice.len) as libc::off_t;
    while pos < end {
        socket.writable().await?;
        let sent = socket.try_io(Interest::WRITABLE, || {
            let n = unsafe {
                libc::sendfile(
                    socket.as_raw_fd(),
                    slice.file.as_raw_fd(),
                    &mut pos,
                    (end - pos).min(1 << 30) as usize,
                )
            };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n)
            }
        });
        match sent {
            Ok(0) => return Err(protocol("segment file ended before the fetched range")),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads one size-prefixed frame of `min..=max` bytes; None at a clean end of stream.
async fn read_frame<R: AsyncReadExt + Unpin>(
    r: &mut R,
    min: i32,
    max: i32,
) -> Result<Option<Bytes>, ConnectionError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = i32::from_be_bytes(len);
    if !(min..=max).contains(&len) {
        return Err(protocol(format!(
            "request size {len} outside the allowed range {min}..={max}"
        )));
    }
    let body = super::read_body(r, len as usize)
        .await
        .map_err(|e| protocol(format!("truncated request of {len} bytes: {e}")))?;
    Ok(Some(body))
}

/// Decodes, handles and encodes one request into the pieces of its response frame.
pub async fn handle_frame(
    broker: &Broker,
    mut frame: Bytes,
    peer: &Peer,
) -> Result<Answer, ConnectionError> {
    let api_key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let key =
        ApiKey::try_from(api_key).map_err(|_| protocol(format!("unknown API key {api_key}")))?;
    if !apis::is_supported(key, version) {
        if key == ApiKey::ApiVersions {
            // KIP-511: answer in v0 with UNSUPPORTED_VERSION and our ranges, so the client retries.
            return Ok(Answer::Ready(vec![Piece::Bytes(encode_response(
                correlation_id,
                ApiKey::ApiVersions,
                0,
                &apis::api_versions_unsupported(),
            )?)]));
        }
        return Err(protocol(format!(
            "unsupported version {version} of {key:?}"
        )));
    }
    let header = RequestHeader::decode(&mut frame, key.request_header_version(version))
        .map_err(|e| protocol(format!("bad {key:?} request header: {e}")))?;
    let request = RequestKind::decode(key, &mut frame, version)
        .map_err(|e| protocol(format!("cannot decode {key:?} v{version}: {e}")))?;
    let ctx = apis::RequestContext {
        version,
        client_id: header.client_id.as_ref().map(|c| c.to_string()),
        peer: peer.addr,
        listener: peer.listener.clone(),
        principal: peer.principal.clone(),
    };
    let started = std::time::Instant::now();
    let reply = match request {
        // Appended here, in request order; the wait for the fsync or the in-sync replicas goes
        // with the answer, and the connection reads the client's next requests meanwhile.
        RequestKind::Produce(r) => {
            let appended = produce::append(broker, &ctx, r).await;
            if !appended.is_ready() {
                return Ok(Answer::Waiting(Box::pin(async move {
                    let reply = appended.acknowledge().await.map(produce_reply);
                    finish(correlation_id, key, version, started, reply)
                })));
            }
            appended.acknowledge().await.map(produce_reply)
        }
        request => apis::dispatch(broker, &ctx, request).await,
    };
    Ok(
        match finish(correlation_id, key, version, started, reply)? {
            Some(pieces) => Answer::Ready(pieces),
            None => Answer::None,
        },
    )
}

fn produce_reply(response: kafka_protocol::messages::ProduceResponse) -> Reply {
    Reply::Message(ResponseKind::Produce(response))
}

/// Records the request's latency and error codes, and encodes its reply (None: no response).
fn finish(
    correlation_id: i32,
    key: ApiKey,
    version: i16,
    started: std::time::Instant,
    reply: Option<Reply>,
) -> Result<Option<Vec<Piece>>, ConnectionError> {
    let series = crate::metrics::api(key);
    if let Some(s) = series {
        s.observe(version, started.elapsed().as_secs_f64());
    }
    let Some(reply) = reply else {
        return Ok(None);
    };
    if let Some(s) = series {
        crate::metrics::get().count_errors(&s.name, reply.error_codes());
    }
    encode_reply(correlation_id, key, version, reply).map(Some)
}

fn encode_reply(
    correlation_id: i32,
    key: ApiKey,
    version: i16,
    reply: Reply,
) -> Result<Vec<Piece>, ConnectionError> {
    match reply {
        Reply::Message(m) => Ok(vec![Piece::Bytes(encode_response(
            correlation_id,
            key,
            version,
            &m,
        )?)]),
        Reply::Fetch(response, slices) if fetch_encode::supports(version) => Ok(
            fetch_encode::encode(correlation_id, version, &response, &slices),
        ),
        Reply::Fetch(mut response, slices) => {
            // Versions the piecewise encoder does not cover: materialise the records.
            let mut slices = slices.into_iter();
            for p in response
                .responses
                .iter_mut()
                .flat_map(|t| t.partitions.iter_mut())
            {
                p.records = Some(match slices.next().flatten() {
                    Some(slice) => slice.read_bytes()?,
                    None => Bytes::new(),
                });
            }
            let m = kafka_protocol::messages::ResponseKind::Fetch(response);
            Ok(vec![Piece::Bytes(encode_response(
                correlation_id,
                key,
                version,
                &m,
            )?)])
        }
    }
}

pub(crate) fn encode_response(
    correlation_id: i32,
    key: ApiKey,
    version: i16,
    response: &kafka_protocol::messages::ResponseKind,
) -> Result<Bytes, ConnectionError> {
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0);
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut buf, key.response_header_version(version))
        .map_err(|e| protocol(format!("cannot encode response header: {e}")))?;
    response
        .encode(&mut buf, version)
        .map_err(|e| protocol(format!("cannot encode {key:?} v{version} response: {e}")))?;
    let len = (buf.len() - 4) as i32;
    buf[0..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn test_peer() -> Peer {
        Peer {
            addr: "127.0.0.1:1".parse().unwrap(),
            listener: "PLAINTEXT".into(),
            principal: ANONYMOUS.into(),
        }
    }

    fn broker() -> (tempfile::TempDir, Broker) {
        let dir = tempfile::tempdir().unwrap();
        let b = Broker::for_tests(dir.path());
        (dir, b)
    }

    /// Every advertised version of every API: a realistic request is handled and its response
    /// encodes (the codec refuses fields a version does not have).
    #[test]
    fn every_advertised_version_encodes() {
        use crate::log::batch::BatchBuilder;
        use kafka_protocol::messages::*;
        use kafka_protocol::records::Compression;
        let (_dir, mut broker) = broker();
        // With the authorizer on (the anonymous test principal a super user), the ACL APIs
        // answer with ACLs rather than SECURITY_DISABLED.
        broker.authorizer =
            crate::security::acl::Authorizer::new(&crate::security::acl::AuthorizerSettings {
                enabled: true,
                super_users: vec![ANONYMOUS.to_string()],
                allow_everyone_if_no_acl_found: false,
            });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let name = |s: &str| TopicName(super::super::str_bytes(s));
        let sb = |s: &str| super::super::str_bytes(s);
        let mut n = 0;
        for &(key, lo, hi) in apis::SUPPORTED {
            for version in lo..=hi {
                n += 1;
                let t = format!("t{n}");
                broker
                    .log
                    .create_topic(&t, 1, 1, Default::default())
                    .unwrap();
                let mut b = BatchBuilder::new(1);
                b.push(Some(b"k"), Some(b"v"), &[], 1);
                let records = bytes::Bytes::from(b.finish(Compression::None));
                let request = match key {
                    ApiKey::Produce => RequestKind::Produce(
                        ProduceRequest::default().with_acks(1).with_topic_data(vec![
                            produce_request::TopicProduceData::default()
                                .with_name(name(&t))
                                .with_partition_data(vec![
                                    produce_request::PartitionProduceData::default()
                                        .with_index(0)
                                        .with_records(Some(records)),
                                    produce_request::PartitionProduceData::default()
                                        .with_index(9)
                                        .with_records(None),
                                ]),
                        ]),
                    ),
                    ApiKey::Fetch => {
                        RequestKind::Fetch(FetchRequest::default().with_max_wait_ms(0).with_topics(
                            vec![fetch_request::FetchTopic::default()
                                .with_topic(name(&t))
                                .with_partitions(vec![
                                    fetch_request::FetchPartition::default()
                                        .with_partition_max_bytes(1 << 20),
                                    fetch_request::FetchPartition::default().with_partition(5),
                                ])],
                        ))
                    }
                    ApiKey::ListOffsets => {
                        RequestKind::ListOffsets(ListOffsetsRequest::default().with_topics(vec![
                            list_offsets_request::ListOffsetsTopic::default()
                                .with_name(name(&t))
                                .with_partitions(
                                    [-1, -2, -3, 0]
                                        .iter()
                                        .map(|&ts| {
                                            list_offsets_request::ListOffsetsPartition::default()
                                                .with_timestamp(ts)
                                        })
                                        .collect(),
                                ),
                        ]))
                    }
                    ApiKey::Metadata => {
                        RequestKind::Metadata(MetadataRequest::default().with_topics(Some(vec![
                            metadata_request::MetadataRequestTopic::default()
                                .with_name(Some(name(&t))),
                            metadata_request::MetadataRequestTopic::default()
                                .with_name(Some(name("bad name"))),
                        ])))
                    }
                    ApiKey::ApiVersions => RequestKind::ApiVersions(ApiVersionsRequest::default()),
                    ApiKey::CreateTopics => {
                        RequestKind::CreateTopics(CreateTopicsRequest::default().with_topics(vec![
                            create_topics_request::CreatableTopic::default()
                                .with_name(name(&format!("new{n}")))
                                .with_num_partitions(2)
                                .with_replication_factor(1)
                                .with_configs(vec![
                                    create_topics_request::CreatableTopicConfig::default()
                                        .with_name(super::super::str_bytes("retention.ms"))
                                        .with_value(Some(super::super::str_bytes("1000"))),
                                ]),
                            create_topics_request::CreatableTopic::default()
                                .with_name(name(&t))
                                .with_num_partitions(1),
                        ]))
                    }
                    ApiKey::DeleteTopics => RequestKind::DeleteTopics(
                        DeleteTopicsRequest::default()
                            .with_topic_names(if version < 6 {
                                vec![name(&t), name("missing")]
                            } else {
                                vec![]
                            })
                            .with_topics(if version >= 6 {
                                vec![delete_topics_request::DeleteTopicState::default()
                                    .with_name(Some(name(&t)))]
                            } else {
                                vec![]
                            }),
                    ),
                    ApiKey::DescribeConfigs => RequestKind::DescribeConfigs(
                        DescribeConfigsRequest::default().with_resources(vec![
                            describe_configs_request::DescribeConfigsResource::default()
                                .with_resource_type(2)
                                .with_resource_name(super::super::str_bytes(t.clone()))
                                .with_configuration_keys(None),
                            describe_configs_request::DescribeConfigsResource::default()
                                .with_resource_type(4)
                                .with_resource_name(super::super::str_bytes("0"))
                                .with_configuration_keys(None),
                        ]),
                    ),
                    ApiKey::AlterConfigs => RequestKind::AlterConfigs(
                        AlterConfigsRequest::default().with_resources(vec![
                            alter_configs_request::AlterConfigsResource::default()
                                .with_resource_type(2)
                                .with_resource_name(super::super::str_bytes(t.clone()))
                                .with_configs(vec![
                                    alter_configs_request::AlterableConfig::default()
                                        .with_name(super::super::str_bytes("retention.ms"))
                                        .with_value(Some(super::super::str_bytes("5000"))),
                                ]),
                        ]),
                    ),
                    ApiKey::CreatePartitions => RequestKind::CreatePartitions(
                        CreatePartitionsRequest::default().with_topics(vec![
                            create_partitions_request::CreatePartitionsTopic::default()
                                .with_name(name(&t))
                                .with_count(3),
                        ]),
                    ),
                    ApiKey::IncrementalAlterConfigs => RequestKind::IncrementalAlterConfigs(
                        IncrementalAlterConfigsRequest::default().with_resources(vec![
                            incremental_alter_configs_request::AlterConfigsResource::default()
                                .with_resource_type(2)
                                .with_resource_name(super::super::str_bytes(t.clone()))
                                .with_configs(vec![
                                    incremental_alter_configs_request::AlterableConfig::default()
                                        .with_name(super::super::str_bytes("cleanup.policy"))
                                        .with_config_operation(2)
                                        .with_value(Some(super::super::str_bytes("compact"))),
                                ]),
                        ]),
                    ),
                    ApiKey::DescribeCluster => {
                        RequestKind::DescribeCluster(DescribeClusterRequest::default())
                    }
                    ApiKey::FindCoordinator => RequestKind::FindCoordinator(
                        FindCoordinatorRequest::default()
                            .with_key(sb("g"))
                            .with_coordinator_keys(if version >= 4 { vec![sb("g")] } else { vec![] }),
                    ),
                    ApiKey::JoinGroup => RequestKind::JoinGroup(
                        JoinGroupRequest::default()
                            .with_group_id(GroupId(sb(&format!("g{n}"))))
                            .with_session_timeout_ms(10_000)
                            .with_rebalance_timeout_ms(10_000)
                            .with_protocol_type(sb("consumer"))
                            .with_protocols(vec![join_group_request::JoinGroupRequestProtocol::default()
                                .with_name(sb("range"))
                                .with_metadata(bytes::Bytes::from_static(b"\0\0\0\0"))]),
                    ),
                    ApiKey::SyncGroup => RequestKind::SyncGroup(
                        SyncGroupRequest::default().with_group_id(GroupId(sb("g1"))).with_member_id(sb("nobody")).with_generation_id(1),
                    ),
                    ApiKey::Heartbeat => RequestKind::Heartbeat(
                        HeartbeatRequest::default().with_group_id(GroupId(sb("g1"))).with_member_id(sb("nobody")),
                    ),
                    ApiKey::LeaveGroup => RequestKind::LeaveGroup(if version >= 3 {
                        LeaveGroupRequest::default()
                            .with_group_id(GroupId(sb("g1")))
                            .with_members(vec![leave_group_request::MemberIdentity::default().with_member_id(sb("nobody"))])
                    } else {
                        LeaveGroupRequest::default().with_group_id(GroupId(sb("g1"))).with_member_id(sb("nobody"))
                    }),
                    ApiKey::OffsetCommit => RequestKind::OffsetCommit(
                        OffsetCommitRequest::default()
                            .with_group_id(GroupId(sb(&format!("c{n}"))))
                            .with_generation_id_or_member_epoch(-1)
                            .with_topics(vec![offset_commit_request::OffsetCommitRequestTopic::default()
                                .with_name(name(&t))
                                .with_partitions(vec![
                                    offset_commit_request::OffsetCommitRequestPartition::default()
                                        .with_committed_offset(5)
                                        .with_committed_metadata(Some(sb("m"))),
                                    offset_commit_request::OffsetCommitRequestPartition::default().with_partition_index(7),
                                ])]),
                    ),
                    ApiKey::OffsetFetch => RequestKind::OffsetFetch(if version >= 8 {
                        OffsetFetchRequest::default().with_groups(vec![
                            offset_fetch_request::OffsetFetchRequestGroup::default().with_group_id(GroupId(sb("c1"))).with_topics(None),
                        ])
                    } else {
                        OffsetFetchRequest::default().with_group_id(GroupId(sb("c1"))).with_topics(Some(vec![
                            offset_fetch_request::OffsetFetchRequestTopic::default().with_name(name("t1")).with_partition_indexes(vec![0, 1]),
                        ]))
                    }),
                    ApiKey::ListGroups => RequestKind::ListGroups(ListGroupsRequest::default()),
                    ApiKey::DescribeGroups => RequestKind::DescribeGroups(
                        DescribeGroupsRequest::default().with_groups(vec![GroupId(sb("g1")), GroupId(sb("c1")), GroupId(sb("missing"))]),
                    ),
                    ApiKey::DeleteGroups => RequestKind::DeleteGroups(
                        DeleteGroupsRequest::default().with_groups_names(vec![GroupId(sb("missing")), GroupId(sb("g1"))]),
                    ),
                    ApiKey::ConsumerGroupHeartbeat => RequestKind::ConsumerGroupHeartbeat(
                        ConsumerGroupHeartbeatRequest::default()
                            .with_group_id(GroupId(sb("kip848")))
                            .with_member_id(sb("m1"))
                            .with_rebalance_timeout_ms(30_000)
                            .with_subscribed_topic_names(Some(vec![name("t1")]))
                            .with_topic_partitions(Some(vec![])),
                    ),
                    ApiKey::ConsumerGroupDescribe => RequestKind::ConsumerGroupDescribe(
                        ConsumerGroupDescribeRequest::default()
                            .with_group_ids(vec![GroupId(sb("kip848")), GroupId(sb("g1")), GroupId(sb("missing"))]),
                    ),
                    ApiKey::OffsetDelete => RequestKind::OffsetDelete(
                        OffsetDeleteRequest::default().with_group_id(GroupId(sb("c1"))).with_topics(vec![
                            offset_delete_request::OffsetDeleteRequestTopic::default()
                                .with_name(name("t1"))
                                .with_partitions(vec![offset_delete_request::OffsetDeleteRequestPartition::default()]),
                        ]),
                    ),
                    ApiKey::InitProducerId => RequestKind::InitProducerId(
                        InitProducerIdRequest::default()
                            .with_transactional_id((version % 2 == 0).then(|| TransactionalId(sb("tx1"))))
                            .with_transaction_timeout_ms(60_000)
                            .with_producer_id(ProducerId(-1))
                            .with_producer_epoch(-1),
                    ),
                    ApiKey::AddPartitionsToTxn => RequestKind::AddPartitionsToTxn(
                        AddPartitionsToTxnRequest::default()
                            .with_v3_and_below_transactional_id(TransactionalId(sb("tx1")))
                            .with_v3_and_below_producer_id(ProducerId(version as i64))
                            .with_v3_and_below_topics(vec![add_partitions_to_txn_request::AddPartitionsToTxnTopic::default()
                                .with_name(name(&t))
                                .with_partitions(vec![0, 9])]),
                    ),
                    ApiKey::AddOffsetsToTxn => RequestKind::AddOffsetsToTxn(
                        AddOffsetsToTxnRequest::default()
                            .with_transactional_id(TransactionalId(sb("tx1")))
                            .with_group_id(GroupId(sb("g1"))),
                    ),
                    ApiKey::EndTxn => RequestKind::EndTxn(
                        EndTxnRequest::default().with_transactional_id(TransactionalId(sb("tx1"))).with_committed(true),
                    ),
                    ApiKey::TxnOffsetCommit => RequestKind::TxnOffsetCommit(
                        TxnOffsetCommitRequest::default()
                            .with_transactional_id(TransactionalId(sb("tx1")))
                            .with_group_id(GroupId(sb("g1")))
                            .with_topics(vec![txn_offset_commit_request::TxnOffsetCommitRequestTopic::default()
                                .with_name(name(&t))
                                .with_partitions(vec![txn_offset_commit_request::TxnOffsetCommitRequestPartition::default()
                                    .with_committed_offset(3)])]),
                    ),
                    ApiKey::DescribeTransactions => RequestKind::DescribeTransactions(
                        DescribeTransactionsRequest::default()
                            .with_transactional_ids(vec![TransactionalId(sb("tx1")), TransactionalId(sb("missing"))]),
                    ),
                    ApiKey::ListTransactions => RequestKind::ListTransactions(
                        ListTransactionsRequest::default().with_state_filters(vec![sb("Empty"), sb("Bogus")]),
                    ),
                    ApiKey::DescribeProducers => RequestKind::DescribeProducers(
                        DescribeProducersRequest::default().with_topics(vec![
                            describe_producers_request::TopicRequest::default()
                                .with_name(name(&t))
                                .with_partition_indexes(vec![0, 99]),
                        ]),
                    ),
                    ApiKey::OffsetForLeaderEpoch => RequestKind::OffsetForLeaderEpoch(
                        OffsetForLeaderEpochRequest::default().with_topics(vec![
                            offset_for_leader_epoch_request::OffsetForLeaderTopic::default()
                                .with_topic(name(&t))
                                .with_partitions(vec![
                                    offset_for_leader_epoch_request::OffsetForLeaderPartition::default()
                                        .with_current_leader_epoch(-1),
                                    offset_for_leader_epoch_request::OffsetForLeaderPartition::default()
                                        .with_partition(5),
                                ]),
                        ]),
                    ),
                    ApiKey::AlterPartitionReassignments => {
                        RequestKind::AlterPartitionReassignments(
                            AlterPartitionReassignmentsRequest::default().with_topics(vec![
                                alter_partition_reassignments_request::ReassignableTopic::default()
                                    .with_name(name(&t))
                                    .with_partitions(vec![
                                        alter_partition_reassignments_request::ReassignablePartition::default()
                                            .with_replicas(Some(vec![BrokerId(0)])),
                                    ]),
                            ]),
                        )
                    }
                    ApiKey::ListPartitionReassignments => RequestKind::ListPartitionReassignments(
                        ListPartitionReassignmentsRequest::default().with_topics(None),
                    ),
                    ApiKey::WriteTxnMarkers => RequestKind::WriteTxnMarkers(
                        WriteTxnMarkersRequest::default().with_markers(vec![
                            write_txn_markers_request::WritableTxnMarker::default()
                                .with_producer_id(ProducerId(7))
                                .with_topics(vec![
                                    write_txn_markers_request::WritableTxnMarkerTopic::default()
                                        .with_name(name(&t))
                                        .with_partition_indexes(vec![0, 5]),
                                ]),
                        ]),
                    ),
                    ApiKey::SaslHandshake => RequestKind::SaslHandshake(
                        SaslHandshakeRequest::default().with_mechanism(sb("PLAIN")),
                    ),
                    ApiKey::SaslAuthenticate => RequestKind::SaslAuthenticate(
                        SaslAuthenticateRequest::default()
                            .with_auth_bytes(bytes::Bytes::from_static(b"\0u\0p")),
                    ),
                    ApiKey::DescribeUserScramCredentials => {
                        RequestKind::DescribeUserScramCredentials(
                            DescribeUserScramCredentialsRequest::default().with_users(None),
                        )
                    }
                    ApiKey::AlterUserScramCredentials => RequestKind::AlterUserScramCredentials(
                        AlterUserScramCredentialsRequest::default().with_upsertions(vec![
                            alter_user_scram_credentials_request::ScramCredentialUpsertion::default()
                                .with_name(sb(&format!("user{n}")))
                                .with_mechanism(2)
                                .with_iterations(4096)
                                .with_salt(bytes::Bytes::from_static(b"salt"))
                                .with_salted_password(bytes::Bytes::from_static(b"salted")),
                        ]),
                    ),
                    ApiKey::CreateAcls => RequestKind::CreateAcls(CreateAclsRequest::default().with_creations(vec![
                        create_acls_request::AclCreation::default()
                            .with_resource_type(2)
                            .with_resource_name(sb("logs-"))
                            .with_resource_pattern_type(4)
                            .with_principal(sb(&format!("User:u{n}")))
                            .with_host(sb("*"))
                            .with_operation(3)
                            .with_permission_type(3),
                        create_acls_request::AclCreation::default().with_resource_type(42),
                    ])),
                    ApiKey::DescribeAcls => RequestKind::DescribeAcls(
                        DescribeAclsRequest::default()
                            .with_resource_type_filter(1)
                            .with_pattern_type_filter(1)
                            .with_operation(1)
                            .with_permission_type(1),
                    ),
                    ApiKey::DeleteAcls => RequestKind::DeleteAcls(DeleteAclsRequest::default().with_filters(vec![
                        delete_acls_request::DeleteAclsFilter::default()
                            .with_resource_type_filter(2)
                            .with_resource_name_filter(Some(sb("logs-web")))
                            .with_pattern_type_filter(2)
                            .with_principal_filter(Some(sb(&format!("User:u{}", n - 2))))
                            .with_operation(1)
                            .with_permission_type(1),
                    ])),
                    other => panic!("no sample request for {other:?}"),
                };
                let ctx = apis::RequestContext {
                    version,
                    client_id: None,
                    peer: "127.0.0.1:1".parse().unwrap(),
                    listener: "PLAINTEXT".into(),
                    principal: ANONYMOUS.into(),
                };
                let reply = rt.block_on(apis::dispatch(&broker, &ctx, request)).unwrap();
                encode_reply(1, key, version, reply)
                    .unwrap_or_else(|e| panic!("{key:?} v{version}: {e}"));
            }
        }
    }

    /// Requests whose array counts claim billions of elements (found by the fuzzer) are refused
    /// without trying to allocate for them.
    #[test]
    fn hostile_array_counts_do_not_abort() {
        let (_dir, broker) = broker();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for frame in [
            &include_bytes!("../../fuzz/artifacts-found/oom-offset-delete-array-length")[..],
            &include_bytes!("../../fuzz/artifacts-found/oom-metadata-v12-compact-array-length")[..],
            &include_bytes!("../../fuzz/artifacts-found/oom-create-topics-v2-array-length")[..],
        ] {
            let result = rt.block_on(handle_frame(
                &broker,
                Bytes::copy_from_slice(frame),
                &test_peer(),
            ));
            assert!(
                result.is_err(),
                "a truncated array must be a protocol error"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// The request decoder path never panics on arbitrary frames.
        #[test]
        fn arbitrary_frames_never_panic(key in 0i16..80, version in -1i16..20, body in prop::collection::vec(any::<u8>(), 0..200)) {
            let (_dir, broker) = broker();
            let mut frame = Vec::new();
            frame.extend_from_slice(&key.to_be_bytes());
            frame.extend_from_slice(&version.to_be_bytes());
            frame.extend_from_slice(&7i32.to_be_bytes());
            frame.extend_from_slice(&body);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            // A well-formed long-poll fetch may park; parking is fine, panicking is not.
            let _ = rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(50), handle_frame(&broker, Bytes::from(frame), &test_peer())).await
            });
        }
    }
}
