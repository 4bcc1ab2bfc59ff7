//! The in-process client pipelines use: a writer that appends through the broker's own path
//! as an idempotent or transactional producer, and a read_committed reader. Only the
//! transport differs from a Kafka client's; the rules (sequences, epochs, markers, the last
//! stable offset) are the same.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use kafka_protocol::records::Compression;
use tokio::sync::Notify;
use weir_connectors::{Record, SinkRecord, TopicPartition};

use crate::log::batch::{complete_batches, BatchBuilder, BatchView, ProducerFields};
use crate::log::manager::{LogManager, Topic, TopicError};
use crate::log::partition::{Isolation, Partition, ReadError};
use crate::log::producer_state::seq_add;
use crate::txn::{ProducerRef, TxnCoordinator};

/// Largest batch the writer builds (below the default max.message.bytes).
const MAX_BATCH_BYTES: usize = 512 * 1024;

/// A record on its way into a partition.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: Arc<str>,
    pub partition: i32,
    pub record: Record,
}

/// Appends records as one producer: with `transactional` every [`TopicWriter::write`] is one
/// transaction, so a batch and its source offset land together or not at all. On a single
/// node it appends through the broker's own path; on a cluster node it produces to the
/// partitions' leaders (see [`super::remote`]).
pub struct TopicWriter {
    way: Way,
    /// A write failed: start over with a new epoch (which aborts what is left open).
    reinit: bool,
}

enum Way {
    Local(LocalWriter),
    Cluster(super::remote::ClusterWriter),
}

struct LocalWriter {
    log: Arc<LogManager>,
    txns: Arc<TxnCoordinator>,
    /// Where source offsets go (`__pipeline_offsets`).
    offsets: Arc<Partition>,
    transactional_id: Option<String>,
    producer: ProducerRef,
    sequences: HashMap<(Arc<str>, i32), i32>,
}

impl TopicWriter {
    /// A producer for `transactional_id` (fencing any earlier instance), or a plain
    /// idempotent one with None.
    pub async fn open(
        ctx: &super::Context,
        transactional_id: Option<String>,
    ) -> Result<TopicWriter> {
        let way = match (&ctx.cluster, &ctx.offsets.local_partition()) {
            (Some(broker), _) => Way::Cluster(
                super::remote::ClusterWriter::open(broker.clone(), transactional_id).await?,
            ),
            (None, Some(offsets)) => {
                let producer = ctx
                    .txns
                    .init_producer_id(transactional_id.as_deref(), 60_000, None)
                    .await
                    .map_err(|e| anyhow!("cannot get a producer id: {e:?}"))?;
                Way::Local(LocalWriter {
                    log: ctx.log.clone(),
                    txns: ctx.txns.clone(),
                    offsets: offsets.clone(),
                    transactional_id,
                    producer,
                    sequences: HashMap::new(),
                })
            }
            (None, None) => bail!("a single node keeps pipeline offsets in its own log"),
        };
        Ok(TopicWriter { way, reinit: false })
    }

    /// Writes the records, then `offset` (key and value, into `__pipeline_offsets`), as one
    /// transaction when transactional; in that order otherwise.
    /// The records are borrowed, so a caller retrying a failed write copies nothing.
    pub async fn write(
        &mut self,
        records: &[Outgoing],
        offset: Option<(Bytes, Bytes)>,
    ) -> Result<()> {
        if self.reinit {
            match &mut self.way {
                Way::Local(w) => w.reinit().await?,
                Way::Cluster(w) => w.reinit().await?,
            }
            self.reinit = false;
        }
        let result = match &mut self.way {
            Way::Local(w) => w.write_once(records, offset).await,
            Way::Cluster(w) => w.write(records, offset).await,
        };
        // A fenced writer does not take its id back: the caller stops (see remote::Fenced).
        self.reinit = result.as_ref().is_err_and(|e| !super::remote::is_fenced(e));
        result
    }
}

