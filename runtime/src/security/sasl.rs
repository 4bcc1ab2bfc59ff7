//! SASL on a connection, as Kafka runs it: SaslHandshake picks a mechanism, then the client's
//! tokens come in SaslAuthenticate requests (or, after a v0 handshake, as bare size-prefixed
//! frames). Until it succeeds only ApiVersions and these two are answered; a failure is answered
//! with SASL_AUTHENTICATION_FAILED, a little late, and the connection is closed. With
//! `connections_max_reauth_ms` set, sessions expire and clients re-authenticate (KIP-368).

use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::{
    ApiKey, RequestHeader, ResponseKind, SaslAuthenticateRequest, SaslAuthenticateResponse,
    SaslHandshakeRequest, SaslHandshakeResponse,
};
use kafka_protocol::protocol::{Decodable, StrBytes};

use super::scram::{Mechanism, ScramServer, ScramStep};
use super::{Listener, ANONYMOUS};
use crate::kafka::Broker;

/// Largest frame accepted before authentication (Kafka's sasl.server.max.receive.size).
pub const MAX_UNAUTHENTICATED_FRAME: i32 = 512 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    Scram(Mechanism),
}

impl SaslMechanism {
    pub const DEFAULT: [SaslMechanism; 3] = [
        SaslMechanism::Scram(Mechanism::Sha256),
        SaslMechanism::Scram(Mechanism::Sha512),
        SaslMechanism::Plain,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::Scram(m) => m.name(),
        }
    }

    pub fn from_name(name: &str) -> Option<SaslMechanism> {
        if name.eq_ignore_ascii_case("PLAIN") {
            return Some(SaslMechanism::Plain);
        }
        Mechanism::from_name(name).map(SaslMechanism::Scram)
    }
}

enum State {
    /// Waiting for SaslHandshake.
    Start,
    /// A mechanism was chosen; `raw`: tokens come as bare frames (v0 handshake).
    Chosen {
        mechanism: SaslMechanism,
        raw: bool,
    },
    /// Between the two rounds of SCRAM.
    Scram {
        server: Box<ScramServer>,
        raw: bool,
    },
    Done,
}

/// What the connection does with a frame after the session has seen it.
pub enum Intercept {
    /// An ordinary request of an authenticated client: handle it.
    Pass(Bytes),
    /// Send this response frame (size included) and read on.
    Reply(Bytes),
    /// Send this response, if any, then close the connection.
    Close(Option<Bytes>, String),
}

/// One connection's authentication.
pub struct SaslSession {
    listener: Arc<Listener>,
    peer: std::net::SocketAddr,
    state: State,
    /// The authenticated principal, kept through a re-authentication.
    principal: Option<Arc<str>>,
    mechanism: Option<SaslMechanism>,
    expires: Option<Instant>,
}

impl SaslSession {
    pub fn new(listener: Arc<Listener>, peer: std::net::SocketAddr) -> SaslSession {
        SaslSession {
            listener,
            peer,
            state: State::Start,
            principal: None,
            mechanism: None,
            expires: None,
        }
    }

    pub fn principal(&self) -> Arc<str> {
        self.principal.clone().unwrap_or_else(|| ANONYMOUS.into())
    }

    /// After a v0 handshake the next frame is a bare token, not a Kafka request.
    pub fn expects_raw_token(&self) -> bool {
        matches!(
            self.state,
            State::Chosen { raw: true, .. } | State::Scram { raw: true, .. }
        )
    }

    pub fn max_frame(&self) -> i32 {
        if self.principal.is_some() {
            crate::kafka::server::MAX_FRAME_BYTES
        } else {
            MAX_UNAUTHENTICATED_FRAME
        }
    }

