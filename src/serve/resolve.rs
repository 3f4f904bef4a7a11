//! The serve decision (DESIGN.md "Serve order"): spool file; metadata (catalog, else S3
//! HEAD); deleted → 410; a hot-cache entry of this very version; then redirect (302 to the
//! public or presigned URL) or proxy (GET from S3, one fetch per key at a time), where a hot
//! key is fetched into the cache; S3 failing → the archive copy (local, or `fallback_url`).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::{Reply, Response};

use super::cache::{Hit, HotCache};
use super::fetch::{Fetcher, Started};
use super::meta::{system_time, Meta, MetaCache, MetaError, Record, Where};
use super::semantics::{self as sem, Caching, Etag, Policy, Representation, Streamed};
use super::{local, ServeError};
use crate::catalog::Catalog;
use crate::config::{Config, ServeMode};
use crate::key::{IgnoreSet, Key};
use crate::store::Store;

pub struct Resolver {
    pub cfg: Arc<Config>,
    pub node_name: String,
    pub catalog: Catalog,
    pub store: Store,
    pub meta: Arc<MetaCache>,
    pub cache: Arc<HotCache>,
    fetcher: Arc<Fetcher>,
    /// The spool root, opened once; every local lookup resolves beneath it.
    spool: Arc<File>,
    /// Small spool files' bytes, each answered while a stat of its path shows it unchanged.
    memo: super::memo::Memo,
    /// The archive root, for the fallback.
    archive: Arc<File>,
    fallback: Option<FallbackClient>,
    /// Other nodes' spools (shared catalog): the same client, one base URL per request.
    peers: FallbackClient,
    shared: Option<Arc<crate::shared::Shared>>,
    allow: Option<regex::Regex>,
    /// `spool.ignore`: names that are never served.
    ignore: IgnoreSet,
    redirect_base: String,
    policy: Policy,
    /// Presigned URLs reused for half their TTL, so every client gets at least half.
    presigned: Mutex<HashMap<String, (String, Instant)>>,
    /// The last readiness check and when it ran (an async lock: probes wait for the one
    /// check in flight instead of starting their own).
    readiness: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
    /// SHA-256 of archive copies by (inode, length, mtime, ctime): the fallback serves a copy under
    /// the version's ETag only once its bytes were seen to be that version.
    archive_sha: moka::sync::Cache<(u64, u64, SystemTime, i64), String>,
}

