//! Progress bars: drawn on stderr, only when stderr is a terminal and neither --json nor --quiet is set.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Output preferences shared by the commands.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ui {
    pub json: bool,
    pub quiet: bool,
    /// Whether progress bars may be drawn (stderr is a terminal and not --json/--quiet).
    pub bars: bool,
}

impl Ui {
    pub fn new(json: bool, quiet: bool) -> Self {
        Ui {
            json,
            quiet,
            bars: !json && !quiet && std::io::stderr().is_terminal(),
        }
    }
    /// No bars, no chatter: for tests and library use.
    pub fn silent() -> Self {
        Ui {
            json: false,
            quiet: true,
            bars: false,
        }
    }
    /// Whether informational lines go to stderr.
    pub fn chatty(&self) -> bool {
        !self.quiet && !self.json
    }
    fn target(&self) -> ProgressDrawTarget {
        if self.bars {
            ProgressDrawTarget::stderr_with_hz(8)
        } else {
            ProgressDrawTarget::hidden()
        }
    }
    /// A bar with a known length.
    pub fn bar(&self, len: u64, template: &str) -> ProgressBar {
        let pb = ProgressBar::with_draw_target(Some(len), self.target());
        pb.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb
    }
    /// A spinner for work of unknown size.
    pub fn spinner(&self, template: &str) -> ProgressBar {
        let pb = ProgressBar::with_draw_target(None, self.target());
        pb.set_style(
            ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        if self.bars {
            pb.enable_steady_tick(Duration::from_millis(120));
        }
        pb
    }
}
