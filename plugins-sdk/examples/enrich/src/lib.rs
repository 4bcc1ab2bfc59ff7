//! Add data to JSON records from a lookup table given in the plugin's config.
//!
//! Config:
//! - `field` (required): the field whose value is looked up (dotted path or JSON Pointer); a
//!   number or boolean is looked up by its text (`42`, `true`).
//! - `table` (required): an object from lookup value to the data to add (a JSON object, or a
//!   string holding one, as `--config table='{...}'` gives).
//! - `into`: the field to store the data in (dotted path; objects on the way are created).
//!   Without it, the data (which must then be objects) is merged into the record's top level.
//! - `on_missing`: what to do when the value is not in the table (or the field is absent):
//!   `keep` the record unchanged (default), or `error` (dead letter).
//! - `default`: data to add when the value is not in the table (overrides `on_missing`).
//!
//! A value that is not a JSON object goes to the dead letters.

use weir_plugin_sdk::json::{pointer, scalar_text};
use weir_plugin_sdk::serde_json::{Map, Value};
use weir_plugin_sdk::{bail, Config, Error, Record, State};

struct Enricher {
    field: String,
    table: Map<String, Value>,
    into: Option<Vec<String>>,
    error_on_missing: bool,
    default: Option<Value>,
}

static ENRICHER: State<Enricher> = State::new();

fn enricher_from(config: &Config) -> Result<Enricher, Error> {
    let field = pointer(config.require_str("field")?);
    let Some(table) = config.object("table")? else {
        bail!("the plugin config needs `table` (an object from lookup value to data)");
    };
    let into = config
        .str("into")?
        .map(|p| p.split('.').map(str::to_string).collect::<Vec<_>>());
    if into.is_none() {
        if let Some((k, _)) = table.iter().find(|(_, v)| !v.is_object()) {
            bail!("table entry `{k}` is not an object: set `into` to store non-object data in a field");
        }
    }
    let error_on_missing = match config.str("on_missing")?.unwrap_or("keep") {
        "keep" => false,
        "error" => true,
        other => bail!("`on_missing` must be keep or error, not `{other}`"),
    };
    let default = config.get("default").cloned();
    if into.is_none() && default.as_ref().is_some_and(|d| !d.is_object()) {
        bail!("`default` must be an object when `into` is not set");
    }
    Ok(Enricher {
        field,
        table,
        into,
        error_on_missing,
        default,
    })
}

impl Enricher {
    fn apply(&self, doc: &mut Value) -> Result<(), Error> {
        if !doc.is_object() {
            bail!("the record value is not a JSON object");
        }
        let key = doc.pointer(&self.field).and_then(scalar_text);
        let data = match key.as_deref().and_then(|k| self.table.get(k)) {
            Some(d) => d.clone(),
            None => match &self.default {
                Some(d) => d.clone(),
                None if self.error_on_missing => match key {
                    Some(k) => bail!("`{k}` is not in the lookup table"),
                    None => bail!("the record has no usable value at `{}`", self.field),
                },
                None => return Ok(()),
            },
        };
        match &self.into {
            Some(path) => {
                let mut at = doc;
                for (i, part) in path.iter().enumerate() {
                    let Value::Object(map) = at else {
                        bail!(
                            "cannot store into `{}`: `{}` is not an object",
                            path.join("."),
                            path[..i].join(".")
                        );
                    };
                    if i + 1 == path.len() {
                        map.insert(part.clone(), data);
                        return Ok(());
                    }
                    at = map
                        .entry(part.clone())
                        .or_insert_with(|| Value::Object(Map::new()));
                }
                Ok(())
            }
            None => {
                if let (Value::Object(target), Value::Object(extra)) = (doc, data) {
                    target.extend(extra);
                }
                Ok(())
            }
        }
    }
}

fn init(config: &Config) -> Result<(), Error> {
    ENRICHER.set(enricher_from(config)?);
    Ok(())
}

fn enrich(mut record: Record) -> Result<Record, Error> {
    let mut doc = record.value_json()?;
    ENRICHER.get()?.apply(&mut doc)?;
    record.set_value_json(&doc);
    Ok(record)
}

weir_plugin_sdk::export_map!(enrich, init = init);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_plugin_sdk::serde_json::json;

    fn enricher(config: Value) -> Result<Enricher, Error> {
        match config {
            Value::Object(m) => enricher_from(&Config::from_map(m)),
            _ => unreachable!(),
        }
    }

    fn apply(e: &Enricher, doc: Value) -> Result<Value, Error> {
        let mut doc = doc;
        e.apply(&mut doc).map(|_| doc)
    }

    #[test]
    fn merges_table_objects_into_the_record() {
        let e = enricher(json!({"field": "country", "table": {"FR": {"region": "EU", "vat": 20}}}))
            .unwrap();
        assert_eq!(
            apply(&e, json!({"id": 1, "country": "FR"})).unwrap(),
            json!({"id": 1, "country": "FR", "region": "EU", "vat": 20})
        );
        // not in the table: unchanged
        assert_eq!(
            apply(&e, json!({"country": "XX"})).unwrap(),
            json!({"country": "XX"})
        );
    }

    #[test]
    fn stores_into_a_nested_field_and_looks_up_numbers_by_text() {
        let e = enricher(
            json!({"field": "user.plan", "table": "{\"3\": \"gold\"}", "into": "meta.plan_name"}),
        )
        .unwrap();
        assert_eq!(
            apply(&e, json!({"user": {"plan": 3}})).unwrap(),
            json!({"user": {"plan": 3}, "meta": {"plan_name": "gold"}})
        );
        assert!(apply(&e, json!({"user": {"plan": 3}, "meta": 7})).is_err());
    }

    #[test]
    fn missing_values_default_or_error() {
        let e =
            enricher(json!({"field": "k", "table": {}, "into": "v", "default": "none"})).unwrap();
        assert_eq!(
            apply(&e, json!({"k": "x"})).unwrap(),
            json!({"k": "x", "v": "none"})
        );
        let e = enricher(json!({"field": "k", "table": {}, "on_missing": "error"})).unwrap();
        assert!(apply(&e, json!({"k": "x"}))
            .unwrap_err()
            .message()
            .contains("`x` is not in"));
        assert!(apply(&e, json!({}))
            .unwrap_err()
            .message()
            .contains("no usable value"));
        assert!(apply(&e, json!([1])).is_err());
    }

    #[test]
    fn bad_config_is_refused() {
        assert!(enricher(json!({"field": "k"})).is_err());
        assert!(enricher(json!({"field": "k", "table": {"a": 1}})).is_err());
        assert!(enricher(json!({"field": "k", "table": {}, "on_missing": "drop"})).is_err());
        assert!(enricher(json!({"field": "k", "table": "not json"})).is_err());
    }
}
