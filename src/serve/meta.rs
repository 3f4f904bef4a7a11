//! The metadata cache: key → {state, size, sha256}, for `http.metadata_ttl` (unknown keys a
//! few seconds only). Loaded from the local catalog, else from an S3 HEAD, so serving nodes
//! need no shared database. Concurrent lookups of one key share one load. Dropped whole
//! per key within 200 ms of a catalog commit on this host (the catalog's change log).
//!
//! When S3 cannot be asked (an error, or no answer to a HEAD within 10 s), the last answer S3
//! gave is served for up to `http.metadata_grace` past its TTL, re-asked every few seconds.
//!
//! With a shared catalog (`catalog.shared`), a key this host's catalog does not know is
//! asked there before S3: another node's record answers without a HEAD, and names the
//! node whose spool holds a file S3 does not have yet (`Where::Peer`). Every node's
//! changes arrive through its notifications (`forget`, `forget_all`).
//!
//! Beside it, the catalog's record of a key's spool version (`Record`): what tells the serve
//! path whether a spool file is ready, without a lease or a second rule.

use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use tokio_util::sync::CancellationToken;

use crate::catalog::{ops, Catalog, CatalogError, FileStat, State};
use crate::store::{Store, StoreError};

/// Where a key's bytes are, as far as serving is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Where {
    /// S3 holds the current version.
    InS3,
    /// Tombstoned: 410.
    Deleted,
    /// The catalog knows it, but it is not (yet) in S3.
    NotInS3,
    /// Nobody knows it: 404.
    Unknown,
    /// Only in another node's spool (shared catalog): proxied from that node.
    Peer,
}

/// The node whose spool holds a `Where::Peer` key, and the stat its spool file had when
/// that node published it (so this node sends the same ETag as the peer would).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    pub url: String,
    pub mtime_ns: i64,
    pub inode: u64,
    /// With mtime and inode, what the peer's local ETag is made of.
    pub ctime_ns: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub at: Where,
    pub size: u64,
    /// Hex SHA-256 of the current version, when known: the cache's version check. Shared,
    /// so the clone every cache hit returns allocates nothing.
    pub sha256: Option<Arc<str>>,
    /// From this host's catalog (vs learned from S3).
    pub local: bool,
    /// The version's modification time: the spool file's mtime where this host uploaded it
    /// (so a spool hit and the S3 copy agree), else when S3 stored it.
    pub last_modified: Option<SystemTime>,
    /// An earlier answer served while S3 cannot be asked (within `http.metadata_grace`):
    /// kept only briefly, so S3 is asked again soon.
    pub stale: bool,
    /// For `Where::Peer`: where the file is.
    pub peer: Option<Arc<Peer>>,
}

impl Meta {
    /// The SHA-256 as an owned string, for the fetch paths that keep it (misses only).
    pub fn sha256_owned(&self) -> Option<String> {
        self.sha256.as_deref().map(str::to_string)
    }
}

/// The catalog's row for a key, as far as the spool is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub state: State,
    pub stat: FileStat,
    pub sha256: Option<String>,
}

impl Record {
    /// Whether the spool file with `stat` is ready (DESIGN.md "Ready file"). The watcher
    /// queues a file only once it is ready (renamed in, or closed and settled, with no
    /// writer), and every later change of size, mtime, ctime or inode makes it a new file
    /// that must become ready again. So the catalog's record *is* the uploader's verdict:
    /// a row for this very stat in a state the watcher reached through readiness means
    /// ready; no row, another stat, or a vanished/deleted row means not (yet) ready. Asking
    /// the catalog takes no lease, so a writer's `open` never waits on a request.
    pub fn ready_for(&self, stat: &FileStat) -> bool {
        // Every state a row can be in was reached from `queued`, that is, through readiness
        // (queued, uploading, failed, verified; archived, whose last stat before the move is
        // the verified file itself, as the catalog's note_ready treats it), except the two
        // that say this file is gone: a file back under a vanished or deleted key is a new
        // one, not ready until the watcher queues it. Written as the exception so that a
        // state added later on the upload path (after `queued`) needs no second rule here.
        let gone = matches!(self.state, State::Vanished | State::Deleted);
        if gone {
            return false;
        }
        // For rows whose bytes S3 holds, size, mtime and inode decide, as in the catalog's
        // note_ready: ferry's own undone move to the archive sets the ctime.
        if matches!(self.state, State::Verified | State::ArchiveFailed) {
            return (self.stat.size, self.stat.mtime_ns, self.stat.inode)
                == (stat.size, stat.mtime_ns, stat.inode);
        }
        self.stat == *stat
    }

