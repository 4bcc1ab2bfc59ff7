//! JSON views of a node's topics, consumer groups and transactions, for the HTTP API
//! (`GET /topics`, `/groups`, `/transactions`) and scripts.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::kafka::Broker;
use crate::log::manager::Topic;
use crate::pipeline::io::LocalReader;

fn topic_json(broker: &Broker, t: &Topic, with_configs: bool) -> Value {
    let partitions: Vec<Value> = t
        .partitions
        .iter()
        .map(|p| {
            let mut v = json!({
                "partition": p.id,
                "log_start_offset": p.log_start_offset(),
                "log_end_offset": p.log_end_offset(),
                "high_watermark": p.high_watermark(),
                "last_stable_offset": p.last_stable_offset(),
                "size_bytes": p.size_bytes(),
                "segments": p.segment_count(),
            });
            if let Some(c) = &broker.cluster {
                let image = c.image();
                if let Some(ip) = image
                    .topics
                    .get(&*t.name)
                    .and_then(|it| it.partitions.get(p.id as usize))
                {
                    v["leader"] = json!(ip.leader);
                    v["leader_epoch"] = json!(ip.leader_epoch);
                    v["replicas"] = json!(ip.replicas);
                    v["isr"] = json!(ip.isr);
                }
            }
            v
        })
        .collect();
    let mut v = json!({
        "name": &*t.name,
        "id": t.id,
        "internal": t.name.starts_with("__"),
        "partitions": partitions,
        "size_bytes": t.partitions.iter().map(|p| p.size_bytes()).sum::<u64>(),
    });
    if with_configs {
        v["configs"] = json!(t.overrides);
    }
    v
}

/// Every topic this node holds, with its partitions' offsets and sizes.
pub fn topics(broker: &Broker) -> Value {
    let topics = broker.log.topics(); // sorted by name
    json!({ "topics": topics.iter().map(|t| topic_json(broker, t, false)).collect::<Vec<_>>() })
}

/// Up to `limit` committed records of one partition from `offset` (default: the last `limit`
/// before the high watermark), for the console's record browser; None if there is no such
/// partition here. Values, keys and headers are text when they are UTF-8, else base64.
pub fn records(
    broker: &Broker,
    topic: &str,
    partition: i32,
    offset: Option<i64>,
    limit: usize,
) -> Option<Value> {
    let t = broker.log.topic(topic)?;
    let p = t.partitions.get(usize::try_from(partition).ok()?)?;
    let hw = p.high_watermark();
    let start = offset
        .unwrap_or(hw - limit as i64)
        .clamp(p.log_start_offset(), hw);
    let mut reader = LocalReader::new(&t, &BTreeMap::from([(partition, start)]));
    let mut out = Vec::new();
    let mut next = start;
    while out.len() < limit && next < hw {
        let batch = match reader.read_now(256 << 10) {
            Ok(b) if !b.is_empty() => b,
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(topic, partition, error = %e, "cannot read records for the console");
                break;
            }
        };
        for r in batch
            .into_iter()
            .filter(|r| r.offset < hw)
            .take(limit - out.len())
        {
            next = r.offset + 1;
            out.push(json!({
                "offset": r.offset,
                "timestamp": r.record.timestamp,
                "key": r.record.key.as_deref().map(text),
                "value": r.record.value.as_deref().map(text),
                "headers": r.record.headers.iter().map(|(k, v)| json!([k, v.as_deref().map(text)])).collect::<Vec<_>>(),
            }));
        }
        next = next.max(reader.positions()[&partition].min(hw));
    }
    Some(json!({
        "topic": topic,
        "partition": partition,
        "high_watermark": hw,
        "records": out,
        "next_offset": next,
    }))
}

/// Bytes as text when they are UTF-8, else as `{"base64": ...}`.
fn text(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => json!(s),
        Err(_) => {
            use base64::Engine;
            json!({ "base64": base64::engine::general_purpose::STANDARD.encode(b) })
        }
    }
}

/// One topic, with the configs set on it; None if this node does not hold it.
pub fn topic(broker: &Broker, name: &str) -> Option<Value> {
    broker.log.topic(name).map(|t| topic_json(broker, &t, true))
}

fn group_json(broker: &Broker, id: &str, protocol_type: &str, state: &str) -> Value {
    let members = broker
        .groups
        .with_group(id, |g| {
            g.member_views()
                .into_iter()
                .map(|m| {
                    json!({
                        "member_id": m.member_id,
                        "group_instance_id": m.group_instance_id,
                        "client_id": m.client_id,
                        "client_host": m.client_host,
                    })
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let lag = broker.group_lag(id);
    let kind = broker
        .groups
        .with_group(id, |g| g.group_type())
        .unwrap_or("classic");
    json!({
        "group": id,
        "group_protocol": kind,
        "protocol_type": protocol_type,
        "state": state,
        "members": members,
        "lag": lag.iter().map(|l| l.lag).sum::<i64>(),
        "offsets": lag,
    })
}

/// The consumer groups this node coordinates: state, members, committed offsets and lag.
pub fn groups(broker: &Broker) -> Value {
    if !broker.groups.is_active() {
        return json!({ "coordinator": false, "groups": [] });
    }
    let groups: Vec<Value> = broker
        .groups
        .list()
        .into_iter()
        .map(|(id, protocol_type, state)| group_json(broker, &id, &protocol_type, state.name()))
        .collect();
    json!({ "coordinator": true, "groups": groups })
}

/// One group this node coordinates; None if it does not know it.
pub fn group(broker: &Broker, id: &str) -> Option<Value> {
    broker
        .groups
        .list()
        .into_iter()
        .find(|(g, _, _)| g == id)
        .map(|(id, protocol_type, state)| group_json(broker, &id, &protocol_type, state.name()))
}

/// The transactional ids this node coordinates and their state.
pub async fn transactions(broker: &Broker) -> Value {
    if !broker.txns.is_active() {
        return json!({ "coordinator": false, "transactions": [] });
    }
    let txns: Vec<Value> = broker
        .txns
        .list()
        .await
        .into_iter()
        .map(|(id, m)| {
            json!({
                "transactional_id": id,
                "producer_id": m.producer_id,
                "producer_epoch": m.producer_epoch,
                "state": m.state.name(),
                "timeout_ms": m.timeout_ms,
                "partitions": m.partitions.iter().map(|(t, p)| json!({"topic": t, "partition": p})).collect::<Vec<_>>(),
                "groups": m.groups,
                "start_ms": m.start_ms,
                "last_update_ms": m.last_update_ms,
            })
        })
        .collect();
    json!({ "coordinator": true, "transactions": txns })
}
