//! The uploader: claims due rows, hashes each file once, PUTs it (single or multipart) with
//! our SHA-256, verifies what S3 holds, commits `verified`, then hands it to the archive.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use futures_util::StreamExt;
use md5::Md5;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::catalog::{now_ms, ops, Catalog, FileStat, Row};
use crate::config::{Config, VerifyMode};
use crate::key::Key;
use crate::lease;
use crate::retry::{Class, Policy};
use crate::store::{PartSpec, PutMeta, Store, StoreError};
use crate::sync::archive::{self, Outcome};

/// S3's limit on the number of parts.
const MAX_PARTS: u64 = 10_000;
/// Parts of one file in flight at once.
const PART_CONCURRENCY: usize = 4;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The part size for `size` bytes: the configured one, grown (to a whole MiB) until the file
/// fits in 10,000 parts.
pub fn part_size_for(size: u64, configured: u64) -> u64 {
    let min = size.div_ceil(MAX_PARTS);
    if min <= configured {
        configured
    } else {
        min.div_ceil(1 << 20) * (1 << 20)
    }
}

/// What one read of the file produced.
#[derive(Debug, Clone)]
pub struct Hashed {
    pub stat: FileStat,
    pub sha256: [u8; 32],
    /// MD5 of the whole file, for a single PUT (its plain ETag); `None` for multipart.
    pub md5: Option<[u8; 16]>,
    /// Per-part SHA-256 when the file goes up in parts: (offset, len, digest).
    pub parts: Vec<(u64, u64, [u8; 32])>,
    /// Why the file was read without a lease, if it was.
    pub no_lease: Option<lease::Unavailable>,
}

impl Hashed {
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
    pub fn sha256_b64(&self) -> String {
        B64.encode(self.sha256)
    }
    /// AWS's composite checksum: SHA-256 of the parts' raw digests, "-N".
    pub fn composite_b64(&self) -> String {
        let mut h = Sha256::new();
        for (_, _, d) in &self.parts {
            h.update(d);
        }
        format!("{}-{}", B64.encode(h.finalize()), self.parts.len())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("file is gone")]
    Gone,
    #[error("not a regular file (symlink or special file)")]
    NotRegular,
    #[error("file changed while it was read")]
    Changed,
    #[error("file is open for writing")]
    Busy,
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn open_nofollow(spool: Option<&Path>, path: &Path) -> Result<File, HashError> {
    // SECURITY: the file must be in the spool when it is hashed. A symlink swapped in for a
    // spool file, or for any folder on its way down from the spool root, must not make us
    // hash, upload and then archive its target: beneath the spool the open refuses a
    // symlink in every component (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS). Every later open
    // (the PUT's body, the archive move) must then find this same inode with this same
    // stat, so it is the file that was in the spool. The spool root itself is the
    // operator's and may be a symlink.
    // O_NONBLOCK: a FIFO swapped in must not hang an uploader (and shutdown) on its open;
    // reads from regular files ignore the flag.
    let opened = match spool
        .and_then(|spool| Some((spool, path.strip_prefix(spool).ok()?.to_str()?)))
        .filter(|(_, rel)| !rel.is_empty())
    {
        Some((spool, rel)) => std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_PATH)
            .open(spool)
            .and_then(|root| {
                crate::serve::local::open_confined(std::os::fd::AsFd::as_fd(&root), rel)
            }),
        None => std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path),
    };
    match opened {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(HashError::Gone),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ELOOP | libc::EXDEV | libc::ENOTDIR)
            ) =>
        {
            Err(HashError::NotRegular)
        }
        Err(e) => Err(HashError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// A read buffer for a file of `size` bytes: 1 MiB at most, no more than the file needs
/// (zeroing a megabyte for every small photo showed up in profiles).
pub fn read_buffer(size: u64) -> Vec<u8> {
    vec![0u8; (size as usize).saturating_add(1).clamp(4096, 1 << 20)]
}

/// Reads the file once, under a read lease: full SHA-256 and, when `part_size` is given,
/// each part's SHA-256; then fsyncs it through the same descriptor, so the bytes that go up
/// are the bytes a power loss leaves on disk.
///
/// Fails with `Busy` if someone has the file open for writing (lease refused, or broken
/// while we read), and with `Changed` if the file's identity moved while it was read.
pub fn hash_file(spool: &Path, path: &Path, part_size: Option<u64>) -> Result<Hashed, HashError> {
    let io_err = |source| HashError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = open_nofollow(Some(spool), path)?;
    let md = f.metadata().map_err(io_err)?;
    if !md.file_type().is_file() {
        return Err(HashError::NotRegular);
    }
    let before = FileStat::of(&md);
    let (lease, no_lease) = match lease::take(&f) {
        lease::Probe::Held(l) => (Some(l), None),
        lease::Probe::Busy => return Err(HashError::Busy),
        lease::Probe::Unavailable(u) => (None, Some(u)),
    };
    let mut full = Sha256::new();
    // A single PUT's plain ETag is the MD5 of its body: computed in this one pass, so the
    // PUT's own response can be checked without reading the file again.
    let mut md5 = part_size.is_none().then(Md5::new);
    let mut buf = read_buffer(before.size);
    let mut parts = Vec::new();
    let mut part = Sha256::new();
    let mut part_start = 0u64;
    let mut part_len = 0u64;
    let mut total = 0u64;
    let mut reader = &f;
    loop {
        // A writer's open waits for us while we hold the lease: let go at once.
        if lease.as_ref().is_some_and(|l| l.broken()) {
            return Err(HashError::Busy);
        }
        let want = match part_size {
            Some(ps) => ((ps - part_len) as usize).min(buf.len()),
            None => buf.len(),
        };
        let n = reader.read(&mut buf[..want]).map_err(io_err)?;
        if n == 0 {
            break;
        }
        full.update(&buf[..n]);
        if let Some(m) = md5.as_mut() {
            m.update(&buf[..n]);
        }
        total += n as u64;
        if let Some(ps) = part_size {
            part.update(&buf[..n]);
            part_len += n as u64;
            if part_len == ps {
                parts.push((part_start, part_len, part.finalize_reset().into()));
                part_start += part_len;
                part_len = 0;
            }
        }
    }
    if part_size.is_some() && (part_len > 0 || parts.is_empty()) {
        parts.push((part_start, part_len, part.finalize().into()));
    }
    let broken = lease.as_ref().is_some_and(|l| l.broken());
    drop(lease);
    if broken {
        return Err(HashError::Busy);
    }
    let after = FileStat::of(&f.metadata().map_err(io_err)?);
    let on_path = std::fs::symlink_metadata(path)
        .map(|m| FileStat::of(&m))
        .ok();
    if after != before || total != before.size || on_path != Some(before) {
        return Err(HashError::Changed);
    }
    crate::crashpoint::hit("hashed");
    // The application may never have fsynced what it wrote. Without this, a power loss
    // after `verified` could leave a short file that start-up recovery uploads over the
    // good object.
    f.sync_all().map_err(io_err)?;
    crate::crashpoint::hit("fsync-spool");
    Ok(Hashed {
        stat: before,
        sha256: full.finalize().into(),
        md5: md5.map(|m| m.finalize().into()),
        parts,
        no_lease,
    })
}

/// MD5 of the whole file and of each part, for ETag checks (only when the server gave no
/// usable checksum). Also re-checks the SHA-256, so a changed file cannot pass.
fn md5s(path: &Path, h: &Hashed) -> Result<(String, Option<String>), HashError> {
    let io_err = |source| HashError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Not confined: what this reads must hash to the SHA-256 of the confined read, or fail.
    let mut f = open_nofollow(None, path)?;
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return Err(HashError::NotRegular);
    }
    let mut full = Md5::new();
    let mut sha = Sha256::new();
    let mut part_md5s: Vec<u8> = Vec::new();
    let mut buf = read_buffer(h.stat.size);
    let bounds: Vec<(u64, u64)> = if h.parts.is_empty() {
        vec![(0, h.stat.size)]
    } else {
        h.parts.iter().map(|(o, l, _)| (*o, *l)).collect()
    };
    for (_, len) in &bounds {
        let mut pm = Md5::new();
        let mut left = *len;
        while left > 0 {
            let want = (left as usize).min(buf.len());
            let n = f.read(&mut buf[..want]).map_err(io_err)?;
            if n == 0 {
                return Err(HashError::Changed);
            }
            full.update(&buf[..n]);
            sha.update(&buf[..n]);
            pm.update(&buf[..n]);
            left -= n as u64;
        }
        part_md5s.extend_from_slice(&pm.finalize());
    }
    let sha: [u8; 32] = sha.finalize().into();
    if sha != h.sha256 {
        return Err(HashError::Changed);
    }
    let multi = (!h.parts.is_empty())
        .then(|| format!("{}-{}", hex::encode(Md5::digest(&part_md5s)), h.parts.len()));
    Ok((hex::encode(full.finalize()), multi))
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("verification failed: {0}")]
    Mismatch(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Hash(#[from] HashError),
}

/// Which evidence proved that S3 holds our bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifiedBy {
    /// The PUT's response echoed our SHA-256: the server hashed what it received.
    PutSha256,
    /// The PUT's response carried a plain MD5 ETag equal to ours.
    PutMd5,
    /// The object's full SHA-256 checksum (single PUT).
    Sha256,
    /// The composite SHA-256 of the parts' digests (multipart, as AWS and Garage give it).
    CompositeSha256,
    /// An ETag that is the MD5 (or multipart MD5-of-MD5s) we computed.
    EtagMd5,
    /// The object read back and hashed.
    ReadBack,
}