    /// The SHA-256 of exactly the file with `stat`, once the uploader hashed it.
    ///
    /// The full stat, ctime included: readiness forgives the ctime ferry's own undone
    /// archive move sets, but a file replaced with the same size, mtime and a reused inode
    /// differs only there, and must not be served under the old version's SHA-256.
    pub fn sha256_for(&self, stat: &FileStat) -> Option<&str> {
        self.sha256
            .as_deref()
            .filter(|_| self.ready_for(stat) && self.stat == *stat)
    }
}

/// A catalog time in nanoseconds as a SystemTime (`None` before 1970).
pub fn system_time(ns: i64) -> Option<SystemTime> {
    let ns = u64::try_from(ns).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_nanos(ns))
}

/// Another node's record as metadata: deleted, in S3 (no HEAD needed), or only in that
/// node's spool (`Peer`); None when it says nothing usable (a peer without a URL).
fn meta_from_shared(r: crate::shared::SharedRow) -> Option<Meta> {
    let last_modified = system_time(r.mtime_ns);
    let (at, peer) = match r.state {
        State::Deleted => (Where::Deleted, None),
        s if s.in_s3() => (Where::InS3, None),
        _ if r.only_on_peer() && !r.url.is_empty() => (
            Where::Peer,
            Some(Arc::new(Peer {
                node: r.node.clone(),
                url: r.url.clone(),
                mtime_ns: r.mtime_ns,
                inode: r.inode,
                ctime_ns: r.ctime_ns,
            })),
        ),
        _ => return None,
    };
    Some(Meta {
        at,
        size: r.size,
        sha256: r.sha256.map(Arc::from),
        local: false,
        last_modified,
        stale: false,
        peer,
    })
}

/// How long "unknown" is remembered: a file may be dropped any moment.
const NEGATIVE_TTL: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(200);

struct Ttl {
    positive: Duration,
}

impl moka::Expiry<String, Meta> for Ttl {
    fn expire_after_create(&self, _k: &String, v: &Meta, _at: Instant) -> Option<Duration> {
        // A peer's file is uploaded soon; its notification drops the entry at once, the
        // short TTL is the safety net if that notification is lost.
        Some(
            if v.at == Where::Unknown || v.stale || v.at == Where::Peer {
                NEGATIVE_TTL.min(self.positive)
            } else {
                self.positive
            },
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("catalog: {0}")]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error("S3 cannot be asked: {0}")]
    S3(StoreError),
    #[error("S3 did not answer a HEAD within {0:?}")]
    Timeout(Duration),
}

/// How long an S3 HEAD may take (as long as a GET's first byte may).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

pub struct MetaCache {
    catalog: Catalog,
    store: Store,
    prefix: String,
    cache: moka::future::Cache<String, Meta>,
    /// Spool records, catalog only (never S3): a file still being written must not cost a
    /// HEAD per request.
    records: moka::future::Cache<String, Option<Record>>,
    /// The last answer S3 gave for each key, kept `metadata_ttl + metadata_grace`: what is
    /// served while S3 cannot be asked, rather than a 503.
    last_known: moka::future::Cache<String, Meta>,
    version: AtomicI64,
    shared: Option<Arc<crate::shared::Shared>>,
    forgets: Forgets,
}

/// Forgets that arrive while a key's lookup runs: what tells a lookup that a change came
/// while it ran. A lookup that began before a notification can finish after it with the
/// old answer, and the cache would keep it (a deleted key served for a whole
/// `metadata_ttl`, a new peer file a 404 until the negative TTL ran out), since
/// `invalidate` only drops what is already there. Counted per exact key, only while a
/// lookup of it runs, so the map holds no more keys than lookups in flight, and one key's
/// changes never cost another key its answer.
struct Forgets {
    running: std::sync::Mutex<std::collections::HashMap<String, Running>>,
    /// Bumped by `forget_all`.
    all: AtomicU64,
}

