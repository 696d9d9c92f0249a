//! Progress of long work, on the main rank only: a bar on an interactive terminal, and elsewhere
//! (batch jobs, redirected logs, `--log-format json`) a log line through `tracing` every 10% of the
//! work or every 30 s, whichever comes first, with the items done, the rate and the ETA. Tenths
//! that pass within a second of the last line are folded into the next one, so that a stage that
//! takes a second logs one line, not ten.
//!
//! Whether this process is the main rank and whether bars may be drawn are decided once at
//! start-up by the binary ([`configure`]), so this module needs nothing from the distribution
//! layer; without that call (library use, tests) it reports as a single process off a terminal.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A line at least every this many seconds, and at every tenth of the work.
const LINE_EVERY: Duration = Duration::from_secs(30);
const LINE_FRACTION_STEPS: u64 = 10;
const MIN_GAP: Duration = Duration::from_secs(1);

const UNSET: u8 = 0;
const QUIET: u8 = 1;
const LINES: u8 = 2;
const BARS: u8 = 3;
static MODE: AtomicU8 = AtomicU8::new(UNSET);

/// Set once by the binary: `main_rank` reports progress (other ranks stay quiet); `bars_allowed`
/// when the log is human-readable (a bar would corrupt JSON lines). Bars are drawn only when stderr
/// is also a terminal; otherwise progress goes to the log as lines.
pub fn configure(main_rank: bool, bars_allowed: bool) {
    let mode = match (main_rank, bars_allowed && std::io::stderr().is_terminal()) {
        (false, _) => QUIET,
        (true, true) => BARS,
        (true, false) => LINES,
    };
    MODE.store(mode, Ordering::Relaxed);
}

fn mode() -> u8 {
    match MODE.load(Ordering::Relaxed) {
        UNSET => LINES,
        m => m,
    }
}

pub struct Progress(Inner);

enum Inner {
    Quiet,
    Bar(ProgressBar),
    Lines(Mutex<LineReporter>),
}

impl Progress {
    pub fn new(total: u64, label: &str) -> Self {
        Progress(match mode() {
            QUIET => Inner::Quiet,
            BARS => {
                let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
                bar.set_style(
                    ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                        .expect("static template")
                        .progress_chars("=> "),
                );
                bar.set_message(label.to_string());
                Inner::Bar(bar)
            }
            _ => Inner::Lines(Mutex::new(LineReporter::new(total, label, Instant::now()))),
        })
    }

    pub fn inc(&self, n: u64) {
        match &self.0 {
            Inner::Quiet => {}
            Inner::Bar(bar) => bar.inc(n),
            Inner::Lines(r) => {
                let mut r = r.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(line) = r.advance(n, Instant::now()) {
                    tracing::info!(target: "unlearn::progress", "{line}");
                }
            }
        }
    }

    pub fn finish(&self) {
        match &self.0 {
            Inner::Quiet => {}
            Inner::Bar(bar) => bar.finish_and_clear(),
            Inner::Lines(r) => {
                let r = r.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(line) = r.closing_line(Instant::now()) {
                    tracing::info!(target: "unlearn::progress", "{line}");
                }
            }
        }
    }
}

/// Decides when a progress line is due and writes it (pure: the clock is passed in).
struct LineReporter {
    label: String,
    total: u64,
    done: u64,
    start: Instant,
    last_line: Instant,
    /// Tenths of the work already reported.
    reported_tenths: u64,
    /// Items done when the last line was written.
    reported_done: u64,
}

impl LineReporter {
    fn new(total: u64, label: &str, now: Instant) -> Self {
        LineReporter { label: label.to_string(), total, done: 0, start: now, last_line: now, reported_tenths: 0, reported_done: 0 }
    }

    fn tenths(&self) -> u64 {
        if self.total == 0 {
            return LINE_FRACTION_STEPS;
        }
        self.done.min(self.total) * LINE_FRACTION_STEPS / self.total
    }

    fn advance(&mut self, n: u64, now: Instant) -> Option<String> {
        self.done += n;
        if self.total == 0 {
            return None;
        }
        let tenths = self.tenths();
        let since = now.duration_since(self.last_line);
        let all_done = self.done >= self.total && self.reported_done < self.total;
        let new_tenth = tenths > self.reported_tenths && (since >= MIN_GAP || all_done);
        if !new_tenth && since < LINE_EVERY {
            return None;
        }
        self.reported_tenths = tenths;
        self.last_line = now;
        self.reported_done = self.done;
        Some(self.line(now))
    }

