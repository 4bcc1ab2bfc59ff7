//! HTTP connectors: a sink that POSTs batches (NDJSON or a JSON array) with retries and an
//! Idempotency-Key per batch, and a source that polls a URL with a cursor.
//!
//! Both speak http:// and https:// (rustls, the system's CAs plus an optional `ca_file`).
//! docs/connectors/http.md documents both connectors.

mod sink;
mod source;

use std::collections::BTreeMap;
use std::path::Path;
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

/// Parses an http:// or https:// URL.
pub(crate) fn parse_url(url: &str, what: &str) -> Result<reqwest::Url, ConnectorError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| ConnectorError::Fatal(anyhow!("{what}: url {url:?}: {e}")))?;
    match parsed.scheme() {
        "http" | "https" => Ok(parsed),
        other => Err(ConnectorError::Fatal(anyhow!(
            "{what}: url {url}: scheme {other} is neither http nor https"
        ))),
    }
}

/// Makes rustls's ring provider the process default: reqwest's TLS takes the process default,
/// and weir builds rustls with ring only. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An HTTP client; https:// servers are checked against the system's CAs and `ca_file`'s.
pub(crate) fn client(
    timeout: Duration,
    ca_file: Option<&Path>,
    what: &str,
) -> Result<reqwest::Client, ConnectorError> {
    install_crypto_provider();
    let fatal = |m: String| ConnectorError::Fatal(anyhow!("{what}: {m}"));
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none());
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca)
            .map_err(|e| fatal(format!("ca_file: cannot read {}: {e}", ca.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| fatal(format!("ca_file: {} is not PEM: {e}", ca.display())))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|e| fatal(format!("building the HTTP client: {e}")))
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
    fn http_and_https_urls() {
        assert!(parse_url("http://127.0.0.1:8080/x", "t").is_ok());
        assert!(parse_url("https://example.com", "t").is_ok());
        assert!(parse_url("ftp://example.com", "t").is_err());
        assert!(parse_url("not a url", "t").is_err());
    }
}
