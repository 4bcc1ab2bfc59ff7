use std::path::Path;

use super::*;
use crate::group::GroupSettings;
use crate::log::batch::{BatchBuilder, ProducerFields};
use crate::log::partition::Isolation;
use kafka_protocol::records::Compression;

struct Node {
    log: Arc<LogManager>,
    groups: Arc<GroupCoordinator>,
    txns: TxnCoordinator,
}

/// Opens a node on `dir` as `weir serve` does (without the network), recovering first.
async fn open(dir: &Path) -> Node {
    let log = Arc::new(LogManager::open(dir, Default::default()).unwrap());
    let groups = Arc::new(GroupCoordinator::open(log.clone(), GroupSettings::default()).unwrap());
    let txns = TxnCoordinator::open(log.clone(), groups.clone(), TxnSettings::default()).unwrap();
    txns.recover().await.unwrap();
    Node { log, groups, txns }
}

fn write(
    log: &LogManager,
    topic: &str,
    p: ProducerRef,
    seq: i32,
    values: &[&str],
) -> crate::log::partition::AppendInfo {
    let mut b = BatchBuilder::new(now_ms()).with_producer(ProducerFields {
        producer_id: p.id,
        producer_epoch: p.epoch,
        base_sequence: seq,
        transactional: true,
    });
    for v in values {
        b.push(None, Some(v.as_bytes()), &[], now_ms());
    }
    log.partition(topic, 0)
        .unwrap()
        .append(&b.finish(Compression::None))
        .unwrap()
}

/// The producer of transactional id "app" (60 s timeout), new or with its epoch bumped.
async fn app_producer(node: &Node) -> ProducerRef {
    node.txns
        .init_producer_id(Some("app"), 60_000, None)
        .await
        .unwrap()
}

fn tp(topic: &str) -> Vec<(String, i32)> {
    vec![(topic.to_string(), 0)]
}

#[tokio::test]
async fn producer_ids_are_never_reused_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 {
        let node = open(dir.path()).await;
        for _ in 0..3 {
            let p = node.txns.init_producer_id(None, 0, None).await.unwrap();
            assert_eq!(p.epoch, 0);
            assert!(seen.insert(p.id), "producer id {} handed out twice", p.id);
        }
    }
}

#[tokio::test]
async fn commit_and_abort_move_the_stable_offset_and_list_aborts() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    node.log
        .create_topic("t", 1, -1, Default::default())
        .unwrap();
    let part = node.log.partition("t", 0).unwrap();
    let p = app_producer(&node).await;

    // Writing before AddPartitionsToTxn is refused by the check the produce path makes.
    assert_eq!(
        node.txns.verify_partition("app", p, "t", 0).await,
        Err(ResponseError::InvalidTxnState)
    );
    node.txns.add_partitions("app", p, tp("t")).await.unwrap();
    node.txns.verify_partition("app", p, "t", 0).await.unwrap();
    write(&node.log, "t", p, 0, &["a", "b"]);
    assert_eq!(part.last_stable_offset(), 0);
    assert_eq!(part.high_watermark(), 2);
    let committed = part
        .read_with(0, 1 << 20, true, Isolation::ReadCommitted)
        .unwrap();
    assert!(committed.records.is_none());
    node.txns.end_txn("app", p, true).await.unwrap();
    // Data (2) + commit marker (1).
    assert_eq!(part.high_watermark(), 3);
    assert_eq!(part.last_stable_offset(), 3);
    // A retried EndTxn succeeds again; the opposite decision does not.
    node.txns.end_txn("app", p, true).await.unwrap();
    assert_eq!(
        node.txns.end_txn("app", p, false).await,
        Err(ResponseError::InvalidTxnState)
    );

    node.txns.add_partitions("app", p, tp("t")).await.unwrap();
    write(&node.log, "t", p, 2, &["c"]);
    node.txns.end_txn("app", p, false).await.unwrap();
    let data = part
        .read_with(0, 1 << 20, true, Isolation::ReadCommitted)
        .unwrap();
    assert_eq!(data.last_stable_offset, 5);
    assert_eq!(data.aborted.len(), 1);
    assert_eq!(data.aborted[0].producer_id, p.id);
    assert_eq!(data.aborted[0].first_offset, 3);
    assert_eq!(
        node.txns.describe("app").await.unwrap().unwrap().state,
        TxnState::CompleteAbort
    );
}

