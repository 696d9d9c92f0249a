//! Log set-up for the binary: human-readable lines (colours only on a terminal) or one JSON object
//! per line for cluster log collectors, every line saying which rank wrote it, and the final error
//! in the same format as the rest of the log.
//!
//! A JSON line is `{"timestamp": RFC 3339 UTC, "level", "target", "rank", "fields": {"message", ...}}`
//! (tracing-subscriber's JSON layout plus `rank`). In human format the rank prefixes each line only
//! when the job has more than one rank.

use std::fmt::{self, Write as _};

use serde_json::{json, Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// Who is logging: this process's rank in a job of `world` ranks.
#[derive(Debug, Clone, Copy)]
pub struct LogSetup {
    pub format: LogFormat,
    pub rank: usize,
    pub world: usize,
}

impl LogSetup {
    /// Install the global subscriber. Rank 0 logs at `info`, the others at `warn` (`RUST_LOG`
    /// overrides both); progress follows the same split ([`crate::progress::configure`]).
    pub fn init(self) {
        let default = if self.rank == 0 { "info" } else { "warn" };
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
        // Colours only on a terminal: cluster logs and redirected files stay plain text.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
        match self.format {
            LogFormat::Human => {
                let rank = (self.world > 1).then_some(self.rank);
                builder.event_format(RankPrefixed { inner: tracing_subscriber::fmt::format(), rank }).init()
            }
            LogFormat::Json => builder.event_format(JsonLine { rank: self.rank }).init(),
        }
        crate::progress::configure(self.rank == 0, self.format == LogFormat::Human);
    }

    /// Write the error that ends the process, straight to stderr (no log filter can hide it): a
    /// JSON line in JSON mode, else `error: ...` (`rank R: error: ...` in a multi-rank job).
    pub fn fatal(&self, message: &str, exit_code: i32) {
        let line = match self.format {
            LogFormat::Json => {
                let mut fields = Map::new();
                fields.insert("message".into(), json!(message));
                fields.insert("exit_code".into(), json!(exit_code));
                json_line(self.rank, "ERROR", "unlearn", fields)
            }
            LogFormat::Human if self.world > 1 => format!("rank {}: error: {message}", self.rank),
            LogFormat::Human => format!("error: {message}"),
        };
        // One write: the errors of several ranks reach one log at once and must not interleave.
        crate::error::print_line(&line);
    }
}

/// The default human format behind `rank R: `.
struct RankPrefixed<F> {
    inner: F,
    rank: Option<usize>,
}

impl<S, N, F> FormatEvent<S, N> for RankPrefixed<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        if let Some(rank) = self.rank {
            write!(writer, "rank {rank}: ")?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

struct JsonLine {
    rank: usize,
}

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut fields = FieldsToJson(Map::new());
        event.record(&mut fields);
        let meta = event.metadata();
        writeln!(writer, "{}", json_line(self.rank, meta.level().as_str(), meta.target(), fields.0))
    }
}

fn json_line(rank: usize, level: &str, target: &str, fields: Map<String, Value>) -> String {
    let mut timestamp = String::new();
    if SystemTime.format_time(&mut Writer::new(&mut timestamp)).is_err() {
        timestamp.clear();
    }
    json!({"timestamp": timestamp, "level": level, "target": target, "rank": rank, "fields": fields}).to_string()
}

/// An event's fields as JSON values (numbers and booleans stay typed; the rest as text).
struct FieldsToJson(Map<String, Value>);

impl Visit for FieldsToJson {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), json!(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), json!(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), json!(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), json!(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), json!(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let mut s = String::new();
        let _ = write!(s, "{value:?}");
        self.0.insert(field.name().into(), json!(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_carry_rank_level_target_and_typed_fields() {
        let mut fields = Map::new();
        fields.insert("message".into(), json!("step 3/10"));
        fields.insert("loss".into(), json!(0.5));
        let v: Value = serde_json::from_str(&json_line(3, "INFO", "unlearn::train", fields)).unwrap();
        assert_eq!(v["rank"], 3);
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "unlearn::train");
        assert_eq!(v["fields"], json!({"message": "step 3/10", "loss": 0.5}));
        let ts = v["timestamp"].as_str().unwrap();
        assert!(ts.len() >= 20 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
    }
}
