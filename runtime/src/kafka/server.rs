//! The Kafka listener: one task per connection, requests answered in order.
//!
//! Like Kafka, a connection's requests are handled one after another, so pipelined requests are
//! answered in the order they were sent; responses are buffered and flushed when the client has
//! nothing more queued. A malformed frame closes only its own connection, with a logged reason.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::apis;
use super::Broker;

/// Largest request accepted, as Kafka's socket.request.max.bytes.
pub const MAX_FRAME_BYTES: i32 = 100 * 1024 * 1024;
/// Connections idle this long are closed, as Kafka's connections.max.idle.ms.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

pub async fn serve(listener: TcpListener, broker: Arc<Broker>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let broker = broker.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        if let Err(reason) = connection(stream, peer, broker, shutdown).await {
                            tracing::warn!(%peer, %reason, "closed Kafka connection");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Why a connection was closed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("{0}")]
    Protocol(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

fn protocol(msg: impl Into<String>) -> ConnectionError {
    ConnectionError::Protocol(msg.into())
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    stream.set_nodelay(true)?;
    let (rd, wr) = stream.into_split();
    let mut reader = BufReader::with_capacity(64 * 1024, rd);
    let mut writer = BufWriter::with_capacity(64 * 1024, wr);
    loop {
        let frame = tokio::select! {
            f = tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut reader)) => match f {
                Ok(Ok(Some(frame))) => frame,
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(protocol("idle timeout")),
            },
            _ = shutdown.changed() => return Ok(()),
        };
        if let Some(response) = handle_frame(&broker, frame, peer).await? {
            writer.write_all(&response).await?;
        }
        if reader.buffer().is_empty() {
            writer.flush().await?;
        }
    }
}

/// Reads one size-prefixed frame; None at a clean end of stream.
async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> Result<Option<Bytes>, ConnectionError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = i32::from_be_bytes(len);
    if !(8..=MAX_FRAME_BYTES).contains(&len) {
        return Err(protocol(format!(
            "request size {len} outside the allowed range 8..={MAX_FRAME_BYTES}"
        )));
    }
    let mut buf = BytesMut::zeroed(len as usize);
    r.read_exact(&mut buf)
        .await
        .map_err(|e| protocol(format!("truncated request of {len} bytes: {e}")))?;
    Ok(Some(buf.freeze()))
}

/// Decodes, handles and encodes one request. Ok(None): no response is due (acks=0).
pub async fn handle_frame(
    broker: &Broker,
    mut frame: Bytes,
    peer: SocketAddr,
) -> Result<Option<Bytes>, ConnectionError> {
    let api_key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let key = ApiKey::try_from(api_key).map_err(|_| protocol(format!("unknown API key {api_key}")))?;
    if !apis::is_supported(key, version) {
        if key == ApiKey::ApiVersions {
            // KIP-511: answer in v0 with UNSUPPORTED_VERSION and our ranges, so the client retries.
            return Ok(Some(encode_response(
                correlation_id,
                ApiKey::ApiVersions,
                0,
                &apis::api_versions_unsupported(),
            )?));
        }
        return Err(protocol(format!("unsupported version {version} of {key:?}")));
    }
    let header = RequestHeader::decode(&mut frame, key.request_header_version(version))
        .map_err(|e| protocol(format!("bad {key:?} request header: {e}")))?;
    let request = RequestKind::decode(key, &mut frame, version)
        .map_err(|e| protocol(format!("cannot decode {key:?} v{version}: {e}")))?;
    let ctx = apis::RequestContext {
        version,
        client_id: header.client_id.as_ref().map(|c| c.to_string()),
        peer,
    };
    let Some(response) = apis::dispatch(broker, &ctx, request).await else {
        return Ok(None);
    };
    Ok(Some(encode_response(correlation_id, key, version, &response)?))
}

fn encode_response(
    correlation_id: i32,
    key: ApiKey,
    version: i16,
    response: &kafka_protocol::messages::ResponseKind,
) -> Result<Bytes, ConnectionError> {
    let mut buf = BytesMut::with_capacity(256);
    buf.put_i32(0);
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut buf, key.response_header_version(version))
        .map_err(|e| protocol(format!("cannot encode response header: {e}")))?;
    response
        .encode(&mut buf, version)
        .map_err(|e| protocol(format!("cannot encode {key:?} v{version} response: {e}")))?;
    let len = (buf.len() - 4) as i32;
    buf[0..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn broker() -> (tempfile::TempDir, Broker) {
        let dir = tempfile::tempdir().unwrap();
        let b = Broker::for_tests(dir.path());
        (dir, b)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// The request decoder path never panics on arbitrary frames.
        #[test]
        fn arbitrary_frames_never_panic(key in 0i16..80, version in -1i16..20, body in prop::collection::vec(any::<u8>(), 0..200)) {
            let (_dir, broker) = broker();
            let mut frame = Vec::new();
            frame.extend_from_slice(&key.to_be_bytes());
            frame.extend_from_slice(&version.to_be_bytes());
            frame.extend_from_slice(&7i32.to_be_bytes());
            frame.extend_from_slice(&body);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let _ = rt.block_on(handle_frame(&broker, Bytes::from(frame), "127.0.0.1:1".parse().unwrap()));
        }
    }
}
