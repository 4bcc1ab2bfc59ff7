//! Producer ids and transactions: InitProducerId, AddPartitionsToTxn, AddOffsetsToTxn,
//! TxnOffsetCommit, EndTxn, and DescribeTransactions / ListTransactions / DescribeProducers for
//! operators.

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnTopicResult,
};
use kafka_protocol::messages::describe_producers_response::{
    PartitionResponse, ProducerState, TopicResponse,
};
use kafka_protocol::messages::describe_transactions_response::{TopicData, TransactionState};
use kafka_protocol::messages::list_transactions_response::TransactionState as ListedTxn;
use kafka_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use kafka_protocol::messages::{
    AddOffsetsToTxnRequest, AddOffsetsToTxnResponse, AddPartitionsToTxnRequest,
    AddPartitionsToTxnResponse, DescribeProducersRequest, DescribeProducersResponse,
    DescribeTransactionsRequest, DescribeTransactionsResponse, EndTxnRequest, EndTxnResponse,
    InitProducerIdRequest, InitProducerIdResponse, ListTransactionsRequest,
    ListTransactionsResponse, ProducerId, TopicName, TransactionalId, TxnOffsetCommitRequest,
    TxnOffsetCommitResponse,
};

use super::apis::RequestContext;
use super::groups::{partition_code, requested_offset};
use super::{str_bytes, Broker};
use crate::group::{self, CommittedOffset};
use crate::log::producer_state::ActiveProducer;
use crate::now_ms;
use crate::security::acl::{Operation, ResourceType};
use crate::txn::ProducerRef;

/// Before these versions clients do not know PRODUCER_FENCED (KIP-588) and get
/// INVALID_PRODUCER_EPOCH instead.
fn fenced_for(version: i16, first_version: i16, e: ResponseError) -> ResponseError {
    if e == ResponseError::ProducerFenced && version < first_version {
        ResponseError::InvalidProducerEpoch
    } else {
        e
    }
}

fn code(e: Option<ResponseError>) -> i16 {
    e.map_or(0, |e| e.code())
}

/// Adding a group's offsets to a transaction needs Write on the transactional id and Read on
/// the group.
fn offsets_refusal(
    broker: &Broker,
    ctx: &RequestContext,
    transactional_id: &str,
    group: &str,
) -> Option<ResponseError> {
    broker
        .refusal(
            ctx,
            Operation::Write,
            ResourceType::TransactionalId,
            transactional_id,
        )
        .or_else(|| broker.refusal(ctx, Operation::Read, ResourceType::Group, group))
}

pub async fn init_producer_id(
    broker: &Broker,
    ctx: &RequestContext,
    req: InitProducerIdRequest,
) -> InitProducerIdResponse {
    // A transactional producer needs Write on its id; an idempotent one, IdempotentWrite on
    // the cluster or Write on some topic (KIP-679).
    let refused = match req.transactional_id.as_deref() {
        Some(id) => broker.refusal(ctx, Operation::Write, ResourceType::TransactionalId, id),
        None => (!broker.allowed_on_cluster(ctx, Operation::IdempotentWrite)
            && !broker.allowed_on_any(ctx, Operation::Write, ResourceType::Topic))
        .then_some(ResponseError::ClusterAuthorizationFailed),
    };
    if let Some(e) = refused {
        return InitProducerIdResponse::default()
            .with_error_code(e.code())
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1);
    }
    let current = (ctx.version >= 3 && req.producer_id.0 >= 0).then_some(ProducerRef {
        id: req.producer_id.0,
        epoch: req.producer_epoch,
    });
    let result = broker
        .txns
        .init_producer_id(
            req.transactional_id.as_deref().map(|s| s.as_str()),
            req.transaction_timeout_ms,
            current,
        )
        .await;
    match result {
        Ok(p) => InitProducerIdResponse::default()
            .with_producer_id(ProducerId(p.id))
            .with_producer_epoch(p.epoch),
        Err(e) => InitProducerIdResponse::default()
            .with_error_code(fenced_for(ctx.version, 4, e).code())
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1),
    }
}