#[tokio::test]
async fn a_new_instance_fences_the_old_one_and_aborts_its_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    node.log
        .create_topic("t", 1, -1, Default::default())
        .unwrap();
    let old = app_producer(&node).await;
    node.txns.add_partitions("app", old, tp("t")).await.unwrap();
    write(&node.log, "t", old, 0, &["zombie"]);

    let new = app_producer(&node).await;
    assert_eq!(new.id, old.id);
    assert!(new.epoch > old.epoch);
    let part = node.log.partition("t", 0).unwrap();
    assert_eq!(part.last_stable_offset(), part.high_watermark());
    assert!(part.is_aborted(old.id, 0));
    assert_eq!(
        node.txns.add_partitions("app", old, tp("t")).await.err(),
        Some(ResponseError::ProducerFenced)
    );
    assert_eq!(
        node.txns.end_txn("app", old, true).await,
        Err(ResponseError::ProducerFenced)
    );
    // The partition refuses the old epoch too.
    let mut b = BatchBuilder::new(now_ms()).with_producer(ProducerFields {
        producer_id: old.id,
        producer_epoch: old.epoch,
        base_sequence: 1,
        transactional: true,
    });
    b.push(None, Some(b"late"), &[], now_ms());
    assert!(part.append(&b.finish(Compression::None)).is_err());
}

#[tokio::test]
async fn a_restart_aborts_open_transactions_and_completes_prepared_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (open_p, committed_p) = {
        let node = open(dir.path()).await;
        node.log
            .create_topic("t", 1, -1, Default::default())
            .unwrap();
        let a = node
            .txns
            .init_producer_id(Some("open"), 60_000, None)
            .await
            .unwrap();
        node.txns.add_partitions("open", a, tp("t")).await.unwrap();
        write(&node.log, "t", a, 0, &["x"]);

        // A commit interrupted after PrepareCommit was recorded, before any marker.
        let b = node
            .txns
            .init_producer_id(Some("prepared"), 60_000, None)
            .await
            .unwrap();
        node.txns
            .add_partitions("prepared", b, tp("t"))
            .await
            .unwrap();
        write(&node.log, "t", b, 0, &["y"]);
        let mut inner = node.txns.inner.lock().await;
        let mut meta = inner.txns["prepared"].clone();
        meta.state = TxnState::PrepareCommit;
        node.txns
            .persist(&mut inner, "prepared", meta)
            .await
            .unwrap();
        (a, b)
        // Dropped without a checkpoint: as after kill -9.
    };
    let node = open(dir.path()).await;
    let part = node.log.partition("t", 0).unwrap();
    assert_eq!(part.last_stable_offset(), part.high_watermark());
    assert!(part.is_aborted(open_p.id, 0));
    assert!(!part.is_aborted(committed_p.id, 1));
    let open_meta = node.txns.describe("open").await.unwrap().unwrap();
    assert_eq!(open_meta.state, TxnState::CompleteAbort);
    assert!(open_meta.producer_epoch > open_p.epoch);
    assert_eq!(
        node.txns.describe("prepared").await.unwrap().unwrap().state,
        TxnState::CompleteCommit
    );
}

