//! Fetching objects from S3 for proxying and for filling the hot cache: one GET per key at a
//! time, written to a temp file that every waiter reads as it grows (so late joiners get the
//! whole body), checked against the metadata's size and SHA-256, then admitted to the cache.
//!
//! What S3's GET response says about the object (its length, `ferry-deleted`, its `sha256`
//! user metadata) is checked against the version asked for before a byte is published, so
//! no reader ever streams another version's bytes under this version's ETag: such a fill
//! fails as `stale`, and the caller resolves the key again.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::cache::HotCache;
use crate::store::Store;

/// Progress of one fill, published to its readers.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// The object's length, once S3 answered.
    pub len: Option<u64>,
    pub written: u64,
    pub done: bool,
    pub error: Option<String>,
    pub timed_out: bool,
    /// S3 holds another version (deleted, re-uploaded) than the one asked for.
    pub stale: bool,
}

/// Why a fill failed.
struct FillError {
    msg: String,
    timed_out: bool,
    stale: bool,
}

impl FillError {
    fn new(msg: impl Into<String>) -> FillError {
        FillError {
            msg: msg.into(),
            timed_out: false,
            stale: false,
        }
    }
}

/// The version a fill is for: one key can have fills of two versions in flight (before and
/// after a re-upload), and a reader must never join the other one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Version {
    key: String,
    sha256: Option<String>,
    size: u64,
}

struct Fill {
    path: PathBuf,
    rx: watch::Receiver<Progress>,
}

pub struct Fetcher {
    store: Store,
    prefix: String,
    cache: Arc<HotCache>,
    tmp_dir: PathBuf,
    inflight: Mutex<HashMap<Version, Arc<Fill>>>,
    /// `cache.fill_limit`: the bytes all fills in flight may hold in temp files.
    fill_limit: u64,
    /// `http.upstream_stall`: how long a body may sit without a byte.
    stall: Duration,
}

/// Fills in flight at most, whatever their size: each holds a descriptor, a task and an S3
/// connection.
const MAX_FILLS: usize = 256;

/// How long S3 may take to start answering before the archive is tried.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

impl Fetcher {
    pub fn new(
        store: Store,
        prefix: String,
        cache: Arc<HotCache>,
        tmp_dir: PathBuf,
        fill_limit: u64,
        stall: Duration,
    ) -> Fetcher {
        Fetcher {
            store,
            prefix,
            cache,
            tmp_dir,
            inflight: Mutex::new(HashMap::new()),
            fill_limit,
            stall,
        }
    }

