//! Split a JSON array into one record per element (a flat-map).
//!
//! Config:
//! - `field`: where the array is (dotted path or JSON Pointer); default: the whole value.
//! - `index_header` (default `split-index`): header that receives the element's position;
//!   an empty string adds no header.
//!
//! Each output record keeps the input's key, headers and timestamp; its value is the element's
//! JSON text. An empty array produces no record; a value without an array goes to the dead
//! letters.

use weir_plugin_sdk::json::pointer;
use weir_plugin_sdk::serde_json::{self, Value};
use weir_plugin_sdk::{bail, Config, Error, Record, State};

struct Splitter {
    pointer: String,
    index_header: Option<String>,
}

static SPLITTER: State<Splitter> = State::new();

fn splitter_from(config: &Config) -> Result<Splitter, Error> {
    Ok(Splitter {
        pointer: pointer(config.str("field")?.unwrap_or("")),
        index_header: match config.str("index_header")? {
            None => Some("split-index".to_string()),
            Some("") => None,
            Some(h) => Some(h.to_string()),
        },
    })
}

impl Splitter {
    fn split(&self, record: Record) -> Result<Vec<Record>, Error> {
        let doc = record.value_json()?;
        let items = match doc.pointer(&self.pointer) {
            Some(Value::Array(items)) => items,
            Some(_) => bail!(
                "`{}` is not an array",
                if self.pointer.is_empty() {
                    "the value"
                } else {
                    self.pointer.as_str()
                }
            ),
            None => bail!("the record has no field `{}`", self.pointer),
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let mut r = record.clone();
                r.value = Some(serde_json::to_vec(item)?);
                if let Some(h) = &self.index_header {
                    r.set_header(h, i.to_string());
                }
                Ok(r)
            })
            .collect()
    }
}

fn init(config: &Config) -> Result<(), Error> {
    SPLITTER.set(splitter_from(config)?);
    Ok(())
}

fn split(record: Record) -> Result<Vec<Record>, Error> {
    SPLITTER.get()?.split(record)
}

weir_plugin_sdk::export_flat_map!(split, init = init);

#[cfg(test)]
mod tests {
    use super::*;

    fn splitter(config: &str) -> Splitter {
        splitter_from(&Config::from_json(config.as_bytes()).unwrap()).unwrap()
    }

    fn values(out: &[Record]) -> Vec<&str> {
        out.iter().map(|r| r.value_str().unwrap()).collect()
    }

    #[test]
    fn splits_the_whole_value_keeping_key_and_headers() {
        let input = Record::new(r#"[1, {"a": "b"}, "x"]"#)
            .with_key("k")
            .with_header("h", "v");
        let out = splitter("{}").split(input).unwrap();
        assert_eq!(values(&out), vec!["1", r#"{"a":"b"}"#, r#""x""#]);
        assert!(out.iter().all(|r| r.key_str() == Some("k")));
        assert_eq!(out[2].header("split-index"), Some(Some(&b"2"[..])));
        assert_eq!(out[2].header("h"), Some(Some(&b"v"[..])));
    }

    #[test]
    fn splits_a_field_and_handles_empty_and_missing() {
        let s = splitter(r#"{"field": "order.items", "index_header": ""}"#);
        let out = s
            .split(Record::new(
                r#"{"order": {"items": [{"sku": 1}, {"sku": 2}]}}"#,
            ))
            .unwrap();
        assert_eq!(values(&out), vec![r#"{"sku":1}"#, r#"{"sku":2}"#]);
        assert!(out[0].headers.is_empty());
        assert!(s
            .split(Record::new(r#"{"order": {"items": []}}"#))
            .unwrap()
            .is_empty());
        assert!(s
            .split(Record::new(r#"{"order": {}}"#))
            .unwrap_err()
            .message()
            .contains("no field"));
        assert!(s
            .split(Record::new(r#"{"order": {"items": 3}}"#))
            .unwrap_err()
            .message()
            .contains("not an array"));
    }

    #[test]
    fn every_output_names_its_input() {
        init(&Config::default()).unwrap();
        let input = [Record::new("[1,2]"), Record::new("{}"), Record::new("[3]")];
        let out = weir_plugin_sdk::testing::run_flat_map(split, &input);
        let idx: Vec<u32> = out.iter().map(|e| e.input_index).collect();
        assert_eq!(idx, vec![0, 0, 1, 2]);
        assert_eq!(weir_plugin_sdk::testing::errors(&out)[0].0, 1);
    }
}
