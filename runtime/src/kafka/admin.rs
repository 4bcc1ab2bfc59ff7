//! Topic administration: CreateTopics, DeleteTopics, CreatePartitions, DescribeConfigs,
//! AlterConfigs and IncrementalAlterConfigs.

use std::collections::BTreeMap;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult,
};
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::{
    alter_configs_response, incremental_alter_configs_response, AlterConfigsRequest,
    AlterConfigsResponse, CreatePartitionsRequest, CreatePartitionsResponse, CreateTopicsRequest,
    CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse, DescribeConfigsRequest,
    DescribeConfigsResponse, IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse,
    TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::apis::RequestContext;
use super::{str_bytes, topic_error_code, Broker};
use crate::log::config::{LogConfig, KEYS};
use crate::log::manager::TopicError;
use crate::security::acl::{Operation, ResourceType, CLUSTER_NAME};

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
const SOURCE_TOPIC: i8 = 1;
const SOURCE_STATIC_BROKER: i8 = 4;
const SOURCE_DEFAULT: i8 = 5;
const TYPE_STRING: i8 = 2;
const TYPE_INT: i8 = 3;
const TYPE_LONG: i8 = 5;
const TYPE_DOUBLE: i8 = 6;
const TYPE_LIST: i8 = 7;

fn config_type(key: &str) -> i8 {
    match key {
        "cleanup.policy" => TYPE_LIST,
        "max.message.bytes" | "segment.bytes" | "index.interval.bytes" | "min.insync.replicas" => {
            TYPE_INT
        }
        "min.cleanable.dirty.ratio" => TYPE_DOUBLE,
        _ => TYPE_LONG,
    }
}

fn error_parts(e: &TopicError) -> (i16, Option<StrBytes>) {
    (topic_error_code(e).code(), Some(str_bytes(e.to_string())))
}

pub async fn create_topics(
    broker: &Broker,
    ctx: &RequestContext,
    req: CreateTopicsRequest,
) -> CreateTopicsResponse {
    let mut results = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let name = t.name.0.to_string();
        let mut result = CreatableTopicResult::default().with_name(t.name.clone());
        if !broker.may_create_topic(ctx, &name) {
            result.error_code = ResponseError::TopicAuthorizationFailed.code();
            result.error_message = Some(str_bytes(format!(
                "not authorized to create topic '{name}'"
            )));
            results.push(result);
            continue;
        }
        let mut overrides = BTreeMap::new();
        let mut null_value = None;
        for c in &t.configs {
            match &c.value {
                Some(v) => {
                    overrides.insert(c.name.to_string(), v.to_string());
                }
                None => null_value = Some(c.name.to_string()),
            }
        }
        let assignments = match requested_assignments(&t) {
            Ok(a) => a,
            Err((code, message)) => {
                result.error_code = code.code();
                result.error_message = Some(str_bytes(message));
                results.push(result);
                continue;
            }
        };
        let partitions = match &assignments {
            Some(a) => a.len() as i32,
            None if t.num_partitions == -1 => broker.default_partitions,
            None => t.num_partitions,
        };
        if let Some(key) = null_value {
            result.error_code = ResponseError::InvalidConfig.code();
            result.error_message = Some(str_bytes(format!("config '{key}' has a null value")));
            results.push(result);
            continue;
        }
        let outcome = if req.validate_only {
            broker
                .validate_new_topic(
                    &name,
                    partitions,
                    t.replication_factor as i32,
                    assignments.as_deref(),
                    &overrides,
                )
                .map(|config| (None, config))
        } else {
            broker
                .create_topic(
                    &name,
                    partitions,
                    t.replication_factor as i32,
                    assignments,
                    overrides.clone(),
                )
                .await
                .map(|(id, config)| (Some(id), config))
        };
        match outcome {
            Ok((id, config)) => {
                if let Some(id) = id {
                    result.topic_id = id;
                }
                result.num_partitions = partitions;
                result.replication_factor = match &broker.cluster {
                    Some(c) => c
                        .image()
                        .partition(&name, 0)
                        .map_or(t.replication_factor, |p| p.replicas.len() as i16),
                    None => 1,
                };
                if ctx.version >= 5 {
                    result.configs = Some(
                        KEYS.iter()
                            .map(|(k, _)| {
                                CreatableTopicConfigs::default()
                                    .with_name(str_bytes(*k))
                                    .with_value(config.get(k).map(str_bytes))
                                    .with_config_source(if overrides.contains_key(*k) {
                                        SOURCE_TOPIC
                                    } else {
                                        SOURCE_DEFAULT
                                    })
                            })
                            .collect(),
                    );
                }
            }
            Err(e) => {
                (result.error_code, result.error_message) = error_parts(&e);
                result.num_partitions = -1;
                result.replication_factor = -1;
            }
        }
        results.push(result);
    }
    CreateTopicsResponse::default().with_topics(results)
}

