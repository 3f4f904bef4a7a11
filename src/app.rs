//! Wiring: open the catalog, build the store, run the subsystems as named tasks, and shut
//! them down in order. Also the one-shot subcommands (status, check-config, delete).

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;

use crate::catalog::{now_ms, ops, Catalog, Status};
use crate::config::Config;
use crate::key::Key;
use crate::store::Store;
use crate::{serve, sync};

/// Opens the catalog (off the executor) and builds the S3 client.
pub async fn open(cfg: &Config) -> anyhow::Result<(Catalog, Store)> {
    let path = cfg.catalog.path.clone();
    let catalog = tokio::task::spawn_blocking(move || Catalog::open(&path))
        .await?
        .with_context(|| format!("catalog.path {}", cfg.catalog.path.display()))?;
    let store = Store::new(cfg).await;
    Ok((catalog, store))
}

/// One syncing process per catalog: a second one would upload the same files twice.
fn lock_sync(catalog_path: &Path) -> anyhow::Result<File> {
    let mut p = catalog_path.as_os_str().to_owned();
    p.push(".lock");
    let f = File::create(&p).with_context(|| format!("lock file {}", Path::new(&p).display()))?;
    // SAFETY: flock on a valid, owned fd.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!(
                "another ferry is already syncing with catalog {} (lock {} is held)",
                catalog_path.display(),
                Path::new(&p).display()
            );
        }
        bail!("cannot lock {}: {e}", Path::new(&p).display());
    }
    Ok(f)
}

/// Cancels `token` on SIGTERM or SIGINT.
fn on_signals(token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        crate::telemetry::notify_stopping();
        token.cancel();
    });
    Ok(())
}

/// `ferry run` (both), `ferry sync` (sync only) or `ferry serve` (serve only).
pub async fn run(cfg: Config, with_sync: bool, with_serve: bool) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let shutdown = CancellationToken::new();
    on_signals(shutdown.clone())?;
    let (catalog, store) = open(&cfg).await?;
    let _lock = if with_sync {
        Some(lock_sync(&cfg.catalog.path)?)
    } else {
        None
    };

    let shared = if cfg.catalog.shared.is_empty() {
        // A node that left its cluster keeps no outbox for a database it no longer uses.
        if with_sync {
            catalog.write(|c| ops::outbox_enable(c, false)).await?;
        }
        None
    } else {
        Some(crate::shared::Shared::new(
            &cfg.catalog.shared,
            cfg.node_name(),
        )?)
    };
    let mut bound = None;
    let mut tasks = tokio::task::JoinSet::new();
    let serve_failure = Arc::new(std::sync::Mutex::new(None::<anyhow::Error>));
    if with_serve {
        serve::raise_fd_limit();
        let resolver =
            serve::resolver(cfg.clone(), catalog.clone(), store.clone(), shared.clone())?;
        let (listener, addr) = serve::bind(&cfg).await?;
        bound = Some(addr);
        tasks.spawn(resolver.meta.clone().watch(shutdown.clone()));
        if let Some(sh) = &shared {
            let (m1, m2) = (resolver.meta.clone(), resolver.meta.clone());
            let rt = tokio::runtime::Handle::current();
            tasks.spawn(sh.clone().listen(
                move |key| {
                    let m = m1.clone();
                    rt.spawn(async move { m.forget(&key).await });
                },
                move || m2.forget_all(),
                shutdown.clone(),
            ));
        }
        let s = shutdown.clone();
        let failed = serve_failure.clone();
        tasks.spawn(async move {
            if let Err(e) = serve::serve(resolver, listener, s.clone()).await {
                tracing::error!(error = %e, "http server stopped");
                // The process stops with an error (systemd restarts it on failure) rather
                // than syncing on with nothing serving, or exiting 0.
                *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                s.cancel();
            }
        });
        tracing::info!(%addr, mount = %cfg.http.mount, "http listening");
        // Tests and scripts read the bound address (port 0) from this line.
        println!("ferry: http listening on {addr}");
    }
    if let (Some(sh), true) = (&shared, with_sync) {
        let url = crate::shared::advertise_url(&cfg, bound);
        if cfg.http.advertise_url.is_empty() && bound.is_some_and(|a| a.ip().is_unspecified()) {
            tracing::warn!(%url, "http.listen is a wildcard address: set http.advertise_url so other nodes can reach this one");
        }
        tasks.spawn(sh.clone().publish(catalog.clone(), url, shutdown.clone()));
    }
    let mut sync_task = if with_sync {
        let ctx = sync::context(cfg.clone(), catalog.clone(), store.clone())?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(sync::run(ctx, shutdown.clone(), Some(tx)));
        // READY=1 only once the watcher runs (recovery and the first scan are done).
        if rx.await.is_ok() {
            tracing::info!(spool = %cfg.spool.dir.display(), archive = %cfg.archive.dir.display(), bucket = %cfg.s3.bucket, "sync running");
        }
        Some(task)
    } else {
        None
    };
    if sync_task.as_ref().is_none_or(|t| !t.is_finished()) {
        crate::telemetry::notify_ready(shutdown.clone());
    }

    let mut failure = None;
    if let Some(t) = sync_task.take() {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(e),
            Err(e) => failure = Some(anyhow::anyhow!("sync task: {e}")),
        }
        // Sync stopping for any reason stops the process: systemd restarts it.
        shutdown.cancel();
    } else {
        shutdown.cancelled().await;
    }
    // The HTTP server drains its connections; give it a bounded time.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let served = serve_failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    match failure.or(served) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `ferry route`: the hash router until SIGTERM/SIGINT.
