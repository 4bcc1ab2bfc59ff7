//! `weir txn list|describe`: transactions as the coordinator sees them.

use anyhow::{anyhow, Result};
use clap::Subcommand;
use kafka_protocol::messages::{
    DescribeTransactionsRequest, ListTransactionsRequest, ProducerId, TransactionalId,
};
use serde_json::json;

use super::ConnectArgs;
use crate::client::router::{Router, TRANSACTION};
use crate::client::{check, Connection};
use crate::kafka::str_bytes;

#[derive(Subcommand)]
pub enum TxnCommand {
    /// List transactional ids with their producer id and state.
    List {
        /// Only these states (Empty, Ongoing, PrepareCommit, PrepareAbort, CompleteCommit,
        /// CompleteAbort); repeatable.
        #[arg(long = "state")]
        states: Vec<String>,
        /// Only transactions open for at least this many milliseconds.
        #[arg(long)]
        older_than_ms: Option<i64>,
    },
    /// State, producer id and epoch, timeout, start time and partitions of a transactional id.
    Describe {
        transactional_id: String,
        /// text or json
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
    },
}

pub async fn run(cmd: TxnCommand, conn: &ConnectArgs) -> Result<()> {
    let mut r = Router::connect(&conn.brokers).await?;
    match cmd {
        TxnCommand::List {
            states,
            older_than_ms,
        } => {
            let req = ListTransactionsRequest::default()
                .with_state_filters(states.into_iter().map(str_bytes).collect())
                .with_duration_filter(older_than_ms.unwrap_or(-1));
            // Each node lists the transactions it coordinates.
            let mut rows: Vec<(String, i64, String)> = vec![];
            for node in r.node_ids().await? {
                let resp = r.node(node).await?.call(&req).await?;
                check(resp.error_code, "list transactions")?;
                if !resp.unknown_state_filters.is_empty() {
                    let unknown: Vec<&str> = resp
                        .unknown_state_filters
                        .iter()
                        .map(|s| s.as_str())
                        .collect();
                    return Err(anyhow!("unknown state(s): {}", unknown.join(", ")));
                }
                rows.extend(resp.transaction_states.into_iter().map(|t| {
                    (
                        t.transactional_id.0.to_string(),
                        t.producer_id.0,
                        t.transaction_state.to_string(),
                    )
                }));
            }
            rows.sort();
            rows.dedup();
            println!("TRANSACTIONAL ID\tPRODUCER ID\tSTATE");
            for (id, pid, state) in rows {
                println!("{id}\t{pid}\t{state}");
            }
        }
        TxnCommand::Describe {
            transactional_id,
            format,
        } => {
            let coordinator = r.coordinator(TRANSACTION, &transactional_id).await?;
            describe(
                r.node(coordinator).await?,
                &transactional_id,
                format == "json",
            )
            .await?
        }
    }
    Ok(())
}

async fn describe(c: &mut Connection, id: &str, as_json: bool) -> Result<()> {
    let resp = c
        .call(
            &DescribeTransactionsRequest::default()
                .with_transactional_ids(vec![TransactionalId(str_bytes(id))]),
        )
        .await?;
    let t = resp
        .transaction_states
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("empty DescribeTransactions response"))?;
    check(t.error_code, &format!("describe transactional id '{id}'"))?;
    let partitions: Vec<String> = t
        .topics
        .iter()
        .flat_map(|topic| {
            topic
                .partitions
                .iter()
                .map(move |p| format!("{}-{p}", topic.topic.0))
        })
        .collect();
    let ProducerId(producer_id) = t.producer_id;
    if as_json {
        println!(
            "{}",
            json!({
                "transactional_id": id,
                "state": t.transaction_state.as_str(),
                "producer_id": producer_id,
                "producer_epoch": t.producer_epoch,
                "timeout_ms": t.transaction_timeout_ms,
                "start_time_ms": t.transaction_start_time_ms,
                "partitions": partitions,
            })
        );
    } else {
        println!("transactional id: {id}");
        println!("state:            {}", t.transaction_state.as_str());
        println!(
            "producer id:      {producer_id} (epoch {})",
            t.producer_epoch
        );
        println!("timeout:          {} ms", t.transaction_timeout_ms);
        if t.transaction_start_time_ms >= 0 {
            println!(
                "started at:       {} ms since the epoch",
                t.transaction_start_time_ms
            );
        }
        println!("partitions:       {}", partitions.join(", "));
    }
    Ok(())
}
