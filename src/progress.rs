//! Progress bars for long work, drawn only when stderr is a terminal (cluster logs stay clean)
//! and only on rank 0.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress(ProgressBar);

impl Progress {
    pub fn new(total: u64, label: &str) -> Self {
        let bar = ProgressBar::new(total);
        if !std::io::stderr().is_terminal() || crate::dist::env_rank() != 0 {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_style(
            ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_message(label.to_string());
        Progress(bar)
    }
    pub fn inc(&self, n: u64) {
        self.0.inc(n);
    }
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}
