//! Fetch (with long polling) and ListOffsets.

use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::{
    FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse,
};
use tokio::sync::Notify;

use super::apis::RequestContext;
use super::fetch_session::Ticket;
use super::{read_error_code, Broker};
use crate::cluster::replication::LeaderState;
use crate::log::partition::{FileSlice, Isolation, Partition};
use crate::security::acl::{Operation, ResourceType};
use kafka_protocol::messages::fetch_response::AbortedTransaction;
use kafka_protocol::messages::ProducerId;

/// Longest a fetch may park, whatever the client asks.
const MAX_WAIT_CAP: Duration = Duration::from_secs(30);

/// The response, and each partition's records (in response order) as segment file ranges.
pub async fn fetch(
    broker: &Broker,
    ctx: &RequestContext,
    mut req: FetchRequest,
) -> (FetchResponse, Vec<Option<FileSlice>>) {
    let ticket = if ctx.version >= 7 {
        match broker.fetch_sessions.begin(&mut req) {
            Ok(t) => t,
            Err(e) => return (FetchResponse::default().with_error_code(e.code()), vec![]),
        }
    } else {
        Ticket::None
    };
    let (response, slices) = fetch_all(broker, ctx, &req).await;
    broker.fetch_sessions.finish(ticket, response, slices)
}

/// Reads every requested partition, parking until there is enough to send or the wait is over.
async fn fetch_all(
    broker: &Broker,
    ctx: &RequestContext,
    req: &FetchRequest,
) -> (FetchResponse, Vec<Option<FileSlice>>) {
    let wait = Duration::from_millis(req.max_wait_ms.max(0) as u64).min(MAX_WAIT_CAP);
    let deadline = tokio::time::Instant::now() + wait;
    let min_bytes = req.min_bytes.max(0) as usize;
    let max_bytes = if ctx.version >= 3 && req.max_bytes > 0 {
        req.max_bytes as u64
    } else {
        i32::MAX as u64
    };
    let refused = refused_topics(broker, ctx, req);
    loop {
        let notify = Arc::new(Notify::new());
        let (response, slices, bytes, partitions) =
            read_once(broker, req, &refused, max_bytes, &notify);
        let errors = response
            .responses
            .iter()
            .flat_map(|t| &t.partitions)
            .any(|p| p.error_code != 0);
        if bytes >= min_bytes
            || errors
            || partitions == 0
            || tokio::time::Instant::now() >= deadline
        {
            return (response, slices);
        }
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep_until(deadline) => {
                let (response, slices, _, _) = read_once(broker, req, &refused, max_bytes, &Arc::new(Notify::new()));
                return (response, slices);
            }
        }
    }
}

/// Per requested topic (by index), the error when the principal may not read it: Read on the
/// topic for a consumer, ClusterAction for a follower replicating it. Empty when every topic
/// may be read.
fn refused_topics(
    broker: &Broker,
    ctx: &RequestContext,
    req: &FetchRequest,
) -> Vec<Option<ResponseError>> {
    if !broker.authorizer.enabled() {
        return Vec::new();
    }
    if req.replica_id.0 >= 0 {
        let code = (!broker.allowed_on_cluster(ctx, Operation::ClusterAction))
            .then_some(ResponseError::TopicAuthorizationFailed);
        return vec![code; req.topics.len()];
    }
    req.topics
        .iter()
        .map(|t| broker.refusal(ctx, Operation::Read, ResourceType::Topic, &t.topic.0))
        .collect()
}