#[derive(Default)]
struct Running {
    lookups: usize,
    forgets: u64,
}

/// One lookup's view of the forgets at its start.
struct Ticket {
    forgets: u64,
    all: u64,
}

impl Forgets {
    fn new() -> Forgets {
        Forgets {
            running: Default::default(),
            all: AtomicU64::new(0),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Running>> {
        // The map holds counters only: a panic elsewhere cannot leave it half-updated.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begin(&self, key: &str) -> Ticket {
        let mut m = self.running();
        let all = self.all.load(Ordering::SeqCst);
        let r = m.entry(key.to_string()).or_default();
        r.lookups += 1;
        Ticket {
            forgets: r.forgets,
            all,
        }
    }

    /// Ends a lookup begun with `t`: whether `key` was forgotten since.
    fn end(&self, key: &str, t: &Ticket) -> bool {
        let mut m = self.running();
        let all = self.all.load(Ordering::SeqCst);
        let Some(r) = m.get_mut(key) else {
            return true;
        };
        let overtaken = r.forgets != t.forgets || all != t.all;
        r.lookups -= 1;
        if r.lookups == 0 {
            m.remove(key);
        }
        overtaken
    }

    /// Called *before* the entry is invalidated: a lookup whose insert lands after the
    /// invalidate then finds the forget counted when it ends.
    fn key(&self, key: &str) {
        if let Some(r) = self.running().get_mut(key) {
            r.forgets += 1;
        }
    }

    fn everything(&self) {
        self.all.fetch_add(1, Ordering::SeqCst);
    }
}

/// A lookup in progress. Dropped without `finish` (the request went away while moka had
/// the answer in hand), it still ends the lookup and drops an overtaken entry, from a task
/// of its own since moka's invalidate is async.
struct Lookup<'a, V: Clone + Send + Sync + 'static> {
    cache: &'a moka::future::Cache<String, V>,
    forgets: &'a Forgets,
    key: &'a str,
    ticket: Option<Ticket>,
}

impl<V: Clone + Send + Sync + 'static> Lookup<'_, V> {
    fn finish(mut self) -> bool {
        let t = self.ticket.take().expect("finished once");
        self.forgets.end(self.key, &t)
    }
}

impl<V: Clone + Send + Sync + 'static> Drop for Lookup<'_, V> {
    fn drop(&mut self) {
        let Some(t) = self.ticket.take() else { return };
        if self.forgets.end(self.key, &t) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let (cache, key) = (self.cache.clone(), self.key.to_string());
                rt.spawn(async move { cache.invalidate(&key).await });
            }
        }
    }
}

/// `cache`'s entry for `key`, loading it with `init` on a miss; an entry loaded while the
/// key was forgotten is dropped again and loaded once more (twice at most, then returned
/// uncached). The flag says whether any load was overtaken, so the caller can drop what
/// the load kept elsewhere. A request that starts just after a notification may still
/// join a load begun before it and get that load's answer, once: it was the answer when
/// the request's lookup began, and it is not kept.
async fn load_fresh<V, E, F>(
    cache: &moka::future::Cache<String, V>,
    forgets: &Forgets,
    key: &str,
    init: impl Fn() -> F,
) -> Result<(V, bool), Arc<E>>
where
    V: Clone + Send + Sync + 'static,
    E: Send + Sync + 'static,
    F: Future<Output = Result<V, E>>,
{
    let mut overtaken = false;
    for attempt in 0..3 {
        let lookup = Lookup {
            cache,
            forgets,
            key,
            ticket: Some(forgets.begin(key)),
        };
        let v = cache.try_get_with_by_ref(key, init()).await;
        let this_overtaken = lookup.finish();
        let v = v?;
        if !this_overtaken {
            return Ok((v, overtaken));
        }
        overtaken = true;
        cache.invalidate(key).await;
        if attempt == 2 {
            return Ok((v, overtaken));
        }
    }
    unreachable!("the last attempt returns")
}

