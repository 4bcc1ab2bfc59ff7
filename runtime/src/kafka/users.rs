//! DescribeUserScramCredentials and AlterUserScramCredentials, Kafka's APIs for users' SCRAM
//! credentials: Kafka's admin clients and `weir user` manage users with them. The client salts
//! and hashes the password; the server keeps only what SCRAM needs to check it.

use std::collections::{BTreeMap, BTreeSet};

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::alter_user_scram_credentials_response::AlterUserScramCredentialsResult;
use kafka_protocol::messages::describe_user_scram_credentials_response::{
    CredentialInfo, DescribeUserScramCredentialsResult,
};
use kafka_protocol::messages::{
    AlterUserScramCredentialsRequest, AlterUserScramCredentialsResponse,
    DescribeUserScramCredentialsRequest, DescribeUserScramCredentialsResponse,
};

use super::apis::RequestContext;
use super::{str_bytes, Broker};
use crate::cluster::image::Command;
use crate::security::acl::Operation;
use crate::security::scram::{Mechanism, ScramCredential, MAX_ITERATIONS, MIN_ITERATIONS};
use crate::security::users::{CredentialChange, Credentials};

impl Broker {
    /// A user's credential for one mechanism, from the cluster's image or the local file.
    pub fn scram_credential(&self, user: &str, mechanism: Mechanism) -> Option<ScramCredential> {
        match &self.cluster {
            Some(c) => c
                .image()
                .scram_credentials
                .get(user)?
                .get(&mechanism)
                .cloned(),
            None => self.users.credential(user, mechanism),
        }
    }

    /// Checks a password against the user's stored credentials (PLAIN logins, HTTP Basic);
    /// the error says why, for the log.
    pub fn check_password(&self, user: &str, password: &[u8]) -> Result<(), String> {
        let mut known = false;
        for m in [Mechanism::Sha512, Mechanism::Sha256] {
            if let Some(credential) = self.scram_credential(user, m) {
                known = true;
                if credential.verify_password(m, password) {
                    return Ok(());
                }
            }
        }
        Err(if known {
            format!("wrong password for user '{user}'")
        } else {
            format!("unknown user '{user}'")
        })
    }

    pub fn scram_credentials(&self) -> Credentials {
        match &self.cluster {
            Some(c) => c.image().scram_credentials.clone(),
            None => Credentials::clone(&self.users.get()),
        }
    }

    async fn alter_scram_credentials(&self, changes: Vec<CredentialChange>) -> Result<(), String> {
        match &self.cluster {
            Some(c) => c
                .run(Command::AlterScramCredentials { changes })
                .await
                .map_err(|e| e.to_string()),
            None => self.users.alter(&changes).map_err(|e| format!("{e:#}")),
        }
    }
}

pub fn describe_user_scram_credentials(
    broker: &Broker,
    ctx: &RequestContext,
    req: DescribeUserScramCredentialsRequest,
) -> DescribeUserScramCredentialsResponse {
    require_on_cluster!(
        broker,
        ctx,
        Operation::Describe,
        DescribeUserScramCredentialsResponse
    );
    let all = broker.scram_credentials();
    let info = |by_mech: &BTreeMap<Mechanism, ScramCredential>| {
        by_mech
            .iter()
            .map(|(m, c)| {
                CredentialInfo::default()
                    .with_mechanism(m.kafka_type())
                    .with_iterations(c.iterations)
            })
            .collect::<Vec<_>>()
    };
    let results = match req.users.filter(|u| !u.is_empty()) {
        None => all
            .iter()
            .map(|(user, by_mech)| {
                DescribeUserScramCredentialsResult::default()
                    .with_user(str_bytes(user.as_str()))
                    .with_credential_infos(info(by_mech))
            })
            .collect(),
        Some(users) => {
            let mut count = BTreeMap::<&str, usize>::new();
            for u in &users {
                *count.entry(u.name.as_str()).or_default() += 1;
            }
            count
                .into_iter()
                .map(|(user, n)| {
                    let result =
                        DescribeUserScramCredentialsResult::default().with_user(str_bytes(user));
                    match all.get(user) {
                        _ if n > 1 => result
                            .with_error_code(ResponseError::DuplicateResource.code())
                            .with_error_message(Some(str_bytes("Cannot describe SCRAM credentials for the same user twice in a single request"))),
                        None => result
                            .with_error_code(ResponseError::ResourceNotFound.code())
                            .with_error_message(Some(str_bytes(format!("Attempt to describe nonexistent user '{user}'")))),
                        Some(by_mech) => result.with_credential_infos(info(by_mech)),
                    }
                })
                .collect()
        }
    };
    DescribeUserScramCredentialsResponse::default().with_results(results)
}

