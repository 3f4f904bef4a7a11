//! The shared catalog (`catalog.shared`, PostgreSQL): each node publishes its own files'
//! states from its local outbox, asks it on a metadata miss, and hears every node's changes
//! through LISTEN/NOTIFY. The local SQLite catalog stays the authority for the one rule:
//! nothing here moves, keeps or releases a file, and a database that is down only costs
//! S3 HEADs and freshness.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::catalog::{now_ms, ops, Catalog, Row, State};

/// The channel every node LISTENs on; each payload is one key.
pub const CHANNEL: &str = "ferry_keys";

/// The advisory lock migrations run under (any fixed number; "ferry" in ASCII).
const MIGRATION_LOCK: i64 = 0x0066_6572_7279;

/// How long one query may take before the database counts as unreachable.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a lookup on the request path may take: past it the miss asks S3 instead.
const LOOKUP_TIMEOUT: Duration = Duration::from_millis(500);

/// After a failure, lookups skip the database this long, doubling with each failure in a
/// row up to `DOWN_MAX` (a database that hangs must not add its timeout to miss after
/// miss); then one lookup probes it while the others go on to S3.
const DOWN_FOR: Duration = Duration::from_secs(1);
const DOWN_MAX: Duration = Duration::from_secs(30);

/// Outbox entries published per transaction.
const BATCH: usize = 500;

/// How often an idle publisher looks at the outbox, and refreshes its node row.
const POLL: Duration = Duration::from_millis(50);
const HEARTBEAT: Duration = Duration::from_secs(5);

/// The notice topic `ferry status` shows while publishing fails.
pub const NOTICE: &str = "shared catalog";

/// Versioned like the SQLite catalog's: entry N brings the schema to version N + 1.
const MIGRATIONS: &[&str] = &[
    // 1: one row per node (its internal URL and queue, when it last published) and one per
    //    (key, node): that node's state of the key. The serving query takes the newest
    //    change of a key across nodes from `ferry_files_latest`.
    "CREATE TABLE ferry_nodes (
        node text PRIMARY KEY,
        url text NOT NULL,
        queue_depth bigint NOT NULL DEFAULT 0,
        queue_bytes bigint NOT NULL DEFAULT 0,
        oldest_waiting_ms bigint,
        outbox bigint NOT NULL DEFAULT 0,
        published_ms bigint NOT NULL
     );
     CREATE TABLE ferry_files (
        key text NOT NULL,
        node text NOT NULL,
        gen bigint NOT NULL,
        state text NOT NULL,
        size bigint NOT NULL,
        sha256 text,
        mtime_ns bigint NOT NULL,
        inode bigint NOT NULL,
        deleted boolean NOT NULL,
        still_local boolean NOT NULL,
        changed_ms bigint NOT NULL,
        PRIMARY KEY (key, node)
     );
     CREATE INDEX ferry_files_latest ON ferry_files (key, changed_ms DESC);",
    // 2: the spool file's ctime, the last part of a not-yet-hashed file's ETag (a rewrite
    //    that keeps length and mtime changes only the ctime). Rows published by an older
    //    ferry read as 0 until that node publishes them again.
    "ALTER TABLE ferry_files ADD COLUMN IF NOT EXISTS ctime_ns bigint NOT NULL DEFAULT 0;",
];

/// The serving query: the newest change of a key on any other node, vanished rows aside
/// (a file that left a spool unuploaded says nothing about the key).
const LOOKUP_SQL: &str = "SELECT f.node, n.url, f.state, f.size, f.sha256, f.mtime_ns, f.inode, \
    f.changed_ms, f.ctime_ns \
    FROM ferry_files f JOIN ferry_nodes n ON n.node = f.node \
    WHERE f.key = $1 AND f.node <> $2 AND f.state <> 'vanished' \
    ORDER BY f.changed_ms DESC LIMIT 1";

