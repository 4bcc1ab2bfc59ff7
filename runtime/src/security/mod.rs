//! Who may talk to the Kafka listeners: security protocols per listener (as Kafka names them),
//! TLS, SASL authentication, the users' SCRAM credentials, and what each principal may do (ACLs).

pub mod acl;
pub mod http;
pub mod local;
pub mod sasl;
pub mod scram;
pub mod tls;
pub mod users;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use sasl::SaslMechanism;
use tls::Tls;

/// The principal of a client that has not authenticated (Kafka's `User:ANONYMOUS`).
pub const ANONYMOUS: &str = "User:ANONYMOUS";

/// Kafka's security.protocol of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SecurityProtocol {
    #[default]
    #[serde(rename = "PLAINTEXT")]
    Plaintext,
    #[serde(rename = "SSL")]
    Ssl,
    #[serde(rename = "SASL_PLAINTEXT")]
    SaslPlaintext,
    #[serde(rename = "SASL_SSL")]
    SaslSsl,
}

impl SecurityProtocol {
    pub fn name(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "PLAINTEXT",
            SecurityProtocol::Ssl => "SSL",
            SecurityProtocol::SaslPlaintext => "SASL_PLAINTEXT",
            SecurityProtocol::SaslSsl => "SASL_SSL",
        }
    }

    fn parse(s: &str) -> Option<SecurityProtocol> {
        [
            SecurityProtocol::Plaintext,
            SecurityProtocol::Ssl,
            SecurityProtocol::SaslPlaintext,
            SecurityProtocol::SaslSsl,
        ]
        .into_iter()
        .find(|p| p.name().eq_ignore_ascii_case(s))
    }

    pub fn tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }

    pub fn sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// One Kafka listener as configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSettings {
    /// Defaults to the protocol's name; clients are told the addresses of the listener they
    /// connected to, by this name, on every node.
    #[serde(default)]
    pub name: Option<String>,
    /// host:port to bind.
    pub address: String,
    #[serde(default)]
    pub protocol: SecurityProtocol,
    /// host:port given to clients [default: the bound address].
    #[serde(default)]
    pub advertised: Option<String>,
    /// SASL mechanisms offered [default: SCRAM-SHA-256, SCRAM-SHA-512, PLAIN].
    #[serde(default)]
    pub sasl_mechanisms: Option<Vec<String>>,
}

impl ListenerSettings {
    /// `[NAME=]PROTOCOL://HOST:PORT`, the form of `--listener`.
    pub fn parse(spec: &str) -> Result<ListenerSettings> {
        let (name, rest) = match spec.split_once('=') {
            Some((n, r)) if !n.contains("://") => (Some(n.to_string()), r),
            _ => (None, spec),
        };
        let Some((protocol, address)) = rest.split_once("://") else {
            bail!("listener '{spec}': expected [NAME=]PROTOCOL://HOST:PORT");
        };
        let protocol = SecurityProtocol::parse(protocol).with_context(|| {
            format!(
                "listener '{spec}': protocol must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
            )
        })?;
        Ok(ListenerSettings {
            name,
            address: address.to_string(),
            protocol,
            advertised: None,
            sasl_mechanisms: None,
        })
    }

    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.protocol.name().to_string())
    }

    pub fn mechanisms(&self) -> Result<Vec<SaslMechanism>> {
        match &self.sasl_mechanisms {
            None => Ok(SaslMechanism::DEFAULT.to_vec()),
            Some(names) => names
                .iter()
                .map(|n| {
                    SaslMechanism::from_name(n).with_context(|| {
                        format!(
                            "unknown SASL mechanism '{n}' (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)"
                        )
                    })
                })
                .collect(),
        }
    }
}

/// An address clients are told to connect to, for one listener of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub listener: String,
    pub host: String,
    pub port: i32,
}

/// Settings every SASL listener shares.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Kafka's connection.failed.authentication.delay.ms: a failure is answered this late.
    pub failed_delay: Duration,
    /// Failures from one address within a minute before further attempts are refused unchecked.
    pub max_failures_per_minute: u32,
    /// Kafka's connections.max.reauth.ms (KIP-368); None: sessions do not expire.
    pub max_reauth: Option<Duration>,
}

/// A bound listener's security, shared by its connections.
pub struct Listener {
    pub name: Arc<str>,
    pub protocol: SecurityProtocol,
    pub mechanisms: Vec<SaslMechanism>,
    pub tls: Option<Arc<Tls>>,
    pub auth: AuthSettings,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

const FAILURE_WINDOW: Duration = Duration::from_secs(60);

impl Listener {
    pub fn new(
        settings: &ListenerSettings,
        tls: Option<Arc<Tls>>,
        auth: AuthSettings,
    ) -> Result<Listener> {
        let name = settings.name();
        if settings.protocol.tls() && tls.is_none() {
            bail!(
                "listener {name} ({}) needs tls.cert_file and tls.key_file (--tls-cert, --tls-key)",
                settings.protocol.name()
            );
        }
        Ok(Listener {
            name: name.into(),
            protocol: settings.protocol,
            mechanisms: settings.mechanisms()?,
            tls: settings.protocol.tls().then_some(tls).flatten(),
            auth,
            failures: Mutex::new(HashMap::new()),
        })
    }

    /// A plaintext listener without authentication.
    #[cfg(test)]
    pub fn plaintext(name: &str) -> Listener {
        Listener {
            name: name.into(),
            protocol: SecurityProtocol::Plaintext,
            mechanisms: Vec::new(),
            tls: None,
            auth: AuthSettings {
                failed_delay: Duration::ZERO,
                max_failures_per_minute: 0,
                max_reauth: None,
            },
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `addr` has failed too often lately to be given another try.
    pub fn throttled(&self, addr: IpAddr) -> bool {
        let failures = self.failures.lock();
        matches!(failures.get(&addr), Some((since, n))
            if since.elapsed() < FAILURE_WINDOW && *n >= self.auth.max_failures_per_minute)
    }

    pub fn record_failure(&self, addr: IpAddr) {
        let mut failures = self.failures.lock();
        if failures.len() > 10_000 {
            failures.retain(|_, (since, _)| since.elapsed() < FAILURE_WINDOW);
        }
        let entry = failures.entry(addr).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= FAILURE_WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_flags_parse() {
        let l = ListenerSettings::parse("EXTERNAL=SASL_SSL://0.0.0.0:9093").unwrap();
        assert_eq!(l.name(), "EXTERNAL");
        assert_eq!(l.protocol, SecurityProtocol::SaslSsl);
        assert_eq!(l.address, "0.0.0.0:9093");
        let l = ListenerSettings::parse("ssl://127.0.0.1:9094").unwrap();
        assert_eq!(l.name(), "SSL");
        assert!(ListenerSettings::parse("TLS://127.0.0.1:1").is_err());
        assert!(ListenerSettings::parse("127.0.0.1:1").is_err());
    }

    #[test]
    fn failures_throttle_an_address() {
        let mut l = Listener::plaintext("x");
        l.auth.max_failures_per_minute = 2;
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(!l.throttled(a));
        l.record_failure(a);
        l.record_failure(a);
        assert!(l.throttled(a));
        assert!(!l.throttled("10.0.0.2".parse().unwrap()));
    }
}
