//! The spool watcher: inotify events, start-up and periodic scans, and the settle rule that
//! decides when a file is ready (DESIGN.md "Ready file").
//!
//! A file is *eligible* once its writer closed it (close-write), or it arrived whole (renamed
//! or hard-linked in, or found by a scan with no events). It is *ready* once eligible and its
//! size, mtime, ctime and inode have not changed for `spool.settle` on a monotonic clock.
//! A write after eligibility makes it ineligible again until the next close.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::catalog::{ops, Catalog, FileStat, Noted};
use crate::key::{IgnoreSet, Key};
use crate::lease;

#[derive(Debug)]
struct Pending {
    stat: Option<FileStat>,
    /// When the stat last changed (or the file was first seen).
    since: Instant,
    eligible: bool,
    /// Arrived whole (renamed or hard-linked in): ready as soon as nobody writes it, with no
    /// settle time.
    whole: bool,
    /// No lease can be had on it: it needs the long quiet time.
    no_lease: bool,
}

impl Pending {
    fn new(stat: Option<FileStat>, since: Instant, eligible: bool, whole: bool) -> Pending {
        Pending {
            stat,
            since,
            eligible,
            whole,
            no_lease: false,
        }
    }
}

pub struct Watcher {
    pub spool: PathBuf,
    pub prefix: String,
    pub settle: Duration,
    pub rescan_interval: Duration,
    pub ignore: IgnoreSet,
    pub catalog: Catalog,
    pub wake: Arc<Notify>,
    /// Told once the watch is set and the first scan done (systemd's READY=1 waits for it).
    pub started: Option<tokio::sync::oneshot::Sender<()>>,
    /// Never set a watch; only scan (what happens anyway when the kernel refuses one).
    pub poll_only: bool,
}

/// What a scan found.
#[derive(Default)]
pub struct ScanResult {
    pub files: Vec<(PathBuf, FileStat)>,
    /// Symlinks and special files (relative paths), skipped.
    pub skipped: Vec<PathBuf>,
    /// Folders and files that could not be read or stat'ed, with the error.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// Walks the spool, skipping ignored names, symlinks and special files. Blocking.
///
/// Directories are shared out among a few threads (one per core, at most 4): a spool of
/// 100,000 files is 100,000 `statx` calls, and on start-up they stand between ferry and its
/// first upload.
pub fn scan(spool: &Path, ignore: &IgnoreSet) -> ScanResult {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4);
    // Directories still to read, and how many are being read (the walk ends when both are
    // zero).
    let work = std::sync::Mutex::new((vec![spool.to_path_buf()], 0usize));
    let more = std::sync::Condvar::new();
    let results: Vec<ScanResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| scope.spawn(|| scan_worker(spool, ignore, &work, &more)))
            .collect();
        handles
            .into_iter()
            // A worker's panic is a bug, and its share of the spool is unknown: carry the
            // panic on rather than report a scan that silently lacks those files.
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut out = ScanResult::default();
    for r in results {
        out.files.extend(r.files);
        out.skipped.extend(r.skipped);
        out.unreadable.extend(r.unreadable);
    }
    out
}

fn scan_worker(
    spool: &Path,
    ignore: &IgnoreSet,
    work: &std::sync::Mutex<(Vec<PathBuf>, usize)>,
    more: &std::sync::Condvar,
) -> ScanResult {
    let mut out = ScanResult::default();
    loop {
        let dir = {
            let Ok(mut w) = work.lock() else { return out };
            loop {
                if let Some(d) = w.0.pop() {
                    w.1 += 1;
                    break d;
                }
                if w.1 == 0 {
                    more.notify_all();
                    return out;
                }
                w = match more.wait(w) {
                    Ok(w) => w,
                    Err(_) => return out,
                };
            }
        };
        // Counts this directory done even if reading it panics, so the others never wait
        // for it forever.
        let _done = Done(work, more);
        let mut subdirs = Vec::new();
        let rel_of = |p: &Path| p.strip_prefix(spool).unwrap_or(p).to_path_buf();
        match std::fs::read_dir(&dir) {
            Err(e) => out.unreadable.push((rel_of(&dir), e.to_string())),
            Ok(rd) => {
                for entry in rd {
                    let entry = match entry {
                        Ok(e) => e,
                        Err(e) => {
                            out.unreadable.push((rel_of(&dir), e.to_string()));
                            continue;
                        }
                    };
                    // Our own reserved names (a file on its way to the archive) are never
                    // spool files, whatever `spool.ignore` says.
                    if ignore.matches_name(&entry.file_name())
                        || entry.file_name().as_encoded_bytes().starts_with(b".ferry-")
                    {
                        continue;
                    }
                    let path = entry.path();
                    let md = match entry.metadata() {
                        Ok(md) => md,
                        // Gone between the listing and the stat: nothing to report.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => {
                            out.unreadable.push((rel_of(&path), e.to_string()));
                            continue;
                        }
                    };
                    let rel = rel_of(&path);
                    let ft = md.file_type();
                    if ft.is_dir() {
                        subdirs.push(path);
                    } else if ft.is_file() {
                        out.files.push((rel, FileStat::of(&md)));
                    } else {
                        out.skipped.push(rel);
                    }
                }
            }
        }
        let Ok(mut w) = work.lock() else { return out };
        w.0.extend(subdirs);
    }
}