/// One pass over the requested partitions. Registers `notify` with each so an append wakes the
/// long poll. Returns the response, its record bytes and how many partitions were found.
fn read_once(
    broker: &Broker,
    req: &FetchRequest,
    refused: &[Option<ResponseError>],
    max_bytes: u64,
    notify: &Arc<Notify>,
) -> (FetchResponse, Vec<Option<FileSlice>>, usize, usize) {
    let mut slices = Vec::new();
    let mut remaining = max_bytes;
    let mut total = 0usize;
    let mut found = 0usize;
    let mut topics = Vec::with_capacity(req.topics.len());
    let isolation = if req.isolation_level == 1 {
        Isolation::ReadCommitted
    } else {
        Isolation::ReadUncommitted
    };
    for (i, ft) in req.topics.iter().enumerate() {
        let refusal = refused.get(i).copied().flatten();
        let topic = broker.log.topic(&ft.topic.0).filter(|_| refusal.is_none());
        let mut partitions = Vec::with_capacity(ft.partitions.len());
        for fp in &ft.partitions {
            let mut pd = PartitionData::default()
                .with_partition_index(fp.partition)
                .with_high_watermark(-1)
                .with_last_stable_offset(-1)
                .with_log_start_offset(-1)
                .with_aborted_transactions(Some(vec![]));
            let partition: Option<&Arc<Partition>> = topic.as_ref().and_then(|t| {
                usize::try_from(fp.partition)
                    .ok()
                    .and_then(|i| t.partitions.get(i))
            });
            match partition {
                None => {
                    pd.error_code = refusal
                        .unwrap_or(ResponseError::UnknownTopicOrPartition)
                        .code()
                }
                Some(p) => {
                    let leader = match broker.leadership(&p.topic, p.id).and_then(|l| {
                        check_epoch(l.as_deref(), fp.current_leader_epoch)?;
                        Ok(l)
                    }) {
                        Ok(l) => l,
                        Err(code) => {
                            pd.error_code = code.code();
                            slices.push(None);
                            partitions.push(pd);
                            continue;
                        }
                    };
                    found += 1;
                    p.register_waiter(notify.clone());
                    let limit = (fp.partition_max_bytes.max(0) as u64).min(remaining);
                    // A follower replicating the partition reads up to the log end.
                    let follower = (req.replica_id.0 >= 0).then_some(req.replica_id.0);
                    let read = match (follower, &leader, &broker.cluster) {
                        (Some(f), Some(state), Some(c)) => {
                            c.replicas.follower_fetched(p, state, f, fp.fetch_offset);
                            p.read_replica(fp.fetch_offset, limit)
                        }
                        // KIP-74: the first batch of the response is sent whole even if larger.
                        _ => p.read_with(fp.fetch_offset, limit, total == 0, isolation),
                    };
                    match read {
                        Ok(data) => {
                            pd.high_watermark = data.high_watermark;
                            pd.last_stable_offset = data.last_stable_offset;
                            pd.log_start_offset = data.log_start_offset;
                            pd.aborted_transactions = Some(
                                data.aborted
                                    .iter()
                                    .map(|a| {
                                        AbortedTransaction::default()
                                            .with_producer_id(ProducerId(a.producer_id))
                                            .with_first_offset(a.first_offset)
                                    })
                                    .collect(),
                            );
                            let n = data.records.as_ref().map_or(0, |r| r.len as usize);
                            remaining = remaining.saturating_sub(n as u64);
                            total += n;
                            slices.push(data.records);
                            partitions.push(pd);
                            continue;
                        }
                        Err(e) => {
                            pd.error_code = read_error_code(&e).code();
                            pd.high_watermark = p.high_watermark();
                            pd.last_stable_offset = p.last_stable_offset();
                            pd.log_start_offset = p.log_start_offset();
                        }
                    }
                }
            }
            slices.push(None);
            partitions.push(pd);
        }
        topics.push(
            FetchableTopicResponse::default()
                .with_topic(ft.topic.clone())
                .with_topic_id(ft.topic_id)
                .with_partitions(partitions),
        );
    }
    (
        FetchResponse::default().with_responses(topics),
        slices,
        total,
        found,
    )
}

/// KIP-320: a client or follower that knows a newer leader epoch than this leader waits for
/// the metadata to catch up here; one that knows an older epoch refreshes its own.
fn check_epoch(leader: Option<&LeaderState>, requested: i32) -> Result<(), ResponseError> {
    match leader {
        Some(l) if requested >= 0 && requested < l.epoch => Err(ResponseError::FencedLeaderEpoch),
        Some(l) if requested > l.epoch => Err(ResponseError::UnknownLeaderEpoch),
        _ => Ok(()),
    }
}

/// Special timestamps of ListOffsets.
const LATEST: i64 = -1;
const EARLIEST: i64 = -2;
const MAX_TIMESTAMP: i64 = -3;

pub fn list_offsets(
    broker: &Broker,
    ctx: &RequestContext,
    req: ListOffsetsRequest,
) -> ListOffsetsResponse {
    let topics = req
        .topics
        .into_iter()
        .map(|lt| {
            let described = broker.allowed(ctx, Operation::Describe, ResourceType::Topic, &lt.name.0);
            let topic = broker.log.topic(&lt.name.0).filter(|_| described);
            let partitions = lt
                .partitions
                .into_iter()
                .map(|lp| {
                    let mut r = ListOffsetsPartitionResponse::default()
                        .with_partition_index(lp.partition_index)
                        .with_timestamp(-1)
                        .with_offset(-1);
                    let p = topic
                        .as_ref()
                        .and_then(|t| usize::try_from(lp.partition_index).ok().and_then(|i| t.partitions.get(i)));
                    let Some(p) = p else {
                        r.error_code = if described {
                            ResponseError::UnknownTopicOrPartition
                        } else {
                            ResponseError::TopicAuthorizationFailed
                        }
                        .code();
                        return r;
                    };
                    if let Err(code) = broker.leadership(&p.topic, p.id) {
                        r.error_code = code.code();
                        return r;
                    }
                    if ctx.version >= 4 {
                        r.leader_epoch = p.leader_epoch();
                    }
                    let found = match lp.timestamp {
                        // read_committed consumers start at the last stable offset.
                        LATEST if req.isolation_level == 1 => {
                            Ok(Some((p.last_stable_offset(), -1)))
                        }
                        LATEST => Ok(Some((p.high_watermark(), -1))),
                        EARLIEST => Ok(Some((p.log_start_offset(), -1))),
                        MAX_TIMESTAMP => match p.max_timestamp() {
                            Some(ts) => p.offset_for_timestamp(ts),
                            None => Ok(None),
                        },
                        ts if ts >= 0 => p.offset_for_timestamp(ts),
                        _ => {
                            r.error_code = ResponseError::InvalidRequest.code();
                            return r;
                        }
                    };
                    match found {
                        Ok(Some((offset, ts))) => {
                            r.offset = offset;
                            r.timestamp = ts;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(topic = %p.topic, partition = p.id, error = %e, "offset lookup failed");
                            r.error_code = ResponseError::KafkaStorageError.code();
                        }
                    }
                    r
                })
                .collect();
            ListOffsetsTopicResponse::default()
                .with_name(lt.name)
                .with_partitions(partitions)
        })
        .collect();
    ListOffsetsResponse::default().with_topics(topics)
}
