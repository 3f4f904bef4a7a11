//! The spool's memory tier (`http.spool_memory`): the bytes of small spool files kept in
//! memory, each answered only while a stat of its path shows the same inode with the same
//! size, mtime and ctime as when its bytes were read.
//!
//! A local hit without it costs openat2, statx, a read, a second statx and close; with it,
//! one `fstatat` of the path (a key in a directory: an `O_PATH` openat2 with the careful
//! open's confinement, an `fstat` and a close). Why the stat is enough:
//! - The path still names the inode whose bytes are held (device and inode number), so a
//!   rename away (ferry's own archive move), an unlink, a replacement by rename and a parent
//!   directory renamed all miss.
//! - Every write to a file sets its ctime to the current time, and nothing can set a ctime
//!   back, on the filesystems where anything is held (ext2/3/4, XFS, btrfs: not tmpfs,
//!   where a shared mapping that read a page first writes it with no new ctime). Bytes are
//!   taken only when the ctime is at least [`SETTLED`] old, so any later write gives a
//!   ctime the held one cannot equal, even where timestamps have whole-second (ext4 with
//!   128-byte inodes, ext2/3) or two-second (FAT) granularity and the kernel's coarse clock
//!   lags the wall clock by a tick (unless the clock is stepped back by more than that
//!   between the read and the write).
//! - A writer that already had the file open (a shared writable mapping dirties an already
//!   dirty page without a new ctime) is ruled out by a read lease, held from before the
//!   bytes are read until after their second stat and unbroken: nobody had the file open for
//!   writing, and nobody opened it meanwhile. Where no lease can be had (another owner
//!   without `CAP_LEASE`, NFS, whose stat may also come from a stale attribute cache), no
//!   bytes are held.
//!
//! The answer is as of that one stat, as the careful path's is as of its open: readiness and
//! the SHA-256 then come from the catalog for exactly the held stat.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::local::{self, LocalFile, PathStat};
use crate::catalog::FileStat;
use crate::lease;

/// How old a file's ctime must be when its bytes are read for them to be held: two-second
/// timestamps plus the coarse clock's lag, with room to spare.
pub const SETTLED: Duration = Duration::from_secs(3);

/// An entry unused this long is dropped, so bytes of files long gone (archived, removed)
/// do not sit in memory until the budget pushes them out.
const IDLE: Duration = Duration::from_secs(300);

/// What an entry costs beyond its body, as the budget counts it: the key, the entry, the
/// cache's own bookkeeping (about 490 bytes measured with 125,000 empty files held).
const ENTRY_COST: usize = 512;

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
        now.confined && now.is_file && now.dev == self.dev && now.stat == self.stat
    }
}

/// While the tier is full, one miss in this many is offered: the cache's admission keeps
/// the more popular keys either way, and a key it would refuse costs a lease and a read
/// again on every miss (`fcntl_setlease` alone was 1.6% of the samples serving 100 KiB
/// files from a working set half again the budget).
const FULL_OFFER_EVERY: u32 = 8;

/// The tier: at most `budget` bytes of bodies, each at most `max_object`.
pub struct Memo {
    cache: Option<moka::sync::Cache<String, Arc<Held>>>,
    budget: u64,
    max_object: u64,
    /// Offers made while full, so one in [`FULL_OFFER_EVERY`] goes ahead.
    full_offers: std::sync::atomic::AtomicU32,
}

impl Memo {
    /// `budget` 0 turns the tier off.
    pub fn new(budget: u64, max_object: u64) -> Memo {
        let cache = (budget > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(budget)
                // So a budget of many tiny files is not exceeded many times over.
                .weigher(|k: &String, v: &Arc<Held>| {
                    u32::try_from(v.body.len() + k.len() + ENTRY_COST).unwrap_or(u32::MAX)
                })
                .time_to_idle(IDLE)
                .build()
        });
        Memo {
            cache,
            budget,
            max_object,
            full_offers: std::sync::atomic::AtomicU32::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.cache.is_some()
    }

