//! The cluster listener (`--cluster-addr`): Raft's RPCs between the controller voters and the
//! forwarding of metadata proposals to the Raft leader, as JSON over HTTP.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::store::CommandOutcome;
use super::LeaderRequest;
use super::{Raft, TypeConfig};

type RaftNodeId = u64;

/// What a forwarded proposal answers: the log index it was committed at and the outcome, or
/// why it could not be proposed (no leader, not the leader any more).
#[derive(Debug, Serialize, Deserialize)]
pub enum ProposeReply {
    Applied { index: u64, outcome: CommandOutcome },
    NotLeader { leader: Option<BasicNode> },
    Failed(String),
}

/// A node that is not a voter asks to follow the metadata quorum (as a Raft learner).
#[derive(Debug, Serialize, Deserialize)]
pub struct Join {
    pub id: super::image::NodeId,
    pub addr: String,
}

/// Asks the voters, in turn, to add this node as a learner; only the Raft leader can.
pub async fn join(http: &reqwest::Client, voters: &[String], join: &Join) -> Result<(), String> {
    let mut last = String::from("no voter");
    for addr in voters {
        let body = serde_json::to_vec(join).map_err(|e| e.to_string())?;
        match http
            .post(format!("http://{addr}/cluster/join"))
            .header("content-type", "application/json")
            .body(body)
            .timeout(Duration::from_secs(30))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("{addr}: {}", r.text().await.unwrap_or_default()),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(last)
}

/// Sends one request and decodes the JSON answer.
async fn post_json<Req: Serialize, Resp: DeserializeOwned>(
    http: &reqwest::Client,
    addr: &str,
    path: &str,
    req: &Req,
    timeout: Duration,
) -> Result<Resp, PostError> {
    let body = serde_json::to_vec(req).map_err(|e| PostError::Network(e.to_string()))?;
    let resp = http
        .post(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(body)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| {
            if e.is_connect() {
                PostError::Unreachable(e.to_string())
            } else {
                PostError::Network(e.to_string())
            }
        })?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| PostError::Network(e.to_string()))?;
    if !status.is_success() {
        return Err(PostError::Network(format!(
            "{path} on {addr} answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        )));
    }
    serde_json::from_slice(&bytes).map_err(|e| PostError::Network(e.to_string()))
}

#[derive(Debug)]
pub enum PostError {
    Unreachable(String),
    Network(String),
}

impl std::fmt::Display for PostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PostError::Unreachable(e) => write!(f, "unreachable: {e}"),
            PostError::Network(e) => write!(f, "{e}"),
        }
    }
}

#[derive(Debug)]
struct Message(String);
impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Message {}

fn rpc_error<E: std::error::Error>(e: PostError) -> RPCError<RaftNodeId, BasicNode, E> {
    match e {
        PostError::Unreachable(m) => RPCError::Unreachable(Unreachable::new(&Message(m))),
        PostError::Network(m) => RPCError::Network(NetworkError::new(&Message(m))),
    }
}

/// Forwards a request to the node at `addr` (the Raft leader, as far as this node knows).
pub async fn forward_proposal(
    http: &reqwest::Client,
    addr: &str,
    request: &LeaderRequest,
    timeout: Duration,
) -> Result<ProposeReply, PostError> {
    post_json(http, addr, "/cluster/propose", request, timeout).await
}

/// Addresses this node dials instead of those other nodes registered (the `peer_routes`
/// setting): for a node that reaches the others through NAT, or through a proxy on the link
/// between two nodes. Applies to cluster and Kafka addresses.
#[derive(Debug, Clone, Default)]
pub struct Routes(Arc<BTreeMap<String, String>>);

impl Routes {
    pub fn new(routes: BTreeMap<String, String>) -> Routes {
        Routes(Arc::new(routes))
    }

    /// Where to dial to reach `addr`.
    pub fn to(&self, addr: &str) -> String {
        self.0
            .get(addr)
            .cloned()
            .unwrap_or_else(|| addr.to_string())
    }
}

