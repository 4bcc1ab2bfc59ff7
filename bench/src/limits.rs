//! The machine's limits, measured in the same run: sequential disk write (dd, with and without
//! conv=fdatasync), fsync latency (4 KiB appends each followed by fdatasync) and loopback TCP
//! (throughput of one tokio sender/receiver pair, and the round trip of a 64-byte ping-pong).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::workload::{histogram, Percentiles};

#[derive(Clone, Debug)]
pub struct LimitSettings {
    pub dd_mib: u64,
    pub fsyncs: usize,
    pub loopback_secs: f64,
    pub pings: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Limits {
    /// dd without conv=fdatasync: writes into the page cache.
    pub dd_page_cache_mb_s: f64,
    /// dd with conv=fdatasync: the disk's sustained sequential write rate.
    pub dd_fdatasync_mb_s: f64,
    pub fsync: Percentiles,
    pub loopback_mb_s: f64,
    pub loopback_rtt: Percentiles,
}

impl Limits {
    pub fn json(&self) -> Value {
        json!({
            "dd_page_cache_mb_per_sec": self.dd_page_cache_mb_s,
            "dd_fdatasync_mb_per_sec": self.dd_fdatasync_mb_s,
            "fsync_4k_ms": self.fsync.json(),
            "loopback_tcp_mb_per_sec": self.loopback_mb_s,
            "loopback_rtt_64b_ms": self.loopback_rtt.json(),
        })
    }
}

/// Measures everything; files go under `dir` (the filesystem the servers write to).
pub async fn measure(dir: &Path, s: &LimitSettings) -> Result<Limits> {
    std::fs::create_dir_all(dir)?;
    crate::proc::settle();
    let dd_page_cache_mb_s = dd(dir, s.dd_mib, false)?;
    crate::proc::settle();
    let dd_fdatasync_mb_s = dd(dir, s.dd_mib, true)?;
    let fsync = fsync_latency(dir, s.fsyncs)?;
    let loopback_mb_s = loopback_throughput(Duration::from_secs_f64(s.loopback_secs)).await?;
    let loopback_rtt = loopback_rtt(s.pings).await?;
    Ok(Limits {
        dd_page_cache_mb_s,
        dd_fdatasync_mb_s,
        fsync,
        loopback_mb_s,
        loopback_rtt,
    })
}

/// `dd if=/dev/zero bs=1M count=mib [conv=fdatasync]`: MB/s as dd reports the time.
fn dd(dir: &Path, mib: u64, fdatasync: bool) -> Result<f64> {
    let file = dir.join("dd.tmp");
    let mut cmd = Command::new("dd");
    cmd.arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .args(["bs=1M", &format!("count={mib}")]);
    if fdatasync {
        cmd.arg("conv=fdatasync");
    }
    let out = cmd.output().context("cannot run dd")?;
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("dd failed: {text}");
    }
    let secs = dd_seconds(&text).ok_or_else(|| anyhow!("cannot parse dd output: {text}"))?;
    Ok(mib as f64 * 1024.0 * 1024.0 / secs / 1e6)
}

/// The elapsed time in dd's summary: "1073741824 bytes (1.1 GB, 1.0 GiB) copied, 1.234 s, 870 MB/s".
fn dd_seconds(text: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.contains(" copied, "))
        .flat_map(|l| l.split(", "))
        .find_map(|part| part.strip_suffix(" s").and_then(|s| s.trim().parse().ok()))
}

/// `n` appends of 4 KiB to one file, each followed by fdatasync (as a log appends and syncs).
fn fsync_latency(dir: &Path, n: usize) -> Result<Percentiles> {
    let path = dir.join("fsync.tmp");
    let mut file = std::fs::File::create(&path)?;
    let block = [0x5au8; 4096];
    let mut hist = histogram();
    for _ in 0..n {
        let started = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        let _ = hist.record((started.elapsed().as_micros() as u64).max(1));
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(Percentiles::from_us(&hist))
}

/// MB/s from one sender writing 256 KiB chunks to one receiver on 127.0.0.1.
async fn loopback_throughput(duration: Duration) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let receiver = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        let mut started = None;
        loop {
            let n = sock.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            started.get_or_insert_with(Instant::now);
            total += n as u64;
        }
        let secs = started.map_or(1.0, |s: Instant| s.elapsed().as_secs_f64());
        anyhow::Ok(total as f64 / secs / 1e6)
    });
    let mut sock = TcpStream::connect(addr).await?;
    let chunk = vec![0xa5u8; 256 * 1024];
    let started = Instant::now();
    while started.elapsed() < duration {
        sock.write_all(&chunk).await?;
    }
    sock.shutdown().await?;
    drop(sock);
    receiver.await?
}

/// Round trips of a 64-byte message between two tokio tasks over 127.0.0.1.
async fn loopback_rtt(n: usize) -> Result<Percentiles> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let echo = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await?;
        sock.set_nodelay(true)?;
        let mut buf = [0u8; 64];
        while sock.read_exact(&mut buf).await.is_ok() {
            sock.write_all(&buf).await?;
        }
        anyhow::Ok(())
    });
    let mut sock = TcpStream::connect(addr).await?;
    sock.set_nodelay(true)?;
    let mut buf = [7u8; 64];
    let mut hist = histogram();
    for _ in 0..n {
        let started = Instant::now();
        sock.write_all(&buf).await?;
        sock.read_exact(&mut buf).await?;
        let _ = hist.record((started.elapsed().as_micros() as u64).max(1));
    }
    drop(sock);
    echo.await??;
    Ok(Percentiles::from_us(&hist))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dd_summary() {
        let out = "1024+0 records in\n1024+0 records out\n\
                   1073741824 bytes (1.1 GB, 1.0 GiB) copied, 2.739 s, 392 MB/s\n";
        assert_eq!(dd_seconds(out), Some(2.739));
        assert_eq!(dd_seconds("dd: error writing"), None);
    }

    #[tokio::test]
    async fn measures_loopback_and_fsync() {
        let dir = std::env::temp_dir().join(format!("weir-bench-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fsync = fsync_latency(&dir, 5).unwrap();
        assert_eq!(fsync.samples, 5);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            loopback_throughput(Duration::from_millis(50))
                .await
                .unwrap()
                > 0.0
        );
        assert_eq!(loopback_rtt(10).await.unwrap().samples, 10);
    }
}
