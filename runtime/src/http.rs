//! The HTTP API: health, Prometheus metrics, the pipelines (status, put, delete, restart, pause,
//! resume, validate), and the HTTP sources' ingest endpoints. Optionally over TLS, and with
//! callers proving a role (security::http) on everything but /health.

use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cluster::{ClusterError, VoterChange};
use crate::kafka::Broker;
use crate::metrics::ScrapeOptions;
use crate::pipeline::http_source::{parse_body, submit, Rejection};
use crate::pipeline::spec::SpecError;
use crate::pipeline::{EditError, PipelineManager};
use crate::security::http::{bearer, same_secret, Caller, HttpAuth, Role};
use crate::security::tls::{HttpsListener, Tls};

#[derive(Clone)]
struct AppState {
    broker: Arc<Broker>,
    pipelines: Option<Arc<PipelineManager>>,
    metrics: ScrapeOptions,
    auth: Option<Arc<HttpAuth>>,
}

/// TLS and authentication of the HTTP API; neither by default.
pub struct HttpSecurity {
    pub tls: Option<Arc<Tls>>,
    pub auth: Option<Arc<HttpAuth>>,
}

pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    pipelines: Option<Arc<PipelineManager>>,
    metrics: ScrapeOptions,
    security: HttpSecurity,
    mut shutdown: watch::Receiver<bool>,
) {
    let state = AppState {
        broker,
        pipelines,
        metrics,
        auth: security.auth,
    };
    let app = Router::new()
        .route("/", get(crate::console::asset))
        .route("/console/{*file}", get(crate::console::asset))
        .route("/metrics", get(metrics_text))
        .route("/cluster", get(cluster_status))
        .route("/cluster/voters/{id}", post(add_voter).delete(remove_voter))
        .route("/topics", get(list_topics))
        .route("/topics/{name}", get(get_topic))
        .route("/topics/{name}/records", get(get_records))
        .route("/groups", get(list_groups))
        .route("/groups/{id}", get(get_group))
        .route("/groups/{id}/reset-offsets", post(reset_group_offsets))
        .route("/transactions", get(list_transactions))
        .route("/pipelines", get(list_pipelines))
        .route("/pipelines/validate", post(validate_pipeline))
        .route(
            "/pipelines/{name}",
            get(get_pipeline).put(put_pipeline).delete(delete_pipeline),
        )
        .route("/pipelines/{name}/restart", post(restart_pipeline))
        .route("/pipelines/{name}/status", get(pipeline_status))
        .route("/pipelines/{name}/dead-letters", get(dead_letters))
        .route("/pipelines/{name}/pause", post(pause_pipeline))
        .route("/pipelines/{name}/resume", post(resume_pipeline))
        .route("/plugins", get(list_plugins))
        // Every route above needs a role when authentication is on; /health and the HTTP
        // sources' paths (the fallback) decide for themselves.
        .route_layer(from_fn_with_state(state.clone(), require_role))
        .route("/health", get(health))
        .fallback(ingest)
        .with_state(state);
    let stop = async move {
        let _ = shutdown.changed().await;
    };
    let served = match security.tls {
        Some(tls) => match HttpsListener::new(listener, tls) {
            Ok(https) => axum::serve(https, app).with_graceful_shutdown(stop).await,
            Err(e) => Err(e),
        },
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        }
    };
    if let Err(e) = served {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

/// The caller the request's Authorization header proves, if any.
fn caller(s: &AppState, auth: &HttpAuth, headers: &HeaderMap) -> Option<Caller> {
    let authorization = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    auth.authenticate(authorization, |user, password| {
        s.broker.check_password(user, password)
    })
}

/// 401 with a Basic challenge: browsers ask for a user and password, so the console works.
fn unauthorized() -> Response {
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        "authentication required: a bearer token, or HTTP Basic with a user or token name".into(),
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Basic realm=\"weir\", charset=\"UTF-8\""),
    );
    response
}

/// Reading (GET, and validating a pipeline) needs the read role; changing anything, admin.
async fn require_role(State(s): State<AppState>, request: Request, next: Next) -> Response {
    let Some(auth) = &s.auth else {
        return next.run(request).await;
    };
    let reading = matches!(*request.method(), Method::GET | Method::HEAD)
        || request.uri().path() == "/pipelines/validate";
    let needed = if reading { Role::Read } else { Role::Admin };
    match caller(&s, auth, request.headers()) {
        None => unauthorized(),
        Some(c) if c.role < needed => error(
            StatusCode::FORBIDDEN,
            format!("'{}' may only read; this needs the admin role", c.name),
        ),
        Some(_) => next.run(request).await,
    }
}

