//! `weir group list|describe|reset-offsets|delete`.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use bytes::Buf;
use clap::Subcommand;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestGroup;
use kafka_protocol::messages::{
    ConsumerProtocolAssignment, DeleteGroupsRequest, DescribeGroupsRequest, GroupId,
    ListGroupsRequest, OffsetCommitRequest, OffsetFetchRequest, TopicName,
};
use kafka_protocol::protocol::Decodable;
use serde_json::json;

use super::consume::list_offsets_routed;
use super::ConnectArgs;
use crate::client::router::{Router, GROUP};
use crate::client::{check, Connection};
use crate::kafka::str_bytes;

#[derive(Subcommand)]
pub enum GroupCommand {
    /// List consumer groups and their states.
    List,
    /// Members, assignments, committed offsets and lag of a group.
    Describe {
        group: String,
        /// text or json
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
    },
    /// Move an empty group's committed offsets for a topic.
    ResetOffsets {
        group: String,
        #[arg(long)]
        topic: String,
        #[arg(long, group = "target")]
        to_earliest: bool,
        #[arg(long, group = "target")]
        to_latest: bool,
        #[arg(long, group = "target")]
        to_offset: Option<i64>,
        /// RFC 3339 time (2024-01-31T12:00:00Z): the first offset at or after it.
        #[arg(long, group = "target")]
        to_datetime: Option<String>,
    },
    /// Delete an empty group and its committed offsets.
    Delete { group: String },
}

/// (member id, client id, host, assigned topic partitions)
type MemberInfo = (String, String, String, Vec<(String, i32)>);

struct Described {
    state: String,
    protocol: String,
    members: Vec<MemberInfo>,
}