pub async fn route(cfg: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    on_signals(shutdown.clone())?;
    crate::route::run(cfg, shutdown).await
}

/// `ferry sync --once`: returns the process exit code.
pub async fn sync_once(cfg: Config, timeout: Duration) -> anyhow::Result<i32> {
    let cfg = Arc::new(cfg);
    let shutdown = CancellationToken::new();
    on_signals(shutdown.clone())?;
    let (catalog, store) = open(&cfg).await?;
    let _lock = lock_sync(&cfg.catalog.path)?;
    let ctx = sync::context(cfg.clone(), catalog, store)?;
    let progress = crate::progress::Progress::new("archived", "failed");
    let watched = progress.is_drawn();
    let r = sync::run_once(ctx, shutdown, timeout, &progress).await;
    let took = progress.elapsed();
    progress.finish();
    let r = r?;
    eprintln!(
        "ferry sync --once: {} of {} archived, {} vanished",
        r.archived, r.total, r.vanished
    );
    // A person watching gets the numbers the bar showed, on one screen; scripts and
    // journald keep the lines they always had.
    if watched {
        eprintln!(
            "  {} of {} archived {}; {} retried, {} failed",
            crate::progress::size(r.bytes_archived),
            crate::progress::size(r.bytes_total),
            crate::progress::rate(r.bytes_archived, took),
            r.retries,
            r.left
                .iter()
                .filter(|(_, state, _)| state == "failed")
                .count()
        );
    }
    if r.left.is_empty() {
        return Ok(0);
    }
    let why = if r.permanent {
        "a permanent error stopped"
    } else if r.timed_out {
        "timed out with"
    } else {
        "interrupted with"
    };
    eprintln!("{why} {} file(s) not archived:", r.left.len());
    let shown = if watched { 15 } else { 50 };
    for (key, state, err) in r.left.iter().take(shown) {
        eprintln!("  {key}  [{state}]  {err}");
    }
    if watched && r.left.len() > shown {
        eprintln!(
            "  ... and {} more (ferry status lists them)",
            r.left.len() - shown
        );
    }
    Ok(if r.permanent { 2 } else { 1 })
}

pub async fn status(cfg: Config, json: bool) -> anyhow::Result<()> {
    let path = cfg.catalog.path.clone();
    let catalog = tokio::task::spawn_blocking(move || Catalog::open(&path))
        .await?
        .with_context(|| format!("catalog.path {}", cfg.catalog.path.display()))?;
    let st = catalog.read(ops::status).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", render_status(&st));
    }
    Ok(())
}

/// `ferry status --cluster`: the nodes of the shared catalog. Exit code 0, or 1 when the
/// shared catalog is not configured or cannot be reached.
pub async fn status_cluster(cfg: Config, json: bool) -> anyhow::Result<i32> {
    if cfg.catalog.shared.is_empty() {
        eprintln!("ferry status --cluster: catalog.shared is not set; this node is on its own");
        return Ok(1);
    }
    let shared = crate::shared::Shared::new(&cfg.catalog.shared, cfg.node_name())?;
    let nodes = match shared.nodes().await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("ferry status --cluster: {e}");
            return Ok(1);
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(0);
    }
    print!("{}", render_cluster(&nodes, shared.node()));
    Ok(0)
}