/// An HTTP source with its own token takes that token (as a bearer token); otherwise, with
/// authentication on, an admin. Admins may always post.
fn may_ingest(s: &AppState, token: Option<&str>, headers: &HeaderMap) -> bool {
    if token.is_none() && s.auth.is_none() {
        return true;
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    if let (Some(expected), Some(presented)) = (token, presented) {
        if same_secret(expected, presented) {
            return true;
        }
    }
    s.auth
        .as_ref()
        .and_then(|auth| caller(s, auth, headers))
        .is_some_and(|c| c.role == Role::Admin)
}

/// 200 once the node serves: the log is loaded and the Kafka listener is bound before this
/// listener accepts anything.
async fn health(State(s): State<AppState>) -> Json<serde_json::Value> {
    let cluster = s.broker.cluster.as_ref().map(|c| {
        let image = c.image();
        let me = image.nodes.get(&c.node_id);
        json!({
            "raft_leader": c.raft_leader(),
            "controller": c.raft_leader() == Some(c.node_id),
            "fenced": me.is_none_or(|n| n.fenced),
            "nodes": image.nodes.len(),
            "leader_of": image.topics.values().flat_map(|t| &t.partitions)
                .filter(|p| p.leader == c.node_id).count(),
        })
    });
    Json(json!({
        "status": "ok",
        "node_id": s.broker.node_id,
        "cluster_id": s.broker.cluster.as_ref().map_or(s.broker.cluster_id.clone(), |c| c.image().cluster_id.clone()),
        "topics": s.broker.log.topics().len(),
        "cluster": cluster,
    }))
}

/// The cluster's state as this node sees it; 404 on a single node.
async fn metrics_text(State(s): State<AppState>) -> Response {
    let text = crate::metrics::render(&s.broker, s.pipelines.as_deref(), s.metrics).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn list_topics(State(s): State<AppState>) -> Response {
    Json(crate::inspect::topics(&s.broker)).into_response()
}

async fn get_topic(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match crate::inspect::topic(&s.broker, &name) {
        Some(t) => Json(t).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no topic named '{name}' on this node"),
        ),
    }
}

#[derive(serde::Deserialize)]
struct RecordsQuery {
    #[serde(default)]
    partition: i32,
    offset: Option<i64>,
    limit: Option<usize>,
}

/// GET /topics/{name}/records?partition=P&offset=O&limit=N: committed records for the
/// console's browser (the last N before the high watermark without an offset).
async fn get_records(
    State(s): State<AppState>,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<RecordsQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    match crate::inspect::records(&s.broker, &name, q.partition, q.offset, limit) {
        Some(r) => Json(r).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!(
                "no partition {} of topic '{name}' on this node",
                q.partition
            ),
        ),
    }
}

async fn list_groups(State(s): State<AppState>) -> Response {
    Json(crate::inspect::groups(&s.broker)).into_response()
}

async fn get_group(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    match crate::inspect::group(&s.broker, &id) {
        Some(g) => Json(g).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("no group '{id}' coordinated by this node"),
        ),
    }
}

/// `POST /groups/{id}/reset-offsets` with `{"topic": T, "to": "earliest" | "latest" |
/// "offset" | "datetime", "offset": N, "datetime": RFC 3339}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetRequest {
    topic: String,
    to: String,
    #[serde(default)]
    offset: Option<i64>,
    #[serde(default)]
    datetime: Option<String>,
}

/// Moves an empty group's offsets for a topic, as `weir group reset-offsets` does and through
/// the same Kafka requests, sent to this node's first listener (the group's coordinator and
/// the partitions' leaders may be other nodes).
async fn reset_group_offsets(
    State(s): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    use crate::cli::group::{reset_offsets, ResetTo};
    let bad = |m: String| error(StatusCode::BAD_REQUEST, m);
    let Ok(bytes) = to_bytes(body, 64 << 10).await else {
        return bad("the body is over 64 KiB".into());
    };
    let req: ResetRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => return bad(format!("invalid request: {e}")),
    };
    let to = match (req.to.as_str(), req.offset, req.datetime.as_deref()) {
        ("earliest", _, _) => ResetTo::Earliest,
        ("latest", _, _) => ResetTo::Latest,
        ("offset", Some(o), _) => ResetTo::Offset(o),
        ("datetime", _, Some(t)) => match ResetTo::parse_datetime(t) {
            Ok(to) => to,
            Err(e) => return bad(format!("{e:#}")),
        },
        (other, _, _) => {
            return bad(format!(
                "'to' is '{other}': earliest, latest, offset (with 'offset') or datetime (with 'datetime')"
            ))
        }
    };
    let own = &s.broker.endpoints[0];
    let reset = async {
        let mut router =
            crate::client::router::Router::connect(&format!("{}:{}", own.host, own.port)).await?;
        reset_offsets(&mut router, &id, &req.topic, to).await
    };
    match reset.await {
        Ok(offsets) => {
            Json(json!({ "group": id, "topic": req.topic, "offsets": offsets })).into_response()
        }
        Err(e) => error(StatusCode::CONFLICT, format!("{e:#}")),
    }
}