impl MetaCache {
    pub fn new(
        catalog: Catalog,
        store: Store,
        prefix: String,
        ttl: Duration,
        grace: Duration,
    ) -> MetaCache {
        MetaCache {
            last_known: moka::future::Cache::builder()
                .max_capacity(500_000)
                .time_to_live(ttl.saturating_add(grace))
                .build(),
            catalog,
            store,
            prefix,
            cache: moka::future::Cache::builder()
                .max_capacity(500_000)
                .expire_after(Ttl { positive: ttl })
                .build(),
            records: moka::future::Cache::builder()
                .max_capacity(500_000)
                .time_to_live(ttl)
                .build(),
            version: AtomicI64::new(i64::MIN),
            shared: None,
            forgets: Forgets::new(),
        }
    }

    /// Asks `shared` on a miss of this host's catalog, before S3.
    pub fn with_shared(mut self, shared: Option<Arc<crate::shared::Shared>>) -> MetaCache {
        self.shared = shared;
        self
    }

    /// Forgets everything once: the shared catalog's notifications were interrupted, so
    /// changes may have been missed.
    pub fn forget_all(&self) {
        self.forgets.everything();
        self.cache.invalidate_all();
        self.records.invalidate_all();
        // The grace copies too: a pre-outage answer must not outlive a missed delete.
        self.last_known.invalidate_all();
    }

    /// What S3 alone says, bypassing the cache and the shared catalog: the answer when a
    /// peer named by the shared catalog cannot serve its file.
    pub async fn from_s3(&self, key: &str) -> Result<Meta, MetaError> {
        self.head(key).await
    }

    pub async fn get(&self, key: &str) -> Result<Meta, Arc<MetaError>> {
        // A hit builds no loader: the loader's future (an S3 HEAD inside) is large, and only
        // a miss needs it, boxed so it does not size every request's future.
        if let Some(m) = self.cache.get(key).await {
            return Ok(m);
        }
        let (m, overtaken) = load_fresh(&self.cache, &self.forgets, key, || {
            Box::pin(self.load(key.to_string()))
        })
        .await?;
        if overtaken {
            // The grace copy that load may have kept is as old as its answer.
            self.last_known.invalidate(key).await;
        }
        Ok(m)
    }

    /// Forgets one key (this process saw it change).
    pub async fn forget(&self, key: &str) {
        self.forgets.key(key);
        self.cache.invalidate(key).await;
        self.records.invalidate(key).await;
        self.last_known.invalidate(key).await;
    }

    /// This host's catalog record for `key`, if it has one.
    pub async fn record(&self, key: &str) -> Result<Option<Record>, Arc<CatalogError>> {
        if let Some(r) = self.records.get(key).await {
            return Ok(r);
        }
        let load = || {
            let catalog = self.catalog.clone();
            let k = key.to_string();
            Box::pin(async move {
                let row = catalog.read(move |c| ops::get(c, &k)).await?;
                Ok::<_, CatalogError>(row.map(|r| Record {
                    state: r.state,
                    stat: r.stat,
                    sha256: r.sha256,
                }))
            })
        };
        Ok(load_fresh(&self.records, &self.forgets, key, load).await?.0)
    }

    async fn load(&self, key: String) -> Result<Meta, MetaError> {
        let k = key.clone();
        // A catalog that cannot answer is asked no more: S3 holds the truth about what is
        // there (a deletion marker included), so a broken catalog costs a HEAD, not a 500.
        let row = match self.catalog.read(move |c| ops::get(c, &k)).await {
            Ok(row) => row,
            Err(e) => {
                tracing::warn!(key, error = %e, "catalog unreadable; asking S3");
                None
            }
        };
        // A vanished row says nothing about the key (a file left this spool unuploaded):
        // whatever S3 or another node holds answers.
        let row = row.filter(|r| r.state != State::Vanished);
        if let Some(r) = row {
            // Another node may have deleted the key, uploaded another version, or hold a
            // newer one in its spool, since this node's own row changed: the newer word
            // wins, on every node alike.
            if let Some(m) = self.newer_elsewhere(&key, &r).await {
                return Ok(m);
            }
            let at = match r.state {
                State::Verified | State::Archived | State::ArchiveFailed => Where::InS3,
                State::Deleted => Where::Deleted,
                State::Queued | State::Uploading | State::Failed | State::Vanished => {
                    Where::NotInS3
                }
            };
            return Ok(Meta {
                at,
                size: r.stat.size,
                sha256: r.sha256.map(Arc::from),
                local: true,
                last_modified: system_time(r.stat.mtime_ns),
                stale: false,
                peer: None,
            });
        }
        if let Some(shared) = &self.shared {
            match shared.lookup(&key).await {
                Ok(Some(r)) => {
                    if let Some(m) = meta_from_shared(r) {
                        return Ok(m);
                    }
                }
                // No node knows it: S3 may still (objects from before the cluster shared
                // its catalog, or put there by other means).
                Ok(None) => {}
                Err(e) => tracing::debug!(key, error = %e, "shared catalog unavailable; asking S3"),
            }
        }
        let asked = self.head(&key).await;
        match asked {
            Ok(m) => {
                if m.at != Where::Unknown {
                    self.last_known.insert(key, m.clone()).await;
                }
                Ok(m)
            }
            Err(e) => match self.last_known.get(&key).await {
                Some(mut m) => {
                    tracing::warn!(key, error = %e, "S3 cannot be asked; serving the last known metadata");
                    m.stale = true;
                    Ok(m)
                }
                None => Err(e),
            },
        }
    }