    pub async fn intercept(&mut self, broker: &Broker, frame: Bytes) -> Intercept {
        if self.expects_raw_token() {
            return match self.token(broker, &frame).await {
                Ok(reply) => {
                    let mut out = BytesMut::with_capacity(4 + reply.len());
                    out.put_i32(reply.len() as i32);
                    out.put_slice(&reply);
                    Intercept::Reply(out.freeze())
                }
                Err(reason) => self.fail(None, reason).await,
            };
        }
        let api_key = i16::from_be_bytes([frame[0], frame[1]]);
        match ApiKey::try_from(api_key) {
            Ok(ApiKey::SaslHandshake) => self.handshake(frame),
            Ok(ApiKey::SaslAuthenticate) => self.authenticate(broker, frame).await,
            Ok(ApiKey::ApiVersions) => Intercept::Pass(frame),
            _ if self.principal.is_some() => match self.expires {
                Some(at) if Instant::now() >= at => Intercept::Close(
                    None,
                    "the SASL session expired without re-authentication".into(),
                ),
                _ => Intercept::Pass(frame),
            },
            _ => Intercept::Close(
                None,
                format!("request with API key {api_key} before SASL authentication"),
            ),
        }
    }

    fn handshake(&mut self, frame: Bytes) -> Intercept {
        let (version, correlation_id, request) =
            match decode::<SaslHandshakeRequest>(ApiKey::SaslHandshake, frame) {
                Ok(r) => r,
                Err(reason) => return Intercept::Close(None, reason),
            };
        if !matches!(self.state, State::Start | State::Done) {
            return Intercept::Close(None, "SaslHandshake in the middle of an exchange".into());
        }
        if self.principal.is_some() && version < 1 {
            return Intercept::Close(None, "re-authentication needs SaslHandshake v1".into());
        }
        let offered: Vec<StrBytes> = self
            .listener
            .mechanisms
            .iter()
            .map(|m| StrBytes::from_static_str(m.name()))
            .collect();
        let wanted = SaslMechanism::from_name(request.mechanism.as_str())
            .filter(|m| self.listener.mechanisms.contains(m))
            // A re-authentication keeps the mechanism (as Kafka requires).
            .filter(|m| self.mechanism.is_none_or(|before| before == *m));
        let response = SaslHandshakeResponse::default().with_mechanisms(offered);
        let Some(mechanism) = wanted else {
            let reply = response.with_error_code(ResponseError::UnsupportedSaslMechanism.code());
            return Intercept::Close(
                Some(encode(
                    correlation_id,
                    ApiKey::SaslHandshake,
                    version,
                    reply.into(),
                )),
                format!(
                    "SASL mechanism '{}' is not offered here",
                    request.mechanism.as_str()
                ),
            );
        };
        self.state = State::Chosen {
            mechanism,
            raw: version == 0,
        };
        Intercept::Reply(encode(
            correlation_id,
            ApiKey::SaslHandshake,
            version,
            response.into(),
        ))
    }

    async fn authenticate(&mut self, broker: &Broker, frame: Bytes) -> Intercept {
        let (version, correlation_id, request) =
            match decode::<SaslAuthenticateRequest>(ApiKey::SaslAuthenticate, frame) {
                Ok(r) => r,
                Err(reason) => return Intercept::Close(None, reason),
            };
        if !matches!(
            self.state,
            State::Chosen { raw: false, .. } | State::Scram { raw: false, .. }
        ) {
            let reply = SaslAuthenticateResponse::default()
                .with_error_code(ResponseError::IllegalSaslState.code())
                .with_error_message(Some(StrBytes::from_static_str(
                    "SaslAuthenticate before a SaslHandshake",
                )));
            return Intercept::Close(
                Some(encode(
                    correlation_id,
                    ApiKey::SaslAuthenticate,
                    version,
                    reply.into(),
                )),
                "SaslAuthenticate before a SaslHandshake".into(),
            );
        }
        let mechanism = self.mechanism_name();
        match self.token(broker, &request.auth_bytes).await {
            Ok(reply) => {
                let mut response =
                    SaslAuthenticateResponse::default().with_auth_bytes(reply.into());
                if version >= 1 && matches!(self.state, State::Done) {
                    if let Some(lifetime) = self.listener.auth.max_reauth {
                        response = response.with_session_lifetime_ms(lifetime.as_millis() as i64);
                    }
                }
                Intercept::Reply(encode(
                    correlation_id,
                    ApiKey::SaslAuthenticate,
                    version,
                    response.into(),
                ))
            }
            Err(reason) => {
                let reply = SaslAuthenticateResponse::default()
                    .with_error_code(ResponseError::SaslAuthenticationFailed.code())
                    .with_error_message(Some(StrBytes::from_string(format!(
                        "Authentication failed during authentication due to invalid credentials with SASL mechanism {}",
                        mechanism
                    ))));
                let reply = encode(
                    correlation_id,
                    ApiKey::SaslAuthenticate,
                    version,
                    reply.into(),
                );
                self.fail(Some(reply), reason).await
            }
        }
    }

