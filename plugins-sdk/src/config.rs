//! The `config:` map a pipeline gives a plugin, handed to its `init` function.

use serde_json::{Map, Value};

use crate::Error;

/// The plugin's configuration: a JSON object. In a pipeline file it is the transform's
/// `config:` map; `weir plugin test --config k=v` builds one from the command line, where a
/// value that parses as JSON is taken as JSON (`n=3`, `tags=["a","b"]`) and anything else as a
/// string. The typed getters accept both spellings where that is unambiguous (a list given as
/// `a,b,c`, a number or boolean given as a string).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    map: Map<String, Value>,
}

impl Config {
    /// Parse the JSON text the host passes to `init`: an object (or empty input, or `null`).
    pub fn from_json(bytes: &[u8]) -> Result<Config, Error> {
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(Config::default());
        }
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(map)) => Ok(Config { map }),
            Ok(Value::Null) => Ok(Config::default()),
            Ok(other) => Err(Error::new(format!(
                "the plugin config must be a JSON object, got {}",
                kind_of(&other)
            ))),
            Err(e) => Err(Error::new(format!(
                "the plugin config is not valid JSON: {e}"
            ))),
        }
    }

    pub fn from_map(map: Map<String, Value>) -> Config {
        Config { map }
    }

    pub fn as_map(&self) -> &Map<String, Value> {
        &self.map
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    /// A string setting; an error when it is present but not a string.
    pub fn str(&self, key: &str) -> Result<Option<&str>, Error> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(wrong_type(key, "a string", other)),
        }
    }

    /// A string setting that must be there.
    pub fn require_str(&self, key: &str) -> Result<&str, Error> {
        self.str(key)?
            .ok_or_else(|| Error::new(format!("the plugin config needs `{key}` (a string)")))
    }

    /// A boolean setting: `true`/`false`, or the strings "true"/"false".
    pub fn bool(&self, key: &str) -> Result<Option<bool>, Error> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if s == "true" => Ok(Some(true)),
            Some(Value::String(s)) if s == "false" => Ok(Some(false)),
            Some(other) => Err(wrong_type(key, "true or false", other)),
        }
    }

    /// An integer setting: a JSON integer or a string holding one.
    pub fn i64(&self, key: &str) -> Result<Option<i64>, Error> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) if n.as_i64().is_some() => Ok(n.as_i64()),
            Some(Value::String(s)) if s.trim().parse::<i64>().is_ok() => Ok(s.trim().parse().ok()),
            Some(other) => Err(wrong_type(key, "an integer", other)),
        }
    }

    /// A list of strings: a JSON array of strings, or one string of comma-separated items.
    pub fn string_list(&self, key: &str) -> Result<Option<Vec<String>>, Error> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(
                s.split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect(),
            )),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(wrong_type(key, "a list of strings", other)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(other) => Err(wrong_type(key, "a list of strings", other)),
        }
    }

    /// A JSON object setting (a lookup table, say). A string holding a JSON object is parsed.
    pub fn object(&self, key: &str) -> Result<Option<Map<String, Value>>, Error> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m.clone())),
            Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                Ok(Value::Object(m)) => Ok(Some(m)),
                _ => Err(Error::new(format!(
                    "the plugin config `{key}` must be a JSON object"
                ))),
            },
            Some(other) => Err(wrong_type(key, "a JSON object", other)),
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(key: &str, want: &str, got: &Value) -> Error {
    Error::new(format!(
        "the plugin config `{key}` must be {want}, got {}",
        kind_of(got)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getters_accept_json_and_string_spellings() {
        let c = Config::from_json(
            br#"{"a":"x","n":"42","m":7,"b":"true","l":"p, q,,r","j":["s","t"],"o":"{\"k\":1}"}"#,
        )
        .unwrap();
        assert_eq!(c.str("a").unwrap(), Some("x"));
        assert_eq!(c.i64("n").unwrap(), Some(42));
        assert_eq!(c.i64("m").unwrap(), Some(7));
        assert_eq!(c.bool("b").unwrap(), Some(true));
        assert_eq!(
            c.string_list("l").unwrap().unwrap(),
            vec!["p".to_string(), "q".into(), "r".into()]
        );
        assert_eq!(c.string_list("j").unwrap().unwrap().len(), 2);
        assert_eq!(c.object("o").unwrap().unwrap()["k"], 1);
        assert_eq!(c.str("missing").unwrap(), None);
    }

    #[test]
    fn wrong_types_and_bad_json_are_errors() {
        let c = Config::from_json(br#"{"a":1}"#).unwrap();
        assert!(c
            .str("a")
            .unwrap_err()
            .message()
            .contains("must be a string"));
        assert!(c
            .require_str("zz")
            .unwrap_err()
            .message()
            .contains("needs `zz`"));
        assert!(Config::from_json(b"[1]").is_err());
        assert!(Config::from_json(b"{").is_err());
        assert!(Config::from_json(b"  ").unwrap().is_empty());
    }
}
