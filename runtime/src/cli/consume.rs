//! `weir consume TOPIC`: print records, one value per line (or one JSON object per line).

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{bail, Result};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::{BrokerId, FetchRequest, ListOffsetsRequest, TopicName};
use serde_json::json;

use super::ConnectArgs;
use crate::client::router::{is_misdirected, pause_before_retry, Router};
use crate::client::{check, Connection};
use crate::kafka::str_bytes;
use crate::log::batch::complete_batches;

#[derive(clap::Args)]
pub struct ConsumeArgs {
    pub topic: String,
    /// Start at the earliest offset instead of the end.
    #[arg(long)]
    pub from_beginning: bool,
    /// Read only this partition.
    #[arg(long)]
    pub partition: Option<i32>,
    /// Start at this offset (in every partition read).
    #[arg(long)]
    pub offset: Option<i64>,
    /// Stop once every partition has been read to its end.
    #[arg(long, short = 'e')]
    pub exit_at_end: bool,
    /// Stop after this many records.
    #[arg(long, short = 'n')]
    pub count: Option<u64>,
    /// value: the raw value per line; json: partition, offset, timestamp, key, value, headers
    #[arg(long, default_value = "value", value_parser = ["value", "json"])]
    pub format: String,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

/// Offsets of `partitions` at `timestamp` (-2 earliest, -1 latest).
pub async fn list_offsets(
    conn: &mut Connection,
    topic: &str,
    partitions: &[i32],
    timestamp: i64,
) -> Result<BTreeMap<i32, i64>> {
    let req = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(vec![ListOffsetsTopic::default()
            .with_name(TopicName(str_bytes(topic)))
            .with_partitions(
                partitions
                    .iter()
                    .map(|&p| {
                        ListOffsetsPartition::default()
                            .with_partition_index(p)
                            .with_timestamp(timestamp)
                    })
                    .collect(),
            )]);
    let resp = conn.call(&req).await?;
    let mut out = BTreeMap::new();
    for t in resp.topics {
        for p in t.partitions {
            check(
                p.error_code,
                &format!("offsets of {topic}/{}", p.partition_index),
            )?;
            out.insert(p.partition_index, p.offset);
        }
    }
    Ok(out)
}

/// As [`list_offsets`], asking each partition's leader.
pub async fn list_offsets_routed(
    router: &mut Router,
    topic: &str,
    partitions: &[i32],
    timestamp: i64,
) -> Result<BTreeMap<i32, i64>> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut out = BTreeMap::new();
        let mut failed = None;
        for (leader, ps) in router.by_leader(topic, partitions) {
            let result = match router.node(leader).await {
                Ok(conn) => list_offsets(conn, topic, &ps, timestamp).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(o) => out.extend(o),
                Err(e) => {
                    router.forget(leader);
                    failed = Some(e);
                }
            }
        }
        match failed {
            None => return Ok(out),
            Some(e) if !pause_before_retry(attempt).await => return Err(e),
            Some(_) => {
                router.partitions(topic, false).await?;
            }
        }
    }
}

pub fn fetch_request(
    topic: &str,
    positions: &BTreeMap<i32, i64>,
    max_wait_ms: i32,
    partition_max_bytes: i32,
) -> FetchRequest {
    FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(max_wait_ms)
        .with_min_bytes(1)
        .with_max_bytes(64 << 20)
        .with_session_id(0)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default()
            .with_topic(TopicName(str_bytes(topic)))
            .with_partitions(
                positions
                    .iter()
                    .map(|(&p, &o)| {
                        FetchPartition::default()
                            .with_partition(p)
                            .with_fetch_offset(o)
                            .with_partition_max_bytes(partition_max_bytes)
                            .with_current_leader_epoch(-1)
                            .with_log_start_offset(-1)
                    })
                    .collect(),
            )])
}

