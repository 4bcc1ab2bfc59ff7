//! The transforms stage of a pipeline: a batch goes through each WASM plugin in order, one guest
//! call per plugin per batch, without converting records on the way in or out (the plugin host
//! encodes pipeline records directly, and records produced share one copy of the module's
//! output).

use anyhow::{anyhow, Result};
use bytes::Bytes;
use weir_connectors::Record;
use weir_wasm::abi::{EncodeRecord, RecordView};

/// A record rejected by a stage: the record as the stage got it, the stage, the reason.
pub type Rejected = (Record, String, String);

/// What comes out of the last stage, and the records the stages rejected.
pub type Transformed = (Vec<Record>, Vec<Rejected>);

/// One instance per plugin, reused across batches (the host replaces a trapped one).
pub struct Transforms {
    stages: Vec<weir_wasm::Instance>,
    /// Each stage's metrics, in the same order.
    series: Vec<crate::metrics::PluginSeries>,
}

impl Transforms {
    pub fn start(pipeline: &str, plugins: &[weir_wasm::Plugin]) -> Result<Transforms> {
        let mut stages = Vec::with_capacity(plugins.len());
        for (i, p) in plugins.iter().enumerate() {
            let instance = p
                .instance()
                .map_err(|e| anyhow!("transforms[{i}] ({}): {e}", p.name()))?;
            stages.push(instance);
        }
        let metrics = crate::metrics::get();
        let series = stages
            .iter()
            .map(|s| metrics.plugin(pipeline, s.name()))
            .collect();
        Ok(Transforms { stages, series })
    }

