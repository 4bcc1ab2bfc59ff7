//! weir's own Kafka client: used by the CLI and the benchmark, and usable against any Kafka
//! broker. Versions are negotiated through ApiVersions; requests can be pipelined.

pub mod partitioner;
pub mod router;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

const CLIENT_ID: &str = "weir-cli";
/// How long a request may go unanswered (Kafka's `request.timeout.ms` is 30 s; requests that
/// wait on the broker side carry at most 30 s of their own).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(45);

/// The version of each API both sides speak (highest common).
#[derive(Clone, Debug, Default)]
pub struct Versions(HashMap<i16, i16>);

impl Versions {
    pub fn get<R: Request>(&self) -> Result<i16> {
        self.0.get(&R::KEY).copied().ok_or_else(|| {
            anyhow!(
                "the broker does not support API {:?}",
                ApiKey::try_from(R::KEY)
            )
        })
    }
}

/// Sends requests on the write half of a connection.
pub struct Sender {
    writer: BufWriter<OwnedWriteHalf>,
    next_correlation: i32,
    versions: Versions,
}

/// Reads responses, in order, on the read half.
pub struct Receiver {
    reader: BufReader<OwnedReadHalf>,
}

/// A connection used request-by-request.
pub struct Connection {
    pub sender: Sender,
    pub receiver: Receiver,
}

impl Sender {
    pub fn versions(&self) -> &Versions {
        &self.versions
    }

    /// Encodes and queues a request; returns the version used. Call `flush` to send.
    pub async fn send<R: Request>(&mut self, req: &R) -> Result<i16> {
        let version = self.versions.get::<R>()?;
        self.send_version(req, version).await?;
        Ok(version)
    }

    async fn send_version<R: Request>(&mut self, req: &R, version: i16) -> Result<()> {
        let mut buf = BytesMut::with_capacity(128);
        buf.put_i32(0);
        RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.next_correlation)
            .with_client_id(Some(StrBytes::from_static_str(CLIENT_ID)))
            .encode(&mut buf, R::header_version(version))?;
        req.encode(&mut buf, version)?;
        let len = (buf.len() - 4) as i32;
        buf[0..4].copy_from_slice(&len.to_be_bytes());
        self.next_correlation = self.next_correlation.wrapping_add(1);
        self.writer.write_all(&buf).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<()> {
        self.writer.flush().await?;
        Ok(())
    }
}

impl Receiver {
    /// Reads the next response frame (without its length).
    pub async fn frame(&mut self) -> Result<Bytes> {
        let len = self
            .reader
            .read_i32()
            .await
            .context("connection closed by broker")?;
        if !(4..=1 << 30).contains(&len) {
            bail!("broker sent a frame of {len} bytes");
        }
        Ok(crate::kafka::read_body(&mut self.reader, len as usize).await?)
    }

    /// Reads and decodes the next response as `R::Response` at `version`.
    pub async fn recv<R: Request>(&mut self, version: i16) -> Result<R::Response> {
        let mut frame = self.frame().await?;
        ResponseHeader::decode(
            &mut frame,
            <R::Response as HeaderVersion>::header_version(version),
        )?;
        R::Response::decode(&mut frame, version)
    }
}

impl Connection {
    /// Connects and negotiates API versions.
    pub async fn connect(addr: &str) -> Result<Connection> {
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("timed out connecting to {addr}"))?
            .with_context(|| format!("cannot connect to a broker at {addr}"))?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let mut conn = Connection {
            sender: Sender {
                writer: BufWriter::with_capacity(256 * 1024, wr),
                next_correlation: 0,
                versions: Versions::default(),
            },
            receiver: Receiver {
                reader: BufReader::with_capacity(256 * 1024, rd),
            },
        };
        let version = 3;
        conn.sender
            .send_version(
                &ApiVersionsRequest::default()
                    .with_client_software_name(StrBytes::from_static_str("weir"))
                    .with_client_software_version(StrBytes::from_static_str(env!(
                        "CARGO_PKG_VERSION"
                    ))),
                version,
            )
            .await?;
        conn.sender.flush().await?;
        // An ApiVersions response header is always v0.
        let mut frame = conn.receiver.frame().await?;
        ResponseHeader::decode(&mut frame, 0)?;
        let error = i16::from_be_bytes(
            frame
                .get(0..2)
                .ok_or_else(|| anyhow!("short ApiVersions response"))?
                .try_into()?,
        );
        let resp = if error == 35 {
            kafka_protocol::messages::ApiVersionsResponse::decode(&mut frame, 0)?
        } else {
            kafka_protocol::messages::ApiVersionsResponse::decode(&mut frame, version)?
        };
        if resp.error_code != 0 && resp.error_code != 35 {
            bail!("ApiVersions failed with error {}", resp.error_code);
        }
        for k in resp.api_keys {
            if let Ok(key) = ApiKey::try_from(k.api_key) {
                let ours = key.valid_versions();
                let max = k.max_version.min(ours.max);
                if max >= k.min_version.max(ours.min) {
                    conn.sender.versions.0.insert(k.api_key, max);
                }
            }
        }
        Ok(conn)
    }

    /// One request, one response; an error after `REQUEST_TIMEOUT` without an answer (a node
    /// that stopped or is cut off), after which the connection must be dropped.
    pub async fn call<R: Request>(&mut self, req: &R) -> Result<R::Response> {
        tokio::time::timeout(REQUEST_TIMEOUT, async {
            let version = self.sender.send(req).await?;
            self.sender.flush().await?;
            self.receiver.recv::<R>(version).await
        })
        .await
        .map_err(|_| anyhow!("no answer from the broker within {REQUEST_TIMEOUT:?}"))?
    }

    pub fn into_split(self) -> (Sender, Receiver) {
        (self.sender, self.receiver)
    }
}

/// Turns a Kafka error code into an error naming it.
pub fn check(code: i16, what: &str) -> Result<()> {
    match kafka_protocol::error::ResponseError::try_from_code(code) {
        None => Ok(()),
        Some(e) => Err(anyhow!("{what}: {e:?} (Kafka error {code})")),
    }
}
