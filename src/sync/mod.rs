//! The sync daemon: start-up recovery, the watcher feeding the catalog, the uploader pool,
//! and `sync --once`.

pub mod archive;
pub mod dirsync;
pub mod reconcile;
pub mod upload;
pub mod watch;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::catalog::{ops, Catalog, FileStat, Noted, State};
use crate::config::Config;
use crate::key::{IgnoreSet, Key};
use crate::lease;
use crate::retry::Policy;
use crate::store::Store;
use upload::Ctx;

/// Builds what the uploader needs and creates the spool and archive folders.
pub fn context(cfg: Arc<Config>, catalog: Catalog, store: Store) -> anyhow::Result<Arc<Ctx>> {
    // Absolute paths: inotify reports absolute event paths, and a relative spool (the
    // embedded default `var/spool`) would match none of them.
    let absolute = |what: &str, dir: &std::path::Path| -> anyhow::Result<std::path::PathBuf> {
        std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::canonicalize(dir))
            .map_err(|e| anyhow::anyhow!("{what} {}: {e}", dir.display()))
    };
    let spool = absolute("spool.dir", &cfg.spool.dir)?;
    let archive = absolute("archive.dir", &cfg.archive.dir)?;
    // An archive inside the spool would be uploaded again (and a spool inside the archive
    // would be archived into itself).
    if archive.starts_with(&spool) || spool.starts_with(&archive) {
        anyhow::bail!(
            "archive.dir {} and spool.dir {} overlap; the archive must be outside the spool \
             (and the spool outside the archive)",
            archive.display(),
            spool.display()
        );
    }
    Ok(Arc::new(Ctx {
        policy: Policy::new(&cfg.retry),
        spool,
        archive,
        cfg,
        catalog,
        store,
        wake: Arc::new(Notify::new()),
    }))
}

/// Start-up repair (DESIGN.md "The one rule"): nothing is in flight yet, so every row is
/// brought back to a state the uploader can continue from.
pub async fn recover(ctx: &Ctx) -> anyhow::Result<()> {
    let n = ctx.catalog.write(ops::reset_uploading).await?;
    if n > 0 {
        tracing::info!(rows = n, "uploads interrupted by a stop are queued again");
    }
    // Verified but not archived: archive only if the spool file is still the verified one
    // (the archive step checks; a changed file is queued again, a failed move becomes
    // `archive_failed`). Never requeued for a failed catalog write: a file already moved
    // would then look vanished.
    let verified = ctx
        .catalog
        .read(|c| ops::rows_in(c, &[State::Verified]))
        .await?;
    for row in verified {
        if Key::new(&row.key, &ctx.cfg.s3.prefix).is_err() || row.sha256.is_none() {
            continue;
        }
        ctx.process(row).await;
    }
    // Temp copies a crash left on the archive side.
    let archive = ctx.archive.clone();
    tokio::task::spawn_blocking(move || {
        let n = archive::remove_stale_temps(&archive);
        if n > 0 {
            tracing::info!(removed = n, archive = %archive.display(), "removed temp copies left by a crash");
        }
    });
    // Queued or failed rows whose file is gone have nothing left to do, unless the file
    // is at a reserved name: a crash between ferry's check and its rename can carry a file
    // that had just taken the spool name there. Such files get their names back first.
    let waiting = ctx
        .catalog
        .read(|c| ops::rows_in(c, &[State::Queued, State::Failed]))
        .await?;
    let mut by_dir: HashMap<std::path::PathBuf, HashMap<u64, std::path::PathBuf>> = HashMap::new();
    for row in &waiting {
        let Ok(key) = Key::new(&row.key, &ctx.cfg.s3.prefix) else {
            continue;
        };
        let path = key.path_in(&ctx.spool);
        if path.symlink_metadata().is_err() {
            if let Some(dir) = path.parent() {
                by_dir
                    .entry(dir.to_path_buf())
                    .or_default()
                    .insert(row.stat.inode, path.clone());
            }
        }
    }
    for (dir, names) in &by_dir {
        for p in archive::return_foreign_reserved(dir, names) {
            tracing::warn!(path = %p.display(), "a file carried to a reserved name by a crash got a spool name back");
        }
    }
    for row in waiting {
        let Ok(key) = Key::new(&row.key, &ctx.cfg.s3.prefix) else {
            continue;
        };
        if key.path_in(&ctx.spool).symlink_metadata().is_err() {
            let (k, gen) = (row.key.clone(), row.gen);
            ctx.catalog
                .write(move |c| ops::mark_vanished(c, &k, gen))
                .await?;
            tracing::info!(key = %row.key, "queued file left the spool; marked vanished");
        }
    }
    abort_orphans(ctx).await;
    Ok(())
}