pub async fn add_partitions_to_txn(
    broker: &Broker,
    ctx: &RequestContext,
    req: AddPartitionsToTxnRequest,
) -> AddPartitionsToTxnResponse {
    let mut wanted = Vec::new();
    for t in &req.v3_and_below_topics {
        for &p in &t.partitions {
            wanted.push((t.name.0.to_string(), p));
        }
    }
    let producer = ProducerRef {
        id: req.v3_and_below_producer_id.0,
        epoch: req.v3_and_below_producer_epoch,
    };
    // Kafka refuses the whole request when any part of it is refused; the partitions that
    // were allowed get OPERATION_NOT_ATTEMPTED.
    let id_refused = broker.refusal(
        ctx,
        Operation::Write,
        ResourceType::TransactionalId,
        &req.v3_and_below_transactional_id,
    );
    let refused_topics: Vec<&str> = req
        .v3_and_below_topics
        .iter()
        .map(|t| t.name.0.as_str())
        .filter(|t| {
            broker
                .refusal(ctx, Operation::Write, ResourceType::Topic, t)
                .is_some()
        })
        .collect();
    let results = if let Some(e) = id_refused {
        Err(e)
    } else if !refused_topics.is_empty() {
        Ok(wanted
            .iter()
            .map(|(t, p)| {
                let e = if refused_topics.contains(&t.as_str()) {
                    ResponseError::TopicAuthorizationFailed
                } else {
                    ResponseError::OperationNotAttempted
                };
                ((t.clone(), *p), Some(e))
            })
            .collect())
    } else {
        broker
            .txns
            .add_partitions(&req.v3_and_below_transactional_id, producer, wanted.clone())
            .await
    };
    let error_for =
        |topic: &str, p: i32| partition_code(&results, topic, p, |e| fenced_for(ctx.version, 2, e));
    let topics = req
        .v3_and_below_topics
        .iter()
        .map(|t| {
            AddPartitionsToTxnTopicResult::default()
                .with_name(t.name.clone())
                .with_results_by_partition(
                    t.partitions
                        .iter()
                        .map(|&p| {
                            AddPartitionsToTxnPartitionResult::default()
                                .with_partition_index(p)
                                .with_partition_error_code(error_for(&t.name.0, p))
                        })
                        .collect(),
                )
        })
        .collect();
    AddPartitionsToTxnResponse::default().with_results_by_topic_v3_and_below(topics)
}

pub async fn add_offsets_to_txn(
    broker: &Broker,
    ctx: &RequestContext,
    req: AddOffsetsToTxnRequest,
) -> AddOffsetsToTxnResponse {
    let producer = ProducerRef {
        id: req.producer_id.0,
        epoch: req.producer_epoch,
    };
    let refused = offsets_refusal(broker, ctx, &req.transactional_id, &req.group_id);
    let result = match refused {
        Some(e) => Err(e),
        None => {
            broker
                .txns
                .add_offsets(&req.transactional_id, producer, &req.group_id)
                .await
        }
    };
    AddOffsetsToTxnResponse::default()
        .with_error_code(code(result.err().map(|e| fenced_for(ctx.version, 2, e))))
}

