//! SCRAM-SHA-256 and SCRAM-SHA-512 (RFC 5802, RFC 7677), the server's side, and the stored form
//! of a credential: salt, iterations, StoredKey and ServerKey. The password itself is never
//! stored, and with AlterUserScramCredentials never even reaches the server.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};

/// Kafka's bounds on SCRAM iterations (ScramMechanism.minIterations / maxIterations).
pub const MIN_ITERATIONS: i32 = 4096;
pub const MAX_ITERATIONS: i32 = 16384;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Mechanism {
    #[serde(rename = "SCRAM-SHA-256")]
    Sha256,
    #[serde(rename = "SCRAM-SHA-512")]
    Sha512,
}

impl Mechanism {
    pub const ALL: [Mechanism; 2] = [Mechanism::Sha256, Mechanism::Sha512];

    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Sha256 => "SCRAM-SHA-256",
            Mechanism::Sha512 => "SCRAM-SHA-512",
        }
    }

    pub fn from_name(name: &str) -> Option<Mechanism> {
        Mechanism::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(name))
    }

    /// The mechanism's number in Kafka's user SCRAM credential APIs.
    pub fn kafka_type(self) -> i8 {
        match self {
            Mechanism::Sha256 => 1,
            Mechanism::Sha512 => 2,
        }
    }

    pub fn from_kafka_type(t: i8) -> Option<Mechanism> {
        Mechanism::ALL.into_iter().find(|m| m.kafka_type() == t)
    }

    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self {
            Mechanism::Sha256 => {
                let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key size");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
            Mechanism::Sha512 => {
                let mut m = <Hmac<Sha512> as KeyInit>::new_from_slice(key).expect("any key size");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
        }
    }

    fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            Mechanism::Sha256 => Sha256::digest(data).to_vec(),
            Mechanism::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    /// RFC 5802's Hi(): PBKDF2 with this mechanism's HMAC.
    pub fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        match self {
            Mechanism::Sha256 => {
                pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password, salt, iterations).to_vec()
            }
            Mechanism::Sha512 => {
                pbkdf2::pbkdf2_hmac_array::<Sha512, 64>(password, salt, iterations).to_vec()
            }
        }
    }
}

/// What the server keeps of a password for one mechanism.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScramCredential {
    #[serde(with = "base64_bytes")]
    pub salt: Vec<u8>,
    pub iterations: i32,
    #[serde(with = "base64_bytes")]
    pub stored_key: Vec<u8>,
    #[serde(with = "base64_bytes")]
    pub server_key: Vec<u8>,
}

impl ScramCredential {
    /// From the salted password a Kafka admin client sends (AlterUserScramCredentials).
    pub fn from_salted_password(
        mechanism: Mechanism,
        salt: &[u8],
        iterations: i32,
        salted_password: &[u8],
    ) -> ScramCredential {
        let client_key = mechanism.hmac(salted_password, b"Client Key");
        ScramCredential {
            salt: salt.to_vec(),
            iterations,
            stored_key: mechanism.hash(&client_key),
            server_key: mechanism.hmac(salted_password, b"Server Key"),
        }
    }

    /// Whether `password` is the one this credential was made from (SASL/PLAIN).
    pub fn verify_password(&self, mechanism: Mechanism, password: &[u8]) -> bool {
        let salted = mechanism.salted_password(password, &self.salt, self.iterations as u32);
        let candidate = mechanism.hash(&mechanism.hmac(&salted, b"Client Key"));
        constant_time_eq(&candidate, &self.stored_key)
    }
}

/// A random salt or nonce.
pub fn random_bytes(n: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut b = vec![0u8; n];
    rand::rng().fill_bytes(&mut b);
    b
}

/// Compares secrets (proofs, keys, token digests) without an early exit.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why an exchange failed. The client is told only that authentication failed; the reason
/// goes to the log.
#[derive(Debug, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("unknown user '{0}'")]
    UnknownUser(String),
    #[error("wrong password for user '{0}'")]
    BadProof(String),
    #[error("{0} is not supported")]
    Unsupported(&'static str),
}

/// The server's side of one SCRAM exchange: client-first → server-first, client-final →
/// server-final.
pub enum ScramServer {
    AwaitingClientFirst(Mechanism),
    AwaitingClientFinal {
        mechanism: Mechanism,
        user: String,
        credential: ScramCredential,
        gs2_header: String,
        client_first_bare: String,
        server_first: String,
        nonce: String,
    },
}

/// Where an exchange stands after a client message.
pub enum ScramStep {
    /// Send this challenge and wait for the next message.
    Challenge(ScramServer, Vec<u8>),
    /// Authenticated `user`; send this last message.
    Done { user: String, server_final: Vec<u8> },
}

impl ScramServer {
    pub fn new(mechanism: Mechanism) -> ScramServer {
        ScramServer::AwaitingClientFirst(mechanism)
    }

    pub fn mechanism(&self) -> Mechanism {
        match self {
            ScramServer::AwaitingClientFirst(m) => *m,
            ScramServer::AwaitingClientFinal { mechanism, .. } => *mechanism,
        }
    }