/// A CreateTopics entry's replica assignments, ordered by partition (None when it has none).
/// As in Kafka, they replace the partition count and replication factor, and number the
/// partitions from 0 without gaps.
fn requested_assignments(
    t: &kafka_protocol::messages::create_topics_request::CreatableTopic,
) -> Result<Option<Vec<Vec<i32>>>, (ResponseError, String)> {
    if t.assignments.is_empty() {
        return Ok(None);
    }
    if t.num_partitions != -1 || t.replication_factor != -1 {
        return Err((
            ResponseError::InvalidRequest,
            "give either replica assignments or a partition count and replication factor".into(),
        ));
    }
    let mut sorted: Vec<_> = t.assignments.iter().collect();
    sorted.sort_by_key(|a| a.partition_index);
    if sorted
        .iter()
        .enumerate()
        .any(|(i, a)| a.partition_index != i as i32)
    {
        return Err((
            ResponseError::InvalidReplicaAssignment,
            "assigned partitions must be numbered 0, 1, 2, ... without gaps".into(),
        ));
    }
    Ok(Some(
        sorted
            .iter()
            .map(|a| a.broker_ids.iter().map(|b| b.0).collect())
            .collect(),
    ))
}

pub async fn delete_topics(
    broker: &Broker,
    ctx: &RequestContext,
    req: DeleteTopicsRequest,
) -> DeleteTopicsResponse {
    let targets: Vec<(Option<String>, uuid::Uuid)> = if ctx.version >= 6 {
        req.topics
            .into_iter()
            .map(|t| (t.name.map(|n| n.0.to_string()), t.topic_id))
            .collect()
    } else {
        req.topic_names
            .into_iter()
            .map(|n| (Some(n.0.to_string()), uuid::Uuid::nil()))
            .collect()
    };
    let mut responses = Vec::with_capacity(targets.len());
    for (name, id) in targets {
        let name = name.or_else(|| broker.log.topic_by_id(id).map(|t| t.name.to_string()));
        let mut r = DeletableTopicResult::default()
            .with_name(name.clone().map(|n| TopicName(str_bytes(n))))
            .with_topic_id(id);
        match name {
            None => r.error_code = ResponseError::UnknownTopicId.code(),
            Some(name) if !broker.allowed(ctx, Operation::Delete, ResourceType::Topic, &name) => {
                r.error_code = ResponseError::TopicAuthorizationFailed.code();
                r.error_message = Some(str_bytes(format!(
                    "not authorized to delete topic '{name}'"
                )));
            }
            Some(name) if name.starts_with("__") && broker.topic_id(&name).is_some() => {
                r.error_code = ResponseError::InvalidRequest.code();
                r.error_message = Some(str_bytes(format!(
                    "'{name}' is an internal topic and cannot be deleted"
                )));
            }
            Some(name) => match broker.delete_topic(&name).await {
                Ok(id) => r.topic_id = id,
                Err(e) => (r.error_code, r.error_message) = error_parts(&e),
            },
        }
        responses.push(r);
    }
    DeleteTopicsResponse::default().with_responses(responses)
}

pub async fn create_partitions(
    broker: &Broker,
    ctx: &RequestContext,
    req: CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let mut results = Vec::with_capacity(req.topics.len());
    for t in req.topics {
        let mut r = CreatePartitionsTopicResult::default().with_name(t.name.clone());
        let assignments = t.assignments.as_ref().map(|a| {
            a.iter()
                .map(|p| p.broker_ids.iter().map(|b| b.0).collect::<Vec<i32>>())
                .collect::<Vec<_>>()
        });
        if !broker.allowed(ctx, Operation::Alter, ResourceType::Topic, &t.name.0) {
            r.error_code = ResponseError::TopicAuthorizationFailed.code();
            r.error_message = Some(str_bytes(format!(
                "not authorized to alter topic '{}'",
                &*t.name.0
            )));
        } else if let Err(e) = broker
            .create_partitions(&t.name.0, t.count, assignments, req.validate_only)
            .await
        {
            (r.error_code, r.error_message) = error_parts(&e);
        }
        results.push(r);
    }
    CreatePartitionsResponse::default().with_results(results)
}