/// The human form of `ferry status --cluster`.
pub fn render_cluster(nodes: &[crate::shared::NodeLine], this: &str) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{} node(s) in the shared catalog:", nodes.len());
    for n in nodes {
        let oldest = n
            .oldest_waiting_ms
            .map(|t| format!("oldest waiting {} ago", ago(t)))
            .unwrap_or_else(|| "nothing waiting".into());
        let _ = writeln!(
            s,
            "  {}{}  {}  queue {} file(s), {}; {}; outbox {}; published {} ago",
            n.node,
            if n.node == this { " (this node)" } else { "" },
            n.url,
            n.queue_depth,
            bytesize::ByteSize(n.queue_bytes.max(0) as u64)
                .display()
                .iec_short(),
            oldest,
            n.outbox,
            ago(n.published_ms)
        );
    }
    s
}

fn ago(ms: i64) -> String {
    // `ms` may come from another node (the shared catalog): any value, never a panic.
    let d = Duration::from_millis(now_ms().saturating_sub(ms).max(0) as u64 / 1000 * 1000);
    humantime::format_duration(d).to_string()
}

/// The human form of `ferry status`.
pub fn render_status(st: &Status) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "files by state:");
    for (state, n) in &st.counts {
        let _ = writeln!(s, "  {state:<14} {n}");
    }
    let _ = writeln!(
        s,
        "queue: {} file(s), {} not yet archived",
        st.queue_depth,
        bytesize::ByteSize(st.queued_bytes).display().iec_short()
    );
    if let Some(t) = st.oldest_queued_ms {
        let _ = writeln!(s, "oldest waiting: queued {} ago", ago(t));
    }
    match &st.spool_watch {
        Some(w) if w.mode == "inotify" => {
            let _ = writeln!(s, "spool watch: inotify (since {} ago)", ago(w.since_ms));
        }
        Some(w) => {
            let _ = writeln!(
                s,
                "spool watch: {} (since {} ago)",
                w.detail,
                ago(w.since_ms)
            );
        }
        None => {}
    }
    if let Some(n) = st.outbox {
        let _ = writeln!(
            s,
            "shared catalog: {n} change(s) not yet published{}",
            if n == 0 { "" } else { " (see notices)" }
        );
    }
    if !st.errors.is_empty() {
        let _ = writeln!(s, "last errors:");
        for e in &st.errors {
            let next = if e.next_attempt_ms > now_ms() {
                format!(
                    "next try in {}",
                    humantime::format_duration(Duration::from_secs(
                        ((e.next_attempt_ms - now_ms()) / 1000).max(0) as u64
                    ))
                )
            } else {
                "next try now".to_string()
            };
            let _ = writeln!(
                s,
                "  {} [{}, {} attempt(s), {}]: {}",
                e.key,
                e.state.as_str(),
                e.attempts,
                next,
                e.error
            );
        }
    }
    if !st.refused.is_empty() {
        let _ = writeln!(s, "refused (left in the spool; rename them to upload):");
        for r in &st.refused {
            let _ = writeln!(s, "  {:?}: {}", r.name, r.reason);
        }
    }
    if !st.notices.is_empty() {
        let _ = writeln!(s, "notices:");
        for n in &st.notices {
            let _ = writeln!(s, "  {} ({} ago): {}", n.topic, ago(n.at_ms), n.message);
        }
    }
    s
}

/// `ferry check-config`: prints each check; returns whether all passed.
pub async fn check_config(cfg: Config, write_probe: bool) -> anyhow::Result<bool> {
    println!("config: ok");
    println!(
        "s3: bucket {:?} prefix {:?} endpoint {}",
        cfg.s3.bucket,
        cfg.s3.prefix,
        if cfg.s3.endpoint.is_empty() {
            "AWS"
        } else {
            &cfg.s3.endpoint
        }
    );
    let store = Store::new(&cfg).await;
    let mut ok = true;
    match store.head_bucket().await {
        Ok(()) => println!("head bucket: ok"),
        Err(e) => {
            println!("head bucket: FAILED: {}", e.message);
            ok = false;
        }
    }
    match store.list(1).await {
        Ok(_) => println!("list under prefix: ok"),
        Err(e) => {
            println!("list under prefix: FAILED: {}", e.message);
            ok = false;
        }
    }
    if write_probe {
        let key = format!(
            "{}.ferry-probe-{}-{}",
            cfg.s3.prefix,
            std::process::id(),
            now_ms()
        );
        let body = b"ferry write probe".to_vec();
        let res = async {
            store.put_bytes(&key, body.clone(), &[]).await?;
            let h = store.head(&key).await?;
            let (n, sha) = store.read_back(&key).await?;
            store.delete(&key).await?;
            Ok::<_, crate::store::StoreError>((h.size, n, sha))
        }
        .await;
        match res {
            Ok((hs, n, sha)) if hs == body.len() as u64 && n == hs => {
                use sha2::Digest;
                if sha == hex::encode(sha2::Sha256::digest(&body)) {
                    println!("write probe (put, head, get, delete {key}): ok");
                } else {
                    println!("write probe: FAILED: the object read back differs");
                    ok = false;
                }
            }
            Ok((hs, n, _)) => {
                println!("write probe: FAILED: sizes differ (head {hs}, get {n})");
                ok = false;
            }
            Err(e) => {
                println!("write probe: FAILED: {e}");
                ok = false;
            }
        }
    }
    Ok(ok)
}

