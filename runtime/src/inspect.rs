//! JSON views of a node's topics, consumer groups and transactions, for the HTTP API
//! (`GET /topics`, `/groups`, `/transactions`) and scripts.

use serde_json::{json, Value};

use crate::kafka::Broker;
use crate::log::manager::Topic;

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

/// One topic, with the configs set on it; None if this node does not hold it.
pub fn topic(broker: &Broker, name: &str) -> Option<Value> {
    broker.log.topic(name).map(|t| topic_json(broker, &t, true))
}

fn group_json(broker: &Broker, id: &str, protocol_type: &str, state: &str) -> Value {
    let members = broker
        .groups
        .with_group(id, |g| {
            g.members
                .values()
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
    json!({
        "group": id,
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
