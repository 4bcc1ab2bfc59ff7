//! TLS for the Kafka listeners and the HTTP API, with rustls: a certificate chain and key from
//! PEM files, optional client certificates (mTLS, the principal taken from the certificate's
//! subject), and renewed files picked up by new connections without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use parking_lot::{Mutex, RwLock};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// A client gets this long to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether clients present certificates (Kafka's ssl.client.auth).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    None,
    Requested,
    Required,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// The certificate chain, PEM, leaf first.
    pub cert_file: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CAs trusted to sign client certificates, PEM.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Default: required when client_ca_file is given, else none.
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    /// How often the files are checked for a renewal.
    #[serde(default = "default_reload_interval_ms")]
    pub reload_interval_ms: u64,
}

fn default_reload_interval_ms() -> u64 {
    5_000
}

impl TlsSettings {
    pub fn new(cert_file: PathBuf, key_file: PathBuf) -> TlsSettings {
        TlsSettings {
            cert_file,
            key_file,
            client_ca_file: None,
            client_auth: None,
            reload_interval_ms: default_reload_interval_ms(),
        }
    }

    fn client_auth(&self) -> ClientAuth {
        self.client_auth
            .unwrap_or(if self.client_ca_file.is_some() {
                ClientAuth::Required
            } else {
                ClientAuth::None
            })
    }

    fn files(&self) -> Vec<&Path> {
        let mut files = vec![self.cert_file.as_path(), self.key_file.as_path()];
        files.extend(self.client_ca_file.as_deref());
        files
    }
}

/// The TLS configuration new connections are accepted with.
pub struct Tls {
    settings: TlsSettings,
    acceptor: RwLock<TlsAcceptor>,
    /// Modification time and size of each file, as last loaded.
    loaded: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl Tls {
    pub fn load(settings: TlsSettings) -> Result<Arc<Tls>> {
        let config = build(&settings)?;
        let loaded = stamps(&settings);
        Ok(Arc::new(Tls {
            acceptor: RwLock::new(TlsAcceptor::from(Arc::new(config))),
            loaded: Mutex::new(loaded),
            settings,
        }))
    }

    /// Loads the setting when it is given; errors name it (`what`).
    pub fn load_if_set(settings: &Option<TlsSettings>, what: &str) -> Result<Option<Arc<Tls>>> {
        settings
            .clone()
            .map(Tls::load)
            .transpose()
            .with_context(|| what.to_string())
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.read().clone()
    }

    /// Reloads the files whenever they change; a file that does not load keeps the previous
    /// configuration in place, with a logged error.
    pub async fn watch(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let every = Duration::from_millis(self.settings.reload_interval_ms.max(100));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            let now = stamps(&self.settings);
            if *self.loaded.lock() == now {
                continue;
            }
            match build(&self.settings) {
                Ok(config) => {
                    *self.acceptor.write() = TlsAcceptor::from(Arc::new(config));
                    tracing::info!(cert = %self.settings.cert_file.display(), "reloaded the TLS certificate");
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "cannot reload the TLS files; keeping the previous ones")
                }
            }
            // Also after an error: the next change is tried, not the same broken files again.
            *self.loaded.lock() = now;
        }
    }
}

/// The HTTP API's listener over TLS. Each handshake runs in its own task, so a slow client
/// holds up no one; connections reach the server as their handshakes finish.
pub struct HttpsListener {
    local: std::net::SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, std::net::SocketAddr)>,
}

impl HttpsListener {
    pub fn new(listener: TcpListener, tls: Arc<Tls>) -> std::io::Result<HttpsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    r = listener.accept() => r,
                    // The server is gone: stop accepting (and release the port).
                    _ = tx.closed() => return,
                };
                let (stream, addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "HTTP accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let acceptor = tls.acceptor();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, addr)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %addr, error = %e, "HTTPS handshake failed")
                        }
                        Err(_) => tracing::debug!(peer = %addr, "HTTPS handshake timed out"),
                    }
                });
            }
        });
        Ok(HttpsListener { local, ready })
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accepting task only ends once this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

fn stamps(settings: &TlsSettings) -> Vec<Option<(SystemTime, u64)>> {
    settings
        .files()
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate file", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no certificate in it",
        path.display()
    );
    Ok(certs)
}

fn build(settings: &TlsSettings) -> Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certificates(&settings.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&settings.key_file)
        .with_context(|| format!("{}: no PEM private key in it", settings.key_file.display()))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match (settings.client_auth(), &settings.client_ca_file) {
        (ClientAuth::None, _) => builder.with_no_client_auth(),
        (_, None) => anyhow::bail!("tls.client_auth needs tls.client_ca_file"),
        (auth, Some(ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(ca)? {
                roots
                    .add(cert)
                    .with_context(|| format!("{}: unusable CA certificate", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if auth == ClientAuth::Requested {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder
                .with_client_cert_verifier(verifier.build().context("client certificate verifier")?)
        }
    };
    builder.with_single_cert(certs, key).with_context(|| {
        format!(
            "{} and {} do not make a usable certificate and key",
            settings.cert_file.display(),
            settings.key_file.display()
        )
    })
}

/// Kafka's default principal for a client certificate: `User:` and the subject's distinguished
/// name in RFC 2253 order (most specific first), e.g. `User:CN=alice,O=example`.
pub fn certificate_principal(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let registry = x509_parser::objects::oid_registry();
    let mut parts = Vec::new();
    for rdn in cert
        .subject()
        .iter_rdn()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        for attr in rdn.iter() {
            let key = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                .map(str::to_string)
                .unwrap_or_else(|_| attr.attr_type().to_id_string());
            let value = attr.as_str().unwrap_or("?");
            parts.push(format!("{key}={}", escape_rfc2253(value)));
        }
    }
    Some(format!("User:{}", parts.join(",")))
}

fn escape_rfc2253(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.chars().enumerate() {
        if matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && matches!(c, '#' | ' '))
        {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
