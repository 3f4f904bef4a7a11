//! Named crash points for the crash-at-every-step test: in a debug build, when
//! `FERRY_DEBUG_CRASH_AT` names a step, the process aborts there (no destructors, no flush:
//! as close to kill -9 at that instant as a test can aim). Release builds compile it away.

/// The durable steps, in pipeline order; the crash test walks this list.
pub const STEPS: &[&str] = &[
    "hashed",
    "fsync-spool",
    "put",
    "verified-check",
    "verified-commit",
    "archive-copy",
    "archive-fsync-copy",
    "renamed",
    "archive-fsync-dirs",
    "archived-commit",
];

/// Aborts here if the environment names this step (debug builds only).
#[inline]
pub fn hit(step: &'static str) {
    #[cfg(debug_assertions)]
    {
        if std::env::var("FERRY_DEBUG_CRASH_AT").is_ok_and(|v| v == step) {
            eprintln!("ferry: FERRY_DEBUG_CRASH_AT={step}: aborting");
            std::process::abort();
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = step;
}