impl std::fmt::Display for VerifiedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VerifiedBy::PutSha256 => "put-sha256",
            VerifiedBy::PutMd5 => "put-md5",
            VerifiedBy::Sha256 => "sha256",
            VerifiedBy::CompositeSha256 => "composite-sha256",
            VerifiedBy::EtagMd5 => "etag-md5",
            VerifiedBy::ReadBack => "read-back",
        })
    }
}

/// What a single PUT's response proves (DESIGN.md "Verification", step 1).
#[derive(Debug, PartialEq, Eq)]
pub enum PutProof {
    /// The server's proof: no HEAD needed.
    Proven(VerifiedBy),
    /// The response contradicts our bytes: the object must be read back.
    Contradicted(String),
    /// Nothing usable (no checksum echoed, no plain MD5 ETag): ask with a HEAD.
    Silent,
}

/// Judges a single PUT's response. S3 computes the SHA-256 of what it received when the
/// PUT carries `x-amz-checksum-sha256`, and refuses a mismatch (BadDigest), so a 200 that
/// echoes ours is as strong as a HEAD's stored checksum. A plain MD5 ETag (32 hex digits,
/// no `-N`, and no SSE-KMS or SSE-C, whose ETags are not MD5s) was computed by the server
/// too: where present it must equal ours, whatever the checksum says.
pub fn put_proof(reply: &crate::store::PutReply, h: &Hashed) -> PutProof {
    let plain_md5 = reply
        .etag
        .as_deref()
        .map(|t| t.trim_matches('"').to_ascii_lowercase())
        .filter(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()))
        .filter(|_| !reply.encrypted_by_key);
    let ours_md5 = h.md5.map(hex::encode);
    if let (Some(theirs), Some(ours)) = (&plain_md5, &ours_md5) {
        if theirs != ours {
            return PutProof::Contradicted(format!(
                "the PUT's ETag {theirs} is not our MD5 {ours}"
            ));
        }
    }
    match reply.checksum_sha256.as_deref() {
        // An echo alone proves nothing about a server that merely copies the header back
        // (a gateway, a lax implementation): it must come with what the server computed
        // itself, a plain MD5 ETag equal to ours (checked above), or, where the ETag cannot
        // be an MD5 (SSE-KMS, SSE-C), at least an ETag. Otherwise the HEAD decides.
        Some(c) if c == h.sha256_b64() => {
            let backed = plain_md5.is_some() && ours_md5.is_some()
                || reply.encrypted_by_key && reply.etag.is_some();
            if backed {
                PutProof::Proven(VerifiedBy::PutSha256)
            } else {
                PutProof::Silent
            }
        }
        Some(c) => PutProof::Contradicted(format!(
            "the PUT echoed SHA-256 {c}, ours is {}",
            h.sha256_b64()
        )),
        None => match (plain_md5, ours_md5) {
            (Some(_), Some(_)) => PutProof::Proven(VerifiedBy::PutMd5),
            _ => PutProof::Silent,
        },
    }
}