/// Opens connections to the other voters on Raft's behalf.
#[derive(Clone)]
pub struct Network {
    pub http: reqwest::Client,
    pub routes: Routes,
}

pub struct Connection {
    http: reqwest::Client,
    target: RaftNodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: RaftNodeId, node: &BasicNode) -> Connection {
        Connection {
            http: self.http.clone(),
            target,
            addr: self.routes.to(&node.addr),
        }
    }
}

impl Connection {
    async fn call<Req: Serialize, Resp: DeserializeOwned, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId, E>>>
    where
        E: std::error::Error + DeserializeOwned,
    {
        let answer: Result<Resp, RaftError<RaftNodeId, E>> =
            post_json(&self.http, &self.addr, path, req, option.hard_ttl())
                .await
                .map_err(rpc_error)?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        AppendEntriesResponse<RaftNodeId>,
        RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId>>,
    > {
        self.call("/raft/append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<RaftNodeId>,
        RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId, InstallSnapshotError>>,
    > {
        self.call("/raft/snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<RaftNodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<RaftNodeId>, RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId>>>
    {
        self.call("/raft/vote", &rpc, &option).await
    }
}

fn json<T: Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => ([("content-type", "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn decode<T: DeserializeOwned>(body: &Bytes) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new((StatusCode::BAD_REQUEST, format!("bad request body: {e}")).into_response())
    })
}

/// The routes of the cluster listener.
pub fn router(
    raft: Raft,
    proposer: Arc<super::Proposer>,
    liveness: Arc<super::controller::Liveness>,
) -> Router {
    Router::new()
        .route(
            "/raft/append",
            post(|State(raft): State<Raft>, body: Bytes| async move {
                match decode::<AppendEntriesRequest<TypeConfig>>(&body) {
                    Ok(req) => json(&raft.append_entries(req).await),
                    Err(r) => *r,
                }
            }),
        )
        .route(
            "/raft/vote",
            post(|State(raft): State<Raft>, body: Bytes| async move {
                match decode::<VoteRequest<RaftNodeId>>(&body) {
                    Ok(req) => json(&raft.vote(req).await),
                    Err(r) => *r,
                }
            }),
        )
        .route(
            "/raft/snapshot",
            post(|State(raft): State<Raft>, body: Bytes| async move {
                match decode::<InstallSnapshotRequest<TypeConfig>>(&body) {
                    Ok(req) => json(&raft.install_snapshot(req).await),
                    Err(r) => *r,
                }
            }),
        )
        .with_state(raft.clone())
        .merge(
            Router::new()
                .route(
                    "/cluster/propose",
                    post(
                        |State(p): State<Arc<super::Proposer>>, body: Bytes| async move {
                            match decode::<LeaderRequest>(&body) {
                                Ok(request) => json(&p.here(request).await),
                                Err(r) => *r,
                            }
                        },
                    ),
                )
                .with_state(proposer),
        )
        .merge(
            Router::new()
                .route(
                    "/cluster/join",
                    post(|State(raft): State<Raft>, body: Bytes| async move {
                        let join = match decode::<Join>(&body) {
                            Ok(j) => j,
                            Err(r) => return *r,
                        };
                        let node = BasicNode { addr: join.addr };
                        match raft.add_learner(join.id as u64, node, true).await {
                            Ok(_) => StatusCode::NO_CONTENT.into_response(),
                            Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
                        }
                    }),
                )
                .with_state(raft),
        )
        .merge(
            Router::new()
                .route(
                    "/cluster/heartbeat",
                    post(
                        |State(l): State<Arc<super::controller::Liveness>>, body: Bytes| async move {
                            match decode::<super::controller::Heartbeat>(&body) {
                                Ok(hb) => {
                                    l.heard(&hb);
                                    StatusCode::NO_CONTENT.into_response()
                                }
                                Err(r) => *r,
                            }
                        },
                    ),
                )
                .with_state(liveness),
        )
}
