//! Precompiled modules on disk, so that a restart (or another `weir plugin test`) does not
//! compile the same plugin again.
//!
//! A file is named after the SHA-256 of the module's bytes and the engine's compatibility hash
//! (wasmtime version, compiler settings, host CPU features), so a changed plugin or a changed
//! weir never picks up a stale artifact; wasmtime checks the artifact's header again when loading
//! it. Loading an artifact runs its machine code, so only files in a directory that weir created
//! for itself (mode 0700) and that nobody else may write are used.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::{Engine, Module};

/// The cache key of `wasm` compiled by `engine`.
pub(crate) fn key(engine: &Engine, wasm: &[u8]) -> String {
    let digest = Sha256::digest(wasm);
    let mut compat = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut compat);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}-{:016x}", compat.finish())
}

pub(crate) struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    /// Use (and create, mode 0700) `dir`.
    pub(crate) fn open(dir: &Path) -> std::io::Result<DiskCache> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        Ok(DiskCache {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.cwasm"))
    }

    /// The module stored under `key`, if there is a usable one.
    pub(crate) fn load(&self, engine: &Engine, key: &str) -> Option<Module> {
        let path = self.path(key);
        let meta = fs::metadata(&path).ok()?;
        let dir_mode = fs::metadata(&self.dir).ok()?.permissions().mode();
        if meta.permissions().mode() & 0o022 != 0 || dir_mode & 0o022 != 0 {
            tracing::warn!(
                path = %path.display(),
                "ignoring a precompiled plugin that others may write; compiling the module instead"
            );
            return None;
        }
        // Read into memory rather than `Module::deserialize_file`, which maps the file: a file
        // truncated under a mapping would crash the process with SIGBUS.
        let bytes = fs::read(&path).ok()?;
        // SAFETY: the file was written by `store` below from `Module::serialize` of this
        // engine's configuration (the key includes its compatibility hash, and wasmtime checks
        // the artifact header again), in a directory only this user can write.
        match unsafe { Module::deserialize(engine, &bytes) } {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(path = %path.display(), "discarding an unusable precompiled plugin: {e:#}");
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Store `module` under `key` (atomically: a reader never sees a partial file).
    pub(crate) fn store(&self, key: &str, module: &Module) {
        if let Err(e) = self.try_store(key, module) {
            tracing::warn!(dir = %self.dir.display(), "could not cache a compiled plugin: {e:#}");
        }
    }

    fn try_store(&self, key: &str, module: &Module) -> wasmtime::Result<()> {
        let bytes = module.serialize()?;
        let path = self.path(key);
        let tmp = self
            .dir
            .join(format!("{key}.cwasm.tmp.{}", std::process::id()));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &path)?;
        Ok(())
    }
}
