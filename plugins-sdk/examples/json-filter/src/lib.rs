//! Keep the JSON records whose field matches a rule.
//!
//! Config:
//! - `field` (required): the field to test, as a dotted path (`user.country`) or a JSON Pointer.
//! - `equals`: keep records whose field equals this JSON value. A number or boolean also
//!   matches the same value written as text, so `--config equals=200` keeps `"status": "200"` too.
//! - `one_of`: keep records whose field equals one of these values (a list, or `a,b,c`).
//! - neither: keep records that have the field at all.
//! - `negate` (default false): keep the records that do *not* match instead.
//!
//! A value that is not JSON goes to the dead letters.

use weir_plugin_sdk::json::{pointer, scalar_text};
use weir_plugin_sdk::serde_json::Value;
use weir_plugin_sdk::{bail, Config, Error, Record, State};

enum Test {
    Exists,
    OneOf(Vec<Value>),
}

struct Rule {
    pointer: String,
    test: Test,
    negate: bool,
}

static RULE: State<Rule> = State::new();

fn rule_from(config: &Config) -> Result<Rule, Error> {
    let field = config.require_str("field")?;
    let test = match (config.get("equals"), config.get("one_of")) {
        (Some(_), Some(_)) => bail!("give either `equals` or `one_of`, not both"),
        (Some(v), None) => Test::OneOf(vec![v.clone()]),
        (None, Some(Value::Array(vs))) => Test::OneOf(vs.clone()),
        (None, Some(Value::String(_))) => Test::OneOf(
            config
                .string_list("one_of")?
                .unwrap_or_default()
                .into_iter()
                .map(Value::String)
                .collect(),
        ),
        (None, Some(_)) => bail!("`one_of` must be a list of values"),
        (None, None) => Test::Exists,
    };
    Ok(Rule {
        pointer: pointer(field),
        test,
        negate: config.bool("negate")?.unwrap_or(false),
    })
}

fn init(config: &Config) -> Result<(), Error> {
    RULE.set(rule_from(config)?);
    Ok(())
}

fn same(want: &Value, got: &Value) -> bool {
    want == got
        || match (scalar_text(want), scalar_text(got)) {
            (Some(w), Some(g)) => w == g,
            _ => false,
        }
}

fn matches(rule: &Rule, record: &Record) -> Result<bool, Error> {
    let doc = record.value_json()?;
    let hit = match (doc.pointer(&rule.pointer), &rule.test) {
        (None, _) => false,
        (Some(_), Test::Exists) => true,
        (Some(got), Test::OneOf(wants)) => wants.iter().any(|w| same(w, got)),
    };
    Ok(hit != rule.negate)
}

fn keep(record: &Record) -> Result<bool, Error> {
    matches(RULE.get()?, record)
}

weir_plugin_sdk::export_filter!(keep, init = init);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_plugin_sdk::serde_json::json;

    fn rule(config: Value) -> Result<Rule, Error> {
        match config {
            Value::Object(m) => rule_from(&Config::from_map(m)),
            _ => unreachable!(),
        }
    }

    fn kept(rule: &Rule, docs: &[&str]) -> Vec<bool> {
        docs.iter()
            .map(|d| matches(rule, &Record::new(*d)).unwrap())
            .collect()
    }

    #[test]
    fn equals_matches_json_and_text_spellings() {
        let r = rule(json!({"field": "http.status", "equals": 200})).unwrap();
        let docs = [
            r#"{"http":{"status":200}}"#,
            r#"{"http":{"status":"200"}}"#,
            r#"{"http":{"status":404}}"#,
            r#"{"http":{}}"#,
        ];
        assert_eq!(kept(&r, &docs), vec![true, true, false, false]);
        let r = rule(json!({"field": "http.status", "equals": "200", "negate": "true"})).unwrap();
        assert_eq!(kept(&r, &docs), vec![false, false, true, true]);
    }

    #[test]
    fn one_of_and_exists() {
        let r = rule(json!({"field": "/level", "one_of": "warn, error"})).unwrap();
        let docs = [
            r#"{"level":"warn"}"#,
            r#"{"level":"info"}"#,
            r#"{"level":"error"}"#,
        ];
        assert_eq!(kept(&r, &docs), vec![true, false, true]);
        let r = rule(json!({"field": "tags.0"})).unwrap();
        assert_eq!(
            kept(&r, &[r#"{"tags":["a"]}"#, r#"{"tags":[]}"#]),
            vec![true, false]
        );
    }

    #[test]
    fn bad_config_is_refused() {
        assert!(rule(json!({})).is_err());
        assert!(rule(json!({"field": "a", "equals": 1, "one_of": [1]})).is_err());
        assert!(rule(json!({"field": "a", "one_of": 3})).is_err());
    }

    #[test]
    fn non_json_records_are_errors_for_that_record_only() {
        init(&Config::from_json(br#"{"field":"ok","equals":true}"#).unwrap()).unwrap();
        let input = [
            Record::new(r#"{"ok":true}"#),
            Record::new("not json"),
            Record::new(r#"{"ok":false}"#),
        ];
        let out = weir_plugin_sdk::testing::run_filter(keep, &input);
        assert_eq!(weir_plugin_sdk::testing::records(&out).len(), 1);
        let errors = weir_plugin_sdk::testing::errors(&out);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, 1);
        assert!(errors[0].1.contains("not JSON"), "{}", errors[0].1);
    }
}
