//! Tracing setup, Prometheus metrics (one registry per process), and sd_notify.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| {
        EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn,hyper=warn")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // stderr, above the progress bar while one is drawn (src/progress.rs).
        .with_writer(crate::progress::LogWriter)
        // Journald and log files get plain text; colours only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabel {
    pub source: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: String,
}

/// Every metric ferry exports. Names and meanings are listed in README.md ("Metrics").
pub struct Metrics {
    pub files: Family<StateLabel, Gauge>,
    pub uploads: Counter,
    pub upload_bytes: Counter,
    pub upload_failures: Family<ClassLabel, Counter>,
    pub verify_failures: Counter,
    pub upload_seconds: Histogram,
    pub http_requests: Family<HttpLabel, Counter>,
    pub http_seconds: Histogram,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_bytes: Gauge,
    pub cache_evictions: Counter,
    /// Spool files answered from the spool's memory tier (`http.spool_memory`).
    pub spool_memory_hits: Counter,
    pub spool_memory_bytes: Gauge,
    pub backend_up: Family<BackendLabel, Gauge>,
    /// Set through `set_spool_watched`: exported only by a process that watches a spool.
    spool_watched: Gauge,
    /// Set through `set_queue`: exported only by a process that reads a catalog.
    queue_oldest_seconds: Gauge<f64, AtomicU64>,
    queue_bytes: Gauge,
    pub lease_fallbacks: Counter,
    pub lease_busy: Counter,
    pub archive_failures: Family<ClassLabel, Counter>,
    pub spool_unreadable: Gauge,
    /// Answers proxied from another node's spool (shared catalog).
    pub peer_requests: Counter,
    /// Outbox entries published to the shared catalog.
    pub shared_published: Counter,
    shared_up: Gauge,
    shared_outbox: Gauge,
    registry: Registry,
    /// Metrics that mean something only in some processes: a 0 from a process without a
    /// spool watcher (`ferry serve`, `ferry route`) would read as "polling" to an alert, and
    /// a router has no queue. Each is encoded once its process first sets it.
    spool: Section,
    queue: Section,
    /// Exported only by a process with `catalog.shared` set.
    shared: Section,
}

struct Section {
    registry: Registry,
    live: AtomicBool,
}

