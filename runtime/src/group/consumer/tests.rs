use super::*;
use proptest::prelude::*;

fn topics(list: &[(&str, i32)]) -> BTreeMap<String, i32> {
    list.iter().map(|(t, n)| (t.to_string(), *n)).collect()
}

fn parts(list: &[(&str, i32)]) -> Partitions {
    list.iter().map(|(t, p)| (t.to_string(), *p)).collect()
}

fn join(id: &str, names: &[&str]) -> Heartbeat {
    Heartbeat {
        member_id: id.into(),
        member_epoch: 0,
        rebalance_timeout_ms: 30_000,
        subscribed_names: Some(names.iter().map(|n| n.to_string()).collect()),
        owned: Some(Partitions::new()),
        ..Default::default()
    }
}

fn beat(id: &str, epoch: i32, owned: &Partitions) -> Heartbeat {
    Heartbeat {
        member_id: id.into(),
        member_epoch: epoch,
        rebalance_timeout_ms: -1,
        owned: Some(owned.clone()),
        ..Default::default()
    }
}

/// A well-behaved client: it owns exactly what the coordinator last gave it.
struct Client {
    id: String,
    epoch: i32,
    owned: Partitions,
}

impl Client {
    fn step(&mut self, g: &mut ConsumerGroup, t: &BTreeMap<String, i32>, now: Instant) {
        let r = ok(g, beat(&self.id, self.epoch, &self.owned), t, now);
        self.epoch = r.member_epoch;
        if let Some(a) = r.assignment {
            self.owned = a;
        }
    }
}

fn settings() -> ConsumerSettings {
    ConsumerSettings::default()
}

fn ok(
    g: &mut ConsumerGroup,
    hb: Heartbeat,
    t: &BTreeMap<String, i32>,
    now: Instant,
) -> HeartbeatReply {
    g.heartbeat(hb, t, &settings(), now).unwrap()
}

fn refused(
    g: &mut ConsumerGroup,
    hb: Heartbeat,
    t: &BTreeMap<String, i32>,
    now: Instant,
) -> Refusal {
    g.heartbeat(hb, t, &settings(), now).unwrap_err()
}

/// No partition is held by two members (assigned or not yet revoked).
fn assert_single_owner(g: &ConsumerGroup) {
    let mut seen = Partitions::new();
    for m in g.members.values() {
        for tp in m.assigned.iter().chain(&m.pending_revocation) {
            assert!(seen.insert(tp.clone()), "{tp:?} held twice");
        }
    }
}

#[test]
fn uniform_spreads_evenly_and_keeps_what_members_had() {
    let subs: BTreeMap<String, BTreeSet<String>> = ["a", "b", "c"]
        .iter()
        .map(|m| (m.to_string(), ["t".to_string()].into()))
        .collect();
    let t = topics(&[("t", 6)]);
    let first = assign_uniform(&subs, &t, &BTreeMap::new());
    assert!(first.values().all(|p| p.len() == 2), "{first:?}");
    let mut more = subs.clone();
    more.insert("d".into(), ["t".to_string()].into());
    let second = assign_uniform(&more, &t, &first);
    let sizes: Vec<usize> = second.values().map(|p| p.len()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 6);
    assert!(sizes.iter().all(|&n| n == 1 || n == 2), "{sizes:?}");
    for m in ["a", "b", "c"] {
        assert!(second[m].is_subset(&first[m]), "{m} moved: {second:?}");
    }
}

#[test]
fn uniform_gives_a_topic_only_to_its_subscribers() {
    let subs: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), ["x".to_string()].into()),
        ("b".to_string(), ["x".to_string(), "y".to_string()].into()),
    ]
    .into();
    let out = assign_uniform(&subs, &topics(&[("x", 2), ("y", 2)]), &BTreeMap::new());
    assert!(out["a"].iter().all(|(t, _)| t == "x"));
    assert_eq!(out["a"].len() + out["b"].len(), 4);
}