pub async fn run(args: ConsumeArgs) -> Result<()> {
    let mut router = Router::connect(&args.conn.brokers).await?;
    let all = router.partitions(&args.topic, false).await?;
    let partitions = match args.partition {
        Some(p) if all.contains(&p) => vec![p],
        Some(p) => bail!("topic '{}' has no partition {p}", args.topic),
        None => all,
    };
    let mut positions = match args.offset {
        Some(o) => partitions.iter().map(|&p| (p, o)).collect(),
        None => {
            list_offsets_routed(
                &mut router,
                &args.topic,
                &partitions,
                if args.from_beginning { -2 } else { -1 },
            )
            .await?
        }
    };
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let json_format = args.format == "json";
    loop {
        if args.count.is_some_and(|n| printed >= n) {
            break;
        }
        if args.exit_at_end
            && ends.len() == positions.len()
            && positions
                .iter()
                .all(|(p, o)| ends.get(p).is_some_and(|e| o >= e))
        {
            break;
        }
        // One long poll per leader, sharing half a second between them.
        let by_leader = router.by_leader(&args.topic, &partitions);
        let wait = (500 / by_leader.len().max(1)) as i32;
        let mut stale = false;
        for (leader, ps) in by_leader {
            if leader < 0 {
                stale = true;
                continue;
            }
            let wanted: BTreeMap<i32, i64> = ps.iter().map(|p| (*p, positions[p])).collect();
            let req = fetch_request(&args.topic, &wanted, wait, 1 << 20);
            let resp = match router.node(leader).await {
                Ok(conn) => conn.call(&req).await,
                Err(e) => Err(e),
            };
            let resp = match resp {
                Ok(r) => r,
                // The leader went away: find the new one.
                Err(_) => {
                    router.forget(leader);
                    stale = true;
                    continue;
                }
            };
            check(resp.error_code, "fetch")?;
            for t in resp.responses {
                for pd in t.partitions {
                    let p = pd.partition_index;
                    if pd.error_code == 1 {
                        // Offset out of range: restart from the earliest offset still kept.
                        let start = list_offsets_routed(&mut router, &args.topic, &[p], -2).await?;
                        eprintln!(
                            "partition {p}: offset {} is out of range; resuming at {}",
                            positions[&p], start[&p]
                        );
                        positions.extend(start);
                        continue;
                    }
                    if is_misdirected(pd.error_code) {
                        stale = true;
                        continue;
                    }
                    check(pd.error_code, &format!("fetch {}/{p}", args.topic))?;
                    ends.insert(p, pd.high_watermark);
                    let Some(records) = pd.records else { continue };
                    for batch in complete_batches(&records) {
                        let pos = positions[&p];
                        let next = batch.next_offset();
                        if !batch.is_control() {
                            let base = batch.base_offset();
                            let base_ts = batch.base_timestamp();
                            let mut err = Ok(());
                            batch.for_each_record(|r| {
                                let offset = base + r.offset_delta as i64;
                                if offset < pos
                                    || args.count.is_some_and(|n| printed >= n)
                                    || err.is_err()
                                {
                                    return;
                                }
                                printed += 1;
                                err = if json_format {
                                    let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                                    let headers: serde_json::Map<String, serde_json::Value> = r
                                        .headers()
                                        .into_iter()
                                        .map(|(k, v)| (lossy(k), v.map(lossy).into()))
                                        .collect();
                                    let line = json!({
                                        "partition": p,
                                        "offset": offset,
                                        "timestamp": base_ts + r.timestamp_delta,
                                        "key": r.key.map(lossy),
                                        "value": r.value.map(lossy),
                                        "headers": headers,
                                    });
                                    writeln!(out, "{line}")
                                } else {
                                    out.write_all(r.value.unwrap_or_default())
                                        .and_then(|_| out.write_all(b"\n"))
                                };
                            })?;
                            err?;
                        }
                        positions.insert(p, next.max(pos));
                    }
                }
            }
        }
        out.flush()?;
        if stale {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            // A cluster between leaders may not answer for a moment: keep trying.
            if let Err(e) = router.partitions(&args.topic, false).await {
                eprintln!("looking up the leaders of {}: {e:#}", args.topic);
            }
        }
    }
    out.flush()?;
    Ok(())
}
