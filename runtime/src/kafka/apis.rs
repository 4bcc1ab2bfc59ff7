//! Which APIs and versions this node implements, and the dispatch from request to handler.

use std::net::SocketAddr;
use std::sync::Arc;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, FetchResponse, RequestKind, ResponseKind,
    SaslAuthenticateResponse, SaslHandshakeResponse,
};

use crate::log::partition::FileSlice;

use super::{
    acls, admin, consumer_groups, epochs, fetch, groups, metadata, produce, reassign, txn,
    txn_cluster, users, Broker,
};

/// (API, lowest, highest version) that weir implements. Only these are advertised.
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 7),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::AlterConfigs, 0, 2),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::IncrementalAlterConfigs, 0, 1),
    (ApiKey::DescribeCluster, 0, 1),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::OffsetCommit, 2, 9),
    (ApiKey::OffsetFetch, 1, 9),
    (ApiKey::ListGroups, 0, 5),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::ConsumerGroupHeartbeat, 0, 1),
    (ApiKey::ConsumerGroupDescribe, 0, 1),
    (ApiKey::OffsetDelete, 0, 0),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::AddPartitionsToTxn, 0, 3),
    (ApiKey::AddOffsetsToTxn, 0, 3),
    (ApiKey::EndTxn, 0, 3),
    (ApiKey::TxnOffsetCommit, 0, 3),
    (ApiKey::DescribeTransactions, 0, 0),
    (ApiKey::ListTransactions, 0, 1),
    (ApiKey::DescribeProducers, 0, 0),
    (ApiKey::OffsetForLeaderEpoch, 2, 4),
    (ApiKey::AlterPartitionReassignments, 0, 1),
    (ApiKey::ListPartitionReassignments, 0, 0),
    (ApiKey::WriteTxnMarkers, 1, 1),
    (ApiKey::SaslHandshake, 0, 1),
    (ApiKey::SaslAuthenticate, 0, 2),
    (ApiKey::DescribeUserScramCredentials, 0, 0),
    (ApiKey::AlterUserScramCredentials, 0, 0),
    (ApiKey::CreateAcls, 1, 3),
    (ApiKey::DescribeAcls, 1, 3),
    (ApiKey::DeleteAcls, 1, 3),
];

pub fn is_supported(key: ApiKey, version: i16) -> bool {
    SUPPORTED
        .iter()
        .any(|&(k, lo, hi)| k == key && (lo..=hi).contains(&version))
}

pub struct RequestContext {
    pub version: i16,
    pub client_id: Option<String>,
    pub peer: SocketAddr,
    /// The name of the listener the request came in on.
    pub listener: Arc<str>,
    /// Who sent it: `User:ANONYMOUS`, a SASL user or a client certificate's subject.
    pub principal: Arc<str>,
}

#[cfg(test)]
impl RequestContext {
    /// An anonymous plaintext client of the given API version.
    pub fn for_tests(version: i16) -> RequestContext {
        RequestContext {
            version,
            client_id: None,
            peer: ([127, 0, 0, 1], 50000).into(),
            listener: "PLAINTEXT".into(),
            principal: crate::security::ANONYMOUS.into(),
        }
    }
}

fn api_version_list() -> Vec<ApiVersion> {
    SUPPORTED
        .iter()
        .map(|&(k, lo, hi)| {
            ApiVersion::default()
                .with_api_key(k as i16)
                .with_min_version(lo)
                .with_max_version(hi)
        })
        .collect()
}

pub fn api_versions_unsupported() -> ResponseKind {
    ResponseKind::ApiVersions(
        ApiVersionsResponse::default()
            .with_error_code(ResponseError::UnsupportedVersion.code())
            .with_api_keys(api_version_list()),
    )
}

/// A handler's answer.
pub enum Reply {
    Message(ResponseKind),
    /// A fetch response whose partitions' records are still in segment files, in order.
    Fetch(FetchResponse, Vec<Option<FileSlice>>),
}

