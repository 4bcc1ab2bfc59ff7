//! NATS JetStream through the `async-nats` crate: a throwaway `nats-server -js` per measurement.
//! A partition is one file-storage stream (subject `<topic>.<p>`); a produce batch is its records
//! published asynchronously, acknowledged when every publish ack of the batch has arrived (so
//! `in_flight` batches of records are unacknowledged, like weir's produce requests); consumers
//! are ephemeral pull consumers (no acks) reading in pulls of `fetch_bytes` worth of records.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{self, StorageType};
use async_nats::jetstream::{self as js, Context as JetStream};
use async_nats::Subject;
use futures::stream::SelectAll;
use futures::{FutureExt, StreamExt};

use crate::proc::{free_port, Server};
use crate::workload::{Ack, Batch, Consumer, Producer, Settings, System};

pub struct NatsJetStream {
    server: Server,
    js: JetStream,
    records_per_fetch: usize,
}

impl NatsJetStream {
    pub async fn start(
        bin: &Path,
        dir: &Path,
        s: &Settings,
        record_size: usize,
    ) -> Result<NatsJetStream> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir);
        let addr = format!("127.0.0.1:{port}");
        let mut server = Server::spawn("nats-server", cmd, dir)?;
        server.wait_listening(&addr).await?;
        let client = async_nats::connect(&addr).await?;
        // Room for every record of the in-flight batches, so the window, not the client, limits.
        let capacity = s.in_flight * s.records_per_batch(record_size) + 1024;
        let js = js::ContextBuilder::new()
            .timeout(Duration::from_secs(60))
            .max_ack_inflight(capacity)
            .backpressure_on_inflight(true)
            .build(client);
        Ok(NatsJetStream {
            server,
            js,
            records_per_fetch: s.records_per_fetch(record_size),
        })
    }
}

fn stream_name(topic: &str, p: usize) -> String {
    format!("{topic}-{p}")
}

fn subject(topic: &str, p: usize) -> String {
    format!("{topic}.{p}")
}

impl System for NatsJetStream {
    type P = NatsProducer;
    type C = NatsConsumer;

    async fn create_topic(&mut self, topic: &str, partitions: usize) -> Result<()> {
        for p in 0..partitions {
            let config = stream::Config {
                name: stream_name(topic, p),
                subjects: vec![subject(topic, p)],
                storage: StorageType::File,
                num_replicas: 1,
                ..Default::default()
            };
            // JetStream may still be starting right after the port opens.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match self.js.create_stream(config.clone()).await {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        return Err(anyhow!(e).context("cannot create a JetStream stream"))
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        Ok(())
    }

    async fn producer(&mut self, topic: &str, partitions: usize) -> Result<NatsProducer> {
        Ok(NatsProducer {
            js: self.js.clone(),
            subjects: (0..partitions)
                .map(|p| Subject::from(subject(topic, p)))
                .collect(),
        })
    }

    async fn consumer(&mut self, topic: &str, partitions: usize) -> Result<NatsConsumer> {
        let mut merged = SelectAll::new();
        for p in 0..partitions {
            let consumer = self
                .js
                .create_consumer_on_stream(
                    pull::Config {
                        deliver_policy: DeliverPolicy::All,
                        ack_policy: AckPolicy::None,
                        ..Default::default()
                    },
                    stream_name(topic, p),
                )
                .await
                .map_err(|e| anyhow!(e).context("cannot create a pull consumer"))?;
            let messages = consumer
                .stream()
                .max_messages_per_batch(self.records_per_fetch)
                .messages()
                .await
                .map_err(|e| anyhow!(e).context("cannot start pulling"))?;
            merged.push(messages);
        }
        Ok(NatsConsumer { merged })
    }

    fn servers(&self) -> &[Server] {
        std::slice::from_ref(&self.server)
    }
}

pub struct NatsProducer {
    js: JetStream,
    subjects: Vec<Subject>,
}

impl Producer for NatsProducer {
    async fn send(&mut self, batch: Batch) -> Result<Ack> {
        let subject = &self.subjects[batch.partition];
        let mut acks = Vec::with_capacity(batch.count());
        for record in batch.records() {
            acks.push(
                self.js
                    .publish(subject.clone(), record)
                    .await
                    .map_err(|e| anyhow!(e).context("publish"))?,
            );
        }
        let task = tokio::spawn(async move {
            for ack in acks {
                ack.await.map_err(|e| anyhow!(e).context("publish ack"))?;
            }
            anyhow::Ok(Instant::now())
        });
        Ok(Box::pin(async move {
            task.await.context("publish ack task panicked")?
        }))
    }
}

pub struct NatsConsumer {
    merged: SelectAll<pull::Stream>,
}

impl Consumer for NatsConsumer {
    async fn poll(&mut self, f: &mut (dyn FnMut(&[u8]) + Send)) -> Result<u64> {
        let first = match tokio::time::timeout(Duration::from_millis(100), self.merged.next()).await
        {
            Err(_) => return Ok(0),
            Ok(None) => return Err(anyhow!("the pull consumer stream ended")),
            Ok(Some(m)) => m,
        };
        let mut n = 0u64;
        let mut next = Some(first);
        while let Some(m) = next {
            let m = m.map_err(|e| anyhow!(e).context("pull consumer"))?;
            f(&m.message.payload);
            n += 1;
            if n >= 100_000 {
                break;
            }
            next = self.merged.next().now_or_never().flatten();
        }
        Ok(n)
    }
}