#[test]
fn range_takes_consecutive_partitions_per_topic() {
    let subs: BTreeMap<String, BTreeSet<String>> = ["a", "b"]
        .iter()
        .map(|m| (m.to_string(), ["t".to_string()].into()))
        .collect();
    let out = assign_range(&subs, &topics(&[("t", 5)]));
    assert_eq!(out["a"], parts(&[("t", 0), ("t", 1), ("t", 2)]));
    assert_eq!(out["b"], parts(&[("t", 3), ("t", 4)]));
}

#[test]
fn a_second_member_gets_partitions_only_after_the_first_revokes_them() {
    let t = topics(&[("t", 4)]);
    let now = Instant::now();
    let mut g = ConsumerGroup::new(0);
    let a = ok(&mut g, join("a", &["t"]), &t, now);
    assert_eq!(a.member_epoch, 1);
    assert_eq!(g.assignor, "uniform", "the default assignor");
    let a_owned = a.assignment.unwrap();
    assert_eq!(a_owned.len(), 4);

    let b = ok(&mut g, join("b", &["t"]), &t, now);
    assert_eq!(g.epoch, 2);
    assert_eq!(b.member_epoch, 2);
    assert!(b.assignment.unwrap().is_empty(), "a still holds them all");
    assert_eq!(g.members["b"].state, MemberState::UnreleasedPartitions);
    assert_eq!(g.state(), GroupState::Reconciling);
    assert_single_owner(&g);

    // a learns it must give up two partitions; its epoch stays until it does.
    let a2 = ok(&mut g, beat("a", 1, &a_owned), &t, now);
    assert_eq!(a2.member_epoch, 1);
    let a_kept = a2.assignment.unwrap();
    assert_eq!(a_kept.len(), 2);
    assert_eq!(g.members["a"].state, MemberState::UnrevokedPartitions);
    assert_single_owner(&g);

    // b asks again: nothing released yet.
    let b2 = ok(&mut g, beat("b", 2, &Partitions::new()), &t, now);
    assert_eq!(b2.assignment.unwrap_or_default(), Partitions::new());

    // a confirms: it moves to epoch 2, and b gets the two partitions.
    let a3 = ok(&mut g, beat("a", 1, &a_kept), &t, now);
    assert_eq!(a3.member_epoch, 2);
    let b3 = ok(&mut g, beat("b", 2, &Partitions::new()), &t, now);
    let b_owned = b3.assignment.unwrap();
    assert_eq!(b_owned.len(), 2);
    assert!(b_owned.is_disjoint(&a_kept));
    assert_eq!(g.state(), GroupState::Stable);
    assert_single_owner(&g);
}

#[test]
fn wrong_epochs_are_fenced_but_a_lost_reply_is_forgiven() {
    let t = topics(&[("t", 2)]);
    let now = Instant::now();
    let mut g = ConsumerGroup::new(0);
    let a = ok(&mut g, join("a", &["t"]), &t, now);
    let owned = a.assignment.unwrap();
    let err = refused(&mut g, beat("a", 7, &owned), &t, now);
    assert_eq!(err.error, ResponseError::FencedMemberEpoch);
    // A second member moves the group to epoch 2; a gives up a partition and follows.
    ok(&mut g, join("b", &["t"]), &t, now);
    let a2 = ok(&mut g, beat("a", 1, &owned), &t, now);
    let kept = a2.assignment.unwrap();
    let a3 = ok(&mut g, beat("a", 1, &kept), &t, now);
    assert_eq!(a3.member_epoch, 2);
    // Its reply lost, the member sends epoch 1 again with what it owns: accepted.
    let again = ok(&mut g, beat("a", 1, &kept), &t, now);
    assert_eq!(again.member_epoch, 2);
    let err = refused(&mut g, beat("nobody", 3, &kept), &t, now);
    assert_eq!(err.error, ResponseError::UnknownMemberId);
}