    /// A last line when the last one written is out of date (the work stopped before a tenth boundary).
    fn closing_line(&self, now: Instant) -> Option<String> {
        (self.done != self.reported_done).then(|| self.line(now))
    }

    fn line(&self, now: Instant) -> String {
        let secs = now.duration_since(self.start).as_secs_f64();
        let pct = if self.total == 0 { 100.0 } else { 100.0 * self.done as f64 / self.total as f64 };
        let rate = if secs > 0.0 { self.done as f64 / secs } else { 0.0 };
        let mut s =
            format!("{}: {}/{} ({pct:.0}%), {}, elapsed {}", self.label, self.done, self.total, format_rate(rate), format_secs(secs));
        if self.done < self.total && rate > 0.0 {
            s += &format!(", ETA {}", format_secs((self.total - self.done) as f64 / rate));
        }
        s
    }
}

fn format_rate(per_s: f64) -> String {
    if per_s >= 1.0 || per_s == 0.0 {
        format!("{per_s:.2}/s")
    } else {
        format!("{:.1} s each", 1.0 / per_s)
    }
}

/// `42s`, `3m07s`, `2h05m`.
fn format_secs(s: f64) -> String {
    let s = s.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `items` items of `each` duration, returning the progress lines and the time they came at.
    fn lines(total: u64, items: u64, each: Duration) -> Vec<(Duration, String)> {
        let t0 = Instant::now();
        let mut r = LineReporter::new(total, "eval", t0);
        let mut out = vec![];
        for i in 1..=items {
            let now = t0 + each * i as u32;
            if let Some(l) = r.advance(1, now) {
                out.push((now - t0, l));
            }
        }
        if let Some(l) = r.closing_line(t0 + each * items as u32) {
            out.push((each * items as u32, l));
        }
        out
    }

    #[test]
    fn fast_work_reports_every_tenth() {
        let got = lines(200, 200, Duration::from_millis(100));
        assert_eq!(got.len(), 10, "{got:#?}");
        assert_eq!(got[0].1, "eval: 20/200 (10%), 10.00/s, elapsed 2s, ETA 18s");
        assert_eq!(got[9].1, "eval: 200/200 (100%), 10.00/s, elapsed 20s");
    }

    #[test]
    fn slow_work_reports_every_30_seconds() {
        let got = lines(1000, 30, Duration::from_secs(7));
        // 30 items x 7 s = 210 s, less than a tenth of the work: a line once 30 s have passed
        // since the last one, the last of them already up to date (no closing line).
        let times: Vec<u64> = got.iter().map(|(t, _)| t.as_secs()).collect();
        assert_eq!(times, [35, 70, 105, 140, 175, 210]);
        assert_eq!(got[0].1, "eval: 5/1000 (0%), 7.0 s each, elapsed 35s, ETA 1h56m");
        assert!(got[5].1.starts_with("eval: 30/1000 (3%)"), "{}", got[5].1);
        // Stopped between lines: the closing line says where.
        let got = lines(1000, 32, Duration::from_secs(7));
        assert!(got.last().unwrap().1.starts_with("eval: 32/1000 (3%)"), "{got:#?}");
    }

    #[test]
    fn quick_work_logs_only_its_end() {
        let got = lines(100, 100, Duration::from_millis(10));
        assert_eq!(got.len(), 1, "{got:#?}");
        assert_eq!(got[0].1, "eval: 100/100 (100%), 100.00/s, elapsed 1s");
        // Tenths closer than a second are folded into the next line.
        let got = lines(100, 100, Duration::from_millis(40));
        let done: Vec<&str> = got.iter().map(|(_, l)| l.split(' ').nth(1).unwrap()).collect();
        assert_eq!(done, ["25/100", "50/100", "75/100", "100/100"]);
    }

    #[test]
    fn seconds_format() {
        assert_eq!([5.0, 59.6, 187.0, 7500.0].map(format_secs), ["5s", "1m00s", "3m07s", "2h05m"]);
    }
}
