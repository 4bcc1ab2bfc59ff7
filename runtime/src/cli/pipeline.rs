//! `weir pipeline`: the pipelines of a node through its HTTP API (`/pipelines`), and
//! `validate`, which checks a file offline, as the node would, for pipeline authors' CI.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::Value;

use super::HttpApiArgs;
use crate::pipeline::spec::PipelineSpec;

#[derive(Subcommand)]
pub enum PipelineCommand {
    /// Every pipeline file of the node: its pipeline's state and counts, or why it is refused.
    List {
        #[command(flatten)]
        api: HttpApiArgs,
    },
    /// One pipeline's status (JSON).
    Status {
        name: String,
        #[command(flatten)]
        api: HttpApiArgs,
    },
    /// Check a pipeline file without a node: YAML, fields, and its plugins (loaded and checked).
    Validate { file: PathBuf },
    /// Create or replace the pipeline of FILE on the node (checked there first; a refused file
    /// leaves the running version alone).
    Apply {
        file: PathBuf,
        #[command(flatten)]
        api: HttpApiArgs,
    },
    /// Stop a pipeline and start it again from its file.
    Restart {
        name: String,
        #[command(flatten)]
        api: HttpApiArgs,
    },
    /// Stop a pipeline's tasks until it is resumed (also across daemon restarts).
    Pause {
        name: String,
        #[command(flatten)]
        api: HttpApiArgs,
    },
    /// Run a paused pipeline again, from where it stopped.
    Resume {
        name: String,
        #[command(flatten)]
        api: HttpApiArgs,
    },
    /// Stop a pipeline and delete its file.
    Delete {
        name: String,
        #[command(flatten)]
        api: HttpApiArgs,
    },
}

pub async fn run(cmd: PipelineCommand) -> Result<()> {
    match cmd {
        PipelineCommand::List { api } => {
            let body = super::http_api(reqwest::Method::GET, &api, "/pipelines", None).await?;
            print!("{}", render_list(&body));
        }
        PipelineCommand::Status { name, api } => {
            let body = super::http_api(
                reqwest::Method::GET,
                &api,
                &format!("/pipelines/{name}"),
                None,
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&body)?);
        }
        PipelineCommand::Validate { file } => {
            let spec = validate(&file).await?;
            println!("{}: pipeline '{}' is valid", file.display(), spec.name);
        }
        PipelineCommand::Apply { file, api } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            // The name comes from the file; the node checks everything again.
            let spec = PipelineSpec::parse(&file, &text, |n| std::env::var(n).ok())?;
            let body = super::http_api(
                reqwest::Method::PUT,
                &api,
                &format!("/pipelines/{}", spec.name),
                Some(text),
            )
            .await?;
            println!(
                "pipeline '{}' applied: {}",
                spec.name,
                body["file"].as_str().unwrap_or("?")
            );
        }
        PipelineCommand::Restart { name, api } => {
            super::http_api(
                reqwest::Method::POST,
                &api,
                &format!("/pipelines/{name}/restart"),
                None,
            )
            .await?;
            println!("pipeline '{name}' restarted");
        }
        PipelineCommand::Pause { name, api } => {
            super::http_api(
                reqwest::Method::POST,
                &api,
                &format!("/pipelines/{name}/pause"),
                None,
            )
            .await?;
            println!("pipeline '{name}' paused");
        }
        PipelineCommand::Resume { name, api } => {
            super::http_api(
                reqwest::Method::POST,
                &api,
                &format!("/pipelines/{name}/resume"),
                None,
            )
            .await?;
            println!("pipeline '{name}' resumed");
        }
        PipelineCommand::Delete { name, api } => {
            let body = super::http_api(
                reqwest::Method::DELETE,
                &api,
                &format!("/pipelines/{name}"),
                None,
            )
            .await?;
            println!(
                "pipeline '{name}' deleted ({} removed)",
                body["file"].as_str().unwrap_or("its file")
            );
        }
    }
    Ok(())
}

/// Parses `file` and loads its plugins, as a node would.
async fn validate(file: &Path) -> Result<PipelineSpec> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let host = Arc::new(weir_wasm::Host::new(
        weir_wasm::Host::default_cache_dir().as_deref(),
    )?);
    Ok(crate::pipeline::check(&host, file, &text).await?)
}

fn render_list(body: &Value) -> String {
    let mut out = format!(
        "{:<24} {:<10} {:>12} {:>12} {:>8}  FILE\n",
        "PIPELINE", "STATE", "IN", "OUT", "DEAD"
    );
    let files = body["pipelines"].as_array().cloned().unwrap_or_default();
    for f in &files {
        let file = f["file"].as_str().unwrap_or("?");
        let p = &f["pipeline"];
        if p.is_object() {
            let out_total: u64 = p["records_out"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_u64).sum())
                .unwrap_or(0);
            out += &format!(
                "{:<24} {:<10} {:>12} {:>12} {:>8}  {file}\n",
                p["name"].as_str().unwrap_or("?"),
                p["state"].as_str().unwrap_or("?"),
                p["records_in"].as_u64().unwrap_or(0),
                out_total,
                p["dead_letters"].as_u64().unwrap_or(0),
            );
        }
        if let Some(why) = f["invalid"].as_str() {
            out += &format!("  refused: {why}\n");
        }
    }
    if files.is_empty() {
        out += "(no pipelines)\n";
    }
    out
}
