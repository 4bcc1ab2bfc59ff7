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

/// How to reach a node's HTTP API.
#[derive(clap::Args, Clone)]
pub struct HttpApiArgs {
    /// The node's HTTP API (https:// when it has a certificate)
    #[arg(long, default_value = "http://127.0.0.1:8083", env = "WEIR_HTTP")]
    pub url: String,
    /// A file whose first line is the API token (or set WEIR_HTTP_TOKEN)
    #[arg(long, env = "WEIR_HTTP_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// CA certificates (PEM) to trust for an https:// API, besides the system's
    #[arg(long, env = "WEIR_HTTP_CA")]
    pub ca_file: Option<std::path::PathBuf>,
}

impl HttpApiArgs {
    fn client(&self) -> Result<reqwest::Client> {
        weir_connectors::http::install_crypto_provider();
        let mut builder = reqwest::Client::builder();
        if let Some(ca) = &self.ca_file {
            let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("{} holds no PEM certificate", ca.display()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(builder.build()?)
    }

    fn token(&self) -> Result<Option<String>> {
        if let Ok(token) = std::env::var("WEIR_HTTP_TOKEN") {
            return Ok(Some(token));
        }
        self.token_file
            .as_ref()
            .map(|f| crate::security::http::read_secret(Some(f), None, "--token-file"))
            .transpose()
    }
}

/// One request to a node's HTTP API: its JSON answer, or the error it gives.
pub async fn http_api(
    method: reqwest::Method,
    api: &HttpApiArgs,
    path: &str,
    body: Option<String>,
) -> Result<serde_json::Value> {
    let url = format!("{}{path}", api.url.trim_end_matches('/'));
    let mut req = api
        .client()?
        .request(method, &url)
        .timeout(std::time::Duration::from_secs(60));
    if let Some(token) = api.token()? {
        req = req.bearer_auth(token);
    }
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