/// The records as batches of one producer, the first at `first_sequence`; also returns the
/// sequence that follows them.
pub fn build_batches(
    records: &[&Record],
    producer: ProducerRef,
    first_sequence: i32,
    transactional: bool,
    codec: Compression,
) -> (Vec<Vec<u8>>, i32) {
    let mut out = Vec::new();
    let mut seq = first_sequence;
    let mut rest = records;
    while !rest.is_empty() {
        let now = crate::now_ms();
        let mut b = BatchBuilder::new(rest[0].timestamp.min(now)).with_producer(ProducerFields {
            producer_id: producer.id,
            producer_epoch: producer.epoch,
            base_sequence: seq,
            transactional,
        });
        let mut taken: i32 = 0;
        for r in rest {
            if taken > 0 && b.size() >= MAX_BATCH_BYTES {
                break;
            }
            let headers: Vec<(&[u8], Option<&[u8]>)> = r
                .headers
                .iter()
                .map(|(k, v)| (k.as_bytes(), v.as_deref()))
                .collect();
            b.push(r.key.as_deref(), r.value.as_deref(), &headers, r.timestamp);
            taken += 1;
        }
        out.push(b.finish(codec));
        seq = seq_add(seq, taken);
        rest = &rest[taken as usize..];
    }
    (out, seq)
}

impl LocalWriter {
    async fn reinit(&mut self) -> Result<()> {
        self.producer = self
            .txns
            .init_producer_id(self.transactional_id.as_deref(), 60_000, None)
            .await
            .map_err(|e| anyhow!("cannot get a producer id: {e:?}"))?;
        self.sequences.clear();
        Ok(())
    }

    async fn write_once(
        &mut self,
        records: &[Outgoing],
        offset: Option<(Bytes, Bytes)>,
    ) -> Result<()> {
        let mut groups: BTreeMap<(&str, i32), Vec<&Record>> = BTreeMap::new();
        for o in records {
            groups
                .entry((&o.topic, o.partition))
                .or_default()
                .push(&o.record);
        }
        let offset = offset.map(|(key, value)| {
            let record = Record {
                key: Some(key),
                value: Some(value),
                headers: vec![],
                timestamp: crate::now_ms(),
            };
            (self.offsets.clone(), record)
        });
        let mut targets: Vec<(Arc<Partition>, Vec<&Record>)> = Vec::new();
        for ((topic, p), recs) in groups {
            let partition = self
                .log
                .partition(topic, p)
                .with_context(|| format!("topic {topic} has no partition {p}"))?;
            targets.push((partition, recs));
        }
        if let Some((p, record)) = &offset {
            targets.push((p.clone(), vec![record]));
        }
        if targets.is_empty() {
            return Ok(());
        }
        if let Some(id) = &self.transactional_id {
            let tps = targets
                .iter()
                .map(|(p, _)| (p.topic.to_string(), p.id))
                .collect();
            let added = self
                .txns
                .add_partitions(id, self.producer, tps)
                .await
                .map_err(|e| anyhow!("cannot start a transaction: {e:?}"))?;
            if let Some((tp, Some(e))) = added.into_iter().find(|(_, e)| e.is_some()) {
                bail!("cannot add {}-{} to the transaction: {e:?}", tp.0, tp.1);
            }
        }
        let result = self.append_all(&targets);
        if let Some(id) = &self.transactional_id {
            let commit = result.is_ok();
            if let Err(e) = self.txns.end_txn(id, self.producer, commit).await {
                // The coordinator aborts it on its timeout; this writer is no longer usable.
                return Err(anyhow!("cannot end the transaction: {e:?}"));
            }
        }
        result?;
        for (p, _) in &targets {
            if p.config().fsync_before_ack() {
                p.flush_to(p.high_watermark()).await?;
            }
        }
        Ok(())
    }

    fn append_all(&mut self, targets: &[(Arc<Partition>, Vec<&Record>)]) -> Result<()> {
        let transactional = self.transactional_id.is_some();
        for (p, records) in targets {
            let key = (p.topic.clone(), p.id);
            let seq = *self.sequences.get(&key).unwrap_or(&0);
            let (batches, next) = build_batches(
                records,
                self.producer,
                seq,
                transactional,
                Compression::None,
            );
            for batch in batches {
                p.append_built(batch)
                    .with_context(|| format!("cannot append to {}-{}", p.topic, p.id))?;
            }
            self.sequences.insert(key, next);
        }
        Ok(())
    }
}