    /// The shared catalog's answer for `key` when another node changed it after this
    /// host's own row `local`: a delete, another version in S3, or a version still in that
    /// node's spool. Rows are ordered by each node's clock: nodes need NTP.
    async fn newer_elsewhere(&self, key: &str, local: &crate::catalog::Row) -> Option<Meta> {
        let r = self.shared.as_ref()?.lookup(key).await.ok()??;
        let differs = if r.state == State::Deleted {
            local.state != State::Deleted
        } else if r.state.in_s3() {
            !local.state.in_s3() || r.sha256 != local.sha256
        } else {
            r.only_on_peer()
        };
        let newer = r.changed_ms > local.updated_at_ms && differs;
        if newer {
            meta_from_shared(r)
        } else {
            None
        }
    }

    /// What S3 says about `key` (a HEAD, bounded by HEAD_TIMEOUT).
    async fn head(&self, key: &str) -> Result<Meta, MetaError> {
        let object_key = format!("{}{}", self.prefix, key);
        let head = match tokio::time::timeout(HEAD_TIMEOUT, self.store.head(&object_key)).await {
            Ok(r) => r,
            Err(_) => return Err(MetaError::Timeout(HEAD_TIMEOUT)),
        };
        match head {
            Ok(h) => {
                if h.metadata.contains_key("ferry-deleted") {
                    return Ok(Meta {
                        at: Where::Deleted,
                        size: 0,
                        sha256: None,
                        local: false,
                        last_modified: None,
                        stale: false,
                        peer: None,
                    });
                }
                let sha = h
                    .metadata
                    .get("sha256")
                    .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
                    .map(|s| s.to_ascii_lowercase())
                    .or_else(|| {
                        // A full-object checksum (single PUT) is the SHA-256 itself.
                        h.checksum_sha256
                            .as_deref()
                            .filter(|c| !c.contains('-'))
                            .and_then(|c| base64::engine::general_purpose::STANDARD.decode(c).ok())
                            .filter(|b| b.len() == 32)
                            .map(hex::encode)
                    });
                // The file's own mtime, which the uploader stores with the object: the node
                // whose catalog knows the key sends the same Last-Modified for this version
                // (If-Range and If-Modified-Since by date then work across nodes). S3's
                // upload time only when the object carries none.
                let last_modified = h
                    .metadata
                    .get("mtime")
                    .and_then(|s| stored_mtime(s))
                    .or(h.last_modified);
                Ok(Meta {
                    at: Where::InS3,
                    size: h.size,
                    sha256: sha.map(Arc::from),
                    local: false,
                    last_modified,
                    stale: false,
                    peer: None,
                })
            }
            Err(e) if e.is_not_found() => Ok(Meta {
                at: Where::Unknown,
                size: 0,
                sha256: None,
                local: false,
                last_modified: None,
                stale: false,
                peer: None,
            }),
            Err(e) => Err(MetaError::S3(e)),
        }
    }