impl Section {
    fn new() -> Section {
        Section {
            registry: Registry::with_prefix("ferry"),
            live: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    fn new() -> Metrics {
        let mut m = Metrics {
            files: Family::default(),
            uploads: Counter::default(),
            upload_bytes: Counter::default(),
            upload_failures: Family::default(),
            verify_failures: Counter::default(),
            upload_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 16)),
            http_requests: Family::default(),
            http_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 18)),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_bytes: Gauge::default(),
            cache_evictions: Counter::default(),
            spool_memory_hits: Counter::default(),
            spool_memory_bytes: Gauge::default(),
            backend_up: Family::default(),
            spool_watched: Gauge::default(),
            queue_oldest_seconds: Gauge::default(),
            queue_bytes: Gauge::default(),
            lease_fallbacks: Counter::default(),
            lease_busy: Counter::default(),
            archive_failures: Family::default(),
            spool_unreadable: Gauge::default(),
            peer_requests: Counter::default(),
            shared_published: Counter::default(),
            shared_up: Gauge::default(),
            shared_outbox: Gauge::default(),
            registry: Registry::with_prefix("ferry"),
            spool: Section::new(),
            queue: Section::new(),
            shared: Section::new(),
        };
        m.shared.registry.register(
            "shared_catalog_up",
            "1 while the shared catalog answers and its notifications arrive; 0 while serving \
             falls back to S3 HEADs",
            m.shared_up.clone(),
        );
        m.shared.registry.register(
            "shared_outbox",
            "Changes of this node's files not yet published to the shared catalog",
            m.shared_outbox.clone(),
        );
        m.shared.registry.register(
            "shared_published",
            "Outbox entries published to the shared catalog",
            m.shared_published.clone(),
        );
        m.shared.registry.register(
            "peer_requests",
            "Answers proxied from another node's spool (X-Ferry-Source: peer)",
            m.peer_requests.clone(),
        );
        m.spool.registry.register(
            "spool_watched",
            "1 while the spool has its inotify watch, 0 while it is only polled",
            m.spool_watched.clone(),
        );
        m.queue.registry.register(
            "queue_oldest_seconds",
            "Age of the longest-waiting file not yet archived (0 when none waits), in seconds",
            m.queue_oldest_seconds.clone(),
        );
        m.queue.registry.register(
            "queue_bytes",
            "Bytes of the files not yet archived (queued, uploading, failed, verified, \
             archive_failed)",
            m.queue_bytes.clone(),
        );
        // Every class exists from the start at 0: a family with no series is not exported
        // at all (dashboards show nothing, not 0), and `increase()` over a series that
        // first appears at 1 is 0, so an alert on it would miss the first failure.
        for class in ["transient", "permanent", "local_full"] {
            let _ = m.upload_failures.get_or_create(&ClassLabel {
                class: class.into(),
            });
        }
        for class in ["transient", "permanent"] {
            let _ = m.archive_failures.get_or_create(&ClassLabel {
                class: class.into(),
            });
        }
        let r = &mut m.registry;
        r.register(
            "lease_fallbacks",
            "Spool files that could not be read-leased (another owner without CAP_LEASE, or a \
             filesystem without leases) and waited for the long quiet time instead",
            m.lease_fallbacks.clone(),
        );
        r.register(
            "lease_busy",
            "Times a spool file was found open for writing (lease refused or broken) and put back",
            m.lease_busy.clone(),
        );
        r.register(
            "archive_failures",
            "Failed moves to the archive by class (transient, permanent); the upload stays verified",
            m.archive_failures.clone(),
        );
        r.register(
            "spool_unreadable",
            "Spool folders or files the last scan could not read or stat",
            m.spool_unreadable.clone(),
        );
        r.register("files", "Files in the catalog by state", m.files.clone());
        r.register("uploads", "Files uploaded and verified", m.uploads.clone());
        r.register(
            "upload_bytes",
            "Bytes uploaded and verified",
            m.upload_bytes.clone(),
        );
        r.register(
            "upload_failures",
            "Failed upload attempts by class (transient, permanent, local_full)",
            m.upload_failures.clone(),
        );
        r.register(
            "verify_failures",
            "Uploads whose verification found other bytes in S3",
            m.verify_failures.clone(),
        );
        r.register(
            "upload_seconds",
            "Time from claiming a file to verified, in seconds",
            m.upload_seconds.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests by X-Ferry-Source (or error) and status",
            m.http_requests.clone(),
        );
        r.register(
            "http_request_seconds",
            "HTTP request handling time until the response head, in seconds",
            m.http_seconds.clone(),
        );
        r.register("cache_hits", "Hot-cache hits", m.cache_hits.clone());
        r.register("cache_misses", "Hot-cache misses", m.cache_misses.clone());
        r.register(
            "cache_bytes",
            "Bytes held by the hot cache",
            m.cache_bytes.clone(),
        );
        r.register(
            "cache_evictions",
            "Hot-cache entries evicted or expired",
            m.cache_evictions.clone(),
        );
        r.register(
            "spool_memory_hits",
            "Spool files answered from memory (http.spool_memory): one stat showed them unchanged",
            m.spool_memory_hits.clone(),
        );
        r.register(
            "spool_memory_bytes",
            "Bytes of spool files held in memory (http.spool_memory), as of the last scrape",
            m.spool_memory_bytes.clone(),
        );
        r.register(
            "router_backend_up",
            "Router backend health (1 up, 0 down)",
            m.backend_up.clone(),
        );
        m
    }

    /// The Prometheus text exposition of everything registered (and of each section its
    /// process has set).
    pub fn encode(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut s = String::new();
        let mut enc = || -> std::fmt::Result {
            encode_registry(&mut s, &self.registry)?;
            for sec in [&self.spool, &self.queue, &self.shared] {
                if sec.live.load(Ordering::Relaxed) {
                    encode_registry(&mut s, &sec.registry)?;
                }
            }
            encode_eof(&mut s)
        };
        if enc().is_err() {
            s.clear();
        }
        s
    }

    /// The spool watcher's mode: inotify (true) or polling (false).
    pub fn set_spool_watched(&self, watched: bool) {
        self.spool_watched.set(i64::from(watched));
        self.spool.live.store(true, Ordering::Relaxed);
    }

    /// Whether the shared catalog is usable (a process with `catalog.shared` set).
    pub fn set_shared_up(&self, up: bool) {
        self.shared_up.set(i64::from(up));
        self.shared.live.store(true, Ordering::Relaxed);
    }

    pub fn set_shared_outbox(&self, n: i64) {
        self.shared_outbox.set(n);
        self.shared.live.store(true, Ordering::Relaxed);
    }

    /// The catalog's numbers, read at scrape time (`catalog::ops::gauges`: no row scan).
    pub fn set_queue(&self, g: &crate::catalog::Gauges) {
        for (state, n) in &g.counts {
            self.files
                .get_or_create(&StateLabel {
                    state: state.clone(),
                })
                .set(*n as i64);
        }
        self.queue_bytes.set(g.queued_bytes as i64);
        let age_ms = g
            .oldest_queued_ms
            .map_or(0, |t| (crate::catalog::now_ms() - t).max(0));
        self.queue_oldest_seconds.set(age_ms as f64 / 1000.0);
        self.queue.live.store(true, Ordering::Relaxed);
    }

    /// Counts one answered request. On the hot path: each worker thread keeps the counters
    /// it has used (a counter is a shared atomic), so a request costs one small map lookup,
    /// not a label allocation and the family's lock.
    pub fn http(&self, source: &str, status: u16) {
        thread_local! {
            static SEEN: std::cell::RefCell<Vec<(String, u16, Counter)>> =
                const { std::cell::RefCell::new(Vec::new()) };
        }
        let counted = SEEN.with(|seen| {
            let mut seen = seen.borrow_mut();
            if let Some((_, _, c)) = seen.iter().find(|(s, st, _)| *st == status && s == source) {
                c.inc();
                return true;
            }
            // Bounded: odd statuses beyond it take the family's own path every time.
            if seen.len() < 64 {
                let c = self
                    .http_requests
                    .get_or_create(&HttpLabel {
                        source: source.to_string(),
                        status,
                    })
                    .clone();
                c.inc();
                seen.push((source.to_string(), status, c));
                return true;
            }
            false
        });
        if !counted {
            self.http_requests
                .get_or_create(&HttpLabel {
                    source: source.to_string(),
                    status,
                })
                .inc();
        }
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

/// Tells systemd (if it started us with NOTIFY_SOCKET) that start-up is done, and keeps the
/// watchdog fed at half its interval until `shutdown`.
pub fn notify_ready(shutdown: CancellationToken) {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "sd_notify READY failed");
    }
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        let every = Duration::from_micros(usec / 2);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                    }
                }
            }
        });
    }
}

pub fn notify_stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}
