//! Child server processes: starting them on free loopback ports, stopping them, and reading
//! their CPU time and peak memory from /proc.
//!
//! `weir bench` (runtime/src/cli/bench.rs) reads the same two /proc fields for the daemon it
//! starts; its helpers are private to that module, hence these.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A server started for one measurement: SIGTERM, then SIGKILL after 10 s, on drop; its scratch
/// directory is removed afterwards.
pub struct Server {
    pub name: String,
    child: Child,
    dir: PathBuf,
}

impl Server {
    /// Starts `cmd` (its output discarded unless `WEIR_BENCH_SERVER_LOGS` is set); `dir` is the
    /// scratch directory it owns.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Result<Server> {
        let inherit = std::env::var_os("WEIR_BENCH_SERVER_LOGS").is_some();
        let out = || {
            if inherit {
                Stdio::inherit()
            } else {
                Stdio::null()
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out())
            .stderr(out())
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(Server {
            name: name.to_string(),
            child,
            dir: dir.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the server has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status})", self.name);
        }
        Ok(())
    }

    /// Waits until the server accepts TCP connections on `addr`.
    pub async fn wait_listening(&mut self, addr: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.check_running()?;
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not listen on {addr} within 30 s", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// CPU seconds (user + system, all threads) used by the server so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(self.pid())
    }

    /// The server's peak resident memory (VmHWM) in MiB.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// CPU seconds used so far by all of `servers` together.
pub fn servers_cpu_seconds(servers: &[Server]) -> Option<f64> {
    servers.iter().map(Server::cpu_seconds).sum()
}

/// The servers' peak resident memory (VmHWM), added up, in MiB.
pub fn peak_rss_mib(servers: &[Server]) -> Option<f64> {
    servers.iter().map(Server::peak_rss_mib).sum()
}

/// CPU seconds (user + system) used so far by process `pid` (or "self").
pub fn cpu_seconds(pid: impl std::fmt::Display) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

/// Steal time of the whole machine since boot (the hypervisor running something else on our
/// virtual CPUs), from /proc/stat.
pub fn steal_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    // cpu user nice system idle iowait irq softirq steal ...
    let steal: f64 = stat
        .lines()
        .next()?
        .split_whitespace()
        .nth(8)?
        .parse()
        .ok()?;
    Some(steal / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

/// CPU seconds used so far by every user-space process except `exclude`, per pid, counting
/// the children each has reaped (so short-lived compiler or test processes are seen through
/// their parents). Kernel threads are left out: the writeback they do for the system under
/// test is part of its cost, not a neighbour's.
pub fn other_processes_cpu(exclude: &[u32]) -> HashMap<u32, f64> {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if exclude.contains(&pid) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let num = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if num(6) & PF_KTHREAD != 0 {
            continue;
        }
        let ticks = num(11) + num(12) + num(13) + num(14);
        out.insert(pid, ticks as f64 / hz);
    }
    out
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `name` as given if it holds a slash, else the first match on PATH or in the sbin folders
/// (Debian installs nats-server in /usr/sbin, which is not on every user's PATH).
pub fn find_program(name: &str) -> Result<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        if p.is_file() {
            return Ok(p);
        }
        bail!("{name} does not exist");
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found on PATH (bench/run installs it)"))
}

/// Flushes dirty pages so one measurement's writeback does not land in the next one.
pub fn settle() {
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_millis(200));
}