async fn list_transactions(State(s): State<AppState>) -> Response {
    Json(crate::inspect::transactions(&s.broker).await).into_response()
}

/// Marks a request one node forwarded to another, which must not forward it again (while
/// their images disagree on where a pipeline runs).
const FORWARDED: &str = "weir-forwarded-from";

/// Hands a post to an HTTP source over to the node of the cluster that runs its pipeline,
/// and its answer back: clients may post to any node.
#[allow(clippy::too_many_arguments)]
async fn forward_ingest(
    s: &AppState,
    pipeline: &str,
    node: i32,
    limit: usize,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    static CLIENT: std::sync::LazyLock<reqwest::Client> = std::sync::LazyLock::new(|| {
        reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .expect("a plain HTTP client")
    });
    let moving = || {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("pipeline '{pipeline}' is moving between nodes; try again"),
        )
    };
    let base = s.broker.cluster.as_ref().and_then(|c| {
        let image = c.image();
        image.nodes.get(&node).and_then(|n| n.http_url.clone())
    });
    let Some(base) = base else {
        return moving();
    };
    if headers.contains_key(FORWARDED) {
        return moving();
    }
    let target = format!(
        "{base}{}",
        uri.path_and_query().map_or(uri.path(), |p| p.as_str())
    );
    if base.starts_with("https:") {
        // This node may not trust the other's certificate: the client is sent there.
        let mut r = error(
            StatusCode::TEMPORARY_REDIRECT,
            format!("pipeline '{pipeline}' runs on node {node}: post to {target}"),
        );
        if let Ok(v) = header::HeaderValue::from_str(&target) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        return r;
    }
    let Ok(bytes) = to_bytes(body, limit).await else {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over the {limit}-byte limit of {}", uri.path()),
        );
    };
    let mut req = CLIENT.request(method, &target).body(bytes);
    for name in [
        header::CONTENT_TYPE,
        header::AUTHORIZATION,
        header::HeaderName::from_static("idempotency-key"),
    ] {
        if let Some(v) = headers.get(&name) {
            req = req.header(name, v);
        }
    }
    let this = s.broker.cluster.as_ref().map_or(0, |c| c.node_id);
    match req.header(FORWARDED, this.to_string()).send().await {
        Ok(answer) => {
            let status = answer.status();
            let kind = answer.headers().get(header::CONTENT_TYPE).cloned();
            match answer.bytes().await {
                Ok(body) => {
                    let mut r = (status, body).into_response();
                    if let Some(k) = kind {
                        r.headers_mut().insert(header::CONTENT_TYPE, k);
                    }
                    r
                }
                Err(e) => error(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "node {node}, which runs pipeline '{pipeline}', broke off its answer: {e}"
                    ),
                ),
            }
        }
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            format!("cannot reach node {node}, which runs pipeline '{pipeline}': {e}"),
        ),
    }
}

fn not_a_cluster() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "this node is a single node, not part of a cluster".into(),
    )
}

async fn cluster_status(State(s): State<AppState>) -> Response {
    match &s.broker.cluster {
        Some(c) => Json(c.status()).into_response(),
        None => not_a_cluster(),
    }
}

/// POST /cluster/voters/{id}: a node that joined as an observer becomes a controller voter.
async fn add_voter(State(s): State<AppState>, Path(id): Path<i32>) -> Response {
    change_voters(&s, VoterChange::Add(id)).await
}

/// DELETE /cluster/voters/{id}: a voter becomes an observer (a dead one, to restore the
/// quorum's margin; a live one keeps following the metadata).
async fn remove_voter(State(s): State<AppState>, Path(id): Path<i32>) -> Response {
    change_voters(&s, VoterChange::Remove(id)).await
}

