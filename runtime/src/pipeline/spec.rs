//! The pipeline file: one YAML file, one pipeline (docs/pipelines.md documents every field).
//!
//! `${NAME}` is replaced by the environment variable NAME before parsing, `${NAME:-default}`
//! falls back to the default when NAME is unset, `${file:PATH}` by the file's content without
//! its final newline (secrets kept out of the pipeline file; `$${` writes a literal `${`). Every error names the file, line and column, and the field.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::log::config::validate_topic_name;
use crate::security::http::Secret;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    pub name: String,
    #[serde(with = "serde_yaml::with::singleton_map_recursive")]
    pub source: SourceSpec,
    /// WASM plugins applied in order.
    #[serde(default)]
    pub transforms: Vec<TransformSpec>,
    /// The topic the source's records go to. Optional when the source is a topic and there
    /// are no transforms: the sinks then read the source topic itself.
    pub topic: Option<TopicSpec>,
    #[serde(default, with = "serde_yaml::with::singleton_map_recursive")]
    pub sinks: Vec<SinkSpec>,
    #[serde(default)]
    pub errors: ErrorPolicy,
    #[serde(default)]
    pub delivery: Delivery,
    /// Most records the source hands over in one batch (one transaction).
    #[serde(default = "default_batch_records")]
    pub batch_records: usize,
    /// On a cluster, the node that runs this pipeline (a file source reads that node's disk);
    /// unset, any node that has the file may.
    #[serde(default)]
    pub node: Option<i32>,
}