/// Broker-level settings under Kafka's broker config names.
fn broker_configs(broker: &Broker) -> Vec<(&'static str, String)> {
    let d: &LogConfig = broker.log.defaults();
    vec![
        (
            "auto.create.topics.enable",
            broker.auto_create_topics.to_string(),
        ),
        ("broker.id", broker.node_id.to_string()),
        (
            "log.cleanup.policy",
            d.get("cleanup.policy").unwrap_or_default(),
        ),
        ("log.flush.interval.messages", d.flush_messages.to_string()),
        ("log.flush.interval.ms", d.flush_ms.to_string()),
        ("log.retention.bytes", d.retention_bytes.to_string()),
        ("log.retention.ms", d.retention_ms.to_string()),
        ("log.roll.ms", d.segment_ms.to_string()),
        ("log.segment.bytes", d.segment_bytes.to_string()),
        ("message.max.bytes", d.max_message_bytes.to_string()),
        ("num.partitions", broker.default_partitions.to_string()),
    ]
}

pub fn describe_configs(
    broker: &Broker,
    ctx: &RequestContext,
    req: DescribeConfigsRequest,
) -> DescribeConfigsResponse {
    let results = req
        .resources
        .into_iter()
        .map(|res| {
            let mut out = DescribeConfigsResult::default()
                .with_resource_type(res.resource_type)
                .with_resource_name(res.resource_name.clone());
            let wanted = |k: &str| {
                res.configuration_keys
                    .as_ref()
                    .is_none_or(|keys| keys.iter().any(|w| &**w == k))
            };
            let entry = |k: &str, v: String, source: i8, ty: i8, doc: Option<&str>| {
                DescribeConfigsResourceResult::default()
                    .with_name(str_bytes(k))
                    .with_value(Some(str_bytes(v)))
                    .with_config_source(source)
                    .with_config_type(ty)
                    .with_documentation(if req.include_documentation {
                        doc.map(str_bytes)
                    } else {
                        None
                    })
            };
            if let Some(code) = config_refusal(
                broker,
                ctx,
                Operation::DescribeConfigs,
                res.resource_type,
                &res.resource_name,
            ) {
                out.error_code = code.code();
                out.error_message = Some(str_bytes(format!(
                    "not authorized to describe the configs of '{}'",
                    &*res.resource_name
                )));
                return out;
            }
            match res.resource_type {
                RESOURCE_TOPIC => match broker.log.topic(&res.resource_name) {
                    Some(t) => {
                        out.configs = KEYS
                            .iter()
                            .filter(|(k, _)| wanted(k))
                            .map(|(k, doc)| {
                                let source = if t.overrides.contains_key(*k) {
                                    SOURCE_TOPIC
                                } else {
                                    SOURCE_DEFAULT
                                };
                                entry(
                                    k,
                                    t.config.get(k).unwrap_or_default(),
                                    source,
                                    config_type(k),
                                    Some(doc),
                                )
                            })
                            .collect();
                    }
                    None => {
                        out.error_code = ResponseError::UnknownTopicOrPartition.code();
                        out.error_message = Some(str_bytes(format!(
                            "unknown topic '{}'",
                            &*res.resource_name
                        )));
                    }
                },
                RESOURCE_BROKER
                    if res.resource_name.is_empty()
                        || *res.resource_name == *broker.node_id.to_string() =>
                {
                    out.configs = broker_configs(broker)
                        .into_iter()
                        .filter(|(k, _)| wanted(k))
                        .map(|(k, v)| {
                            let ty = if k == "auto.create.topics.enable" {
                                1
                            } else if k == "log.cleanup.policy" {
                                TYPE_LIST
                            } else {
                                TYPE_STRING
                            };
                            entry(k, v, SOURCE_STATIC_BROKER, ty, None).with_read_only(true)
                        })
                        .collect();
                }
                _ => {
                    out.error_code = ResponseError::InvalidRequest.code();
                    out.error_message = Some(str_bytes(format!(
                        "resource type {} '{}' is not supported",
                        res.resource_type, &*res.resource_name
                    )));
                }
            }
            out
        })
        .collect();
    DescribeConfigsResponse::default().with_results(results)
}