/// Checks that S3 holds exactly the hashed bytes (DESIGN.md "Verification").
/// Returns the object's ETag and what proved it.
pub async fn verify(
    store: &Store,
    object_key: &str,
    path: &Path,
    h: &Hashed,
    read_back: bool,
) -> Result<(Option<String>, VerifiedBy), VerifyError> {
    let head = store.head(object_key).await?;
    if head.size != h.stat.size {
        return Err(VerifyError::Mismatch(format!(
            "S3 has {} bytes, the file has {}",
            head.size, h.stat.size
        )));
    }
    let etag = head.etag.clone();
    if !read_back {
        let multipart = !h.parts.is_empty();
        if let Some(c) = head.checksum_sha256.as_deref() {
            let composite_shape =
                c.contains('-') || head.checksum_type.as_deref() == Some("COMPOSITE");
            // A checksum of the wrong type for this upload is stale: treat it as absent.
            let fits = composite_shape == multipart;
            if fits {
                let want = if multipart {
                    h.composite_b64()
                } else {
                    h.sha256_b64()
                };
                // Some servers omit the "-N" on a composite value.
                let got_matches = c == want || (multipart && want.split('-').next() == Some(c));
                if got_matches {
                    let by = if multipart {
                        VerifiedBy::CompositeSha256
                    } else {
                        VerifiedBy::Sha256
                    };
                    return Ok((etag, by));
                }
                return Err(VerifyError::Mismatch(format!(
                    "S3's SHA-256 {c} is not ours {want}"
                )));
            }
        }
        if let Some(tag) = head.etag.as_deref() {
            let tag = tag.trim_matches('"').to_ascii_lowercase();
            let shape_ok = if multipart {
                tag.split_once('-')
                    .is_some_and(|(hx, n)| hx.len() == 32 && n == h.parts.len().to_string())
            } else {
                tag.len() == 32 && tag.bytes().all(|b| b.is_ascii_hexdigit())
            };
            if shape_ok {
                let p = path.to_path_buf();
                let hc = h.clone();
                let (single, multi) =
                    tokio::task::spawn_blocking(move || md5s(&p, &hc))
                        .await
                        .map_err(|e| VerifyError::Mismatch(format!("hash task: {e}")))??;
                let want = if multipart {
                    multi.unwrap_or_default()
                } else {
                    single
                };
                if tag == want {
                    return Ok((etag, VerifiedBy::EtagMd5));
                }
                // An ETag that is not an MD5 (SSE-KMS, some servers) proves nothing: read back.
            }
        }
    }
    let (n, sha) = store.read_back(object_key).await?;
    if n == h.stat.size && sha == h.sha256_hex() {
        Ok((etag, VerifiedBy::ReadBack))
    } else {
        Err(VerifyError::Mismatch(format!(
            "S3 holds {n} bytes with SHA-256 {sha}, expected {} bytes with {}",
            h.stat.size,
            h.sha256_hex()
        )))
    }
}

/// How the error of a permanent archive failure starts (`sync --once` stops on it).
pub const PERMANENT_ARCHIVE: &str = "permanent archive error: ";

/// Shared by every upload task.
pub struct Ctx {
    pub cfg: Arc<Config>,
    pub catalog: Catalog,
    pub store: Store,
    pub policy: Policy,
    pub spool: PathBuf,
    pub archive: PathBuf,
    /// Woken when rows become due (new files, finished uploads).
    pub wake: Arc<Notify>,
}

/// Content-Type from the extension.
pub use crate::media::content_type;

/// How one attempt ended, for the catalog.
pub enum Attempt {
    Done,
    /// Leave the row alone (a newer version took over, or it vanished and was marked).
    Superseded,
    Retry {
        class: Class,
        error: String,
        retry_after: Option<Duration>,
    },
    /// Not an error: the file changed; look again after it settles.
    Changed(&'static str),
    /// Verified, but the move to the archive failed: only the move is retried (soon for a
    /// transient error, at `retry.max_interval` for a permanent one), never the upload.
    ArchiveFailed {
        permanent: bool,
        error: String,
    },
    /// Not an error: a file that cannot be leased has not been quiet for the long quiet
    /// time yet; look again after this long.
    Wait(Duration),
}

impl Ctx {
    fn object_key(&self, key: &Key) -> String {
        key.object_key(&self.cfg.s3.prefix)
    }