#[test]
fn a_member_that_leaves_or_expires_hands_its_partitions_over() {
    let t = topics(&[("t", 2)]);
    let now = Instant::now();
    let mut g = ConsumerGroup::new(0);
    let mut a = Client {
        id: "a".into(),
        epoch: 0,
        owned: Partitions::new(),
    };
    let r = ok(&mut g, join("a", &["t"]), &t, now);
    a.epoch = r.member_epoch;
    a.owned = r.assignment.unwrap();
    let r = ok(&mut g, join("b", &["t"]), &t, now);
    let mut b = Client {
        id: "b".into(),
        epoch: r.member_epoch,
        owned: r.assignment.unwrap(),
    };
    for _ in 0..3 {
        a.step(&mut g, &t, now);
        b.step(&mut g, &t, now);
    }
    assert_eq!((a.owned.len(), b.owned.len()), (1, 1));
    let leave = Heartbeat {
        member_id: "b".into(),
        member_epoch: -1,
        ..Default::default()
    };
    let left = ok(&mut g, leave, &t, now);
    assert_eq!(left.member_epoch, -1);
    a.step(&mut g, &t, now);
    assert_eq!(a.owned.len(), 2);

    // c joins, then a stops heartbeating: after the session timeout c holds everything.
    let r = ok(&mut g, join("c", &["t"]), &t, now);
    let mut c = Client {
        id: "c".into(),
        epoch: r.member_epoch,
        owned: r.assignment.unwrap(),
    };
    let later = now + settings().session_timeout + Duration::from_millis(1);
    c.step(&mut g, &t, later); // c's session is renewed at `later`
    assert_eq!(g.expire(later), vec!["a".to_string()]);
    c.step(&mut g, &t, later);
    assert_eq!(c.owned.len(), 2);
    assert_eq!(g.state(), GroupState::Stable);
}

#[test]
fn a_regex_subscription_follows_new_topics() {
    let now = Instant::now();
    let mut g = ConsumerGroup::new(0);
    let mut hb = join("a", &[]);
    hb.subscribed_names = None;
    hb.subscribed_regex = Some("orders-.*".into());
    let t1 = topics(&[("orders-eu", 1), ("users", 1)]);
    let r = ok(&mut g, hb, &t1, now);
    assert_eq!(r.assignment.unwrap(), parts(&[("orders-eu", 0)]));
    let epoch = g.epoch;
    let t2 = topics(&[("orders-eu", 1), ("orders-us", 2), ("users", 1)]);
    let r = ok(
        &mut g,
        beat("a", r.member_epoch, &parts(&[("orders-eu", 0)])),
        &t2,
        now,
    );
    assert!(g.epoch > epoch);
    assert_eq!(r.assignment.unwrap().len(), 3);

    let mut bad = join("b", &[]);
    bad.subscribed_regex = Some("(".into());
    let err = refused(&mut g, bad, &t2, now);
    assert_eq!(err.error, ResponseError::InvalidRegularExpression);
}

#[test]
fn unknown_assignors_and_commits_are_refused() {
    let t = topics(&[("t", 1)]);
    let now = Instant::now();
    let mut g = ConsumerGroup::new(0);
    let mut hb = join("a", &["t"]);
    hb.server_assignor = Some("sticky".into());
    assert_eq!(
        refused(&mut g, hb, &t, now).error,
        ResponseError::UnsupportedAssignor
    );
    let mut hb = join("a", &["t"]);
    hb.server_assignor = Some("range".into());
    let r = ok(&mut g, hb, &t, now);
    assert_eq!(g.assignor, "range");
    assert_eq!(g.check_commit("a", r.member_epoch, false), Ok(()));
    assert_eq!(
        g.check_commit("a", r.member_epoch - 1, false),
        Err(ResponseError::StaleMemberEpoch)
    );
    assert_eq!(
        g.check_commit("a", r.member_epoch + 1, false),
        Err(ResponseError::FencedMemberEpoch)
    );
    assert_eq!(
        g.check_commit("a", r.member_epoch - 1, true),
        Err(ResponseError::IllegalGeneration)
    );
    assert_eq!(
        g.check_commit("x", 1, false),
        Err(ResponseError::UnknownMemberId)
    );
}

