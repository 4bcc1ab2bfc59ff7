//! The systems under test: weir and its peers, each started fresh for every measurement.

pub mod nats_jetstream;
pub mod redis_streams;
pub mod weir;

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::workload::{measure, Durability, Measurement, Settings, Workload};
use redis_streams::Persistence;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Weir,
    Redis,
    RedisAofEverysec,
    RedisAofAlways,
    Nats,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Weir,
        Kind::Redis,
        Kind::RedisAofEverysec,
        Kind::RedisAofAlways,
        Kind::Nats,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Weir => "weir",
            Kind::Redis => "redis",
            Kind::RedisAofEverysec => "redis-aof-everysec",
            Kind::RedisAofAlways => "redis-aof-always",
            Kind::Nats => "nats-jetstream",
        }
    }

    /// What this system's acknowledgement means, in a few words.
    pub fn config(self, d: Durability) -> &'static str {
        match (self, d) {
            (Kind::Weir, Durability::Ack1) => "acks=1 (page cache)",
            (Kind::Weir, Durability::Fsync) => "acks=all, flush.messages=1 (fsync before ack)",
            (Kind::Weir, Durability::Rf3) => {
                "3 nodes, replication factor 3, min.insync.replicas=3, acks=all (page cache)"
            }
            (Kind::Redis, _) => "in memory, --save \"\" --appendonly no",
            (Kind::RedisAofEverysec, _) => "AOF, fsync every second",
            (Kind::RedisAofAlways, _) => "AOF, fsync before reply",
            (Kind::Nats, _) => "file storage, fsync every 2 min (server default)",
        }
    }

    /// Whether this system runs in workloads of durability `d`: only configurations whose
    /// acknowledgement means the same thing are compared.
    pub fn runs_in(self, d: Durability) -> bool {
        match self {
            Kind::Weir => true,
            Kind::Redis | Kind::RedisAofEverysec | Kind::Nats => d == Durability::Ack1,
            Kind::RedisAofAlways => d == Durability::Fsync,
        }
    }
}

/// Where the server binaries are.
pub struct Programs {
    pub weir: PathBuf,
    pub redis: PathBuf,
    pub nats: PathBuf,
}

/// Starts a fresh `kind` under `dir`, measures `w`, stops it.
pub async fn run(
    kind: Kind,
    w: &Workload,
    s: &Settings,
    programs: &Programs,
    dir: &Path,
) -> Result<Measurement> {
    let size = w.record_size;
    let redis = |p| redis_streams::RedisStreams::start(&programs.redis, dir, p, s, size);
    match kind {
        Kind::Weir => {
            let mut sys = weir::Weir::start(&programs.weir, dir, w.durability, s).await?;
            measure(&mut sys, w, s).await
        }
        Kind::Redis => measure(&mut redis(Persistence::None).await?, w, s).await,
        Kind::RedisAofEverysec => measure(&mut redis(Persistence::AofEverysec).await?, w, s).await,
        Kind::RedisAofAlways => measure(&mut redis(Persistence::AofAlways).await?, w, s).await,
        Kind::Nats => {
            let mut sys =
                nats_jetstream::NatsJetStream::start(&programs.nats, dir, s, size).await?;
            measure(&mut sys, w, s).await
        }
    }
}
