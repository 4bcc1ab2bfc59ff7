//! HTTP connectors: a sink that POSTs batches (NDJSON or a JSON array) with retries and an
//! Idempotency-Key per batch, and a source that polls a URL with a cursor.
//!
//! This build speaks plain HTTP only (no TLS): `https://` URLs are refused with a clear error.
//! docs/connectors/http.md documents both connectors.

mod sink;
mod source;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use anyhow::anyhow;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::ConnectorError;

pub use sink::{HttpFormat, HttpSink, HttpSinkConfig};
pub use source::{HttpPollSource, HttpPollSourceConfig};

/// Exponential backoff with full jitter: attempt n waits a uniformly random time in
/// [0, min(max, initial * 2^n)].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub(crate) fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt).as_millis() as u64;
        Duration::from_millis(fastrand::u64(0..=ceiling))
    }
}

/// Retry-After as delay-seconds or an HTTP date.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Configured headers as a header map.
pub(crate) fn header_map(
    headers: &BTreeMap<String, String>,
    what: &str,
) -> Result<HeaderMap, ConnectorError> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        let n = HeaderName::from_bytes(name.as_bytes()).map_err(|e| {
            ConnectorError::Fatal(anyhow!("{what}: headers: bad header name {name:?}: {e}"))
        })?;
        let v = HeaderValue::from_str(value).map_err(|e| {
            ConnectorError::Fatal(anyhow!("{what}: headers: bad value for {name}: {e}"))
        })?;
        map.insert(n, v);
    }
    Ok(map)
}

/// Parses an http:// URL (this build has no TLS).
pub(crate) fn parse_url(url: &str, what: &str) -> Result<reqwest::Url, ConnectorError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ConnectorError::Fatal(anyhow!("{what}: url {url:?}: {e}")))?;
    match parsed.scheme() {
        "http" => Ok(parsed),
        "https" => Err(ConnectorError::Fatal(anyhow!(
            "{what}: url {url}: https is not supported by this build of weir (no TLS); use \
             http:// or a TLS-terminating proxy"
        ))),
        other => Err(ConnectorError::Fatal(anyhow!(
            "{what}: url {url}: scheme {other} is not http"
        ))),
    }
}

pub(crate) fn client(timeout: Duration, what: &str) -> Result<reqwest::Client, ConnectorError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| ConnectorError::Fatal(anyhow!("{what}: building the HTTP client: {e}")))
}

/// The start of a response body, for messages.
pub(crate) fn snippet(body: &str) -> String {
    let body = body.trim();
    match body.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &body[..cut]),
        None => body.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_ceiling_doubles_up_to_the_maximum() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(2), Duration::from_millis(400));
        assert_eq!(b.ceiling(4), Duration::from_secs(1));
        assert_eq!(b.ceiling(200), Duration::from_secs(1));
        for attempt in 0..10 {
            assert!(b.delay(attempt) <= b.ceiling(attempt));
        }
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        let later = SystemTime::now() + Duration::from_secs(120);
        h.insert(
            "retry-after",
            HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn only_http_urls() {
        assert!(parse_url("http://127.0.0.1:8080/x", "t").is_ok());
        let e = parse_url("https://example.com", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no TLS"), "{e}");
        assert!(parse_url("ftp://example.com", "t").is_err());
        assert!(parse_url("not a url", "t").is_err());
    }
}
