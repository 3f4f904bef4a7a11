//! The spool's memory tier (`http.spool_memory`): the bytes of small spool files kept in memory,
//! each answered only while one stat of its path shows the same inode with the same size,
//! mtime and ctime as when its bytes were read.
//!
//! A local hit without it costs openat2, statx, a read, a second statx and close; with it,
//! one `fstatat` of the path. Why the stat is enough:
//! - The path still names the inode whose bytes are held (device and inode number), so a
//!   rename away (ferry's own archive move), an unlink, a replacement by rename and a parent
//!   directory renamed all miss.
//! - Every write to a file sets its ctime to the current time, and nothing can set a ctime
//!   back. Bytes are taken only when the ctime is at least [`SETTLED`] old at the read, so
//!   any later write gives a ctime the held one cannot equal (unless the clock is stepped
//!   back by more than that between the read and the write).
//! - A writer that already had the file open (a shared writable mapping dirties pages
//!   without a new ctime until the next fault) is ruled out by a read lease at the read, or,
//!   where leases cannot be had, by the catalog's readiness, which the sync decided with one.
//!
//! The stat follows symlinks in the path's directories, which the careful open refuses: it
//! can only ever find an inode that the careful open read for this very key, and anything
//! else goes the careful way.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::local::{LocalFile, PathStat};
use crate::catalog::FileStat;

/// How old a file's ctime must be when its bytes are read for them to be held.
pub const SETTLED: Duration = Duration::from_secs(1);

/// An entry unused this long is dropped, so bytes of files long gone (archived, removed)
/// do not sit in memory until the budget pushes them out.
const IDLE: Duration = Duration::from_secs(300);

/// One spool file's bytes as read, with what identified the file then.
#[derive(Debug)]
pub struct Held {
    pub body: Bytes,
    pub stat: FileStat,
    pub dev: u64,
    pub mtime: SystemTime,
}

impl Held {
    /// Whether `now`, a stat of the path just taken, shows the file these bytes came from,
    /// unchanged.
    pub fn matches(&self, now: &PathStat) -> bool {
        now.is_file && now.dev == self.dev && now.stat == self.stat
    }
}

/// The tier: at most `budget` bytes of bodies, each at most `max_object`.
pub struct Memo {
    cache: Option<moka::sync::Cache<String, Arc<Held>>>,
    max_object: u64,
}

impl Memo {
    /// `budget` 0 turns the tier off.
    pub fn new(budget: u64, max_object: u64) -> Memo {
        let cache = (budget > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(budget)
                // A body's bytes plus what its key and entry cost, so a budget of many tiny
                // files is not exceeded many times over.
                .weigher(|k: &String, v: &Arc<Held>| {
                    u32::try_from(v.body.len() + k.len() + 128).unwrap_or(u32::MAX)
                })
                .time_to_idle(IDLE)
                .build()
        });
        Memo { cache, max_object }
    }

    pub fn enabled(&self) -> bool {
        self.cache.is_some()
    }

    /// The held bytes of `key`, if `now` (a stat of its path just taken) shows them current.
    /// A held entry the stat contradicts is dropped.
    pub fn get(&self, key: &str, now: &PathStat) -> Option<Arc<Held>> {
        let cache = self.cache.as_ref()?;
        let held = cache.get(key)?;
        if held.matches(now) {
            return Some(held);
        }
        cache.invalidate(key);
        None
    }

    /// Takes the bytes `lf` preloaded if they may be held (see the module notes): the whole
    /// file, small enough, its ctime settled, its stat the same after the read, and nobody
    /// writing it. `ready`: the catalog holds a row for exactly this stat. Costs an fstat and,
    /// on a spool file, a read lease taken and dropped: only on the way in.
    pub fn offer(&self, key: &str, lf: &LocalFile, ready: bool) {
        let Some(cache) = &self.cache else { return };
        let Some(body) = lf.preloaded.as_ref() else {
            return;
        };
        if body.len() as u64 != lf.len || lf.len > self.max_object {
            return;
        }
        let Some((stat, dev)) = settled_stat(&lf.file) else {
            return;
        };
        if stat != lf.stat || !unwritten(&lf.file, ready) {
            return;
        }
        cache.insert(
            key.to_string(),
            Arc::new(Held {
                body: body.clone(),
                stat,
                dev,
                mtime: lf.mtime,
            }),
        );
    }

    /// Drops `key`'s bytes, if held: its path no longer names a file.
    pub fn forget(&self, key: &str) {
        if let Some(cache) = &self.cache {
            cache.invalidate(key);
        }
    }

    /// Held bytes in all, as the budget counts them (for tests and metrics).
    pub fn weight(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| {
            c.run_pending_tasks();
            c.weighted_size()
        })
    }
}