/// Passes a proxied body through under two guards. A source that stops sending for
/// `stall` (`http.upstream_stall`) ends the stream with an error, so neither the client nor the
/// connection is held by a stalled upstream. With `want` (the version's SHA-256, for a
/// whole body) it is hashed one chunk behind: the last chunk goes out only if the whole
/// hashes to `want`, else the stream ends with an error (the response is cut short of its
/// Content-Length, so nobody keeps it as this version).
fn guarded_stream<S>(
    inner: S,
    want: Option<String>,
    key: String,
    source: &'static str,
    stall: Duration,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send
where
    S: futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + Unpin,
{
    use futures_util::StreamExt;
    use sha2::Digest;
    struct St<S> {
        inner: S,
        h: Option<sha2::Sha256>,
        held: Option<bytes::Bytes>,
        finished: bool,
        want: Option<String>,
        key: String,
        source: &'static str,
    }
    let st = St {
        inner,
        h: want.as_ref().map(|_| sha2::Sha256::new()),
        held: None,
        finished: false,
        want,
        key,
        source,
    };
    futures_util::stream::unfold(st, move |mut st| async move {
        if st.finished {
            return None;
        }
        loop {
            let next = match tokio::time::timeout(stall, st.inner.next()).await {
                Ok(n) => n,
                Err(_) => {
                    st.finished = true;
                    tracing::warn!(key = %st.key, source = st.source, "the upstream body stalled; the response was cut short");
                    return Some((Err(std::io::Error::other("upstream body stalled")), st));
                }
            };
            match next {
                Some(Ok(b)) => {
                    let Some(h) = st.h.as_mut() else {
                        return Some((Ok(b), st));
                    };
                    h.update(&b);
                    if let Some(prev) = st.held.replace(b) {
                        return Some((Ok(prev), st));
                    }
                }
                Some(Err(e)) => {
                    st.finished = true;
                    return Some((Err(e), st));
                }
                None => {
                    st.finished = true;
                    let (Some(h), Some(want)) = (st.h.take(), st.want.as_deref()) else {
                        return None;
                    };
                    if hex::encode(h.finalize()) == want {
                        let held = st.held.take();
                        return held.map(|b| (Ok(b), st));
                    }
                    tracing::warn!(key = %st.key, source = st.source, "the upstream sent bytes that do not match the catalog's SHA-256; the response was cut short");
                    return Some((Err(std::io::Error::other("SHA-256 mismatch")), st));
                }
            }
        }
    })
}

/// Marks a request from another node (shared catalog): answered from the spool only.
pub const PEER_HEADER: &str = "x-ferry-peer";

/// How long a readiness answer is reused.
const READY_MEMORY: Duration = Duration::from_secs(1);

/// Most presigned URLs remembered.
const MAX_PRESIGNED: usize = 100_000;

/// How long S3 or the archive server may take to start answering a HEAD-less ranged GET.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

impl Resolver {
    pub fn new(
        cfg: Arc<Config>,
        catalog: Catalog,
        store: Store,
        shared: Option<Arc<crate::shared::Shared>>,
    ) -> anyhow::Result<Resolver> {
        std::fs::create_dir_all(&cfg.spool.dir)
            .map_err(|e| anyhow::anyhow!("spool.dir {}: {e}", cfg.spool.dir.display()))?;
        let open_dir = |what: &str, dir: &std::path::Path| -> anyhow::Result<File> {
            std::fs::create_dir_all(dir)
                .and_then(|_| {
                    std::fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
                        .open(dir)
                })
                .map_err(|e| anyhow::anyhow!("{what} {}: {e}", dir.display()))
        };
        let spool = open_dir("spool.dir", &cfg.spool.dir)?;
        let archive = open_dir("archive.dir", &cfg.archive.dir)?;
        let cache = Arc::new(
            HotCache::open(
                &cfg.cache.dir,
                cfg.cache.max_size.0,
                cfg.cache.ttl.0,
                cfg.cache.hot_hits,
                cfg.cache.hot_window.0,
            )
            .map_err(|e| anyhow::anyhow!("cache.dir {}: {e}", cfg.cache.dir.display()))?
            .with_max_object(cfg.cache.max_object()),
        );
        // Fill temp files live under cache.dir even with the cache off: never in /tmp,
        // which may be small, shared, or another filesystem than the cache.
        let tmp_dir = cfg.cache.dir.clone();
        let fetcher = Arc::new(Fetcher::new(
            store.clone(),
            cfg.s3.prefix.clone(),
            cache.clone(),
            tmp_dir,
            cfg.cache.fill_limit.0,
            cfg.http.upstream_stall.0,
        ));
        let fallback = if cfg.http.fallback_url.is_empty() {
            None
        } else {
            Some(FallbackClient::new(
                &cfg.http.fallback_url,
                cfg.http.upstream_stall.0,
            ))
        };
        let allow = if cfg.http.allow.is_empty() {
            None
        } else {
            Some(regex::Regex::new(&cfg.http.allow)?)
        };
        let redirect_base = if cfg.http.redirect_base.is_empty() {
            store.bucket_url()
        } else if cfg.http.redirect_base.ends_with('/') {
            cfg.http.redirect_base.clone()
        } else {
            format!("{}/", cfg.http.redirect_base)
        };
        Ok(Resolver {
            node_name: cfg.node_name(),
            meta: Arc::new(
                MetaCache::new(
                    catalog.clone(),
                    store.clone(),
                    cfg.s3.prefix.clone(),
                    cfg.http.metadata_ttl.0,
                    cfg.http.metadata_grace(),
                )
                .with_shared(shared.clone()),
            ),
            peers: FallbackClient::new("http://peer/", cfg.http.upstream_stall.0),
            shared,
            cache,
            fetcher,
            archive: Arc::new(archive),
            fallback,
            policy: Policy {
                cache_control: cfg.http.cache_control.clone(),
                active_content: cfg.http.active_content,
            },
            ignore: IgnoreSet::new(&cfg.spool.ignore)?,
            memo: super::memo::Memo::new(cfg.http.spool_memory.0, sem::SMALL_BODY),
            cfg,
            catalog,
            store,
            spool: Arc::new(spool),
            allow,
            redirect_base,
            presigned: Mutex::new(HashMap::new()),
            readiness: tokio::sync::Mutex::new(None),
            archive_sha: moka::sync::Cache::new(10_000),
        })
    }

    /// Answers one request. When S3 turns out to hold another version than the metadata
    /// said (deleted, or re-uploaded elsewhere), nothing of it has been sent: the metadata is
    /// dropped and the key resolved once more, so the answer is a 410 or the new version,
    /// never the new bytes under the old ETag.
    pub async fn handle(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Response, ServeError> {
        match self.handle_once(method, path, headers).await {
            Err(ServeError::Stale(why)) => {
                tracing::info!(reason = %why, "metadata was stale; resolving again");
                if let Some(key) = path
                    .strip_prefix(self.cfg.http.mount.as_str())
                    .and_then(|raw| Key::from_url_path(raw, &self.cfg.s3.prefix).ok())
                {
                    self.meta.forget(key.as_str()).await;
                }
                Box::pin(self.handle_once(method, path, headers)).await
            }
            other => other,
        }
    }

    async fn handle_once(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Response, ServeError> {
        let mount = self.cfg.http.mount.as_str();
        let Some(raw) = path.strip_prefix(mount) else {
            return match path {
                "/healthz" => Ok("ok\n".into_response()),
                // Boxed, like every rare path below: an inline S3 call would make every
                // request's future kilobytes larger (and hyper moves it into place).
                "/readyz" => Box::pin(self.readyz()).await,
                "/metrics" => Box::pin(self.metrics()).await,
                _ => Err(ServeError::NotFound),
            };
        };
        if method != Method::GET && method != Method::HEAD {
            return Err(ServeError::Method);
        }
        let key = Key::from_url_path(raw, &self.cfg.s3.prefix)?;
        if let Some(re) = &self.allow {
            if !re.is_match(key.as_str()) {
                return Err(ServeError::NotFound);
            }
        }
        // SECURITY: names the uploader ignores (`*.part`, `*.tmp`, dot files) are work in
        // progress, never content: not public from any source.
        if self.ignore.is_ignored(std::path::Path::new(key.as_str())) {
            return Err(ServeError::NotFound);
        }

        // 1. The spool. One stat of the path first: a miss needs nothing more, and a file
        // whose bytes are held and unchanged is answered from memory.
        let head = method == Method::HEAD;
        let looked = self.memo.look(&self.spool, key.as_str());
        if let local::Looked::Found(now) = &looked {
            if let Some(held) = self.memo.get(key.as_str(), now) {
                crate::telemetry::metrics().spool_memory_hits.inc();
                // The representation is built afresh: readiness and the SHA-256 move on in
                // the catalog while the file stays the same.
                let record = self.spool_record(&key).await;
                let rep = spool_representation(&key, &held.stat, held.mtime, record.as_ref());
                return Ok(sem::respond_bytes(
                    held.body.clone(),
                    method,
                    headers,
                    &rep,
                    &self.policy,
                    "local",
                ));
            }
        }
        let small = if head { 0 } else { local::PRELOAD_MAX };
        let (found, record) = match &looked {
            local::Looked::Absent => (None, None),
            local::Looked::Found(now) if now.is_file => {
                let record = self.spool_record(&key).await;
                // A file the catalog says is ready is read whole up to SMALL_BODY: its answer
                // is public, and only a copy sends exactly the bytes checked (see
                // `sem::SendFile`). Either way the answer is right; this only picks the
                // cheaper path for it.
                let public = record.as_ref().is_some_and(|r| r.ready_for(&now.stat));
                let preload = if public && !head {
                    sem::SMALL_BODY
                } else {
                    small
                };
                (self.open_spool(&key, preload).await?, record)
            }
            // Not a regular file by its stat, or the stat could not tell: the careful open
            // decides, and the catalog is asked only about a file it found.
            _ => match self.open_spool(&key, small).await? {
                Some(lf) => (Some(lf), self.spool_record(&key).await),
                None => (None, None),
            },
        };
        if let Some(lf) = found {
            self.memo.offer(key.as_str(), &lf);
            let rep = spool_representation(&key, &lf.stat, lf.mtime, record.as_ref());
            return Ok(sem::respond_file(lf, method, headers, &rep, &self.policy, "local").await);
        }
        // Nothing servable in the spool (archived, most often): held bytes are not needed.
        self.memo.forget(key.as_str());

        // A request from another node (shared catalog) is answered from this spool only,
        // never forwarded: two nodes can never bounce a request between them.
        if headers.contains_key(PEER_HEADER) {
            return Err(ServeError::NotFound);
        }

        // 2. Metadata: this host's catalog, else the shared catalog, else S3.
        let mut meta = match self.meta.get(key.as_str()).await {
            Ok(m) => m,
            Err(e) => {
                return match &*e {
                    MetaError::S3(_) | MetaError::Timeout(_) => {
                        tracing::warn!(key = %key, error = %e, "S3 metadata failed; trying the archive");
                        match Box::pin(self.serve_archive(&key, None, method, headers)).await {
                            Ok(r) => Ok(r),
                            Err(_) => Err(ServeError::NotReady(format!("{e}"))),
                        }
                    }
                    MetaError::Catalog(ce) => Err(ServeError::Internal(format!("catalog: {ce}"))),
                };
            }
        };
        if meta.at == Where::Peer {
            // Counted nowhere in hotness: the file is on its way to S3, and the cache keeps
            // only what S3 holds.
            match Box::pin(self.serve_peer(&key, &meta, method, headers)).await {
                Ok(r) => {
                    crate::telemetry::metrics().peer_requests.inc();
                    return Ok(r);
                }
                Err(e) => {
                    // Nothing was sent: S3 may hold it by now (the peer just archived it),
                    // else the client retries shortly.
                    let peer = meta.peer.as_ref().map(|p| p.node.as_str());
                    if matches!(e, ServeError::NotFound) {
                        // The usual race: the peer archived it since it last published.
                        tracing::debug!(key = %key, peer, "the peer no longer has it; asking S3");
                    } else {
                        tracing::warn!(key = %key, peer, error = %e, "the peer could not serve it; asking S3");
                    }
                    self.meta.forget(key.as_str()).await;
                    meta = match self.meta.from_s3(key.as_str()).await {
                        Ok(m) if m.at == Where::InS3 || m.at == Where::Deleted => m,
                        _ => {
                            return Err(ServeError::NotReady(format!(
                                "{key} is only on another node, which did not serve it"
                            )))
                        }
                    };
                }
            }
        }
        match meta.at {
            Where::Peer => {
                return Err(ServeError::NotReady(format!(
                    "{key} is only on another node"
                )))
            }
            Where::Deleted => {
                self.cache.remove(key.as_str());
                return Err(ServeError::Gone);
            }
            Where::Unknown => return Err(ServeError::NotFound),
            // The catalog knows it but S3 does not hold it, and the spool has no copy (the
            // app removed it): the archive may still.
            Where::NotInS3 => {
                return Box::pin(self.serve_archive(&key, Some(&meta), method, headers)).await
            }
            Where::InS3 => {}
        }
        // Without a hot cache a redirect needs nothing more: no representation to build.
        if !self.cache.enabled() && self.cfg.http.mode == ServeMode::Redirect {
            return self.redirect(&key).await;
        }
        let rep = meta_representation(&key, &meta);

        // 3. The hot cache, only for this exact version.
        let count = if self.cache.enabled() {
            self.cache.hit(key.as_str())
        } else {
            0
        };
        if let Some(sha) = meta.sha256.as_deref() {
            // Fast path: held bytes, or a checked entry whose file opens from the dentry
            // cache and reads from the page cache, with no thread hop; else, if the index
            // has the entry, the checks on a blocking thread. Read whole only when small:
            // ferry's own files go by sendfile otherwise.
            let preload = if head { 0 } else { local::PRELOAD_MAX };
            let hit = match self.cache.try_hit_cached(key.as_str(), sha, preload) {
                Some(hit) => Some(hit),
                None if self.cache.may_have(key.as_str(), sha) => {
                    let (c, k, sha) = (
                        self.cache.clone(),
                        key.as_str().to_string(),
                        sha.to_string(),
                    );
                    tokio::task::spawn_blocking(move || {
                        let e = c.lookup(&k, &sha)?;
                        let mut lf = open_path(&e.data).ok().flatten()?;
                        lf.preload_up_to(preload).ok()?;
                        Some(Hit::File(lf))
                    })
                    .await
                    .ok()
                    .flatten()
                }
                None => None,
            };
            // The entry was checked against this SHA-256; its length is the version's.
            match hit {
                Some(Hit::Held(bytes)) if bytes.len() as u64 == rep.len => {
                    crate::telemetry::metrics().cache_hits.inc();
                    return Ok(sem::respond_bytes(
                        bytes,
                        method,
                        headers,
                        &rep,
                        &self.policy,
                        "cache",
                    ));
                }
                Some(Hit::File(lf)) if lf.len == rep.len => {
                    crate::telemetry::metrics().cache_hits.inc();
                    return Ok(
                        sem::respond_file(lf, method, headers, &rep, &self.policy, "cache").await,
                    );
                }
                _ => {}
            }
        }
        let hot = meta.sha256.is_some() && self.cache.wants(key.as_str(), count) && {
            let fits = self.cache.fits(meta.size);
            if !fits {
                self.cache.refuse(key.as_str());
            }
            fits
        };
        if self.cache.enabled() {
            crate::telemetry::metrics().cache_misses.inc();
        }

        // 4. Redirect, or fetch from S3 (proxy mode, or a hot key filling the cache).
        if !hot && self.cfg.http.mode == ServeMode::Redirect {
            return self.redirect(&key).await;
        }
        let range = match sem::streamed(method, headers, &rep, &self.policy, "s3") {
            Streamed::Answer(r) => return Ok(r),
            Streamed::Fetch(range) => range,
        };
        if head {
            let empty = Response::new(Default::default());
            return Ok(sem::streamed_response(
                empty,
                &rep,
                range.as_ref(),
                &self.policy,
                "s3",
            ));
        }
        if let Some(range) = range {
            if hot {
                // The cache fills from a whole-object fetch of its own; this client gets its
                // range now rather than waiting for (or downloading) all of it.
                let fill = self
                    .fetcher
                    .fetch(key.as_str(), meta.sha256_owned(), meta.size, true);
                if let Err(e) = fill {
                    tracing::warn!(key = %key, error = %e, "could not start a cache fill");
                }
            }
            return Box::pin(self.proxy_direct(&key, &meta, &rep, Some(range), method, headers))
                .await;
        }
        let reader = self
            .fetcher
            .fetch(key.as_str(), meta.sha256_owned(), meta.size, hot)
            .map_err(|e| ServeError::Internal(format!("fill temp file: {e}")))?;
        let Some(reader) = reader else {
            // The fills in flight are at their bound: this one goes straight through.
            return Box::pin(self.proxy_direct(&key, &meta, &rep, None, method, headers)).await;
        };
        match reader.started().await {
            Started::Body(len, reader) if len.is_none_or(|n| n == rep.len) => {
                let r = warp::reply::stream(reader.into_stream()).into_response();
                Ok(sem::streamed_response(r, &rep, None, &self.policy, "s3"))
            }
            Started::Body(len, _) => Err(ServeError::Stale(format!(
                "{key}: S3 sent {len:?} bytes, the metadata says {}",
                rep.len
            ))),
            Started::Failed {
                error, stale: true, ..
            } => Err(ServeError::Stale(format!("{key}: {error}"))),
            Started::Failed {
                error, timed_out, ..
            } => {
                tracing::warn!(key = %key, error = %error, "S3 fetch failed; trying the archive");
                match Box::pin(self.serve_archive(&key, Some(&meta), method, headers)).await {
                    Ok(r) => Ok(r),
                    Err(_) if timed_out => Err(ServeError::Timeout),
                    Err(_) => Err(ServeError::BadGateway),
                }
            }
        }
    }

    /// Opens `key` in the spool the careful way (no symlink, nothing outside it), reading a
    /// small file whole unless `head`: from the caches on this thread when nothing can
    /// block, else on a blocking thread.
    async fn open_spool(
        &self,
        key: &Key,
        preload: u64,
    ) -> Result<Option<local::LocalFile>, ServeError> {
        if let Some(r) = local::try_open_cached(&self.spool, key.as_str(), preload) {
            return r.map_err(|e| ServeError::Internal(format!("open {key}: {e}")));
        }
        let spool = self.spool.clone();
        let k = key.as_str().to_string();
        tokio::task::spawn_blocking(move || {
            let mut f = local::open_beneath(&spool, &k)?;
            if let Some(lf) = f.as_mut() {
                lf.preload_up_to(preload)?;
            }
            Ok::<_, std::io::Error>(f)
        })
        .await
        .map_err(|e| ServeError::Internal(format!("open task: {e}")))?
        .map_err(|e| ServeError::Internal(format!("open {key}: {e}")))
    }

    /// This host's catalog row for a spool file. A catalog that cannot answer costs the file
    /// its public status, not its bytes: served as not ready (no-store, weak tag) rather than
    /// a 500.
    async fn spool_record(&self, key: &Key) -> Option<Record> {
        match self.meta.record(key.as_str()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "catalog unreadable; serving the spool file as not ready");
                None
            }
        }
    }

    /// One range of the object, or all of it, passed straight through from S3 (no
    /// coalescing, no temp file, nothing cached): ranges, and whole objects when the fills
    /// in flight are at their bound.
    async fn proxy_direct(
        &self,
        key: &Key,
        meta: &Meta,
        rep: &Representation,
        range: Option<std::ops::Range<u64>>,
        method: &Method,
        headers: &HeaderMap,
    ) -> Result<Response, ServeError> {
        let obj = key.object_key(&self.cfg.s3.prefix);
        let get = self.store.get(&obj, range.as_ref().map(sem::range_header));
        let out = match tokio::time::timeout(FIRST_BYTE_TIMEOUT, get).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) if e.status == Some(416) => {
                return Err(ServeError::Stale(format!(
                    "{key}: S3 refused a range inside the metadata's length"
                )));
            }
            Ok(Err(e)) => {
                tracing::warn!(key = %key, error = %e, "S3 range GET failed; trying the archive");
                return self
                    .serve_archive(key, Some(meta), method, headers)
                    .await
                    .map_err(|_| ServeError::BadGateway);
            }
            Err(_) => {
                tracing::warn!(key = %key, "S3 range GET timed out; trying the archive");
                return self
                    .serve_archive(key, Some(meta), method, headers)
                    .await
                    .map_err(|_| ServeError::Timeout);
            }
        };
        // Checked before anything is sent: the range S3 answered for, the object's length,
        // its deletion marker and its sha256 metadata must all be this version's, or these
        // bytes belong to another one.
        let total = match &range {
            Some(range) => {
                let want = format!("bytes {}-{}/", range.start, range.end - 1);
                let total = out
                    .content_range()
                    .and_then(|cr| cr.strip_prefix(want.as_str()))
                    .and_then(|t| t.parse::<u64>().ok());
                let Some(total) = total else {
                    return Err(ServeError::Stale(format!(
                        "{key}: S3 answered {:?} for {want}",
                        out.content_range()
                    )));
                };
                total
            }
            None => out.content_length().map_or(u64::MAX, |n| n.max(0) as u64),
        };
        if let Some(why) = super::fetch::other_version_of(
            meta.sha256.as_deref(),
            meta.size,
            Some(total),
            out.metadata(),
        ) {
            return Err(ServeError::Stale(format!("{key}: {why}")));
        }
        let stream = tokio_util::io::ReaderStream::new(out.body.into_async_read());
        // A whole object with a known SHA-256 is hashed on its way through, its last chunk
        // held until the hash is known: other bytes end short of their Content-Length.
        let want = if range.is_none() {
            meta.sha256_owned()
        } else {
            None
        };
        let r = warp::reply::stream(guarded_stream(
            stream,
            want,
            key.as_str().to_string(),
            "s3",
            self.cfg.http.upstream_stall.0,
        ))
        .into_response();
        Ok(sem::streamed_response(
            r,
            rep,
            range.as_ref(),
            &self.policy,
            "s3",
        ))
    }

    /// The archive copy: the local archive dir, or the archive file server. `meta` is `None`
    /// when S3 could not be asked.
    /// A file only in another node's spool, from that node (`X-Ferry-Source: peer`), with
    /// this node's semantics on the version the peer published: its length, and the ETag
    /// the peer itself sends (the SHA-256 once hashed, else its stat's tag). A whole body
    /// is checked against the SHA-256 when known; a body that stops or ends short resets
    /// the connection, never a clean-looking short 200.
    async fn serve_peer(
        &self,
        key: &Key,
        meta: &Meta,
        method: &Method,
        headers: &HeaderMap,
    ) -> Result<Response, ServeError> {
        let Some(peer) = meta.peer.as_ref() else {
            return Err(ServeError::NotFound);
        };
        let mtime = system_time(peer.mtime_ns).unwrap_or(std::time::UNIX_EPOCH);
        // A row without a ctime (0: published by a ferry before schema version 2, and not
        // since) cannot name the owner's local tag. Its answer is then taken when the
        // owner's tag agrees on length, mtime and inode (either format), and sent with no
        // ETag at all rather than one that might not be the owner's; never a 503 for it.
        let unknown_ctime = meta.sha256.is_none() && peer.ctime_ns == 0;
        let loose = unknown_ctime.then(|| {
            let t = Etag::local(meta.size, mtime, peer.inode, 0).header();
            t[..t.len() - "-0\"".len()].to_string()
        });
        let rep = Representation {
            len: meta.size,
            etag: match meta.sha256.as_deref() {
                Some(sha) => Some(Etag::sha256(sha)),
                None if unknown_ctime => None,
                None => Some(Etag::local(meta.size, mtime, peer.inode, peer.ctime_ns)),
            },
            last_modified: Some(mtime),
            content_type: crate::media::content_type(key.as_str()),
            caching: Caching::Public,
        };
        let base = format!("{}{}", peer.url.trim_end_matches('/'), self.cfg.http.mount);
        self.peers
            .get_from(
                &base,
                key,
                Some(rep),
                meta.sha256_owned(),
                method,
                headers,
                &self.policy,
                "peer",
                loose.as_deref(),
            )
            .await
    }

    async fn serve_archive(
        &self,
        key: &Key,
        meta: Option<&Meta>,
        method: &Method,
        headers: &HeaderMap,
    ) -> Result<Response, ServeError> {
        let rep = meta.map(|m| meta_representation(key, m));
        if let Some(fb) = &self.fallback {
            let sha = meta.and_then(Meta::sha256_owned);
            return fb
                .get_from(
                    &fb.base,
                    key,
                    rep,
                    sha,
                    method,
                    headers,
                    &self.policy,
                    "archive",
                    None,
                )
                .await;
        }
        let dir = self.archive.clone();
        let k = key.as_str().to_string();
        let found = tokio::task::spawn_blocking(move || local::open_beneath(&dir, &k))
            .await
            .map_err(|e| ServeError::Internal(format!("open task: {e}")))?
            .map_err(|e| ServeError::Internal(format!("open archive {key}: {e}")))?;
        let Some(lf) = found else {
            return Err(ServeError::NotFound);
        };
        // The archive copy is the current version when its bytes hash to the version's
        // SHA-256 (checked once per inode, length, mtime and ctime; an older copy of the same
        // length is not). Anything else is described by its own stat, and kept by no cache
        // when the metadata names another version; without metadata (S3 down, nothing
        // known) it is all there is.
        let want = meta.and_then(Meta::sha256_owned);
        let same = match (&rep, &want) {
            (Some(r), Some(want)) if r.len == lf.len => {
                let id = (lf.inode, lf.len, lf.mtime, lf.stat.ctime_ns);
                let got = match self.archive_sha.get(&id) {
                    Some(s) => Some(s),
                    None => {
                        let f = lf.file.try_clone();
                        let len = lf.len;
                        let h = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
                            let f = f?;
                            Ok(crate::digest::sha256_fd(&f, len, &|| false)?
                                .map(|(_, sha)| sha)
                                .unwrap_or_default())
                        })
                        .await
                        .ok()
                        .and_then(|r| r.ok());
                        if let Some(h) = &h {
                            self.archive_sha.insert(id, h.clone());
                        }
                        h
                    }
                };
                got.as_deref() == Some(want.as_str())
            }
            (Some(r), None) => r.len == lf.len,
            _ => false,
        };
        let rep = match rep {
            Some(r) if same => r,
            other => Representation {
                len: lf.len,
                etag: Some(Etag::local(lf.len, lf.mtime, lf.inode, lf.stat.ctime_ns)),
                last_modified: Some(lf.mtime),
                content_type: crate::media::content_type(key.as_str()),
                caching: if other.is_some() {
                    Caching::NoStore
                } else {
                    Caching::Public
                },
            },
        };
        Ok(sem::respond_file(lf, method, headers, &rep, &self.policy, "archive").await)
    }

    /// The Location for a key in S3: built only from config and the validated key.
    pub fn public_location(&self, key: &Key) -> String {
        format!(
            "{}{}",
            self.redirect_base,
            key.encoded_object_path(&self.cfg.s3.prefix)
        )
    }

    async fn presigned_location(&self, key: &Key) -> Result<String, ServeError> {
        let ttl = self.cfg.http.presign_ttl.0;
        if let Ok(m) = self.presigned.lock() {
            if let Some((url, at)) = m.get(key.as_str()) {
                if at.elapsed() < ttl / 2 {
                    return Ok(url.clone());
                }
            }
        }
        let url = self
            .store
            .presign_get(&key.object_key(&self.cfg.s3.prefix), ttl)
            .await
            .map_err(|e| ServeError::Internal(format!("presign: {e}")))?;
        if let Ok(mut m) = self.presigned.lock() {
            if m.len() >= MAX_PRESIGNED {
                m.retain(|_, (_, at)| at.elapsed() < ttl / 2);
                if m.len() >= MAX_PRESIGNED {
                    m.clear();
                }
            }
            m.insert(key.as_str().to_string(), (url.clone(), Instant::now()));
        }
        Ok(url)
    }

    async fn redirect(&self, key: &Key) -> Result<Response, ServeError> {
        let location = if self.cfg.http.presign {
            Box::pin(self.presigned_location(key)).await?
        } else {
            self.public_location(key)
        };
        // SECURITY: the value is built from config and a validated key; from_str refuses
        // CR/LF anyway, and a refusal is an internal error, never a header split.
        let loc = HeaderValue::from_str(&location).map_err(|_| {
            ServeError::Internal(format!("location for {key} is not a header value"))
        })?;
        let mut r = Response::new(Default::default());
        *r.status_mut() = StatusCode::FOUND;
        let h = r.headers_mut();
        h.insert(http::header::LOCATION, loc);
        h.insert("x-ferry-source", HeaderValue::from_static("redirect"));
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        if self.cfg.http.presign {
            h.insert(
                http::header::CACHE_CONTROL,
                HeaderValue::from_static("private, no-store"),
            );
        }
        Ok(r)
    }

    /// Prometheus text; file counts and queue numbers are read from the catalog at scrape
    /// time, from tables and an index kept as rows change (no row scan per scrape).
    async fn metrics(&self) -> Result<Response, ServeError> {
        let m = crate::telemetry::metrics();
        m.spool_memory_bytes
            .set(i64::try_from(self.memo.weight()).unwrap_or(i64::MAX));
        if let Ok(g) = self.catalog.read(crate::catalog::ops::gauges).await {
            m.set_queue(&g);
        }
        let mut r = m.encode().into_response();
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        Ok(r)
    }

    /// Ready when the catalog answers and the bucket is reachable. The answer is kept for
    /// a second and concurrent probes share one check: a load balancer polling every node
    /// often, or anyone hammering it, costs one HeadBucket a second at most.
    async fn readyz(&self) -> Result<Response, ServeError> {
        let mut last = self.readiness.lock().await;
        let fresh = last
            .as_ref()
            .filter(|(at, _)| at.elapsed() < READY_MEMORY)
            .map(|(_, r)| r.clone());
        let result = match fresh {
            Some(r) => r,
            None => {
                let r = self.check_ready().await;
                *last = Some((Instant::now(), r.clone()));
                r
            }
        };
        drop(last);
        // A shared catalog that cannot be used leaves the node ready (it serves from its
        // spool, its catalog and S3), but says so: metadata costs HEADs and may lag.
        let degraded = self.shared.as_ref().and_then(|s| s.degraded());
        result
            .map(|()| match degraded {
                None => "ready\n".into_response(),
                Some(why) => format!(
                    "ready\nshared catalog: degraded ({why}); metadata comes from S3 HEADs\n"
                )
                .into_response(),
            })
            .map_err(ServeError::NotReady)
    }

    async fn check_ready(&self) -> Result<(), String> {
        self.catalog
            .read(|c| Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?))
            .await
            .map_err(|e| format!("catalog: {e}"))?;
        match tokio::time::timeout(Duration::from_secs(3), self.store.head_bucket()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("S3: {}", e.message)),
            Err(_) => Err("S3: timed out".into()),
        }
    }
}