async fn change_voters(s: &AppState, change: VoterChange) -> Response {
    let Some(c) = &s.broker.cluster else {
        return not_a_cluster();
    };
    match c.change_voters(change).await {
        Ok(()) => Json(json!({ "voters": c.voter_ids() })).into_response(),
        Err(ClusterError::Refused(e)) => error(StatusCode::CONFLICT, e.to_string()),
        Err(ClusterError::Unavailable(e)) => {
            error(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}"))
        }
    }
}

async fn list_pipelines(State(s): State<AppState>) -> Response {
    let Some(p) = s.pipelines else {
        return (
            StatusCode::OK,
            Json(json!({ "directory": null, "pipelines": [] })),
        )
            .into_response();
    };
    Json(json!({
        "directory": p.dir(),
        "pipelines": p.statuses().await,
    }))
    .into_response()
}

/// The file status of the pipeline `name`, or 404.
async fn file_status_of(s: &AppState, name: &str) -> Result<crate::pipeline::FileStatus, Response> {
    let found = match &s.pipelines {
        Some(p) => p
            .statuses()
            .await
            .into_iter()
            .find(|f| f.pipeline.as_ref().is_some_and(|p| p.name == name)),
        None => None,
    };
    found.ok_or_else(|| error(StatusCode::NOT_FOUND, format!("no pipeline named '{name}'")))
}

/// GET /pipelines/{name}/status: the pipeline's status alone (state, each task's state,
/// counts, source lag, last error with its time, the node running it on a cluster).
async fn pipeline_status(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match file_status_of(&s, &name).await {
        Ok(f) => Json(f.pipeline).into_response(),
        Err(r) => r,
    }
}

async fn get_pipeline(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    match file_status_of(&s, &name).await {
        Ok(f) => Json(f).into_response(),
        Err(r) => r,
    }
}

/// The largest pipeline file the API takes.
const MAX_PIPELINE_BYTES: usize = 1 << 20;

fn no_pipelines_dir() -> Response {
    error(
        StatusCode::CONFLICT,
        "this node has no pipelines directory: start it with --pipelines DIR (or pipelines_dir: \
         in weir.yaml)"
            .into(),
    )
}

/// A pipeline file from a request body: YAML as it is, JSON turned into YAML.
async fn pipeline_text(headers: &HeaderMap, body: Body) -> Result<String, Response> {
    let bytes = to_bytes(body, MAX_PIPELINE_BYTES).await.map_err(|_| {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a pipeline file is at most {MAX_PIPELINE_BYTES} bytes"),
        )
    })?;
    let text = String::from_utf8(bytes.to_vec())
        .map_err(|_| error(StatusCode::BAD_REQUEST, "the body is not UTF-8".into()))?;
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Ok(text);
    }
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!(
                "the body is not JSON: {e} (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    })?;
    serde_yaml::to_string(&value).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("cannot turn the JSON into YAML: {e}"),
        )
    })
}

fn invalid(e: &SpecError) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({
            "error": e.to_string(),
            "file": e.file,
            "line": e.line,
            "column": e.column,
            "message": e.message,
        })),
    )
        .into_response()
}