#[tokio::test]
async fn offsets_committed_in_a_transaction_appear_only_with_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    node.log
        .create_topic("in", 1, -1, Default::default())
        .unwrap();
    let offsets = |offset: i64| {
        vec![(
            ("in".to_string(), 0),
            crate::group::CommittedOffset {
                offset,
                leader_epoch: -1,
                metadata: String::new(),
                commit_timestamp: now_ms(),
            },
        )]
    };
    for (commit, expected) in [(false, None), (true, Some(7))] {
        let p = node
            .txns
            .init_producer_id(Some("ctp"), 60_000, None)
            .await
            .unwrap();
        node.txns.add_offsets("ctp", p, "g").await.unwrap();
        node.groups
            .txn_commit("g", p.id, p.epoch, "", None, -1, offsets(7), |_, _| true)
            .unwrap();
        assert!(node.groups.has_pending_txn_offset("g", "in", 0));
        assert_eq!(current(&node.groups), None);
        node.txns.end_txn("ctp", p, commit).await.unwrap();
        assert!(!node.groups.has_pending_txn_offset("g", "in", 0));
        assert_eq!(current(&node.groups), expected);
    }
    drop(node);
    // Replayed from __consumer_offsets after a restart.
    let node = open(dir.path()).await;
    assert_eq!(current(&node.groups), Some(7));
}

fn current(groups: &GroupCoordinator) -> Option<i64> {
    groups
        .fetch_offsets("g", Some(vec![("in".to_string(), 0)]))
        .into_iter()
        .next()
        .and_then(|(_, o)| o.map(|o| o.offset))
}

#[tokio::test]
async fn timed_out_transactions_are_aborted_and_their_producer_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    node.log
        .create_topic("t", 1, -1, Default::default())
        .unwrap();
    let p = node
        .txns
        .init_producer_id(Some("slow"), 1_000, None)
        .await
        .unwrap();
    node.txns.add_partitions("slow", p, tp("t")).await.unwrap();
    write(&node.log, "t", p, 0, &["x"]);
    node.txns.tick(now_ms() + 5_000).await;
    let meta = node.txns.describe("slow").await.unwrap().unwrap();
    assert_eq!(meta.state, TxnState::CompleteAbort);
    assert_eq!(
        node.txns.end_txn("slow", p, true).await,
        Err(ResponseError::ProducerFenced)
    );
    // KIP-360: the producer may come back with its old epoch and carry on.
    let again = node
        .txns
        .init_producer_id(Some("slow"), 1_000, Some(p))
        .await
        .unwrap();
    assert!(again.epoch > meta.producer_epoch);
    // A stranger with a made-up epoch may not.
    let stranger = ProducerRef {
        id: p.id,
        epoch: p.epoch + 40,
    };
    assert_eq!(
        node.txns
            .init_producer_id(Some("slow"), 1_000, Some(stranger))
            .await
            .err(),
        Some(ResponseError::ProducerFenced)
    );
}

/// A cluster as the coordinator sees it, on one log: markers land only while `reachable`,
/// the coordinator's state reaches its in-sync replicas only while `replicating`, and
/// producer ids are reserved only while the `metadata` quorum answers.
struct OneLogCluster {
    log: Arc<LogManager>,
    reachable: AtomicBool,
    replicating: AtomicBool,
    metadata: AtomicBool,
    next_producer_id: std::sync::atomic::AtomicI64,
}

impl OneLogCluster {
    /// Makes the node's coordinator part of a cluster (inactive until `set_active`).
    fn join(node: &Node) -> Arc<Self> {
        let link = Arc::new(OneLogCluster {
            log: node.log.clone(),
            reachable: AtomicBool::new(true),
            replicating: AtomicBool::new(true),
            metadata: AtomicBool::new(true),
            next_producer_id: 5000.into(),
        });
        node.txns.join_cluster(link.clone());
        link
    }
}

#[async_trait::async_trait]
impl ClusterLink for OneLogCluster {
    async fn reserve_producer_ids(&self, size: i64) -> Result<(i64, i64), ResponseError> {
        if !self.metadata.load(Ordering::Acquire) {
            return Err(ResponseError::RequestTimedOut);
        }
        let start = self.next_producer_id.fetch_add(size, Ordering::AcqRel);
        Ok((start, start + size))
    }

    fn partition_exists(&self, topic: &str, partition: i32) -> bool {
        self.log.partition(topic, partition).is_some()
    }

