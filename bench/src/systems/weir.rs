//! weir, driven with its own client code (`weir::client`, `weir::log::batch`, the CLI's fetch
//! request), started as a subprocess: `weir serve` on free loopback ports and a scratch directory.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{CreateTopicsRequest, FetchRequest, ProduceRequest, TopicName};
use kafka_protocol::records::Compression;
use tokio::sync::{mpsc, oneshot};
use weir::cli::consume::fetch_request;
use weir::client::{check, Connection, Receiver, Sender};
use weir::kafka::str_bytes;
use weir::log::batch::{complete_batches, BatchBuilder};

use crate::proc::{free_port, Server};
use crate::workload::{Ack, Batch, Consumer, Durability, Producer, Settings, System};

pub struct Weir {
    server: Server,
    addr: String,
    durability: Durability,
    fetch_bytes: i32,
}

impl Weir {
    pub async fn start(
        bin: &Path,
        dir: &Path,
        durability: Durability,
        s: &Settings,
    ) -> Result<Weir> {
        std::fs::create_dir_all(dir)?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut cmd = Command::new(bin);
        // In its scratch directory: nothing relative to the caller's (such as a ./pipelines
        // directory, which `weir serve` loads when present) reaches it.
        cmd.current_dir(dir)
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--kafka-addr", &addr])
            .args(["--http-addr", &format!("127.0.0.1:{}", free_port()?)])
            .env("WEIR_LOG", "warn");
        let mut server = Server::spawn("weir", cmd, dir)?;
        server.wait_listening(&addr).await?;
        Ok(Weir {
            server,
            addr,
            durability,
            fetch_bytes: s.fetch_bytes as i32,
        })
    }
}

impl System for Weir {
    type P = WeirProducer;
    type C = WeirConsumer;

    async fn create_topic(&mut self, topic: &str, partitions: usize) -> Result<()> {
        let mut configs = vec![];
        if self.durability == Durability::Fsync {
            configs.push(
                CreatableTopicConfig::default()
                    .with_name(str_bytes("flush.messages"))
                    .with_value(Some(str_bytes("1"))),
            );
        }
        let req = CreateTopicsRequest::default()
            .with_timeout_ms(30_000)
            .with_topics(vec![CreatableTopic::default()
                .with_name(TopicName(str_bytes(topic)))
                .with_num_partitions(partitions as i32)
                .with_replication_factor(-1)
                .with_configs(configs)]);
        let resp = Connection::connect(&self.addr).await?.call(&req).await?;
        for t in &resp.topics {
            check(t.error_code, "create the benchmark topic")?;
        }
        Ok(())
    }

    async fn producer(&mut self, topic: &str, _partitions: usize) -> Result<WeirProducer> {
        let acks = match self.durability {
            Durability::Ack1 => 1,
            Durability::Fsync => -1,
        };
        WeirProducer::connect(&self.addr, topic, acks).await
    }

    async fn consumer(&mut self, topic: &str, partitions: usize) -> Result<WeirConsumer> {
        let (sender, receiver) = Connection::connect(&self.addr).await?.into_split();
        Ok(WeirConsumer {
            sender,
            receiver,
            topic: topic.to_string(),
            positions: (0..partitions as i32).map(|p| (p, 0)).collect(),
            fetch_bytes: self.fetch_bytes,
            in_flight: None,
        })
    }

    fn servers(&self) -> &[Server] {
        std::slice::from_ref(&self.server)
    }
}

/// One connection, pipelined: requests go out on the write half; a task reads the responses
/// (which come back in order) and completes each request's acknowledgement.
pub struct WeirProducer {
    sender: Sender,
    pending: mpsc::UnboundedSender<(i16, oneshot::Sender<Result<Instant>>)>,
    topic: String,
    acks: i16,
}

