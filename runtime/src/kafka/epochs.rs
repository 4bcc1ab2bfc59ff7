//! OffsetForLeaderEpoch (KIP-101/279, KIP-320): where a leader epoch ends in a partition's log.
//! Followers ask it to find where their log diverges from the leader's; consumers ask it to
//! check that their position survived a leader change.

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::offset_for_leader_epoch_request::OffsetForLeaderPartition;
use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderTopicResult,
};
use kafka_protocol::messages::{OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse};

use super::apis::RequestContext;
use super::Broker;
use crate::log::partition::Partition;
use crate::security::acl::{Operation, ResourceType};

pub fn offset_for_leader_epoch(
    broker: &Broker,
    ctx: &RequestContext,
    req: OffsetForLeaderEpochRequest,
) -> OffsetForLeaderEpochResponse {
    // replica_id (v3+) tells a follower from a consumer; both get the same answer here, a
    // follower if it may act for the cluster, a consumer if it may describe the topic.
    let follower_allowed = (ctx.version >= 3 && req.replica_id.0 >= 0)
        .then(|| broker.allowed_on_cluster(ctx, Operation::ClusterAction));
    let topics = req
        .topics
        .into_iter()
        .map(|t| {
            let allowed = follower_allowed.unwrap_or_else(|| {
                broker.allowed(ctx, Operation::Describe, ResourceType::Topic, &t.topic.0)
            });
            let partitions = t
                .partitions
                .iter()
                .map(|p| match allowed {
                    true => epoch_end_offset(broker, &t.topic.0, p),
                    false => EpochEndOffset::default()
                        .with_partition(p.partition)
                        .with_leader_epoch(-1)
                        .with_end_offset(-1)
                        .with_error_code(ResponseError::TopicAuthorizationFailed.code()),
                })
                .collect();
            OffsetForLeaderTopicResult::default()
                .with_topic(t.topic)
                .with_partitions(partitions)
        })
        .collect();
    OffsetForLeaderEpochResponse::default().with_topics(topics)
}

fn epoch_end_offset(
    broker: &Broker,
    topic: &str,
    req: &OffsetForLeaderPartition,
) -> EpochEndOffset {
    let out = EpochEndOffset::default()
        .with_partition(req.partition)
        .with_leader_epoch(-1)
        .with_end_offset(-1);
    let Some(p) = broker.log.partition(topic, req.partition) else {
        return out.with_error_code(ResponseError::UnknownTopicOrPartition.code());
    };
    if let Err(e) = check_leader(broker, &p, req.current_leader_epoch) {
        return out.with_error_code(e.code());
    }
    let (epoch, end_offset) = p.end_offset_for_epoch(req.leader_epoch);
    out.with_leader_epoch(epoch).with_end_offset(end_offset)
}

/// Whether this node may answer for the partition: only its leader does. `current_epoch` is
/// the epoch the requester believes current (-1: no check).
fn check_leader(
    broker: &Broker,
    partition: &Partition,
    current_epoch: i32,
) -> Result<(), ResponseError> {
    // A single node leads every partition; a cluster node only those the metadata gives it.
    broker.leadership(&partition.topic, partition.id)?;
    let epoch = partition.leader_epoch();
    match current_epoch {
        -1 => Ok(()),
        e if e > epoch => Err(ResponseError::UnknownLeaderEpoch),
        e if e < epoch => Err(ResponseError::FencedLeaderEpoch),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::batch::BatchBuilder;
    use kafka_protocol::messages::offset_for_leader_epoch_request::OffsetForLeaderTopic;
    use kafka_protocol::messages::TopicName;
    use kafka_protocol::records::Compression;

    fn one_record() -> Vec<u8> {
        let mut b = BatchBuilder::new(1);
        b.push(Some(b"k"), Some(b"v"), &[], 1);
        b.finish(Compression::None)
    }

    fn ask(broker: &Broker, topic: &str, queries: &[(i32, i32, i32)]) -> Vec<(i16, i32, i64)> {
        let req = OffsetForLeaderEpochRequest::default().with_topics(vec![
            OffsetForLeaderTopic::default()
                .with_topic(TopicName(super::super::str_bytes(topic)))
                .with_partitions(
                    queries
                        .iter()
                        .map(|&(partition, current, epoch)| {
                            OffsetForLeaderPartition::default()
                                .with_partition(partition)
                                .with_current_leader_epoch(current)
                                .with_leader_epoch(epoch)
                        })
                        .collect(),
                ),
        ]);
        let ctx = crate::kafka::apis::RequestContext::for_tests(4);
        let resp = offset_for_leader_epoch(broker, &ctx, req);
        assert_eq!(resp.topics.len(), 1);
        resp.topics[0]
            .partitions
            .iter()
            .map(|p| (p.error_code, p.leader_epoch, p.end_offset))
            .collect()
    }

    #[test]
    fn answers_where_each_epoch_ends() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::for_tests(dir.path());
        broker
            .log
            .create_topic("t", 1, 1, Default::default())
            .unwrap();
        let p = broker.log.partition("t", 0).unwrap();
        // Epoch 0: offsets 0..2; epoch 3: 2..3; epoch 5 from 3 (log end 5).
        p.append(&one_record()).unwrap();
        p.append(&one_record()).unwrap();
        p.become_leader(3).unwrap();
        p.append(&one_record()).unwrap();
        p.become_leader(5).unwrap();
        p.append(&one_record()).unwrap();
        p.append(&one_record()).unwrap();
        let fenced = ResponseError::FencedLeaderEpoch.code();
        let unknown = ResponseError::UnknownLeaderEpoch.code();
        let missing = ResponseError::UnknownTopicOrPartition.code();
        assert_eq!(
            ask(
                &broker,
                "t",
                &[
                    (0, -1, 0),
                    (0, 5, 3),
                    (0, 5, 4),
                    (0, 5, 5),
                    (0, -1, 9),
                    (0, 4, 0),
                    (0, 6, 0),
                    (1, -1, 0),
                ]
            ),
            vec![
                (0, 0, 2),
                (0, 3, 3),
                (0, 3, 3),
                (0, 5, 5),
                (0, -1, -1),
                (fenced, -1, -1),
                (unknown, -1, -1),
                (missing, -1, -1),
            ]
        );
        assert_eq!(ask(&broker, "nope", &[(0, -1, 0)]), vec![(missing, -1, -1)]);
    }
}
