//! Progress reporting, decoupled from how it is shown (a terminal bar in the binary).

pub trait Progress: Send + Sync {
    /// A new phase of work of `total` bytes begins.
    fn begin(&self, _label: &str, _total: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn end(&self) {}
    /// A warning the user should see even without a terminal.
    fn warn(&self, message: &str) {
        eprintln!("warning: {message}");
    }
}

pub struct NoProgress;

impl Progress for NoProgress {}