    pub fn step(
        self,
        message: &[u8],
        lookup: impl FnOnce(&str, Mechanism) -> Option<ScramCredential>,
    ) -> Result<ScramStep, ScramError> {
        let message =
            std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        match self {
            ScramServer::AwaitingClientFirst(mechanism) => client_first(mechanism, message, lookup),
            ScramServer::AwaitingClientFinal {
                mechanism,
                user,
                credential,
                gs2_header,
                client_first_bare,
                server_first,
                nonce,
            } => {
                let (without_proof, proof) = message
                    .rsplit_once(",p=")
                    .ok_or(ScramError::Malformed("client-final without a proof"))?;
                let mut attrs = without_proof.split(',');
                let binding = attrs.next().and_then(|a| a.strip_prefix("c=")).ok_or(
                    ScramError::Malformed("client-final without channel binding"),
                )?;
                if B64.decode(binding).ok().as_deref() != Some(gs2_header.as_bytes()) {
                    return Err(ScramError::Malformed("channel binding does not match"));
                }
                let client_nonce = attrs
                    .next()
                    .and_then(|a| a.strip_prefix("r="))
                    .ok_or(ScramError::Malformed("client-final without a nonce"))?;
                // As Kafka's broker checks it: librdkafka sends its own nonce again in front of
                // the server's; the proof covers the message as sent either way.
                if !client_nonce.ends_with(nonce.as_str()) {
                    return Err(ScramError::Malformed("nonce does not match"));
                }
                let proof = B64
                    .decode(proof)
                    .map_err(|_| ScramError::Malformed("proof is not base64"))?;
                let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
                let client_signature =
                    mechanism.hmac(&credential.stored_key, auth_message.as_bytes());
                if proof.len() != client_signature.len() {
                    return Err(ScramError::BadProof(user));
                }
                let client_key: Vec<u8> = proof
                    .iter()
                    .zip(&client_signature)
                    .map(|(a, b)| a ^ b)
                    .collect();
                if !constant_time_eq(&mechanism.hash(&client_key), &credential.stored_key) {
                    return Err(ScramError::BadProof(user));
                }
                let server_signature =
                    mechanism.hmac(&credential.server_key, auth_message.as_bytes());
                Ok(ScramStep::Done {
                    user,
                    server_final: format!("v={}", B64.encode(server_signature)).into_bytes(),
                })
            }
        }
    }
}

fn client_first(
    mechanism: Mechanism,
    message: &str,
    lookup: impl FnOnce(&str, Mechanism) -> Option<ScramCredential>,
) -> Result<ScramStep, ScramError> {
    // gs2-header: cbind-flag "," [authzid] ","
    let mut parts = message.splitn(3, ',');
    let cbind = parts.next().unwrap_or_default();
    let authzid = parts
        .next()
        .ok_or(ScramError::Malformed("client-first without a GS2 header"))?;
    let bare = parts
        .next()
        .ok_or(ScramError::Malformed("client-first without a user"))?;
    match cbind {
        "n" | "y" => {}
        c if c.starts_with("p=") => return Err(ScramError::Unsupported("channel binding")),
        _ => return Err(ScramError::Malformed("bad channel-binding flag")),
    }
    let mut user = None;
    let mut client_nonce = None;
    for attr in bare.split(',') {
        if let Some(u) = attr.strip_prefix("n=") {
            user = Some(decode_name(u)?);
        } else if let Some(r) = attr.strip_prefix("r=") {
            client_nonce = Some(r);
        } else if attr.starts_with("m=") {
            return Err(ScramError::Unsupported("a mandatory SCRAM extension"));
        } else if attr.starts_with("tokenauth=") {
            return Err(ScramError::Unsupported("delegation token authentication"));
        }
        // Other extensions (RFC 5802 §5.1 allows them) are ignored.
    }
    let user = user.ok_or(ScramError::Malformed("client-first without a user name"))?;
    let client_nonce = client_nonce
        .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
        .ok_or(ScramError::Malformed("client-first without a valid nonce"))?;
    if let Some(authz) = authzid.strip_prefix("a=") {
        if decode_name(authz)? != user {
            return Err(ScramError::Unsupported(
                "an authorization id other than the user",
            ));
        }
    } else if !authzid.is_empty() {
        return Err(ScramError::Malformed("bad authorization id"));
    }
    let credential =
        lookup(&user, mechanism).ok_or_else(|| ScramError::UnknownUser(user.clone()))?;
    let nonce = format!("{client_nonce}{}", B64.encode(random_bytes(18)));
    let server_first = format!(
        "r={nonce},s={},i={}",
        B64.encode(&credential.salt),
        credential.iterations
    );
    let reply = server_first.clone().into_bytes();
    Ok(ScramStep::Challenge(
        ScramServer::AwaitingClientFinal {
            mechanism,
            user,
            credential,
            gs2_header: format!("{cbind},{authzid},"),
            client_first_bare: bare.to_string(),
            server_first,
            nonce,
        },
        reply,
    ))
}