struct Done<'a>(
    &'a std::sync::Mutex<(Vec<PathBuf>, usize)>,
    &'a std::sync::Condvar,
);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        let mut w = match self.0.lock() {
            Ok(w) => w,
            Err(p) => p.into_inner(),
        };
        w.1 -= 1;
        self.1.notify_all();
    }
}

impl Watcher {
    fn rel(&self, p: &Path) -> Option<PathBuf> {
        let rel = p.strip_prefix(&self.spool).ok()?;
        if rel.as_os_str().is_empty() || self.ignore.is_ignored(rel) {
            return None;
        }
        if rel
            .file_name()
            .is_some_and(|n| n.as_encoded_bytes().starts_with(b".ferry-"))
        {
            return None;
        }
        Some(rel.to_path_buf())
    }

    /// How often the spool is scanned while no watch could be set.
    fn poll_interval(&self) -> Duration {
        self.settle
            .max(Duration::from_secs(1))
            .min(self.rescan_interval)
    }

    /// Sets the recursive watch. When the kernel refuses (inotify instances or watches used
    /// up, a filesystem without inotify), the spool is scanned every `poll_interval` instead
    /// and the watch is tried again at each rescan: files still go up, a little later.
    fn start_watch(
        &self,
        tx: &mpsc::UnboundedSender<notify::Result<notify::Event>>,
    ) -> Result<notify::RecommendedWatcher, String> {
        if self.poll_only {
            crate::telemetry::metrics().set_spool_watched(false);
            return Err("polling only, as configured".into());
        }
        let tx = tx.clone();
        // Symlinks are skipped, never uploaded: watching through them would only walk
        // (and spend watches on) trees outside the spool.
        let res = <notify::RecommendedWatcher as notify::Watcher>::new(
            move |ev| {
                let _ = tx.send(ev);
            },
            notify::Config::default().with_follow_symlinks(false),
        )
        .and_then(|mut w| w.watch(&self.spool, RecursiveMode::Recursive).map(|()| w));
        crate::telemetry::metrics().set_spool_watched(res.is_ok());
        res.map_err(|e| {
            tracing::warn!(
                spool = %self.spool.display(),
                error = %e,
                poll = ?self.poll_interval(),
                "cannot watch the spool; scanning it periodically instead \
                 (raise fs.inotify.max_user_instances / max_user_watches)"
            );
            e.to_string()
        })
    }