    /// Uploads, verifies and archives one claimed row, recording the outcome.
    pub async fn process(&self, row: Row) {
        let key_str = row.key.clone();
        let gen = row.gen;
        let attempts = row.attempts;
        let started = std::time::Instant::now();
        let outcome = self.attempt(&row).await;
        let m = crate::telemetry::metrics();
        match &outcome {
            // A row claimed for its archive move only was counted when it went up.
            Attempt::Done if row.state == crate::catalog::State::Verified => {}
            Attempt::Done => {
                m.uploads.inc();
                m.upload_bytes.inc_by(row.stat.size);
                m.upload_seconds.observe(started.elapsed().as_secs_f64());
            }
            Attempt::Retry { class, error, .. } => {
                let class = match class {
                    Class::Transient => "transient",
                    Class::Permanent => "permanent",
                    Class::LocalFull => "local_full",
                };
                m.upload_failures
                    .get_or_create(&crate::telemetry::ClassLabel {
                        class: class.into(),
                    })
                    .inc();
                if error.starts_with("verification failed") {
                    m.verify_failures.inc();
                }
            }
            _ => {}
        }
        let settle = self.cfg.spool.settle.0;
        let k = key_str.clone();
        match outcome {
            Attempt::Done | Attempt::Superseded => {}
            Attempt::Changed(why) => {
                tracing::debug!(key = %key_str, why, "file changed; will look again");
                let next = crate::catalog::due_after(settle);
                self.write_until_done("requeue", &key_str, move |c| {
                    ops::requeue(c, &k, gen, next, None).map(|_| ())
                })
                .await;
            }
            Attempt::Wait(d) => {
                let next = crate::catalog::due_after(d);
                self.write_until_done("requeue", &key_str, move |c| {
                    ops::requeue(c, &k, gen, next, None).map(|_| ())
                })
                .await;
            }
            Attempt::ArchiveFailed { permanent, error } => {
                let class = if permanent {
                    Class::Permanent
                } else {
                    Class::Transient
                };
                m.archive_failures
                    .get_or_create(&crate::telemetry::ClassLabel {
                        class: if permanent { "permanent" } else { "transient" }.into(),
                    })
                    .inc();
                let delay = self.policy.delay(attempts, class, None);
                let next = crate::catalog::due_after(delay);
                let error = if permanent {
                    format!("{PERMANENT_ARCHIVE}{error}")
                } else {
                    error
                };
                if permanent {
                    tracing::error!(key = %key_str, error = %error, retry_in = ?delay, "cannot archive (the upload is verified; the file stays in the spool and is served from there)");
                } else {
                    tracing::warn!(key = %key_str, error = %error, retry_in = ?delay, "cannot archive yet (the upload is verified; only the move is retried)");
                }
                self.write_until_done("archive_failed", &key_str, move |c| {
                    ops::mark_archive_failed(c, &k, gen, next, &error).map(|_| ())
                })
                .await;
            }
            Attempt::Retry {
                class,
                error,
                retry_after,
            } => {
                let delay = self.policy.delay(attempts, class, retry_after);
                let next = crate::catalog::due_after(delay);
                match class {
                    Class::Permanent => {
                        tracing::error!(key = %key_str, attempts, error = %error, retry_in = ?delay, "upload failed (permanent)");
                        self.write_until_done("failed", &key_str, move |c| {
                            ops::mark_failed(c, &k, gen, next, &error).map(|_| ())
                        })
                        .await;
                    }
                    Class::Transient | Class::LocalFull => {
                        tracing::warn!(key = %key_str, attempts, error = %error, retry_in = ?delay, "upload will be retried");
                        self.write_until_done("requeue", &key_str, move |c| {
                            ops::requeue(c, &k, gen, next, Some(&error)).map(|_| ())
                        })
                        .await;
                    }
                }
            }
        }
        self.wake.notify_one();
    }

    async fn attempt(&self, row: &Row) -> Attempt {
        let key = match Key::new(&row.key, &self.cfg.s3.prefix) {
            Ok(k) => k,
            Err(e) => {
                return Attempt::Retry {
                    class: Class::Permanent,
                    error: format!("invalid key: {e}"),
                    retry_after: None,
                }
            }
        };
        // Claimed again after a failed move to the archive: S3 already holds these bytes.
        if row.state == crate::catalog::State::Verified {
            let Some(sha) = row.sha256.clone() else {
                return Attempt::Changed("verified row without a hash");
            };
            return self.archive_verified(&key, row.gen, row.stat, sha).await;
        }
        let path = key.path_in(&self.spool);
        let gen = row.gen;
        let threshold = self.cfg.s3.multipart_threshold.0;
        let configured_part = self.cfg.s3.part_size.0;

        // 0. Without a lease only quiet time says a writer is done, whoever queued the
        //    row (the watcher, `sync --once`, start-up recovery).
        if let Ok(lease::ProbeResult::Unavailable(_)) = lease::probe_path(&path) {
            let long_quiet = self
                .cfg
                .spool
                .rescan_interval
                .0
                .max(self.cfg.spool.settle.0);
            let age = std::fs::symlink_metadata(&path)
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
                .unwrap_or_default();
            if age < long_quiet {
                return Attempt::Wait(long_quiet - age);
            }
        }

        // 1. One read: SHA-256 of the whole and of each part.
        let size_now = std::fs::symlink_metadata(&path)
            .map(|m| m.len())
            .unwrap_or(0);
        let part_size = (size_now > threshold).then(|| part_size_for(size_now, configured_part));
        let p = path.clone();
        let spool = self.spool.clone();
        let hashed = tokio::task::spawn_blocking(move || hash_file(&spool, &p, part_size)).await;
        let h = match hashed {
            Ok(Ok(h)) => h,
            Ok(Err(HashError::Gone)) | Ok(Err(HashError::NotRegular)) => {
                let k = row.key.clone();
                let _ = self
                    .catalog
                    .write(move |c| ops::mark_vanished(c, &k, gen))
                    .await;
                tracing::info!(key = %key, "file left the spool before upload; marked vanished");
                return Attempt::Superseded;
            }
            Ok(Err(HashError::Changed)) => return Attempt::Changed("changed while hashing"),
            Ok(Err(HashError::Busy)) => {
                crate::telemetry::metrics().lease_busy.inc();
                return Attempt::Changed("open for writing");
            }
            Ok(Err(HashError::Io { path, source })) => {
                return Attempt::Retry {
                    class: crate::retry::classify_io(&source),
                    error: format!("reading {}: {source}", path.display()),
                    retry_after: None,
                }
            }
            Err(e) => {
                return Attempt::Retry {
                    class: Class::Transient,
                    error: format!("hash task: {e}"),
                    retry_after: None,
                }
            }
        };
        // A file that grew past the threshold between stat and hash is hashed again next time.
        if (h.stat.size > threshold) != part_size.is_some() {
            return Attempt::Changed("size crossed the multipart threshold");
        }
        // The hash is recorded with `verified`: before that, a restart hashes again anyway.
        let sha_hex = h.sha256_hex();

        // 2. PUT.
        let object_key = self.object_key(&key);
        let meta = PutMeta {
            content_type: content_type(key.as_str()),
            sha256_hex: sha_hex.clone(),
            mtime: (h.stat.mtime_ns / 1_000_000_000).to_string(),
        };
        let put = if h.parts.is_empty() {
            self.store
                .put_single(&object_key, &path, &h.stat, &h.sha256_b64(), &meta)
                .await
                .map(Some)
        } else {
            self.put_multipart(&row.key, gen, &object_key, &path, &h, &meta)
                .await
                .map(|()| None)
        };
        let reply = match put {
            Ok(r) => r,
            // The server may have stored something anyway (s3s-fs keeps rejected bodies); the
            // next attempt reads back whatever it verifies.
            Err(e) => return store_retry(e),
        };
        crate::crashpoint::hit("put");

        // 3. Verify. Any earlier failed attempt means the object may hold a body that a
        //    server rejected but kept, so later attempts read back. Otherwise the PUT's own
        //    response is the first proof asked for (single PUTs; multipart keeps the HEAD's
        //    composite check).
        let mut read_back = self.cfg.s3.verify == VerifyMode::ReadBack || row.attempts > 1;
        let mut proven = None;
        if let (Some(reply), VerifyMode::Auto, false) = (&reply, self.cfg.s3.verify, read_back) {
            match put_proof(reply, &h) {
                PutProof::Proven(by) => proven = Some((reply.etag.clone(), by)),
                PutProof::Contradicted(why) => {
                    tracing::warn!(key = %key, why, "the PUT's response contradicts our bytes; reading the object back");
                    read_back = true;
                }
                PutProof::Silent => {}
            }
        }
        let (etag, by) = match proven {
            Some(v) => v,
            None => match verify(&self.store, &object_key, &path, &h, read_back).await {
                Ok(v) => v,
                Err(e) => return verify_failed(e),
            },
        };

        crate::crashpoint::hit("verified-check");

        // 4. Still the same file? Only then does the catalog say S3 holds it.
        let now = std::fs::symlink_metadata(&path)
            .map(|m| FileStat::of(&m))
            .ok();
        // A file the application removed after upload is not a change: S3 holds what it had,
        // and archiving finds nothing to move.
        if now.is_some() && now != Some(h.stat) {
            return Attempt::Changed("changed during upload");
        }
        {
            let k = row.key.clone();
            let tag = etag.clone();
            let (st, sh) = (h.stat, sha_hex.clone());
            match self
                .catalog
                .write(move |c| {
                    if crate::crashpoint::fail_write("verified-commit") {
                        return Err(crate::crashpoint::disk_full());
                    }
                    ops::mark_verified(c, &k, gen, st, &sh, tag.as_deref())
                })
                .await
            {
                Ok(true) => {}
                Ok(false) => return Attempt::Superseded,
                Err(e) => return catalog_retry(e),
            }
        }
        crate::crashpoint::hit("verified-commit");
        tracing::info!(key = %key, size = h.stat.size, sha256 = %sha_hex, by = %by, "uploaded and verified");

        // 5. Archive.
        self.archive_verified(&key, gen, h.stat, sha_hex).await
    }

