//! Produce: validate each partition's batches, append, and acknowledge per acks and durability.

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse};

use super::apis::RequestContext;
use super::{append_error_code, str_bytes, Broker};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::cluster::replication::LeaderState;
use crate::log::batch::{BatchView, HEADER_LEN};
use crate::log::partition::{AppendError, Partition, Refusal};
use crate::security::acl::{Operation, ResourceType};
use crate::txn::ProducerRef;

/// Returns None for acks=0: the client expects no response.
pub async fn produce(
    broker: &Broker,
    ctx: &RequestContext,
    req: ProduceRequest,
) -> Option<ProduceResponse> {
    append(broker, ctx, req).await.acknowledge().await
}

/// A Produce request whose batches are appended, and what its answer still waits for: the
/// fsync of fsync-before-ack topics and, for acks=all in a cluster, the in-sync replicas.
pub struct Appended {
    acks: i16,
    responses: Vec<TopicProduceResponse>,
    to_flush: Vec<(Arc<Partition>, i64)>,
    /// acks=all on replicated partitions: (partition, offset the high watermark must reach,
    /// the leader epoch it was written in).
    to_replicate: Vec<(Arc<Partition>, i64, i32)>,
    deadline: tokio::time::Instant,
}

impl Appended {
    /// True when the answer needs no waiting.
    pub fn is_ready(&self) -> bool {
        self.acks == 0 || (self.to_flush.is_empty() && self.to_replicate.is_empty())
    }

    /// Waits for durability and replication as acks asks, then answers (None for acks=0).
    pub async fn acknowledge(self) -> Option<ProduceResponse> {
        let Appended {
            acks,
            mut responses,
            to_flush,
            to_replicate,
            deadline,
        } = self;
        if acks == 0 {
            return None;
        }
        // fsync-before-ack topics: one group-committed fsync per partition covers this request.
        for (p, offset) in to_flush {
            if let Err(e) = p.flush_to(offset).await {
                tracing::error!(topic = %p.topic, partition = p.id, error = %e, "fsync failed");
                for t in responses.iter_mut().filter(|t| *t.name.0 == *p.topic) {
                    for r in t.partition_responses.iter_mut().filter(|r| r.index == p.id) {
                        r.error_code = ResponseError::KafkaStorageError.code();
                        r.error_message = Some(str_bytes(format!("fsync failed: {e}")));
                    }
                }
            }
        }
        for (p, offset, epoch) in to_replicate {
            if let Err(e) = wait_replicated(&p, offset, Some(epoch), deadline).await {
                let message = if e == ResponseError::RequestTimedOut {
                    "the in-sync replicas did not all acknowledge the write in time"
                } else {
                    "leadership moved before the in-sync replicas acknowledged the write"
                };
                for t in responses.iter_mut().filter(|t| *t.name.0 == *p.topic) {
                    for r in t.partition_responses.iter_mut().filter(|r| r.index == p.id) {
                        r.error_code = e.code();
                        r.error_message = Some(str_bytes(message));
                    }
                }
            }
        }
        Some(ProduceResponse::default().with_responses(responses))
    }
}