    fn mechanism_name(&self) -> &'static str {
        match &self.state {
            State::Chosen { mechanism, .. } => mechanism.name(),
            State::Scram { server, .. } => server.mechanism().name(),
            _ => self.mechanism.map_or("?", |m| m.name()),
        }
    }

    /// Feeds one client token to the chosen mechanism; the server's token to send back, or why
    /// authentication failed (for the log).
    async fn token(&mut self, broker: &Broker, token: &[u8]) -> Result<Vec<u8>, String> {
        let addr = self.peer.ip();
        if self.listener.throttled(addr) {
            return Err(format!("too many failed authentications from {addr}"));
        }
        let state = std::mem::replace(&mut self.state, State::Start);
        let (server, raw) = match state {
            State::Chosen {
                mechanism: SaslMechanism::Plain,
                ..
            } => {
                let user = plain(broker, token)?;
                self.authenticated(user, SaslMechanism::Plain)?;
                return Ok(Vec::new());
            }
            State::Chosen {
                mechanism: SaslMechanism::Scram(m),
                raw,
            } => (ScramServer::new(m), raw),
            State::Scram { server, raw } => (*server, raw),
            State::Start | State::Done => return Err("no SASL exchange under way".into()),
        };
        let mechanism = server.mechanism();
        match server.step(token, |user, m| broker.scram_credential(user, m)) {
            Ok(ScramStep::Challenge(next, reply)) => {
                self.state = State::Scram {
                    server: Box::new(next),
                    raw,
                };
                Ok(reply)
            }
            Ok(ScramStep::Done { user, server_final }) => {
                self.authenticated(user, SaslMechanism::Scram(mechanism))?;
                Ok(server_final)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    fn authenticated(&mut self, user: String, mechanism: SaslMechanism) -> Result<(), String> {
        let principal: Arc<str> = format!("User:{user}").into();
        if let Some(before) = &self.principal {
            if *before != principal {
                return Err(format!(
                    "re-authentication as {principal} on a connection of {before}"
                ));
            }
        }
        tracing::debug!(peer = %self.peer, %principal, mechanism = mechanism.name(), "authenticated");
        crate::metrics::get()
            .authentications
            .with_label_values(&[&*self.listener.name, mechanism.name()])
            .inc();
        self.principal = Some(principal);
        self.mechanism = Some(mechanism);
        self.expires = self.listener.auth.max_reauth.map(|d| Instant::now() + d);
        self.state = State::Done;
        Ok(())
    }

    /// Counts the failure against the client's address, waits Kafka's failed-authentication
    /// delay (so guessing is slow), and closes.
    async fn fail(&mut self, reply: Option<Bytes>, reason: String) -> Intercept {
        self.listener.record_failure(self.peer.ip());
        crate::metrics::get()
            .authentication_failures
            .with_label_values(&[&*self.listener.name])
            .inc();
        self.state = State::Start;
        tokio::time::sleep(self.listener.auth.failed_delay).await;
        Intercept::Close(reply, format!("authentication failed: {reason}"))
    }
}

/// SASL/PLAIN (RFC 4616): `authzid NUL authcid NUL password`, checked against the user's stored
/// SCRAM credential.
fn plain(broker: &Broker, token: &[u8]) -> Result<String, String> {
    let mut parts = token.split(|&b| b == 0);
    let (Some(authzid), Some(user), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed PLAIN message".into());
    };
    let user = std::str::from_utf8(user).map_err(|_| "user name is not UTF-8".to_string())?;
    if user.is_empty() || (!authzid.is_empty() && authzid != user.as_bytes()) {
        return Err("PLAIN authorization id differs from the user".into());
    }
    broker.check_password(user, password)?;
    Ok(user.to_string())
}

/// Decodes a SASL request: its version, correlation id and body.
fn decode<T: Decodable>(key: ApiKey, mut frame: Bytes) -> Result<(i16, i32, T), String> {
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    if !crate::kafka::apis::is_supported(key, version) {
        return Err(format!("unsupported version {version} of {key:?}"));
    }
    let header = RequestHeader::decode(&mut frame, key.request_header_version(version))
        .map_err(|e| format!("bad {key:?} request header: {e}"))?;
    let body = T::decode(&mut frame, version).map_err(|e| format!("cannot decode {key:?}: {e}"))?;
    Ok((version, header.correlation_id, body))
}

fn encode(correlation_id: i32, key: ApiKey, version: i16, response: ResponseKind) -> Bytes {
    crate::kafka::server::encode_response(correlation_id, key, version, &response)
        .expect("SASL responses always encode")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::{AuthSettings, ListenerSettings, SecurityProtocol};
    use proptest::prelude::*;

    fn listener() -> Arc<Listener> {
        let settings = ListenerSettings {
            name: None,
            address: "127.0.0.1:0".into(),
            protocol: SecurityProtocol::SaslPlaintext,
            advertised: None,
            sasl_mechanisms: None,
        };
        let auth = AuthSettings {
            failed_delay: std::time::Duration::ZERO,
            max_failures_per_minute: u32::MAX,
            max_reauth: None,
        };
        Arc::new(Listener::new(&settings, None, auth).unwrap())
    }

    fn handshake(version: i16, mechanism: &str) -> Bytes {
        use kafka_protocol::protocol::Encodable;
        let mut buf = BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(ApiKey::SaslHandshake as i16)
            .with_request_api_version(version)
            .with_correlation_id(1)
            .encode(
                &mut buf,
                ApiKey::SaslHandshake.request_header_version(version),
            )
            .unwrap();
        SaslHandshakeRequest::default()
            .with_mechanism(StrBytes::from_string(mechanism.into()))
            .encode(&mut buf, version)
            .unwrap();
        buf.freeze()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// Whatever a client sends before, during or after choosing a mechanism, the session
        /// answers, passes or closes; it never panics, and nothing unauthenticated passes.
        #[test]
        fn arbitrary_frames_never_panic_nor_pass_unauthenticated(
            prelude in 0usize..4,
            frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 8..120), 1..4),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let broker = Broker::for_tests(dir.path());
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let mut session = SaslSession::new(listener(), "127.0.0.1:1".parse().unwrap());
                let first = match prelude {
                    1 => Some(handshake(1, "SCRAM-SHA-512")),
                    2 => Some(handshake(0, "PLAIN")),
                    3 => Some(handshake(1, "PLAIN")),
                    _ => None,
                };
                if let Some(f) = first {
                    assert!(matches!(session.intercept(&broker, f).await, Intercept::Reply(_)));
                }
                for frame in frames {
                    match session.intercept(&broker, Bytes::from(frame)).await {
                        // No user exists, so no login succeeds: only ApiVersions may pass.
                        Intercept::Pass(f) => {
                            prop_assert_eq!(i16::from_be_bytes([f[0], f[1]]), ApiKey::ApiVersions as i16);
                            prop_assert_eq!(&*session.principal(), ANONYMOUS);
                        }
                        Intercept::Reply(_) => {}
                        Intercept::Close(..) => break,
                    }
                }
                Ok(())
            })?;
        }
    }
}