/// A topic pipelines write to, created with `partitions` (or the broker default) when missing:
/// its name and partition count. On a cluster it is created through the metadata quorum.
pub async fn ensure_output(
    ctx: &super::Context,
    name: &str,
    partitions: Option<i32>,
) -> Result<(Arc<str>, i32)> {
    let Some(cluster) = ctx.cluster.as_ref().and_then(|b| b.cluster.clone()) else {
        let t = ensure_topic(&ctx.log, name, partitions, ctx.default_partitions)?;
        return Ok((t.name.clone(), t.partitions.len() as i32));
    };
    let broker = ctx.cluster.as_ref().expect("a cluster node");
    let count = |cluster: &crate::cluster::Cluster| {
        cluster
            .image()
            .topics
            .get(name)
            .map(|t| t.partitions.len() as i32)
    };
    if let Some(n) = count(&cluster) {
        return Ok((Arc::from(name), n));
    }
    let wanted = partitions.unwrap_or(ctx.default_partitions);
    match broker
        .create_topic(name, wanted, -1, None, Default::default())
        .await
    {
        Ok(_) | Err(TopicError::AlreadyExists(_)) => {}
        Err(e) => bail!("cannot create topic {name}: {e}"),
    }
    let n = count(&cluster).with_context(|| format!("topic {name} vanished"))?;
    Ok((Arc::from(name), n))
}

/// The topic, created with `partitions` (or the broker default) when missing.
pub fn ensure_topic(
    log: &LogManager,
    name: &str,
    partitions: Option<i32>,
    default_partitions: i32,
) -> Result<Arc<Topic>> {
    if let Some(t) = log.topic(name) {
        return Ok(t);
    }
    match log.create_topic(
        name,
        partitions.unwrap_or(default_partitions),
        -1,
        Default::default(),
    ) {
        Ok(t) => Ok(t),
        Err(TopicError::AlreadyExists(_)) => log
            .topic(name)
            .with_context(|| format!("topic {name} vanished")),
        Err(e) => Err(anyhow!("cannot create topic {name}: {e}")),
    }
}

/// A topic a pipeline reads: in this node's log, or on a cluster's partition leaders.
#[derive(Clone)]
pub enum Input {
    Local(Arc<Topic>),
    Cluster {
        broker: Arc<crate::kafka::Broker>,
        topic: Arc<str>,
        partitions: i32,
    },
}

impl Input {
    /// The topic, created with `partitions` (or the broker default) when missing.
    pub async fn ensure(
        ctx: &super::Context,
        name: &str,
        partitions: Option<i32>,
    ) -> Result<Input> {
        match &ctx.cluster {
            None => Ok(Input::Local(ensure_topic(
                &ctx.log,
                name,
                partitions,
                ctx.default_partitions,
            )?)),
            Some(broker) => {
                let (topic, partitions) = ensure_output(ctx, name, partitions).await?;
                Ok(Input::Cluster {
                    broker: broker.clone(),
                    topic,
                    partitions,
                })
            }
        }
    }

    /// The topic if it exists.
    pub fn existing(ctx: &super::Context, name: &str) -> Option<Input> {
        match &ctx.cluster {
            None => ctx.log.topic(name).map(Input::Local),
            Some(broker) => {
                let cluster = broker.cluster.as_ref()?;
                let partitions = cluster.image().topics.get(name)?.partitions.len() as i32;
                Some(Input::Cluster {
                    broker: broker.clone(),
                    topic: Arc::from(name),
                    partitions,
                })
            }
        }
    }

    pub fn name(&self) -> &Arc<str> {
        match self {
            Input::Local(t) => &t.name,
            Input::Cluster { topic, .. } => topic,
        }
    }

    pub fn partition_ids(&self) -> Vec<i32> {
        match self {
            Input::Local(t) => t.partitions.iter().map(|p| p.id).collect(),
            Input::Cluster { partitions, .. } => (0..*partitions).collect(),
        }
    }
}

