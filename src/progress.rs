//! Progress of long loops (training, sampling, feature extraction): a bar on a
//! terminal, and otherwise (output piped to a file or a log) a line every
//! [`LINE_EVERY`] with the count, the elapsed time and an estimate of the time left.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often a progress line is written when stderr is not a terminal.
pub const LINE_EVERY: Duration = Duration::from_secs(20);

pub struct Progress {
    label: String,
    total: u64,
    pos: u64,
    /// Position when this invocation started (a resumed run starts above 0).
    start_pos: u64,
    msg: String,
    started: Instant,
    last_line: Instant,
    mode: Mode,
}

enum Mode {
    Hidden,
    Bar(ProgressBar),
    Lines,
}

/// "1 min 05 s", "42 s".
pub fn human_seconds(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 60 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{s} s")
    }
}

impl Progress {
    /// A bar when stderr is a terminal, periodic lines otherwise.
    pub fn new(label: impl Into<String>, total: u64) -> Progress {
        let label = label.into();
        let mode = if std::io::stderr().is_terminal() {
            let pb = ProgressBar::new(total);
            pb.set_style(
                ProgressStyle::with_template(
                    "{prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}, {per_sec}] {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            pb.set_prefix(label.clone());
            Mode::Bar(pb)
        } else {
            Mode::Lines
        };
        Progress::with_mode(label, total, mode)
    }

    /// Shows nothing.
    pub fn hidden(total: u64) -> Progress {
        Progress::with_mode(String::new(), total, Mode::Hidden)
    }

    fn with_mode(label: String, total: u64, mode: Mode) -> Progress {
        let now = Instant::now();
        Progress {
            label,
            total,
            pos: 0,
            start_pos: 0,
            msg: String::new(),
            started: now,
            last_line: now,
            mode,
        }
    }

    /// Start counting from `pos` (e.g. a resumed run); the estimate uses only what
    /// this invocation did.
    pub fn set_position(&mut self, pos: u64) {
        self.pos = pos;
        self.start_pos = pos;
        if let Mode::Bar(pb) = &self.mode {
            pb.set_position(pos);
            pb.reset_eta();
        }
    }

    pub fn set_message(&mut self, msg: impl Into<String>) {
        self.msg = msg.into();
        if let Mode::Bar(pb) = &self.mode {
            pb.set_message(self.msg.clone());
        }
    }

    /// Seconds left at the rate of this invocation so far (None before any step).
    pub fn eta_seconds(&self) -> Option<f64> {
        let done = self.pos.saturating_sub(self.start_pos);
        (done > 0).then(|| {
            self.started.elapsed().as_secs_f64() / done as f64
                * self.total.saturating_sub(self.pos) as f64
        })
    }

    pub fn inc(&mut self, n: u64) {
        self.pos += n;
        match &self.mode {
            Mode::Bar(pb) => pb.inc(n),
            Mode::Lines if self.last_line.elapsed() >= LINE_EVERY && self.pos < self.total => {
                self.last_line = Instant::now();
                tracing::info!("{}", self.line());
            }
            _ => {}
        }
    }

    fn line(&self) -> String {
        let mut s = format!(
            "{}: {}/{} ({:.0}%), {}",
            self.label,
            self.pos,
            self.total,
            100.0 * self.pos as f64 / self.total.max(1) as f64,
            human_seconds(self.started.elapsed().as_secs_f64())
        );
        if let Some(eta) = self.eta_seconds() {
            s += &format!(", about {} left", human_seconds(eta));
        }
        if !self.msg.is_empty() {
            s += &format!(" ({})", self.msg.trim());
        }
        s
    }

    pub fn finish(&mut self) {
        match &self.mode {
            Mode::Bar(pb) => pb.finish(),
            Mode::Lines => tracing::info!(
                "{}: {}/{} done in {}",
                self.label,
                self.pos,
                self.total,
                human_seconds(self.started.elapsed().as_secs_f64())
            ),
            Mode::Hidden => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_counts_only_this_invocation() {
        let mut p = Progress::hidden(100);
        assert_eq!(p.eta_seconds(), None);
        p.set_position(50);
        assert_eq!(p.eta_seconds(), None);
        std::thread::sleep(Duration::from_millis(20));
        p.inc(10);
        // 10 steps took >= 20 ms, so the 40 left take >= 80 ms, and far less than a minute.
        let eta = p.eta_seconds().unwrap();
        assert!((0.08..60.0).contains(&eta), "{eta}");
        assert!(
            p.line().starts_with(": 60/100 (60%), 0 s, about "),
            "{}",
            p.line()
        );
    }

    #[test]
    fn seconds_read_as_minutes() {
        assert_eq!(human_seconds(42.4), "42 s");
        assert_eq!(human_seconds(65.0), "1 min 05 s");
        assert_eq!(human_seconds(-3.0), "0 s");
    }
}
