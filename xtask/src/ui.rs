//! Progress output: one indicatif bar per long task on a terminal, plain log lines otherwise
//! (CI logs and pipes get a start line and an end line per task, never escape codes).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Shared by all tasks of one command; cheap to clone.
#[derive(Clone)]
pub struct Ui {
    multi: Option<MultiProgress>,
}

impl Default for Ui {
    fn default() -> Self {
        Ui::new()
    }
}

impl Ui {
    /// Bars when stderr is a terminal, plain lines otherwise.
    pub fn new() -> Ui {
        let tty = std::io::stderr().is_terminal();
        Ui {
            multi: tty.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    /// Always plain lines (tests, `--quiet`-like contexts).
    pub fn plain() -> Ui {
        Ui { multi: None }
    }

    /// Print a line without tearing any bar.
    pub fn println(&self, msg: impl AsRef<str>) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(msg.as_ref());
            }
            None => eprintln!("{}", msg.as_ref()),
        }
    }

    /// A byte-progress task called `label` of `total` bytes (0 if unknown).
    pub fn bytes_task(&self, label: &str, total: u64) -> Task {
        let bar = self.multi.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new(total));
            let style = ProgressStyle::with_template(
                "{prefix:40!} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {eta:>4} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Task {
            ui: self.clone(),
            bar,
            label: label.to_string(),
            started: Instant::now(),
        }
    }
}

/// One task's progress. Dropping it without `finish` clears the bar.
pub struct Task {
    ui: Ui,
    bar: Option<ProgressBar>,
    label: String,
    started: Instant,
}

impl Task {
    pub fn set_position(&self, pos: u64) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
        }
    }

    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    pub fn set_length(&self, len: u64) {
        if let Some(b) = &self.bar {
            b.set_length(len);
        }
    }

    /// A line for logs only (plain mode): on a terminal the bar already shows it.
    pub fn log(&self, msg: &str) {
        if self.bar.is_none() {
            self.ui.println(format!("{}: {msg}", self.label));
        }
    }

    /// A note about this task (retry, resume…): shown on the bar, or as a log line.
    pub fn note(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.set_message(msg.to_string()),
            None => self.ui.println(format!("{}: {msg}", self.label)),
        }
    }

    /// Seconds since the task started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// End the task with a final line (kept above the remaining bars).
    pub fn finish(self, msg: &str) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        self.ui.println(format!("{}: {msg}", self.label));
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
