//! `weir topic create|list|describe|delete`.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use clap::Subcommand;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    CreateTopicsRequest, DeleteTopicsRequest, DescribeConfigsRequest, MetadataRequest, TopicName,
};

use super::ConnectArgs;
use crate::client::{check, Connection};
use crate::kafka::str_bytes;

#[derive(Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        #[arg(long, short = 'p', default_value_t = 1)]
        partitions: i32,
        /// Replicas of each partition [default: the cluster's default, at most 3]
        #[arg(long, short = 'r', default_value_t = -1)]
        replication_factor: i16,
        /// Topic config, repeatable: --config retention.ms=3600000
        #[arg(long = "config", short = 'c', value_parser = parse_kv)]
        configs: Vec<(String, String)>,
    },
    /// List topic names.
    List,
    /// Show partitions, offsets and configs of a topic.
    Describe { name: String },
    /// Delete a topic and its data.
    Delete { name: String },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("expected key=value, got '{s}'"))
}

pub async fn run(cmd: TopicCommand, conn: &ConnectArgs) -> Result<()> {
    let mut c = Connection::connect(&conn.brokers).await?;
    match cmd {
        TopicCommand::Create {
            name,
            partitions,
            replication_factor,
            configs,
        } => {
            let topic = CreatableTopic::default()
                .with_name(TopicName(str_bytes(name.clone())))
                .with_num_partitions(partitions)
                .with_replication_factor(replication_factor)
                .with_configs(
                    configs
                        .into_iter()
                        .map(|(k, v)| {
                            CreatableTopicConfig::default()
                                .with_name(str_bytes(k))
                                .with_value(Some(str_bytes(v)))
                        })
                        .collect(),
                );
            let resp = c
                .call(
                    &CreateTopicsRequest::default()
                        .with_topics(vec![topic])
                        .with_timeout_ms(30_000),
                )
                .await?;
            let r = resp
                .topics
                .first()
                .ok_or_else(|| anyhow!("empty CreateTopics response"))?;
            check(r.error_code, &format!("cannot create topic '{name}'")).map_err(|e| match &r
                .error_message
            {
                Some(m) => anyhow!("{e}: {m}"),
                None => e,
            })?;
            println!(
                "created topic {name} with {partitions} partition(s), {} replica(s) each",
                r.replication_factor
            );
        }
        TopicCommand::List => {
            let resp = c
                .call(&MetadataRequest::default().with_topics(None))
                .await?;
            let mut names: Vec<String> = resp
                .topics
                .iter()
                .filter_map(|t| t.name.as_ref().map(|n| n.0.to_string()))
                .collect();
            names.sort();
            for n in names {
                println!("{n}");
            }
        }
        TopicCommand::Describe { name } => describe(&mut c, &name).await?,
        TopicCommand::Delete { name } => {
            let req = DeleteTopicsRequest::default()
                .with_topic_names(vec![TopicName(str_bytes(name.clone()))])
                .with_topics(vec![
                    DeleteTopicState::default().with_name(Some(TopicName(str_bytes(name.clone()))))
                ])
                .with_timeout_ms(30_000);
            let resp = c.call(&req).await?;
            let r = resp
                .responses
                .first()
                .ok_or_else(|| anyhow!("empty DeleteTopics response"))?;
            check(r.error_code, &format!("cannot delete topic '{name}'"))?;
            println!("deleted topic {name}");
        }
    }
    Ok(())
}

async fn describe(c: &mut Connection, name: &str) -> Result<()> {
    let resp = c
        .call(
            &MetadataRequest::default()
                .with_topics(Some(vec![
                    MetadataRequestTopic::default().with_name(Some(TopicName(str_bytes(name))))
                ]))
                .with_allow_auto_topic_creation(false),
        )
        .await?;
    let t = resp
        .topics
        .first()
        .ok_or_else(|| anyhow!("no metadata for topic '{name}'"))?;
    check(t.error_code, &format!("topic '{name}'"))?;
    let brokers: BTreeMap<i32, String> = resp
        .brokers
        .iter()
        .map(|b| (b.node_id.0, format!("{}:{}", &*b.host, b.port)))
        .collect();
    let mut parts: Vec<_> = t.partitions.iter().collect();
    parts.sort_by_key(|p| p.partition_index);
    // Offsets come from each partition's leader.
    let mut by_leader: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for p in &parts {
        by_leader
            .entry(p.leader_id.0)
            .or_default()
            .push(p.partition_index);
    }
    let (mut start, mut end) = (BTreeMap::new(), BTreeMap::new());
    for (leader, ps) in &by_leader {
        let Some(addr) = brokers.get(leader) else {
            continue;
        };
        let mut lc = Connection::connect(addr).await?;
        start.extend(super::consume::list_offsets(&mut lc, name, ps, -2).await?);
        end.extend(super::consume::list_offsets(&mut lc, name, ps, -1).await?);
    }
    let total: i64 = end.iter().map(|(p, e)| e - start.get(p).unwrap_or(e)).sum();
    println!(
        "Topic: {name}\tpartitions: {}\treplication factor: {}\trecords: {total}",
        parts.len(),
        parts.first().map_or(0, |p| p.replica_nodes.len())
    );
    let ids = |v: &[kafka_protocol::messages::BrokerId]| {
        v.iter()
            .map(|b| b.0.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let offset = |m: &BTreeMap<i32, i64>, p: i32| m.get(&p).map_or("-".to_string(), i64::to_string);
    for p in parts {
        let i = p.partition_index;
        println!(
            "  partition {i}\tleader: {}\tepoch: {}\treplicas: {}\tisr: {}\tlog-start: {}\tlog-end: {}",
            p.leader_id.0,
            p.leader_epoch,
            ids(&p.replica_nodes),
            ids(&p.isr_nodes),
            offset(&start, i),
            offset(&end, i)
        );
    }
    let resp = c
        .call(&DescribeConfigsRequest::default().with_resources(
            vec![DescribeConfigsResource::default()
            .with_resource_type(2)
            .with_resource_name(str_bytes(name))
            .with_configuration_keys(None)],
        ))
        .await?;
    println!("Configs:");
    for r in resp.results {
        check(r.error_code, &format!("configs of {name}"))?;
        for cfg in r.configs {
            let source = if cfg.config_source == 1 {
                "set on topic"
            } else {
                "default"
            };
            println!(
                "  {} = {}\t({source})",
                &*cfg.name,
                cfg.value.as_deref().unwrap_or("null")
            );
        }
    }
    Ok(())
}