    /// Records the watch mode where `ferry status` (another process) reads it: a notice
    /// under `catalog::WATCH_NOTICE`, written when the mode changes (its time is "since").
    async fn note_watch(&self, res: &Result<notify::RecommendedWatcher, String>) {
        let msg = match res {
            Ok(_) => "inotify".to_string(),
            Err(e) => format!(
                "polling: scanning the spool every {} (no inotify watch: {e})",
                humantime::format_duration(self.poll_interval())
            ),
        };
        let _ = self
            .catalog
            .write(move |c| ops::set_notice(c, crate::catalog::WATCH_NOTICE, &msg))
            .await;
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let (tx, mut rx) = mpsc::unbounded_channel::<notify::Result<notify::Event>>();
        // Start the watch first, then scan: a file that appears in between is seen twice,
        // never missed.
        let first = self.start_watch(&tx);
        self.note_watch(&first).await;
        let mut watcher = first.ok();

        let mut pending: HashMap<PathBuf, Pending> = HashMap::new();
        let mut warned: HashSet<PathBuf> = HashSet::new();
        // A lease notice describes this process (its capabilities, its mounts): a restart
        // after the fix starts with none.
        let _ = self
            .catalog
            .write(|c| ops::clear_notices(c, "lease:", &HashSet::new()))
            .await;
        self.full_scan(&mut pending, &mut warned).await;
        if let Some(tx) = self.started.take() {
            let _ = tx.send(());
        }

        // The settle pass looks only at entries due (quiet for `settle`), so a short tick is
        // cheap; it is what a close-finished file waits beyond `settle`.
        let tick = (self.settle / 20).clamp(Duration::from_millis(10), Duration::from_millis(50));
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rescan = tokio::time::interval(self.rescan_interval);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rescan.tick().await;
        let mut poll = tokio::time::interval(self.poll_interval());
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    let mut whole = false;
                    let mut new_dirs = false;
                    let mut lost_watch = limit_reached(&ev);
                    let mut need_scan = self.on_event(ev, &mut pending, &mut whole, &mut new_dirs);
                    // Drain what else has queued, so a burst is one pass.
                    while let Ok(ev) = rx.try_recv() {
                        lost_watch |= limit_reached(&ev);
                        need_scan |= self.on_event(ev, &mut pending, &mut whole, &mut new_dirs);
                    }
                    if new_dirs {
                        watcher = barrier(watcher).await;
                    }
                    if lost_watch && watcher.is_some() {
                        // Folders the kernel would not watch get no events: scan every
                        // poll interval (as without a watch) until a rescan sets it whole.
                        tracing::warn!(
                            spool = %self.spool.display(),
                            poll = ?self.poll_interval(),
                            "the inotify watch limit is reached; scanning the spool periodically instead \
                             (raise fs.inotify.max_user_watches)"
                        );
                        watcher = None;
                        crate::telemetry::metrics().set_spool_watched(false);
                        let why: Result<notify::RecommendedWatcher, String> =
                            Err("the inotify watch limit is reached".into());
                        self.note_watch(&why).await;
                    }
                    if need_scan {
                        self.full_scan(&mut pending, &mut warned).await;
                    }
                    // A file renamed in is ready once nobody writes it: no need to wait
                    // for the next tick.
                    if whole {
                        self.settle_pass(&mut pending, &mut warned).await;
                    }
                }
                _ = ticker.tick() => {
                    if !pending.is_empty() {
                        self.settle_pass(&mut pending, &mut warned).await;
                    }
                }
                _ = rescan.tick() => {
                    if watcher.is_none() && !self.poll_only {
                        let again = self.start_watch(&tx);
                        if again.is_ok() {
                            tracing::info!(spool = %self.spool.display(), "watching the spool again");
                            self.note_watch(&again).await;
                        }
                        watcher = again.ok();
                    }
                    self.full_scan(&mut pending, &mut warned).await
                }
                _ = poll.tick(), if watcher.is_none() => {
                    self.full_scan(&mut pending, &mut warned).await
                }
            }
        }
        drop(watcher);
        Ok(())
    }

    /// Applies one event; returns true when a full scan is needed (events were lost, or a
    /// folder appeared: `new_dirs` is set, so notify's watches come before that scan).
    fn on_event(
        &self,
        ev: notify::Result<notify::Event>,
        pending: &mut HashMap<PathBuf, Pending>,
        whole: &mut bool,
        new_dirs: &mut bool,
    ) -> bool {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, "watch error; rescanning the spool");
                return true;
            }
        };
        if ev.need_rescan() || ev.paths.is_empty() && matches!(ev.kind, EventKind::Other) {
            tracing::warn!("the kernel dropped spool events; rescanning");
            return true;
        }
        let now = Instant::now();
        let mut rescan = false;
        let touch = |pending: &mut HashMap<PathBuf, Pending>, p: &Path, eligible: Option<bool>| {
            let Some(rel) = self.rel(p) else { return };
            let e = pending
                .entry(rel)
                .or_insert(Pending::new(None, now, false, false));
            e.since = now;
            // The event says the file changed: what an earlier look recorded is stale, and
            // the next look only records it again. The quiet time runs from this event (on
            // the monotonic clock) instead of restarting when that look sees the change.
            e.stat = None;
            if let Some(el) = eligible {
                e.eligible = el;
                // Written to (or closed after writing): no longer a whole arrival.
                e.whole = false;
            }
        };
        match ev.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                for p in &ev.paths {
                    touch(pending, p, Some(true));
                }
            }
            EventKind::Create(CreateKind::Folder) => {
                *new_dirs = true;
                rescan = true;
            }
            EventKind::Create(_) => {
                for p in &ev.paths {
                    let md = std::fs::symlink_metadata(p);
                    if md.as_ref().is_ok_and(|m| m.is_dir()) {
                        *new_dirs = true;
                        rescan = true;
                        continue;
                    }
                    // A hard link (sftp's link-then-unlink) arrives complete, with no close
                    // event; an O_CREAT file is empty at first and waits for its close. Any
                    // write events queued behind this one make it ineligible again. Either
                    // way the lease is the word on whether someone still writes it.
                    let linked = md.as_ref().is_ok_and(|m| {
                        use std::os::unix::fs::MetadataExt;
                        m.is_file() && m.nlink() > 1
                    });
                    let nonempty = md.is_ok_and(|m| m.is_file() && m.len() > 0);
                    touch(pending, p, Some(linked || nonempty));
                    if linked {
                        if let Some(e) = self.rel(p).and_then(|r| pending.get_mut(&r)) {
                            e.whole = true;
                        }
                    }
                }
            }
            EventKind::Modify(ModifyKind::Name(mode)) => match mode {
                RenameMode::From => {
                    for p in &ev.paths {
                        if let Some(rel) = self.rel(p) {
                            pending.remove(&rel);
                        }
                    }
                }
                RenameMode::Both if ev.paths.len() == 2 => {
                    if let Some(rel) = self.rel(&ev.paths[0]) {
                        pending.remove(&rel);
                    }
                    *whole |= self.arrived(&ev.paths[1], pending, now, &mut rescan, new_dirs);
                }
                _ => {
                    for p in &ev.paths {
                        if p.exists() {
                            *whole |= self.arrived(p, pending, now, &mut rescan, new_dirs);
                        } else if let Some(rel) = self.rel(p) {
                            pending.remove(&rel);
                        }
                    }
                }
            },
            EventKind::Modify(ModifyKind::Metadata(_)) => {
                for p in &ev.paths {
                    touch(pending, p, None);
                }
            }
            EventKind::Modify(_) => {
                for p in &ev.paths {
                    touch(pending, p, Some(false));
                }
            }
            EventKind::Remove(_) => {
                for p in &ev.paths {
                    if let Some(rel) = self.rel(p) {
                        pending.remove(&rel);
                    }
                }
            }
            EventKind::Access(_) => {}
            EventKind::Any | EventKind::Other => {
                for p in &ev.paths {
                    touch(pending, p, None);
                }
            }
        }
        rescan
    }

    /// A path renamed into the spool: a whole file (true), or a folder of them.
    fn arrived(
        &self,
        p: &Path,
        pending: &mut HashMap<PathBuf, Pending>,
        now: Instant,
        rescan: &mut bool,
        new_dirs: &mut bool,
    ) -> bool {
        if std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()) {
            *new_dirs = true;
            *rescan = true;
            return false;
        }
        match self.rel(p) {
            Some(rel) => {
                pending.insert(rel, Pending::new(None, now, true, true));
                true
            }
            None => false,
        }
    }

    /// Re-stats pending files and hands the ready ones to the catalog.
    async fn settle_pass(
        &self,
        pending: &mut HashMap<PathBuf, Pending>,
        warned: &mut HashSet<PathBuf>,
    ) {
        // Only entries that have been quiet for `settle` (or were never stat'ed) are looked
        // at: a change in between shows in ctime at the due stat, or came with an event that
        // reset `since`. With 100,000 files found at start-up this is one stat per file per
        // settle period instead of one per tick.
        let now = Instant::now();
        let paths: Vec<PathBuf> = pending
            .iter()
            .filter(|(_, p)| {
                p.stat.is_none() || p.whole || now.duration_since(p.since) >= self.settle
            })
            .map(|(k, _)| k.clone())
            .collect();
        if paths.is_empty() {
            return;
        }
        let spool = self.spool.clone();
        let stats = tokio::task::spawn_blocking(move || {
            let stat_all = |chunk: &[PathBuf]| {
                chunk
                    .iter()
                    .map(|rel| {
                        let st = match std::fs::symlink_metadata(spool.join(rel)) {
                            Ok(m) if m.file_type().is_file() => Some(Ok(FileStat::of(&m))),
                            Ok(_) => Some(Err(())),
                            Err(_) => None,
                        };
                        (rel.clone(), st)
                    })
                    .collect::<Vec<_>>()
            };
            // Thousands of stats (a full spool at start-up) are shared among the cores.
            if paths.len() < 4096 {
                return stat_all(&paths);
            }
            let threads = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .clamp(1, 4);
            let chunk = paths.len().div_ceil(threads);
            std::thread::scope(|scope| {
                let handles: Vec<_> = paths
                    .chunks(chunk)
                    .map(|c| scope.spawn(|| stat_all(c)))
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().unwrap_or_default())
                    .collect::<Vec<_>>()
            })
        })
        .await
        .unwrap_or_default();
        let now = Instant::now();
        let long_quiet = self.rescan_interval.max(self.settle);
        let mut candidates = Vec::new();
        for (rel, st) in stats {
            match st {
                None => {
                    pending.remove(&rel);
                }
                Some(Err(())) => {
                    pending.remove(&rel);
                    if warned.insert(rel.clone()) {
                        tracing::warn!(path = %rel.display(), "not a regular file (symlink or special); skipped");
                    }
                }
                Some(Ok(st)) => {
                    let Some(p) = pending.get_mut(&rel) else {
                        continue;
                    };
                    if p.stat != Some(st) {
                        // The first stat after an event only records the file: the quiet time
                        // runs from the event (a change after it brings another event, or
                        // shows in ctime at the due stat; a writer still holding the file is
                        // refused by the lease). Restarting it here cost up to a tick more.
                        // A whole arrival seen for the first time is as it will stay; any
                        // later change restarts the quiet time.
                        let first = p.stat.is_none();
                        p.stat = Some(st);
                        if !first {
                            // A change no event announced: the quiet time starts again now.
                            p.whole = false;
                            p.since = now;
                            continue;
                        }
                    }
                    let quiet = now.duration_since(p.since);
                    // A close-write that never came (missed events) is not waited for forever.
                    if !p.eligible && quiet >= long_quiet {
                        tracing::debug!(path = %rel.display(), "no close seen; ready by quiet time");
                        p.eligible = true;
                    }
                    let needed = if p.no_lease {
                        long_quiet
                    } else if p.whole {
                        Duration::ZERO
                    } else {
                        self.settle
                    };
                    if p.eligible && quiet >= needed {
                        candidates.push((rel.clone(), st));
                    }
                }
            }
        }
        if candidates.is_empty() {
            return;
        }
        // Finished by its writer; now, does anyone still write it? The kernel knows.
        let spool = self.spool.clone();
        let probed = tokio::task::spawn_blocking(move || {
            candidates
                .into_iter()
                .map(|(rel, st)| {
                    let r = lease::probe_path(&spool.join(&rel));
                    (rel, st, r)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut ready = Vec::new();
        let now = Instant::now();
        for (rel, st, r) in probed {
            let Some(p) = pending.get_mut(&rel) else {
                continue;
            };
            match r {
                Ok(lease::ProbeResult::Free) => {
                    ready.push((rel.clone(), st));
                    pending.remove(&rel);
                }
                Ok(lease::ProbeResult::Busy) => {
                    // A writer holds it open: its close brings an event; without one, look
                    // again after another settle period.
                    crate::telemetry::metrics().lease_busy.inc();
                    tracing::debug!(path = %rel.display(), "still open for writing");
                    p.since = now;
                    p.whole = false;
                }
                Ok(lease::ProbeResult::Unavailable(u)) => {
                    if !p.no_lease {
                        p.no_lease = true;
                        crate::telemetry::metrics().lease_fallbacks.inc();
                        self.note_no_lease(&rel, &u, long_quiet).await;
                    }
                    if now.duration_since(p.since) >= long_quiet {
                        ready.push((rel.clone(), st));
                        pending.remove(&rel);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    pending.remove(&rel);
                }
                Err(e) => {
                    // EWOULDBLOCK: someone holds a write lease; anything else, look again.
                    tracing::debug!(path = %rel.display(), error = %e, "cannot open for a lease; will look again");
                    p.since = now;
                }
            }
        }
        if !ready.is_empty() {
            self.submit(ready).await;
        }
    }

    /// Says once per process (log) and once per reason (`ferry status`, as a notice) that
    /// files are read without a lease and wait the long quiet time instead.
    async fn note_no_lease(&self, rel: &Path, u: &lease::Unavailable, quiet: Duration) {
        let msg = format!(
            "{} (first seen on {}): such files are ready only after {} of quiet \
             (max(spool.rescan_interval, spool.settle)); a writer that pauses longer \
             would be uploaded early. Grant CAP_LEASE (systemd/ferry.service does) or use \
             a filesystem with leases (ext4, xfs, tmpfs)",
            u.reason,
            rel.display(),
            humantime::format_duration(quiet)
        );
        // Once per reason and process: with 100,000 such files, one line and one notice.
        if !lease::warn_once(u.errno) {
            return;
        }
        tracing::warn!(path = %rel.display(), reason = %u.reason, quiet = ?quiet, "no read lease on a spool file; falling back to the long quiet time");
        let topic = format!("lease:{}", u.errno);
        let _ = self
            .catalog
            .write(move |c| ops::set_notice(c, &topic, &msg))
            .await;
    }

    /// Queues ready files in the catalog (one transaction) and records refused names.
    async fn submit(&self, ready: Vec<(PathBuf, FileStat)>) {
        let prefix = self.prefix.clone();
        let res = self
            .catalog
            .write(move |c| {
                let mut queued = 0;
                for (rel, st) in ready {
                    match Key::from_rel_path(&rel, &prefix) {
                        Ok(key) => {
                            if ops::note_ready(c, &key, st)? == Noted::Queued {
                                queued += 1;
                            }
                        }
                        Err(e) => {
                            let name = rel.to_string_lossy().into_owned();
                            if ops::note_refused(c, &name, &e.to_string())? {
                                tracing::warn!(name = %name, reason = %e, "spool name is not a valid key; left in place");
                            }
                        }
                    }
                }
                Ok(queued)
            })
            .await;
        match res {
            Ok(n) if n > 0 => {
                tracing::debug!(queued = n, "files queued");
                self.wake.notify_one();
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "catalog: cannot queue ready files; will retry at the next scan")
            }
        }
    }

    /// A scan: files it finds with no events are judged by the lease (a writer that pauses
    /// still holds the file open), then `spool.settle` from now; without a lease, by the
    /// long quiet time. Unreadable folders and files become notices in `ferry status`.
    async fn full_scan(
        &self,
        pending: &mut HashMap<PathBuf, Pending>,
        warned: &mut HashSet<PathBuf>,
    ) {
        let spool = self.spool.clone();
        let ignore = self.ignore.clone();
        let found = match tokio::task::spawn_blocking(move || scan(&spool, &ignore)).await {
            Ok(found) => found,
            Err(e) => {
                // A bug, not a spool fault: said loudly, and the next rescan looks again
                // (nothing was queued from this one, so nothing is lost).
                tracing::error!(error = %e, "the spool scan failed; the next rescan looks again");
                return;
            }
        };
        let now = Instant::now();
        for rel in found.skipped {
            if warned.insert(rel.clone()) {
                tracing::warn!(path = %rel.display(), "not a regular file (symlink or special); skipped");
            }
        }
        let unreadable: Vec<(String, String)> = found
            .unreadable
            .iter()
            .map(|(p, e)| (format!("unreadable:{}", p.display()), e.clone()))
            .collect();
        crate::telemetry::metrics()
            .spool_unreadable
            .set(unreadable.len() as i64);
        for (topic, e) in &unreadable {
            if warned.insert(PathBuf::from(topic)) {
                tracing::warn!(path = %topic.trim_start_matches("unreadable:"), error = %e, "cannot read a spool entry; its files are not uploaded until it can be read");
            }
        }
        let _ = self
            .catalog
            .write(move |c| {
                let keep: HashSet<String> = unreadable.iter().map(|(t, _)| t.clone()).collect();
                for (topic, e) in &unreadable {
                    ops::set_notice(
                        c,
                        topic,
                        &format!("cannot read or stat this spool entry: {e}"),
                    )?;
                }
                ops::clear_notices(c, "unreadable:", &keep)
            })
            .await;
        let mut names: Vec<String> = Vec::new();
        for (rel, st) in found.files {
            names.push(rel.to_string_lossy().into_owned());
            // Files already watched keep their state; new ones are judged by the lease,
            // then `spool.settle` from now (DESIGN.md "Ready file", found by a scan).
            pending
                .entry(rel)
                .or_insert(Pending::new(Some(st), now, true, false));
        }
        // Refused names that left the spool are forgotten.
        let _ = self
            .catalog
            .write(move |c| {
                let set: HashSet<String> = names.into_iter().collect();
                for (name, _) in ops::refused(c)? {
                    if !set.contains(&name) {
                        ops::forget_refused(c, &name)?;
                    }
                }
                Ok(())
            })
            .await;
    }
}

/// Whether notify reports that a folder could not be watched for the kernel's limit.
fn limit_reached(ev: &notify::Result<notify::Event>) -> bool {
    matches!(ev, Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch))
}

/// Waits until notify has watched the folders that just appeared, before the scan that
/// looks into them. notify hands a folder's create (or move-in) event over *before* it adds
/// that folder's watch, so a scan started by the event could run, find nothing, and a file
/// written into the folder before the watch was added would come with no event at all:
/// found only by the next periodic rescan (a writer pausing between `mkdir` and its first
/// file). A `configure` call is a message notify's event loop answers only after the batch
/// of events being handed over, and the watches it asked for, are done; whatever was
/// created before that is found by the scan, whatever comes after sends events. It adds no
/// watch of its own: a watch of ferry's own on a folder would also report the folder's own
/// deletion, and a late one (an old folder renamed over, still held open) made notify drop
/// the new folder's watches.
async fn barrier(
    watcher: Option<notify::RecommendedWatcher>,
) -> Option<notify::RecommendedWatcher> {
    let mut w = watcher?;
    // The call waits on notify's thread, which never waits on this one.
    let back = tokio::task::spawn_blocking(move || {
        let r = w.configure(notify::Config::default());
        (w, r)
    })
    .await;
    let why = match back {
        Ok((w, Ok(_))) => return Some(w),
        Ok((w, Err(e))) => {
            // notify's thread is gone, and dropping a watcher without it would panic in
            // notify's Drop.
            std::mem::forget(w);
            e.to_string()
        }
        Err(e) => e.to_string(),
    };
    tracing::error!(error = %why, "the spool watch stopped answering; scanning until it is set again");
    crate::telemetry::metrics().set_spool_watched(false);
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::State;

    /// A watcher of `spool` with a 100 ms settle time, ignoring dot files, and the
    /// receiver told once its first scan is done.
    fn test_watcher(
        spool: &Path,
        catalog: &Catalog,
        rescan_interval: Duration,
        poll_only: bool,
    ) -> (Watcher, tokio::sync::oneshot::Receiver<()>) {
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let w = Watcher {
            spool: spool.to_path_buf(),
            prefix: String::new(),
            settle: Duration::from_millis(100),
            rescan_interval,
            ignore: IgnoreSet::new(&[".*".to_string()]).unwrap(),
            catalog: catalog.clone(),
            wake: Arc::new(Notify::new()),
            started: Some(started_tx),
            poll_only,
        };
        (w, started_rx)
    }

    async fn state_of(catalog: &Catalog, key: &'static str) -> Option<State> {
        catalog
            .read(move |c| ops::get(c, key))
            .await
            .ok()
            .flatten()
            .map(|r| r.state)
    }

    /// A folder tree moved into the spool while files are being written into it: notify
    /// reports the move before it has walked the tree to watch it, and a scan started by
    /// that event must not run before the walk, or a file written into a folder it had
    /// already looked at, but that was not yet watched, comes with no event and waits for
    /// the hourly rescan.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_written_into_a_folder_tree_as_it_moves_in_are_all_queued() {
        const DIRS: usize = 3000;
        let t = tempfile::tempdir().unwrap();
        let spool = t.path().join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        let outside = t.path().join("tree");
        for d in 0..DIRS {
            std::fs::create_dir_all(outside.join(format!("d{d:04}"))).unwrap();
        }
        let catalog = Catalog::open(&t.path().join("ferry.db")).unwrap();
        // Only events and the scans they start can find these files in time.
        let (w, started_rx) = test_watcher(&spool, &catalog, Duration::from_secs(3600), false);
        let stop = CancellationToken::new();
        let task = tokio::spawn(w.run(stop.clone()));
        started_rx.await.unwrap();
        let inside = spool.join("tree");
        std::fs::rename(&outside, &inside).unwrap();
        // From the last folder to the first, against the order both walks tend to take.
        let writer = std::thread::spawn(move || {
            for d in (0..DIRS).rev() {
                std::fs::write(inside.join(format!("d{d:04}/f.jpg")), b"photo").unwrap();
            }
        });
        writer.join().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let queued = catalog
                .read(|c| {
                    c.query_row("SELECT count(*) FROM files", [], |r| r.get::<_, i64>(0))
                        .map_err(Into::into)
                })
                .await
                .unwrap();
            if queued == DIRS as i64 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{queued} of {DIRS} files written into the moved-in tree were queued"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    /// A folder replaced by a rename of another over it while something (a shell, an open
    /// handle) still holds the old one: when the old one finally goes, nothing may take
    /// the new folder's watches with it (a watch of ferry's own on the old folder did,
    /// through its late deletion event; the attack review's W1).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_folder_renamed_over_one_still_held_open_keeps_its_events() {
        let t = tempfile::tempdir().unwrap();
        let spool = t.path().join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        let catalog = Catalog::open(&t.path().join("ferry.db")).unwrap();
        let (w, started_rx) = test_watcher(&spool, &catalog, Duration::from_secs(3600), false);
        let stop = CancellationToken::new();
        let task = tokio::spawn(w.run(stop.clone()));
        started_rx.await.unwrap();
        let d = spool.join("D");
        std::fs::create_dir(&d).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let held = std::fs::File::open(&d).unwrap();
        let build = t.path().join("build");
        std::fs::create_dir_all(build.join("sub")).unwrap();
        std::fs::rename(&build, &d).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::fs::write(d.join("f.jpg"), b"photo").unwrap();
        std::fs::write(d.join("sub/g.jpg"), b"photo").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let f = state_of(&catalog, "D/f.jpg").await;
            let g = state_of(&catalog, "D/sub/g.jpg").await;
            if f == Some(State::Queued) && g == Some(State::Queued) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "files written after the old folder went were not queued: D/f.jpg {f:?}, D/sub/g.jpg {g:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    /// A symlink in a new folder to a tree outside the spool: never walked or watched
    /// (notify follows links by default), so nothing outside is queued from its events.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_symlink_to_a_folder_outside_is_not_watched_through() {
        let t = tempfile::tempdir().unwrap();
        let spool = t.path().join("spool");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(&spool).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let catalog = Catalog::open(&t.path().join("ferry.db")).unwrap();
        let (w, started_rx) = test_watcher(&spool, &catalog, Duration::from_secs(3600), false);
        let stop = CancellationToken::new();
        let task = tokio::spawn(w.run(stop.clone()));
        started_rx.await.unwrap();
        std::fs::create_dir(spool.join("new")).unwrap();
        std::os::unix::fs::symlink(&outside, spool.join("new/link")).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::fs::write(outside.join("secret.jpg"), b"not spool").unwrap();
        std::fs::write(spool.join("new/inside.jpg"), b"spool").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while state_of(&catalog, "new/inside.jpg").await != Some(State::Queued) {
            assert!(Instant::now() < deadline, "new/inside.jpg was not queued");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Past the settle time of anything its events would have queued.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(state_of(&catalog, "new/link/secret.jpg").await, None);
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    /// With no watch (what a refused inotify leaves), files are still found, settled and
    /// queued by the periodic scan, including files that arrive after the start; a file a
    /// writer still holds open is never queued, however long it stays quiet (no close is
    /// ever seen in polling mode: the lease is what tells).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_watch_scans_still_queue_files() {
        use std::io::Write;
        let t = tempfile::tempdir().unwrap();
        let spool = t.path().join("spool");
        std::fs::create_dir_all(spool.join("a")).unwrap();
        std::fs::write(spool.join("a/early.jpg"), b"early").unwrap();
        let mut held = std::fs::File::create(spool.join("a/held.jpg")).unwrap();
        held.write_all(b"first half").unwrap();
        let catalog = Catalog::open(&t.path().join("ferry.db")).unwrap();
        let (w, started_rx) = test_watcher(&spool, &catalog, Duration::from_secs(2), true);
        assert_eq!(w.poll_interval(), Duration::from_secs(1));
        let stop = CancellationToken::new();
        let task = tokio::spawn(w.run(stop.clone()));
        started_rx.await.unwrap();
        std::fs::write(spool.join("late.jpg"), b"late").unwrap();
        std::fs::write(spool.join(".hidden.tmp"), b"temp").unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let early = state_of(&catalog, "a/early.jpg").await;
            let late = state_of(&catalog, "late.jpg").await;
            if early == Some(State::Queued) && late == Some(State::Queued) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not queued by polling: early {early:?}, late {late:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Past both the settle time and max(rescan_interval, settle): still held, so not
        // ready.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(state_of(&catalog, "a/held.jpg").await, None);
        held.write_all(b", second half").unwrap();
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(20);
        while state_of(&catalog, "a/held.jpg").await != Some(State::Queued) {
            assert!(Instant::now() < deadline, "a closed file was not queued");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let size = catalog
            .read(|c| ops::get(c, "a/held.jpg"))
            .await
            .unwrap()
            .unwrap()
            .stat
            .size;
        assert_eq!(size, b"first half, second half".len() as u64);
        assert_eq!(state_of(&catalog, ".hidden.tmp").await, None);
        stop.cancel();
        task.await.unwrap().unwrap();
    }
}