/// Validates and appends every partition's batches, in request order; the waits are left to
/// [`Appended::acknowledge`].
pub async fn append(broker: &Broker, ctx: &RequestContext, req: ProduceRequest) -> Appended {
    let acks = req.acks;
    let deadline = tokio::time::Instant::now()
        + std::time::Duration::from_millis(req.timeout_ms.max(0) as u64);
    let txn_refused = req.transactional_id.as_ref().is_some_and(|id| {
        !broker.allowed(ctx, Operation::Write, ResourceType::TransactionalId, id)
    });
    let mut responses = Vec::with_capacity(req.topic_data.len());
    let mut to_flush = Vec::new();
    let mut to_replicate = Vec::new();
    for topic_data in req.topic_data {
        let name = topic_data.name.0.to_string();
        let refusal = if txn_refused {
            Some(ResponseError::TransactionalIdAuthorizationFailed)
        } else if !broker.allowed(ctx, Operation::Write, ResourceType::Topic, &name) {
            Some(ResponseError::TopicAuthorizationFailed)
        } else {
            None
        };
        let topic = match refusal {
            Some(code) => Err(code),
            None => {
                let may_create = broker.may_create_topic(ctx, &name);
                broker.topic_or_create(&name, may_create).await
            }
        };
        let mut partitions = Vec::with_capacity(topic_data.partition_data.len());
        for pd in topic_data.partition_data {
            let mut resp = PartitionProduceResponse::default()
                .with_index(pd.index)
                .with_base_offset(-1);
            let outcome = if !matches!(acks, -1..=1) {
                Err((
                    ResponseError::InvalidRequiredAcks,
                    format!("acks must be -1, 0 or 1, got {acks}"),
                ))
            } else if let Some(code) = refusal {
                Err((code, format!("not authorized to write to topic '{name}'")))
            } else if let Err(refusal) = check_transactional(
                broker,
                req.transactional_id.as_deref().map(|s| s.as_str()),
                &name,
                pd.index,
                pd.records.as_deref(),
            )
            .await
            {
                Err(refusal)
            } else {
                match (&topic, pd.records.as_deref()) {
                    (Err(code), _) => Err((*code, format!("cannot produce to topic '{name}'"))),
                    (Ok(_), None) => {
                        Err((ResponseError::CorruptMessage, "null record set".to_string()))
                    }
                    (Ok(t), Some(records)) => match t
                        .partitions
                        .get(pd.index.max(0) as usize)
                        .filter(|_| pd.index >= 0)
                    {
                        None => Err((
                            ResponseError::UnknownTopicOrPartition,
                            format!("topic '{name}' has no partition {}", pd.index),
                        )),
                        Some(p) => match check_leader(broker, p, acks) {
                            Err(refusal) => Err(refusal),
                            Ok(leader) => match p.append(records) {
                                Ok(info) => {
                                    if let (Some(c), Some(state)) = (&broker.cluster, &leader) {
                                        c.replicas.update_high_watermark(p, state);
                                        if acks == -1 {
                                            to_replicate.push((
                                                p.clone(),
                                                info.last_offset + 1,
                                                state.epoch,
                                            ));
                                        }
                                    }
                                    if info.duplicate {
                                        tracing::debug!(topic = %name, partition = pd.index, offset = info.base_offset, "duplicate batch answered with its original offset");
                                    } else {
                                        let m = crate::metrics::get();
                                        m.produced_records.with_label_values(&[&name]).inc_by(
                                            (info.last_offset - info.base_offset + 1) as u64,
                                        );
                                        m.produced_bytes
                                            .with_label_values(&[&name])
                                            .inc_by(records.len() as u64);
                                    }
                                    if info.needs_fsync {
                                        to_flush.push((p.clone(), info.last_offset + 1));
                                    }
                                    Ok(info)
                                }
                                Err(e) => {
                                    tracing::debug!(topic = %name, partition = pd.index, error = %e, "produce rejected");
                                    if let (AppendError::Io(_), Some(c), Some(state)) =
                                        (&e, &broker.cluster, &leader)
                                    {
                                        c.replicas.resign(p, state);
                                    }
                                    Err((append_error_code(&e), e.to_string()))
                                }
                            },
                        },
                    },
                }
            };
            match outcome {
                Ok(info) => {
                    resp.base_offset = info.base_offset;
                    resp.log_start_offset = info.log_start_offset;
                }
                Err((code, message)) => {
                    resp.error_code = code.code();
                    resp.error_message = Some(str_bytes(message));
                }
            }
            partitions.push(resp);
        }
        responses.push(
            TopicProduceResponse::default()
                .with_name(topic_data.name)
                .with_partition_responses(partitions),
        );
    }
    Appended {
        acks,
        responses,
        to_flush,
        to_replicate,
        deadline,
    }
}

/// In a cluster, only the partition's leader takes writes, and acks=all needs
/// min.insync.replicas replicas in sync before anything is appended.
fn check_leader(
    broker: &Broker,
    p: &Partition,
    acks: i16,
) -> Result<Option<Arc<LeaderState>>, (ResponseError, String)> {
    let leader = broker
        .leadership(&p.topic, p.id)
        .map_err(|e| (e, format!("this node does not lead {}-{}", p.topic, p.id)))?;
    if let Some(state) = &leader {
        let min = p.config().min_insync_replicas;
        if acks == -1 && (state.isr_len() as i32) < min {
            p.note_refused(Refusal::NotEnoughReplicas);
            return Err((
                ResponseError::NotEnoughReplicas,
                format!(
                    "{}-{} has {} in-sync replica(s); min.insync.replicas is {min}",
                    p.topic,
                    p.id,
                    state.isr_len()
                ),
            ));
        }
    }
    Ok(leader)
}