/// Reads partitions of a topic from given offsets, as a read_committed consumer: control
/// batches and aborted transactions are skipped, nothing past the last stable offset is
/// returned.
pub enum TopicReader {
    Local(LocalReader),
    Cluster(super::remote::ClusterReader),
}

impl TopicReader {
    /// `start` gives each partition's first offset (clamped into the log); missing ones start
    /// at the log start, or with `from_end` at the last stable offset.
    pub async fn open(
        input: &Input,
        start: &BTreeMap<i32, i64>,
        from_end: bool,
    ) -> Result<TopicReader> {
        Ok(match input {
            Input::Local(topic) => {
                let mut start = start.clone();
                for p in &topic.partitions {
                    start.entry(p.id).or_insert(if from_end {
                        p.last_stable_offset()
                    } else {
                        p.log_start_offset()
                    });
                }
                TopicReader::Local(LocalReader::new(topic, &start))
            }
            Input::Cluster {
                broker,
                topic,
                partitions,
            } => TopicReader::Cluster(
                super::remote::ClusterReader::open(
                    broker.clone(),
                    topic.clone(),
                    *partitions,
                    start,
                    from_end,
                )
                .await?,
            ),
        })
    }

    /// The next offset to read per partition.
    pub fn positions(&self) -> BTreeMap<i32, i64> {
        match self {
            TopicReader::Local(r) => r.positions(),
            TopicReader::Cluster(r) => r.positions(),
        }
    }

    /// Committed records not read yet (on a cluster, as of the leaders' last answers).
    pub fn records_behind(&self) -> u64 {
        match self {
            TopicReader::Local(r) => r
                .partitions
                .iter()
                .map(|(p, at)| (p.last_stable_offset() - at).max(0) as u64)
                .sum(),
            TopicReader::Cluster(r) => r.records_behind(),
        }
    }

    /// Records committed since the last call (at most about `max_bytes` per partition); waits
    /// up to `wait` for some when there are none.
    pub async fn poll(&mut self, max_bytes: u64, wait: Duration) -> Result<Vec<SinkRecord>> {
        match self {
            TopicReader::Local(r) => r.poll(max_bytes, wait).await,
            TopicReader::Cluster(r) => r.read(max_bytes, wait).await,
        }
    }

    /// What is there now, without waiting (empty if nothing). Positions move only once the
    /// records are returned, so a call dropped half-way loses nothing.
    pub async fn read_now(&mut self, max_bytes: u64) -> Result<Vec<SinkRecord>> {
        match self {
            TopicReader::Local(r) => r.read_now(max_bytes),
            TopicReader::Cluster(r) => r.read(max_bytes, Duration::ZERO).await,
        }
    }
}

/// [`TopicReader`] over this node's own log.
pub struct LocalReader {
    topic: Arc<str>,
    partitions: Vec<(Arc<Partition>, i64)>,
    notify: Arc<Notify>,
}

impl LocalReader {
    /// Reads the partitions `start` names, each from its offset there (clamped into the log).
    pub fn new(topic: &Topic, start: &BTreeMap<i32, i64>) -> LocalReader {
        let partitions = topic
            .partitions
            .iter()
            .filter_map(|p| {
                let from = (*start.get(&p.id)?).clamp(p.log_start_offset(), p.high_watermark());
                Some((p.clone(), from))
            })
            .collect();
        LocalReader {
            topic: topic.name.clone(),
            partitions,
            notify: Arc::new(Notify::new()),
        }
    }

    /// The next offset to read per partition.
    pub fn positions(&self) -> BTreeMap<i32, i64> {
        self.partitions.iter().map(|(p, o)| (p.id, *o)).collect()
    }

    /// Records committed since the last call (at most about `max_bytes` per partition); waits
    /// up to `wait` for some when there are none.
    pub async fn poll(&mut self, max_bytes: u64, wait: Duration) -> Result<Vec<SinkRecord>> {
        let out = self.read_now(max_bytes)?;
        if !out.is_empty() {
            return Ok(out);
        }
        for (p, _) in &self.partitions {
            p.register_waiter(self.notify.clone());
        }
        // Appends made between the read and the registration would be missed otherwise.
        let out = self.read_now(max_bytes)?;
        if !out.is_empty() {
            return Ok(out);
        }
        let _ = tokio::time::timeout(wait, self.notify.notified()).await;
        self.read_now(max_bytes)
    }