/// The representation of the version the metadata describes: the same ETag, length and
/// Last-Modified whichever source ends up sending it (cache, S3, archive).
fn meta_representation(key: &Key, meta: &Meta) -> Representation {
    Representation {
        len: meta.size,
        etag: meta.sha256.as_deref().map(Etag::sha256),
        last_modified: meta.last_modified,
        content_type: crate::media::content_type(key.as_str()),
        caching: Caching::Public,
    }
}

/// A spool file's representation. Ready (the catalog holds a row for exactly this stat): a
/// finished version, public, tagged by its SHA-256 once the uploader hashed it, else by its
/// stat. Not ready: a weak tag and `no-store`, so nothing downstream keeps a file that is
/// still being written.
fn spool_representation(
    key: &Key,
    stat: &crate::catalog::FileStat,
    mtime: SystemTime,
    record: Option<&Record>,
) -> Representation {
    let ready = record.is_some_and(|r| r.ready_for(stat));
    let local_tag = Etag::local(stat.size, mtime, stat.inode, stat.ctime_ns);
    let (etag, caching) = match record.and_then(|r| r.sha256_for(stat)) {
        Some(sha) => (Etag::sha256(sha), Caching::Public),
        None if ready => (local_tag, Caching::Public),
        None => (local_tag.weaken(), Caching::NoStore),
    };
    Representation {
        len: stat.size,
        etag: Some(etag),
        last_modified: Some(mtime),
        content_type: crate::media::content_type(key.as_str()),
        caching,
    }
}