    /// Looks at `key`'s path beneath `spool`: the cheapest stat that can answer for a held
    /// key (see the module notes), or one `fstatat` when nothing is held for it.
    pub fn look(&self, spool: &File, key: &str) -> local::Looked {
        let held = key.contains('/') && self.cache.as_ref().is_some_and(|c| c.contains_key(key));
        if held {
            local::stat_confined(spool, key)
        } else {
            local::stat_at(spool, key)
        }
    }

    /// The held bytes of `key`, if `now` (from [`Memo::look`], just taken) shows them
    /// current. A held entry the stat contradicts is dropped.
    pub fn get(&self, key: &str, now: &PathStat) -> Option<Arc<Held>> {
        let cache = self.cache.as_ref()?;
        let held = cache.get(key)?;
        if held.matches(now) {
            return Some(held);
        }
        cache.invalidate(key);
        None
    }

    /// Holds `key`'s bytes if they may be held (see the module notes): `lf` was read whole
    /// for a GET, is small enough, its ctime is settled, and under a read lease its bytes,
    /// read again, come with the same stat before and after. Costs a lease, two fstats and
    /// a read from the page cache (never a wait for the disk), only on the way in.
    pub fn offer(&self, key: &str, lf: &LocalFile) {
        let Some(cache) = &self.cache else { return };
        if lf.preloaded.is_none() || lf.len > self.max_object {
            return;
        }
        if cache.weighted_size() + lf.len >= self.budget {
            let n = self
                .full_offers
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n % FULL_OFFER_EVERY != 0 {
                return;
            }
        }
        if let Some(held) = read_held(lf) {
            cache.insert(key.to_string(), Arc::new(held));
        }
    }

