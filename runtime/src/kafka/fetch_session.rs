//! Incremental fetch sessions (KIP-227). A consumer of many partitions opens a session with one
//! full Fetch; afterwards it sends only the partitions whose position changed, and the answer
//! carries only the partitions with records, an error, or a changed watermark. A caught-up
//! consumer of hundreds of partitions then exchanges a few bytes per poll instead of every
//! partition each way.
//!
//! The broker turns an incremental request back into a full one (the session's partitions in
//! the session's order) before reading, so the read path is the same for every fetch; the
//! session only rewrites the request going in and thins the response going out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{FetchRequest, FetchResponse, TopicName};

use crate::log::partition::FileSlice;

/// Session epochs with a meaning of their own (FetchMetadata in Kafka).
const INITIAL_EPOCH: i32 = 0;
const FINAL_EPOCH: i32 = -1;

/// Kafka's max.incremental.fetch.session.cache.slots.
pub const DEFAULT_SLOTS: usize = 1000;

/// A full cache makes room only by evicting a session idle this long, so that a burst of new
/// consumers cannot push out the sessions of busy ones (Kafka's
/// min.incremental.fetch.session.eviction.ms).
const MIN_IDLE_BEFORE_EVICTION: Duration = Duration::from_secs(120);

type Key = (TopicName, i32);

/// A partition of a session: what the client last asked and what it was last told.
struct Cached {
    request: FetchPartition,
    high_watermark: i64,
    last_stable_offset: i64,
    log_start_offset: i64,
}

struct Session {
    /// The epoch the next incremental request must carry.
    next_epoch: i32,
    /// In fetch order; partitions that returned records move to the back, so that a response
    /// filled by the first partitions does not starve the others.
    partitions: IndexMap<Key, Cached>,
    last_used: Instant,
}

/// What one Fetch does with sessions, decided before it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ticket {
    /// No session: a full request answered in full.
    None,
    /// A session opened by this full request; the answer carries all its partitions.
    Opened(i32),
    /// An incremental request of this session: the answer carries only what changed.
    Incremental(i32),
}

/// The broker's fetch sessions, shared by every connection (a client may reconnect and carry
/// on with its session).
pub struct FetchSessions {
    slots: usize,
    inner: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    sessions: HashMap<i32, Session>,
    last_id: i32,
}

