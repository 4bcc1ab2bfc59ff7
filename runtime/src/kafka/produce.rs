//! Produce: validate each partition's batches, append, and acknowledge per acks and durability.

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse};

use super::apis::RequestContext;
use super::{append_error_code, str_bytes, Broker};
use crate::log::batch::{BatchView, HEADER_LEN};
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
    for topic_data in req.topic_data {
        let name = topic_data.name.0.to_string();
        let topic = broker.topic_or_create(&name, true);
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
                        Some(p) => match p.append(records) {
                            Ok(info) => {
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
    (acks != 0).then(|| ProduceResponse::default().with_responses(responses))
}

/// A transactional batch may only go to a partition its producer added to its open
/// transaction (KIP-890's check, made in process with the coordinator); that prevents
/// transactions that no marker would ever close.
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
            broker
                .txns
                .verify_partition(id, producer, topic, partition)
                .await
                .map_err(|e| {
                    let e = match e {
                        ResponseError::ProducerFenced => ResponseError::InvalidProducerEpoch,
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