/// The file's stat and device, if its ctime is at least [`SETTLED`] in the past.
fn settled_stat(file: &File) -> Option<(FileStat, u64)> {
    let md = file.metadata().ok()?;
    let stat = FileStat::of(&md);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    let ctime = u128::try_from(stat.ctime_ns).ok()?;
    (now.checked_sub(ctime)? >= SETTLED.as_nanos()).then_some((stat, md.dev()))
}

/// Nobody has the file open for writing: a read lease is granted (and dropped at once).
/// Where leases cannot be had (a file ferry does not own, a mount without them), only a
/// file the catalog calls ready.
fn unwritten(file: &File, ready: bool) -> bool {
    match crate::sync::lease::take(file) {
        crate::sync::lease::Probe::Held(lease) => {
            lease.release();
            true
        }
        crate::sync::lease::Probe::Busy => false,
        crate::sync::lease::Probe::Unavailable(_) => ready,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::local::{self, Looked};
    use std::io::Write;

    /// Opens `rel` in `dir` as the serve path does for a GET (the whole small file read).
    fn read(dir: &File, rel: &str) -> LocalFile {
        let mut lf = local::open_beneath(dir, rel).unwrap().expect("a file");
        lf.preload().unwrap();
        lf
    }

    fn stat(dir: &File, rel: &str) -> Looked {
        local::stat_at(dir, rel)
    }

    fn hit(m: &Memo, dir: &File, rel: &str) -> Option<Arc<Held>> {
        match stat(dir, rel) {
            Looked::Found(now) => m.get(rel, &now),
            _ => None,
        }
    }

    fn settle() {
        std::thread::sleep(SETTLED + Duration::from_millis(100));
    }

    #[test]
    fn an_unchanged_file_is_answered_and_any_change_to_its_path_misses() {
        let t = tempfile::tempdir().unwrap();
        let names = [
            "same", "inplace", "renamed", "replaced", "touched", "linked",
        ];
        for n in names {
            std::fs::write(t.path().join(n), format!("{n} version one")).unwrap();
        }
        std::fs::write(t.path().join("other"), "replaced version TWO").unwrap();
        settle();
        let dir = File::open(t.path()).unwrap();
        let m = Memo::new(1 << 20, 256 << 10);
        for n in names {
            m.offer(n, &read(&dir, n), false);
            let held = hit(&m, &dir, n).unwrap_or_else(|| panic!("{n} held"));
            assert_eq!(&held.body[..], format!("{n} version one").as_bytes());
        }

        // Rewritten in place: same inode, same length, its mtime put back. Only the ctime
        // tells, and it does.
        let p = t.path().join("inplace");
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        std::fs::write(&p, "INPLACE VERSION TWO").unwrap();
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        // Archived (renamed away), replaced by a rename of another file of the same length,
        // its times set back as they were, and given a second name.
        std::fs::rename(t.path().join("renamed"), t.path().join("gone")).unwrap();
        std::fs::rename(t.path().join("other"), t.path().join("replaced")).unwrap();
        let p = t.path().join("touched");
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        std::fs::hard_link(t.path().join("linked"), t.path().join("link2")).unwrap();

        assert!(hit(&m, &dir, "same").is_some());
        assert_eq!(stat(&dir, "renamed"), Looked::Absent);
        for n in ["inplace", "replaced", "touched", "linked"] {
            assert!(hit(&m, &dir, n).is_none(), "{n} changed, yet answered");
        }
        // The path now names bytes read afresh.
        assert_eq!(
            &read(&dir, "inplace").preloaded.unwrap()[..],
            b"INPLACE VERSION TWO"
        );
    }

    #[test]
    fn a_file_changed_within_the_last_second_is_not_held() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("fresh"), "just written").unwrap();
        let dir = File::open(t.path()).unwrap();
        let m = Memo::new(1 << 20, 256 << 10);
        m.offer("fresh", &read(&dir, "fresh"), true);
        assert!(hit(&m, &dir, "fresh").is_none());
        assert_eq!(m.weight(), 0);
        settle();
        m.offer("fresh", &read(&dir, "fresh"), true);
        assert!(hit(&m, &dir, "fresh").is_some());
    }

    #[test]
    fn a_file_someone_holds_open_for_writing_is_not_held() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("w"), "the first half").unwrap();
        let writer = File::options()
            .append(true)
            .open(t.path().join("w"))
            .unwrap();
        settle();
        let dir = File::open(t.path()).unwrap();
        let m = Memo::new(1 << 20, 256 << 10);
        // Even a catalog that calls it ready does not outweigh an open writer.
        m.offer("w", &read(&dir, "w"), true);
        assert!(
            hit(&m, &dir, "w").is_none(),
            "held while a writer has it open"
        );
        drop(writer);
        m.offer("w", &read(&dir, "w"), false);
        assert!(hit(&m, &dir, "w").is_some());
    }

    #[test]
    fn only_whole_small_files_within_the_budget_are_held() {
        let t = tempfile::tempdir().unwrap();
        let mut f = File::create(t.path().join("big")).unwrap();
        f.write_all(&vec![7u8; 300 << 10]).unwrap();
        drop(f);
        std::fs::write(t.path().join("small"), vec![1u8; 1000]).unwrap();
        settle();
        let dir = File::open(t.path()).unwrap();

        let m = Memo::new(1 << 20, 256 << 10);
        m.offer("big", &read(&dir, "big"), true);
        assert!(hit(&m, &dir, "big").is_none(), "larger than max_object");
        // A HEAD opens without reading: nothing to hold.
        let head = local::open_beneath(&dir, "small").unwrap().unwrap();
        m.offer("small", &head, true);
        assert!(hit(&m, &dir, "small").is_none());
        m.offer("small", &read(&dir, "small"), true);
        assert!(hit(&m, &dir, "small").is_some());
        let w = m.weight();
        assert!((1000..2000).contains(&w), "weight {w}");
        m.forget("small");
        assert!(hit(&m, &dir, "small").is_none());

        let off = Memo::new(0, 256 << 10);
        assert!(!off.enabled());
        off.offer("small", &read(&dir, "small"), true);
        assert!(hit(&off, &dir, "small").is_none());
    }

    #[test]
    fn stat_at_tells_absent_from_present_without_following_the_last_symlink() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("file"), "x").unwrap();
        std::fs::create_dir(t.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("file", t.path().join("link")).unwrap();
        let dir = File::open(t.path()).unwrap();
        assert_eq!(stat(&dir, "missing"), Looked::Absent);
        assert_eq!(stat(&dir, "file/below"), Looked::Absent, "ENOTDIR");
        assert_eq!(stat(&dir, "../file"), Looked::Absent, "not a plain key");
        assert_eq!(stat(&dir, "/etc/passwd"), Looked::Absent, "not a plain key");
        let Looked::Found(f) = stat(&dir, "file") else {
            panic!("file not found")
        };
        assert!(f.is_file);
        assert_eq!(f.stat.size, 1);
        for n in ["sub", "link"] {
            let Looked::Found(s) = stat(&dir, n) else {
                panic!("{n} not found")
            };
            assert!(!s.is_file, "{n} is not a regular file");
        }
        let long = "n".repeat(300);
        assert_eq!(
            stat(&dir, &long),
            Looked::Unsure,
            "ENAMETOOLONG: let the open decide"
        );
    }
}