/// The authorization error for an operation on a config resource (a topic, or this broker as
/// part of the cluster), if the principal may not do it.
fn config_refusal(
    broker: &Broker,
    ctx: &RequestContext,
    operation: Operation,
    resource_type: i8,
    name: &str,
) -> Option<ResponseError> {
    match resource_type {
        RESOURCE_TOPIC => broker.refusal(ctx, operation, ResourceType::Topic, name),
        _ => broker.refusal(ctx, operation, ResourceType::Cluster, CLUSTER_NAME),
    }
}

/// Applies new overrides to a topic resource; returns (error code, message).
async fn alter_topic(
    broker: &Broker,
    ctx: &RequestContext,
    resource_type: i8,
    name: &str,
    edit: impl FnOnce(&mut BTreeMap<String, String>) -> Result<(), String>,
    validate_only: bool,
) -> (i16, Option<StrBytes>) {
    if let Some(code) = config_refusal(broker, ctx, Operation::AlterConfigs, resource_type, name) {
        return (
            code.code(),
            Some(str_bytes(format!(
                "not authorized to alter the configs of '{name}'"
            ))),
        );
    }
    if resource_type != RESOURCE_TOPIC {
        return (
            ResponseError::InvalidRequest.code(),
            Some(str_bytes(
                "only topic configs can be altered; broker settings come from weir.yaml",
            )),
        );
    }
    let Some(mut overrides) = broker.topic_overrides(name) else {
        return (
            ResponseError::UnknownTopicOrPartition.code(),
            Some(str_bytes(format!("unknown topic '{name}'"))),
        );
    };
    if let Err(msg) = edit(&mut overrides) {
        return (ResponseError::InvalidConfig.code(), Some(str_bytes(msg)));
    }
    match broker
        .set_topic_configs(name, overrides, validate_only)
        .await
    {
        Ok(()) => (0, None),
        Err(e) => error_parts(&e),
    }
}

pub async fn alter_configs(
    broker: &Broker,
    ctx: &RequestContext,
    req: AlterConfigsRequest,
) -> AlterConfigsResponse {
    let mut responses = Vec::with_capacity(req.resources.len());
    for res in req.resources {
        let (code, msg) = alter_topic(
            broker,
            ctx,
            res.resource_type,
            &res.resource_name,
            |o| {
                // AlterConfigs replaces the whole set of topic overrides.
                o.clear();
                for c in &res.configs {
                    if let Some(v) = &c.value {
                        o.insert(c.name.to_string(), v.to_string());
                    }
                }
                Ok(())
            },
            req.validate_only,
        )
        .await;
        responses.push(
            alter_configs_response::AlterConfigsResourceResponse::default()
                .with_error_code(code)
                .with_error_message(msg)
                .with_resource_type(res.resource_type)
                .with_resource_name(res.resource_name),
        );
    }
    AlterConfigsResponse::default().with_responses(responses)
}

pub async fn incremental_alter_configs(
    broker: &Broker,
    ctx: &RequestContext,
    req: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    let mut responses = Vec::with_capacity(req.resources.len());
    for res in req.resources {
        let defaults = broker.log.defaults().clone();
        let (code, msg) = alter_topic(broker, ctx, res.resource_type, &res.resource_name, |o| {
                for c in &res.configs {
                    let key = c.name.to_string();
                    let value = c.value.as_ref().map(|v| v.to_string());
                    match (c.config_operation, value) {
                        (0, Some(v)) => {
                            o.insert(key, v);
                        }
                        (1, _) => {
                            o.remove(&key);
                        }
                        (op @ (2 | 3), Some(v)) => {
                            if config_type(&key) != TYPE_LIST {
                                return Err(format!("'{key}' is not a list; APPEND and SUBTRACT apply to lists only"));
                            }
                            let current = o.get(&key).cloned().or_else(|| defaults.get(&key)).unwrap_or_default();
                            let mut items: Vec<String> = current.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
                            for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                                if op == 2 && !items.iter().any(|i| i == item) {
                                    items.push(item.to_string());
                                } else if op == 3 {
                                    items.retain(|i| i != item);
                                }
                            }
                            o.insert(key, items.join(","));
                        }
                        (op, _) => return Err(format!("operation {op} on '{key}' needs a value")),
                    }
                }
                Ok(())
            }, req.validate_only).await;
        responses.push(
            incremental_alter_configs_response::AlterConfigsResourceResponse::default()
                .with_error_code(code)
                .with_error_message(msg)
                .with_resource_type(res.resource_type)
                .with_resource_name(res.resource_name),
        );
    }
    IncrementalAlterConfigsResponse::default().with_responses(responses)
}
