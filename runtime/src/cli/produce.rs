//! `weir produce TOPIC`: one record per stdin line, batched per partition, acks=all.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ProduceRequest, TopicName};
use kafka_protocol::records::Compression;

use super::{now_ms, topic_partitions, ConnectArgs};
use crate::client::partitioner::partition_for_key;
use crate::client::{check, Connection};
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
    let mut conn = Connection::connect(&args.conn.brokers).await?;
    let partitions = topic_partitions(&mut conn, &args.topic, true).await?;
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
                sent += flush(&mut conn, &args.topic, &mut builders, acks, codec).await?;
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
            sent += flush(&mut conn, &args.topic, &mut builders, acks, codec).await?;
            pending = 0;
        }
    }
    sent += flush(&mut conn, &args.topic, &mut builders, acks, codec).await?;
    eprintln!("produced {sent} record(s) to {}", args.topic);
    Ok(())
}

async fn flush(
    conn: &mut Connection,
    topic: &str,
    builders: &mut BTreeMap<i32, BatchBuilder>,
    acks: i16,
    codec: Compression,
) -> Result<u64> {
    if builders.is_empty() {
        return Ok(0);
    }
    let mut count = 0u64;
    let data: Vec<PartitionProduceData> = std::mem::take(builders)
        .into_iter()
        .map(|(p, b)| {
            count += b.count() as u64;
            PartitionProduceData::default()
                .with_index(p)
                .with_records(Some(b.finish(codec).into()))
        })
        .collect();
    let req = ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(TopicName(str_bytes(topic)))
            .with_partition_data(data)]);
    if acks == 0 {
        conn.sender.send(&req).await?;
        conn.sender.flush().await?;
        return Ok(count);
    }
    let resp = conn.call(&req).await?;
    for t in resp.responses {
        for p in t.partition_responses {
            check(p.error_code, &format!("produce to {topic}/{}", p.index)).map_err(
                |e| match &p.error_message {
                    Some(m) => anyhow!("{e}: {m}"),
                    None => e,
                },
            )?;
        }
    }
    Ok(count)
}
