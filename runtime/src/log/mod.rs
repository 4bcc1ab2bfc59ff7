//! Storage: partitions made of segment files holding Kafka v2 record batches.

pub mod batch;
pub mod cleaner;
pub mod config;
pub mod epoch;
pub mod internal;
pub mod manager;
pub mod partition;
pub mod producer_state;
pub mod segment;

use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `data` so that a crash leaves either the old or the new content.
pub fn write_atomically(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_data()?;
    std::fs::rename(&tmp, path)
}