const UPSERT_SQL: &str = "INSERT INTO ferry_files (key, node, gen, state, size, sha256, \
    mtime_ns, inode, ctime_ns, deleted, still_local, changed_ms) \
    SELECT k, $1, g, s, sz, sh, mt, ino, ct, s = 'deleted', \
        s IN ('queued', 'uploading', 'failed', 'verified', 'archive_failed'), ch \
    FROM unnest($2::text[], $3::int8[], $4::text[], $5::int8[], $6::text[], $7::int8[], \
        $8::int8[], $9::int8[], $10::int8[]) AS t(k, g, s, sz, sh, mt, ino, ch, ct) \
    ON CONFLICT (key, node) DO UPDATE SET gen = EXCLUDED.gen, state = EXCLUDED.state, \
        size = EXCLUDED.size, sha256 = EXCLUDED.sha256, mtime_ns = EXCLUDED.mtime_ns, \
        inode = EXCLUDED.inode, ctime_ns = EXCLUDED.ctime_ns, deleted = EXCLUDED.deleted, \
        still_local = EXCLUDED.still_local, changed_ms = EXCLUDED.changed_ms";

const NODE_SQL: &str = "INSERT INTO ferry_nodes (node, url, queue_depth, queue_bytes, \
    oldest_waiting_ms, outbox, published_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) \
    ON CONFLICT (node) DO UPDATE SET url = EXCLUDED.url, queue_depth = EXCLUDED.queue_depth, \
        queue_bytes = EXCLUDED.queue_bytes, oldest_waiting_ms = EXCLUDED.oldest_waiting_ms, \
        outbox = EXCLUDED.outbox, published_ms = EXCLUDED.published_ms";

/// Parses `catalog.shared`; what the URL leaves out comes from libpq's environment
/// variables (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE), as for psql.
pub fn pg_config(url: &str) -> anyhow::Result<tokio_postgres::Config> {
    pg_config_with(url, |k| std::env::var(k).ok())
}

fn pg_config_with(
    url: &str,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<tokio_postgres::Config> {
    // SECURITY: the parser's message never repeats the URL (which may hold a password).
    let mut c: tokio_postgres::Config = url
        .parse()
        .map_err(|e| anyhow::anyhow!("not a PostgreSQL URL: {e}"))?;
    if c.get_hosts().is_empty() {
        let hosts = env("PGHOST").unwrap_or_else(|| "localhost".into());
        for h in hosts.split(',').filter(|h| !h.is_empty()) {
            if h.starts_with('/') {
                c.host_path(h);
            } else {
                c.host(h);
            }
        }
    }
    if c.get_ports().is_empty() {
        if let Some(p) = env("PGPORT") {
            let port = p
                .trim()
                .parse::<u16>()
                .map_err(|_| anyhow::anyhow!("PGPORT {p:?} is not a port"))?;
            c.port(port);
        }
    }
    if c.get_user().is_none() {
        let user = env("PGUSER")
            .or_else(|| env("USER"))
            .unwrap_or_else(|| "ferry".into());
        c.user(user);
    }
    if c.get_password().is_none() {
        if let Some(p) = env("PGPASSWORD") {
            c.password(p);
        }
    }
    if c.get_dbname().is_none() {
        if let Some(d) = env("PGDATABASE") {
            c.dbname(d);
        }
    }
    if !url.contains("sslmode=") {
        if let Some(m) = env("PGSSLMODE") {
            let mode = match m.as_str() {
                "disable" => tokio_postgres::config::SslMode::Disable,
                "prefer" | "allow" => tokio_postgres::config::SslMode::Prefer,
                "require" | "verify-ca" | "verify-full" => tokio_postgres::config::SslMode::Require,
                other => anyhow::bail!("PGSSLMODE {other:?} is not disable, prefer or require"),
            };
            c.ssl_mode(mode);
        }
    }
    if c.get_application_name().is_none() {
        c.application_name("ferry");
    }
    if c.get_connect_timeout().is_none() {
        c.connect_timeout(Duration::from_secs(5));
    }
    // A database host that vanishes without a FIN must not leave the listener deaf.
    c.keepalives(true);
    c.keepalives_idle(Duration::from_secs(10));
    Ok(c)
}

/// TLS for the database: rustls with the system's roots (SSL_CERT_FILE and SSL_CERT_DIR
/// are honoured). With sslmode=require a certificate that does not verify is refused.
fn tls() -> anyhow::Result<tokio_postgres_rustls::MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(found.certs);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS for the shared catalog")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Another node's record of a key, as the serving query found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedRow {
    pub node: String,
    /// The node's internal URL (`http.advertise_url`).
    pub url: String,
    pub state: State,
    pub size: u64,
    pub sha256: Option<String>,
    pub mtime_ns: i64,
    pub inode: u64,
    pub ctime_ns: i64,
    /// When that node's row last changed (its clock).
    pub changed_ms: i64,
}