/// Aborts multipart uploads that a stopped ferry began and never completed: those recorded
/// in the catalog, and any other in progress under the prefix for a key the catalog knows.
async fn abort_orphans(ctx: &Ctx) {
    let recorded = ctx
        .catalog
        .read(|c| {
            let mut stmt =
                c.prepare("SELECT key, upload_id FROM files WHERE upload_id IS NOT NULL")?;
            let v = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(v)
        })
        .await
        .unwrap_or_default();
    let mut todo: HashMap<String, (String, String)> = HashMap::new();
    for (key, id) in recorded {
        todo.insert(id.clone(), (key, id));
    }
    match ctx.store.list_multipart().await {
        Ok(list) => {
            for (obj, id) in list {
                let Some(key) = obj.strip_prefix(&ctx.cfg.s3.prefix) else {
                    continue;
                };
                let k = key.to_string();
                let known = ctx
                    .catalog
                    .read(move |c| ops::get(c, &k))
                    .await
                    .ok()
                    .flatten()
                    .is_some();
                if known {
                    todo.insert(id.clone(), (key.to_string(), id));
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "cannot list multipart uploads"),
    }
    for (_, (key, id)) in todo {
        let obj = format!("{}{}", ctx.cfg.s3.prefix, key);
        match ctx.store.abort_multipart(&obj, &id).await {
            Ok(()) => {
                tracing::info!(key = %key, upload_id = %id, "aborted an unfinished multipart upload")
            }
            Err(e) if e.is_not_found() || e.code.as_deref() == Some("NoSuchUpload") => {}
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "cannot abort an unfinished multipart upload");
                continue;
            }
        }
        let _ = ctx
            .catalog
            .write(move |c| ops::clear_upload_id(c, &key, &id))
            .await;
    }
}

/// The long-running sync: watcher + uploader until shutdown.
pub async fn run(
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
    started: Option<tokio::sync::oneshot::Sender<()>>,
) -> anyhow::Result<()> {
    recover(&ctx).await?;
    let watcher = watch::Watcher {
        spool: ctx.spool.clone(),
        prefix: ctx.cfg.s3.prefix.clone(),
        settle: ctx.cfg.spool.settle.0,
        rescan_interval: ctx.cfg.spool.rescan_interval.0,
        ignore: IgnoreSet::new(&ctx.cfg.spool.ignore)?,
        catalog: ctx.catalog.clone(),
        wake: ctx.wake.clone(),
        started,
        poll_only: false,
    };
    let w = tokio::spawn(watcher.run(shutdown.clone()));
    let u = tokio::spawn(upload::run(ctx.clone(), shutdown.clone()));
    if let Some(retain) = ctx.cfg.archive_retain() {
        tokio::spawn(retention(ctx.clone(), retain, shutdown.clone()));
    }
    // Either task failing is fatal (a daemon that only uploads would miss new files, one
    // that only watches would upload nothing); otherwise both run until shutdown.
    tokio::pin!(w, u);
    tokio::select! {
        r = &mut w => {
            r??;
            u.await??;
        }
        r = &mut u => {
            r??;
            w.await??;
        }
    }
    Ok(())
}