    /// Joins the fill in flight for this version of `key`, or starts one. `admit` puts the
    /// finished, checked bytes in the hot cache. Returns a reader positioned at the start of
    /// the body, or `None` when a new fill would pass MAX_FILLS or `cache.fill_limit` bytes
    /// (the caller then streams straight from S3).
    pub fn fetch(
        self: &Arc<Self>,
        key: &str,
        sha256: Option<String>,
        size: u64,
        admit: bool,
    ) -> std::io::Result<Option<FillReader>> {
        let version = Version {
            key: key.to_string(),
            sha256: sha256.clone(),
            size,
        };
        let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = map.get(&version) {
            // Opened under the lock: the fill cannot rename or unlink it before this.
            let file = std::fs::File::open(&f.path)?;
            return Ok(Some(FillReader {
                file,
                rx: f.rx.clone(),
                pos: 0,
            }));
        }
        let held: u64 = map.keys().map(|v| v.size).sum();
        if map.len() >= MAX_FILLS || held.saturating_add(size) > self.fill_limit {
            return Ok(None);
        }
        std::fs::create_dir_all(&self.tmp_dir)?;
        let path = self.tmp_dir.join(format!(
            ".tmp-fill-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        // SECURITY: a new name of our own (O_EXCL), never a file someone placed there,
        // readable by us only.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let reader_file = std::fs::File::open(&path)?;
        let (tx, rx) = watch::channel(Progress::default());
        map.insert(
            version.clone(),
            Arc::new(Fill {
                path: path.clone(),
                rx: rx.clone(),
            }),
        );
        drop(map);
        let this = self.clone();
        let key = key.to_string();
        tokio::spawn(async move {
            let outcome = this.run_fill(&version, admit, file, &tx).await;
            // New requests stop joining before the file moves or goes.
            this.inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&version);
            match outcome {
                Ok((n, sha)) => {
                    let good = sha256.as_deref().is_none_or(|want| want == sha);
                    if !good {
                        tracing::warn!(
                            key,
                            "S3 returned bytes that do not match the catalog's SHA-256"
                        );
                        tx.send_modify(|p| p.error = Some("checksum mismatch".into()));
                        let _ = std::fs::remove_file(&path);
                        return;
                    }
                    tx.send_modify(|p| {
                        p.written = n;
                        p.done = true;
                    });
                    let admitted = admit && sha256.is_some() && this.cache.enabled();
                    if admitted {
                        let (c, k, s, p) = (this.cache.clone(), key.clone(), sha, path.clone());
                        let res = tokio::task::spawn_blocking(move || c.admit(&k, &s, n, &p)).await;
                        if !matches!(res, Ok(Ok(()))) {
                            tracing::warn!(key, "could not admit to the hot cache");
                            let _ = std::fs::remove_file(&path);
                        }
                    } else {
                        let _ = std::fs::remove_file(&path);
                    }
                }
                Err(e) => {
                    if e.stale {
                        tracing::info!(key, error = %e.msg, "S3 holds another version than the metadata said");
                    }
                    tx.send_modify(|p| {
                        p.error = Some(e.msg);
                        p.timed_out = e.timed_out;
                        p.stale = e.stale;
                    });
                    let _ = std::fs::remove_file(&path);
                }
            }
        });
        Ok(Some(FillReader {
            file: reader_file,
            rx,
            pos: 0,
        }))
    }

    async fn run_fill(
        &self,
        want: &Version,
        admit: bool,
        file: std::fs::File,
        tx: &watch::Sender<Progress>,
    ) -> Result<(u64, String), FillError> {
        let object_key = format!("{}{}", self.prefix, want.key);
        let out = match tokio::time::timeout(FIRST_BYTE_TIMEOUT, self.store.get(&object_key, None))
            .await
        {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => return Err(FillError::new(e.to_string())),
            Err(_) => {
                return Err(FillError {
                    timed_out: true,
                    ..FillError::new("S3 did not answer in time")
                })
            }
        };
        let len = out.content_length().map(|n| n.max(0) as u64);
        if let Some(why) = other_version(want, len, out.metadata()) {
            return Err(FillError {
                stale: true,
                ..FillError::new(why)
            });
        }
        tx.send_modify(|p| p.len = len);
        let mut body = out.body;
        let mut f = tokio::fs::File::from_std(file);
        let mut h = Sha256::new();
        let mut n = 0u64;
        let write_err = |e: std::io::Error| FillError::new(format!("writing cache temp file: {e}"));
        loop {
            let chunk = match tokio::time::timeout(self.stall, body.try_next()).await {
                Ok(Ok(Some(c))) => c,
                Ok(Ok(None)) => break,
                Ok(Err(e)) => return Err(FillError::new(format!("reading from S3: {e}"))),
                Err(_) => {
                    return Err(FillError {
                        timed_out: true,
                        ..FillError::new("S3 stalled")
                    })
                }
            };
            // Nobody waits for these bytes and the cache will not keep them: stop, rather
            // than download the rest for no one. (The fill's own entry in `inflight` holds
            // one receiver; every reader holds another.)
            if !admit && tx.receiver_count() <= 1 {
                return Err(FillError::new("every client left"));
            }
            f.write_all(&chunk).await.map_err(write_err)?;
            // Readers may only read what is flushed to the file.
            f.flush().await.map_err(write_err)?;
            h.update(&chunk);
            n += chunk.len() as u64;
            tx.send_modify(|p| p.written = n);
        }
        if let Some(l) = len {
            if l != n {
                return Err(FillError::new(format!("S3 sent {n} of {l} bytes")));
            }
        }
        Ok((n, hex::encode(h.finalize())))
    }
}

/// Why the object S3 answered with is not the version `want`, judged from the GET response
/// alone (before any byte of it is used): its length, a deletion marker, or a `sha256` user
/// metadata naming other bytes.
fn other_version(
    want: &Version,
    len: Option<u64>,
    metadata: Option<&HashMap<String, String>>,
) -> Option<String> {
    other_version_of(want.sha256.as_deref(), want.size, len, metadata)
}

/// `other_version` for callers that hold the parts (the ranged proxy: `total` is the
/// object's length from Content-Range).
pub fn other_version_of(
    sha256: Option<&str>,
    size: u64,
    total: Option<u64>,
    metadata: Option<&HashMap<String, String>>,
) -> Option<String> {
    if metadata.is_some_and(|m| m.contains_key("ferry-deleted")) {
        return Some("the object is a deletion marker".into());
    }
    if let Some(n) = total.filter(|&n| n != size) {
        return Some(format!(
            "the object has {n} bytes, the metadata says {size}"
        ));
    }
    let theirs = metadata.and_then(|m| m.get("sha256"));
    if let (Some(theirs), Some(ours)) = (theirs, sha256) {
        if !theirs.eq_ignore_ascii_case(ours) {
            return Some("the object's sha256 metadata names other bytes".into());
        }
    }
    None
}

/// Reads a fill as it grows.
pub struct FillReader {
    file: std::fs::File,
    rx: watch::Receiver<Progress>,
    pos: u64,
}

pub enum Started {
    /// S3 answered: the body length (when known) and a stream of the whole body.
    Body(Option<u64>, FillReader),
    /// S3 failed before a byte was written; `timed_out` distinguishes 504 from 502, and
    /// `stale` says S3 holds another version than the one asked for.
    Failed {
        error: String,
        timed_out: bool,
        stale: bool,
    },
}

impl FillReader {
    /// Waits until S3 has answered (or failed).
    pub async fn started(mut self) -> Started {
        loop {
            let p = self.rx.borrow_and_update().clone();
            if let Some(e) = p.error {
                if p.written == 0 {
                    return Started::Failed {
                        error: e,
                        timed_out: p.timed_out,
                        stale: p.stale,
                    };
                }
            }
            if p.len.is_some() || p.done || p.written > 0 {
                return Started::Body(p.len, self);
            }
            if self.rx.changed().await.is_err() {
                return Started::Failed {
                    error: "fill stopped".into(),
                    timed_out: false,
                    stale: false,
                };
            }
        }
    }

