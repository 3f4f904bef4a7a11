//! The hot cache: popular objects kept on local disk under `cache.dir`, bounded by
//! `cache.max_size`, evicted by frequency and recency, expiring after `cache.ttl`, and
//! rebuilt from disk at start-up.
//!
//! Admission is TinyLFU-like: a newcomer displaces entries only if it has been asked for more
//! often than every entry it would displace (least frequent first, least recent among
//! equals), so a scan of keys that are barely hot cannot flush the hot set. Frequencies are
//! halved as accesses accumulate, so yesterday's favourites age out.
//!
//! An entry is two files named by the SHA-256 of its key: `<h>.data` (the bytes) and
//! `<h>.json` (key, sha256, size, created). Data is written to a temp name and renamed in only
//! after its size and SHA-256 match; an entry read back from disk after a restart is re-hashed
//! before its first use, so a corrupted file is dropped and refetched, never served.
//!
//! Small entries (at most [`HELD_MAX`], [`HELD_BUDGET`] in all) are also held in memory, once
//! the bytes read from the checked file hash to the entry's SHA-256 again: their hits then
//! make no system call (an open, an fstat, a read and a close were a fifth of a 4 KiB hit's
//! time). Held bytes are proven bytes, so a data file rewritten afterwards cannot reach a
//! client through them; they go with the entry (eviction, expiry, a new version).
//!
//! Hotness (DESIGN.md "Hotness") lives here too: hits per key in a sliding window.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The largest entry whose bytes are held in memory: what a hit reads whole anyway (larger
/// ones go by sendfile from the page cache).
pub const HELD_MAX: u64 = super::local::PRELOAD_MAX;

/// Held bytes in all, counted by entry size: a few thousand small hot objects.
pub const HELD_BUDGET: u64 = 32 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct Sidecar {
    key: String,
    sha256: String,
    size: u64,
    created_ms: u64,
}

#[derive(Debug)]
pub struct Entry {
    pub key: String,
    pub sha256: String,
    pub size: u64,
    pub data: PathBuf,
    json: PathBuf,
    /// Entries loaded from disk are hashed once before they are trusted.
    checked: AtomicBool,
    /// False between admission and the data file landing: not servable yet.
    ready: AtomicBool,
    /// Accesses (aged by halving): what admission compares.
    freq: AtomicU32,
    /// Last access, ms since the cache opened: the tie-break among equally frequent.
    last: AtomicU64,
    created: Instant,
    /// (size, mtime ns, inode) of the data file when it was last known good: anything that
    /// rewrites the file changes one of them, and the entry is hashed again.
    seen: Mutex<Option<(u64, i64, u64)>>,
    /// The bytes, once read and hashed again (small entries only, within the budget).
    held: std::sync::OnceLock<Bytes>,
}

/// A hit on the executor: the held bytes, or the checked data file opened.
pub enum Hit {
    Held(Bytes),
    File(super::local::LocalFile),
}

fn stat_of(p: &Path) -> Option<(u64, i64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(p).ok()?;
    Some((
        m.len(),
        crate::catalog::stat_ns(m.mtime(), m.mtime_nsec()),
        m.ino(),
    ))
}

pub struct HotCache {
    dir: PathBuf,
    index: Mutex<Index>,
    /// The cache directory, opened once, for lookups beneath it.
    dir_fd: Option<File>,
    max_size: u64,
    /// The largest entry taken (`cache.max_object`): a bigger one would displace much of
    /// the cache, or never fit and be fetched whole on every request.
    max_object: u64,
    ttl: Duration,
    opened: Instant,
    hits: moka::sync::Cache<String, Arc<Mutex<VecDeque<Instant>>>>,
    /// Keys whose admission was refused lately: served the normal way (redirect) for a while
    /// rather than fetched from S3 on every request.
    refused: moka::sync::Cache<String, ()>,
    hot_hits: u32,
    window: Duration,
    enabled: bool,
}

/// How long a refused admission is remembered.
const REFUSAL_MEMORY: Duration = Duration::from_secs(30);

fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl HotCache {
    /// Opens (creating) the cache directory and rebuilds the index from it. Blocking.
    pub fn open(
        dir: &Path,
        max_size: u64,
        ttl: Duration,
        hot_hits: u32,
        window: Duration,
    ) -> io::Result<HotCache> {
        let enabled = max_size > 0;
        if enabled {
            fs::create_dir_all(dir)?;
        }
        let hits = moka::sync::Cache::builder()
            .max_capacity(1_000_000)
            .time_to_live(window)
            .build();
        let refused = moka::sync::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(REFUSAL_MEMORY)
            .build();
        let dir_fd = if enabled {
            Some(File::open(dir)?)
        } else {
            None
        };
        let cache = HotCache {
            dir_fd,
            refused,
            dir: dir.to_path_buf(),
            index: Mutex::new(Index::default()),
            max_size,
            max_object: max_size,
            ttl,
            opened: Instant::now(),
            hits,
            hot_hits,
            window,
            enabled,
        };
        if enabled {
            cache.rebuild()?;
        }
        Ok(cache)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Sets `cache.max_object` (never above `max_size`).
    pub fn with_max_object(mut self, max_object: u64) -> HotCache {
        self.max_object = max_object.min(self.max_size);
        self
    }

    /// Whether an object of `size` bytes may be admitted at all.
    pub fn fits(&self, size: u64) -> bool {
        self.enabled && size <= self.max_object
    }

    /// Remembers that `key` will not be admitted, so its next requests take the normal way
    /// instead of another fetch from S3.
    pub fn refuse(&self, key: &str) {
        if !self.refused.contains_key(key) {
            tracing::debug!(key, "hot key refused by the cache");
            self.refused.insert(key.to_string(), ());
        }
    }

    fn rebuild(&self) -> io::Result<()> {
        for e in fs::read_dir(&self.dir)?.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp") {
                // A fill cut short by a stop.
                let _ = fs::remove_file(&p);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            let Ok(text) = fs::read_to_string(&p) else {
                continue;
            };
            let Ok(sc) = serde_json::from_str::<Sidecar>(&text) else {
                let _ = fs::remove_file(&p);
                continue;
            };
            let h = key_hash(&sc.key);
            let data = self.dir.join(format!("{h}.data"));
            let size_ok = fs::metadata(&data)
                .map(|m| m.len() == sc.size)
                .unwrap_or(false);
            if !size_ok {
                let _ = fs::remove_file(&data);
                let _ = fs::remove_file(&p);
                continue;
            }
            // The age of an entry survives restarts through its sidecar.
            let age = Duration::from_millis(now_ms().saturating_sub(sc.created_ms));
            let Some(created) = Instant::now().checked_sub(age) else {
                continue;
            };
            let e = Arc::new(Entry {
                key: sc.key.clone(),
                sha256: sc.sha256,
                size: sc.size,
                data,
                json: p,
                checked: AtomicBool::new(false),
                ready: AtomicBool::new(true),
                seen: Mutex::new(None),
                held: Default::default(),
                freq: AtomicU32::new(1),
                last: AtomicU64::new(0),
                created,
            });
            let fits = self.lock().total + sc.size <= self.max_size;
            if fits {
                crate::telemetry::metrics()
                    .cache_bytes
                    .inc_by(sc.size as i64);
                self.lock().put(e);
            } else {
                drop_files(&e);
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    /// The entry for `key`, counting an access; expired entries are dropped here.
    fn get(&self, key: &str) -> Option<Arc<Entry>> {
        self.get_if(key, |_| true)
    }

    /// As `get`, for an entry `wanted` accepts only: another is neither counted nor returned.
    fn get_if(&self, key: &str, wanted: impl FnOnce(&Entry) -> bool) -> Option<Arc<Entry>> {
        let mut idx = self.lock();
        let e = idx.map.get(key)?.clone();
        if !wanted(&e) {
            return None;
        }
        if e.created.elapsed() >= self.ttl {
            idx.remove(key, true);
            return None;
        }
        e.freq.fetch_add(1, Ordering::Relaxed);
        e.last.store(self.now_ms(), Ordering::Relaxed);
        idx.accesses += 1;
        // Ageing: once accesses reach ten per entry, every count is halved.
        if idx.accesses > 10 * (idx.map.len() as u64).max(16) {
            idx.accesses = 0;
            for v in idx.map.values() {
                let f = v.freq.load(Ordering::Relaxed);
                v.freq.store(f / 2, Ordering::Relaxed);
            }
        }
        Some(e)
    }

    fn invalidate(&self, key: &str) {
        self.lock().remove(key, true);
    }

    /// Drops `e` if it is still `key`'s entry: a newer entry that replaced it meanwhile is
    /// not the one found corrupt.
    fn invalidate_entry(&self, e: &Arc<Entry>) {
        let mut idx = self.lock();
        if idx.map.get(&e.key).is_some_and(|c| Arc::ptr_eq(c, e)) {
            idx.remove(&e.key, true);
        }
    }

    /// Counts one request for `key`; returns the count within the window (capped at
    /// `hot_hits`, which is all anyone needs to know).
    pub fn hit(&self, key: &str) -> u32 {
        // A lookup by &str first: a key asked for before (every hot one) costs no String.
        let w = match self.hits.get(key) {
            Some(w) => w,
            None => self
                .hits
                .get_with(key.to_string(), || Arc::new(Mutex::new(VecDeque::new()))),
        };
        let Ok(mut q) = w.lock() else { return 0 };
        let now = Instant::now();
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            q.pop_front();
        }
        q.push_back(now);
        while q.len() > self.hot_hits as usize {
            q.pop_front();
        }
        q.len() as u32
    }

    pub fn hot_hits(&self) -> u32 {
        self.hot_hits
    }

    /// Whether `key` is hot enough to fetch into the cache: `count` reached the threshold
    /// and the cache has not just refused it.
    pub fn wants(&self, key: &str, count: u32) -> bool {
        self.enabled && count >= self.hot_hits && !self.refused.contains_key(key)
    }

    /// The entry for `key` if it holds exactly the bytes with `sha256`. Blocking (may hash a
    /// file loaded from disk on its first use).
    pub fn lookup(&self, key: &str, sha256: &str) -> Option<Arc<Entry>> {
        if !self.enabled {
            return None;
        }
        let e = self.get(key)?;
        if !e.ready.load(Ordering::Acquire) {
            return None;
        }
        if e.sha256 != sha256 {
            // An old version: never served; dropped so the new one can be cached.
            self.invalidate_entry(&e);
            return None;
        }
        let now = stat_of(&e.data);
        let moved = e.seen.lock().map(|s| *s != now).unwrap_or(true);
        if moved || !e.checked.load(Ordering::Acquire) {
            match crate::digest::sha256_path(&e.data) {
                Ok((n, h)) if n == e.size && h == e.sha256 => {
                    e.checked.store(true, Ordering::Release);
                    if let Ok(mut s) = e.seen.lock() {
                        *s = now;
                    }
                }
                _ => {
                    tracing::warn!(key, "hot cache entry is corrupt; dropped and refetched");
                    self.invalidate_entry(&e);
                    return None;
                }
            }
        }
        Some(e)
    }

    /// Whether an entry for this version may exist, from memory only (no I/O): the hot
    /// path asks this before paying for a blocking `lookup`.
    pub fn may_have(&self, key: &str, sha256: &str) -> bool {
        self.enabled
            && self
                .lock()
                .map
                .get(key)
                .is_some_and(|e| e.sha256 == sha256 && e.ready.load(Ordering::Acquire))
    }

    /// The executor-safe hit: the entry's held bytes, or an entry already checked whose data
    /// file opens from the dentry cache and reads from the page cache
    /// (`local::try_open_cached`), and whose fstat still matches what was checked. `None`
    /// means: take the blocking `lookup` if [`HotCache::may_have`] says so.
    pub fn try_hit_cached(&self, key: &str, sha256: &str, preload: u64) -> Option<Hit> {
        let dir = self.dir_fd.as_ref()?;
        // Counted only as a hit of this version: requests for a newer one must not keep an
        // entry nobody can use hot.
        let e = self.get_if(key, |e| {
            e.ready.load(Ordering::Acquire)
                && e.checked.load(Ordering::Acquire)
                && e.sha256 == sha256
        })?;
        if let Some(bytes) = e.held.get() {
            return Some(Hit::Held(bytes.clone()));
        }
        let name = e.data.file_name()?.to_str()?;
        let mut lf = super::local::try_open_cached(dir, name, preload)?.ok()??;
        // Ferry wrote this file and the fstat below is the check: no second one after the read.
        lf.foreign = false;
        let seen = *e.seen.lock().ok()?;
        if seen != Some((lf.len, lf.stat.mtime_ns, lf.inode)) {
            return None;
        }
        if let Some(bytes) = &lf.preloaded {
            if !self.hold(&e, bytes) {
                // Rewritten behind the cache's back with its size, mtime and inode kept.
                tracing::warn!(key, "hot cache entry is corrupt; dropped and refetched");
                self.invalidate_entry(&e);
                return None;
            }
        }
        Some(Hit::File(lf))
    }

    /// Holds `bytes`, read whole from `e`'s checked data file, if they are small, fit the
    /// budget while `e` is still the key's entry, and hash to the entry's SHA-256. False
    /// only when they were hashed and are not the entry's bytes.
    fn hold(&self, e: &Arc<Entry>, bytes: &Bytes) -> bool {
        if e.size > HELD_MAX || bytes.len() as u64 != e.size {
            return true;
        }
        if self.lock().held + e.size > HELD_BUDGET {
            return true;
        }
        // Once per entry, off the lock: a 32 KiB hash is tens of microseconds.
        if hex::encode(Sha256::digest(bytes)) != e.sha256 {
            return false;
        }
        let mut idx = self.lock();
        let current = idx.map.get(&e.key).is_some_and(|c| Arc::ptr_eq(c, e));
        if current && idx.held + e.size <= HELD_BUDGET && e.held.set(bytes.clone()).is_ok() {
            idx.held += e.size;
        }
        true
    }

    /// Bytes held in memory, by entry size (for tests).
    pub fn held_size(&self) -> u64 {
        self.lock().held
    }

    /// A temp path for a fill in progress.
    pub fn temp_path(&self) -> PathBuf {
        self.dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ))
    }

    /// Admits a completely written temp file whose bytes were hashed during the fill. The
    /// caller has already checked size and SHA-256 against the metadata.
    pub fn admit(&self, key: &str, sha256: &str, size: u64, tmp: &Path) -> io::Result<()> {
        if !self.fits(size) {
            let _ = fs::remove_file(tmp);
            self.refuse(key);
            return Ok(());
        }
        let h = key_hash(key);
        let data = self.dir.join(format!("{h}.data"));
        let json = self.dir.join(format!("{h}.json"));
        // How often this key was asked for lately: what it must beat to displace others.
        let cand = self
            .hits
            .get(key)
            .and_then(|w| w.lock().ok().map(|q| q.len() as u32))
            .unwrap_or(1);
        let entry = Arc::new(Entry {
            key: key.to_string(),
            sha256: sha256.to_string(),
            size,
            seen: Mutex::new(None),
            held: Default::default(),
            data: data.clone(),
            json: json.clone(),
            checked: AtomicBool::new(true),
            ready: AtomicBool::new(false),
            freq: AtomicU32::new(cand),
            last: AtomicU64::new(self.now_ms()),
            created: Instant::now(),
        });
        // Admission first, bytes second: evictions happen before the new file lands, so the
        // directory never holds more than max_size.
        {
            let mut idx = self.lock();
            idx.remove(key, false);
            let need = (idx.total + size).saturating_sub(self.max_size);
            if need > 0 {
                let mut order: Vec<Arc<Entry>> = idx.map.values().cloned().collect();
                order.sort_by_key(|e| {
                    (
                        e.freq.load(Ordering::Relaxed),
                        e.last.load(Ordering::Relaxed),
                    )
                });
                let mut freed = 0;
                let mut victims = Vec::new();
                for v in order {
                    if freed >= need {
                        break;
                    }
                    if v.freq.load(Ordering::Relaxed) >= cand {
                        // Everything left is asked for at least as often: keep them.
                        let _ = fs::remove_file(tmp);
                        self.refused.insert(key.to_string(), ());
                        return Ok(());
                    }
                    freed += v.size;
                    victims.push(v.key.clone());
                }
                if freed < need {
                    let _ = fs::remove_file(tmp);
                    return Ok(());
                }
                for k in victims {
                    idx.remove(&k, true);
                }
            }
            idx.put(entry.clone());
        }
        // The identity of this fill's own file, which the rename keeps: stat after it, and a
        // racing admit of another version of the key, renamed over the same path in
        // between, would have this entry vouch for that version's bytes.
        let ours = stat_of(tmp);
        let landed = (|| {
            fs::rename(tmp, &data)?;
            let sc = Sidecar {
                key: key.to_string(),
                sha256: sha256.to_string(),
                size,
                created_ms: now_ms(),
            };
            let jtmp = self.temp_path();
            fs::write(&jtmp, serde_json::to_vec(&sc).unwrap_or_default())?;
            fs::rename(&jtmp, &json)
        })();
        if let Err(e) = landed {
            let _ = fs::remove_file(tmp);
            self.lock().remove(key, true);
            return Err(e);
        }
        if let Ok(mut s) = entry.seen.lock() {
            *s = ours;
        }
        entry.ready.store(true, Ordering::Release);
        crate::telemetry::metrics().cache_bytes.inc_by(size as i64);
        Ok(())
    }

    /// Drops `key` (deleted or replaced).
    pub fn remove(&self, key: &str) {
        self.invalidate(key);
    }

    /// Bytes held.
    pub fn weighted_size(&self) -> u64 {
        self.lock().total
    }
}

