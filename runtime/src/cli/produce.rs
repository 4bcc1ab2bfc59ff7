//! `weir produce TOPIC`: one record per stdin line, batched per partition, acks=all.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ProduceRequest, TopicName};
use kafka_protocol::records::Compression;

use super::{now_ms, ConnectArgs};
use crate::client::check;
use crate::client::partitioner::partition_for_key;
use crate::client::router::{is_misdirected, pause_before_retry, Router};
use crate::kafka::str_bytes;
use crate::log::batch::BatchBuilder;

#[derive(clap::Args)]
pub struct ProduceArgs {
    pub topic: String,
    /// Treat each line as JSON and use this field's value as the record key.
    #[arg(long)]
    pub key_field: Option<String>,
    /// Send every record to this partition.
    #[arg(long)]
    pub partition: Option<i32>,
    /// -1/all, 0 or 1
    #[arg(long, default_value = "all")]
    pub acks: String,
    /// none, gzip, snappy, lz4 or zstd
    #[arg(long, default_value = "none")]
    pub compression: String,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

pub fn parse_compression(s: &str) -> Result<Compression> {
    Ok(match s {
        "none" => Compression::None,
        "gzip" => Compression::Gzip,
        "snappy" => Compression::Snappy,
        "lz4" => Compression::Lz4,
        "zstd" => Compression::Zstd,
        other => bail!("unknown compression '{other}' (none, gzip, snappy, lz4, zstd)"),
    })
}

pub fn parse_acks(s: &str) -> Result<i16> {
    Ok(match s {
        "all" | "-1" => -1,
        "0" => 0,
        "1" => 1,
        other => bail!("acks must be all, -1, 0 or 1, got '{other}'"),
    })
}

/// The key of an NDJSON line: the field's string value, or its JSON text for other types.
fn key_of(line: &[u8], field: &str, n: usize) -> Result<Vec<u8>> {
    let v: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| anyhow!("stdin line {n}: not JSON: {e}"))?;
    match v.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.clone().into_bytes()),
        Some(serde_json::Value::Null) | None => bail!("stdin line {n}: no field '{field}'"),
        Some(other) => Ok(other.to_string().into_bytes()),
    }
}

const MAX_BATCH_BYTES: usize = 512 * 1024;
const LINGER: Duration = Duration::from_millis(20);

pub async fn run(args: ProduceArgs) -> Result<()> {
    let acks = parse_acks(&args.acks)?;
    let codec = parse_compression(&args.compression)?;
    let mut router = Router::connect(&args.conn.brokers).await?;
    let partitions = router.partitions(&args.topic, true).await?;
    if let Some(p) = args.partition {
        if !partitions.contains(&p) {
            bail!("topic '{}' has no partition {p}", args.topic);
        }
    }
    // Lines arrive from a thread so a slow stdin still lets batches go out after LINGER.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(10_000);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().split(b'\n') {
            let line = line.map(|mut l| {
                if l.last() == Some(&b'\r') {
                    l.pop();
                }
                l
            });
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let mut builders: BTreeMap<i32, BatchBuilder> = BTreeMap::new();
    let mut pending = 0usize;
    let mut sent = 0u64;
    let mut line_no = 0usize;
    let mut round_robin = 0usize;
    loop {
        let next = tokio::time::timeout(LINGER, rx.recv()).await;
        let line = match next {
            Ok(Some(line)) => Some(line?),
            Ok(None) => None,
            Err(_) => {
                sent += flush(&mut router, &args.topic, &mut builders, acks, codec).await?;
                pending = 0;
                continue;
            }
        };
        let Some(line) = line else { break };
        line_no += 1;
        let key = match &args.key_field {
            Some(f) => Some(key_of(&line, f, line_no)?),
            None => None,
        };
        let partition = match (args.partition, &key) {
            (Some(p), _) => p,
            (None, Some(k)) => partitions[partition_for_key(k, partitions.len() as i32) as usize],
            (None, None) => {
                round_robin = round_robin.wrapping_add(1);
                partitions[(round_robin / 1000) % partitions.len()]
            }
        };
        let now = now_ms();
        builders
            .entry(partition)
            .or_insert_with(|| BatchBuilder::new(now))
            .push(key.as_deref(), Some(&line), &[], now);
        pending += line.len() + 16;
        if pending >= MAX_BATCH_BYTES {
            sent += flush(&mut router, &args.topic, &mut builders, acks, codec).await?;
            pending = 0;
        }
    }
    sent += flush(&mut router, &args.topic, &mut builders, acks, codec).await?;
    eprintln!("produced {sent} record(s) to {}", args.topic);
    Ok(())
}

/// Sends each partition's batch to its leader; a batch a node refused as not its leader (so
/// did not append) goes again to the leader looked up anew.
async fn flush(
    router: &mut Router,
    topic: &str,
    builders: &mut BTreeMap<i32, BatchBuilder>,
    acks: i16,
    codec: Compression,
) -> Result<u64> {
    let mut pending: BTreeMap<i32, (bytes::Bytes, u64)> = std::mem::take(builders)
        .into_iter()
        .map(|(p, b)| {
            let n = b.count() as u64;
            (p, (b.finish(codec).into(), n))
        })
        .collect();
    let mut count = 0u64;
    let mut attempt = 0;
    while !pending.is_empty() {
        attempt += 1;
        let partitions: Vec<i32> = pending.keys().copied().collect();
        for (leader, ps) in router.by_leader(topic, &partitions) {
            if leader < 0 {
                continue;
            }
            let req = ProduceRequest::default()
                .with_acks(acks)
                .with_timeout_ms(30_000)
                .with_topic_data(vec![TopicProduceData::default()
                    .with_name(TopicName(str_bytes(topic)))
                    .with_partition_data(
                        ps.iter()
                            .map(|p| {
                                PartitionProduceData::default()
                                    .with_index(*p)
                                    .with_records(Some(pending[p].0.clone()))
                            })
                            .collect(),
                    )]);
            // A node that cannot be reached was sent nothing: look up the leader again.
            let Ok(conn) = router.node(leader).await else {
                router.forget(leader);
                continue;
            };
            if acks == 0 {
                conn.sender.send(&req).await?;
                conn.sender.flush().await?;
                for p in &ps {
                    count += pending.remove(p).map_or(0, |(_, n)| n);
                }
                continue;
            }
            let resp = conn.call(&req).await?;
            for t in resp.responses {
                for r in t.partition_responses {
                    if r.error_code != 0 && is_misdirected(r.error_code) {
                        continue;
                    }
                    check(r.error_code, &format!("produce to {topic}/{}", r.index)).map_err(
                        |e| match &r.error_message {
                            Some(m) => anyhow!("{e}: {m}"),
                            None => e,
                        },
                    )?;
                    count += pending.remove(&r.index).map_or(0, |(_, n)| n);
                }
            }
        }
        if pending.is_empty() {
            break;
        }
        if !pause_before_retry(attempt).await {
            bail!(
                "no leader took the records of {topic} partition(s) {:?}",
                pending.keys().collect::<Vec<_>>()
            );
        }
        router.partitions(topic, false).await?;
    }
    Ok(count)
}
