//! Redis Streams through the `redis` crate: a throwaway `redis-server` per measurement. A
//! partition is one stream key; a produce batch is one pipeline of `XADD key * d <value>`
//! commands on a multiplexed connection (so `in_flight` pipelines are outstanding, like weir's
//! produce requests); consumers read with `XREAD COUNT n BLOCK 100 STREAMS k1..kp id1..idp`.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};

use crate::proc::{free_port, Server};
use crate::workload::{Ack, Batch, Consumer, Producer, Settings, System};

/// The persistence configurations compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persistence {
    /// In memory only: `--save "" --appendonly no`.
    None,
    /// Append-only file, fsync once a second: `--appendonly yes --appendfsync everysec`.
    AofEverysec,
    /// Append-only file, fsync before replying: `--appendonly yes --appendfsync always`.
    AofAlways,
}

pub struct RedisStreams {
    server: Server,
    client: redis::Client,
    records_per_fetch: usize,
}

impl RedisStreams {
    pub async fn start(
        bin: &Path,
        dir: &Path,
        persistence: Persistence,
        s: &Settings,
        record_size: usize,
    ) -> Result<RedisStreams> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir)
            .args(["--save", "", "--daemonize", "no", "--logfile", ""]);
        match persistence {
            Persistence::None => cmd.args(["--appendonly", "no"]),
            Persistence::AofEverysec => {
                cmd.args(["--appendonly", "yes", "--appendfsync", "everysec"])
            }
            Persistence::AofAlways => cmd.args(["--appendonly", "yes", "--appendfsync", "always"]),
        };
        let addr = format!("127.0.0.1:{port}");
        let mut server = Server::spawn("redis-server", cmd, dir)?;
        server.wait_listening(&addr).await?;
        let client = redis::Client::open(format!("redis://{addr}/"))?;
        // The port accepts connections slightly before the server answers commands.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ping = async {
                let mut c = connect(&client).await?;
                redis::cmd("PING").query_async::<String>(&mut c).await?;
                anyhow::Ok(())
            };
            match ping.await {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context("redis-server does not answer PING"))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        Ok(RedisStreams {
            server,
            client,
            records_per_fetch: s.records_per_fetch(record_size),
        })
    }
}

async fn connect(client: &redis::Client) -> Result<MultiplexedConnection> {
    // Pipelines of thousands of commands behind an fsync can take longer than the default
    // 500 ms response timeout.
    let config = AsyncConnectionConfig::new()
        .set_response_timeout(Some(Duration::from_secs(60)))
        .set_connection_timeout(Some(Duration::from_secs(10)));
    Ok(client
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

fn keys(topic: &str, partitions: usize) -> Vec<String> {
    (0..partitions).map(|p| format!("{topic}-{p}")).collect()
}

impl System for RedisStreams {
    type P = RedisProducer;
    type C = RedisConsumer;

    async fn create_topic(&mut self, _topic: &str, _partitions: usize) -> Result<()> {
        Ok(()) // XADD creates the stream
    }

    async fn producer(&mut self, topic: &str, partitions: usize) -> Result<RedisProducer> {
        Ok(RedisProducer {
            conn: connect(&self.client).await?,
            keys: keys(topic, partitions),
        })
    }

    async fn consumer(&mut self, topic: &str, partitions: usize) -> Result<RedisConsumer> {
        let keys = keys(topic, partitions);
        Ok(RedisConsumer {
            conn: connect(&self.client).await?,
            index: keys
                .iter()
                .enumerate()
                .map(|(i, k)| (k.as_bytes().to_vec(), i))
                .collect(),
            ids: vec!["0-0".to_string(); keys.len()],
            keys,
            count: self.records_per_fetch,
        })
    }

    fn servers(&self) -> &[Server] {
        std::slice::from_ref(&self.server)
    }
}

pub struct RedisProducer {
    conn: MultiplexedConnection,
    keys: Vec<String>,
}

impl Producer for RedisProducer {
    async fn send(&mut self, batch: Batch) -> Result<Ack> {
        let mut pipe = redis::pipe();
        let key = &self.keys[batch.partition];
        for record in batch.records() {
            pipe.cmd("XADD").arg(key).arg("*").arg("d").arg(&record[..]);
        }
        let mut conn = self.conn.clone();
        // The multiplexed connection writes the pipeline as soon as the task runs.
        let task = tokio::spawn(async move {
            let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
            if let Some(Value::ServerError(e)) =
                replies.iter().find(|v| matches!(v, Value::ServerError(_)))
            {
                bail!("XADD failed: {e:?}");
            }
            Ok(Instant::now())
        });
        Ok(Box::pin(async move {
            task.await.context("XADD task panicked")?
        }))
    }
}

pub struct RedisConsumer {
    conn: MultiplexedConnection,
    keys: Vec<String>,
    index: HashMap<Vec<u8>, usize>,
    ids: Vec<String>,
    count: usize,
}

impl Consumer for RedisConsumer {
    async fn poll(&mut self, f: &mut (dyn FnMut(&[u8]) + Send)) -> Result<u64> {
        let reply: Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(self.count)
            .arg("BLOCK")
            .arg(100)
            .arg("STREAMS")
            .arg(&self.keys)
            .arg(&self.ids)
            .query_async(&mut self.conn)
            .await?;
        let streams: Vec<(Value, Value)> = match reply {
            Value::Nil => return Ok(0),
            Value::Array(items) => items
                .into_iter()
                .map(|kv| match kv {
                    Value::Array(mut pair) if pair.len() == 2 => {
                        let entries = pair.pop().unwrap_or_default();
                        Ok((pair.pop().unwrap_or_default(), entries))
                    }
                    other => Err(anyhow!("unexpected XREAD stream reply {other:?}")),
                })
                .collect::<Result<_>>()?,
            Value::Map(kvs) => kvs,
            other => bail!("unexpected XREAD reply {other:?}"),
        };
        let mut n = 0u64;
        for (key, entries) in streams {
            let Value::BulkString(key) = key else {
                bail!("unexpected XREAD key {key:?}")
            };
            let i = *self
                .index
                .get(&key)
                .ok_or_else(|| anyhow!("XREAD returned an unknown stream"))?;
            let Value::Array(entries) = entries else {
                bail!("unexpected XREAD entries {entries:?}")
            };
            let mut last_id = None;
            for entry in &entries {
                let Value::Array(entry) = entry else {
                    bail!("unexpected XREAD entry {entry:?}")
                };
                let [Value::BulkString(id), Value::Array(fields)] = &entry[..] else {
                    bail!("unexpected XREAD entry {entry:?}")
                };
                if let Some(Value::BulkString(value)) = fields.get(1) {
                    f(value);
                }
                n += 1;
                last_id = Some(id);
            }
            if let Some(id) = last_id {
                self.ids[i] = String::from_utf8_lossy(id).into_owned();
            }
        }
        Ok(n)
    }
}