    /// Moves a verified file to the archive and records it.
    pub async fn archive_verified(
        &self,
        key: &Key,
        gen: i64,
        stat: FileStat,
        sha_hex: String,
    ) -> Attempt {
        let (spool, arch, k, settle) = (
            self.spool.clone(),
            self.archive.clone(),
            key.clone(),
            self.cfg.spool.settle.0,
        );
        let res = tokio::task::spawn_blocking(move || {
            archive::archive(&spool, &arch, &k, stat, &sha_hex, settle)
        })
        .await;
        let err = |e: String, permanent: bool| Attempt::ArchiveFailed {
            permanent,
            error: e,
        };
        match res {
            Ok(Ok(out @ (Outcome::Archived | Outcome::Missing))) => {
                if out == Outcome::Missing {
                    tracing::warn!(key = %key, "the spool file left before it was archived; S3 holds the verified bytes, the archive has no copy");
                    let (topic, msg) = (
                        format!("no-archive-copy:{}", key.as_str()),
                        "verified in S3, but the spool file was removed before it could be \
                         archived: the archive has no copy of this version"
                            .to_string(),
                    );
                    let _ = self
                        .catalog
                        .write(move |c| ops::set_notice(c, &topic, &msg))
                        .await;
                }
                let k = key.as_str().to_string();
                // The file has left the spool: only `archived` describes it now. A failed
                // write is retried here, never turned into a requeue (which would find the
                // file gone and call verified bytes vanished).
                self.write_until_done("archived", key.as_str(), move |c| {
                    if crate::crashpoint::fail_write("archived-commit") {
                        return Err(crate::crashpoint::disk_full());
                    }
                    ops::mark_archived(c, &k, gen).map(|_| ())
                })
                .await;
                crate::crashpoint::hit("archived-commit");
                tracing::info!(key = %key, "archived");
                Attempt::Done
            }
            Ok(Ok(Outcome::Changed)) => Attempt::Changed("changed before archiving"),
            Ok(Ok(Outcome::Busy)) => {
                crate::telemetry::metrics().lease_busy.inc();
                Attempt::Changed("opened for writing while it was archived")
            }
            Ok(Ok(Outcome::PutAside(p))) => {
                let (topic, msg) = (
                    format!("conflict:{}", key.as_str()),
                    format!(
                        "bytes that changed while being archived stay in the spool as {} (a \
                         new file had taken the name); they go up under that name",
                        p.display()
                    ),
                );
                let _ = self
                    .catalog
                    .write(move |c| ops::set_notice(c, &topic, &msg))
                    .await;
                Attempt::Changed("changed while it was archived")
            }
            Ok(Err(e)) => {
                let permanent = matches!(
                    e.raw_os_error(),
                    Some(libc::EACCES | libc::EPERM | libc::EROFS | libc::ENAMETOOLONG)
                );
                err(
                    format!(
                        "archiving {} to {}: {e}",
                        key.path_in(&self.spool).display(),
                        key.path_in(&self.archive).display()
                    ),
                    permanent,
                )
            }
            Err(e) => err(format!("archive task: {e}"), false),
        }
    }