pub async fn alter_user_scram_credentials(
    broker: &Broker,
    ctx: &RequestContext,
    req: AlterUserScramCredentialsRequest,
) -> AlterUserScramCredentialsResponse {
    if !broker.allowed_on_cluster(ctx, Operation::Alter) {
        let users: BTreeSet<String> = req
            .deletions
            .iter()
            .map(|d| d.name.to_string())
            .chain(req.upsertions.iter().map(|u| u.name.to_string()))
            .collect();
        return AlterUserScramCredentialsResponse::default().with_results(
            users
                .into_iter()
                .map(|u| {
                    AlterUserScramCredentialsResult::default()
                        .with_user(str_bytes(u))
                        .with_error_code(ResponseError::ClusterAuthorizationFailed.code())
                })
                .collect(),
        );
    }
    let existing = broker.scram_credentials();
    // Each user's changes stand or fall together; one result per user.
    let mut per_user: BTreeMap<String, Result<Vec<CredentialChange>, (ResponseError, String)>> =
        BTreeMap::new();
    let mut seen = BTreeSet::new();
    let deletions = req
        .deletions
        .into_iter()
        .map(|d| (d.name.to_string(), d.mechanism, None));
    let upsertions = req.upsertions.into_iter().map(|u| {
        (
            u.name.to_string(),
            u.mechanism,
            Some((u.iterations, u.salt, u.salted_password)),
        )
    });
    for (user, mech, upsert) in deletions.chain(upsertions) {
        let change = check_change(&existing, &mut seen, &user, mech, upsert);
        let entry = per_user.entry(user).or_insert(Ok(Vec::new()));
        match (entry.as_mut(), change) {
            (Ok(changes), Ok(c)) => changes.push(c),
            (Ok(_), Err(e)) => *entry = Err(e),
            (Err(_), _) => {}
        }
    }
    let accepted: Vec<CredentialChange> = per_user
        .values()
        .filter_map(|r| r.as_ref().ok())
        .flatten()
        .cloned()
        .collect();
    let stored = if accepted.is_empty() {
        Ok(())
    } else {
        broker.alter_scram_credentials(accepted).await
    };
    let results = per_user
        .into_iter()
        .map(|(user, outcome)| {
            let result = AlterUserScramCredentialsResult::default().with_user(str_bytes(user));
            match (outcome, &stored) {
                (Err((code, msg)), _) => result
                    .with_error_code(code.code())
                    .with_error_message(Some(str_bytes(msg))),
                (Ok(_), Err(msg)) => result
                    .with_error_code(ResponseError::UnknownServerError.code())
                    .with_error_message(Some(str_bytes(msg.clone()))),
                (Ok(_), Ok(())) => result,
            }
        })
        .collect();
    AlterUserScramCredentialsResponse::default().with_results(results)
}

/// Validates one deletion (`upsert` None) or upsertion as Kafka does.
fn check_change(
    existing: &Credentials,
    seen: &mut BTreeSet<(String, i8)>,
    user: &str,
    mech: i8,
    upsert: Option<(i32, bytes::Bytes, bytes::Bytes)>,
) -> Result<CredentialChange, (ResponseError, String)> {
    let unacceptable = |msg: &str| (ResponseError::UnacceptableCredential, msg.to_string());
    if user.is_empty() {
        return Err(unacceptable("Username must not be empty"));
    }
    let Some(mechanism) = Mechanism::from_kafka_type(mech) else {
        return Err((
            ResponseError::UnsupportedSaslMechanism,
            format!("Unknown SCRAM mechanism type {mech}"),
        ));
    };
    if !seen.insert((user.to_string(), mech)) {
        return Err((
            ResponseError::DuplicateResource,
            "A user credential cannot be altered twice in the same request".into(),
        ));
    }
    let Some((iterations, salt, salted_password)) = upsert else {
        if !existing
            .get(user)
            .is_some_and(|m| m.contains_key(&mechanism))
        {
            return Err((
                ResponseError::ResourceNotFound,
                "Attempt to delete a user credential that does not exist".into(),
            ));
        }
        return Ok(CredentialChange::Delete {
            user: user.to_string(),
            mechanism,
        });
    };
    if iterations < MIN_ITERATIONS {
        return Err(unacceptable("Too few iterations"));
    }
    if iterations > MAX_ITERATIONS {
        return Err(unacceptable("Too many iterations"));
    }
    if salt.is_empty() || salted_password.is_empty() {
        return Err(unacceptable("Salt and salted password must not be empty"));
    }
    Ok(CredentialChange::Upsert {
        user: user.to_string(),
        mechanism,
        credential: ScramCredential::from_salted_password(
            mechanism,
            &salt,
            iterations,
            &salted_password,
        ),
    })
}
