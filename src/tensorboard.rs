//! TensorBoard event files next to a run's `metrics.jsonl`, so that `tensorboard --logdir runs/`
//! (and W&B's TensorBoard sync) plot a run while it trains.
//!
//! An event file is a TFRecord stream (each record: little-endian u64 length, its masked CRC-32C,
//! the bytes, their masked CRC-32C) of `tensorflow.Event` protos: first `file_version`, then one
//! `Summary` of `simple_value` scalars per step. A session starts with a `SessionLog.START` at the
//! step it continues from, which makes TensorBoard drop the points an earlier session wrote at or
//! after that step, as `metrics.jsonl` is truncated on resume.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use serde::Serialize;
use serde_json::Value;

use crate::error::{IoContext, Result};

/// `tensorflow.Event` (tensorflow/core/util/event.proto), the fields written here (tag 6 is the
/// deprecated `log_message`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
    #[prost(message, optional, tag = "7")]
    pub session_log: Option<SessionLog>,
}

/// `tensorflow.Summary` (tensorflow/core/framework/summary.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with a `simple_value` scalar.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// `tensorflow.SessionLog`; status 1 = START.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionLog {
    #[prost(int32, tag = "1")]
    pub status: i32,
}
const SESSION_START: i32 = 1;

/// Appends events to one new file `events.out.tfevents.<unix time>.<host>.<pid>.<n>` in a directory
/// (`n` counts the writers of this process, so that no file is ever replaced).
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// A new event file in `dir` for a session whose first step is `first_step` (1 for a fresh run,
    /// checkpoint step + 1 for a resumed one).
    pub fn create(dir: &Path, first_step: u64) -> Result<Self> {
        let now = wall_time();
        static WRITERS: AtomicU32 = AtomicU32::new(0);
        let n = WRITERS.fetch_add(1, Ordering::Relaxed);
        let name = format!("events.out.tfevents.{}.{}.{}.{n}", now as u64, hostname(), std::process::id());
        let path = dir.join(name);
        let file = File::options().write(true).create_new(true).open(&path).at(&path)?;
        let mut w = EventWriter { path, file };
        w.write(&Event { wall_time: now, file_version: Some("brain.Event:2".into()), ..Default::default() })?;
        w.write(&Event {
            wall_time: now,
            step: first_step as i64,
            session_log: Some(SessionLog { status: SESSION_START }),
            ..Default::default()
        })?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One step's scalars: every number in `record` (a metrics line), nested objects as `a/b`
    /// tags; `step`, nulls, strings and booleans are left out.
    pub fn scalars(&mut self, step: u64, record: &impl Serialize) -> Result<()> {
        let mut value = vec![];
        flatten_numbers("", &serde_json::to_value(record).expect("metrics serialize"), &mut value);
        value.retain(|v| v.tag != "step");
        self.write(&Event { wall_time: wall_time(), step: step as i64, summary: Some(Summary { value }), ..Default::default() })
    }

    /// Writes one record and flushes it, so that a reader sees every step as soon as it ends.
    fn write(&mut self, event: &Event) -> Result<()> {
        let record = tf_record(&event.encode_to_vec());
        self.file.write_all(&record).at(&self.path)?;
        self.file.flush().at(&self.path)
    }
}

fn flatten_numbers(prefix: &str, v: &Value, out: &mut Vec<SummaryValue>) {
    match v {
        Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.push(SummaryValue { tag: prefix.to_string(), simple_value: Some(x as f32) });
            }
        }
        Value::Object(m) => {
            for (k, v) in m {
                let tag = if prefix.is_empty() { k.clone() } else { format!("{prefix}/{k}") };
                flatten_numbers(&tag, v, out);
            }
        }
        _ => {}
    }
}

/// One TFRecord: length, masked CRC of the length, data, masked CRC of the data.
fn tf_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// TFRecord's checksum: CRC-32C rotated right by 15 bits plus a constant, so that a CRC of data
/// that itself holds CRCs stays well distributed.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), one table lookup per byte.
fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !data.iter().fold(!0u32, |c, &b| TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

fn wall_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer it is given.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let name = if ok { String::from_utf8_lossy(&buf[..buf.iter().position(|&b| b == 0).unwrap_or(0)]).into_owned() } else { String::new() };
    // The name goes into a file name: keep it to characters that are safe there.
    let clean: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')).collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // The CRC catalogue's check value for CRC-32C, and RFC 3720 (iSCSI) B.4's 32 zero bytes.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn records_frame_the_data_with_its_length_and_checksums() {
        let r = tf_record(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[8..12], &masked_crc32c(&3u64.to_le_bytes()).to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(&r[15..], &masked_crc32c(b"abc").to_le_bytes());
    }

    #[test]
    fn nested_numbers_become_slash_tags() {
        let mut out = vec![];
        let v = serde_json::json!({"step": 3, "lr": 0.5, "loss": null, "autolr": {"a": 2.0, "outcome": "fit"}});
        flatten_numbers("", &v, &mut out);
        let tags: Vec<(&str, f32)> = out.iter().map(|v| (v.tag.as_str(), v.simple_value.unwrap())).collect();
        assert_eq!(tags, [("autolr/a", 2.0), ("lr", 0.5), ("step", 3.0)]);
    }
}