    async fn write_marker(
        &self,
        topic: &str,
        partition: i32,
        m: Marker,
    ) -> Result<(), ResponseError> {
        if !self.reachable.load(Ordering::Acquire) {
            return Err(ResponseError::NotLeaderOrFollower);
        }
        let p = self.log.partition(topic, partition).unwrap();
        p.append_marker(m.producer_id, m.producer_epoch, m.commit, 0)
            .unwrap();
        Ok(())
    }

    async fn state_replicated(&self) -> Result<(), ResponseError> {
        if !self.replicating.load(Ordering::Acquire) {
            return Err(ResponseError::NotEnoughReplicas);
        }
        Ok(())
    }

    async fn partition_producers(&self) -> Vec<(String, i32, ActiveProducer)> {
        let mut open = Vec::new();
        for t in self.log.topics() {
            for p in &t.partitions {
                for producer in p.active_producers() {
                    open.push((t.name.to_string(), p.id, producer));
                }
            }
        }
        open
    }
}

async fn state_of(txns: &TxnCoordinator, id: &str) -> TxnState {
    txns.describe(id).await.unwrap().unwrap().state
}

#[tokio::test]
async fn in_a_cluster_a_decided_transaction_ends_once_its_markers_land() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    node.log
        .create_topic("t", 1, -1, Default::default())
        .unwrap();
    let part = node.log.partition("t", 0).unwrap();
    let link = OneLogCluster::join(&node);

    // Until this node leads __transaction_state it coordinates nothing, but any node hands
    // out idempotent producer ids, from the cluster's blocks.
    assert_eq!(
        node.txns
            .init_producer_id(Some("app"), 60_000, None)
            .await
            .err(),
        Some(ResponseError::NotCoordinator)
    );
    let idempotent = node.txns.init_producer_id(None, 0, None).await.unwrap();
    assert_eq!(idempotent.id, 5000);
    node.txns.set_active(true).await.unwrap();

    let p = app_producer(&node).await;
    node.txns.add_partitions("app", p, tp("t")).await.unwrap();
    write(&node.log, "t", p, 0, &["a", "b"]);
    link.reachable.store(false, Ordering::Release);
    // The decision is recorded: EndTxn succeeds though the marker cannot be written yet, and
    // the next transaction waits for it.
    node.txns.end_txn("app", p, true).await.unwrap();
    assert_eq!(state_of(&node.txns, "app").await, TxnState::PrepareCommit);
    assert_eq!(part.last_stable_offset(), 0);
    assert_eq!(
        node.txns.add_partitions("app", p, tp("t")).await,
        Err(ResponseError::ConcurrentTransactions)
    );
    assert_eq!(
        node.txns
            .init_producer_id(Some("app"), 60_000, Some(p))
            .await
            .err(),
        Some(ResponseError::ConcurrentTransactions)
    );

    // The timers finish it once the partition's leader answers.
    link.reachable.store(true, Ordering::Release);
    node.txns.tick(now_ms()).await;
    assert_eq!(state_of(&node.txns, "app").await, TxnState::CompleteCommit);
    assert_eq!(part.last_stable_offset(), 3);

    // Handing over and taking back replays the state from __transaction_state.
    node.txns.set_active(false).await.unwrap();
    assert_eq!(
        node.txns.describe("app").await,
        Err(ResponseError::NotCoordinator)
    );
    node.txns.set_active(true).await.unwrap();
    assert_eq!(state_of(&node.txns, "app").await, TxnState::CompleteCommit);
}

