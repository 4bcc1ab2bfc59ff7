//! Who may use the HTTP API: bearer tokens and SCRAM users (HTTP Basic), each with a role.
//! Tokens come from files, the environment or their SHA-256; only their SHA-256 is kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use parking_lot::Mutex;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::scram::constant_time_eq;

/// What a caller may do: `read` is every GET (and pipeline validation); `admin` is everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Admin,
}

/// The `http_auth` section of weir.yaml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpAuthSettings {
    pub tokens: Vec<TokenSettings>,
    /// SCRAM users (`weir user create`) who may log in with HTTP Basic, and their roles.
    pub users: Vec<UserRole>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    /// Names the token in the log and as the HTTP Basic user name.
    pub name: String,
    pub role: Role,
    /// A file whose first line is the token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// An environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// The token's SHA-256, in hex (`printf %s "$TOKEN" | sha256sum`).
    #[serde(default)]
    pub token_sha256: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserRole {
    pub name: String,
    pub role: Role,
}

/// A secret from a pipeline file (a token, a password): compared and used, never shown in
/// logs or debug output.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::ops::Deref for Secret {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// A caller that proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// Successful Basic logins of SCRAM users are remembered this long: checking a password costs
/// thousands of hash iterations, and the console polls.
const VERIFIED_TTL: Duration = Duration::from_secs(300);