impl FetchSessions {
    /// A cache of at most `slots` sessions; 0 turns sessions off (every fetch is a full one).
    pub fn new(slots: usize) -> FetchSessions {
        FetchSessions {
            slots,
            inner: Mutex::new(Cache::default()),
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies the session fields of a Fetch (v7+): closes, opens or updates the session, and
    /// for an incremental request fills `req.topics` with every partition of the session.
    /// An unknown session or a wrong epoch is the error the client answers by starting over.
    pub fn begin(&self, req: &mut FetchRequest) -> Result<Ticket, ResponseError> {
        let mut cache = self.inner.lock().unwrap();
        let now = Instant::now();
        match (req.session_id, req.session_epoch) {
            (0, FINAL_EPOCH) => Ok(Ticket::None),
            (id, FINAL_EPOCH) => {
                cache.sessions.remove(&id);
                Ok(Ticket::None)
            }
            (id, INITIAL_EPOCH) => {
                if id != 0 {
                    cache.sessions.remove(&id);
                }
                if !cache.make_room(self.slots, now) {
                    return Ok(Ticket::None);
                }
                let id = cache.new_id();
                let partitions = each_partition(&req.topics)
                    .map(|(topic, p)| ((topic.clone(), p.partition), Cached::new(p.clone())))
                    .collect();
                cache.sessions.insert(
                    id,
                    Session {
                        next_epoch: 1,
                        partitions,
                        last_used: now,
                    },
                );
                Ok(Ticket::Opened(id))
            }
            (id, epoch) => {
                let Some(session) = cache.sessions.get_mut(&id) else {
                    return Err(ResponseError::FetchSessionIdNotFound);
                };
                if epoch != session.next_epoch {
                    return Err(ResponseError::InvalidFetchSessionEpoch);
                }
                session.next_epoch = epoch.checked_add(1).unwrap_or(1);
                session.last_used = now;
                for forgotten in &req.forgotten_topics_data {
                    for &p in &forgotten.partitions {
                        session
                            .partitions
                            .shift_remove(&(forgotten.topic.clone(), p));
                    }
                }
                for (topic, p) in each_partition(&req.topics) {
                    match session.partitions.get_mut(&(topic.clone(), p.partition)) {
                        Some(c) => c.request = p.clone(),
                        None => {
                            session
                                .partitions
                                .insert((topic.clone(), p.partition), Cached::new(p.clone()));
                        }
                    }
                }
                req.topics = as_topics(&session.partitions);
                Ok(Ticket::Incremental(id))
            }
        }
    }

    /// Records what the response tells the client and, for an incremental fetch, leaves out
    /// the partitions with nothing new (and their slices).
    pub fn finish(
        &self,
        ticket: Ticket,
        mut response: FetchResponse,
        slices: Vec<Option<FileSlice>>,
    ) -> (FetchResponse, Vec<Option<FileSlice>>) {
        let id = match ticket {
            Ticket::None => return (response, slices),
            Ticket::Opened(id) | Ticket::Incremental(id) => id,
        };
        response.session_id = id;
        let mut cache = self.inner.lock().unwrap();
        let Some(session) = cache.sessions.get_mut(&id) else {
            // Evicted or closed meanwhile: the client finds out on its next fetch.
            return (response, slices);
        };
        let incremental = matches!(ticket, Ticket::Incremental(_));
        let mut slices = slices.into_iter();
        let mut kept_slices = Vec::new();
        let mut to_back = Vec::new();
        for topic in &mut response.responses {
            topic.partitions.retain_mut(|pd| {
                let slice = slices.next().flatten();
                let key = (topic.topic.clone(), pd.partition_index);
                let has_records = slice.as_ref().is_some_and(|s| s.len > 0);
                let keep = match session.partitions.get_mut(&key) {
                    Some(c) => {
                        let changed = c.high_watermark != pd.high_watermark
                            || c.last_stable_offset != pd.last_stable_offset
                            || c.log_start_offset != pd.log_start_offset;
                        c.high_watermark = pd.high_watermark;
                        c.last_stable_offset = pd.last_stable_offset;
                        c.log_start_offset = pd.log_start_offset;
                        !incremental || has_records || changed || pd.error_code != 0
                    }
                    None => true,
                };
                if keep {
                    if incremental && has_records {
                        to_back.push(key);
                    }
                    kept_slices.push(slice);
                }
                keep
            });
        }
        response.responses.retain(|t| !t.partitions.is_empty());
        for key in to_back {
            if let Some(c) = session.partitions.shift_remove(&key) {
                session.partitions.insert(key, c);
            }
        }
        (response, kept_slices)
    }
}

impl Cache {
    /// Whether a new session fits, evicting the longest-idle one if it has been idle long
    /// enough.
    fn make_room(&mut self, slots: usize, now: Instant) -> bool {
        if self.sessions.len() < slots {
            return true;
        }
        let idlest = self
            .sessions
            .iter()
            .min_by_key(|(_, s)| s.last_used)
            .map(|(&id, s)| (id, now.duration_since(s.last_used)));
        match idlest {
            Some((id, idle)) if idle >= MIN_IDLE_BEFORE_EVICTION => {
                self.sessions.remove(&id);
                true
            }
            _ => false,
        }
    }

    /// A positive id no live session has.
    fn new_id(&mut self) -> i32 {
        loop {
            self.last_id = if self.last_id >= i32::MAX - 1 {
                1
            } else {
                // Spread ids out so that a restarted broker rarely hands out one a client
                // still remembers.
                self.last_id + 1 + (std::process::id() as i32 & 0xff)
            };
            if !self.sessions.contains_key(&self.last_id) {
                return self.last_id;
            }
        }
    }
}

impl Cached {
    fn new(request: FetchPartition) -> Cached {
        Cached {
            request,
            // Nothing told yet: the first answer counts as a change.
            high_watermark: i64::MIN,
            last_stable_offset: i64::MIN,
            log_start_offset: i64::MIN,
        }
    }
}

fn each_partition(topics: &[FetchTopic]) -> impl Iterator<Item = (&TopicName, &FetchPartition)> {
    topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(move |p| (&t.topic, p)))
}

/// The session's partitions as request topics, consecutive partitions of a topic together.
fn as_topics(partitions: &IndexMap<Key, Cached>) -> Vec<FetchTopic> {
    let mut topics: Vec<FetchTopic> = Vec::new();
    for ((topic, _), c) in partitions {
        match topics.last_mut() {
            Some(t) if &t.topic == topic => t.partitions.push(c.request.clone()),
            _ => topics.push(
                FetchTopic::default()
                    .with_topic(topic.clone())
                    .with_partitions(vec![c.request.clone()]),
            ),
        }
    }
    topics
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::fetch_request::ForgottenTopic;
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
    use kafka_protocol::protocol::StrBytes;
    use std::sync::Arc;

    fn name(t: &str) -> TopicName {
        TopicName(StrBytes::from_string(t.to_string()))
    }

    fn request(id: i32, epoch: i32, parts: &[(&str, i32, i64)]) -> FetchRequest {
        let mut topics: Vec<FetchTopic> = Vec::new();
        for &(t, p, offset) in parts {
            let fp = FetchPartition::default()
                .with_partition(p)
                .with_fetch_offset(offset);
            match topics.last_mut() {
                Some(last) if last.topic.0.as_str() == t => last.partitions.push(fp),
                _ => topics.push(
                    FetchTopic::default()
                        .with_topic(name(t))
                        .with_partitions(vec![fp]),
                ),
            }
        }
        FetchRequest::default()
            .with_session_id(id)
            .with_session_epoch(epoch)
            .with_topics(topics)
    }

    /// What the read path would answer for `req`: every partition, with this high watermark,
    /// and records for the partitions listed in `with_records`.
    fn read(
        req: &FetchRequest,
        hw: i64,
        with_records: &[(&str, i32)],
    ) -> (FetchResponse, Vec<Option<FileSlice>>) {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let mut slices = Vec::new();
        let responses = req
            .topics
            .iter()
            .map(|t| {
                let partitions = t
                    .partitions
                    .iter()
                    .map(|p| {
                        let records = with_records.contains(&(t.topic.0.as_str(), p.partition));
                        slices.push(records.then(|| FileSlice {
                            file: file.clone(),
                            pos: 0,
                            len: 10,
                        }));
                        PartitionData::default()
                            .with_partition_index(p.partition)
                            .with_high_watermark(hw)
                            .with_last_stable_offset(hw)
                    })
                    .collect();
                FetchableTopicResponse::default()
                    .with_topic(t.topic.clone())
                    .with_partitions(partitions)
            })
            .collect();
        (FetchResponse::default().with_responses(responses), slices)
    }

    fn answered(response: &FetchResponse) -> Vec<(String, i32)> {
        response
            .responses
            .iter()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .map(move |p| (t.topic.0.to_string(), p.partition_index))
            })
            .collect()
    }

    fn requested(req: &FetchRequest) -> Vec<(String, i32, i64)> {
        req.topics
            .iter()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .map(move |p| (t.topic.0.to_string(), p.partition, p.fetch_offset))
            })
            .collect()
    }

    #[test]
    fn an_incremental_fetch_answers_only_what_changed() {
        let sessions = FetchSessions::new(10);
        let mut req = request(0, 0, &[("a", 0, 0), ("a", 1, 0), ("b", 0, 0)]);
        let ticket = sessions.begin(&mut req).unwrap();
        let Ticket::Opened(id) = ticket else {
            panic!("no session: {ticket:?}")
        };
        let (resp, slices) = read(&req, 5, &[("a", 0)]);
        let (resp, slices) = sessions.finish(ticket, resp, slices);
        assert_eq!(resp.session_id, id);
        assert_eq!(answered(&resp).len(), 3, "the opening answer is a full one");
        assert_eq!(slices.len(), 3);

        // a-0 moved on to offset 5; the others are as they were.
        let mut req = request(id, 1, &[("a", 0, 5)]);
        let ticket = sessions.begin(&mut req).unwrap();
        assert_eq!(ticket, Ticket::Incremental(id));
        assert_eq!(
            requested(&req),
            [("a".into(), 0, 5), ("a".into(), 1, 0), ("b".into(), 0, 0)],
            "the read covers the whole session"
        );
        // Nothing new anywhere: an empty answer.
        let (resp, slices) = read(&req, 5, &[]);
        let (resp, slices) = sessions.finish(ticket, resp, slices);
        assert!(answered(&resp).is_empty() && slices.is_empty());
        assert_eq!(resp.session_id, id);

        // Records on b-0 and a new high watermark everywhere: all three, b-0 with its slice.
        let mut req = request(id, 2, &[]);
        let ticket = sessions.begin(&mut req).unwrap();
        let (resp, slices) = read(&req, 9, &[("b", 0)]);
        let (resp, slices) = sessions.finish(ticket, resp, slices);
        assert_eq!(answered(&resp).len(), 3);
        assert_eq!(slices.iter().filter(|s| s.is_some()).count(), 1);
        assert!(slices[2].is_some(), "b-0's slice stays with b-0");

        // Records on a-1 only: just a-1; a-1 and b-0 (which had records) moved to the back.
        let mut req = request(id, 3, &[("b", 0, 9)]);
        let ticket = sessions.begin(&mut req).unwrap();
        assert_eq!(
            requested(&req),
            [("a".into(), 0, 5), ("a".into(), 1, 0), ("b".into(), 0, 9)]
        );
        let (resp, slices) = read(&req, 9, &[("a", 1)]);
        let (resp, slices) = sessions.finish(ticket, resp, slices);
        assert_eq!(answered(&resp), [("a".to_string(), 1)]);
        assert_eq!(slices.len(), 1);
        let mut req = request(id, 4, &[]);
        sessions.begin(&mut req).unwrap();
        assert_eq!(
            requested(&req),
            [("a".into(), 0, 5), ("b".into(), 0, 9), ("a".into(), 1, 0)],
            "a partition that returned records goes to the back"
        );
    }

    #[test]
    fn forgotten_partitions_leave_the_session() {
        let sessions = FetchSessions::new(10);
        let mut req = request(0, 0, &[("a", 0, 0), ("a", 1, 0)]);
        let Ticket::Opened(id) = sessions.begin(&mut req).unwrap() else {
            panic!()
        };
        let mut req = request(id, 1, &[("c", 0, 3)]);
        req.forgotten_topics_data = vec![ForgottenTopic::default()
            .with_topic(name("a"))
            .with_partitions(vec![0])];
        sessions.begin(&mut req).unwrap();
        assert_eq!(requested(&req), [("a".into(), 1, 0), ("c".into(), 0, 3)]);
    }

    #[test]
    fn unknown_sessions_and_stale_epochs_are_refused() {
        let sessions = FetchSessions::new(10);
        assert_eq!(
            sessions.begin(&mut request(42, 1, &[])),
            Err(ResponseError::FetchSessionIdNotFound)
        );
        let mut req = request(0, 0, &[("a", 0, 0)]);
        let Ticket::Opened(id) = sessions.begin(&mut req).unwrap() else {
            panic!()
        };
        assert_eq!(
            sessions.begin(&mut request(id, 2, &[])),
            Err(ResponseError::InvalidFetchSessionEpoch)
        );
        assert_eq!(
            sessions.begin(&mut request(id, 1, &[])),
            Ok(Ticket::Incremental(id))
        );
        assert_eq!(
            sessions.begin(&mut request(id, 1, &[])),
            Err(ResponseError::InvalidFetchSessionEpoch),
            "an epoch is used once"
        );
        // The final epoch closes the session and fetches without one.
        assert_eq!(
            sessions.begin(&mut request(id, FINAL_EPOCH, &[("a", 0, 0)])),
            Ok(Ticket::None)
        );
        assert!(sessions.is_empty());
        assert_eq!(
            sessions.begin(&mut request(0, FINAL_EPOCH, &[("a", 0, 0)])),
            Ok(Ticket::None)
        );
    }

    #[test]
    fn a_full_cache_opens_no_session_until_one_is_idle() {
        let off = FetchSessions::new(0);
        assert_eq!(
            off.begin(&mut request(0, 0, &[("a", 0, 0)])),
            Ok(Ticket::None)
        );
        let sessions = FetchSessions::new(1);
        let Ticket::Opened(first) = sessions.begin(&mut request(0, 0, &[])).unwrap() else {
            panic!()
        };
        assert_eq!(
            sessions.begin(&mut request(0, 0, &[])),
            Ok(Ticket::None),
            "a busy session is not evicted"
        );
        sessions
            .inner
            .lock()
            .unwrap()
            .sessions
            .get_mut(&first)
            .unwrap()
            .last_used -= MIN_IDLE_BEFORE_EVICTION;
        let Ticket::Opened(second) = sessions.begin(&mut request(0, 0, &[])).unwrap() else {
            panic!()
        };
        assert_ne!(first, second);
        assert_eq!(sessions.len(), 1);
        // Re-opening with its own id replaces a session rather than adding one.
        assert!(matches!(
            sessions.begin(&mut request(second, 0, &[])),
            Ok(Ticket::Opened(_))
        ));
        assert_eq!(sessions.len(), 1);
    }
}
