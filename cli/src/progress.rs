//! A progress bar for `skiff convert` on a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use skiff_converter::Progress;

/// Draws one bar per layer on stderr (nothing when stderr is not a terminal).
pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    /// A hidden bar unless `enabled` and stderr is a terminal.
    pub fn new(enabled: bool) -> Self {
        let bar = ProgressBar::with_draw_target(
            None,
            if enabled {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        Bar { bar }
    }
}

impl Progress for Bar {
    fn layer_started(&self, index: usize, count: usize, size: Option<u64>) {
        self.bar.reset();
        self.bar.set_position(0);
        let style = match size {
            Some(total) => {
                self.bar.set_length(total);
                ProgressStyle::with_template(
                    "{prefix} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
            }
            None => {
                self.bar.unset_length();
                ProgressStyle::with_template("{prefix} {spinner} {bytes} {bytes_per_sec}")
            }
        };
        if let Ok(style) = style {
            self.bar.set_style(style.progress_chars("=> "));
        }
        self.bar
            .set_prefix(format!("layer {}/{}", index + 1, count));
    }

    fn advance(&self, n: u64) {
        self.bar.inc(n);
    }

    fn layer_finished(&self, _index: usize) {
        self.bar.finish_and_clear();
    }
}
