//! SCRAM credentials of users. A single node keeps them in `<data-dir>/meta/scram-credentials.json`
//! (salted and hashed, written atomically); a cluster keeps them in its metadata image.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::local::LocalFile;
use super::scram::{Mechanism, ScramCredential};

/// Every user's credentials, by user and mechanism.
pub type Credentials = BTreeMap<String, BTreeMap<Mechanism, ScramCredential>>;

/// One change, as AlterUserScramCredentials carries them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CredentialChange {
    Upsert {
        user: String,
        mechanism: Mechanism,
        credential: ScramCredential,
    },
    Delete {
        user: String,
        mechanism: Mechanism,
    },
}

/// Applies changes in order; deleting what is absent changes nothing.
pub fn apply(credentials: &mut Credentials, changes: &[CredentialChange]) {
    for change in changes {
        match change {
            CredentialChange::Upsert {
                user,
                mechanism,
                credential,
            } => {
                credentials
                    .entry(user.clone())
                    .or_default()
                    .insert(*mechanism, credential.clone());
            }
            CredentialChange::Delete { user, mechanism } => {
                if let Some(by_mech) = credentials.get_mut(user) {
                    by_mech.remove(mechanism);
                    if by_mech.is_empty() {
                        credentials.remove(user);
                    }
                }
            }
        }
    }
}

/// A single node's credentials file.
pub type LocalUsers = LocalFile<Credentials>;

impl LocalUsers {
    pub fn open_users(data_dir: &Path) -> Result<LocalUsers> {
        LocalFile::open(data_dir, "scram-credentials.json")
    }

    pub fn credential(&self, user: &str, mechanism: Mechanism) -> Option<ScramCredential> {
        self.get().get(user)?.get(&mechanism).cloned()
    }

    /// Applies and persists the changes; on a write error nothing changes.
    pub fn alter(&self, changes: &[CredentialChange]) -> Result<()> {
        self.update(|c| apply(c, changes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_survive_a_reopen_and_deletes_remove_users() {
        let dir = tempfile::tempdir().unwrap();
        let users = LocalUsers::open_users(dir.path()).unwrap();
        let m = Mechanism::Sha512;
        let salted = m.salted_password(b"pw", b"salt", 4096);
        let credential = ScramCredential::from_salted_password(m, b"salt", 4096, &salted);
        users
            .alter(&[CredentialChange::Upsert {
                user: "alice".into(),
                mechanism: m,
                credential: credential.clone(),
            }])
            .unwrap();
        let text = std::fs::read_to_string(dir.path().join("meta/scram-credentials.json")).unwrap();
        assert!(!text.contains("pw\""), "{text}");
        let reopened = LocalUsers::open_users(dir.path()).unwrap();
        assert_eq!(reopened.credential("alice", m), Some(credential));
        assert_eq!(reopened.credential("alice", Mechanism::Sha256), None);
        reopened
            .alter(&[CredentialChange::Delete {
                user: "alice".into(),
                mechanism: m,
            }])
            .unwrap();
        assert!(LocalUsers::open_users(dir.path()).unwrap().get().is_empty());
    }
}