#[tokio::test]
async fn hanging_transactions_are_aborted_and_held_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    node.log
        .create_topic("t", 1, -1, Default::default())
        .unwrap();
    node.log
        .create_topic("u", 1, -1, Default::default())
        .unwrap();
    let part = node.log.partition("t", 0).unwrap();
    let held = node
        .txns
        .init_producer_id(Some("held"), 60_000, None)
        .await
        .unwrap();
    node.txns
        .add_partitions("held", held, tp("t"))
        .await
        .unwrap();
    write(&node.log, "t", held, 0, &["a"]);
    // A write no coordinator knows of (its record lost): it holds the stable offset.
    let lost = ProducerRef { id: 77, epoch: 3 };
    write(&node.log, "t", lost, 0, &["b", "c"]);
    write(&node.log, "u", lost, 0, &["d"]);
    assert_eq!(part.last_stable_offset(), 0);

    // Not silent for the longest transaction timeout yet: left alone.
    assert_eq!(node.txns.abort_hanging_transactions(now_ms()).await, 0);
    // Later: the two writes of the lost transaction are aborted, the held one is not.
    let later = now_ms() + TxnSettings::default().max_timeout_ms as i64 + 1;
    assert_eq!(node.txns.abort_hanging_transactions(later).await, 2);
    assert_eq!(part.open_transactions(), vec![(held.id, held.epoch, 0)]);
    assert!(part.is_aborted(lost.id, 1));
    assert!(node
        .log
        .partition("u", 0)
        .unwrap()
        .open_transactions()
        .is_empty());
    // The held transaction commits as usual.
    node.txns.end_txn("held", held, true).await.unwrap();
    assert_eq!(part.last_stable_offset(), part.high_watermark());
    assert!(!part.is_aborted(held.id, 0));

    // The same on a cluster, where the leaders are asked for their open transactions.
    let lost = ProducerRef { id: 78, epoch: 0 };
    write(&node.log, "t", lost, 0, &["e"]);
    OneLogCluster::join(&node);
    node.txns.set_active(true).await.unwrap();
    let later = now_ms() + TxnSettings::default().max_timeout_ms as i64 + 1;
    assert_eq!(node.txns.abort_hanging_transactions(later).await, 1);
    assert!(part.open_transactions().is_empty());
}

#[tokio::test]
async fn a_state_write_that_fails_is_answered_with_an_error_clients_retry() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    let link = OneLogCluster::join(&node);
    node.txns.set_active(true).await.unwrap();
    let p = app_producer(&node).await;

    // While __transaction_state cannot reach its in-sync replicas, the client is told to find
    // the coordinator and retry (as Kafka tells it), not NOT_ENOUGH_REPLICAS, which librdkafka
    // takes as the end of the transaction; and nothing changes meanwhile.
    link.replicating.store(false, Ordering::Release);
    assert_eq!(
        node.txns.add_offsets("app", p, "g").await,
        Err(ResponseError::CoordinatorNotAvailable)
    );
    assert_eq!(state_of(&node.txns, "app").await, TxnState::Empty);
    link.replicating.store(true, Ordering::Release);
    node.txns.add_offsets("app", p, "g").await.unwrap();
    assert_eq!(state_of(&node.txns, "app").await, TxnState::Ongoing);
    node.txns.end_txn("app", p, false).await.unwrap();
    assert_eq!(state_of(&node.txns, "app").await, TxnState::CompleteAbort);
}

#[tokio::test]
async fn a_node_whose_metadata_stalls_hands_out_ids_from_its_spare_block() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    let link = OneLogCluster::join(&node);
    let idempotent = || async { node.txns.init_producer_id(None, 0, None).await };
    let mut handed_out = BTreeSet::from([idempotent().await.unwrap().id]);
    // The block after the one in use is reserved in the background.
    let reserved = || link.next_producer_id.load(Ordering::Acquire);
    for _ in 0..100 {
        if reserved() == 5000 + 2 * ID_BLOCK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(reserved(), 5000 + 2 * ID_BLOCK);

    // The quorum stops answering: both blocks are still handed out, each id once.
    link.metadata.store(false, Ordering::Release);
    for _ in 1..2 * ID_BLOCK {
        assert!(handed_out.insert(idempotent().await.unwrap().id));
    }
    assert_eq!(handed_out, (5000..5000 + 2 * ID_BLOCK).collect());
    assert_eq!(
        idempotent().await.err(),
        Some(ResponseError::RequestTimedOut)
    );
    link.metadata.store(true, Ordering::Release);
    let next = idempotent().await.unwrap().id;
    assert!(next >= 5000 + 2 * ID_BLOCK && !handed_out.contains(&next));
}