/// saslname: "=2C" stands for ',' and "=3D" for '='; any other '=' is malformed.
fn decode_name(s: &str) -> Result<String, ScramError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(ScramError::Malformed("bad escape in user name")),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    if out.is_empty() {
        return Err(ScramError::Malformed("empty user name"));
    }
    Ok(out)
}

mod base64_bytes {
    use super::B64;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        B64.decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's side of the exchange, as RFC 5802 §3 computes it.
    fn client_proof(
        mechanism: Mechanism,
        password: &str,
        client_first_bare: &str,
        server_first: &str,
        without_proof: &str,
    ) -> (String, Vec<u8>) {
        let attrs: Vec<&str> = server_first.split(',').collect();
        let salt = B64.decode(&attrs[1][2..]).unwrap();
        let iterations: u32 = attrs[2][2..].parse().unwrap();
        let salted = mechanism.salted_password(password.as_bytes(), &salt, iterations);
        let client_key = mechanism.hmac(&salted, b"Client Key");
        let stored_key = mechanism.hash(&client_key);
        let auth = format!("{client_first_bare},{server_first},{without_proof}");
        let sig = mechanism.hmac(&stored_key, auth.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
        let server_key = mechanism.hmac(&salted, b"Server Key");
        let expected_final = mechanism.hmac(&server_key, auth.as_bytes());
        (B64.encode(proof), expected_final)
    }

    fn credential(mechanism: Mechanism, password: &str) -> ScramCredential {
        let salt = b"0123456789abcdef";
        let salted = mechanism.salted_password(password.as_bytes(), salt, 4096);
        ScramCredential::from_salted_password(mechanism, salt, 4096, &salted)
    }

    fn exchange(mechanism: Mechanism, stored: &str, given: &str) -> Result<Vec<u8>, ScramError> {
        let cred = credential(mechanism, stored);
        let first = "n,,n=al=2Cice,r=fyko+d2lbbFgONRv9qkxdawL";
        let ScramStep::Challenge(server, server_first) =
            ScramServer::new(mechanism).step(first.as_bytes(), |u, m| {
                assert_eq!((u, m), ("al,ice", mechanism));
                Some(cred.clone())
            })?
        else {
            panic!("expected a challenge")
        };
        let server_first = String::from_utf8(server_first).unwrap();
        let nonce = &server_first.split(',').next().unwrap()[2..];
        let without_proof = format!("c=biws,r={nonce}");
        let (proof, expected) =
            client_proof(mechanism, given, &first[3..], &server_first, &without_proof);
        match server.step(format!("{without_proof},p={proof}").as_bytes(), |_, _| None)? {
            ScramStep::Done { user, server_final } => {
                assert_eq!(user, "al,ice");
                assert_eq!(
                    server_final,
                    format!("v={}", B64.encode(expected)).into_bytes()
                );
                Ok(server_final)
            }
            ScramStep::Challenge(..) => panic!("expected the end"),
        }
    }

    #[test]
    fn right_password_authenticates_and_wrong_one_does_not() {
        for m in Mechanism::ALL {
            exchange(m, "s3cret", "s3cret").unwrap();
            assert!(matches!(
                exchange(m, "s3cret", "guess"),
                Err(ScramError::BadProof(_))
            ));
        }
    }

    /// RFC 7677 §3's test vector for SCRAM-SHA-256 (user "user", password "pencil").
    #[test]
    fn rfc7677_vector() {
        let m = Mechanism::Sha256;
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let salted = m.salted_password(b"pencil", &salt, 4096);
        let cred = ScramCredential::from_salted_password(m, &salt, 4096, &salted);
        let client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO";
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let without_proof = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let server = ScramServer::AwaitingClientFinal {
            mechanism: m,
            user: "user".into(),
            credential: cred,
            gs2_header: "n,,".into(),
            client_first_bare: client_first_bare.into(),
            server_first: server_first.into(),
            nonce: "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into(),
        };
        let last = format!("{without_proof},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=");
        let ScramStep::Done { server_final, .. } =
            server.step(last.as_bytes(), |_, _| None).unwrap()
        else {
            panic!("expected the end")
        };
        assert_eq!(
            server_final,
            b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=".to_vec()
        );
    }

    #[test]
    fn plain_password_check_uses_the_stored_keys() {
        for m in Mechanism::ALL {
            let c = credential(m, "pw");
            assert!(c.verify_password(m, b"pw"));
            assert!(!c.verify_password(m, b"pW"));
        }
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for msg in [
            &b""[..],
            b"n",
            b"n,,",
            b"x,,n=a,r=b",
            b"p=tls-unique,,n=a,r=b",
            b"n,,n=a=,r=b",
            b"n,,n=a,r=",
            b"n,a=b,n=a,r=abc",
            b"\xff\xfe",
        ] {
            assert!(ScramServer::new(Mechanism::Sha512)
                .step(msg, |_, _| Some(credential(Mechanism::Sha512, "x")))
                .is_err());
        }
        assert!(matches!(
            ScramServer::new(Mechanism::Sha512).step(b"n,,n=nobody,r=abc", |_, _| None),
            Err(ScramError::UnknownUser(_))
        ));
    }
}