    /// The body as a stream of chunks read from the temp file as it grows.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send {
        futures_util::stream::unfold(self, |mut r| async move {
            loop {
                let p = r.rx.borrow_and_update().clone();
                // The last byte waits until the fill has checked the SHA-256: bytes that do
                // not match never make a complete body (the response ends short of its
                // Content-Length, so no client or cache takes it for the version).
                let limit = if p.done {
                    p.written
                } else {
                    p.written.saturating_sub(1)
                };
                if limit > r.pos {
                    let want = (limit - r.pos).min(256 * 1024) as usize;
                    let pos = r.pos;
                    let mut file = match r.file.try_clone() {
                        Ok(f) => f,
                        Err(e) => return Some((Err(e), r)),
                    };
                    let res = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; want];
                        file.seek(SeekFrom::Start(pos))?;
                        file.read_exact(&mut buf)?;
                        Ok::<_, std::io::Error>(buf)
                    })
                    .await;
                    return match res {
                        Ok(Ok(buf)) => {
                            r.pos += buf.len() as u64;
                            Some((Ok(Bytes::from(buf)), r))
                        }
                        Ok(Err(e)) => Some((Err(e), r)),
                        Err(e) => Some((Err(std::io::Error::other(e.to_string())), r)),
                    };
                }
                if let Some(e) = p.error {
                    // Headers are out; all that can be done is to cut the body short.
                    return Some((Err(std::io::Error::other(e)), r));
                }
                if p.done {
                    return None;
                }
                if r.rx.changed().await.is_err() {
                    return None;
                }
            }
        })
    }
}