    /// Drops `key`'s bytes, if held: its path no longer names a servable file.
    pub fn forget(&self, key: &str) {
        // Asked first: every miss of the spool (each 302) forgets, and moka's invalidate
        // costs a write even for a key it does not hold (1% of a 302's samples).
        if let Some(cache) = self.cache.as_ref().filter(|c| c.contains_key(key)) {
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

/// `lf`'s bytes read again under a read lease, with the stat they belong to; `None` if
/// its ctime is not settled, anyone has or had the file open for writing meanwhile, or
/// anything moved. The bytes `lf` preloaded were read before any lease, so they prove
/// nothing about a writer that has since gone.
fn read_held(lf: &LocalFile) -> Option<Held> {
    if !settled(lf.stat.ctime_ns) || !ctime_tells_every_write(&lf.file) {
        return None;
    }
    let lease::Probe::Held(lease) = lease::take(&lf.file) else {
        return None;
    };
    let md = lf.file.metadata().ok()?;
    let stat = FileStat::of(&md);
    if stat != lf.stat {
        return None;
    }
    let body = local::read_nowait(&lf.file, usize::try_from(stat.size).ok()?)?;
    let after = FileStat::of(&lf.file.metadata().ok()?);
    if after != stat || lease.broken() {
        return None;
    }
    lease.release();
    Some(Held {
        body,
        stat,
        dev: md.dev(),
        mtime: lf.mtime,
    })
}

/// Whether the file is on a filesystem known to set the ctime on every write, through a
/// shared mapping too (a `page_mkwrite` that updates the times): ext2/3/4, XFS, btrfs.
/// Not tmpfs, where a mapping that read a page first writes it without a fault, nor ramfs,
/// whose `truncate(2)` keeps the times, nor network or FUSE filesystems, whose stat may
/// come from a cache; on those nothing is held.
fn ctime_tells_every_write(file: &File) -> bool {
    const EXT: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683E;
    let mut fs = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: a descriptor `file` owns, alive for the call, and a buffer the kernel fills.
    if unsafe { libc::fstatfs(std::os::fd::AsRawFd::as_raw_fd(file), fs.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstatfs returned 0, so it filled the buffer.
    // f_type is i64 here, a narrower integer on other targets.
    #[allow(clippy::unnecessary_cast)]
    let magic = unsafe { fs.assume_init() }.f_type as i64;
    matches!(magic, EXT | XFS | BTRFS)
}

/// Whether a ctime is at least [`SETTLED`] in the past.
fn settled(ctime_ns: i64) -> bool {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    u128::try_from(ctime_ns)
        .ok()
        .and_then(|c| now.checked_sub(c))
        .is_some_and(|age| age >= SETTLED.as_nanos())
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

    /// What the serve path finds for `rel`: the memo's look, then its get.
    fn hit(m: &Memo, dir: &File, rel: &str) -> Option<Arc<Held>> {
        match m.look(dir, rel) {
            Looked::Found(now) => m.get(rel, &now),
            _ => None,
        }
    }

    fn set_mtime(p: &std::path::Path, mtime: SystemTime) {
        File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
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
            m.offer(n, &read(&dir, n));
            let held = hit(&m, &dir, n).unwrap_or_else(|| panic!("{n} held"));
            assert_eq!(&held.body[..], format!("{n} version one").as_bytes());
        }

        // Rewritten in place: same inode, same length, its mtime put back. Only the ctime
        // tells, and it does.
        let p = t.path().join("inplace");
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        std::fs::write(&p, "INPLACE VERSION TWO").unwrap();
        set_mtime(&p, mtime);
        // Archived (renamed away), replaced by a rename of another file of the same length,
        // its times set back as they were, and given a second name.
        std::fs::rename(t.path().join("renamed"), t.path().join("gone")).unwrap();
        std::fs::rename(t.path().join("other"), t.path().join("replaced")).unwrap();
        let p = t.path().join("touched");
        set_mtime(&p, std::fs::metadata(&p).unwrap().modified().unwrap());
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
    fn a_file_changed_within_the_settle_time_is_not_held() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("fresh"), "just written").unwrap();
        let dir = File::open(t.path()).unwrap();
        let m = Memo::new(1 << 20, 256 << 10);
        m.offer("fresh", &read(&dir, "fresh"));
        assert!(hit(&m, &dir, "fresh").is_none());
        assert_eq!(m.weight(), 0);
        settle();
        m.offer("fresh", &read(&dir, "fresh"));
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
        m.offer("w", &read(&dir, "w"));
        assert!(
            hit(&m, &dir, "w").is_none(),
            "held while a writer has it open"
        );
        drop(writer);
        m.offer("w", &read(&dir, "w"));
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
        m.offer("big", &read(&dir, "big"));
        assert!(hit(&m, &dir, "big").is_none(), "larger than max_object");
        // A HEAD opens without reading: nothing to hold.
        let head = local::open_beneath(&dir, "small").unwrap().unwrap();
        m.offer("small", &head);
        assert!(hit(&m, &dir, "small").is_none());
        m.offer("small", &read(&dir, "small"));
        assert!(hit(&m, &dir, "small").is_some());
        let w = m.weight();
        assert!((1000..2000).contains(&w), "weight {w}");
        m.forget("small");
        assert!(hit(&m, &dir, "small").is_none());

        let off = Memo::new(0, 256 << 10);
        assert!(!off.enabled());
        off.offer("small", &read(&dir, "small"));
        assert!(hit(&off, &dir, "small").is_none());
    }

    /// A shared writable mapping writes through an already dirty page (no new ctime) and
    /// goes away after the serve path's read: the bytes held must be the file's bytes now.
    #[test]
    fn a_mapping_that_writes_and_goes_between_the_read_and_the_hold_is_not_missed() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("mapped");
        std::fs::write(&p, "A").unwrap();
        let f = File::options().read(true).write(true).open(&p).unwrap();
        // SAFETY: a one-byte shared mapping of a one-byte file we own, unmapped below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                1,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        // SAFETY: `map` is a live one-byte writable mapping.
        unsafe { *(map as *mut u8) = b'B' };
        drop(f);
        settle();
        let dir = File::open(t.path()).unwrap();
        let lf = read(&dir, "mapped");
        assert_eq!(&lf.preloaded.as_ref().unwrap()[..], b"B");
        // SAFETY: as above; the page is dirty already, so this write sets no ctime.
        unsafe {
            *(map as *mut u8) = b'C';
            libc::munmap(map, 1);
        }
        let m = Memo::new(1 << 20, 256 << 10);
        m.offer("mapped", &lf);
        let now = std::fs::read(&p).unwrap();
        assert_eq!(now, b"C");
        if let Some(held) = hit(&m, &dir, "mapped") {
            assert_eq!(
                &held.body[..],
                &now[..],
                "held bytes the file no longer has"
            );
        }
    }

    /// A filesystem mounted in a temp dir for a test, unmounted when dropped. `None` (a
    /// skip, or a failure under FERRY_TEST_REQUIRE_TOOLS) without root, mkfs.ext4 or loop
    /// devices.
    struct Mounted {
        dir: tempfile::TempDir,
    }

    impl Mounted {
        /// An ext4 image with 128-byte inodes (whole-second timestamps), loop-mounted.
        fn coarse_ext4() -> Option<Mounted> {
            Mounted::with(|img, mnt| {
                use std::process::Command;
                File::create(img).and_then(|f| f.set_len(16 << 20)).is_ok()
                    && Command::new("mkfs.ext4")
                        .args(["-q", "-F", "-I", "128"])
                        .arg(img)
                        .status()
                        .is_ok_and(|s| s.success())
                    && Command::new("mount")
                        .args(["-o", "loop"])
                        .arg(img)
                        .arg(mnt)
                        .status()
                        .is_ok_and(|s| s.success())
            })
        }

        fn tmpfs() -> Option<Mounted> {
            Mounted::with(|_, mnt| {
                std::process::Command::new("mount")
                    .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
                    .arg(mnt)
                    .status()
                    .is_ok_and(|s| s.success())
            })
        }

        fn with(mount: impl FnOnce(&std::path::Path, &std::path::Path) -> bool) -> Option<Mounted> {
            let dir = tempfile::tempdir().unwrap();
            let mnt = dir.path().join("mnt");
            std::fs::create_dir(&mnt).unwrap();
            if mount(&dir.path().join("img"), &mnt) {
                return Some(Mounted { dir });
            }
            assert!(
                std::env::var_os("FERRY_TEST_REQUIRE_TOOLS").is_none(),
                "cannot mount a test filesystem (needs root, mkfs.ext4, loop devices)"
            );
            eprintln!("SKIPPED: cannot mount a test filesystem (needs root, mkfs.ext4, loop)");
            None
        }

        fn path(&self) -> std::path::PathBuf {
            self.dir.path().join("mnt")
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.path())
                .status();
        }
    }

    /// On tmpfs a shared mapping that read a page first writes it with no new ctime: no
    /// bytes are held there, whatever a read would allow.
    #[test]
    fn nothing_is_held_where_a_write_can_keep_the_ctime() {
        let Some(fs) = Mounted::tmpfs() else { return };
        std::fs::write(fs.path().join("f"), "in memory").unwrap();
        let on_tmpfs = File::open(fs.path().join("f")).unwrap();
        assert!(!ctime_tells_every_write(&on_tmpfs));
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("f"), "on disk").unwrap();
        assert!(
            ctime_tells_every_write(&File::open(t.path().join("f")).unwrap()),
            "the test's temp dir is not on ext4, XFS or btrfs"
        );
    }

