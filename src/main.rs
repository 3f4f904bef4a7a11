//! The `ferry` command line: parse, load config, start tracing, dispatch subcommands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use ferry::config::{Config, Dur};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Moves uploads from a spool directory to S3, verified, and serves them while they move"
)]
struct Cli {
    /// Config file (TOML). Without one, embedded defaults under ./var/ are used.
    #[arg(long, global = true, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Sync and serve in one process (what the systemd unit runs).
    Run,
    /// Watch the spool and upload; with --once, upload what is there now and exit.
    Sync {
        #[arg(long)]
        once: bool,
        /// With --once: give up after this long if transient errors remain.
        #[arg(long, default_value = "10m")]
        timeout: Dur,
    },
    /// Serve HTTP only.
    Serve,
    /// The hash router in front of several serving nodes.
    Route,
    /// Counts by state, queue depth, oldest queued, last errors.
    Status {
        #[arg(long)]
        json: bool,
        /// Every node of the shared catalog (catalog.shared): queue depth, oldest waiting,
        /// when each last published.
        #[arg(long)]
        cluster: bool,
    },
    /// Validate the config and the bucket access (read-only unless --write-probe).
    CheckConfig {
        #[arg(long)]
        write_probe: bool,
    },
    /// Reconcile catalog, bucket and archive; --repair re-uploads what S3 lacks.
    Verify {
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
        /// Also hash archive copies and report any that differ from the catalog's SHA-256
        /// (left untouched).
        #[arg(long)]
        archive: bool,
        /// With --archive: only rows archived within this long (e.g. "7d").
        #[arg(long, requires = "archive")]
        since: Option<Dur>,
        /// With --archive: only this many rows, chosen at random.
        #[arg(long, requires = "archive")]
        sample: Option<usize>,
    },
    /// Tombstone a key: served as 410; the archive copy stays.
    Delete { key: String },
}

/// Caps glibc's malloc arenas at one per core (at least 2), before any thread starts.
///
/// glibc gives threads up to 8 arenas per core, and tokio's blocking pool runs hashing,
/// archive moves and catalog reads on a dozen threads: each arena keeps what it once
/// held. `sync --once` with 10,000 small files queued grew to 64 MiB of RSS over a live
/// heap of 4 MiB (valgrind massif); with one arena per core, 40–42 MiB at the same speed.
/// One arena in all cost a hot-cache hit 9% (malloc lock contention); one per core measured
/// even. `MALLOC_ARENA_MAX` in the environment wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
            return;
        }
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = cores.clamp(2, 64) as libc::c_int;
        // SAFETY: called first in main, before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    ferry::telemetry::init();
    // Before any thread starts and before the first lease: a lease break's SIGIO must never
    // end the process (see ferry::lease).
    ferry::lease::init();
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(78);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("ferry");
    // `http.workers`: 0 keeps tokio's default, one worker per core.
    if cfg.http.workers > 0 {
        builder.worker_threads(cfg.http.workers);
    }
    let rt = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res: anyhow::Result<u8> = rt.block_on(async move {
        match cli.cmd {
            Cmd::Run => ferry::app::run(cfg, true, true).await.map(|_| 0),
            Cmd::Sync { once: false, .. } => ferry::app::run(cfg, true, false).await.map(|_| 0),
            Cmd::Sync {
                once: true,
                timeout,
            } => ferry::app::sync_once(cfg, timeout.0).await.map(|c| c as u8),
            Cmd::Serve => ferry::app::run(cfg, false, true).await.map(|_| 0),
            Cmd::Route => ferry::app::route(cfg).await.map(|_| 0),
            Cmd::Status {
                json,
                cluster: false,
            } => ferry::app::status(cfg, json).await.map(|_| 0),
            Cmd::Status {
                json,
                cluster: true,
            } => ferry::app::status_cluster(cfg, json).await.map(|c| c as u8),
            Cmd::CheckConfig { write_probe } => ferry::app::check_config(cfg, write_probe)
                .await
                .map(|ok| if ok { 0 } else { 1 }),
            Cmd::Verify {
                repair,
                json,
                archive,
                since,
                sample,
            } => {
                let archive = archive.then(|| ferry::sync::reconcile::ArchiveCheck {
                    since: since.map(|d| d.0),
                    sample,
                });
                ferry::app::verify(cfg, repair, json, archive)
                    .await
                    .map(|ok| if ok { 0 } else { 1 })
            }
            Cmd::Delete { key } => ferry::app::delete(cfg, &key).await.map(|_| 0),
        }
    });
    match res {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