impl WeirProducer {
    async fn connect(addr: &str, topic: &str, acks: i16) -> Result<WeirProducer> {
        let (sender, mut receiver) = Connection::connect(addr).await?.into_split();
        let (pending, mut rx) =
            mpsc::unbounded_channel::<(i16, oneshot::Sender<Result<Instant>>)>();
        tokio::spawn(async move {
            while let Some((version, done)) = rx.recv().await {
                let result = match receiver.recv::<ProduceRequest>(version).await {
                    Ok(resp) => resp
                        .responses
                        .iter()
                        .flat_map(|t| &t.partition_responses)
                        .try_for_each(|p| check(p.error_code, "produce"))
                        .map(|()| Instant::now()),
                    Err(e) => Err(e),
                };
                let failed = result.is_err();
                let _ = done.send(result);
                if failed {
                    break;
                }
            }
        });
        Ok(WeirProducer {
            sender,
            pending,
            topic: topic.to_string(),
            acks,
        })
    }
}

impl Producer for WeirProducer {
    async fn send(&mut self, batch: Batch) -> Result<Ack> {
        let now = weir::now_ms();
        let mut b = BatchBuilder::new(now);
        for record in batch.records() {
            b.push(None, Some(&record), &[], now);
        }
        let req = ProduceRequest::default()
            .with_acks(self.acks)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(TopicName(str_bytes(self.topic.as_str())))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(batch.partition as i32)
                    .with_records(Some(b.finish(Compression::None).into()))])]);
        let version = self.sender.send(&req).await?;
        self.sender.flush().await?;
        let (done, acked) = oneshot::channel();
        self.pending
            .send((version, done))
            .map_err(|_| anyhow!("the produce response reader stopped"))?;
        Ok(Box::pin(async move {
            acked.await.context("the produce response reader stopped")?
        }))
    }
}

/// Fetches every partition on one connection, checking each batch's CRC and decoding every
/// record. Like Kafka's consumers it keeps the next fetch in flight while it decodes the
/// previous response: the positions it needs come from the batch headers alone.
pub struct WeirConsumer {
    sender: Sender,
    receiver: Receiver,
    topic: String,
    /// Where the next fetch starts, per partition.
    positions: BTreeMap<i32, i64>,
    fetch_bytes: i32,
    /// The version of the fetch sent and not yet answered.
    in_flight: Option<i16>,
}

impl WeirConsumer {
    async fn send_fetch(&mut self) -> Result<()> {
        let req = fetch_request(&self.topic, &self.positions, 100, self.fetch_bytes);
        let version = self.sender.send(&req).await?;
        self.sender.flush().await?;
        self.in_flight = Some(version);
        Ok(())
    }
}

impl Consumer for WeirConsumer {
    async fn poll(&mut self, f: &mut (dyn FnMut(&[u8]) + Send)) -> Result<u64> {
        if self.in_flight.is_none() {
            self.send_fetch().await?;
        }
        let version = self.in_flight.take().expect("a fetch is in flight");
        let resp = self.receiver.recv::<FetchRequest>(version).await?;
        let mut received = Vec::new();
        for t in resp.responses {
            for pd in t.partitions {
                check(pd.error_code, "fetch")?;
                let Some(records) = pd.records else { continue };
                let from = self.positions[&pd.partition_index];
                let next = complete_batches(&records)
                    .map(|b| b.next_offset())
                    .filter(|&n| n > from)
                    .last()
                    .unwrap_or(from);
                self.positions.insert(pd.partition_index, next);
                received.push((from, records));
            }
        }
        self.send_fetch().await?;
        let mut n = 0u64;
        for (from, records) in received {
            for batch in complete_batches(&records) {
                if batch.next_offset() <= from {
                    continue;
                }
                batch.check_integrity()?;
                let base = batch.base_offset();
                batch.for_each_record(|r| {
                    if base + r.offset_delta as i64 >= from {
                        n += 1;
                        f(r.value.unwrap_or_default());
                    }
                })?;
            }
        }
        Ok(n)
    }
}
