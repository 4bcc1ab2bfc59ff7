//! The file source (tails files matched by globs, surviving rotation) and the file sink
//! (appends NDJSON or lines, exactly once through a manifest). The user documentation is
//! `docs/connectors/file.md`.

mod json;
mod sink;
mod source;
mod tailer;

pub use sink::{FileSink, FileSinkConfig, RollConfig, SinkFormat};
pub use source::{FileSource, FileSourceConfig, SourceFormat, StartAt, WatchMode};
