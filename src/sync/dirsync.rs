//! Coalesced directory fsyncs: concurrent archive moves in one directory share one fsync.
//!
//! A rename is durable once its directory is fsynced. With many uploads archiving at once
//! into the same folders, each asking for its own fsync of the same directory costs one
//! journal commit apiece; one fsync that *started after* a caller's rename covers that
//! caller just as well. So a caller waits for the fsync in flight only if it began after
//! the caller asked, else runs (or waits for) the next one, which covers everyone who asked
//! before it started. Nobody returns before an fsync that began after their own request has
//! succeeded: the durability each caller gets is exactly that of its own fsync.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

#[derive(Default)]
struct State {
    /// Requests made so far (a ticket per caller).
    asked: u64,
    /// Every ticket up to this one is covered by a finished fsync.
    covered: u64,
    running: bool,
    /// fsyncs this directory really had.
    runs: u64,
}

#[derive(Default)]
struct Dir {
    state: Mutex<State>,
    done: Condvar,
}

/// Directories being synced; entries nobody holds are dropped when the map grows.
fn dirs() -> &'static Mutex<HashMap<PathBuf, Arc<Dir>>> {
    static DIRS: OnceLock<Mutex<HashMap<PathBuf, Arc<Dir>>>> = OnceLock::new();
    DIRS.get_or_init(Default::default)
}

/// fsyncs `dir`, or waits for an fsync of it that began after this call. Blocking.
pub fn sync(dir: &Path) -> io::Result<()> {
    let d = {
        let mut m = dirs().lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 1024 {
            m.retain(|_, d| Arc::strong_count(d) > 1);
        }
        m.entry(dir.to_path_buf()).or_default().clone()
    };
    let mut st = d.state.lock().unwrap_or_else(|p| p.into_inner());
    st.asked += 1;
    let ticket = st.asked;
    loop {
        if st.covered >= ticket {
            return Ok(());
        }
        if !st.running {
            st.running = true;
            // Everyone who asked before this fsync starts is covered by it.
            let upto = st.asked;
            drop(st);
            let res = File::open(dir).and_then(|f| f.sync_all());
            st = d.state.lock().unwrap_or_else(|p| p.into_inner());
            st.running = false;
            st.runs += 1;
            if res.is_ok() {
                st.covered = st.covered.max(upto);
            }
            d.done.notify_all();
            // On an error the others are not covered: each runs its own fsync next.
            res?;
            continue;
        }
        st = d.done.wait(st).unwrap_or_else(|p| p.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(dir: &Path) -> Arc<Dir> {
        let mut m = dirs().lock().unwrap();
        m.entry(dir.to_path_buf()).or_default().clone()
    }

    /// 32 callers arrive while an fsync is in flight: that one does not cover them (it may
    /// have begun before their renames), the next one covers them all.
    #[test]
    fn callers_arriving_during_an_fsync_share_the_next_one() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().to_path_buf();
        let d = entry(&dir);
        // An fsync "in flight" (the test plays it), which covers nobody yet.
        d.state.lock().unwrap().running = true;
        let threads: Vec<_> = (0..32)
            .map(|i| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    std::fs::write(dir.join(format!("f{i}")), b"x").unwrap();
                    sync(&dir).unwrap();
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while d.state.lock().unwrap().asked < 32 {
            assert!(
                std::time::Instant::now() < deadline,
                "callers did not arrive"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        {
            let mut st = d.state.lock().unwrap();
            assert_eq!(
                st.covered, 0,
                "nobody returned before an fsync of their own"
            );
            st.running = false;
        }
        d.done.notify_all();
        for t in threads {
            t.join().unwrap();
        }
        let st = d.state.lock().unwrap();
        assert_eq!(st.runs, 1, "one fsync covered all 32");
        assert_eq!(st.covered, 32);
    }

    /// A caller with no fsync in flight runs its own.
    #[test]
    fn a_lone_caller_runs_its_own_fsync() {
        let t = tempfile::tempdir().unwrap();
        sync(t.path()).unwrap();
        sync(t.path()).unwrap();
        assert_eq!(entry(t.path()).state.lock().unwrap().runs, 2);
    }

    #[test]
    fn an_error_is_returned_and_the_next_caller_tries_again() {
        let t = tempfile::tempdir().unwrap();
        let gone = t.path().join("gone");
        assert!(sync(&gone).is_err());
        std::fs::create_dir(&gone).unwrap();
        sync(&gone).unwrap();
        let st = entry(&gone).state.lock().unwrap().runs;
        assert_eq!(st, 2);
    }
}
