//! Command-line tools that talk to a node over the Kafka protocol (and, for pipelines and the
//! cluster status, over its HTTP API).

pub mod acl;
pub mod bench;
pub mod cluster;
pub mod consume;
pub mod group;
pub mod pipeline;
pub mod plugin;
pub mod produce;
pub mod topic;
pub mod txn;
pub mod user;

use anyhow::{bail, Context, Result};
use kafka_protocol::error::ResponseError;

pub use crate::now_ms;

#[derive(clap::Args, Clone)]
pub struct ConnectArgs {
    /// Broker address (host:port)
    #[arg(
        long,
        short = 'b',
        global = true,
        default_value = "127.0.0.1:9092",
        env = "WEIR_BROKERS"
    )]
    pub brokers: String,
}

/// One request to a node's HTTP API at `base`: its JSON answer, or the error it gives.
pub async fn http_api(
    method: reqwest::Method,
    base: &str,
    path: &str,
    body: Option<String>,
) -> Result<serde_json::Value> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let mut req = reqwest::Client::new()
        .request(method, &url)
        .timeout(std::time::Duration::from_secs(60));
    if let Some(b) = body {
        req = req.header("content-type", "application/yaml").body(b);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await?)
        .with_context(|| format!("{url} did not answer JSON"))?;
    if !status.is_success() {
        anyhow::bail!(
            "{}",
            body["error"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("{url} answered {status}"))?
        );
    }
    Ok(body)
}

/// An error code from a node's answer as an error naming it, with the node's message.
pub fn check_code(code: i16, message: Option<&str>) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    let error = ResponseError::try_from_code(code)
        .map_or_else(|| format!("error {code}"), |e| format!("{e:?}"));
    match message {
        Some(m) => bail!("{error}: {m}"),
        None => bail!("{error}"),
    }
}
