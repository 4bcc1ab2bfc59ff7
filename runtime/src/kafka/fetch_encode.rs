//! Encodes Fetch responses so that record bytes stay in the segment files: the response becomes
//! a list of pieces, encoded header bytes interleaved with file ranges the server sends with
//! sendfile(2). Everything but the records is taken from the `kafka-protocol` message, and a test
//! checks the output equals the crate's own encoding at every supported version.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::FetchResponse;

use crate::log::partition::FileSlice;

/// Part of an outgoing frame.
#[derive(Debug, Clone)]
pub enum Piece {
    Bytes(Bytes),
    File(FileSlice),
}

impl Piece {
    pub fn byte_len(&self) -> u64 {
        match self {
            Piece::Bytes(b) => b.len() as u64,
            Piece::File(f) => f.len,
        }
    }
}

struct Writer {
    flexible: bool,
    buf: BytesMut,
    pieces: Vec<Piece>,
}

impl Writer {
    fn uvarint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.put_u8((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.put_u8(v as u8);
    }
    fn array_len(&mut self, n: usize) {
        if self.flexible {
            self.uvarint(n as u64 + 1);
        } else {
            self.buf.put_i32(n as i32);
        }
    }
    fn string(&mut self, s: &str) {
        if self.flexible {
            self.uvarint(s.len() as u64 + 1);
        } else {
            self.buf.put_i16(s.len() as i16);
        }
        self.buf.put_slice(s.as_bytes());
    }
    fn no_tags(&mut self) {
        if self.flexible {
            self.buf.put_u8(0);
        }
    }
    /// Kafka never sends null records (librdkafka rejects them): nothing is an empty set.
    fn records(&mut self, slice: Option<&FileSlice>) {
        match slice {
            None => {
                if self.flexible {
                    self.uvarint(1);
                } else {
                    self.buf.put_i32(0);
                }
            }
            Some(f) => {
                if self.flexible {
                    self.uvarint(f.len + 1);
                } else {
                    self.buf.put_i32(f.len as i32);
                }
                if f.len > 0 {
                    let head = self.buf.split().freeze();
                    self.pieces.push(Piece::Bytes(head));
                    self.pieces.push(Piece::File(f.clone()));
                }
            }
        }
    }
}

/// True for the versions this encoder handles (those weir advertises).
pub fn supports(version: i16) -> bool {
    (4..=12).contains(&version)
}

/// Encodes `resp` (whose partitions carry no records) as a size-prefixed frame, taking each
/// partition's records from `slices`, in order of appearance.
pub fn encode(
    correlation_id: i32,
    version: i16,
    resp: &FetchResponse,
    slices: &[Option<FileSlice>],
) -> Vec<Piece> {
    debug_assert!(supports(version));
    let flexible = version >= 12;
    let mut w = Writer {
        flexible,
        buf: BytesMut::with_capacity(256),
        pieces: Vec::with_capacity(1 + 2 * slices.len()),
    };
    w.buf.put_i32(0); // frame length, filled in below
    w.buf.put_i32(correlation_id);
    w.no_tags(); // response header v1 for flexible versions
    w.buf.put_i32(resp.throttle_time_ms);
    if version >= 7 {
        w.buf.put_i16(resp.error_code);
        w.buf.put_i32(resp.session_id);
    }
    let mut next_slice = slices.iter();
    w.array_len(resp.responses.len());
    for topic in &resp.responses {
        w.string(&topic.topic.0);
        w.array_len(topic.partitions.len());
        for p in &topic.partitions {
            w.buf.put_i32(p.partition_index);
            w.buf.put_i16(p.error_code);
            w.buf.put_i64(p.high_watermark);
            w.buf.put_i64(p.last_stable_offset);
            if version >= 5 {
                w.buf.put_i64(p.log_start_offset);
            }
            match &p.aborted_transactions {
                None => {
                    if flexible {
                        w.buf.put_u8(0);
                    } else {
                        w.buf.put_i32(-1);
                    }
                }
                Some(txns) => {
                    w.array_len(txns.len());
                    for t in txns {
                        w.buf.put_i64(t.producer_id.0);
                        w.buf.put_i64(t.first_offset);
                        w.no_tags();
                    }
                }
            }
            if version >= 11 {
                w.buf.put_i32(p.preferred_read_replica.0);
            }
            let slice = next_slice.next().and_then(|s| s.as_ref());
            w.records(slice);
            w.no_tags();
        }
        w.no_tags();
    }
    w.no_tags();
    let tail = w.buf.split().freeze();
    w.pieces.push(Piece::Bytes(tail));
    let total: u64 = w.pieces.iter().map(Piece::byte_len).sum::<u64>() - 4;
    // The first piece always holds the length prefix.
    if let Some(Piece::Bytes(first)) = w.pieces.first_mut() {
        let mut b = BytesMut::from(&first[..]);
        b[0..4].copy_from_slice(&(total as i32).to_be_bytes());
        *first = b.freeze();
    }
    w.pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::fetch_response::{
        AbortedTransaction, FetchableTopicResponse, PartitionData,
    };
    use kafka_protocol::messages::{ProducerId, ResponseHeader, TopicName};
    use kafka_protocol::protocol::{Encodable, StrBytes};
    use std::io::Write;
    use std::sync::Arc;

    #[test]
    fn matches_the_crate_encoding_at_every_version() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"0123456789abcdefghij").unwrap();
        let file = Arc::new(file);
        let slices = vec![
            Some(FileSlice {
                file: file.clone(),
                pos: 3,
                len: 10,
            }),
            None,
            Some(FileSlice {
                file: file.clone(),
                pos: 0,
                len: 0,
            }),
            Some(FileSlice {
                file: file.clone(),
                pos: 15,
                len: 5,
            }),
        ];
        for version in 4..=12i16 {
            let partitions =
                |with_records: bool, range: std::ops::Range<usize>| -> Vec<PartitionData> {
                    range
                        .map(|i| {
                            let mut p = PartitionData::default()
                                .with_partition_index(i as i32)
                                .with_error_code(if i == 1 { 1 } else { 0 })
                                .with_high_watermark(100 + i as i64)
                                .with_last_stable_offset(90 + i as i64)
                                .with_log_start_offset(if version >= 5 { 3 } else { -1 })
                                .with_aborted_transactions(if i == 0 {
                                    None
                                } else {
                                    Some(vec![AbortedTransaction::default()
                                        .with_producer_id(ProducerId(7))
                                        .with_first_offset(11)])
                                });
                            if version >= 11 {
                                p.preferred_read_replica = kafka_protocol::messages::BrokerId(-1);
                            }
                            if with_records {
                                p.records = Some(
                                    slices[i]
                                        .as_ref()
                                        .map_or_else(Bytes::new, |s| s.read_bytes().unwrap()),
                                );
                            }
                            p
                        })
                        .collect()
                };
            let response = |with_records: bool| {
                FetchResponse::default()
                    .with_throttle_time_ms(5)
                    .with_session_id(0)
                    .with_responses(vec![
                        FetchableTopicResponse::default()
                            .with_topic(TopicName(StrBytes::from_static_str("alpha")))
                            .with_partitions(partitions(with_records, 0..2)),
                        FetchableTopicResponse::default()
                            .with_topic(TopicName(StrBytes::from_static_str("beta")))
                            .with_partitions(partitions(with_records, 2..4)),
                    ])
            };
            let mut expected = BytesMut::new();
            expected.put_i32(0);
            ResponseHeader::default()
                .with_correlation_id(42)
                .encode(&mut expected, if version >= 12 { 1 } else { 0 })
                .unwrap();
            response(true).encode(&mut expected, version).unwrap();
            let n = expected.len() as i32 - 4;
            expected[0..4].copy_from_slice(&n.to_be_bytes());

            let mut ours = Vec::new();
            for piece in encode(42, version, &response(false), &slices) {
                match piece {
                    Piece::Bytes(b) => ours.extend_from_slice(&b),
                    Piece::File(f) => ours.extend_from_slice(&f.read_bytes().unwrap()),
                }
            }
            assert_eq!(ours, expected.to_vec(), "fetch response v{version}");
        }
    }
}