    /// What is in the log now, without waiting (empty if nothing).
    pub fn read_now(&mut self, max_bytes: u64) -> Result<Vec<SinkRecord>> {
        let mut out = Vec::new();
        // Positions move only if every partition was read: after an error the records already
        // read are dropped, and the next call reads them again.
        let mut positions: Vec<i64> = self.partitions.iter().map(|(_, o)| *o).collect();
        for ((p, _), next) in self.partitions.iter().zip(positions.iter_mut()) {
            let data = match p.read_with(*next, max_bytes, true, Isolation::ReadCommitted) {
                Ok(d) => d,
                Err(ReadError::OffsetOutOfRange { start, .. }) if *next < start => {
                    // Retention removed what we had not read yet: carry on from the start.
                    tracing::warn!(topic = %self.topic, partition = p.id, from = *next, to = start, "records deleted before they were read");
                    *next = start;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let Some(slice) = data.records else { continue };
            let bytes = slice.read_bytes()?;
            let position = TopicPartition {
                topic: self.topic.to_string(),
                partition: p.id,
            };
            records_of(&bytes, &position, next, &mut out, |batch| {
                batch.is_control()
                    || (batch.is_transactional()
                        && p.is_aborted(batch.producer_id(), batch.base_offset()))
            })?;
        }
        for ((_, o), next) in self.partitions.iter_mut().zip(positions) {
            *o = next;
        }
        Ok(out)
    }
}

/// Appends the records of `bytes` (whole batches of one partition) at or after `*next` to
/// `out`, except those of batches `skip` refuses, and moves `*next` past them.
pub fn records_of(
    bytes: &Bytes,
    position: &TopicPartition,
    next: &mut i64,
    out: &mut Vec<SinkRecord>,
    mut skip: impl FnMut(&BatchView<'_>) -> bool,
) -> Result<()> {
    for batch in complete_batches(bytes) {
        let base = batch.base_offset();
        if batch.next_offset() <= *next {
            continue;
        }
        if !skip(&batch) {
            let base_ts = batch.base_timestamp();
            let from = *next;
            batch.for_each_record(|r| {
                let offset = base + r.offset_delta as i64;
                if offset < from {
                    return;
                }
                let headers = r
                    .headers()
                    .into_iter()
                    .map(|(k, v)| {
                        (
                            String::from_utf8_lossy(k).into_owned(),
                            v.map(|v| share(bytes, v)),
                        )
                    })
                    .collect();
                out.push(SinkRecord {
                    record: Record {
                        key: r.key.map(|k| share(bytes, k)),
                        value: r.value.map(|v| share(bytes, v)),
                        headers,
                        timestamp: base_ts + r.timestamp_delta,
                    },
                    position: position.clone(),
                    offset,
                });
            })?;
        }
        *next = batch.next_offset();
    }
    Ok(())
}

/// `part` as `Bytes`: a slice of `buf` (no copy) when it lies in `buf`, as the fields of an
/// uncompressed batch do; a copy otherwise (a compressed batch's fields live in a scratch buffer).
fn share(buf: &Bytes, part: &[u8]) -> Bytes {
    let range = buf.as_ptr_range();
    let inside = range.start <= part.as_ptr() && part.as_ptr_range().end <= range.end;
    if inside && !part.is_empty() {
        buf.slice_ref(part)
    } else {
        Bytes::copy_from_slice(part)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_inside_the_read_buffer_are_shared_others_copied() {
        let buf = Bytes::from(b"0123456789".to_vec());
        let inside = share(&buf, &buf[2..5]);
        assert_eq!(&inside[..], b"234");
        assert_eq!(inside.as_ptr(), buf[2..].as_ptr(), "a slice, not a copy");
        let scratch = b"234".to_vec();
        let outside = share(&buf, &scratch);
        assert_eq!(&outside[..], b"234");
        assert_ne!(outside.as_ptr(), scratch.as_ptr());
        assert!(share(&buf, &buf[4..4]).is_empty());
    }
}