pub struct HttpAuth {
    tokens: Vec<(String, Role, [u8; 32])>,
    users: HashMap<String, Role>,
    verified: Mutex<HashMap<[u8; 32], Instant>>,
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The token of a `Bearer <token>` Authorization header.
pub fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Whether a presented secret is the expected one; compares their digests in constant time.
pub fn same_secret(expected: &str, presented: &str) -> bool {
    constant_time_eq(&sha256(expected.as_bytes()), &sha256(presented.as_bytes()))
}

/// A secret read from a file (its first line) or an environment variable; never logged.
pub fn read_secret(file: Option<&Path>, env: Option<&str>, what: &str) -> Result<String> {
    let secret = match (file, env) {
        (Some(f), None) => std::fs::read_to_string(f)
            .with_context(|| format!("{what}: cannot read {}", f.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
        (None, Some(var)) => std::env::var(var)
            .with_context(|| format!("{what}: environment variable {var} is not set"))?,
        _ => bail!("{what}: give exactly one of a file and an environment variable"),
    };
    if secret.is_empty() {
        bail!("{what}: it is empty");
    }
    Ok(secret)
}

impl HttpAuth {
    pub fn load(settings: &HttpAuthSettings) -> Result<HttpAuth> {
        let mut tokens = Vec::new();
        for t in &settings.tokens {
            let what = format!("http_auth token '{}'", t.name);
            let digest = match &t.token_sha256 {
                Some(digest) if t.token_file.is_none() && t.token_env.is_none() => {
                    let mut bytes = [0u8; 32];
                    hex::decode_to_slice(digest.trim(), &mut bytes)
                        .with_context(|| format!("{what}: token_sha256 is not 64 hex digits"))?;
                    bytes
                }
                Some(_) => {
                    bail!("{what}: give exactly one of token_file, token_env and token_sha256")
                }
                None if t.token_file.is_some() == t.token_env.is_some() => {
                    bail!("{what}: give exactly one of token_file, token_env and token_sha256")
                }
                None => sha256(
                    read_secret(t.token_file.as_deref(), t.token_env.as_deref(), &what)?.as_bytes(),
                ),
            };
            if tokens.iter().any(|(n, _, _)| n == &t.name) {
                bail!("http_auth: the token name '{}' is used twice", t.name);
            }
            tokens.push((t.name.clone(), t.role, digest));
        }
        Ok(HttpAuth {
            tokens,
            users: settings
                .users
                .iter()
                .map(|u| (u.name.clone(), u.role))
                .collect(),
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// The token's caller, if it is one of the configured tokens.
    pub fn token(&self, token: &str) -> Option<Caller> {
        let digest = sha256(token.as_bytes());
        let mut found = None;
        // Every token is compared, so the time taken does not tell which one nearly matched.
        for (name, role, known) in &self.tokens {
            if constant_time_eq(known, &digest) {
                found = Some(Caller {
                    name: name.clone(),
                    role: *role,
                });
            }
        }
        found
    }

    /// The caller an `Authorization` header proves: `Bearer <token>`, or `Basic` with a token's
    /// name and the token, or a SCRAM user and password (`check_password`). None: absent or
    /// wrong.
    pub fn authenticate(
        &self,
        authorization: &str,
        check_password: impl Fn(&str, &[u8]) -> Result<(), String>,
    ) -> Option<Caller> {
        if let Some(token) = bearer(authorization) {
            return self.token(token);
        }
        let (scheme, value) = authorization.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .ok()?;
        let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
        if let Some(caller) = self.token(password).filter(|c| c.name == user) {
            return Some(caller);
        }
        let role = *self.users.get(user)?;
        let caller = Caller {
            name: user.to_string(),
            role,
        };
        let key = sha256(&decoded);
        let now = Instant::now();
        {
            let mut verified = self.verified.lock();
            verified.retain(|_, at| now.duration_since(*at) < VERIFIED_TTL);
            if verified.contains_key(&key) {
                return Some(caller);
            }
        }
        match check_password(user, password.as_bytes()) {
            Ok(()) => {
                self.verified.lock().insert(key, now);
                Some(caller)
            }
            Err(reason) => {
                tracing::info!(user, reason, "HTTP login refused");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
    }

    #[test]
    fn tokens_users_and_roles() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ops.token");
        std::fs::write(&file, "ops-secret\n").unwrap();
        let hex = hex::encode(sha256(b"ci-secret"));
        let auth = HttpAuth::load(&HttpAuthSettings {
            tokens: vec![
                TokenSettings {
                    name: "ops".into(),
                    role: Role::Admin,
                    token_file: Some(file),
                    token_env: None,
                    token_sha256: None,
                },
                TokenSettings {
                    name: "ci".into(),
                    role: Role::Read,
                    token_file: None,
                    token_env: None,
                    token_sha256: Some(hex),
                },
            ],
            users: vec![UserRole {
                name: "alice".into(),
                role: Role::Read,
            }],
        })
        .unwrap();
        let no_users = |_: &str, _: &[u8]| Err("no users".to_string());
        let alice = |u: &str, p: &[u8]| match (u, p) {
            ("alice", b"pw") => Ok(()),
            _ => Err("wrong".into()),
        };
        assert_eq!(
            auth.authenticate("Bearer ops-secret", no_users)
                .map(|c| c.role),
            Some(Role::Admin)
        );
        assert_eq!(
            auth.authenticate("bearer ci-secret", no_users)
                .map(|c| c.role),
            Some(Role::Read)
        );
        assert_eq!(auth.authenticate("Bearer ops-secret2", no_users), None);
        assert_eq!(
            auth.authenticate(&basic("ops", "ops-secret"), no_users)
                .map(|c| c.name),
            Some("ops".into())
        );
        // A token under another token's name is not that caller.
        assert_eq!(
            auth.authenticate(&basic("ci", "ops-secret"), no_users),
            None
        );
        assert_eq!(
            auth.authenticate(&basic("alice", "pw"), alice)
                .map(|c| c.role),
            Some(Role::Read)
        );
        // Remembered: no second password check.
        assert!(auth.authenticate(&basic("alice", "pw"), no_users).is_some());
        assert_eq!(auth.authenticate(&basic("alice", "nope"), alice), None);
        assert_eq!(auth.authenticate(&basic("bob", "pw"), alice), None);
        assert_eq!(auth.authenticate("Digest x", alice), None);
        assert_eq!(auth.authenticate("Basic !!!", alice), None);
    }

    #[test]
    fn a_token_needs_exactly_one_source() {
        let settings = |file: Option<&str>, env: Option<&str>| HttpAuthSettings {
            tokens: vec![TokenSettings {
                name: "t".into(),
                role: Role::Read,
                token_file: file.map(PathBuf::from),
                token_env: env.map(str::to_string),
                token_sha256: None,
            }],
            users: vec![],
        };
        let err = |s| format!("{:#}", HttpAuth::load(&s).err().unwrap());
        assert!(err(settings(None, None)).contains("exactly one"));
        assert!(err(settings(Some("/nonexistent/t"), None)).contains("cannot read"));
        assert!(err(settings(None, Some("WEIR_TEST_UNSET_TOKEN_VAR"))).contains("is not set"));
    }
}