    /// Forgets the cached metadata of each key the catalog changes, within `POLL` of the
    /// commit (the catalog's change log; its `data_version` says cheaply whether to look).
    /// Runs until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let c = self.catalog.clone();
        let mut seen = tokio::task::spawn_blocking(move || c.read_blocking(ops::last_change))
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or(0);
        loop {
            let c = self.catalog.clone();
            if let Ok(Ok(v)) = tokio::task::spawn_blocking(move || c.data_version()).await {
                let old = self.version.swap(v, Ordering::Relaxed);
                if old != v && old != i64::MIN {
                    let c = self.catalog.clone();
                    let after = seen;
                    let got = tokio::task::spawn_blocking(move || {
                        c.read_blocking(|c| ops::changes_since(c, after, 100_000))
                    })
                    .await;
                    match got {
                        Ok(Ok((keys, last, gap))) => {
                            if gap {
                                // Fell behind the kept log: forget everything once.
                                self.forgets.everything();
                                self.cache.invalidate_all();
                                self.records.invalidate_all();
                            } else {
                                for k in &keys {
                                    self.forgets.key(k);
                                    self.cache.invalidate(k).await;
                                    self.records.invalidate(k).await;
                                }
                            }
                            seen = last;
                        }
                        _ => {
                            self.forgets.everything();
                            self.cache.invalidate_all();
                            self.records.invalidate_all();
                        }
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
}

/// The `x-amz-meta-mtime` the uploader stored, as a time. Anyone with write access to the
/// bucket can set it: a value past what SystemTime holds is ignored, not a panic on every
/// request for the key.
fn stored_mtime(secs: &str) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_secs(secs.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_mtime_takes_any_number() {
        assert_eq!(
            stored_mtime("1700000000"),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(stored_mtime(&u64::MAX.to_string()), None);
        assert_eq!(stored_mtime("-1"), None);
        assert_eq!(stored_mtime("soon"), None);
    }

    const STAT: FileStat = FileStat {
        size: 10,
        mtime_ns: 1_700_000_000_000_000_001,
        ctime_ns: 1_700_000_000_000_000_002,
        inode: 77,
    };

    fn record(state: State, sha: Option<&str>) -> Record {
        Record {
            state,
            stat: STAT,
            sha256: sha.map(str::to_string),
        }
    }

    /// A notification that arrives while a lookup of its key is in flight: the lookup's
    /// answer predates the change and must not stay cached (CI saw the 404 of a key a
    /// peer had just published kept for the whole negative TTL).
    #[tokio::test]
    async fn a_key_forgotten_while_it_loads_is_not_kept_with_the_old_answer() {
        let cache: moka::future::Cache<String, &'static str> = moka::future::Cache::new(10);
        let forgets = Arc::new(Forgets::new());
        let started = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Notify::new());
        let loads = Arc::new(AtomicU64::new(0));
        let init = || {
            let (started, release, loads) = (started.clone(), release.clone(), loads.clone());
            async move {
                if loads.fetch_add(1, Ordering::SeqCst) == 0 {
                    started.notify_one();
                    release.notified().await;
                    Ok::<_, ()>("old")
                } else {
                    Ok("new")
                }
            }
        };
        let lookup = load_fresh(&cache, &forgets, "k", init);
        let change = async {
            started.notified().await;
            // What `forget` does, with nothing cached yet to invalidate.
            forgets.key("k");
            cache.invalidate("k").await;
            release.notify_one();
        };
        let (got, ()) = tokio::join!(lookup, change);
        let (v, overtaken) = got.unwrap();
        assert!(overtaken);
        assert_eq!(
            v, "new",
            "the answer loaded after the change is the one returned"
        );
        assert_eq!(cache.get("k").await, Some("new"));
        assert_eq!(loads.load(Ordering::SeqCst), 2);

        // Another key's change costs nothing here.
        let other = load_fresh(&cache, &forgets, "j", || async { Ok::<_, ()>("j") });
        assert_eq!(other.await.unwrap(), ("j", false));
    }

    /// Only the key's own forgets count: a neighbour's change during the lookup costs no
    /// second load (a grace copy or an uncached answer, with per-slot counters).
    #[tokio::test]
    async fn another_key_forgotten_meanwhile_does_not_overtake_a_lookup() {
        let cache: moka::future::Cache<String, &'static str> = moka::future::Cache::new(10);
        let forgets = Forgets::new();
        let loads = AtomicU64::new(0);
        let got = load_fresh(&cache, &forgets, "k", || {
            loads.fetch_add(1, Ordering::SeqCst);
            // Every other key there is, forgotten while this one loads.
            for i in 0..100_000 {
                forgets.key(&format!("other-{i}"));
            }
            async { Ok::<_, ()>("v") }
        })
        .await;
        assert_eq!(got.unwrap(), ("v", false));
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert!(
            forgets.running().is_empty(),
            "a finished lookup leaves nothing behind"
        );
    }

    /// A catalog change to one key forgets that key's cached record only: on a busy upload
    /// node every commit used to clear the whole cache.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_forgets_only_its_own_key() {
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::set_var("AWS_ACCESS_KEY_ID", "test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("ferry.db");
        let catalog = Catalog::open(&db).unwrap();
        let stat = FileStat {
            size: 1,
            mtime_ns: 1,
            ctime_ns: 1,
            inode: 1,
        };
        for k in ["a.jpg", "b.jpg"] {
            let key = crate::key::Key::new(k, "").unwrap();
            catalog
                .write(move |c| ops::note_ready(c, &key, stat).map(|_| ()))
                .await
                .unwrap();
        }
        let mut cfg = crate::config::Config::default();
        cfg.s3.endpoint = "http://127.0.0.1:9".into();
        let store = Store::new(&cfg).await;
        let meta = Arc::new(MetaCache::new(
            catalog.clone(),
            store,
            String::new(),
            Duration::from_secs(300),
            Duration::from_secs(300),
        ));
        let stop = CancellationToken::new();
        let w = tokio::spawn(meta.clone().watch(stop.clone()));
        tokio::time::sleep(POLL * 2).await;
        assert!(meta.record("a.jpg").await.unwrap().is_some());
        assert!(meta.record("b.jpg").await.unwrap().is_some());
        // Another process (here: another connection) changes a.jpg.
        let other = Catalog::open(&db).unwrap();
        other
            .write(|c| ops::mark_vanished(c, "a.jpg", 1).map(|_| ()))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while meta.records.contains_key("a.jpg") {
            assert!(Instant::now() < deadline, "a.jpg was never forgotten");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            meta.records.contains_key("b.jpg"),
            "an unrelated key was forgotten too"
        );
        assert_eq!(
            meta.record("a.jpg").await.unwrap().map(|r| r.state),
            Some(State::Vanished)
        );
        stop.cancel();
        w.await.unwrap();
    }

    #[test]
    fn ready_means_the_watcher_recorded_this_very_stat() {
        for s in [
            State::Queued,
            State::Uploading,
            State::Failed,
            State::Verified,
            State::Archived,
        ] {
            assert!(record(s, None).ready_for(&STAT), "{s:?}");
        }
        for s in [State::Vanished, State::Deleted] {
            assert!(!record(s, None).ready_for(&STAT), "{s:?}");
        }
        let r = record(State::Queued, None);
        for other in [
            FileStat { size: 11, ..STAT },
            FileStat {
                mtime_ns: 1,
                ..STAT
            },
            FileStat {
                ctime_ns: 1,
                ..STAT
            },
            FileStat { inode: 78, ..STAT },
        ] {
            assert!(!r.ready_for(&other), "{other:?}");
        }
    }

    /// A verified row whose spool file was replaced with the same size, mtime and a reused
    /// inode (only the ctime differs) is still ready, but not under the old SHA-256.
    #[test]
    fn a_replaced_file_never_gets_the_old_sha256() {
        let mut r = record(State::Verified, Some("ab"));
        r.stat = FileStat {
            size: 5,
            mtime_ns: 7,
            ctime_ns: 9,
            inode: 11,
        };
        let replaced = FileStat {
            ctime_ns: 10,
            ..r.stat
        };
        assert!(r.ready_for(&replaced));
        assert_eq!(r.sha256_for(&replaced), None);
        let own = r.stat;
        assert_eq!(r.sha256_for(&own), Some("ab"));
    }

    #[test]
    fn the_sha256_belongs_to_its_stat_only() {
        let r = record(State::Verified, Some("ab"));
        assert_eq!(r.sha256_for(&STAT), Some("ab"));
        assert_eq!(r.sha256_for(&FileStat { size: 11, ..STAT }), None);
        assert_eq!(record(State::Deleted, Some("ab")).sha256_for(&STAT), None);
    }
}
