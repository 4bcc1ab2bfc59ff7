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
use crate::log::partition::Partition;
use crate::txn::ProducerRef;

/// Returns None for acks=0: the client expects no response.
pub async fn produce(
    broker: &Broker,
    _ctx: &RequestContext,
    req: ProduceRequest,
) -> Option<ProduceResponse> {
    let acks = req.acks;
    let mut responses = Vec::with_capacity(req.topic_data.len());
    let mut to_flush = Vec::new();
    // acks=all on replicated partitions: (partition, offset the high watermark must reach).
    let mut to_replicate = Vec::new();
    for topic_data in req.topic_data {
        let name = topic_data.name.0.to_string();
        let topic = broker.topic_or_create(&name, true).await;
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
                                            to_replicate.push((p.clone(), info.last_offset + 1));
                                        }
                                    }
                                    if info.duplicate {
                                        tracing::debug!(topic = %name, partition = pd.index, offset = info.base_offset, "duplicate batch answered with its original offset");
                                    }
                                    if info.needs_fsync {
                                        to_flush.push((p.clone(), info.last_offset + 1));
                                    }
                                    Ok(info)
                                }
                                Err(e) => {
                                    tracing::debug!(topic = %name, partition = pd.index, error = %e, "produce rejected");
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
    if acks != 0 {
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
    }
    if !to_replicate.is_empty() {
        let deadline = tokio::time::Instant::now()
            + std::time::Duration::from_millis(req.timeout_ms.max(0) as u64);
        for (p, offset) in to_replicate {
            if !wait_for_high_watermark(&p, offset, deadline).await {
                for t in responses.iter_mut().filter(|t| *t.name.0 == *p.topic) {
                    for r in t.partition_responses.iter_mut().filter(|r| r.index == p.id) {
                        r.error_code = ResponseError::RequestTimedOut.code();
                        r.error_message = Some(str_bytes(
                            "the in-sync replicas did not all acknowledge the write in time",
                        ));
                    }
                }
            }
        }
    }
    (acks != 0).then(|| ProduceResponse::default().with_responses(responses))
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

/// Waits until the partition's high watermark reaches `offset`; false at the deadline.
pub(super) async fn wait_for_high_watermark(
    p: &Partition,
    offset: i64,
    deadline: tokio::time::Instant,
) -> bool {
    loop {
        let notify = Arc::new(Notify::new());
        p.register_waiter(notify.clone());
        if p.high_watermark() >= offset {
            return true;
        }
        if tokio::time::timeout_at(deadline, notify.notified())
            .await
            .is_err()
        {
            return p.high_watermark() >= offset;
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
