//! What a single node keeps about its users and ACLs, each in one JSON file under
//! `<data-dir>/meta/`, replaced atomically (a cluster keeps the same in its metadata image).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use parking_lot::RwLock;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub struct LocalFile<T> {
    path: PathBuf,
    value: RwLock<Arc<T>>,
}

impl<T: Serialize + DeserializeOwned + Clone + Default> LocalFile<T> {
    /// Reads `<data-dir>/meta/<name>`; a missing file is the default value.
    pub fn open(data_dir: &Path, name: &str) -> Result<LocalFile<T>> {
        let path = data_dir.join("meta").join(name);
        let value = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("cannot read {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => T::default(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        Ok(LocalFile {
            path,
            value: RwLock::new(Arc::new(value)),
        })
    }

    /// The current value; cheap (shared until the next change).
    pub fn get(&self) -> Arc<T> {
        self.value.read().clone()
    }

    /// Changes and persists the value; on a write error nothing changes.
    pub fn update(&self, change: impl FnOnce(&mut T)) -> Result<()> {
        let mut current = self.value.write();
        let mut next = T::clone(&current);
        change(&mut next);
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        crate::log::write_atomically(&self.path, &serde_json::to_vec_pretty(&next)?)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        *current = Arc::new(next);
        Ok(())
    }
}
