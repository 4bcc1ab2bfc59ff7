//! The record a plugin sees and produces.

use crate::Error;

/// One header of a record: a UTF-8 name and an optional byte value (Kafka allows null values).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Option<Vec<u8>>,
}

/// A record: key, value, headers and timestamp, plus where it came from when it was read from
/// a topic. Key and value are bytes; `None` is Kafka's null (absent), distinct from empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<Header>,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// The topic the record was read from, if it came from a topic.
    pub topic: Option<String>,
    /// The partition the record was read from, if it came from a topic.
    pub partition: Option<i32>,
    /// The offset of the record in its partition, if it came from a topic.
    pub offset: Option<i64>,
}

impl Record {
    /// A record with this value, no key, no headers and timestamp 0.
    pub fn new(value: impl Into<Vec<u8>>) -> Record {
        Record {
            key: None,
            value: Some(value.into()),
            headers: Vec::new(),
            timestamp: 0,
            topic: None,
            partition: None,
            offset: None,
        }
    }

    /// The same record with another key.
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Record {
        self.key = Some(key.into());
        self
    }

    /// The same record with another value.
    pub fn with_value(mut self, value: impl Into<Vec<u8>>) -> Record {
        self.value = Some(value.into());
        self
    }

    /// The same record with another timestamp.
    pub fn with_timestamp(mut self, timestamp_ms: i64) -> Record {
        self.timestamp = timestamp_ms;
        self
    }

    /// The same record with one more header (replacing any header of the same name).
    pub fn with_header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Record {
        self.set_header(name, value);
        self
    }

    /// The value as bytes (empty when the value is null).
    pub fn value_bytes(&self) -> &[u8] {
        self.value.as_deref().unwrap_or(&[])
    }

    /// The key as bytes (empty when the key is null).
    pub fn key_bytes(&self) -> &[u8] {
        self.key.as_deref().unwrap_or(&[])
    }

    /// The value as UTF-8 text; an error when it is null or not UTF-8.
    pub fn value_str(&self) -> Result<&str, Error> {
        match &self.value {
            None => Err(Error::new("the record has no value (null)")),
            Some(v) => std::str::from_utf8(v)
                .map_err(|e| Error::new(format!("the record value is not UTF-8 text: {e}"))),
        }
    }

    /// The key as UTF-8 text, if there is a key and it is UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The value parsed as JSON; an error when it is null or not JSON.
    pub fn value_json(&self) -> Result<serde_json::Value, Error> {
        match &self.value {
            None => Err(Error::new("the record has no value (null)")),
            Some(v) => serde_json::from_slice(v)
                .map_err(|e| Error::new(format!("the record value is not JSON: {e}"))),
        }
    }

    /// Replace the value with the compact JSON text of `value`.
    pub fn set_value_json(&mut self, value: &serde_json::Value) {
        // Serialising a `Value` to a Vec cannot fail: keys are strings and writes are in memory.
        self.value = Some(serde_json::to_vec(value).unwrap_or_default());
    }

    /// The value of the first header named `name` (`Some(None)` for a header with a null value).
    pub fn header(&self, name: &str) -> Option<Option<&[u8]>> {
        self.headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.value.as_deref())
    }

    /// Set a header, replacing every header of the same name.
    pub fn set_header(&mut self, name: &str, value: impl Into<Vec<u8>>) {
        self.headers.retain(|h| h.name != name);
        self.headers.push(Header {
            name: name.to_string(),
            value: Some(value.into()),
        });
    }

    /// Remove every header named `name`.
    pub fn remove_header(&mut self, name: &str) {
        self.headers.retain(|h| h.name != name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_replace_and_remove() {
        let mut r = Record::new("v").with_header("a", "1").with_header("b", "2");
        r.set_header("a", "3");
        assert_eq!(r.header("a"), Some(Some(&b"3"[..])));
        assert_eq!(r.headers.len(), 2);
        r.remove_header("b");
        assert_eq!(r.header("b"), None);
    }

    #[test]
    fn value_accessors_report_null_and_bad_utf8() {
        let mut r = Record::new(vec![0xff, 0xfe]);
        assert!(r.value_str().unwrap_err().message().contains("not UTF-8"));
        r.value = None;
        assert!(r.value_str().unwrap_err().message().contains("null"));
        assert!(r.value_json().is_err());
        r.set_value_json(&serde_json::json!({"a": 1}));
        assert_eq!(r.value_str().unwrap(), r#"{"a":1}"#);
    }
}