pub async fn txn_offset_commit(
    broker: &Broker,
    ctx: &RequestContext,
    req: TxnOffsetCommitRequest,
) -> TxnOffsetCommitResponse {
    let producer = ProducerRef {
        id: req.producer_id.0,
        epoch: req.producer_epoch,
    };
    let now = now_ms();
    let offsets: Vec<((String, i32), CommittedOffset)> = req
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(move |p| {
                let epoch = if ctx.version >= 2 {
                    p.committed_leader_epoch
                } else {
                    -1
                };
                (
                    (t.name.0.to_string(), p.partition_index),
                    requested_offset(
                        p.committed_offset,
                        epoch,
                        p.committed_metadata.as_deref(),
                        now,
                    ),
                )
            })
        })
        .collect();
    // The group's offsets partition must be in the transaction (AddOffsetsToTxn first), or
    // the commit marker would never reach these offsets.
    let refused = offsets_refusal(broker, ctx, &req.transactional_id, &req.group_id);
    let refused_topic = |t: &str| broker.refusal(ctx, Operation::Read, ResourceType::Topic, t);
    let verified = match refused {
        Some(e) => Err(e),
        None => {
            broker
                .verify_txn_partition(&req.transactional_id, producer, group::store::TOPIC, 0)
                .await
        }
    };
    let offsets = offsets
        .into_iter()
        .filter(|((t, _), _)| refused_topic(t).is_none())
        .collect();
    let result = match verified {
        Err(e) => Err(e),
        Ok(()) => {
            let log = broker.log.clone();
            broker.groups.txn_commit(
                &req.group_id,
                producer.id,
                producer.epoch,
                &req.member_id,
                req.group_instance_id.as_deref(),
                if ctx.version >= 3 {
                    req.generation_id
                } else {
                    -1
                },
                offsets,
                |topic, p| log.partition(topic, p).is_some(),
            )
        }
    };
    let error_for = |topic: &str, p: i32| match refused_topic(topic) {
        Some(e) if refused.is_none() => e.code(),
        _ => partition_code(&result, topic, p, |e| {
            let e = match e {
                ResponseError::InvalidProducerEpoch => ResponseError::ProducerFenced,
                other => other,
            };
            fenced_for(ctx.version, 3, e)
        }),
    };
    let topics = req
        .topics
        .iter()
        .map(|t| {
            TxnOffsetCommitResponseTopic::default()
                .with_name(t.name.clone())
                .with_partitions(
                    t.partitions
                        .iter()
                        .map(|p| {
                            TxnOffsetCommitResponsePartition::default()
                                .with_partition_index(p.partition_index)
                                .with_error_code(error_for(&t.name.0, p.partition_index))
                        })
                        .collect(),
                )
        })
        .collect();
    TxnOffsetCommitResponse::default().with_topics(topics)
}

pub async fn end_txn(broker: &Broker, ctx: &RequestContext, req: EndTxnRequest) -> EndTxnResponse {
    let producer = ProducerRef {
        id: req.producer_id.0,
        epoch: req.producer_epoch,
    };
    let result = match broker.refusal(
        ctx,
        Operation::Write,
        ResourceType::TransactionalId,
        &req.transactional_id,
    ) {
        Some(e) => Err(e),
        None => {
            broker
                .txns
                .end_txn(&req.transactional_id, producer, req.committed)
                .await
        }
    };
    EndTxnResponse::default()
        .with_error_code(code(result.err().map(|e| fenced_for(ctx.version, 2, e))))
}

pub async fn describe_transactions(
    broker: &Broker,
    ctx: &RequestContext,
    req: DescribeTransactionsRequest,
) -> DescribeTransactionsResponse {
    let mut states = Vec::with_capacity(req.transactional_ids.len());
    for id in req.transactional_ids {
        let mut s = TransactionState::default()
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1)
            .with_transaction_start_time_ms(-1);
        if let Some(e) =
            broker.refusal(ctx, Operation::Describe, ResourceType::TransactionalId, &id)
        {
            states.push(s.with_error_code(e.code()).with_transactional_id(id));
            continue;
        }
        match broker.txns.describe(&id).await {
            Err(e) => s.error_code = e.code(),
            Ok(None) => s.error_code = ResponseError::TransactionalIdNotFound.code(),
            Ok(Some(m)) => {
                let mut topics: Vec<TopicData> = Vec::new();
                for (t, p) in &m.partitions {
                    match topics.last_mut() {
                        Some(last) if *last.topic.0 == **t => last.partitions.push(*p),
                        _ => topics.push(
                            TopicData::default()
                                .with_topic(TopicName(str_bytes(t.clone())))
                                .with_partitions(vec![*p]),
                        ),
                    }
                }
                s = s
                    .with_transaction_state(str_bytes(m.state.name()))
                    .with_transaction_timeout_ms(m.timeout_ms)
                    .with_transaction_start_time_ms(m.start_ms)
                    .with_producer_id(ProducerId(m.producer_id))
                    .with_producer_epoch(m.producer_epoch)
                    .with_topics(topics);
            }
        }
        states.push(s.with_transactional_id(id));
    }
    DescribeTransactionsResponse::default().with_transaction_states(states)
}