fn edit_error(e: EditError) -> Response {
    match &e {
        EditError::Invalid(spec) => invalid(spec),
        EditError::NotFound(_) => error(StatusCode::NOT_FOUND, e.to_string()),
        EditError::BadName(_) => error(StatusCode::BAD_REQUEST, e.to_string()),
        EditError::Conflict(_) => error(StatusCode::CONFLICT, e.to_string()),
        EditError::Io(_) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// PUT /pipelines/{name}: creates (201) or replaces (200) a pipeline, once checked; an invalid
/// body is refused (400, with line and column) and the running version stays.
async fn put_pipeline(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(p) = s.pipelines else {
        return no_pipelines_dir();
    };
    let text = match pipeline_text(&headers, body).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    match p.put(&name, &text).await {
        Ok((status, created)) => {
            let code = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (code, Json(status)).into_response()
        }
        Err(e) => edit_error(e),
    }
}

async fn delete_pipeline(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    let Some(p) = s.pipelines else {
        return no_pipelines_dir();
    };
    match p.delete(&name).await {
        Ok(file) => Json(json!({ "deleted": name, "file": file })).into_response(),
        Err(e) => edit_error(e),
    }
}

async fn restart_pipeline(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    let Some(p) = s.pipelines else {
        return no_pipelines_dir();
    };
    match p.restart(&name).await {
        Ok(status) => Json(status).into_response(),
        Err(e) => edit_error(e),
    }
}

/// GET /pipelines/{name}/dead-letters?limit=N: the latest records of the pipeline's dead-letter
/// topic (each with the headers saying which stage failed and why), from every partition.
async fn dead_letters(
    State(s): State<AppState>,
    Path(name): Path<String>,
    axum::extract::Query(q): axum::extract::Query<RecordsQuery>,
) -> Response {
    let Some(p) = s.pipelines else {
        return no_pipelines_dir();
    };
    let Some(topic) = p.dead_letter_topic(&name).await else {
        return error(StatusCode::NOT_FOUND, format!("no pipeline named '{name}'"));
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let partitions = s.broker.log.topic(&topic).map_or(0, |t| t.partitions.len());
    let records: Vec<serde_json::Value> = (0..partitions as i32)
        .filter_map(|p| crate::inspect::records(&s.broker, &topic, p, None, limit))
        .collect();
    Json(json!({ "pipeline": name, "topic": topic, "partitions": records })).into_response()
}

/// GET /plugins: the WASM plugins of the pipelines this node runs, with what each has
/// counted (calls, records, faults by kind, fuel, restarts), and the module caches' figures.
async fn list_plugins(State(s): State<AppState>) -> Response {
    let Some(p) = s.pipelines else {
        return Json(json!({ "host": null, "plugins": [] })).into_response();
    };
    let metrics = crate::metrics::get();
    let plugins: Vec<serde_json::Value> = p
        .plugins()
        .await
        .into_iter()
        .map(|(pipeline, stage, plugin, path, state)| {
            let mut entry = metrics.plugin_counts(&pipeline, &plugin);
            entry["pipeline"] = json!(pipeline);
            entry["stage"] = json!(format!("transforms[{stage}]"));
            entry["plugin"] = json!(plugin);
            entry["path"] = json!(path);
            entry["state"] = json!(state);
            entry
        })
        .collect();
    let host = p.plugin_host_stats();
    Json(json!({
        "host": {
            "compiled": host.compiled,
            "from_disk_cache": host.from_disk,
            "from_memory_cache": host.from_memory,
        },
        "plugins": plugins,
    }))
    .into_response()
}

async fn pause_pipeline(state: State<AppState>, name: Path<String>) -> Response {
    set_paused(state, name, true).await
}

async fn resume_pipeline(state: State<AppState>, name: Path<String>) -> Response {
    set_paused(state, name, false).await
}

async fn set_paused(State(s): State<AppState>, Path(name): Path<String>, pause: bool) -> Response {
    let Some(p) = s.pipelines else {
        return no_pipelines_dir();
    };
    match p.set_paused(&name, pause).await {
        Ok(status) => Json(status).into_response(),
        Err(e) => edit_error(e),
    }
}

/// POST /pipelines/validate: checks a pipeline file as PUT would, without applying it.
async fn validate_pipeline(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let Some(p) = s.pipelines else {
        return no_pipelines_dir();
    };
    let text = match pipeline_text(&headers, body).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    // Plugin paths are relative to the pipelines directory, as for a file in it.
    match p.check(&p.dir().join("(request)"), &text).await {
        Ok(spec) => Json(json!({ "valid": true, "name": spec.name })).into_response(),
        Err(e) => invalid(&e),
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn rejection(r: Rejection) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = error(status, r.message);
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}

/// POST to an HTTP source's path: 200 once the records are committed to the topic.
async fn ingest(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let endpoint = s.pipelines.as_ref().and_then(|p| p.endpoint(uri.path()));
    let Some(endpoint) = endpoint else {
        if let Some(p) = &s.pipelines {
            if let Some((name, node, limit)) = p.served_elsewhere(uri.path()).await {
                return forward_ingest(&s, &name, node, limit, method, &uri, &headers, body).await;
            }
            if let Some(name) = p.paused_at(uri.path()).await {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("pipeline '{name}' is paused"),
                );
            }
        }
        return error(
            StatusCode::NOT_FOUND,
            format!("nothing is served at {}", uri.path()),
        );
    };
    if method != Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} takes POST", uri.path()),
        );
    }
    if !may_ingest(&s, endpoint.spec.token.as_deref(), &headers) {
        return unauthorized();
    }
    let limit = endpoint.spec.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over the {limit}-byte limit of {}", uri.path()),
        )
    };
    if declared.is_some_and(|n| n > limit) {
        return too_large();
    }
    let Ok(bytes) = to_bytes(body, limit).await else {
        return too_large();
    };
    let records = match parse_body(endpoint.spec.format, &bytes) {
        Ok(r) => r,
        Err(r) => return rejection(r),
    };
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match submit(&endpoint, records, key).await {
        Ok(n) => Json(json!({ "accepted": n })).into_response(),
        Err(r) => rejection(r),
    }
}
