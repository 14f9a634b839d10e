//! How long work reports itself: the library calls a `Progress` the caller gives it, and never
//! draws or prints (the CLI implements it with progress bars and stderr lines; tests and library
//! users pass `Silent`).

/// What a job's total counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Tensors,
}

/// Progress of long work, and the lines a user should see (warnings, steps done).
pub trait Progress: Sync {
    /// A job starts: `total` units of work; `job` says what it is.
    fn start(&self, _job: &str, _total: u64, _unit: Unit) {}
    /// `n` more units done; `item` is what was just finished.
    fn advance(&self, _n: u64, _item: &str) {}
    /// The job started last is over.
    fn finish(&self) {}
    /// A step done, for the user (quiet runs drop it).
    fn note(&self, _line: &str) {}
    /// Something the user should know even in a quiet run (what a reader skipped, say).
    fn warn(&self, _line: &str) {}
    /// An interactive run waits for the user's next line after showing `text`.
    fn prompt(&self, _text: &str) {}
}

/// Reports nothing.
pub struct Silent;
impl Progress for Silent {}

/// Peak resident set size of this process (VmHWM), in bytes; 0 where /proc is unavailable.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
