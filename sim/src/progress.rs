//! Campaign progress on stderr: a progress bar on a terminal, plain lines at every tenth of the
//! seeds otherwise (CI logs, pipes), so logs stay short and readable.

use crate::campaign::Tick;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Instant;

pub enum Progress {
    Bar(ProgressBar),
    Lines { start: Instant, printed_tenths: u64 },
}

impl Progress {
    pub fn new(total: u64) -> Self {
        if !std::io::stderr().is_terminal() {
            return Progress::Lines {
                start: Instant::now(),
                printed_tenths: 0,
            };
        }
        let bar = ProgressBar::new(total);
        let style = ProgressStyle::with_template(
            "[{elapsed_precise}] {wide_bar} {pos}/{len} seeds, eta {eta} {msg}",
        )
        .expect("the template is valid");
        bar.set_style(style);
        Progress::Bar(bar)
    }

    pub fn tick(&mut self, t: Tick) {
        match self {
            Progress::Bar(bar) => {
                bar.set_position(t.done);
                if t.failing > 0 {
                    bar.set_message(format!("{} failing", t.failing));
                }
            }
            Progress::Lines {
                start,
                printed_tenths,
            } => {
                let tenths = t.done * 10 / t.total.max(1);
                if tenths > *printed_tenths {
                    *printed_tenths = tenths;
                    eprintln!(
                        "kvferry sim: {}/{} seeds, {} failing, {:.1} s",
                        t.done,
                        t.total,
                        t.failing,
                        start.elapsed().as_secs_f64()
                    );
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