fn default_batch_records() -> usize {
    1000
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceSpec {
    /// Files matched by globs, followed as they grow and rotate (docs/connectors/file.md).
    File(weir_connectors::file::FileSourceConfig),
    /// Records POSTed to the daemon's HTTP address.
    Http(HttpSourceSpec),
    /// A URL fetched every interval, with a cursor (docs/connectors/http.md).
    HttpPoll(weir_connectors::http::HttpPollSourceConfig),
    /// Rows of a table or query, by an incrementing and/or timestamp column
    /// (docs/connectors/sql.md).
    Sql(weir_connectors::sql::SqlSourceConfig),
    /// An existing topic.
    Topic(TopicSourceSpec),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSourceSpec {
    /// Where the endpoint is mounted, e.g. /ingest/activity.
    pub path: String,
    #[serde(default)]
    pub format: BodyFormat,
    /// Larger bodies get 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Requests waiting for their records to be written; more get 503 with Retry-After.
    #[serde(default = "default_max_pending_requests")]
    pub max_pending_requests: usize,
    /// A bearer token posters must present (write `${ENV}` or `${file:PATH}`, not the token).
    #[serde(default)]
    pub token: Option<Secret>,
}

fn default_max_body_bytes() -> usize {
    10 << 20
}

fn default_max_pending_requests() -> usize {
    64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyFormat {
    /// One JSON value; an array is one record per element.
    #[default]
    Json,
    /// One JSON value per line.
    Ndjson,
    /// One record per line, as text.
    Lines,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSourceSpec {
    pub name: String,
    /// Where to start the first time: beginning (default) or end.
    #[serde(default)]
    pub start_at: StartAt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    #[default]
    Beginning,
    End,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformSpec {
    pub plugin: PathBuf,
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub name: String,
    /// Partitions when the topic is created; an existing topic keeps its own.
    pub partitions: Option<i32>,
    /// JSON field whose value is the record key (Kafka's partitioner then places it);
    /// absent: no key, records spread round robin.
    pub key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkSpec {
    /// A file, NDJSON or lines, rolled by size or age (docs/connectors/file.md).
    File(weir_connectors::file::FileSinkConfig),
    /// POSTed batches, at least once with an Idempotency-Key (docs/connectors/http.md).
    Http(weir_connectors::http::HttpSinkConfig),
    /// Rows inserted or upserted, exactly once (docs/connectors/sql.md).
    Sql(weir_connectors::sql::SqlSinkConfig),
    /// Another topic.
    Topic(TopicSinkSpec),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSinkSpec {
    pub name: String,
    /// Partitions when the topic is created.
    pub partitions: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorPolicy {
    #[serde(default)]
    pub tolerance: Tolerance,
    /// Where failed records go with tolerance all [default: <name>.dlq].
    pub dead_letter_topic: Option<String>,
    /// Attempts at a transient failure (a sink's database down, say) before the pipeline
    /// stops; 0 retries for ever.
    #[serde(default)]
    pub max_retries: u32,
}

impl Default for ErrorPolicy {
    fn default() -> Self {
        ErrorPolicy {
            tolerance: Tolerance::None,
            dead_letter_topic: None,
            max_retries: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tolerance {
    /// A record that fails a stage stops the pipeline, which reports why.
    #[default]
    None,
    /// A record that fails a stage goes to the dead-letter topic and the pipeline goes on.
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Records and source offsets are written in one transaction.
    #[default]
    ExactlyOnce,
    /// Records first, then the offsets: a crash between the two repeats a batch.
    AtLeastOnce,
}

/// A pipeline file that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct SpecError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl SpecError {
    /// An error about `field` (`source.http.path`, `transforms[0].plugin`) of the file whose
    /// content is `text`, placed at the field's line and column.
    pub fn at_field(file: &Path, text: &str, field: &str, message: impl std::fmt::Display) -> Self {
        let (line, column) = locate(text, field);
        SpecError {
            file: file.to_path_buf(),
            line,
            column,
            message: format!("{field}: {message}"),
        }
    }
}

impl PipelineSpec {
    pub fn load(path: &Path) -> Result<PipelineSpec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| SpecError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(path, &text, |name| std::env::var(name).ok())
    }

    /// Parses `text` (the content of `file`), taking `${NAME}` values from `env`.
    pub fn parse(
        file: &Path,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<PipelineSpec, SpecError> {
        let err = |line: usize, column: usize, message: String| SpecError {
            file: file.to_path_buf(),
            line,
            column,
            message,
        };
        let text = interpolate(text, env).map_err(|(line, column, m)| err(line, column, m))?;
        let spec: PipelineSpec = serde_yaml::from_str(&text).map_err(|e| {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            err(line, column, e.to_string())
        })?;
        spec.validate().map_err(|(field, message)| {
            let (line, column) = locate(&text, &field);
            err(line, column, format!("{field}: {message}"))
        })?;
        Ok(spec)
    }

    /// The stages in order, one short description each (`http /ingest/x`, `plugin a.wasm`,
    /// `topic orders`, `sql sink`), for the console's diagram.
    pub fn flow(&self) -> Vec<String> {
        let mut out = vec![match &self.source {
            SourceSpec::File(_) => "file source".to_string(),
            SourceSpec::Http(h) => format!("http {}", h.path),
            SourceSpec::HttpPoll(_) => "http poll source".to_string(),
            SourceSpec::Sql(_) => "sql source".to_string(),
            SourceSpec::Topic(t) => format!("topic {}", t.name),
        }];
        for t in &self.transforms {
            let file = t
                .plugin
                .file_name()
                .map(|f| f.to_string_lossy().into_owned());
            out.push(format!("plugin {}", file.unwrap_or_default()));
        }
        if let Some(t) = &self.topic {
            out.push(format!("topic {}", t.name));
        }
        for s in &self.sinks {
            out.push(match s {
                SinkSpec::File(_) => "file sink".to_string(),
                SinkSpec::Http(_) => "http sink".to_string(),
                SinkSpec::Sql(_) => "sql sink".to_string(),
                SinkSpec::Topic(t) => format!("topic {}", t.name),
            });
        }
        out
    }

    /// The topic the sinks read.
    pub fn sink_input_topic(&self) -> &str {
        match (&self.topic, &self.source) {
            (Some(t), _) => &t.name,
            (None, SourceSpec::Topic(t)) => &t.name,
            (None, _) => unreachable!("validate() requires a topic for other sources"),
        }
    }

    pub fn dead_letter_topic(&self) -> String {
        self.errors
            .dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.name))
    }

    /// Cross-field rules serde cannot express: (field path, message).
    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, m: String| Err((field.to_string(), m));
        if validate_topic_name(&self.name).is_err() {
            return bad(
                "name",
                format!(
                    "'{}' is not a valid name (letters, digits, '.', '_', '-'; at most 249)",
                    self.name
                ),
            );
        }
        match &self.source {
            SourceSpec::Http(h) => {
                if !h.path.starts_with('/') || h.path.len() < 2 {
                    return bad(
                        "source.http.path",
                        format!("'{}' must start with '/'", h.path),
                    );
                }
                if h.path == "/health" || h.path.starts_with("/pipelines") {
                    return bad(
                        "source.http.path",
                        format!("'{}' is used by the daemon's own API", h.path),
                    );
                }
                if h.max_pending_requests == 0 || h.max_body_bytes == 0 {
                    return bad(
                        "source.http",
                        "max_body_bytes and max_pending_requests must be positive".into(),
                    );
                }
            }
            SourceSpec::Topic(t) => {
                if let Err(e) = validate_topic_name(&t.name) {
                    return bad("source.topic.name", e.to_string());
                }
            }
            SourceSpec::HttpPoll(_) | SourceSpec::Sql(_) => {}
            SourceSpec::File(f) => {
                if f.paths.is_empty() {
                    return bad(
                        "source.file.paths",
                        "needs at least one path or glob".into(),
                    );
                }
            }
        }
        match (&self.topic, &self.source) {
            (None, SourceSpec::Topic(_)) if !self.transforms.is_empty() => {
                return bad(
                    "topic",
                    "transforms need an output topic: add `topic: { name: ... }`".into(),
                )
            }
            (None, SourceSpec::Topic(_)) => {}
            (None, _) => {
                return bad(
                    "topic",
                    "missing: where should the source's records go?".into(),
                )
            }
            (Some(t), _) => {
                if let Err(e) = validate_topic_name(&t.name) {
                    return bad("topic.name", e.to_string());
                }
                if t.partitions.is_some_and(|p| p < 1) {
                    return bad("topic.partitions", "must be at least 1".into());
                }
                if let SourceSpec::Topic(s) = &self.source {
                    if s.name == t.name {
                        return bad(
                            "topic.name",
                            "the output topic cannot be the source topic".into(),
                        );
                    }
                }
            }
        }
        for (i, sink) in self.sinks.iter().enumerate() {
            match sink {
                SinkSpec::Topic(t) => {
                    if let Err(e) = validate_topic_name(&t.name) {
                        return bad(&format!("sinks[{i}].topic.name"), e.to_string());
                    }
                    if t.name == self.sink_input_topic() {
                        return bad(
                            &format!("sinks[{i}].topic.name"),
                            "a sink cannot write the topic it reads".into(),
                        );
                    }
                }
                SinkSpec::File(_) | SinkSpec::Http(_) | SinkSpec::Sql(_) => {}
            }
        }
        if let Some(d) = &self.errors.dead_letter_topic {
            if let Err(e) = validate_topic_name(d) {
                return bad("errors.dead_letter_topic", e.to_string());
            }
        }
        if self.node.is_some_and(|n| n < 0) {
            return bad("node", "must be a node id (0 or more)".into());
        }
        if self.batch_records == 0 {
            return bad("batch_records", "must be at least 1".into());
        }
        Ok(())
    }
}

/// Replaces `${NAME}`; an unset variable is an error at its (line, column).
fn interpolate(
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, (usize, usize, String)> {
    let mut out = String::with_capacity(text.len());
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        let mut col = 1;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            col += rest[..at].chars().count();
            let tail = &rest[at..];
            if let Some(escaped) = tail.strip_prefix("$${") {
                out.push_str("${");
                rest = escaped;
                col += 3;
            } else if let Some(open) = tail.strip_prefix("${") {
                let Some(end) = open.find('}') else {
                    return Err((
                        n + 1,
                        col,
                        "unterminated ${ (write $${ for a literal)".into(),
                    ));
                };
                let inner = &open[..end];
                if let Some(file) = inner.strip_prefix("file:") {
                    match std::fs::read_to_string(file) {
                        Ok(text) => out.push_str(text.strip_suffix('\n').unwrap_or(&text)),
                        Err(e) => return Err((n + 1, col, format!("cannot read {file}: {e}"))),
                    }
                    rest = &open[end + 1..];
                    col += inner.chars().count() + 3;
                    continue;
                }
                let (name, default) = match inner.split_once(":-") {
                    Some((name, default)) => (name, Some(default)),
                    None => (inner, None),
                };
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err((n + 1, col, format!("'${{{inner}}}' is not a variable name")));
                }
                match env(name).or(default.map(str::to_string)) {
                    Some(v) => out.push_str(&v),
                    None => {
                        return Err((
                            n + 1,
                            col,
                            format!("environment variable {name} is not set"),
                        ))
                    }
                }
                rest = &open[end + 1..];
                col += inner.chars().count() + 3;
            } else {
                out.push('$');
                rest = &tail[1..];
                col += 1;
            }
        }
        out.push_str(rest);
    }
    Ok(out)
}

/// Best-effort (line, column) of a field path like `source.http.path` or `sinks[1].topic.name`:
/// the line of its last key at the right nesting, else of the nearest parent found.
fn locate(text: &str, field: &str) -> (usize, usize) {
    let keys: Vec<&str> = field
        .split('.')
        .map(|k| k.split('[').next().unwrap_or(k))
        .collect();
    let mut found = (1, 1);
    let mut from_line = 0;
    for key in keys {
        let hit = text.lines().enumerate().skip(from_line).find_map(|(i, l)| {
            let trimmed = l.trim_start().trim_start_matches("- ");
            let col = l.len() - trimmed.len() + 1;
            (trimmed.starts_with(&format!("{key}:")) || trimmed.starts_with(&format!("{{ {key}:")))
                .then_some((i, col))
        });
        match hit {
            Some((i, col)) => {
                found = (i + 1, col);
                from_line = i;
            }
            None => break,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PipelineSpec, SpecError> {
        PipelineSpec::parse(Path::new("p.yaml"), text, |n| {
            (n == "TOKEN").then(|| "s3cret".to_string())
        })
    }

    #[test]
    fn a_full_file_parses() {
        let spec = parse(
            "name: activity\nsource:\n  http:\n    path: /ingest/activity\n    format: ndjson\n\
             topic:\n  name: activity\n  partitions: 6\n  key: user_id\n\
             sinks:\n  - topic: { name: activity-copy }\n\
             errors:\n  tolerance: all\n\
             delivery: at_least_once\n",
        )
        .unwrap();
        assert_eq!(spec.name, "activity");
        assert_eq!(spec.dead_letter_topic(), "activity.dlq");
        assert_eq!(spec.delivery, Delivery::AtLeastOnce);
        assert_eq!(spec.errors.tolerance, Tolerance::All);
        assert_eq!(spec.topic.as_ref().unwrap().key.as_deref(), Some("user_id"));
        assert_eq!(spec.sinks.len(), 1);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e =
            parse("name: a\nsource:\n  http:\n    pathh: /x\ntopic: { name: t }\n").unwrap_err();
        assert_eq!((e.line, e.file.as_path()), (4, Path::new("p.yaml")));
        assert!(e.message.contains("pathh"), "{e}");
        let e = parse("name: a\nsource:\n  http:\n    path: x\ntopic: { name: t }\n").unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.starts_with("source.http.path:"), "{e}");
        let e = parse("name: a\nsource:\n  http: { path: /x }\n").unwrap_err();
        assert!(e.message.starts_with("topic: missing"), "{e}");
        let e = parse("name: a\nsource:\n  ftp: { path: /x }\ntopic: { name: t }\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("ftp"), "{e}");
    }

    #[test]
    fn environment_variables_are_interpolated() {
        let spec =
            parse("name: a\nsource:\n  http: { path: /x/${TOKEN} }\ntopic: { name: t }\n").unwrap();
        let SourceSpec::Http(h) = &spec.source else {
            panic!()
        };
        assert_eq!(h.path, "/x/s3cret");
        let e = parse("name: a\nsource:\n  http: { path: /${MISSING} }\ntopic: { name: t }\n")
            .unwrap_err();
        assert_eq!((e.line, e.column), (3, 18), "{e}");
        assert!(e.message.contains("MISSING is not set"));
        let spec =
            parse("name: a\nsource:\n  http: { path: /${MISSING:-x/y} }\ntopic: { name: t }\n")
                .unwrap();
        let SourceSpec::Http(h) = &spec.source else {
            panic!()
        };
        assert_eq!(h.path, "/x/y");
        let spec = parse("name: a\nsource:\n  http:\n    path: \"/a$${b}\"\ntopic: { name: t }\n")
            .unwrap();
        let SourceSpec::Http(h) = &spec.source else {
            panic!()
        };
        assert_eq!(h.path, "/a${b}");
    }

    #[test]
    fn secrets_come_from_files_and_stay_out_of_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "tok-123\n").unwrap();
        let text = format!(
            "name: a\nsource:\n  http: {{ path: /in, token: \"${{file:{}}}\" }}\ntopic: {{ name: t }}\n",
            file.display()
        );
        let spec = parse(&text).unwrap();
        let SourceSpec::Http(h) = &spec.source else {
            panic!()
        };
        assert_eq!(h.token.as_deref(), Some("tok-123"));
        assert!(!format!("{spec:?}").contains("tok-123"));
        let e = parse("name: a\nsource:\n  http: { path: /in, token: \"${file:/nonexistent/t}\" }\ntopic: { name: t }\n")
            .unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("cannot read /nonexistent/t"), "{e}");
    }

    #[test]
    fn a_topic_source_may_feed_sinks_directly() {
        let spec = parse("name: copy\nsource:\n  topic: { name: orders }\nsinks:\n  - topic: { name: orders-copy }\n").unwrap();
        assert_eq!(spec.sink_input_topic(), "orders");
        let e = parse(
            "name: copy\nsource:\n  topic: { name: orders }\nsinks:\n  - topic: { name: orders }\n",
        )
        .unwrap_err();
        assert!(e.message.contains("cannot write the topic it reads"), "{e}");
    }
}