#[derive(Debug, Clone)]
enum Step {
    Join(usize),
    Leave(usize),
    Beat(usize),
    Partitions(i32),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0usize..4).prop_map(Step::Join),
        (0usize..4).prop_map(Step::Leave),
        (0usize..4).prop_map(Step::Beat),
        (0usize..4).prop_map(Step::Beat),
        (0usize..4).prop_map(Step::Beat),
        (1i32..9).prop_map(Step::Partitions),
    ]
}

proptest! {
    /// Whatever members do, no partition is ever held by two of them; once they all keep
    /// heartbeating, every partition is assigned and the group is stable.
    #[test]
    fn reconciliation_never_gives_a_partition_two_owners(
        steps in proptest::collection::vec(step(), 1..60),
        range in any::<bool>(),
    ) {
        let now = Instant::now();
        let mut g = ConsumerGroup::new(0);
        let mut t = topics(&[("t", 3), ("u", 2)]);
        let mut clients: BTreeMap<usize, Client> = BTreeMap::new();
        for s in steps {
            match s {
                Step::Join(i) => {
                    let id = format!("m{i}");
                    let mut hb = join(&id, &["t", "u"]);
                    if range {
                        hb.server_assignor = Some("range".into());
                    }
                    let r = ok(&mut g, hb, &t, now);
                    clients.insert(i, Client { id, epoch: r.member_epoch, owned: r.assignment.unwrap() });
                }
                Step::Leave(i) => {
                    if let Some(c) = clients.remove(&i) {
                        let hb = Heartbeat { member_id: c.id, member_epoch: -1, ..Default::default() };
                        ok(&mut g, hb, &t, now);
                    }
                }
                Step::Beat(i) => {
                    if let Some(c) = clients.get_mut(&i) {
                        c.step(&mut g, &t, now);
                    }
                }
                Step::Partitions(n) => {
                    let n = n.max(t["t"]); // partitions are only ever added
                    t.insert("t".into(), n);
                }
            }
            assert_single_owner(&g);
            // What a client consumes is what the coordinator thinks it holds, or a part of it.
            for c in clients.values() {
                let m = &g.members[&c.id];
                let held: Partitions = m.assigned.union(&m.pending_revocation).cloned().collect();
                prop_assert!(c.owned.is_subset(&held));
            }
        }
        for _ in 0..4 {
            for c in clients.values_mut() {
                c.step(&mut g, &t, now);
            }
        }
        if !clients.is_empty() {
            prop_assert!(g.is_stable(), "state {:?}", g.state());
            let held: usize = g.members.values().map(|m| m.assigned.len()).sum();
            prop_assert_eq!(held as i32, t["t"] + t["u"]);
        }
    }
}

#[test]
fn a_stored_group_carries_on_where_it_stopped() {
    let t = topics(&[("t", 4)]);
    let now = Instant::now();
    let mut g = ConsumerGroup::new(0);
    let r = ok(&mut g, join("a", &["t"]), &t, now);
    let mut a = Client {
        id: "a".into(),
        epoch: r.member_epoch,
        owned: r.assignment.unwrap(),
    };
    let r = ok(&mut g, join("b", &["t"]), &t, now);
    let mut b = Client {
        id: "b".into(),
        epoch: r.member_epoch,
        owned: r.assignment.unwrap(),
    };
    // a has been told to revoke, b waits: a mid-reconciliation state survives too.
    a.step(&mut g, &t, now);
    assert_eq!(g.members["a"].state, MemberState::UnrevokedPartitions);
    let stored = g.record();
    let json = serde_json::to_string(&stored).unwrap();
    let mut loaded =
        ConsumerGroup::from_record(serde_json::from_str(&json).unwrap(), &settings(), now);
    assert_eq!(loaded.record(), stored);
    for _ in 0..3 {
        a.step(&mut loaded, &t, now);
        b.step(&mut loaded, &t, now);
    }
    assert_eq!((a.owned.len(), b.owned.len()), (2, 2));
    assert!(loaded.is_stable());
    assert_single_owner(&loaded);
}