/// Handles one decoded request. None means no response is sent (produce with acks=0).
pub async fn dispatch(
    broker: &Broker,
    ctx: &RequestContext,
    request: RequestKind,
) -> Option<Reply> {
    let response = match request {
        RequestKind::ApiVersions(_) => ResponseKind::ApiVersions(
            ApiVersionsResponse::default().with_api_keys(api_version_list()),
        ),
        RequestKind::Metadata(r) => {
            ResponseKind::Metadata(metadata::metadata(broker, ctx, r).await)
        }
        RequestKind::DescribeCluster(r) => {
            ResponseKind::DescribeCluster(metadata::describe_cluster(broker, ctx, r))
        }
        RequestKind::Produce(r) => {
            return produce::produce(broker, ctx, r)
                .await
                .map(|r| Reply::Message(ResponseKind::Produce(r)))
        }
        RequestKind::Fetch(r) => {
            let (response, slices) = fetch::fetch(broker, ctx, r).await;
            return Some(Reply::Fetch(response, slices));
        }
        RequestKind::ListOffsets(r) => {
            ResponseKind::ListOffsets(fetch::list_offsets(broker, ctx, r))
        }
        RequestKind::CreateTopics(r) => {
            ResponseKind::CreateTopics(admin::create_topics(broker, ctx, r).await)
        }
        RequestKind::DeleteTopics(r) => {
            ResponseKind::DeleteTopics(admin::delete_topics(broker, ctx, r).await)
        }
        RequestKind::CreatePartitions(r) => {
            ResponseKind::CreatePartitions(admin::create_partitions(broker, ctx, r).await)
        }
        RequestKind::DescribeConfigs(r) => {
            ResponseKind::DescribeConfigs(admin::describe_configs(broker, ctx, r))
        }
        RequestKind::AlterConfigs(r) => {
            ResponseKind::AlterConfigs(admin::alter_configs(broker, ctx, r).await)
        }
        RequestKind::IncrementalAlterConfigs(r) => ResponseKind::IncrementalAlterConfigs(
            admin::incremental_alter_configs(broker, ctx, r).await,
        ),
        RequestKind::FindCoordinator(r) => {
            ResponseKind::FindCoordinator(groups::find_coordinator(broker, ctx, r))
        }
        RequestKind::JoinGroup(r) => {
            ResponseKind::JoinGroup(groups::join_group(broker, ctx, r).await)
        }
        RequestKind::SyncGroup(r) => {
            ResponseKind::SyncGroup(groups::sync_group(broker, ctx, r).await)
        }
        RequestKind::Heartbeat(r) => ResponseKind::Heartbeat(groups::heartbeat(broker, ctx, r)),
        RequestKind::LeaveGroup(r) => ResponseKind::LeaveGroup(groups::leave_group(broker, ctx, r)),
        RequestKind::OffsetCommit(r) => {
            ResponseKind::OffsetCommit(groups::offset_commit(broker, ctx, r).await)
        }
        RequestKind::OffsetFetch(r) => {
            ResponseKind::OffsetFetch(groups::offset_fetch(broker, ctx, r))
        }
        RequestKind::ListGroups(r) => ResponseKind::ListGroups(groups::list_groups(broker, ctx, r)),
        RequestKind::DescribeGroups(r) => {
            ResponseKind::DescribeGroups(groups::describe_groups(broker, ctx, r))
        }
        RequestKind::ConsumerGroupHeartbeat(r) => ResponseKind::ConsumerGroupHeartbeat(
            consumer_groups::consumer_group_heartbeat(broker, ctx, r),
        ),
        RequestKind::ConsumerGroupDescribe(r) => ResponseKind::ConsumerGroupDescribe(
            consumer_groups::consumer_group_describe(broker, ctx, r),
        ),
        RequestKind::DeleteGroups(r) => {
            ResponseKind::DeleteGroups(groups::delete_groups(broker, ctx, r))
        }
        RequestKind::OffsetDelete(r) => {
            ResponseKind::OffsetDelete(groups::offset_delete(broker, ctx, r))
        }
        RequestKind::InitProducerId(r) => {
            ResponseKind::InitProducerId(txn::init_producer_id(broker, ctx, r).await)
        }
        RequestKind::AddPartitionsToTxn(r) => {
            ResponseKind::AddPartitionsToTxn(txn::add_partitions_to_txn(broker, ctx, r).await)
        }
        RequestKind::AddOffsetsToTxn(r) => {
            ResponseKind::AddOffsetsToTxn(txn::add_offsets_to_txn(broker, ctx, r).await)
        }
        RequestKind::EndTxn(r) => ResponseKind::EndTxn(txn::end_txn(broker, ctx, r).await),
        RequestKind::TxnOffsetCommit(r) => {
            ResponseKind::TxnOffsetCommit(txn::txn_offset_commit(broker, ctx, r).await)
        }
        RequestKind::DescribeTransactions(r) => {
            ResponseKind::DescribeTransactions(txn::describe_transactions(broker, ctx, r).await)
        }
        RequestKind::ListTransactions(r) => {
            ResponseKind::ListTransactions(txn::list_transactions(broker, ctx, r).await)
        }
        RequestKind::DescribeProducers(r) => {
            ResponseKind::DescribeProducers(txn::describe_producers(broker, ctx, r))
        }
        RequestKind::OffsetForLeaderEpoch(r) => {
            ResponseKind::OffsetForLeaderEpoch(epochs::offset_for_leader_epoch(broker, ctx, r))
        }
        RequestKind::AlterPartitionReassignments(r) => ResponseKind::AlterPartitionReassignments(
            reassign::alter_partition_reassignments(broker, ctx, r).await,
        ),
        RequestKind::ListPartitionReassignments(r) => ResponseKind::ListPartitionReassignments(
            reassign::list_partition_reassignments(broker, ctx, r),
        ),
        RequestKind::WriteTxnMarkers(r) => {
            ResponseKind::WriteTxnMarkers(txn_cluster::write_txn_markers(broker, ctx, r).await)
        }
        // A SASL listener's connections answer these themselves (security::sasl); here they
        // arrive on a listener without SASL, as in Kafka.
        RequestKind::SaslHandshake(_) => ResponseKind::SaslHandshake(
            SaslHandshakeResponse::default()
                .with_error_code(ResponseError::IllegalSaslState.code()),
        ),
        RequestKind::SaslAuthenticate(_) => ResponseKind::SaslAuthenticate(
            SaslAuthenticateResponse::default()
                .with_error_code(ResponseError::IllegalSaslState.code())
                .with_error_message(Some(super::str_bytes("this listener does not use SASL"))),
        ),
        RequestKind::DescribeUserScramCredentials(r) => ResponseKind::DescribeUserScramCredentials(
            users::describe_user_scram_credentials(broker, ctx, r),
        ),
        RequestKind::AlterUserScramCredentials(r) => ResponseKind::AlterUserScramCredentials(
            users::alter_user_scram_credentials(broker, ctx, r).await,
        ),
        RequestKind::CreateAcls(r) => {
            ResponseKind::CreateAcls(acls::create_acls(broker, ctx, r).await)
        }
        RequestKind::DescribeAcls(r) => {
            ResponseKind::DescribeAcls(acls::describe_acls(broker, ctx, r))
        }
        // is_supported() admits only the APIs above.
        RequestKind::DeleteAcls(r) => {
            ResponseKind::DeleteAcls(acls::delete_acls(broker, ctx, r).await)
        }
        other => unreachable!("dispatch of unadvertised request {other:?}"),
    };
    Some(Reply::Message(response))
}