/// Waits until the in-sync replicas hold everything below `offset`, written while this node
/// led the partition in `epoch` (None on a single node): the high watermark reaches it while
/// this node still leads in that epoch. A leader that lost leadership meanwhile may have
/// truncated the write, and its high watermark then passes the offset over other records:
/// NOT_LEADER_OR_FOLLOWER, which producers retry. REQUEST_TIMED_OUT at the deadline.
pub(super) async fn wait_replicated(
    p: &Partition,
    offset: i64,
    epoch: Option<i32>,
    deadline: tokio::time::Instant,
) -> Result<(), ResponseError> {
    loop {
        let notify = Arc::new(Notify::new());
        p.register_waiter(notify.clone());
        // The high watermark first: if this node still leads in `epoch` afterwards, it led
        // all along (a new leadership has a new epoch) and never truncated in between.
        let reached = p.high_watermark() >= offset;
        if epoch.is_some_and(|e| !p.leads_in(e)) {
            return Err(ResponseError::NotLeaderOrFollower);
        }
        if reached {
            return Ok(());
        }
        if tokio::time::timeout_at(deadline, notify.notified())
            .await
            .is_err()
        {
            let reached = p.high_watermark() >= offset;
            if epoch.is_some_and(|e| !p.leads_in(e)) {
                return Err(ResponseError::NotLeaderOrFollower);
            }
            return if reached {
                Ok(())
            } else {
                Err(ResponseError::RequestTimedOut)
            };
        }
    }
}

/// A transactional batch may only go to a partition its producer added to its open
/// transaction (KIP-890's check, asked of the coordinator); that prevents transactions that no
/// marker would ever close.
async fn check_transactional(
    broker: &Broker,
    transactional_id: Option<&str>,
    topic: &str,
    partition: i32,
    records: Option<&[u8]>,
) -> Result<(), (ResponseError, String)> {
    let Some(records) = records.filter(|r| r.len() >= HEADER_LEN) else {
        return Ok(());
    };
    let batch = BatchView::new(records);
    match transactional_id {
        None if batch.is_transactional() => Err((
            ResponseError::InvalidTxnState,
            "a transactional batch needs the producer's transactional id".to_string(),
        )),
        None => Ok(()),
        Some(id) => {
            let producer = ProducerRef {
                id: batch.producer_id(),
                epoch: batch.producer_epoch(),
            };
            // In a cluster a partition already holding this transaction was verified by its
            // first batch: later ones save the round trip to the coordinator.
            if broker.cluster.is_some() && !broker.txns.is_active() {
                let open = broker
                    .log
                    .partition(topic, partition)
                    .is_some_and(|p| p.has_open_txn(producer.id, producer.epoch));
                if open {
                    return Ok(());
                }
            }
            broker
                .verify_txn_partition(id, producer, topic, partition)
                .await
                .map_err(|e| {
                    let e = match e {
                        ResponseError::ProducerFenced => ResponseError::InvalidProducerEpoch,
                        // Retried by every client (Kafka answers so as well).
                        ResponseError::CoordinatorNotAvailable => ResponseError::NotEnoughReplicas,
                        other => other,
                    };
                    (
                        e,
                        format!("transactional id '{id}' may not write to {topic}-{partition} now"),
                    )
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::batch::test_support::batch;
    use crate::log::config::LogConfig;
    use kafka_protocol::records::Compression;

    fn replica(dir: &std::path::Path) -> Arc<Partition> {
        let (p, _) = Partition::open(dir, Arc::from("t"), 0, LogConfig::default(), 0).unwrap();
        p.set_replicated(true);
        Arc::new(p)
    }

    /// A leader's acks=all write waits for its followers; leadership moves to one that never
    /// got it, this node truncates the write, follows and takes the new leader's records at
    /// the same offset. The high watermark then passes the write's offset, but the write is
    /// gone: it must not be acknowledged.
    #[tokio::test]
    async fn a_write_truncated_after_a_leader_change_is_not_acknowledged() {
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let old = replica(dirs.0.path());
        old.become_leader(1).unwrap();
        let info = old
            .append(&batch(&[b"acked?"], Compression::None, 0))
            .unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let waiting = tokio::spawn({
            let old = old.clone();
            async move { wait_replicated(&old, info.last_offset + 1, Some(1), deadline).await }
        });
        tokio::task::yield_now().await;

        let new = replica(dirs.1.path());
        new.become_leader(2).unwrap();
        new.append(&batch(&[b"other", b"records"], Compression::None, 0))
            .unwrap();
        old.become_follower(2);
        old.truncate_to(0).unwrap();
        let bytes = new
            .read_replica(0, 1 << 20)
            .unwrap()
            .records
            .unwrap()
            .read_bytes()
            .unwrap();
        old.append_replica(&bytes).unwrap();
        old.advance_high_watermark(2);
        assert!(old.high_watermark() > info.last_offset);
        assert_eq!(
            waiting.await.unwrap(),
            Err(ResponseError::NotLeaderOrFollower)
        );

        // A write whose leader keeps leading is acknowledged once the high watermark passes.
        let info = new
            .append(&batch(&[b"kept"], Compression::None, 0))
            .unwrap();
        new.advance_high_watermark(info.last_offset + 1);
        assert_eq!(
            wait_replicated(&new, info.last_offset + 1, Some(2), deadline).await,
            Ok(())
        );
    }
}