    /// Runs a catalog write until it commits: an outcome that is not recorded would leave
    /// the row where no one picks it up until a restart. Backs off up to 30 s between tries.
    async fn write_until_done<F>(&self, what: &'static str, key: &str, f: F)
    where
        F: Fn(&rusqlite::Connection) -> crate::catalog::Result<()> + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        let mut attempt = 0u32;
        loop {
            let g = f.clone();
            match self.catalog.write(move |c| g(c)).await {
                Ok(()) => return,
                Err(e) => {
                    attempt += 1;
                    let delay = self
                        .policy
                        .delay(attempt, Class::Transient, None)
                        .min(Duration::from_secs(30));
                    tracing::error!(key, what, error = %e, retry_in = ?delay, "cannot record an upload outcome; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Uploads `path` as `key` and verifies it by reading it back (for `verify --repair`);
    /// the file must hash to `want_sha256`.
    pub async fn upload_copy(
        &self,
        key: &Key,
        gen: i64,
        path: &Path,
        want_sha256: &str,
    ) -> Result<(), String> {
        let size = std::fs::symlink_metadata(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        let part_size = (size > self.cfg.s3.multipart_threshold.0)
            .then(|| part_size_for(size, self.cfg.s3.part_size.0));
        let p = path.to_path_buf();
        let spool = self.spool.clone();
        let h = tokio::task::spawn_blocking(move || hash_file(&spool, &p, part_size))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if h.sha256_hex() != want_sha256 {
            return Err(format!(
                "{} has SHA-256 {}, the catalog says {want_sha256}",
                path.display(),
                h.sha256_hex()
            ));
        }
        let object_key = self.object_key(key);
        let meta = PutMeta {
            content_type: content_type(key.as_str()),
            sha256_hex: h.sha256_hex(),
            mtime: (h.stat.mtime_ns / 1_000_000_000).to_string(),
        };
        if h.parts.is_empty() {
            self.store
                .put_single(&object_key, path, &h.stat, &h.sha256_b64(), &meta)
                .await
                .map_err(|e| e.to_string())?;
        } else {
            self.put_multipart(key.as_str(), gen, &object_key, path, &h, &meta)
                .await
                .map_err(|e| e.to_string())?;
        }
        verify(&self.store, &object_key, path, &h, true)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn put_multipart(
        &self,
        key: &str,
        gen: i64,
        object_key: &str,
        path: &Path,
        h: &Hashed,
        meta: &PutMeta,
    ) -> Result<(), StoreError> {
        let upload_id = self.store.create_multipart(object_key, meta).await?;
        {
            let (k, id) = (key.to_string(), upload_id.clone());
            if let Err(e) = self
                .catalog
                .write(move |c| ops::set_upload_id(c, &k, gen, Some(&id)))
                .await
            {
                let _ = self.store.abort_multipart(object_key, &upload_id).await;
                return Err(StoreError {
                    op: "catalog",
                    key: key.to_string(),
                    class: if e.is_full() {
                        Class::LocalFull
                    } else {
                        Class::Transient
                    },
                    code: None,
                    status: None,
                    message: e.to_string(),
                    retry_after: None,
                });
            }
        }
        let specs: Vec<PartSpec> = h
            .parts
            .iter()
            .enumerate()
            .map(|(i, (off, len, d))| PartSpec {
                number: i as i32 + 1,
                offset: *off,
                len: *len,
                sha256_b64: B64.encode(d),
            })
            .collect();
        // Built eagerly: a closure in the stream type would make the future not Send.
        let futs: Vec<_> = specs
            .iter()
            .map(|p| {
                self.store
                    .upload_part(object_key, &upload_id, path, &h.stat, p)
            })
            .collect();
        let results: Vec<Result<_, StoreError>> = futures_util::stream::iter(futs)
            .buffered(PART_CONCURRENCY)
            .collect()
            .await;
        let mut parts = Vec::with_capacity(results.len());
        let mut first_err = None;
        for r in results {
            match r {
                Ok(p) => parts.push(p),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let res = match first_err {
            Some(e) => Err(e),
            None => self
                .store
                .complete_multipart(object_key, &upload_id, parts)
                .await
                .map(|_| ()),
        };
        if res.is_err() {
            if let Err(e) = self.store.abort_multipart(object_key, &upload_id).await {
                tracing::warn!(key, error = %e, "could not abort multipart upload; aborted at next start");
                return res;
            }
        }
        let (k, id) = (key.to_string(), upload_id.clone());
        let _ = self
            .catalog
            .write(move |c| ops::clear_upload_id(c, &k, &id))
            .await;
        res
    }
}

/// What a failed verification means for the row.
fn verify_failed(e: VerifyError) -> Attempt {
    match e {
        VerifyError::Mismatch(m) => Attempt::Retry {
            class: Class::Transient,
            error: format!("verification failed: {m}"),
            retry_after: None,
        },
        // Not found right after a PUT that succeeded: a store that is not yet
        // read-after-write consistent (or a proxy's stale view). Transient, and soon; a
        // 404 is otherwise permanent (retried only at `retry.max_interval`).
        VerifyError::Store(e) if e.is_not_found() => Attempt::Retry {
            class: Class::Transient,
            error: format!("verification failed: S3 does not show the object yet: {e}"),
            retry_after: None,
        },
        VerifyError::Store(e) => store_retry(e),
        VerifyError::Hash(HashError::Changed) => Attempt::Changed("changed during verification"),
        VerifyError::Hash(e) => Attempt::Retry {
            class: Class::Transient,
            error: e.to_string(),
            retry_after: None,
        },
    }
}

/// How long the scheduler sleeps when it looked for work: until the next row is due, but
/// not at all in a loop when a due row could not be claimed (its key is in flight, a
/// re-drop, or every permit is taken): a finishing upload wakes it then.
fn scheduler_wait(next_due: Option<i64>, now: i64, claimed: usize) -> Duration {
    let ms = match next_due {
        Some(t) if t > now => (t - now).clamp(10, 1000),
        Some(_) if claimed == 0 => 1000,
        Some(_) => 10,
        None => 1000,
    };
    Duration::from_millis(ms as u64)
}

fn store_retry(e: StoreError) -> Attempt {
    Attempt::Retry {
        class: e.class,
        retry_after: e.retry_after,
        error: e.to_string(),
    }
}

fn catalog_retry(e: crate::catalog::CatalogError) -> Attempt {
    Attempt::Retry {
        class: if e.is_full() {
            Class::LocalFull
        } else {
            Class::Transient
        },
        error: if e.is_full() {
            format!("catalog disk full, file kept in the spool: {e}")
        } else {
            e.to_string()
        },
        retry_after: None,
    }
}

/// The scheduler: claims due rows up to `s3.concurrency` and runs them as tasks.
pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let concurrency = ctx.cfg.s3.concurrency;
    let sem = Arc::new(Semaphore::new(concurrency));
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let tracker = TaskTracker::new();
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let free = sem.available_permits();
        let mut claimed = 0;
        if free > 0 {
            let busy: HashSet<String> = in_flight.lock().map(|s| s.clone()).unwrap_or_default();
            let rows = ctx
                .catalog
                .write(move |c| ops::claim_due(c, now_ms(), free, &busy))
                .await;
            match rows {
                Ok(rows) => {
                    claimed = rows.len();
                    for row in rows {
                        let Ok(permit) = sem.clone().acquire_owned().await else {
                            break;
                        };
                        if let Ok(mut s) = in_flight.lock() {
                            s.insert(row.key.clone());
                        }
                        let ctx = ctx.clone();
                        let in_flight = in_flight.clone();
                        tracker.spawn(async move {
                            let key = row.key.clone();
                            ctx.process(row).await;
                            if let Ok(mut s) = in_flight.lock() {
                                s.remove(&key);
                            }
                            drop(permit);
                        });
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "catalog: cannot claim work");
                }
            }
        }
        if claimed > 0 && sem.available_permits() > 0 {
            continue;
        }
        // Sleep until something is due, a file arrives, an upload finishes, or shutdown.
        let next = ctx.catalog.read(ops::next_due).await.ok().flatten();
        let wait = scheduler_wait(next, now_ms(), claimed);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ctx.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
    // Stop taking work; let uploads in flight finish within the deadline.
    tracker.close();
    let n = tracker.len();
    if n > 0 {
        tracing::info!(in_flight = n, "waiting for uploads in flight");
    }
    if tokio::time::timeout(SHUTDOWN_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("uploads did not finish within the deadline; they restart next time");
    }
    Ok(())
}

/// How long shutdown waits for uploads in flight.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    /// DESIGN "Verification", step 1, case by case.
    #[test]
    fn the_put_response_proves_contradicts_or_says_nothing() {
        use crate::store::PutReply;
        let body = b"the bytes we sent";
        let h = Hashed {
            stat: FileStat {
                size: body.len() as u64,
                mtime_ns: 0,
                ctime_ns: 0,
                inode: 1,
            },
            sha256: Sha256::digest(body).into(),
            md5: Some(Md5::digest(body).into()),
            parts: Vec::new(),
            no_lease: None,
        };
        let ours_md5 = format!("\"{}\"", hex::encode(Md5::digest(body)));
        let other_md5 = format!("\"{}\"", hex::encode(Md5::digest(b"other")));
        let echo = Some(h.sha256_b64());
        let reply = |etag: Option<&str>, sha: Option<String>, kms: bool| PutReply {
            etag: etag.map(str::to_string),
            checksum_sha256: sha,
            encrypted_by_key: kms,
        };
        use PutProof::*;
        let cases = [
            (reply(Some(&ours_md5), echo.clone(), false), "sha256"),
            // An echo with nothing the server computed itself is no proof: HEAD.
            (reply(None, echo.clone(), false), "silent"),
            (reply(Some("\"not-an-md5\""), echo.clone(), false), "silent"),
            (reply(None, echo.clone(), true), "silent"),
            // A server-computed MD5 that differs overrules an echoed checksum.
            (reply(Some(&other_md5), echo.clone(), false), "contradicted"),
            (
                reply(Some(&ours_md5), Some(B64.encode([0u8; 32])), false),
                "contradicted",
            ),
            (reply(Some(&ours_md5), None, false), "md5"),
            (reply(Some(&other_md5), None, false), "contradicted"),
            // SSE-KMS / SSE-C ETags are not MD5s: neither proof nor contradiction.
            (reply(Some(&other_md5), None, true), "silent"),
            (reply(Some(&other_md5), echo.clone(), true), "sha256"),
            // A multipart-shaped or odd ETag is no MD5 either.
            (
                reply(Some("\"0123456789abcdef0123456789abcdef-2\""), None, false),
                "silent",
            ),
            (reply(Some("\"not-hex\""), None, false), "silent"),
            (reply(None, None, false), "silent"),
        ];
        for (r, want) in cases {
            let got = match put_proof(&r, &h) {
                Proven(VerifiedBy::PutSha256) => "sha256",
                Proven(VerifiedBy::PutMd5) => "md5",
                Proven(other) => panic!("{other:?}"),
                Contradicted(_) => "contradicted",
                Silent => "silent",
            };
            assert_eq!(got, want, "{r:?}");
        }
        // Without our MD5 (never the case for a single PUT) an ETag proves nothing.
        let no_md5 = Hashed {
            md5: None,
            ..h.clone()
        };
        assert_eq!(
            put_proof(&reply(Some(&ours_md5), None, false), &no_md5),
            Silent
        );
    }

    /// A due row the scheduler could not claim (its key in flight: a re-drop) makes it wait
    /// for a wake-up, not poll every 10 ms.
    #[test]
    fn the_scheduler_does_not_spin_on_a_row_it_cannot_claim() {
        let now = 1_000_000;
        assert_eq!(
            scheduler_wait(Some(now - 5), now, 0),
            Duration::from_secs(1)
        );
        assert_eq!(
            scheduler_wait(Some(now - 5), now, 3),
            Duration::from_millis(10)
        );
        assert_eq!(
            scheduler_wait(Some(now + 300), now, 0),
            Duration::from_millis(300)
        );
        assert_eq!(scheduler_wait(None, now, 0), Duration::from_secs(1));
    }

    /// A 404 on the HEAD right after a successful PUT is transient and retried soon: a
    /// 404 is otherwise permanent and would wait `retry.max_interval`.
    #[test]
    fn not_found_after_a_put_is_transient() {
        let e = StoreError {
            op: "head",
            key: "k".into(),
            class: Class::Permanent,
            code: Some("NotFound".into()),
            status: Some(404),
            message: "not found (HTTP 404)".into(),
            retry_after: None,
        };
        match verify_failed(VerifyError::Store(e)) {
            Attempt::Retry { class, error, .. } => {
                assert_eq!(class, Class::Transient, "{error}");
            }
            _ => panic!("not a retry"),
        }
    }

    #[test]
    fn part_size_grows_to_fit_10000_parts() {
        let mib = 1u64 << 20;
        assert_eq!(part_size_for(100 * mib, 16 * mib), 16 * mib);
        assert_eq!(part_size_for(10_000 * 16 * mib, 16 * mib), 16 * mib);
        let big = 10_000 * 16 * mib + 1;
        let ps = part_size_for(big, 16 * mib);
        assert_eq!(ps, 17 * mib);
        assert!(big.div_ceil(ps) <= 10_000);
    }

    #[test]
    fn hashing_parts_matches_whole() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        let data: Vec<u8> = (0..(5u32 << 20) + 123).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let h = hash_file(t.path(), &p, Some(2 << 20)).unwrap();
        assert_eq!(h.sha256_hex(), hex::encode(Sha256::digest(&data)));
        assert_eq!(h.parts.len(), 3);
        assert_eq!(h.parts[2].1, (1 << 20) + 123);
        let d: [u8; 32] = Sha256::digest(&data[(4 << 20)..]).into();
        assert_eq!(h.parts[2].2, d);
        let whole = hash_file(t.path(), &p, None).unwrap();
        assert!(whole.parts.is_empty());
        assert_eq!(whole.sha256, h.sha256);
        let (md5_full, multi) = md5s(&p, &h).unwrap();
        assert_eq!(md5_full, hex::encode(Md5::digest(&data)));
        assert!(multi.unwrap().ends_with("-3"));
    }

    #[test]
    fn empty_file_hashes_with_one_empty_part() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("e");
        std::fs::write(&p, b"").unwrap();
        let h = hash_file(t.path(), &p, None).unwrap();
        assert_eq!(h.stat.size, 0);
        assert_eq!(h.sha256_hex(), hex::encode(Sha256::digest(b"")));
    }

    #[test]
    fn symlinks_are_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("secret");
        std::fs::write(&target, b"x").unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            hash_file(t.path(), &link, None),
            Err(HashError::NotRegular)
        ));
    }

    /// A spool folder swapped for a symlink after the scan listed its file (the web
    /// application can write the spool): the uploader must not hash, and so never upload or
    /// archive, the file the link leads to outside the spool. It did, until the open was
    /// confined beneath the spool root; the root itself may be a symlink.
    #[test]
    fn a_folder_swapped_for_a_symlink_is_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let spool = t.path().join("spool");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(spool.join("2026")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("a.jpg"), b"not the spool's").unwrap();
        std::fs::write(spool.join("2026/a.jpg"), b"the spool's").unwrap();
        let listed = spool.join("2026/a.jpg");
        assert!(hash_file(&spool, &listed, None).is_ok());
        std::fs::rename(spool.join("2026"), t.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(&outside, spool.join("2026")).unwrap();
        assert!(matches!(
            hash_file(&spool, &listed, None),
            Err(HashError::NotRegular)
        ));
        // A symlinked spool root is the operator's choice and is followed.
        let root_link = t.path().join("spool-link");
        std::os::unix::fs::symlink(t.path().join("moved"), &root_link).unwrap();
        std::fs::create_dir_all(t.path().join("moved/2026")).unwrap();
        std::fs::rename(
            t.path().join("moved/a.jpg"),
            t.path().join("moved/2026/a.jpg"),
        )
        .unwrap();
        let h = hash_file(&root_link, &root_link.join("2026/a.jpg"), None).unwrap();
        assert_eq!(h.sha256_hex(), hex::encode(Sha256::digest(b"the spool's")));
    }

    /// Installs, on this thread only, a seccomp filter that answers openat2 with EPERM, as
    /// systemd's SystemCallErrorNumber=EPERM (ferry.service) does for a call outside its
    /// list, or Docker before 20.10.
    fn deny_openat2_with_eperm() {
        let filter: [libc::sock_filter; 4] = [
            libc::sock_filter {
                code: 0x20,
                jt: 0,
                jf: 0,
                k: 0,
            }, // ld [nr]
            libc::sock_filter {
                code: 0x15,
                jt: 0,
                jf: 1,
                k: libc::SYS_openat2 as u32,
            },
            libc::sock_filter {
                code: 0x06,
                jt: 0,
                jf: 0,
                k: 0x0005_0000 | libc::EPERM as u32,
            },
            libc::sock_filter {
                code: 0x06,
                jt: 0,
                jf: 0,
                k: 0x7fff_0000,
            },
        ];
        let prog = libc::sock_fprog {
            len: 4,
            filter: filter.as_ptr() as *mut _,
        };
        // SAFETY: prctl with a live filter program.
        unsafe {
            assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
            assert_eq!(libc::prctl(libc::PR_SET_SECCOMP, 2, &prog as *const _), 0);
        }
    }

    /// Where a seccomp filter answers openat2 with EPERM instead of ENOSYS, the confined open
    /// takes the walk. (It did not, and every hash failed with EPERM, a permanent error:
    /// every file `failed`.)
    #[test]
    fn openat2_denied_with_eperm_still_hashes() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("d")).unwrap();
        let p = t.path().join("d/a.jpg");
        std::fs::write(&p, b"bytes").unwrap();
        let root = t.path().to_path_buf();
        let r = std::thread::spawn(move || {
            deny_openat2_with_eperm();
            hash_file(&root, &p, None).map(|h| h.sha256_hex())
        })
        .join()
        .unwrap();
        assert!(r.is_ok(), "{r:?}");
    }
}