impl Reply {
    /// The error codes a response carries (top level, per partition, per key), for the
    /// metrics; the APIs not listed count none.
    pub fn error_codes(&self) -> Vec<i16> {
        let fetch = |r: &FetchResponse| {
            std::iter::once(r.error_code)
                .chain(
                    r.responses
                        .iter()
                        .flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
                )
                .collect()
        };
        let m = match self {
            Reply::Fetch(r, _) => return fetch(r),
            Reply::Message(m) => m,
        };
        match m {
            ResponseKind::Fetch(r) => fetch(r),
            ResponseKind::Produce(r) => r
                .responses
                .iter()
                .flat_map(|t| t.partition_responses.iter().map(|p| p.error_code))
                .collect(),
            ResponseKind::ListOffsets(r) => r
                .topics
                .iter()
                .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
                .collect(),
            ResponseKind::Metadata(r) => r.topics.iter().map(|t| t.error_code).collect(),
            ResponseKind::FindCoordinator(r) => std::iter::once(r.error_code)
                .chain(r.coordinators.iter().map(|c| c.error_code))
                .collect(),
            ResponseKind::JoinGroup(r) => vec![r.error_code],
            ResponseKind::SyncGroup(r) => vec![r.error_code],
            ResponseKind::Heartbeat(r) => vec![r.error_code],
            ResponseKind::ConsumerGroupHeartbeat(r) => vec![r.error_code],
            ResponseKind::ConsumerGroupDescribe(r) => {
                r.groups.iter().map(|g| g.error_code).collect()
            }
            ResponseKind::LeaveGroup(r) => vec![r.error_code],
            ResponseKind::OffsetCommit(r) => r
                .topics
                .iter()
                .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
                .collect(),
            ResponseKind::OffsetFetch(r) => std::iter::once(r.error_code)
                .chain(r.groups.iter().map(|g| g.error_code))
                .collect(),
            ResponseKind::InitProducerId(r) => vec![r.error_code],
            ResponseKind::AddPartitionsToTxn(r) => std::iter::once(r.error_code)
                .chain(r.results_by_topic_v3_and_below.iter().flat_map(|t| {
                    t.results_by_partition
                        .iter()
                        .map(|p| p.partition_error_code)
                }))
                .collect(),
            ResponseKind::AddOffsetsToTxn(r) => vec![r.error_code],
            ResponseKind::EndTxn(r) => vec![r.error_code],
            ResponseKind::TxnOffsetCommit(r) => r
                .topics
                .iter()
                .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
                .collect(),
            ResponseKind::CreateTopics(r) => r.topics.iter().map(|t| t.error_code).collect(),
            ResponseKind::DeleteTopics(r) => r.responses.iter().map(|t| t.error_code).collect(),
            ResponseKind::OffsetForLeaderEpoch(r) => r
                .topics
                .iter()
                .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
                .collect(),
            _ => Vec::new(),
        }
    }
}