/// The entries, their total size, and the access count that drives ageing.
#[derive(Default)]
struct Index {
    map: std::collections::HashMap<String, Arc<Entry>>,
    total: u64,
    /// Sizes of the entries whose bytes are held in memory.
    held: u64,
    accesses: u64,
}

impl Index {
    fn put(&mut self, e: Arc<Entry>) {
        self.total += e.size;
        if let Some(old) = self.map.insert(e.key.clone(), e) {
            self.total -= old.size;
            self.forget_held(&old);
        }
    }

    /// Removes `key`; `drop_data` also deletes its files (not when a new version of the same
    /// key is about to be renamed over them).
    fn remove(&mut self, key: &str, drop_data: bool) {
        if let Some(e) = self.map.remove(key) {
            self.total -= e.size;
            self.forget_held(&e);
            let m = crate::telemetry::metrics();
            if e.ready.load(Ordering::Acquire) {
                m.cache_bytes.dec_by(e.size as i64);
            }
            m.cache_evictions.inc();
            if drop_data {
                drop_files(&e);
            }
        }
    }

    fn forget_held(&mut self, e: &Entry) {
        if e.held.get().is_some() {
            self.held -= e.size;
        }
    }
}

fn drop_files(e: &Entry) {
    let _ = fs::remove_file(&e.data);
    let _ = fs::remove_file(&e.json);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache in `dir` with a 60 s hot window.
    fn open_cache(dir: &Path, max: u64, ttl_secs: u64, hot_hits: u32) -> HotCache {
        HotCache::open(
            dir,
            max,
            Duration::from_secs(ttl_secs),
            hot_hits,
            Duration::from_secs(60),
        )
        .unwrap()
    }

    fn fill(c: &HotCache, key: &str, bytes: &[u8]) {
        let tmp = c.temp_path();
        fs::write(&tmp, bytes).unwrap();
        let sha = hex::encode(Sha256::digest(bytes));
        c.admit(key, &sha, bytes.len() as u64, &tmp).unwrap();
    }

    #[test]
    fn hotness_counts_within_window() {
        let t = tempfile::tempdir().unwrap();
        let c = open_cache(t.path(), 1 << 20, 60, 3);
        assert_eq!(c.hit("a"), 1);
        assert_eq!(c.hit("a"), 2);
        assert_eq!(c.hit("a"), 3);
        assert_eq!(c.hit("a"), 3, "capped at hot_hits");
        assert_eq!(c.hit("b"), 1);
    }

    #[test]
    fn survives_restart_and_detects_corruption() {
        let t = tempfile::tempdir().unwrap();
        let sha = hex::encode(Sha256::digest(b"hello"));
        {
            let c = open_cache(t.path(), 1 << 20, 60, 3);
            fill(&c, "k", b"hello");
            assert!(c.lookup("k", &sha).is_some());
            assert!(
                c.lookup("k", "other").is_none(),
                "another version is never served"
            );
            fill(&c, "k", b"hello");
        }
        let c = open_cache(t.path(), 1 << 20, 60, 3);
        let e = c.lookup("k", &sha).expect("rebuilt from disk");
        assert_eq!(fs::read(&e.data).unwrap(), b"hello");
        // Overwritten behind the cache's back while running: detected, dropped.
        fs::write(&e.data, b"jello").unwrap();
        assert!(c.lookup("k", &sha).is_none());
        fill(&c, "k", b"hello");
        let e = c.lookup("k", &sha).unwrap();
        // Corrupted on disk while stopped (same size): detected at first use after restart.
        drop(c);
        fs::write(&e.data, b"jello").unwrap();
        let c = open_cache(t.path(), 1 << 20, 60, 3);
        assert!(c.lookup("k", &sha).is_none());
    }

    fn hit(c: &HotCache, key: &str, sha: &str) -> Option<Hit> {
        c.try_hit_cached(key, sha, super::super::local::PRELOAD_MAX)
    }

    /// A small entry's first hit reads its file and, the bytes hashing to the entry's
    /// SHA-256, holds them: later hits are those bytes, whatever happens to the file, until
    /// the entry goes. Bytes that do not hash to it are never held, nor served.
    #[test]
    fn small_entries_are_held_once_proven_and_go_with_the_entry() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let c = open_cache(t.path(), 1 << 20, 600, 3);
        let sha = hex::encode(Sha256::digest(b"hello"));
        fill(&c, "k", b"hello");
        assert!(matches!(hit(&c, "k", &sha), Some(Hit::File(_))));
        assert_eq!(c.held_size(), 5);
        let e = c.lookup("k", &sha).unwrap();
        // A rewrite of the data file no longer reaches a client: the held bytes answer.
        fs::write(&e.data, b"jello").unwrap();
        match hit(&c, "k", &sha) {
            Some(Hit::Held(b)) => assert_eq!(&b[..], b"hello"),
            _ => panic!("held bytes expected"),
        }
        assert!(hit(&c, "k", "another version").is_none());
        c.remove("k");
        assert_eq!(c.held_size(), 0, "held bytes go with the entry");

        // Rewritten before the first hit with its size, mtime and inode kept (so the stat
        // check passes): the hash catches it, the entry is dropped, nothing is served.
        fill(&c, "k2", b"hello");
        let data = c.lookup("k2", &sha).unwrap().data.clone();
        let before = fs::metadata(&data).unwrap();
        fs::write(&data, b"jello").unwrap();
        let mtime = std::time::UNIX_EPOCH
            + Duration::new(before.mtime() as u64, before.mtime_nsec() as u32);
        fs::File::options()
            .write(true)
            .open(&data)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert!(hit(&c, "k2", &sha).is_none());
        assert!(!c.may_have("k2", &sha), "dropped");
        assert_eq!(c.held_size(), 0);

        // Larger than HELD_MAX: served from the file, never held.
        let big = vec![1u8; HELD_MAX as usize + 1];
        let big_sha = hex::encode(Sha256::digest(&big));
        fill(&c, "big", &big);
        for _ in 0..2 {
            assert!(!matches!(hit(&c, "big", &big_sha), Some(Hit::Held(_))));
        }
        assert_eq!(c.held_size(), 0);
    }

    /// Found by the attack review of the held bytes: resolve asks `try_hit_cached` (which
    /// counts an access) before `may_have`. Counted before the SHA-256 check, requests for a
    /// key's *new* version kept bumping the frequency of the entry holding its *old*
    /// version, which no request can use; that dead entry then outranked live ones at
    /// eviction.
    #[test]
    fn requests_for_a_new_version_do_not_keep_the_old_entry_hot() {
        let t = tempfile::tempdir().unwrap();
        let c = open_cache(t.path(), 2 * 1024, 600, 10);
        let old = vec![1u8; 1024];
        let new_sha = hex::encode(Sha256::digest(b"the new version"));
        fill(&c, "stale", &old);
        let live = vec![2u8; 1024];
        let live_sha = hex::encode(Sha256::digest(&live));
        fill(&c, "live", &live);
        // The live key: a few real hits.
        for _ in 0..3 {
            c.hit("live");
            assert!(c.try_hit_cached("live", &live_sha, HELD_MAX).is_some());
        }
        // The stale key's new version: what resolve does per request (the new version is
        // bigger than max_object here, so it is never admitted to replace the old entry).
        for _ in 0..10 {
            if c.try_hit_cached("stale", &new_sha, HELD_MAX).is_none() {
                assert!(!c.may_have("stale", &new_sha));
            }
        }
        // A newcomer asked for 5 times needs one slot.
        for _ in 0..5 {
            c.hit("newcomer");
        }
        fill(&c, "newcomer", &vec![3u8; 1024]);
        assert!(
            c.may_have("newcomer", &hex::encode(Sha256::digest(vec![3u8; 1024]))),
            "admitted"
        );
        assert!(
            c.may_have("live", &live_sha),
            "the live entry was evicted while the dead old version stayed"
        );
    }

    /// Found by the same review (older than the held bytes): two fills of the same key for
    /// two versions of the same size admitted at once. `admit` renames its temp file over `<h>.data` and only then
    /// stats the path: if the other admit's rename lands between the two, the entry in the
    /// index records the identity of the *other* version's file, `checked` already true, and
    /// every later hit (the stat check passes) serves those bytes under this version's tag.
    #[test]
    fn racing_admits_of_two_versions_never_serve_the_other_bytes() {
        use std::os::unix::fs::FileExt;
        let t = tempfile::tempdir().unwrap();
        let c = Arc::new(open_cache(t.path(), 64 << 20, 600, 1));
        // Bigger than HELD_MAX: the first hit is not hashed (as when the held budget is full,
        // the pages are not cached, or the hit takes the blocking lookup).
        let n = (HELD_MAX as usize) * 2;
        let a: Vec<u8> = vec![b'a'; n];
        let b: Vec<u8> = vec![b'b'; n];
        let (sa, sb) = (
            hex::encode(Sha256::digest(&a)),
            hex::encode(Sha256::digest(&b)),
        );
        let mut wrong = 0;
        let rounds = 1500;
        for _ in 0..rounds {
            let barrier = Arc::new(std::sync::Barrier::new(6));
            let hs: Vec<_> = [
                a.clone(),
                b.clone(),
                a.clone(),
                b.clone(),
                a.clone(),
                b.clone(),
            ]
            .into_iter()
            .map(|bytes| {
                let (c, barrier) = (c.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let tmp = c.temp_path();
                    fs::write(&tmp, &bytes).unwrap();
                    let sha = hex::encode(Sha256::digest(&bytes));
                    barrier.wait();
                    c.admit("k", &sha, bytes.len() as u64, &tmp).unwrap();
                })
            })
            .collect();
            for h in hs {
                h.join().unwrap();
            }
            for sha in [&sa, &sb] {
                // Both the executor path and the blocking lookup path.
                if let Some(Hit::File(lf)) = c.try_hit_cached("k", sha, 0) {
                    let mut got = vec![0u8; lf.len as usize];
                    lf.file.read_exact_at(&mut got, 0).unwrap();
                    if hex::encode(Sha256::digest(&got)) != **sha {
                        wrong += 1;
                    }
                }
                if let Some(e) = c.lookup("k", sha) {
                    let got = fs::read(&e.data).unwrap();
                    if hex::encode(Sha256::digest(&got)) != **sha {
                        wrong += 1;
                    }
                }
            }
            c.remove("k");
        }
        assert_eq!(
            wrong, 0,
            "{wrong} hits in {rounds} rounds served the other version's bytes"
        );
    }

    /// Admits of new versions, hits, removals, evictions (small max_size) and TTL
    /// expiry racing on four threads. Every hit's bytes must hash to the SHA-256 asked for,
    /// nothing may panic (u64 underflow in forget_held), and at the end the held count must
    /// be exactly the sizes of the held entries still indexed.
    #[test]
    fn held_accounting_and_bytes_under_churn() {
        use std::os::unix::fs::FileExt;
        let t = tempfile::tempdir().unwrap();
        let c = Arc::new(open_cache(t.path(), 300 << 10, 1, 1));
        let until = Instant::now() + Duration::from_millis(2500);
        let blob = |k: usize, v: usize, n: usize| -> Vec<u8> {
            (0..n).map(|i| (i * 31 + k * 7 + v * 13) as u8).collect()
        };
        let threads: Vec<_> = (0..4)
            .map(|tid| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let mut served = 0u64;
                    let mut r: u64 = 0x9e3779b97f4a7c15 ^ tid;
                    let mut rnd = || {
                        r ^= r << 13;
                        r ^= r >> 7;
                        r ^= r << 17;
                        r
                    };
                    while Instant::now() < until {
                        let k = (rnd() % 12) as usize;
                        let v = (rnd() % 3) as usize;
                        let n = [0usize, 1, 100, 4096, 32 << 10, (32 << 10) + 1, 40 << 10]
                            [(rnd() % 7) as usize]
                            .saturating_sub(v); // one size per version: isolates the admit race
                        let key = format!("k{k}");
                        let bytes = blob(k, v, n);
                        let sha = hex::encode(Sha256::digest(&bytes));
                        match rnd() % 10 {
                            0..=2 => {
                                for _ in 0..3 {
                                    c.hit(&key);
                                }
                                fill(&c, &key, &bytes)
                            }
                            3 => c.remove(&key),
                            _ => match c.try_hit_cached(&key, &sha, HELD_MAX) {
                                Some(Hit::Held(b)) => {
                                    assert_eq!(hex::encode(Sha256::digest(&b)), sha);
                                    served += 1;
                                }
                                Some(Hit::File(lf)) => {
                                    let mut got = vec![0u8; lf.len as usize];
                                    lf.file.read_exact_at(&mut got, 0).unwrap();
                                    assert_eq!(hex::encode(Sha256::digest(&got)), sha);
                                    if let Some(p) = &lf.preloaded {
                                        assert_eq!(&p[..], &got[..]);
                                    }
                                    served += 1;
                                }
                                None => {
                                    if let Some(e) = c.lookup(&key, &sha) {
                                        assert_eq!(e.sha256, sha);
                                    }
                                }
                            },
                        }
                    }
                    served
                })
            })
            .collect();
        let served: u64 = threads.into_iter().map(|h| h.join().unwrap()).sum();
        let idx = c.lock();
        let indexed: u64 = idx
            .map
            .values()
            .filter(|e| e.held.get().is_some())
            .map(|e| e.size)
            .sum();
        assert_eq!(idx.held, indexed, "held count drifted ({served} hits)");
        assert!(idx.held <= HELD_BUDGET);
        assert!(served > 100, "{served}");
    }

    #[test]
    fn bounded_and_scan_resistant() {
        let t = tempfile::tempdir().unwrap();
        let max = 100 * 1024u64;
        let c = open_cache(t.path(), max, 600, 3);
        let blob = vec![7u8; 10 * 1024];
        // A hot set of 5 entries, used often.
        for i in 0..5 {
            fill(&c, &format!("hot{i}"), &blob);
        }
        let sha = hex::encode(Sha256::digest(&blob));
        for _ in 0..20 {
            for i in 0..5 {
                assert!(c.lookup(&format!("hot{i}"), &sha).is_some());
            }
        }
        // Twice the capacity of one-hit keys.
        for i in 0..20 {
            fill(&c, &format!("cold{i}"), &blob);
        }
        assert!(c.weighted_size() <= max, "{} > {max}", c.weighted_size());
        let on_disk: u64 = fs::read_dir(t.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".data"))
            .map(|e| e.metadata().unwrap().len())
            .sum();
        assert!(on_disk <= max, "disk {on_disk} > {max}");
        let kept = (0..5)
            .filter(|i| c.lookup(&format!("hot{i}"), &sha).is_some())
            .count();
        assert_eq!(kept, 5, "the hot set survived the scan");
    }
}