/// Opens a cache file we wrote ourselves (no user-controlled path).
fn open_path(p: &std::path::Path) -> std::io::Result<Option<local::LocalFile>> {
    use std::os::unix::fs::MetadataExt;
    let file = File::open(p)?;
    let md = file.metadata()?;
    Ok(Some(local::LocalFile {
        len: md.len(),
        mtime: md.modified()?,
        inode: md.ino(),
        stat: crate::catalog::FileStat::of(&md),
        file,
        preloaded: None,
        foreign: false,
    }))
}

/// A client for `http.fallback_url` (the archive file server).
struct FallbackClient {
    base: String,
    /// `http.upstream_stall`.
    stall: Duration,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<bytes::Bytes>,
    >,
}

impl FallbackClient {
    fn new(base: &str, stall: Duration) -> FallbackClient {
        let base = if base.ends_with('/') {
            base.to_string()
        } else {
            format!("{base}/")
        };
        FallbackClient {
            base,
            stall,
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
        }
    }

    /// A copy from `base` (the archive server, or a peer's mount), answered with our own
    /// semantics as `source`: the plan is made here from `rep` (the metadata's version), and
    /// only a plain GET, or one range, is asked of the server; without metadata the
    /// server's length describes the copy. A peer is told so (`X-Ferry-Peer`), and answers
    /// from its spool only.
    #[allow(clippy::too_many_arguments)]
    async fn get_from(
        &self,
        base: &str,
        key: &Key,
        rep: Option<Representation>,
        sha256: Option<String>,
        method: &Method,
        headers: &HeaderMap,
        policy: &Policy,
        source: &'static str,
        // A peer's local tag known only up to its ctime: `"len-mtime-inode`, unclosed.
        loose_tag: Option<&str>,
    ) -> Result<Response, ServeError> {
        let range = match &rep {
            Some(rep) => match sem::streamed(method, headers, rep, policy, source) {
                Streamed::Answer(r) => return Ok(r),
                Streamed::Fetch(range) => range,
            },
            None => None,
        };
        // SECURITY: built from config (or the shared catalog's node URL) and the validated,
        // percent-encoded key only.
        let url = format!("{}{}", base, key.encoded_object_path(""));
        let mut req = http::Request::builder().method(method.clone()).uri(&url);
        if source == "peer" {
            req = req.header(PEER_HEADER, "1");
        }
        if let Some(r) = &range {
            req = req.header(http::header::RANGE, sem::range_header(r));
        }
        let req = req
            .body(http_body_util::Empty::new())
            .map_err(|e| ServeError::Internal(format!("fallback request: {e}")))?;
        let resp = match tokio::time::timeout(FIRST_BYTE_TIMEOUT, self.client.request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(url, source, error = %e, "the upstream server failed");
                return Err(ServeError::BadGateway);
            }
            Err(_) => return Err(ServeError::Timeout),
        };
        let status = resp.status();
        let want = if range.is_some() {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        };
        if status != want {
            if source == "peer" && status == StatusCode::NOT_FOUND {
                tracing::debug!(url, "the peer no longer has it");
            } else {
                tracing::warn!(url, source, %status, %want, "the upstream server answered otherwise");
            }
            return Err(if status == StatusCode::NOT_FOUND {
                ServeError::NotFound
            } else {
                ServeError::BadGateway
            });
        }
        let (parts, body) = resp.into_parts();
        if source == "peer" {
            // The peer's file must still be the version it published: a file rewritten in
            // place since (same length, other bytes) has another tag, and a file the peer
            // itself calls unfinished is no-store there. Neither goes out under the
            // published version's ETag.
            let got = parts
                .headers
                .get(http::header::ETAG)
                .and_then(|v| v.to_str().ok());
            let want = rep.as_ref().and_then(|r| r.etag.as_ref()).map(Etag::header);
            let no_store = parts
                .headers
                .get(http::header::CACHE_CONTROL)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("no-store"));
            let agrees = match (loose_tag, got) {
                (Some(prefix), Some(got)) => got.strip_prefix(prefix).is_some_and(|rest| {
                    rest == "\""
                        || rest
                            .strip_prefix('-')
                            .and_then(|r| r.strip_suffix('"'))
                            .is_some_and(|c| {
                                !c.is_empty() && c.bytes().all(|b| b.is_ascii_hexdigit())
                            })
                }),
                _ => got == want.as_deref(),
            };
            if !agrees || no_store {
                tracing::warn!(
                    url,
                    ?got,
                    ?want,
                    no_store,
                    "the peer's file is not the version it published; not served from it"
                );
                return Err(ServeError::Stale(format!(
                    "{key}: the peer's file changed since it was published"
                )));
            }
        }
        let header_len = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let rep = match rep {
            Some(rep) => rep,
            None => {
                let Some(len) = header_len else {
                    tracing::warn!(url, source, "the upstream server sent no length");
                    return Err(ServeError::BadGateway);
                };
                let last_modified = parts
                    .headers
                    .get(http::header::LAST_MODIFIED)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| httpdate::parse_http_date(v).ok());
                let rep = Representation {
                    len,
                    etag: None,
                    last_modified,
                    content_type: crate::media::content_type(key.as_str()),
                    caching: Caching::Public,
                };
                // Only the bodiless answers can still be chosen: the whole body is on its way.
                if let Streamed::Answer(r) = sem::streamed(method, headers, &rep, policy, source) {
                    return Ok(r);
                }
                rep
            }
        };
        // Checked before sent: a copy of another length is another version.
        let expect = range.as_ref().map_or(rep.len, |r| r.end - r.start);
        if header_len != Some(expect) {
            tracing::warn!(
                url,
                ?header_len,
                expect,
                "the upstream server's copy has another length"
            );
            return Err(ServeError::BadGateway);
        }
        let stream = http_body_util::BodyStream::new(body);
        let stream = futures_util::StreamExt::filter_map(stream, |f| async move {
            match f {
                Ok(frame) => frame.into_data().ok().map(Ok),
                Err(e) => Some(Err(std::io::Error::other(e))),
            }
        });
        // The server's bytes are checked like S3's: a whole copy against the version's
        // SHA-256, and every body against a stall.
        let want = if range.is_none() { sha256 } else { None };
        let r = warp::reply::stream(guarded_stream(
            Box::pin(stream),
            want,
            key.as_str().to_string(),
            source,
            self.stall,
        ))
        .into_response();
        Ok(sem::streamed_response(
            r,
            &rep,
            range.as_ref(),
            policy,
            source,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::State;
    use crate::config::ActiveContent;
    use proptest::prelude::*;
    use sha2::Digest;
    use std::pin::Pin;

    type Answer = (StatusCode, Vec<(String, String)>, Vec<u8>);

    /// Status, headers (sorted; the source left out, since naming it is its job) and body.
    async fn answer(resp: Response) -> Answer {
        let (parts, mut body) = resp.into_parts();
        let mut out = Vec::new();
        while let Some(frame) =
            std::future::poll_fn(|cx| warp::hyper::body::Body::poll_frame(Pin::new(&mut body), cx))
                .await
        {
            if let Ok(data) = frame.expect("body frame").into_data() {
                out.extend_from_slice(&data);
            }
        }
        let mut headers: Vec<(String, String)> = parts
            .headers
            .iter()
            .filter(|(k, _)| k.as_str() != "x-ferry-source")
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        headers.sort();
        (parts.status, headers, out)
    }

    /// A header value chosen by index, in terms of this version's tag and mtime, so the
    /// random cases hit matches and near misses alike.
    fn tag_value(i: u8, tag: &str) -> String {
        match i % 6 {
            0 => tag.to_string(),
            1 => format!("W/{tag}"),
            2 => "\"another\"".into(),
            3 => "*".into(),
            4 => format!("\"another\", {tag}"),
            _ => "garbage".into(),
        }
    }

    fn date_value(i: u8, mtime: SystemTime) -> String {
        let t = match i % 4 {
            0 => mtime,
            1 => mtime - Duration::from_secs(5),
            2 => mtime + Duration::from_secs(5),
            _ => return "not a date".into(),
        };
        httpdate::fmt_http_date(t)
    }

    fn range_value(kind: u8, a: u64, b: u64) -> String {
        match kind % 4 {
            0 => format!("bytes={}-{}", a.min(b), a.max(b)),
            1 => format!("bytes={a}-"),
            2 => format!("bytes=-{b}"),
            _ => "bytes=oops".into(),
        }
    }

    #[derive(Debug, Clone)]
    struct Case {
        head: bool,
        inm: Option<u8>,
        im: Option<u8>,
        ims: Option<u8>,
        ius: Option<u8>,
        if_range: Option<(bool, u8)>,
        range: Option<(u8, u64, u64)>,
    }

    fn cases() -> impl Strategy<Value = Case> {
        (
            any::<bool>(),
            proptest::option::of(any::<u8>()),
            proptest::option::of(any::<u8>()),
            proptest::option::of(any::<u8>()),
            proptest::option::of(any::<u8>()),
            proptest::option::of((any::<bool>(), any::<u8>())),
            proptest::option::of((any::<u8>(), 0u64..3100, 0u64..3100)),
        )
            .prop_map(|(head, inm, im, ims, ius, if_range, range)| Case {
                head,
                inm,
                im,
                ims,
                ius,
                if_range,
                range,
            })
    }

    fn request(c: &Case, tag: &str, mtime: std::time::SystemTime) -> (Method, HeaderMap) {
        let mut h = HeaderMap::new();
        let mut put = |name: http::header::HeaderName, v: String| {
            h.insert(name, HeaderValue::from_str(&v).expect("test header"));
        };
        if let Some(i) = c.inm {
            put(http::header::IF_NONE_MATCH, tag_value(i, tag));
        }
        if let Some(i) = c.im {
            put(http::header::IF_MATCH, tag_value(i, tag));
        }
        if let Some(i) = c.ims {
            put(http::header::IF_MODIFIED_SINCE, date_value(i, mtime));
        }
        if let Some(i) = c.ius {
            put(http::header::IF_UNMODIFIED_SINCE, date_value(i, mtime));
        }
        if let Some((by_tag, i)) = c.if_range {
            let v = if by_tag {
                tag_value(i, tag)
            } else {
                date_value(i, mtime)
            };
            put(http::header::IF_RANGE, v);
        }
        if let Some((kind, a, b)) = c.range {
            put(http::header::RANGE, range_value(kind, a, b));
        }
        let m = if c.head { Method::HEAD } else { Method::GET };
        (m, h)
    }

    /// One version on disk three times (spool, cache, archive) and "in S3".
    struct Version {
        _dir: tempfile::TempDir,
        root: File,
        bytes: Vec<u8>,
        key: Key,
        meta: Meta,
        record: Record,
    }

    fn version(bytes: Vec<u8>) -> Version {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["spool.bin", "cache.bin", "archive.bin"] {
            std::fs::write(dir.path().join(name), &bytes).expect("write");
        }
        let root = File::open(dir.path()).expect("dir");
        let spool = local::open_beneath(&root, "spool.bin")
            .expect("open")
            .expect("file");
        let sha = hex::encode(sha2::Sha256::digest(&bytes));
        // As the uploader leaves the row: verified with the spool file's stat and SHA-256;
        // the metadata other sources use is read from that row.
        let record = Record {
            state: State::Verified,
            stat: spool.stat,
            sha256: Some(sha.clone()),
        };
        let meta = Meta {
            at: Where::InS3,
            size: spool.stat.size,
            sha256: Some(sha.as_str().into()),
            local: true,
            last_modified: super::super::meta::system_time(spool.stat.mtime_ns),
            stale: false,
            peer: None,
        };
        Version {
            _dir: dir,
            root,
            bytes,
            key: Key::new("v/photo.svg", "").expect("key"),
            meta,
            record,
        }
    }

    async fn every_source(
        v: &Version,
        method: &Method,
        h: &HeaderMap,
    ) -> Vec<(&'static str, Answer)> {
        let policy = Policy {
            cache_control: "public, max-age=60".into(),
            active_content: ActiveContent::Sandbox,
        };
        let open = |name: &str| {
            local::open_beneath(&v.root, name)
                .expect("open")
                .expect("file")
        };
        let mut out = Vec::new();

        let lf = open("spool.bin");
        let rep = spool_representation(&v.key, &lf.stat, lf.mtime, Some(&v.record));
        out.push((
            "local",
            answer(sem::respond_file(lf, method, h, &rep, &policy, "local").await).await,
        ));
        // The spool's memory tier, from the same representation.
        let all = bytes::Bytes::from(v.bytes.clone());
        out.push((
            "local",
            answer(sem::respond_bytes(all, method, h, &rep, &policy, "local")).await,
        ));

        for (name, source) in [("cache.bin", "cache"), ("archive.bin", "archive")] {
            let rep = meta_representation(&v.key, &v.meta);
            let lf = open(name);
            out.push((
                source,
                answer(sem::respond_file(lf, method, h, &rep, &policy, source).await).await,
            ));
        }

        let rep = meta_representation(&v.key, &v.meta);
        let resp = match sem::streamed(method, h, &rep, &policy, "s3") {
            Streamed::Answer(r) => r,
            Streamed::Fetch(range) => {
                let body = match (&range, *method == Method::HEAD) {
                    (_, true) => Vec::new(),
                    (Some(r), false) => v.bytes[r.start as usize..r.end as usize].to_vec(),
                    (None, false) => v.bytes.clone(),
                };
                let r = http::Response::new(bytes::Bytes::from(body)).into_response();
                sem::streamed_response(r, &rep, range.as_ref(), &policy, "s3")
            }
        };
        out.push(("s3", answer(resp).await));
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// DESIGN.md "HTTP semantics": for the same bytes, every source answers a random set
        /// of conditional and (single) range headers with the same status, headers and body.
        #[test]
        fn every_source_answers_alike(len in 0usize..3000, c in cases()) {
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let v = version((0..len).map(|i| (i * 13 % 251) as u8).collect());
            let tag = format!("\"{}\"", v.record.sha256.clone().unwrap_or_default());
            let mtime = v.meta.last_modified.unwrap_or(std::time::UNIX_EPOCH);
            let (method, h) = request(&c, &tag, mtime);
            let answers = rt.block_on(every_source(&v, &method, &h));
            let (first, want) = &answers[0];
            for (source, got) in &answers[1..] {
                prop_assert_eq!(got, want, "{} differs from {} for {:?}", source, first, c);
            }
        }
    }
}