/// Applies `archive.retain` now and then: at start, then every tenth of the retention
/// (between a second and an hour).
async fn retention(ctx: Arc<Ctx>, retain: Duration, shutdown: CancellationToken) {
    let every = (retain / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    loop {
        match reconcile::prune_archive(&ctx, retain).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "archive retention pass"),
            Err(e) => tracing::warn!(error = %e, "archive retention pass failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The end of `sync --once`.
#[derive(Debug, Default)]
pub struct OnceReport {
    pub total: usize,
    pub archived: usize,
    pub vanished: usize,
    /// (key, state, last error) for what is left.
    pub left: Vec<(String, String, String)>,
    pub permanent: bool,
    pub timed_out: bool,
    /// Bytes of the files to upload, and of those archived.
    pub bytes_total: u64,
    pub bytes_archived: u64,
    /// Failed attempts (upload or archive) that were tried again.
    pub retries: u64,
}

/// Failed attempts in this process that are tried again (transient or disk-full), from the
/// same counters as /metrics.
fn retries_so_far() -> u64 {
    let m = crate::telemetry::metrics();
    let class = |c: &str| crate::telemetry::ClassLabel {
        class: c.to_string(),
    };
    // One statement per lookup: a Family's guard lives to the end of the statement, and a
    // second get_or_create on the same Family (a write lock for a new label) would wait on
    // it forever.
    let transient = m.upload_failures.get_or_create(&class("transient")).get();
    let full = m.upload_failures.get_or_create(&class("local_full")).get();
    let archive = m.archive_failures.get_or_create(&class("transient")).get();
    transient + full + archive
}

/// Uploads what is in the spool now and returns when all of it is archived, a permanent error
/// stops a file, or `timeout` passes.
pub async fn run_once(
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
    timeout: Duration,
    progress: &crate::progress::Progress,
) -> anyhow::Result<OnceReport> {
    let retries_before = retries_so_far();
    recover(&ctx).await?;
    let ignore = IgnoreSet::new(&ctx.cfg.spool.ignore)?;
    let (spool, settle) = (ctx.spool.clone(), ctx.cfg.spool.settle.0);
    let long_quiet = ctx.cfg.spool.rescan_interval.0.max(settle);
    let deadline = timeout.min(Duration::from_secs(60));
    let Stable {
        ready: found,
        unfinished,
        no_lease,
    } = tokio::task::spawn_blocking(move || {
        stable_files(&spool, &ignore, settle, long_quiet, deadline)
    })
    .await?;
    if let Some((rel, u)) = no_lease {
        let topic = format!("lease:{}", u.errno);
        let msg = format!(
            "{} (first seen on {}): `sync --once` waited for {} of quiet instead \
             (max(spool.rescan_interval, spool.settle))",
            u.reason,
            rel.display(),
            humantime::format_duration(long_quiet)
        );
        let _ = ctx
            .catalog
            .write(move |c| ops::set_notice(c, &topic, &msg))
            .await;
    }
    let prefix = ctx.cfg.s3.prefix.clone();
    let (keys, bytes_total): (Vec<String>, u64) = ctx
        .catalog
        .write(move |c| {
            let mut keys = Vec::new();
            let mut bytes = 0u64;
            for (rel, st) in found {
                match Key::from_rel_path(&rel, &prefix) {
                    Ok(key) => {
                        let _: Noted = ops::note_ready(c, &key, st)?;
                        // Asked to upload now: a file waiting out a permanent error's
                        // interval is tried at once, and only a new failure stops the run.
                        ops::retry_now(c, key.as_str())?;
                        keys.push(key.as_str().to_string());
                        bytes += st.size;
                    }
                    Err(e) => {
                        let name = rel.to_string_lossy().into_owned();
                        if ops::note_refused(c, &name, &e.to_string())? {
                            tracing::warn!(name = %name, reason = %e, "spool name is not a valid key; left in place");
                        }
                    }
                }
            }
            Ok((keys, bytes))
        })
        .await?;
    // Rows left `verified` or `queued` by an earlier run count too.
    progress.update(|c| {
        c.files_total = keys.len() as u64;
        c.bytes_total = bytes_total;
    });
    let stop = CancellationToken::new();
    let uploader = tokio::spawn(upload::run(ctx.clone(), stop.clone()));
    ctx.wake.notify_one();
    let started = Instant::now();
    let mut report = OnceReport {
        total: keys.len() + unfinished.len(),
        bytes_total,
        ..Default::default()
    };
    // Rows archived (or gone) are final; only the others are looked at again.
    let mut finished: Vec<crate::catalog::Row> = Vec::new();
    let mut open_keys = keys.clone();
    loop {
        let ks = std::mem::take(&mut open_keys);
        let fresh = ctx
            .catalog
            .read(move |c| {
                let mut v = Vec::with_capacity(ks.len());
                for k in &ks {
                    if let Some(r) = ops::get(c, k)? {
                        v.push(r);
                    }
                }
                Ok(v)
            })
            .await?;
        let (done_now, open_now): (Vec<_>, Vec<_>) = fresh
            .into_iter()
            .partition(|r| matches!(r.state, State::Archived | State::Vanished | State::Deleted));
        finished.extend(done_now);
        open_keys = open_now.iter().map(|r| r.key.clone()).collect();
        let rows: Vec<&crate::catalog::Row> = finished.iter().chain(open_now.iter()).collect();
        let archived = rows.iter().filter(|r| r.state == State::Archived).count();
        let vanished = rows
            .iter()
            .filter(|r| matches!(r.state, State::Vanished | State::Deleted))
            .count();
        let failed = rows
            .iter()
            .filter(|r| {
                r.state == State::Failed
                    || (r.state == State::ArchiveFailed
                        && r.last_error
                            .as_deref()
                            .is_some_and(|e| e.starts_with(upload::PERMANENT_ARCHIVE)))
            })
            .count();
        let bytes_archived: u64 = rows
            .iter()
            .filter(|r| r.state == State::Archived)
            .map(|r| r.stat.size)
            .sum();
        let retries = retries_so_far().saturating_sub(retries_before);
        progress.update(|c| {
            c.files_done = (archived + vanished) as u64;
            c.bytes_done = bytes_archived;
            c.retries = retries;
            c.failures = failed as u64;
        });
        let done = archived + vanished == keys.len() && unfinished.is_empty();
        let timed_out = started.elapsed() >= timeout;
        if done || failed > 0 || timed_out || shutdown.is_cancelled() {
            report.archived = archived;
            report.vanished = vanished;
            report.bytes_archived = bytes_archived;
            report.retries = retries;
            report.permanent = failed > 0;
            report.timed_out = !done && (timed_out || !unfinished.is_empty());
            report.left = rows
                .iter()
                .filter(|r| !matches!(r.state, State::Archived | State::Vanished | State::Deleted))
                .map(|r| {
                    (
                        r.key.clone(),
                        r.state.as_str().to_string(),
                        r.last_error.clone().unwrap_or_default(),
                    )
                })
                .collect();
            // Still written to (or not quiet long enough) when the run had to decide:
            // never queued, so never uploaded half-written.
            report.left.extend(unfinished.iter().map(|(rel, why)| {
                (
                    rel.to_string_lossy().into_owned(),
                    "not ready".to_string(),
                    why.to_string(),
                )
            }));
            break;
        }
        // Few rows left: look often (each look reads only the open rows), so the run ends
        // soon after its last file, not up to a whole interval later.
        let pause = if open_keys.len() <= 64 { 10 } else { 100 };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(pause)) => {}
        }
    }
    stop.cancel();
    uploader.await??;
    Ok(report)
}

/// What `sync --once` found in the spool.
struct Stable {
    /// Finished files: nobody writes them and they were quiet long enough.
    ready: Vec<(std::path::PathBuf, FileStat)>,
    /// Files still being written when the wait ran out, with the reason.
    unfinished: Vec<(std::path::PathBuf, &'static str)>,
    /// The first file that could not be leased, and why.
    no_lease: Option<(std::path::PathBuf, lease::Unavailable)>,
}

/// The spool's files now, each once nobody writes it (a read lease can be had) and it has
/// been unchanged for `settle` (the long quiet time where no lease can be had). Files still
/// being written are waited for, up to `deadline`; after that they are reported as not
/// ready and never queued.
fn stable_files(
    spool: &Path,
    ignore: &IgnoreSet,
    settle: Duration,
    long_quiet: Duration,
    deadline: Duration,
) -> Stable {
    let first = watch::scan(spool, ignore);
    let deadline = Instant::now() + deadline;
    let mut out = Stable {
        ready: Vec::with_capacity(first.files.len()),
        unfinished: Vec::new(),
        no_lease: None,
    };
    // (path, stat, no lease to be had, why not yet)
    let mut unsure: Vec<_> = first
        .files
        .into_iter()
        .map(|(r, s)| (r, s, false, "not quiet yet"))
        .collect();
    loop {
        let now = std::time::SystemTime::now();
        let mut still = Vec::new();
        for (rel, st, no_lease, _) in unsure {
            let path = spool.join(&rel);
            let cur = match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_file() => FileStat::of(&m),
                _ => continue,
            };
            if cur != st {
                still.push((rel, cur, no_lease, "still changing"));
                continue;
            }
            let age = now
                .duration_since(
                    std::time::UNIX_EPOCH + Duration::from_nanos(cur.mtime_ns.max(0) as u64),
                )
                .unwrap_or_default();
            let need = if no_lease { long_quiet } else { settle };
            if age < need {
                still.push((rel, cur, no_lease, "not quiet long enough"));
                continue;
            }
            match lease::probe_path(&path) {
                Ok(lease::ProbeResult::Free) => out.ready.push((rel, cur)),
                Ok(lease::ProbeResult::Unavailable(u)) => {
                    if !no_lease {
                        crate::telemetry::metrics().lease_fallbacks.inc();
                    }
                    if lease::warn_once(u.errno) {
                        tracing::warn!(path = %rel.display(), reason = %u.reason, "no read lease on a spool file; waiting for the long quiet time instead");
                    }
                    if out.no_lease.is_none() {
                        out.no_lease = Some((rel.clone(), u));
                    }
                    if age >= long_quiet {
                        out.ready.push((rel, cur));
                    } else {
                        still.push((rel, cur, true, "not quiet long enough (no lease)"));
                    }
                }
                Ok(lease::ProbeResult::Busy) | Err(_) => {
                    still.push((rel, cur, no_lease, "open for writing"))
                }
            }
        }
        unsure = still;
        if unsure.is_empty() || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(settle.clamp(Duration::from_millis(50), Duration::from_secs(1)));
    }
    out.unfinished = unsure.into_iter().map(|(r, _, _, why)| (r, why)).collect();
    out
}
