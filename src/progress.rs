//! Progress for long work that a person watches (`ferry sync --once`, `ferry verify`): on a
//! terminal one bar stays at the bottom (files and bytes done of the total, rate, ETA,
//! retries and failures so far) and log lines are printed above it; off a terminal
//! (journald, a pipe, a file) there is no bar and every log line is written as before.
//!
//! Why the log goes through here: indicatif redraws its bar in place, so a line written
//! straight to stderr lands on top of the bar and scrolls it away. The tracing writer below
//! hides the bar (`ProgressBar::suspend`), writes the line, and draws the bar again. And
//! while the bar is drawn, per-file INFO lines (events with a `key` field, such as
//! "uploaded and verified" and "archived") are held back, as if they were DEBUG lines: the
//! bar already counts them, and 3,000 files would print 6,000 of them. With `FERRY_LOG` at
//! debug they are written anyway; warnings and errors always are.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::level_filters::LevelFilter;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// The bar being drawn now, if any: log lines go above it.
static ACTIVE: RwLock<Option<ProgressBar>> = RwLock::new(None);

fn active() -> Option<ProgressBar> {
    ACTIVE.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Whether a person is watching: stderr (where the bar and the log go) is a terminal.
pub fn on_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// What has been counted so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Failed attempts that will be tried again.
    pub retries: u64,
    /// Files (or findings) that failed for good.
    pub failures: u64,
}

/// One bar for one piece of work; does nothing when not drawn (off a terminal).
pub struct Progress {
    bar: Option<ProgressBar>,
    counts: Mutex<Counts>,
    started: Instant,
    /// The word after the file count: "archived", "checked", "hashed".
    done_word: &'static str,
    /// The word for `failures`: "failed", "findings".
    failure_word: &'static str,
}

impl Progress {
    /// A bar on stderr when it is a terminal, else nothing.
    pub fn new(done_word: &'static str, failure_word: &'static str) -> Progress {
        let bar = on_terminal().then(|| {
            // No length until the totals are known: a bar of 0 of 0 would be drawn full.
            let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            pb.set_prefix("counting files");
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} {prefix} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} \
                 ETA {eta} {msg}",
            ) {
                pb.set_style(style.progress_chars("=> "));
            }
            // The spinner and ETA move even while one large file is being sent.
            pb.enable_steady_tick(Duration::from_millis(200));
            *ACTIVE.write().unwrap_or_else(|p| p.into_inner()) = Some(pb.clone());
            pb
        });
        Progress {
            bar,
            counts: Mutex::new(Counts::default()),
            started: Instant::now(),
            done_word,
            failure_word,
        }
    }

    /// Whether a bar is drawn (a person is watching).
    pub fn is_drawn(&self) -> bool {
        self.bar.is_some()
    }

    /// Changes the counts (`f` gets the current ones) and redraws.
    pub fn update(&self, f: impl FnOnce(&mut Counts)) {
        let c = {
            let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut c);
            *c
        };
        self.redraw(&c);
    }

    pub fn counts(&self) -> Counts {
        *self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn redraw(&self, c: &Counts) {
        let Some(pb) = &self.bar else {
            return;
        };
        if c.files_total == 0 && c.bytes_total == 0 && c.files_done == 0 {
            return;
        }
        pb.set_length(c.bytes_total);
        pb.set_position(c.bytes_done.min(c.bytes_total));
        pb.set_prefix(format!(
            "{}/{} files {}",
            c.files_done, c.files_total, self.done_word
        ));
        pb.set_message(format!(
            "retries {}, {} {}",
            c.retries, self.failure_word, c.failures
        ));
    }

    /// Clears the bar; later log lines go straight to stderr.
    pub fn finish(self) {
        drop(self);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(pb) = self.bar.take() {
            *ACTIVE.write().unwrap_or_else(|p| p.into_inner()) = None;
            pb.finish_and_clear();
        }
    }
}

/// A byte count for people: "2.9 MiB".
pub fn size(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

/// "in 41s (30.0 MiB/s)" for a summary; tenths of a second below 10 s.
pub fn rate(bytes: u64, took: Duration) -> String {
    let secs = took.as_secs_f64().max(0.001);
    let shown = if took < Duration::from_secs(10) {
        format!("{:.1}s", took.as_secs_f64())
    } else {
        humantime::format_duration(Duration::from_secs(took.as_secs())).to_string()
    };
    format!("in {shown} ({}/s)", size((bytes as f64 / secs) as u64))
}

/// The tracing writer: stderr, above the bar when one is drawn.
pub struct LogWriter;

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            buf: Vec::new(),
            keep: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        let per_file = *meta.level() == Level::INFO && meta.fields().field("key").is_some();
        let keep = !(per_file
            && LevelFilter::current() < LevelFilter::DEBUG
            && ACTIVE.read().is_ok_and(|a| a.is_some()));
        Line {
            buf: Vec::with_capacity(if keep { 256 } else { 0 }),
            keep,
        }
    }
}

/// One formatted log line, written out whole when dropped (so the bar is hidden once per
/// line, not once per fragment).
pub struct Line {
    buf: Vec<u8>,
    keep: bool,
}

impl Write for Line {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.keep {
            self.buf.extend_from_slice(b);
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if !self.keep || self.buf.is_empty() {
            return;
        }
        // Nothing to do about a failed write to stderr: there is nowhere else to say it.
        match active() {
            Some(pb) => pb.suspend(|| {
                let _ = std::io::stderr().lock().write_all(&self.buf);
            }),
            None => {
                let _ = std::io::stderr().lock().write_all(&self.buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_read_well() {
        assert_eq!(size(3 << 30), "3.0 GiB");
        assert_eq!(rate(3 << 30, Duration::from_secs(60)), "in 1m (51.2 MiB/s)");
        assert_eq!(rate(0, Duration::ZERO), "in 0.0s (0 B/s)");
        assert_eq!(
            rate(1 << 20, Duration::from_millis(2500)),
            "in 2.5s (409.6 KiB/s)"
        );
    }

    #[test]
    fn off_a_terminal_there_is_no_bar_and_nothing_is_held_back() {
        // `cargo test` captures stderr, so this is the off-terminal case.
        if on_terminal() {
            return;
        }
        let p = Progress::new("archived", "failed");
        assert!(!p.is_drawn());
        p.update(|c| c.files_done += 1);
        assert_eq!(p.counts().files_done, 1);
        assert!(ACTIVE.read().is_ok_and(|a| a.is_none()));
    }
}