/// `ferry verify [--repair]`: prints findings; returns whether everything is consistent.
pub async fn verify(
    cfg: Config,
    repair: bool,
    json: bool,
    archive: Option<sync::reconcile::ArchiveCheck>,
) -> anyhow::Result<bool> {
    let cfg = Arc::new(cfg);
    // A repair uploads and writes rows: never beside a running sync, which owns them.
    let _lock = if repair {
        Some(lock_sync(&cfg.catalog.path).context(
            "ferry verify --repair needs the sync lock; stop the daemon first \
             (systemctl stop ferry)",
        )?)
    } else {
        None
    };
    let (catalog, store) = open(&cfg).await?;
    let ctx = sync::context(cfg.clone(), catalog, store)?;
    let progress = crate::progress::Progress::new("checked in S3", "findings");
    let mut report = sync::reconcile::run(ctx.clone(), repair, &progress).await?;
    progress.finish();
    if let Some(a) = archive {
        let progress = crate::progress::Progress::new("hashed in the archive", "findings");
        sync::reconcile::check_archive(&ctx, a, &mut report, &progress).await?;
        progress.finish();
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "checked {} uploaded file(s) and {} archive cop(y/ies); {} finding(s); {} object(s) under the prefix unknown to this catalog",
            report.checked,
            report.archive_checked,
            report.findings.len(),
            report.unknown_objects
        );
        for f in &report.findings {
            match &f.repair {
                Some(r) => println!("  {}: {} -> {}", f.key, f.problem, r),
                None => println!("  {}: {}", f.key, f.problem),
            }
        }
        if report.unresolved > 0 && !repair {
            println!("run `ferry verify --repair` to re-upload from the archive");
        }
    }
    Ok(report.unresolved == 0)
}

/// `ferry delete KEY`: tombstone in the catalog and an empty marker object in S3, so every
/// node answers 410. The archive copy stays.
pub async fn delete(cfg: Config, key: &str) -> anyhow::Result<()> {
    let key = Key::new(key, &cfg.s3.prefix).with_context(|| format!("key {key:?}"))?;
    let (catalog, store) = open(&cfg).await?;
    if key.path_in(&cfg.spool.dir).symlink_metadata().is_ok() {
        bail!(
            "{key} is still in the spool ({}); remove it there first",
            key.path_in(&cfg.spool.dir).display()
        );
    }
    if !cfg.catalog.shared.is_empty() {
        // A file still in another node's spool would be uploaded over the marker, and the
        // delete undone on every node but this one: refused, as for this node's spool.
        let shared = crate::shared::Shared::new(&cfg.catalog.shared, cfg.node_name())?;
        let asked = match shared.migrate().await {
            Ok(()) => shared.lookup(key.as_str()).await,
            Err(e) => Err(e),
        };
        match asked {
            Ok(Some(r)) if r.only_on_peer() => bail!(
                "{key} is still in node {}'s spool (not yet uploaded); remove it there first",
                r.node
            ),
            Ok(_) => {}
            Err(e) => eprintln!(
                "warning: cannot ask the shared catalog whether another node still holds {key} \
                 in its spool ({e}); deleting anyway"
            ),
        }
    }
    let when = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    store
        .put_bytes(
            &key.object_key(&cfg.s3.prefix),
            Vec::new(),
            &[("ferry-deleted", &when)],
        )
        .await
        .with_context(|| format!("replacing {key} in S3 by a deletion marker"))?;
    let k = key.as_str().to_string();
    let row = catalog.write(move |c| ops::mark_deleted(c, &k)).await?;
    if row.is_none() {
        let k = key.as_str().to_string();
        catalog
            .write(move |c| {
                c.execute(
                    "INSERT INTO files (key, state, size, mtime_ns, ctime_ns, inode, \
                     updated_at_ms, queued_at_ms) VALUES (?1, 'deleted', 0, 0, 0, 0, ?2, ?2)",
                    rusqlite::params![k, now_ms()],
                )?;
                Ok(())
            })
            .await?;
    }
    println!("deleted {key}: S3 object replaced by a marker; archive copy kept");
    Ok(())
}