impl SharedRow {
    /// The file is in that node's spool and not (yet) in S3: only a `peer` fetch has it.
    pub fn only_on_peer(&self) -> bool {
        matches!(self.state, State::Queued | State::Uploading | State::Failed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("the shared catalog is unreachable: {0}")]
    Down(String),
}

/// One node's row in `ferry_nodes`, for `ferry status --cluster`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeLine {
    pub node: String,
    pub url: String,
    pub queue_depth: i64,
    pub queue_bytes: i64,
    pub oldest_waiting_ms: Option<i64>,
    pub outbox: i64,
    pub published_ms: i64,
}

/// A connection to the shared catalog: a query pool for lookups and publishing, and (in
/// `listen`) one dedicated connection for notifications.
pub struct Shared {
    pool: deadpool_postgres::Pool,
    pg: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    node: String,
    /// The schema is known to be current (migrations ran or were found done).
    migrated: AtomicBool,
    /// Unix ms before which lookups do not try the database.
    down_until: AtomicI64,
    /// The notification connection is up: invalidations arrive.
    listening: AtomicBool,
    /// This process runs a listener (it serves): its health includes the listener's.
    listens: AtomicBool,
    reported_down: AtomicBool,
    /// Another process publishes under this node's name.
    conflict: AtomicBool,
    /// Failures in a row (any caller): the back-off's exponent.
    failures: std::sync::atomic::AtomicU32,
    /// A lookup is probing a database that failed: the others do not wait for it.
    probing: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    /// Builds the pool; connects nothing yet (the database may be down at start-up, which
    /// must not stop a node from uploading).
    pub fn new(url: &str, node: String) -> anyhow::Result<Arc<Shared>> {
        let pg = pg_config(url).context("catalog.shared")?;
        let tls = tls()?;
        let mgr = deadpool_postgres::Manager::from_config(
            pg.clone(),
            tls.clone(),
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = deadpool_postgres::Pool::builder(mgr)
            .max_size(8)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(QUERY_TIMEOUT))
            .create_timeout(Some(QUERY_TIMEOUT))
            .recycle_timeout(Some(QUERY_TIMEOUT))
            .build()
            .context("catalog.shared: the connection pool")?;
        crate::telemetry::metrics().set_shared_up(false);
        Ok(Arc::new(Shared {
            pool,
            pg,
            tls,
            node,
            migrated: AtomicBool::new(false),
            down_until: AtomicI64::new(0),
            listening: AtomicBool::new(false),
            listens: AtomicBool::new(false),
            reported_down: AtomicBool::new(false),
            conflict: AtomicBool::new(false),
            failures: std::sync::atomic::AtomicU32::new(0),
            probing: AtomicBool::new(false),
            last_error: Mutex::new(None),
        }))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Lookups can use it, and notifications arrive: metadata from it is current.
    pub fn healthy(&self) -> bool {
        self.migrated.load(Ordering::Relaxed)
            && !self.conflict.load(Ordering::Relaxed)
            && (self.listening.load(Ordering::Relaxed) || !self.listens.load(Ordering::Relaxed))
            && self.down_until.load(Ordering::Relaxed) <= now_ms()
    }

    /// Why it is not healthy, for `/readyz` and the log.
    pub fn degraded(&self) -> Option<String> {
        if self.healthy() {
            return None;
        }
        let why = self
            .last_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_else(|| "not connected yet".into());
        Some(why)
    }

    fn failed(&self, what: &str, e: impl std::fmt::Display) -> SharedError {
        let msg = format!("{what}: {e}");
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(10);
        let down_for = (DOWN_FOR * 2u32.pow(n)).min(DOWN_MAX);
        self.down_until
            .store(now_ms() + down_for.as_millis() as i64, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(msg.clone());
        }
        // Once per outage, not once per retry.
        if !self.reported_down.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %msg, "shared catalog unreachable; serving falls back to S3 HEADs");
        }
        crate::telemetry::metrics().set_shared_up(false);
        SharedError::Down(msg)
    }

    fn succeeded(&self) {
        self.down_until.store(0, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        if self.reported_down.swap(false, Ordering::Relaxed) {
            tracing::info!("shared catalog reachable again");
        }
        crate::telemetry::metrics().set_shared_up(self.healthy());
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, SharedError> {
        self.pool
            .get()
            .await
            .map_err(|e| self.failed("connect", chain(&e)))
    }

    /// Brings the schema up to date, under an advisory lock held by the transaction, so
    /// many nodes starting at once apply each migration once.
    pub async fn migrate(&self) -> Result<(), SharedError> {
        let mut client = self.client().await?;
        let run = async {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS ferry_schema (version integer NOT NULL);
                 INSERT INTO ferry_schema (version)
                    SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM ferry_schema);",
            )
            .await?;
            let version: i32 = tx
                .query_one("SELECT version FROM ferry_schema", &[])
                .await?
                .get(0);
            for sql in MIGRATIONS.iter().skip(version.max(0) as usize) {
                tx.batch_execute(sql).await?;
            }
            tx.execute(
                "UPDATE ferry_schema SET version = $1 WHERE version < $1",
                &[&(MIGRATIONS.len() as i32)],
            )
            .await?;
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(version)
        };
        let version = match tokio::time::timeout(Duration::from_secs(30), run).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(self.failed("migrate", chain(&e))),
            Err(_) => return Err(self.failed("migrate", "timed out after 30s")),
        };
        if version as usize > MIGRATIONS.len() {
            // A newer ferry migrated it: its tables are a superset this one can use.
            tracing::warn!(
                version,
                known = MIGRATIONS.len(),
                "the shared catalog's schema is newer than this ferry"
            );
        }
        self.migrated.store(true, Ordering::Relaxed);
        self.succeeded();
        Ok(())
    }

    /// Keeps trying `migrate` until it succeeds (or shutdown): the database may come up
    /// after the node.
    pub async fn migrate_until_done(&self, shutdown: &CancellationToken) -> bool {
        let mut wait = Duration::from_millis(200);
        loop {
            if self.migrate().await.is_ok() {
                return true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    /// The newest record of `key` on another node; `Ok(None)` when no node has one.
    pub async fn lookup(&self, key: &str) -> Result<Option<SharedRow>, SharedError> {
        if !self.migrated.load(Ordering::Relaxed) {
            return Err(SharedError::Down("not connected yet".into()));
        }
        if self.down_until.load(Ordering::Relaxed) > now_ms() {
            return Err(SharedError::Down(
                self.degraded().unwrap_or_else(|| "down".into()),
            ));
        }
        // After a failure, one lookup at a time finds out whether it is back.
        let _probe = if self.failures.load(Ordering::Relaxed) > 0 {
            if self.probing.swap(true, Ordering::Acquire) {
                return Err(SharedError::Down("being probed".into()));
            }
            Some(ProbeGuard(&self.probing))
        } else {
            None
        };
        let run = async {
            let client = self.client().await?;
            let stmt = client
                .prepare_cached(LOOKUP_SQL)
                .await
                .map_err(|e| self.failed("lookup", chain(&e)))?;
            client
                .query_opt(&stmt, &[&key, &self.node])
                .await
                .map_err(|e| self.failed("lookup", chain(&e)))
        };
        let row = match tokio::time::timeout(LOOKUP_TIMEOUT, run).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(self.failed("lookup", format!("no answer within {LOOKUP_TIMEOUT:?}")))
            }
        };
        self.succeeded();
        let Some(r) = row else {
            return Ok(None);
        };
        let state: String = r.get(2);
        let Some(state) = State::parse(&state) else {
            return Ok(None);
        };
        Ok(Some(SharedRow {
            node: r.get(0),
            url: r.get(1),
            state,
            size: r.get::<_, i64>(3).max(0) as u64,
            sha256: r.get(4),
            mtime_ns: r.get(5),
            inode: r.get::<_, i64>(6) as u64,
            changed_ms: r.get(7),
            ctime_ns: r.get(8),
        }))
    }

    /// Publishes one batch: every entry's current row (or its removal) and the node's own
    /// row, with a notification per key, in one transaction. Idempotent: publishing the
    /// same rows again writes the same values.
    async fn push(
        &self,
        batch: &[(String, i64, Option<Row>)],
        node: &NodeLine,
    ) -> Result<(), SharedError> {
        let mut keys = Vec::new();
        let mut gens = Vec::new();
        let mut states = Vec::new();
        let mut sizes = Vec::new();
        let mut shas: Vec<Option<String>> = Vec::new();
        let mut mtimes = Vec::new();
        let mut inodes = Vec::new();
        let mut ctimes = Vec::new();
        let mut changed = Vec::new();
        let mut gone = Vec::new();
        let mut all: Vec<&str> = Vec::new();
        for (key, _, row) in batch {
            all.push(key);
            match row {
                Some(r) => {
                    keys.push(key.as_str());
                    gens.push(r.gen);
                    states.push(r.state.as_str());
                    sizes.push(r.stat.size as i64);
                    shas.push(r.sha256.clone());
                    mtimes.push(r.stat.mtime_ns);
                    inodes.push(r.stat.inode as i64);
                    ctimes.push(r.stat.ctime_ns);
                    changed.push(r.updated_at_ms);
                }
                None => gone.push(key.as_str()),
            }
        }
        let mut client = self.client().await?;
        let run = async {
            let tx = client.transaction().await?;
            if !keys.is_empty() {
                let stmt = tx.prepare_cached(UPSERT_SQL).await?;
                tx.execute(
                    &stmt,
                    &[
                        &self.node, &keys, &gens, &states, &sizes, &shas, &mtimes, &inodes,
                        &changed, &ctimes,
                    ],
                )
                .await?;
            }
            if !gone.is_empty() {
                tx.execute(
                    "DELETE FROM ferry_files WHERE node = $1 AND key = ANY($2)",
                    &[&self.node, &gone],
                )
                .await?;
            }
            upsert_node(&tx, node).await?;
            if !all.is_empty() {
                // Delivered at commit, to every listener, this node's included.
                tx.execute(
                    "SELECT pg_notify($1, k) FROM unnest($2::text[]) AS k",
                    &[&CHANNEL, &all],
                )
                .await?;
            }
            tx.commit().await
        };
        match tokio::time::timeout(Duration::from_secs(10), run).await {
            Ok(Ok(())) => {
                self.succeeded();
                Ok(())
            }
            Ok(Err(e)) => Err(self.failed("publish", chain(&e))),
            Err(_) => Err(self.failed("publish", "timed out after 10s")),
        }
    }

    /// Takes this node's name for this process: `Ok(None)` when another live process
    /// holds it. The returned client's session holds the lock; dropping it releases it.
    async fn claim_name(&self) -> Result<Option<tokio_postgres::Client>, SharedError> {
        let connected =
            tokio::time::timeout(QUERY_TIMEOUT * 5, self.pg.connect(self.tls.clone())).await;
        let (client, conn) = match connected {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(self.failed("claim the node name", chain(&e))),
            Err(_) => return Err(self.failed("claim the node name", "connect timed out")),
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let got = tokio::time::timeout(
            QUERY_TIMEOUT,
            client.query_one(
                "SELECT pg_try_advisory_lock(hashtextextended('ferry node ' || $1, 0))",
                &[&self.node],
            ),
        )
        .await;
        match got {
            Ok(Ok(row)) if row.get::<_, bool>(0) => Ok(Some(client)),
            Ok(Ok(_)) => Ok(None),
            Ok(Err(e)) => Err(self.failed("claim the node name", chain(&e))),
            Err(_) => Err(self.failed("claim the node name", "no answer")),
        }
    }

    /// `ferry status --cluster`: every node's row.
    pub async fn nodes(&self) -> Result<Vec<NodeLine>, SharedError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT node, url, queue_depth, queue_bytes, oldest_waiting_ms, outbox, \
                 published_ms FROM ferry_nodes ORDER BY node",
                &[],
            )
            .await
            .map_err(|e| self.failed("nodes", chain(&e)))?;
        Ok(rows
            .iter()
            .map(|r| NodeLine {
                node: r.get(0),
                url: r.get(1),
                queue_depth: r.get(2),
                queue_bytes: r.get(3),
                oldest_waiting_ms: r.get(4),
                outbox: r.get(5),
                published_ms: r.get(6),
            })
            .collect())
    }

    /// Publishes the outbox until shutdown: each change of this node's catalog reaches the
    /// database within about `POLL` while it is up; while it is down the outbox keeps one
    /// entry per key and drains when it returns.
    pub async fn publish(
        self: Arc<Self>,
        catalog: Catalog,
        url: String,
        shutdown: CancellationToken,
    ) {
        match catalog.write(|c| ops::outbox_enable(c, true)).await {
            Ok(true) => tracing::info!("shared catalog: publishing every file this node holds"),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "shared catalog: cannot turn the outbox on"),
        }
        if !self.migrate_until_done(&shutdown).await {
            return;
        }
        let mut wait = POLL;
        let mut last_beat = std::time::Instant::now() - HEARTBEAT;
        let mut noticed = false;
        let mut name: Option<tokio_postgres::Client> = None;
        loop {
            // This node's name is held by this process for as long as it publishes (a
            // session advisory lock on a connection of its own): a second node publishing
            // under the same name would overwrite this one's rows and hide its files.
            if name.as_ref().is_none_or(|c| c.is_closed()) {
                name = None;
                match self.claim_name().await {
                    Ok(Some(c)) => {
                        name = Some(c);
                        self.conflict.store(false, Ordering::Relaxed);
                    }
                    Ok(None) => {
                        let msg = format!(
                            "another ferry publishes as node {:?}: give each node its own \
                             http.node_name; this one publishes nothing until then",
                            self.node
                        );
                        if !self.conflict.swap(true, Ordering::Relaxed) {
                            tracing::error!("{msg}");
                        }
                        if let Ok(mut last) = self.last_error.lock() {
                            *last = Some(msg.clone());
                        }
                        crate::telemetry::metrics().set_shared_up(false);
                        let _ = catalog
                            .write(move |c| ops::set_notice(c, NOTICE, &msg))
                            .await;
                        noticed = true;
                        // Soon again: a node restarted after a kill -9 finds its old
                        // session's lock until PostgreSQL notices that session is gone.
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        continue;
                    }
                    Err(_) => {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(wait.max(Duration::from_millis(200))) => {}
                        }
                        wait = (wait * 2).clamp(Duration::from_millis(200), Duration::from_secs(5));
                        continue;
                    }
                }
            }
            let batch = catalog
                .read(|c| ops::outbox_batch(c, BATCH))
                .await
                .unwrap_or_default();
            if !batch.is_empty() || last_beat.elapsed() >= HEARTBEAT {
                let node = match node_line(&catalog, &self.node, &url).await {
                    Some(n) => n,
                    None => NodeLine {
                        node: self.node.clone(),
                        url: url.clone(),
                        queue_depth: 0,
                        queue_bytes: 0,
                        oldest_waiting_ms: None,
                        outbox: batch.len() as i64,
                        published_ms: now_ms(),
                    },
                };
                crate::telemetry::metrics().set_shared_outbox(node.outbox);
                match self.push(&batch, &node).await {
                    Ok(()) => {
                        if !batch.is_empty() {
                            crate::crashpoint::hit("published");
                        }
                        let done: Vec<(String, i64)> =
                            batch.iter().map(|(k, s, _)| (k.clone(), *s)).collect();
                        let n = done.len() as u64;
                        let cleared = noticed;
                        let r = catalog
                            .write(move |c| {
                                ops::outbox_done(c, &done)?;
                                if cleared {
                                    c.execute("DELETE FROM notices WHERE topic = ?1", [NOTICE])?;
                                }
                                Ok(())
                            })
                            .await;
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "shared catalog: could not clear published outbox entries (they are published again)");
                        } else {
                            noticed = false;
                        }
                        crate::telemetry::metrics().shared_published.inc_by(n);
                        last_beat = std::time::Instant::now();
                        wait = POLL;
                        if batch.len() == BATCH {
                            continue;
                        }
                    }
                    Err(e) => {
                        let msg = format!(
                            "{e}; the outbox holds the changes and publishes them when it is back"
                        );
                        let _ = catalog
                            .write(move |c| ops::set_notice(c, NOTICE, &msg))
                            .await;
                        noticed = true;
                        wait = (wait * 2).clamp(Duration::from_millis(200), Duration::from_secs(5));
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Listens for every node's changes on one dedicated connection (outside the pool)
    /// until shutdown: `on_key` for each changed key, `on_reset` on every (re)connect,
    /// since notifications sent while it was away are lost.
    pub async fn listen(
        self: Arc<Self>,
        on_key: impl Fn(String) + Send + Sync + 'static,
        on_reset: impl Fn() + Send + Sync + 'static,
        shutdown: CancellationToken,
    ) {
        self.listens.store(true, Ordering::Relaxed);
        if !self.migrate_until_done(&shutdown).await {
            return;
        }
        let mut wait = Duration::from_millis(200);
        loop {
            let connected =
                tokio::time::timeout(Duration::from_secs(10), self.pg.connect(self.tls.clone()))
                    .await;
            match connected {
                Ok(Ok((client, mut conn))) => {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                    let subscribed = async {
                        // The connection must be driven for the LISTEN to complete.
                        let sql = format!("LISTEN {CHANNEL}");
                        let listen = client.batch_execute(&sql);
                        tokio::pin!(listen);
                        loop {
                            tokio::select! {
                                r = &mut listen => return r.map_err(|e| e.to_string()),
                                m = futures_util::StreamExt::next(&mut messages) => match m {
                                    Some(Ok(AsyncMessage::Notification(n))) => on_key(n.payload().to_string()),
                                    Some(Ok(_)) => {}
                                    Some(Err(e)) => return Err(e.to_string()),
                                    None => return Err("connection closed".into()),
                                }
                            }
                        }
                    };
                    match subscribed.await {
                        Ok(()) => {
                            self.listening.store(true, Ordering::Relaxed);
                            self.succeeded();
                            on_reset();
                            wait = Duration::from_millis(200);
                            let why = loop {
                                let ping = tokio::time::sleep(HEARTBEAT);
                                tokio::select! {
                                    _ = shutdown.cancelled() => return,
                                    m = futures_util::StreamExt::next(&mut messages) => match m {
                                        Some(Ok(AsyncMessage::Notification(n))) => on_key(n.payload().to_string()),
                                        Some(Ok(_)) => {}
                                        Some(Err(e)) => break e.to_string(),
                                        None => break "connection closed".to_string(),
                                    },
                                    _ = ping => {
                                        // A silent network: the listener must notice it is deaf.
                                        let q = client.simple_query("SELECT 1");
                                        tokio::pin!(q);
                                        let alive = loop {
                                            tokio::select! {
                                                r = &mut q => break r.is_ok(),
                                                _ = tokio::time::sleep(QUERY_TIMEOUT) => break false,
                                                m = futures_util::StreamExt::next(&mut messages) => match m {
                                                    Some(Ok(AsyncMessage::Notification(n))) => on_key(n.payload().to_string()),
                                                    Some(Ok(_)) => {}
                                                    Some(Err(_)) | None => break false,
                                                },
                                            }
                                        };
                                        if !alive {
                                            break "no answer to a ping".to_string();
                                        }
                                    }
                                }
                            };
                            self.listening.store(false, Ordering::Relaxed);
                            let _ = self.failed("listen", why);
                        }
                        Err(e) => {
                            let _ = self.failed("listen", e);
                        }
                    }
                }
                Ok(Err(e)) => {
                    let _ = self.failed("listen", chain(&e));
                }
                Err(_) => {
                    let _ = self.failed("listen", "connect timed out");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }
}

/// Ends a probe when the probing lookup ends, however it ends.
struct ProbeGuard<'a>(&'a AtomicBool);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// An error with its causes: tokio-postgres says only "db error" or "error connecting"
/// at the top.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let part = c.to_string();
        if !s.contains(&part) {
            s.push_str(": ");
            s.push_str(&part);
        }
        cur = c.source();
    }
    s
}

