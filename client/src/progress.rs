//! What the person running the script sees on stderr: a progress bar when stderr is a
//! terminal, plain lines otherwise (logs of a cron job), nothing but errors with `--quiet`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    quiet: bool,
    started: Instant,
    /// Recorded by this run, for the rate (orders from an earlier run would inflate it).
    this_run: u64,
    pub fulfilled: u64,
    pub failed: u64,
}

impl Progress {
    /// `already_*`: orders an earlier run recorded, counted as done from the start.
    pub fn new(total: u64, already_fulfilled: u64, already_failed: u64, quiet: bool) -> Progress {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {pos}/{len} orders, {msg}")
            {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_position(already_fulfilled + already_failed);
            // Redrawn on a timer too, so the elapsed time moves during a long pause.
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        let p = Progress {
            bar,
            quiet,
            started: Instant::now(),
            this_run: 0,
            fulfilled: already_fulfilled,
            failed: already_failed,
        };
        p.update_message();
        p
    }

    fn update_message(&self) {
        if let Some(bar) = &self.bar {
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            bar.set_message(format!(
                "{} fulfilled, {} failed, {:.1} orders/s",
                self.fulfilled,
                self.failed,
                self.this_run as f64 / secs
            ));
        }
    }

    /// Counts orders just recorded.
    pub fn recorded(&mut self, fulfilled: u64, failed: u64) {
        self.fulfilled += fulfilled;
        self.failed += failed;
        self.this_run += fulfilled + failed;
        if let Some(bar) = &self.bar {
            bar.inc(fulfilled + failed);
        }
        self.update_message();
    }

    /// A line for the person watching (a retry, a pause), printed above the bar.
    pub fn note(&self, msg: impl AsRef<str>) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(msg.as_ref()),
            None => eprintln!("{}", msg.as_ref()),
        }
    }

    /// Leaves the bar's last state on screen.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}
