//! `weir user create|list|delete`: SCRAM users, through Kafka's own user credential APIs. The
//! password is salted and hashed here; the node never sees it.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use kafka_protocol::messages::alter_user_scram_credentials_request::{
    ScramCredentialDeletion, ScramCredentialUpsertion,
};
use kafka_protocol::messages::describe_user_scram_credentials_request::UserName;
use kafka_protocol::messages::{
    AlterUserScramCredentialsRequest, DescribeUserScramCredentialsRequest,
};

use super::{check_code, ConnectArgs};
use crate::client::Connection;
use crate::kafka::str_bytes;
use crate::security::http::read_secret;
use crate::security::scram::{random_bytes, Mechanism, MIN_ITERATIONS};

#[derive(Subcommand)]
pub enum UserCommand {
    /// Create a user, or set a new password for one.
    Create {
        name: String,
        /// SCRAM-SHA-256 or SCRAM-SHA-512; PLAIN clients are checked against either.
        #[arg(long, default_value = "SCRAM-SHA-512")]
        mechanism: String,
        #[arg(long, default_value_t = MIN_ITERATIONS)]
        iterations: i32,
        /// The password (visible to other local users in the process list: prefer
        /// --password-file or WEIR_USER_PASSWORD).
        #[arg(long, env = "WEIR_USER_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// A file whose first line is the password.
        #[arg(long, conflicts_with = "password")]
        password_file: Option<PathBuf>,
    },
    /// Users with their mechanisms and iterations.
    List,
    /// Delete a user's credentials (all of them, or one mechanism's).
    Delete {
        name: String,
        #[arg(long)]
        mechanism: Option<String>,
    },
}

fn mechanism(name: &str) -> Result<Mechanism> {
    Mechanism::from_name(name)
        .ok_or_else(|| anyhow!("unknown mechanism '{name}': SCRAM-SHA-256 or SCRAM-SHA-512"))
}

pub async fn run(cmd: UserCommand, conn: &ConnectArgs) -> Result<()> {
    let mut c = Connection::connect(&conn.brokers).await?;
    match cmd {
        UserCommand::Create {
            name,
            mechanism: mech,
            iterations,
            password,
            password_file,
        } => {
            let m = mechanism(&mech)?;
            let password = match (password, password_file) {
                (Some(p), _) => p,
                (None, Some(f)) => read_secret(Some(&f), None, "--password-file")?,
                (None, None) => {
                    bail!(
                        "give the password with --password-file, WEIR_USER_PASSWORD or --password"
                    )
                }
            };
            if password.is_empty() {
                bail!("the password is empty");
            }
            let salt = random_bytes(32);
            let salted = m.salted_password(password.as_bytes(), &salt, iterations.max(1) as u32);
            let req = AlterUserScramCredentialsRequest::default().with_upsertions(vec![
                ScramCredentialUpsertion::default()
                    .with_name(str_bytes(name.as_str()))
                    .with_mechanism(m.kafka_type())
                    .with_iterations(iterations)
                    .with_salt(salt.into())
                    .with_salted_password(salted.into()),
            ]);
            alter(&mut c, req).await?;
            println!("user {name}: {} credential stored", m.name());
        }
        UserCommand::List => {
            let resp = c
                .call(&DescribeUserScramCredentialsRequest::default().with_users(None))
                .await?;
            check_code(resp.error_code, resp.error_message.as_deref())?;
            println!("USER\tMECHANISM\tITERATIONS");
            for r in resp.results {
                check_code(r.error_code, r.error_message.as_deref())?;
                for info in r.credential_infos {
                    let m =
                        Mechanism::from_kafka_type(info.mechanism).map_or("UNKNOWN", |m| m.name());
                    println!("{}\t{m}\t{}", r.user.as_str(), info.iterations);
                }
            }
        }
        UserCommand::Delete {
            name,
            mechanism: mech,
        } => {
            let mechanisms = match mech {
                Some(m) => vec![mechanism(&m)?],
                None => {
                    let resp = c
                        .call(
                            &DescribeUserScramCredentialsRequest::default().with_users(Some(vec![
                                UserName::default().with_name(str_bytes(name.as_str())),
                            ])),
                        )
                        .await?;
                    check_code(resp.error_code, resp.error_message.as_deref())?;
                    let mut found = Vec::new();
                    for r in resp.results {
                        check_code(r.error_code, r.error_message.as_deref())?;
                        found.extend(
                            r.credential_infos
                                .iter()
                                .filter_map(|i| Mechanism::from_kafka_type(i.mechanism)),
                        );
                    }
                    found
                }
            };
            let req = AlterUserScramCredentialsRequest::default().with_deletions(
                mechanisms
                    .iter()
                    .map(|m| {
                        ScramCredentialDeletion::default()
                            .with_name(str_bytes(name.as_str()))
                            .with_mechanism(m.kafka_type())
                    })
                    .collect(),
            );
            alter(&mut c, req).await?;
            println!("user {name}: deleted");
        }
    }
    Ok(())
}

async fn alter(c: &mut Connection, req: AlterUserScramCredentialsRequest) -> Result<()> {
    let resp = c.call(&req).await?;
    for r in resp.results {
        check_code(r.error_code, r.error_message.as_deref())
            .with_context(|| format!("user {}", r.user.as_str()))?;
    }
    Ok(())
}