async fn upsert_node(
    tx: &deadpool_postgres::Transaction<'_>,
    n: &NodeLine,
) -> Result<(), tokio_postgres::Error> {
    let stmt = tx.prepare_cached(NODE_SQL).await?;
    tx.execute(
        &stmt,
        &[
            &n.node,
            &n.url,
            &n.queue_depth,
            &n.queue_bytes,
            &n.oldest_waiting_ms,
            &n.outbox,
            &n.published_ms,
        ],
    )
    .await?;
    Ok(())
}

/// This node's row: its queue as the catalog counts it.
async fn node_line(catalog: &Catalog, node: &str, url: &str) -> Option<NodeLine> {
    let (g, outbox) = catalog
        .read(|c| Ok((ops::gauges(c)?, ops::outbox_len(c)?)))
        .await
        .ok()?;
    Some(NodeLine {
        node: node.to_string(),
        url: url.to_string(),
        queue_depth: g.queue_depth as i64,
        queue_bytes: g.queued_bytes as i64,
        oldest_waiting_ms: g.oldest_queued_ms,
        outbox: outbox as i64,
        published_ms: now_ms(),
    })
}

/// The URL other nodes reach this one at: `http.advertise_url`, else the bound address.
pub fn advertise_url(cfg: &crate::config::Config, bound: Option<std::net::SocketAddr>) -> String {
    if !cfg.http.advertise_url.is_empty() {
        return cfg.http.advertise_url.trim_end_matches('/').to_string();
    }
    let addr = bound
        .map(|a| a.to_string())
        .unwrap_or_else(|| cfg.http.listen.clone());
    format!("http://{addr}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_url_wins_and_the_environment_fills_the_rest() {
        let c = pg_config_with(
            "postgres://app@db.internal:6432/photos",
            env(&[("PGHOST", "other"), ("PGUSER", "x"), ("PGPASSWORD", "pw")]),
        )
        .unwrap();
        assert_eq!(c.get_user(), Some("app"));
        assert_eq!(c.get_dbname(), Some("photos"));
        assert_eq!(c.get_ports(), &[6432]);
        assert_eq!(c.get_password(), Some(&b"pw"[..]));
        assert!(
            matches!(&c.get_hosts()[0], tokio_postgres::config::Host::Tcp(h) if h == "db.internal")
        );

        let c = pg_config_with(
            "postgres://",
            env(&[
                ("PGHOST", "10.0.0.5"),
                ("PGPORT", "5433"),
                ("PGUSER", "ferry"),
                ("PGDATABASE", "cat"),
                ("PGSSLMODE", "require"),
            ]),
        )
        .unwrap();
        assert_eq!(c.get_ports(), &[5433]);
        assert_eq!(c.get_user(), Some("ferry"));
        assert_eq!(c.get_dbname(), Some("cat"));
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert!(pg_config_with("postgres://", env(&[("PGPORT", "x")])).is_err());
        assert!(pg_config_with("postgres://", env(&[("PGSSLMODE", "sometimes")])).is_err());
    }

    #[test]
    fn a_bad_url_is_named_without_its_password() {
        let e = pg_config_with("postgres://u:secret@h:notaport/db", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret"), "{e}");
    }
}