    /// How many times a faulted instance was replaced, over all stages.
    pub fn restarts(&self) -> u64 {
        self.stages.iter().map(|s| s.restarts()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// Runs a batch through the stages in order. `origins` is where each record was read, for
    /// topic sources: the topic and (partition, offset) per record; a stage's output records
    /// keep the origin of the input they came from. Returns what comes out of the last stage,
    /// and the records a stage rejected (a plugin error, trap, panic or exhausted budget; the
    /// host isolates them record by record). Err when a plugin cannot run at all any more.
    pub fn run(
        &mut self,
        records: Vec<Record>,
        origins: Option<(&str, &[(i32, i64)])>,
    ) -> Result<Transformed> {
        if self.stages.is_empty() {
            return Ok((records, Vec::new()));
        }
        let topic = origins.map(|(t, _)| t);
        let mut places: Vec<Option<(i32, i64)>> = match origins {
            Some((_, o)) => (0..records.len()).map(|i| o.get(i).copied()).collect(),
            None => vec![None; records.len()],
        };
        let mut batch = records;
        let mut rejected = Vec::new();
        for (i, (stage, series)) in self.stages.iter_mut().zip(&self.series).enumerate() {
            let restarts_before = stage.restarts();
            let fuel_before = stage.fuel_used();
            series.calls.inc();
            series.records_in.inc_by(batch.len() as u64);
            let output = {
                let inputs: Vec<PluginInput<'_>> = batch
                    .iter()
                    .zip(&places)
                    .map(|(record, place)| PluginInput {
                        record,
                        origin: topic.zip(*place),
                    })
                    .collect();
                stage
                    .process(&inputs, produced_record)
                    .map_err(|e| anyhow!("transforms[{i}] ({}): {e}", stage.name()))?
            };
            series.records_out.inc_by(output.records.len() as u64);
            series.restarts.inc_by(stage.restarts() - restarts_before);
            series.fuel.inc_by(stage.fuel_used() - fuel_before);
            for dl in output.dead_letters {
                series.fault(dl.fault.kind.as_str());
                if let Some(r) = batch.get(dl.input_index) {
                    rejected.push((
                        r.clone(),
                        format!("transforms[{i}]"),
                        format!("{} ({})", dl.fault, stage.name()),
                    ));
                }
            }
            places = output
                .records
                .iter()
                .map(|p| places.get(p.input_index).copied().flatten())
                .collect();
            batch = output.records.into_iter().map(|p| p.record).collect();
        }
        Ok((batch, rejected))
    }
}

/// A pipeline record as a plugin sees it, with where it was read from.
struct PluginInput<'a> {
    record: &'a Record,
    origin: Option<(&'a str, (i32, i64))>,
}

impl EncodeRecord for PluginInput<'_> {
    fn timestamp(&self) -> i64 {
        self.record.timestamp
    }
    fn topic(&self) -> Option<&str> {
        self.origin.map(|(t, _)| t)
    }
    fn partition(&self) -> i32 {
        self.origin.map_or(-1, |(_, (p, _))| p)
    }
    fn offset(&self) -> i64 {
        self.origin.map_or(-1, |(_, (_, o))| o)
    }
    fn key(&self) -> Option<&[u8]> {
        self.record.key.as_deref()
    }
    fn value(&self) -> Option<&[u8]> {
        self.record.value.as_deref()
    }
    fn header_count(&self) -> usize {
        self.record.headers.len()
    }
    fn header(&self, i: usize) -> (&str, Option<&[u8]>) {
        let (name, value) = &self.record.headers[i];
        (name, value.as_deref())
    }
}

/// A record a plugin produced, as slices of the call's output. Where the plugin says the record
/// came from is not taken: the origin stays the one of its input.
fn produced_record(output: &Bytes, v: RecordView<'_>) -> Record {
    Record {
        key: v.key.map(|k| output.slice_ref(k)),
        value: v.value.map(|x| output.slice_ref(x)),
        headers: v
            .headers
            .iter()
            .map(|(name, value)| (name.to_string(), value.map(|x| output.slice_ref(x))))
            .collect(),
        timestamp: v.timestamp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn produced_records_share_the_output_and_keep_nulls_apart_from_empties() {
        let input = weir_wasm::Record {
            key: None,
            value: Some(b"v".to_vec()),
            headers: vec![
                weir_wasm::Header {
                    name: "h".into(),
                    value: None,
                },
                weir_wasm::Header {
                    name: "e".into(),
                    value: Some(Vec::new()),
                },
            ],
            timestamp: 5,
            topic: Some("t".into()),
            partition: Some(1),
            offset: Some(2),
        };
        let mut buf = Vec::new();
        weir_wasm::abi::encode_record(&input, &mut buf);
        let output = Bytes::from(buf);
        let mut r = weir_wasm::abi::Reader::new(&output);
        let rec = produced_record(&output, r.record().unwrap());
        assert_eq!(rec.key, None);
        assert_eq!(rec.value.as_deref(), Some(&b"v"[..]));
        assert_eq!(rec.timestamp, 5);
        assert_eq!(
            rec.headers,
            vec![
                ("h".to_string(), None),
                ("e".to_string(), Some(Bytes::new()))
            ]
        );
        let v = rec.value.unwrap();
        let base = output.as_ptr() as usize;
        assert!((base..base + output.len()).contains(&(v.as_ptr() as usize)));
    }

    #[test]
    fn pipeline_records_encode_with_their_origin() {
        let record = Record {
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::from_static(b"value")),
            headers: vec![("h".into(), Some(Bytes::from_static(b"x")))],
            timestamp: 9,
        };
        let input = PluginInput {
            record: &record,
            origin: Some(("orders", (3, 42))),
        };
        let mut buf = Vec::new();
        weir_wasm::abi::encode_batch(std::slice::from_ref(&input), &mut buf);
        let decoded = weir_wasm::abi::decode_batch(&buf).unwrap();
        assert_eq!(decoded.len(), 1);
        let d = &decoded[0];
        assert_eq!(d.topic.as_deref(), Some("orders"));
        assert_eq!((d.partition, d.offset), (Some(3), Some(42)));
        assert_eq!(d.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(d.value.as_deref(), Some(&b"value"[..]));
        assert_eq!(d.header("h"), Some(Some(&b"x"[..])));
        assert_eq!(d.timestamp, 9);
    }
}