    fn clock_ns(clock: libc::clockid_t) -> i128 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid clock id and a timespec the call fills.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    }

    /// Where timestamps are whole seconds and the kernel stamps them from its coarse clock,
    /// which lags the wall clock by up to a tick, a file held the moment the wall clock says
    /// "settled" could be rewritten with the very ctime it had. Each round holds a file right
    /// after the wall clock passes its settle point while the coarse clock has not yet, and
    /// rewrites it in place at once: the same length, no utimensat.
    #[test]
    fn whole_second_timestamps_cannot_hide_a_rewrite_right_after_the_hold() {
        let Some(fs) = Mounted::coarse_ext4() else {
            return;
        };
        let dir = File::open(fs.path()).unwrap();
        let settle_ns = SETTLED.as_nanos() as i128;
        let mut raced = 0;
        // A loaded machine can miss the tick's window; rounds go on until two raced.
        for round in 0..20 {
            if raced >= 2 {
                break;
            }
            let name = format!("f{round}");
            let p = fs.path().join(&name);
            std::fs::write(&p, format!("{round}: version one")).unwrap();
            let ctime = std::fs::metadata(&p).unwrap().ctime();
            assert_eq!(
                std::fs::metadata(&p).unwrap().ctime_nsec(),
                0,
                "not whole seconds"
            );
            let due = i128::from(ctime) * 1_000_000_000 + settle_ns;
            // Opened and read before the wait, so little but the hold and the write lie
            // between the settle point and the rewrite.
            let lf = read(&dir, &name);
            let m = Memo::new(1 << 20, 256 << 10);
            while clock_ns(libc::CLOCK_REALTIME) < due {
                std::hint::spin_loop();
            }
            m.offer(&name, &lf);
            std::os::unix::fs::FileExt::write_all_at(
                &File::options().write(true).open(&p).unwrap(),
                format!("{round}: VERSION TWO").as_bytes(),
                0,
            )
            .unwrap();
            if clock_ns(libc::CLOCK_REALTIME_COARSE) >= due {
                continue; // the coarse clock had ticked: no race this round
            }
            raced += 1;
            if let Some(held) = hit(&m, &dir, &name) {
                assert_eq!(
                    &held.body[..],
                    format!("{round}: VERSION TWO").as_bytes(),
                    "round {round}: the bytes before a rewrite, answered after it"
                );
            }
        }
        assert!(raced > 0, "no round raced the coarse clock");
    }

    #[test]
    fn a_directory_moved_out_and_linked_back_is_not_answered() {
        let t = tempfile::tempdir().unwrap();
        let spool = t.path().join("spool");
        std::fs::create_dir_all(spool.join("d")).unwrap();
        std::fs::create_dir(t.path().join("outside")).unwrap();
        std::fs::write(spool.join("d/f.jpg"), "photo").unwrap();
        std::fs::write(spool.join("top.jpg"), "top").unwrap();
        settle();
        let dir = File::open(&spool).unwrap();
        let m = Memo::new(1 << 20, 256 << 10);
        for k in ["d/f.jpg", "top.jpg"] {
            m.offer(k, &read(&dir, k));
            assert!(hit(&m, &dir, k).is_some(), "{k} held");
        }
        // The file's ctime does not change when its directory moves.
        std::fs::rename(spool.join("d"), t.path().join("outside/d")).unwrap();
        std::os::unix::fs::symlink("../outside/d", spool.join("d")).unwrap();
        let Looked::Found(plain) = stat(&dir, "d/f.jpg") else {
            panic!("a plain stat follows the symlink")
        };
        // A stat taken before the key was held (a request racing the one that holds it) is
        // a plain one: it answers nothing for a key in a directory.
        assert!(
            m.get("d/f.jpg", &plain).is_none(),
            "matched through a symlink"
        );
        assert!(local::open_beneath(&dir, "d/f.jpg").unwrap().is_none());
        assert!(
            hit(&m, &dir, "d/f.jpg").is_none(),
            "answered through a symlink"
        );
        assert!(hit(&m, &dir, "top.jpg").is_some());
        // A top-level key swapped for a symlink to its own old inode.
        std::fs::rename(spool.join("top.jpg"), t.path().join("outside/top.jpg")).unwrap();
        std::os::unix::fs::symlink("../outside/top.jpg", spool.join("top.jpg")).unwrap();
        assert!(hit(&m, &dir, "top.jpg").is_none());
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
