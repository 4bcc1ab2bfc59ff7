//! The HTTP API: health now; metrics and the pipeline API share this listener.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::kafka::Broker;

pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route("/health", get(health))
        .with_state(broker);
    let stop = async move {
        let _ = shutdown.changed().await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

/// 200 once the node serves: the log is loaded and the Kafka listener is bound before this
/// listener accepts anything.
async fn health(State(broker): State<Arc<Broker>>) -> Json<serde_json::Value> {
    Json(json!({
        "status": "ok",
        "node_id": broker.node_id,
        "cluster_id": broker.cluster_id,
        "topics": broker.log.topics().len(),
    }))
}
