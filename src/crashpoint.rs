//! Named crash points for the crash-at-every-step test: in a debug build, when
//! `FERRY_DEBUG_CRASH_AT` names a step, the process aborts there (no destructors, no flush:
//! as close to kill -9 at that instant as a test can aim). Release builds compile it away.
//! The pause is blocking on purpose: it holds whatever the step holds (a lease, a name).

/// The durable steps, in pipeline order; the crash test walks this list.
pub const STEPS: &[&str] = &[
    "hashed",
    "fsync-spool",
    "put",
    "verified-check",
    "verified-commit",
    "reserved",
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
        // `FERRY_DEBUG_PAUSE_AT=step:ms` waits there first, with a line on stderr: a test
        // can act inside the window (a writer's open, a rename) and then let the crash
        // come.
        if let Some(ms) = std::env::var("FERRY_DEBUG_PAUSE_AT").ok().and_then(|v| {
            let (name, ms) = v.split_once(':')?;
            (name == step).then(|| ms.parse::<u64>().ok()).flatten()
        }) {
            eprintln!("ferry: FERRY_DEBUG_PAUSE_AT={step}: pausing {ms} ms");
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        if std::env::var("FERRY_DEBUG_CRASH_AT").is_ok_and(|v| v == step) {
            eprintln!("ferry: FERRY_DEBUG_CRASH_AT={step}: aborting");
            std::process::abort();
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = step;
}

/// True while a catalog write at `step` should fail as if the disk were full: in a debug
/// build, when `FERRY_DEBUG_FAIL_WRITE=step:N`, the first N writes at that step fail. Shows
/// that a failed outcome write is retried in place and never turns into another state.
pub fn fail_write(step: &'static str) -> bool {
    #[cfg(debug_assertions)]
    {
        use std::sync::atomic::{AtomicU32, Ordering};
        static FAILED: AtomicU32 = AtomicU32::new(0);
        let Ok(v) = std::env::var("FERRY_DEBUG_FAIL_WRITE") else {
            return false;
        };
        let Some((name, n)) = v.split_once(':') else {
            return false;
        };
        if name != step {
            return false;
        }
        let n: u32 = n.parse().unwrap_or(0);
        if FAILED.fetch_add(1, Ordering::SeqCst) < n {
            eprintln!("ferry: FERRY_DEBUG_FAIL_WRITE={step}: failing this write");
            return true;
        }
        false
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = step;
        false
    }
}

/// The error a full disk gives SQLite, for [`fail_write`].
pub fn disk_full() -> crate::catalog::CatalogError {
    crate::catalog::CatalogError::Sql(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
        Some("database or disk is full (FERRY_DEBUG_FAIL_WRITE)".into()),
    ))
}
