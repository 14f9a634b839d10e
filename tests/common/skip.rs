// Visible skips, for tests whose condition is only known at run time (a library present, a CPU
// feature). libtest has no run-time "ignored", and what a passing test prints through
// print!/eprint! is captured and thrown away, so `cargo test` would show such a test as plain
// "ok". `skip` writes straight to the process's stderr (not captured) when it happens, and a
// summary of every skip goes to stderr when the test binary exits, under libtest's result line:
// one summary for the integration binary (all its modules), one for the library's unit tests.
// Tests whose condition is static use `#[ignore = "reason"]` instead.
//
// One file for the integration tests (`common::skip`) and the library's unit tests (`include!`):
// they cannot share a module otherwise.

static SKIPPED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Reports that `what` (a test name, or "test [part]") did not run, and why.
pub fn skip(what: &str, reason: &str) {
    use std::io::Write;
    let line = format!("{what}: {reason}");
    let _ = writeln!(std::io::stderr(), "SKIPPED {line}");
    let mut v = SKIPPED.lock().unwrap_or_else(|e| e.into_inner());
    if v.is_empty() {
        // SAFETY: registers a plain function with no captured state; it runs at process exit.
        unsafe { libc::atexit(skip_summary) };
    }
    v.push(line);
}

extern "C" fn skip_summary() {
    use std::io::Write;
    let v = SKIPPED.lock().unwrap_or_else(|e| e.into_inner());
    let mut e = std::io::stderr();
    let _ = writeln!(
        e,
        "SKIPPED: {} check(s) of this test binary did not run (their tests show as ok above):",
        v.len()
    );
    for l in v.iter() {
        let _ = writeln!(e, "  {l}");
    }
}
