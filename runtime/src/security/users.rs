//! SCRAM credentials of users. A single node keeps them in `<data-dir>/meta/scram-credentials.json`
//! (salted and hashed, written atomically); a cluster keeps them in its metadata image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

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
pub struct LocalUsers {
    path: PathBuf,
    credentials: RwLock<Credentials>,
}

impl LocalUsers {
    pub fn open(data_dir: &Path) -> Result<LocalUsers> {
        let path = data_dir.join("meta").join("scram-credentials.json");
        let credentials = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("cannot read {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Credentials::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        Ok(LocalUsers {
            path,
            credentials: RwLock::new(credentials),
        })
    }

    pub fn get(&self, user: &str, mechanism: Mechanism) -> Option<ScramCredential> {
        self.credentials.read().get(user)?.get(&mechanism).cloned()
    }

    pub fn all(&self) -> Credentials {
        self.credentials.read().clone()
    }

    /// Applies and persists the changes; on a write error nothing changes.
    pub fn alter(&self, changes: &[CredentialChange]) -> Result<()> {
        let mut current = self.credentials.write();
        let mut next = current.clone();
        apply(&mut next, changes);
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        crate::log::write_atomically(&self.path, &serde_json::to_vec_pretty(&next)?)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        *current = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_survive_a_reopen_and_deletes_remove_users() {
        let dir = tempfile::tempdir().unwrap();
        let users = LocalUsers::open(dir.path()).unwrap();
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
        let reopened = LocalUsers::open(dir.path()).unwrap();
        assert_eq!(reopened.get("alice", m), Some(credential));
        assert_eq!(reopened.get("alice", Mechanism::Sha256), None);
        reopened
            .alter(&[CredentialChange::Delete {
                user: "alice".into(),
                mechanism: m,
            }])
            .unwrap();
        assert!(LocalUsers::open(dir.path()).unwrap().all().is_empty());
    }
}