pub async fn list_transactions(
    broker: &Broker,
    ctx: &RequestContext,
    req: ListTransactionsRequest,
) -> ListTransactionsResponse {
    const STATES: [&str; 6] = [
        "Empty",
        "Ongoing",
        "PrepareCommit",
        "PrepareAbort",
        "CompleteCommit",
        "CompleteAbort",
    ];
    let unknown: Vec<_> = req
        .state_filters
        .iter()
        .filter(|f| !STATES.contains(&f.as_str()))
        .cloned()
        .collect();
    let now = now_ms();
    let listed = broker
        .txns
        .list()
        .await
        .into_iter()
        .filter(|(id, _)| {
            broker
                .refusal(ctx, Operation::Describe, ResourceType::TransactionalId, id)
                .is_none()
        })
        .filter(|(_, m)| {
            (req.state_filters.is_empty()
                || req
                    .state_filters
                    .iter()
                    .any(|f| f.as_str() == m.state.name()))
                && (req.producer_id_filters.is_empty()
                    || req.producer_id_filters.contains(&ProducerId(m.producer_id)))
                && (ctx.version < 1
                    || req.duration_filter < 0
                    || (m.start_ms >= 0 && now - m.start_ms >= req.duration_filter))
        })
        .map(|(id, m)| {
            ListedTxn::default()
                .with_transactional_id(TransactionalId(str_bytes(id)))
                .with_producer_id(ProducerId(m.producer_id))
                .with_transaction_state(str_bytes(m.state.name()))
        })
        .collect();
    ListTransactionsResponse::default()
        .with_unknown_state_filters(unknown)
        .with_transaction_states(listed)
}

/// DescribeProducers (KIP-664): the producers each partition this node leads remembers, and the
/// first offset of any transaction they hold open there; what `kafka-transactions.sh
/// describe-producers` and `find-hanging` read. The last timestamp is when this node last
/// appended for the producer (Kafka gives its last batch's timestamp); coordinator epochs are
/// not kept (-1).
pub fn describe_producers(
    broker: &Broker,
    ctx: &RequestContext,
    req: DescribeProducersRequest,
) -> DescribeProducersResponse {
    let topics = req
        .topics
        .into_iter()
        .map(|t| {
            let refused = broker.refusal(ctx, Operation::Read, ResourceType::Topic, &t.name.0);
            let partitions = t
                .partition_indexes
                .iter()
                .map(|&index| {
                    let answer = PartitionResponse::default().with_partition_index(index);
                    let found = match refused {
                        Some(e) => Err(e),
                        None => broker.producers_here(&t.name.0, index),
                    };
                    match found {
                        Ok(producers) => answer
                            .with_active_producers(producers.iter().map(producer_state).collect()),
                        Err(e) => answer.with_error_code(e.code()),
                    }
                })
                .collect();
            TopicResponse::default()
                .with_name(t.name)
                .with_partitions(partitions)
        })
        .collect();
    DescribeProducersResponse::default().with_topics(topics)
}

fn producer_state(p: &ActiveProducer) -> ProducerState {
    ProducerState::default()
        .with_producer_id(ProducerId(p.producer_id))
        .with_producer_epoch(p.producer_epoch as i32)
        .with_last_sequence(p.last_sequence)
        .with_last_timestamp(p.last_write_ms)
        .with_coordinator_epoch(-1)
        .with_current_txn_start_offset(p.txn_first_offset.unwrap_or(-1))
}

/// The inverse of [`producer_state`], for a DescribeProducers answer from another node.
pub fn active_producer(p: &ProducerState) -> ActiveProducer {
    ActiveProducer {
        producer_id: p.producer_id.0,
        producer_epoch: p.producer_epoch as i16,
        last_sequence: p.last_sequence,
        last_write_ms: p.last_timestamp,
        txn_first_offset: (p.current_txn_start_offset >= 0).then_some(p.current_txn_start_offset),
    }
}

impl Broker {
    /// The producers of a partition this node leads (NOT_LEADER_OR_FOLLOWER elsewhere).
    pub fn producers_here(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<Vec<ActiveProducer>, ResponseError> {
        let p = self
            .log
            .partition(topic, partition)
            .ok_or(ResponseError::UnknownTopicOrPartition)?;
        self.leadership(topic, partition)?;
        Ok(p.active_producers())
    }
}
