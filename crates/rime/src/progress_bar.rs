//! A progress bar with throughput on a terminal; silence otherwise.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rime_core::{NoProgress, Progress};
use std::io::IsTerminal;
use std::sync::Mutex;

struct Bar {
    bar: Mutex<Option<ProgressBar>>,
}

impl Progress for Bar {
    fn begin(&self, label: &str, total: u64) {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        *self.bar.lock().unwrap() = Some(bar);
    }

    fn advance(&self, bytes: u64) {
        if let Some(bar) = self.bar.lock().unwrap().as_ref() {
            bar.inc(bytes);
        }
    }

    fn end(&self) {
        if let Some(bar) = self.bar.lock().unwrap().take() {
            bar.finish_and_clear();
        }
    }

    fn warn(&self, message: &str) {
        match self.bar.lock().unwrap().as_ref() {
            Some(bar) => bar.suspend(|| eprintln!("warning: {message}")),
            None => eprintln!("warning: {message}"),
        }
    }
}

pub fn for_terminal(json: bool) -> Box<dyn Progress> {
    if !json && std::io::stderr().is_terminal() {
        Box::new(Bar { bar: Mutex::new(None) })
    } else {
        Box::new(NoProgress)
    }
}