async fn describe_group(c: &mut Connection, group: &str) -> Result<Described> {
    let resp = c
        .call(&DescribeGroupsRequest::default().with_groups(vec![GroupId(str_bytes(group))]))
        .await?;
    let g = resp
        .groups
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("empty DescribeGroups response"))?;
    check(g.error_code, &format!("describe group '{group}'"))?;
    let members = g
        .members
        .into_iter()
        .map(|m| {
            let mut buf = m.member_assignment.clone();
            let assignment = if buf.remaining() >= 2 {
                let version = buf.get_i16();
                ConsumerProtocolAssignment::decode(&mut buf, version)
                    .map(|a| {
                        a.assigned_partitions
                            .into_iter()
                            .flat_map(|t| {
                                let name = t.topic.0.to_string();
                                t.partitions.into_iter().map(move |p| (name.clone(), p))
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            } else {
                vec![]
            };
            (
                m.member_id.to_string(),
                m.client_id.to_string(),
                m.client_host.to_string(),
                assignment,
            )
        })
        .collect();
    Ok(Described {
        state: g.group_state.to_string(),
        protocol: g.protocol_data.to_string(),
        members,
    })
}

pub async fn run(cmd: GroupCommand, conn: &ConnectArgs) -> Result<()> {
    let mut r = Router::connect(&conn.brokers).await?;
    match cmd {
        GroupCommand::List => {
            // Each node lists the groups it coordinates.
            let mut groups: Vec<(String, String)> = vec![];
            for node in r.node_ids().await? {
                let resp = r
                    .node(node)
                    .await?
                    .call(&ListGroupsRequest::default())
                    .await?;
                check(resp.error_code, "list groups")?;
                groups.extend(
                    resp.groups
                        .into_iter()
                        .map(|g| (g.group_id.0.to_string(), g.group_state.to_string())),
                );
            }
            groups.sort();
            groups.dedup();
            for (g, state) in groups {
                println!("{g}\t{state}");
            }
        }
        GroupCommand::Describe { group, format } => {
            describe(&mut r, &group, format == "json").await?
        }
        GroupCommand::ResetOffsets {
            group,
            topic,
            to_earliest,
            to_latest,
            to_offset,
            to_datetime,
        } => {
            let to = if to_earliest {
                ResetTo::Earliest
            } else if to_latest {
                ResetTo::Latest
            } else if let Some(o) = to_offset {
                ResetTo::Offset(o)
            } else if let Some(t) = to_datetime {
                ResetTo::parse_datetime(&t)?
            } else {
                bail!(
                    "say where to: --to-earliest, --to-latest, --to-offset N or --to-datetime TIME"
                );
            };
            for (p, o) in reset_offsets(&mut r, &group, &topic, to).await? {
                println!("{group}\t{topic}\t{p}\t{o}");
            }
        }
        GroupCommand::Delete { group } => {
            let coordinator = r.coordinator(GROUP, &group).await?;
            let resp = r
                .node(coordinator)
                .await?
                .call(
                    &DeleteGroupsRequest::default()
                        .with_groups_names(vec![GroupId(str_bytes(group.clone()))]),
                )
                .await?;
            for r in resp.results {
                check(r.error_code, &format!("delete group '{group}'"))?;
            }
            println!("deleted group {group}");
        }
    }
    Ok(())
}

/// Where `reset_offsets` moves a group's offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    Earliest,
    Latest,
    /// Clamped to each partition's [earliest, latest].
    Offset(i64),
    /// The first offset at or after this time (ms since the epoch); the end when none is.
    Time(i64),
}

impl ResetTo {
    /// An RFC 3339 time (2024-01-31T12:00:00Z).
    pub fn parse_datetime(t: &str) -> Result<ResetTo> {
        let ts = humantime::parse_rfc3339_weak(t)
            .map_err(|e| anyhow!("datetime '{t}': {e}"))?
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Ok(ResetTo::Time(ts))
    }
}

/// Moves an empty group's committed offsets for every partition of a topic, through the
/// group's coordinator (as Kafka's tools do); returns the new offsets.
pub async fn reset_offsets(
    r: &mut Router,
    group: &str,
    topic: &str,
    to: ResetTo,
) -> Result<BTreeMap<i32, i64>> {
    let coordinator = r.coordinator(GROUP, group).await?;
    let d = describe_group(r.node(coordinator).await?, group).await?;
    if d.state != "Empty" && d.state != "Dead" {
        bail!(
            "group '{group}' is not empty (state {}, {} member(s)); stop its consumers first",
            d.state,
            d.members.len()
        );
    }
    let partitions = r.partitions(topic, false).await?;
    let earliest = list_offsets_routed(r, topic, &partitions, -2).await?;
    let latest = list_offsets_routed(r, topic, &partitions, -1).await?;
    let targets: BTreeMap<i32, i64> = match to {
        ResetTo::Earliest => earliest,
        ResetTo::Latest => latest,
        ResetTo::Offset(o) => partitions
            .iter()
            .map(|p| (*p, o.clamp(earliest[p], latest[p])))
            .collect(),
        // No record at or after the time: the end of the partition.
        ResetTo::Time(ts) => list_offsets_routed(r, topic, &partitions, ts)
            .await?
            .into_iter()
            .map(|(p, o)| (p, if o < 0 { latest[&p] } else { o }))
            .collect(),
    };
    let req = OffsetCommitRequest::default()
        .with_group_id(GroupId(str_bytes(group)))
        .with_generation_id_or_member_epoch(-1)
        .with_topics(vec![OffsetCommitRequestTopic::default()
            .with_name(TopicName(str_bytes(topic)))
            .with_partitions(
                targets
                    .iter()
                    .map(|(p, o)| {
                        OffsetCommitRequestPartition::default()
                            .with_partition_index(*p)
                            .with_committed_offset(*o)
                    })
                    .collect(),
            )]);
    let resp = r.node(coordinator).await?.call(&req).await?;
    for t in resp.topics {
        for p in t.partitions {
            check(
                p.error_code,
                &format!("commit {topic}/{}", p.partition_index),
            )?;
        }
    }
    Ok(targets)
}

async fn describe(r: &mut Router, group: &str, json_format: bool) -> Result<()> {
    let coordinator = r.coordinator(GROUP, group).await?;
    let c = r.node(coordinator).await?;
    let d = describe_group(c, group).await?;
    let mut committed: BTreeMap<(String, i32), i64> = BTreeMap::new();
    // OffsetFetch v8+ asks for a list of groups; older versions for one.
    if c.sender.versions().get::<OffsetFetchRequest>()? >= 8 {
        let req =
            OffsetFetchRequest::default().with_groups(vec![OffsetFetchRequestGroup::default()
                .with_group_id(GroupId(str_bytes(group)))
                .with_topics(None)]);
        for g in c.call(&req).await?.groups {
            check(g.error_code, "fetch offsets")?;
            for t in g.topics {
                for p in t.partitions.iter().filter(|p| p.committed_offset >= 0) {
                    committed.insert(
                        (t.name.0.to_string(), p.partition_index),
                        p.committed_offset,
                    );
                }
            }
        }
    } else {
        let req = OffsetFetchRequest::default()
            .with_group_id(GroupId(str_bytes(group)))
            .with_topics(None);
        let resp = c.call(&req).await?;
        check(resp.error_code, "fetch offsets")?;
        for t in resp.topics {
            for p in t.partitions.iter().filter(|p| p.committed_offset >= 0) {
                committed.insert(
                    (t.name.0.to_string(), p.partition_index),
                    p.committed_offset,
                );
            }
        }
    }
    for (_, _, _, assignment) in &d.members {
        for tp in assignment {
            committed.entry(tp.clone()).or_insert(-1);
        }
    }
    let mut by_topic: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for (t, p) in committed.keys() {
        by_topic.entry(t.clone()).or_default().push(*p);
    }
    let mut ends = BTreeMap::new();
    for (t, ps) in &by_topic {
        if r.partitions(t, false).await.is_err() {
            continue;
        }
        if let Ok(o) = list_offsets_routed(r, t, ps, -1).await {
            for (p, end) in o {
                ends.insert((t.clone(), p), end);
            }
        }
    }
    let rows: Vec<(String, i32, i64, i64, Option<i64>)> = committed
        .iter()
        .map(|((t, p), c)| {
            let end = ends.get(&(t.clone(), *p)).copied().unwrap_or(-1);
            let lag = (*c >= 0 && end >= 0).then(|| end - c);
            (t.clone(), *p, *c, end, lag)
        })
        .collect();
    if json_format {
        let doc = json!({
            "group": group,
            "state": d.state,
            "protocol": d.protocol,
            "members": d.members.iter().map(|(id, client, host, a)| json!({
                "member_id": id, "client_id": client, "host": host,
                "assignment": a.iter().map(|(t, p)| json!({"topic": t, "partition": p})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "offsets": rows.iter().map(|(t, p, c, e, l)| json!({
                "topic": t, "partition": p, "committed": c, "log_end": e, "lag": l,
            })).collect::<Vec<_>>(),
        });
        println!("{doc}");
        return Ok(());
    }
    println!(
        "Group: {group}\tstate: {}\tprotocol: {}\tmembers: {}",
        d.state,
        d.protocol,
        d.members.len()
    );
    for (id, client, host, a) in &d.members {
        let parts: Vec<String> = a.iter().map(|(t, p)| format!("{t}/{p}")).collect();
        println!(
            "  member {id}\tclient {client}\thost {host}\tpartitions: {}",
            parts.join(", ")
        );
    }
    println!(
        "{:<30} {:>9} {:>14} {:>14} {:>10}",
        "TOPIC", "PARTITION", "COMMITTED", "LOG-END", "LAG"
    );
    for (t, p, c, e, l) in rows {
        let c = if c < 0 {
            "-".to_string()
        } else {
            c.to_string()
        };
        let l = l.map_or("-".to_string(), |l| l.to_string());
        println!("{t:<30} {p:>9} {c:>14} {e:>14} {l:>10}");
    }
    Ok(())
}
