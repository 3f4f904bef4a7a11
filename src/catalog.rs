//! The SQLite catalog: schema and migrations, one row per key, and the job state machine.
//!
//! States of a key's current version (DESIGN.md "The one rule"):
//!
//! ```text
//!   (ready file) -> queued -> uploading -> verified -> archived
//!                     ^          |   \
//!                     |          |    `-> failed (permanent error; retried at max interval)
//!                     `----------'  (transient error, file changed, or restart)
//!   queued/failed with the file gone -> vanished;  `ferry delete` -> deleted
//! ```
//!
//! `verified` is committed (fsynced, synchronous=FULL) before the file is moved, so a crash
//! at any point leaves either the file in the spool or a row saying S3 holds its bytes.
//! Every transition made by an upload carries the row's `gen`: a file that changed while it
//! was being uploaded bumps `gen`, and the stale upload's transitions then match no row.
//!
//! SQLite is never touched from the async executor: writes go through one writer thread that
//! commits whatever has queued up in one transaction (group commit); reads use their own
//! connections, which WAL lets run beside the writer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::Serialize;

use crate::key::Key;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("catalog: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("catalog writer has stopped")]
    Closed,
}

impl CatalogError {
    /// SQLITE_BUSY / SQLITE_LOCKED: another connection holds a lock this one needed.
    pub fn is_busy(&self) -> bool {
        let e = match self {
            CatalogError::Sql(e) | CatalogError::Open { source: e, .. } => e,
            CatalogError::Closed => return false,
        };
        matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        )
    }

    /// SQLITE_FULL: the disk holding the catalog is full.
    pub fn is_full(&self) -> bool {
        let e = match self {
            CatalogError::Sql(e) | CatalogError::Open { source: e, .. } => e,
            CatalogError::Closed => return false,
        };
        matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DiskFull))
    }
}

pub type Result<T> = std::result::Result<T, CatalogError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Uploading,
    Verified,
    Archived,
    Failed,
    Vanished,
    Deleted,
    /// Verified in S3, but the move to the archive failed; only the move is retried.
    #[serde(rename = "archive_failed")]
    ArchiveFailed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Uploading => "uploading",
            State::Verified => "verified",
            State::Archived => "archived",
            State::Failed => "failed",
            State::Vanished => "vanished",
            State::Deleted => "deleted",
            State::ArchiveFailed => "archive_failed",
        }
    }
    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "queued" => State::Queued,
            "uploading" => State::Uploading,
            "verified" => State::Verified,
            "archived" => State::Archived,
            "failed" => State::Failed,
            "vanished" => State::Vanished,
            "deleted" => State::Deleted,
            "archive_failed" => State::ArchiveFailed,
            _ => return None,
        })
    }
    /// S3 holds this key's current bytes.
    pub fn in_s3(self) -> bool {
        matches!(
            self,
            State::Verified | State::Archived | State::ArchiveFailed
        )
    }
    pub const ALL: [State; 8] = [
        State::Queued,
        State::Uploading,
        State::Verified,
        State::Archived,
        State::Failed,
        State::Vanished,
        State::Deleted,
        State::ArchiveFailed,
    ];
}

/// What identifies one version of a file on disk: if any of these change, it is a new file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FileStat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub inode: u64,
}

impl FileStat {
    pub fn of(md: &std::fs::Metadata) -> FileStat {
        use std::os::unix::fs::MetadataExt;
        FileStat {
            size: md.len(),
            mtime_ns: stat_ns(md.mtime(), md.mtime_nsec()),
            ctime_ns: stat_ns(md.ctime(), md.ctime_nsec()),
            inode: md.ino(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub key: String,
    pub state: State,
    pub stat: FileStat,
    /// Hex SHA-256 of the bytes uploaded (set once hashed).
    pub sha256: Option<String>,
    pub attempts: u32,
    /// Unix ms when the next attempt may start.
    pub next_attempt_ms: i64,
    pub last_error: Option<String>,
    pub etag: Option<String>,
    /// A multipart upload in flight, so a restart can abort it.
    pub upload_id: Option<String>,
    pub uploaded_at_ms: Option<i64>,
    pub archived_at_ms: Option<i64>,
    pub updated_at_ms: i64,
    pub queued_at_ms: i64,
    /// Bumped whenever the row starts describing a different file version.
    pub gen: i64,
}

/// A stat time in nanoseconds since the epoch. Times past 2262 (or before 1678) do not fit
/// an i64 and are pinned to its ends: a file can carry any mtime, and this runs in a scan
/// worker, where an overflow would lose the worker's whole share of the spool.
pub fn stat_ns(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

/// The wall clock `d` from now, in the catalog's milliseconds; a delay too long to add is
/// pinned at the end of time rather than wrapped to the past (which would mean "due now").
pub fn due_after(d: std::time::Duration) -> i64 {
    now_ms().saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The wall clock `d` ago, in the catalog's milliseconds; pinned like [`due_after`].
pub fn ago(d: std::time::Duration) -> i64 {
    now_ms().saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

const MIGRATIONS: &[&str] = &[
    // 1: the files table and refused names.
    "CREATE TABLE files (
        key TEXT PRIMARY KEY NOT NULL,
        state TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        ctime_ns INTEGER NOT NULL,
        inode INTEGER NOT NULL,
        sha256 TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        etag TEXT,
        upload_id TEXT,
        uploaded_at_ms INTEGER,
        archived_at_ms INTEGER,
        updated_at_ms INTEGER NOT NULL,
        queued_at_ms INTEGER NOT NULL,
        gen INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX files_due ON files(state, next_attempt_ms);
    CREATE TABLE refused (
        name TEXT PRIMARY KEY NOT NULL,
        reason TEXT NOT NULL,
        seen_at_ms INTEGER NOT NULL
    );",
    // 2: archive retention: when the archive copy was removed after S3 was re-confirmed.
    "ALTER TABLE files ADD COLUMN archive_pruned_at_ms INTEGER;",
    // 3: the uploader's queue in claim order, holding only rows waiting to go up, so taking
    //    the next few rows stays O(log n) with 100,000 queued (files_due alone made SQLite
    //    sort every waiting row on every claim).
    "CREATE INDEX files_due_order ON files(next_attempt_ms, queued_at_ms) \
     WHERE state IN ('queued', 'failed');",
    // 4: rows whose archive move failed are claimed again (for the move only), so the queue
    //    index holds them too; notices are conditions `ferry status` shows that belong to no
    //    row (files read without a lease, unreadable spool folders, conflict names).
    "DROP INDEX files_due_order;
     CREATE INDEX files_due_order ON files(next_attempt_ms, queued_at_ms) \
     WHERE state IN ('queued', 'failed', 'archive_failed');
     CREATE TABLE notices (
        topic TEXT PRIMARY KEY NOT NULL,
        message TEXT NOT NULL,
        at_ms INTEGER NOT NULL
     );",
    // 5: a change log of keys (serve invalidates its metadata per key, not wholesale; the
    //    newest 10,000 changes are kept, and a reader that fell further behind clears all)
    //    and the count of rows per state (`/metrics` and `ferry status` read it instead of
    //    counting every row), both kept by triggers in the writer's own transactions. New
    //    rows are logged too: serve caches "no row" for a spool file (not ready yet).
    //    Triggers cost per statement, so the insert path (100,000 files queued at start-up)
    //    has two and the log is pruned only every 1,000 entries.
    "CREATE TABLE changes (seq INTEGER PRIMARY KEY, key TEXT NOT NULL);
     CREATE TABLE state_counts (state TEXT PRIMARY KEY NOT NULL, n INTEGER NOT NULL);
     INSERT INTO state_counts (state, n) VALUES ('queued', 0), ('uploading', 0),
        ('verified', 0), ('archived', 0), ('failed', 0), ('vanished', 0), ('deleted', 0),
        ('archive_failed', 0);
     UPDATE state_counts SET n = (SELECT COUNT(*) FROM files WHERE files.state = state_counts.state);
     CREATE TRIGGER changes_prune AFTER INSERT ON changes WHEN NEW.seq % 1000 = 0 BEGIN
        DELETE FROM changes WHERE seq <= NEW.seq - 10000;
     END;
     CREATE TRIGGER files_ins AFTER INSERT ON files BEGIN
        INSERT INTO changes (key) VALUES (NEW.key);
        UPDATE state_counts SET n = n + 1 WHERE state = NEW.state;
     END;
     CREATE TRIGGER files_upd AFTER UPDATE ON files BEGIN
        INSERT INTO changes (key) VALUES (NEW.key);
     END;
     CREATE TRIGGER files_state AFTER UPDATE OF state ON files WHEN OLD.state != NEW.state BEGIN
        UPDATE state_counts SET n = n - 1 WHERE state = OLD.state;
        UPDATE state_counts SET n = n + 1 WHERE state = NEW.state;
     END;
     CREATE TRIGGER files_del AFTER DELETE ON files BEGIN
        INSERT INTO changes (key) VALUES (OLD.key);
        UPDATE state_counts SET n = n - 1 WHERE state = OLD.state;
     END;",
    // 6: the queue numbers `/metrics` exports on every scrape without reading every waiting
    //    row: bytes per state beside the counts, kept by the same triggers (a row's size
    //    changes with its state, or alone when a new version is queued over a queued one),
    //    and the waiting rows by arrival, so the oldest is the first entry of an index.
    "ALTER TABLE state_counts ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
     UPDATE state_counts SET bytes = (SELECT COALESCE(SUM(size), 0) FROM files
        WHERE files.state = state_counts.state);
     DROP TRIGGER files_ins;
     CREATE TRIGGER files_ins AFTER INSERT ON files BEGIN
        INSERT INTO changes (key) VALUES (NEW.key);
        UPDATE state_counts SET n = n + 1, bytes = bytes + NEW.size WHERE state = NEW.state;
     END;
     DROP TRIGGER files_state;
     CREATE TRIGGER files_state AFTER UPDATE OF state, size ON files
        WHEN OLD.state != NEW.state OR OLD.size != NEW.size BEGIN
        UPDATE state_counts SET n = n - (OLD.state != NEW.state), bytes = bytes - OLD.size
            WHERE state = OLD.state;
        UPDATE state_counts SET n = n + (OLD.state != NEW.state), bytes = bytes + NEW.size
            WHERE state = NEW.state;
     END;
     DROP TRIGGER files_del;
     CREATE TRIGGER files_del AFTER DELETE ON files BEGIN
        INSERT INTO changes (key) VALUES (OLD.key);
        UPDATE state_counts SET n = n - 1, bytes = bytes - OLD.size WHERE state = OLD.state;
     END;
     CREATE INDEX files_waiting ON files(queued_at_ms) \
     WHERE state IN ('queued', 'uploading', 'failed', 'verified', 'archive_failed');",
    // 7: the outbox of the shared catalog (`catalog.shared`): the keys whose rows changed
    //    since they were last published, one entry per key (a long outage holds one entry
    //    per changed key, never a history). Filled by a trigger on the change log, in the
    //    writer's own transaction, and only while `outbox_on` has its row: a node without a
    //    shared catalog pays one empty lookup per change.
    "CREATE TABLE outbox (key TEXT PRIMARY KEY NOT NULL, seq INTEGER NOT NULL);
     CREATE INDEX outbox_seq ON outbox(seq);
     CREATE TABLE outbox_on (one INTEGER PRIMARY KEY CHECK (one = 1));
     CREATE TRIGGER outbox_add AFTER INSERT ON changes
        WHEN EXISTS (SELECT 1 FROM outbox_on) BEGIN
        INSERT OR REPLACE INTO outbox (key, seq) VALUES (NEW.key, NEW.seq);
     END;",
    // 8: the outbox takes only changes other nodes can see: a retry (claim, attempt,
    //    next attempt, error) changes a row a dozen times an hour while S3 is down, and
    //    each entry costs an upsert and a notification to every node. Queued, uploading
    //    and failed are one published class ("still in this spool, not in S3").
    "DROP TRIGGER outbox_add;
     CREATE TRIGGER outbox_ins AFTER INSERT ON files
        WHEN EXISTS (SELECT 1 FROM outbox_on) BEGIN
        INSERT OR REPLACE INTO outbox (key, seq)
            VALUES (NEW.key, (SELECT COALESCE(MAX(seq), 0) + 1 FROM outbox));
     END;
     CREATE TRIGGER outbox_upd AFTER UPDATE ON files
        WHEN EXISTS (SELECT 1 FROM outbox_on) AND (
            (CASE WHEN OLD.state IN ('queued', 'uploading', 'failed') THEN 'local'
                ELSE OLD.state END)
            IS NOT (CASE WHEN NEW.state IN ('queued', 'uploading', 'failed') THEN 'local'
                ELSE NEW.state END)
            OR OLD.size IS NOT NEW.size OR OLD.sha256 IS NOT NEW.sha256
            OR OLD.mtime_ns IS NOT NEW.mtime_ns OR OLD.inode IS NOT NEW.inode
            OR OLD.gen IS NOT NEW.gen) BEGIN
        INSERT OR REPLACE INTO outbox (key, seq)
            VALUES (NEW.key, (SELECT COALESCE(MAX(seq), 0) + 1 FROM outbox));
     END;
     CREATE TRIGGER outbox_del AFTER DELETE ON files
        WHEN EXISTS (SELECT 1 FROM outbox_on) BEGIN
        INSERT OR REPLACE INTO outbox (key, seq)
            VALUES (OLD.key, (SELECT COALESCE(MAX(seq), 0) + 1 FROM outbox));
     END;",
];

/// The notice topic under which the syncing process records how it watches the spool:
/// "inotify", or "polling: ..." with the reason (`ferry status` shows it as `spool watch`).
pub const WATCH_NOTICE: &str = "watch";

/// The states of a file not yet archived: the queue (`ferry status`'s queue depth,
/// `ferry_queue_bytes`, `ferry_queue_oldest_seconds`). Migration 6's `files_waiting` index
/// holds exactly these rows.
pub const WAITING: [State; 5] = [
    State::Queued,
    State::Uploading,
    State::Failed,
    State::Verified,
    State::ArchiveFailed,
];

fn open_conn(path: &Path) -> Result<Connection> {
    let err = |source| CatalogError::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open(path).map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(err)?;
    // WAL lets readers run beside the writer; FULL makes each commit durable, which the
    // one rule needs for `verified`.
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(err)?;
    // Each write job runs in a savepoint inside the writer's group commit; a savepoint's
    // undo pages go to a sub-journal, by default a temp file written page by page. That was
    // a quarter of the start-up scan's time (pwrite per page). In memory it costs the pages
    // one batch touches, freed at its commit.
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(err)?;
    // Room for every statement the writer and readers run (rusqlite keeps 16 by default).
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<()> {
    // Up to date (every open but the first): no write lock at all. `ferry status`, polled
    // while the daemon writes, must not queue for the writer's lock and give up with
    // "database is locked" when the daemon is busy.
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if current as usize >= MIGRATIONS.len() {
        return Ok(());
    }
    // IMMEDIATE takes the write lock before reading the version again, so two processes
    // starting at once (a daemon and `ferry status`) cannot both apply the same migration.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
    }
    tx.commit()?;
    Ok(())
}

const ROW_COLS: &str = "key, state, size, mtime_ns, ctime_ns, inode, sha256, attempts, \
    next_attempt_ms, last_error, etag, upload_id, uploaded_at_ms, archived_at_ms, \
    updated_at_ms, queued_at_ms, gen";

fn row_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    row_from_at(r, 0)
}

/// A `Row` from `ROW_COLS` starting at column `at` (after a join's own columns).
fn row_from_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Row> {
    let state: String = r.get(at + 1)?;
    Ok(Row {
        key: r.get(at)?,
        state: State::parse(&state).unwrap_or(State::Queued),
        stat: FileStat {
            size: r.get::<_, i64>(at + 2)? as u64,
            mtime_ns: r.get(at + 3)?,
            ctime_ns: r.get(at + 4)?,
            inode: r.get::<_, i64>(at + 5)? as u64,
        },
        sha256: r.get(at + 6)?,
        attempts: r.get::<_, i64>(at + 7)? as u32,
        next_attempt_ms: r.get(at + 8)?,
        last_error: r.get(at + 9)?,
        etag: r.get(at + 10)?,
        upload_id: r.get(at + 11)?,
        uploaded_at_ms: r.get(at + 12)?,
        archived_at_ms: r.get(at + 13)?,
        updated_at_ms: r.get(at + 14)?,
        queued_at_ms: r.get(at + 15)?,
        gen: r.get(at + 16)?,
    })
}

/// Whether a ready file was new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Noted {
    /// A new row or a new version: queued.
    Queued,
    /// The catalog already has this exact file queued or in flight.
    Unchanged,
}

/// Operations on a connection or transaction. All are plain SQL; callers pick the thread.
pub mod ops {
    use super::*;

    /// `Connection::execute` prepares its statement every time; the writer runs the same
    /// few statements for every file, so they come from the statement cache.
    fn exec(c: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<usize> {
        Ok(c.prepare_cached(sql)?.execute(params)?)
    }

    pub fn get(c: &Connection, key: &str) -> Result<Option<Row>> {
        // Cached: this runs for every served miss and every poll of `sync --once`.
        let mut stmt = c.prepare_cached(&format!("SELECT {ROW_COLS} FROM files WHERE key = ?1"))?;
        Ok(stmt.query_row([key], row_from).optional()?)
    }

    /// A ready file in the spool: queue it unless the catalog already has this version.
    pub fn note_ready(c: &Connection, key: &Key, stat: FileStat) -> Result<Noted> {
        let now = now_ms();
        // A new key (the common case, and all of a full spool at start-up) is one insert;
        // only a known key is read back and compared.
        let inserted = exec(
            c,
            "INSERT INTO files (key, state, size, mtime_ns, ctime_ns, inode, \
             next_attempt_ms, updated_at_ms, queued_at_ms, gen) \
             VALUES (?1, 'queued', ?2, ?3, ?4, ?5, 0, ?6, ?6, 1) \
             ON CONFLICT(key) DO NOTHING",
            params![
                key.as_str(),
                stat.size as i64,
                stat.mtime_ns,
                stat.ctime_ns,
                stat.inode as i64,
                now
            ],
        )?;
        if inserted == 1 {
            return Ok(Noted::Queued);
        }
        let same = |r: &Row| r.stat == stat;
        match get(c, key.as_str())? {
            None => Ok(Noted::Unchanged),
            Some(r) => {
                // Our own renames (a move to the archive undone after an error) set the
                // ctime of a verified file: for rows whose bytes S3 holds, size, mtime and
                // inode decide, and the archive step re-reads the bytes when the ctime
                // moved.
                let same_file = |r: &Row| {
                    (r.stat.size, r.stat.mtime_ns, r.stat.inode)
                        == (stat.size, stat.mtime_ns, stat.inode)
                };
                let unchanged = match r.state {
                    // Archived too: a stat taken in the spool just before the archiver moved
                    // the file is the verified file itself, not a new version (requeueing it
                    // would mark a row vanished whose bytes S3 and the archive hold). A new
                    // file under the key has another inode or ctime.
                    // Archived keeps the full stat: its spool inode may be freed and reused
                    // by a new file with the same size and a preserved mtime (`cp -p`).
                    State::Queued | State::Uploading | State::Failed | State::Archived => same(&r),
                    // Still in the spool (or at its reserved name), so the inode cannot have
                    // been reused.
                    State::Verified | State::ArchiveFailed => same_file(&r),
                    // A file in the spool under a vanished or deleted key is a new version.
                    State::Vanished | State::Deleted => false,
                };
                if unchanged {
                    return Ok(Noted::Unchanged);
                }
                exec(
                    c,
                    "UPDATE files SET state = 'queued', size = ?2, mtime_ns = ?3, ctime_ns = ?4, \
                     inode = ?5, sha256 = NULL, attempts = 0, next_attempt_ms = 0, \
                     last_error = NULL, etag = NULL, updated_at_ms = ?6, queued_at_ms = ?6, \
                     archive_pruned_at_ms = NULL, gen = gen + 1 WHERE key = ?1",
                    params![
                        key.as_str(),
                        stat.size as i64,
                        stat.mtime_ns,
                        stat.ctime_ns,
                        stat.inode as i64,
                        now
                    ],
                )?;
                Ok(Noted::Queued)
            }
        }
    }

    /// Moves up to `limit` due rows (queued/failed, next attempt passed) to `uploading`,
    /// skipping keys already in flight.
    pub fn claim_due(
        c: &Connection,
        now: i64,
        limit: usize,
        in_flight: &std::collections::HashSet<String>,
    ) -> Result<Vec<Row>> {
        // No `LIMIT ?`: SQLite re-prepares a statement whose LIMIT is a bound value on every
        // run (2.9% of `sync --once`'s CPU). The index gives the order, so rows are read
        // one by one and `take` stops reading.
        let mut stmt = c.prepare_cached(&claim_sql())?;
        let rows: Vec<Row> = stmt
            .query_map(params![now], row_from)?
            .take(limit + in_flight.len())
            .collect::<rusqlite::Result<_>>()?;
        let mut out = Vec::new();
        for mut r in rows {
            if out.len() >= limit {
                break;
            }
            if in_flight.contains(&r.key) {
                continue;
            }
            // A row whose move to the archive failed is verified: it goes back to
            // `verified` and only the move is tried again, never the upload.
            let next = if r.state == State::ArchiveFailed {
                State::Verified
            } else {
                State::Uploading
            };
            exec(
                c,
                "UPDATE files SET state = ?3, attempts = attempts + 1, \
                 updated_at_ms = ?2 WHERE key = ?1",
                params![r.key, now, next.as_str()],
            )?;
            r.state = next;
            r.attempts += 1;
            out.push(r);
        }
        Ok(out)
    }

    /// The claim query (a function so a test can look at the cached statement).
    pub(crate) fn claim_sql() -> String {
        format!(
            "SELECT {ROW_COLS} FROM files INDEXED BY files_due_order \
             WHERE state IN ('queued', 'failed', 'archive_failed') \
             AND next_attempt_ms <= ?1 ORDER BY next_attempt_ms, queued_at_ms"
        )
    }

    /// The earliest time a queued or failed row becomes due, if any.
    pub fn next_due(c: &Connection) -> Result<Option<i64>> {
        let mut stmt = c.prepare_cached(
            "SELECT MIN(next_attempt_ms) FROM files INDEXED BY files_due_order \
             WHERE state IN ('queued', 'failed', 'archive_failed')",
        )?;
        Ok(stmt.query_row([], |r| r.get::<_, Option<i64>>(0))?)
    }

    pub fn set_upload_id(c: &Connection, key: &str, gen: i64, id: Option<&str>) -> Result<bool> {
        let n = exec(
            c,
            "UPDATE files SET upload_id = ?3 WHERE key = ?1 AND gen = ?2",
            params![key, gen, id],
        )?;
        Ok(n == 1)
    }

    /// S3 holds these exact bytes. Committing this is what allows the move to the archive.
    pub fn mark_verified(
        c: &Connection,
        key: &str,
        gen: i64,
        stat: FileStat,
        sha256: &str,
        etag: Option<&str>,
    ) -> Result<bool> {
        let now = now_ms();
        let mut stmt = c.prepare_cached(
            "UPDATE files SET state = 'verified', size = ?3, mtime_ns = ?4, ctime_ns = ?5, \
             inode = ?6, sha256 = ?7, etag = ?8, upload_id = NULL, last_error = NULL, \
             uploaded_at_ms = ?9, updated_at_ms = ?9 \
             WHERE key = ?1 AND gen = ?2 AND state = 'uploading'",
        )?;
        let n = stmt.execute(params![
            key,
            gen,
            stat.size as i64,
            stat.mtime_ns,
            stat.ctime_ns,
            stat.inode as i64,
            sha256,
            etag,
            now
        ])?;
        Ok(n == 1)
    }

    pub fn mark_archived(c: &Connection, key: &str, gen: i64) -> Result<bool> {
        let now = now_ms();
        let n = exec(
            c,
            "UPDATE files SET state = 'archived', archived_at_ms = ?3, updated_at_ms = ?3 \
             WHERE key = ?1 AND gen = ?2 AND state = 'verified'",
            params![key, gen, now],
        )?;
        Ok(n == 1)
    }

    /// The move to the archive failed after the upload was verified: the row keeps its
    /// verified upload, and only the move is retried at `next_attempt_ms`.
    pub fn mark_archive_failed(
        c: &Connection,
        key: &str,
        gen: i64,
        next_attempt_ms: i64,
        error: &str,
    ) -> Result<bool> {
        let n = exec(
            c,
            "UPDATE files SET state = 'archive_failed', next_attempt_ms = ?3, last_error = ?4, \
             updated_at_ms = ?5 WHERE key = ?1 AND gen = ?2 AND state = 'verified'",
            params![key, gen, next_attempt_ms, error, now_ms()],
        )?;
        Ok(n == 1)
    }

    /// Records (or replaces) a condition `ferry status` shows under `topic`.
    /// Turns the outbox on (a shared catalog is configured) or off. Turning it on queues
    /// every row once, so a node that joins a cluster publishes what it already holds;
    /// off empties it, so a node that left holds nothing for a database it no longer uses.
    /// Returns whether it changed.
    pub fn outbox_enable(c: &Connection, on: bool) -> Result<bool> {
        let was: bool = c
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM outbox_on)")?
            .query_row([], |r| r.get(0))?;
        if was == on {
            return Ok(false);
        }
        if on {
            exec(c, "INSERT INTO outbox_on (one) VALUES (1)", [])?;
            exec(
                c,
                "INSERT OR IGNORE INTO outbox (key, seq) SELECT key, 0 FROM files",
                [],
            )?;
        } else {
            exec(c, "DELETE FROM outbox_on", [])?;
            exec(c, "DELETE FROM outbox", [])?;
        }
        Ok(true)
    }

    /// The oldest `limit` outbox entries, each with its key's current row (`None`: the row
    /// is gone, so the node no longer holds the key).
    pub fn outbox_batch(c: &Connection, limit: usize) -> Result<Vec<(String, i64, Option<Row>)>> {
        let mut stmt = c.prepare_cached(
            "SELECT o.key, o.seq, f.key, f.state, f.size, f.mtime_ns, f.ctime_ns, f.inode, \
             f.sha256, f.attempts, f.next_attempt_ms, f.last_error, f.etag, f.upload_id, \
             f.uploaded_at_ms, f.archived_at_ms, f.updated_at_ms, f.queued_at_ms, f.gen \
             FROM outbox o LEFT JOIN files f ON f.key = o.key ORDER BY o.seq LIMIT ?1",
        )?;
        let v = stmt
            .query_map([limit as i64], |r| {
                let key: String = r.get(0)?;
                let seq: i64 = r.get(1)?;
                let present: Option<String> = r.get(2)?;
                let row = match present {
                    Some(_) => Some(row_from_at(r, 2)?),
                    None => None,
                };
                Ok((key, seq, row))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(v)
    }

    /// Drops the published entries, each only if it was not changed again meanwhile (its
    /// seq is the one published): a newer change stays and is published next.
    pub fn outbox_done(c: &Connection, done: &[(String, i64)]) -> Result<()> {
        for (key, seq) in done {
            exec(
                c,
                "DELETE FROM outbox WHERE key = ?1 AND seq = ?2",
                params![key, seq],
            )?;
        }
        Ok(())
    }

    /// Entries waiting to be published.
    pub fn outbox_len(c: &Connection) -> Result<u64> {
        let n: i64 = c
            .prepare_cached("SELECT COUNT(*) FROM outbox")?
            .query_row([], |r| r.get(0))?;
        Ok(n as u64)
    }

    pub fn set_notice(c: &Connection, topic: &str, message: &str) -> Result<()> {
        exec(
            c,
            "INSERT INTO notices (topic, message, at_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT(topic) DO UPDATE SET message = ?2, at_ms = ?3",
            params![topic, message, now_ms()],
        )?;
        Ok(())
    }

    /// Drops every notice whose topic starts with `prefix` and is not in `keep`.
    pub fn clear_notices(
        c: &Connection,
        prefix: &str,
        keep: &std::collections::HashSet<String>,
    ) -> Result<()> {
        let topics: Vec<String> = {
            let mut stmt =
                c.prepare_cached("SELECT topic FROM notices WHERE topic >= ?1 AND topic < ?2")?;
            let end = format!("{prefix}\u{10FFFF}");
            let v = stmt
                .query_map(params![prefix, end], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            v
        };
        for t in topics {
            if !keep.contains(&t) {
                exec(c, "DELETE FROM notices WHERE topic = ?1", [&t])?;
            }
        }
        Ok(())
    }

    pub fn notices(c: &Connection) -> Result<Vec<Notice>> {
        let mut stmt = c.prepare("SELECT topic, message, at_ms FROM notices ORDER BY topic")?;
        let v = stmt
            .query_map([], |r| {
                Ok(Notice {
                    topic: r.get(0)?,
                    message: r.get(1)?,
                    at_ms: r.get(2)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(v)
    }

    /// Back to the queue: the file changed, or a transient error; `error` is shown in status.
    pub fn requeue(
        c: &Connection,
        key: &str,
        gen: i64,
        next_attempt_ms: i64,
        error: Option<&str>,
    ) -> Result<bool> {
        let n = exec(
            c,
            "UPDATE files SET state = 'queued', next_attempt_ms = ?3, last_error = ?4, \
             updated_at_ms = ?5 WHERE key = ?1 AND gen = ?2 AND state IN ('uploading', 'verified')",
            params![key, gen, next_attempt_ms, error, now_ms()],
        )?;
        Ok(n == 1)
    }

    /// A permanent error: kept, visible, retried at the max interval.
    pub fn mark_failed(
        c: &Connection,
        key: &str,
        gen: i64,
        next_attempt_ms: i64,
        error: &str,
    ) -> Result<bool> {
        let n = exec(
            c,
            "UPDATE files SET state = 'failed', next_attempt_ms = ?3, last_error = ?4, \
             updated_at_ms = ?5 WHERE key = ?1 AND gen = ?2 AND state = 'uploading'",
            params![key, gen, next_attempt_ms, error, now_ms()],
        )?;
        Ok(n == 1)
    }

    pub fn mark_vanished(c: &Connection, key: &str, gen: i64) -> Result<bool> {
        let n = exec(
            c,
            "UPDATE files SET state = 'vanished', upload_id = NULL, updated_at_ms = ?3 \
             WHERE key = ?1 AND gen = ?2 AND state IN ('queued', 'uploading', 'failed')",
            params![key, gen, now_ms()],
        )?;
        Ok(n == 1)
    }

    /// Tombstones a key; returns the row as it was.
    pub fn mark_deleted(c: &Connection, key: &str) -> Result<Option<Row>> {
        let row = get(c, key)?;
        if row.is_some() {
            exec(
                c,
                "UPDATE files SET state = 'deleted', updated_at_ms = ?2, gen = gen + 1 \
                 WHERE key = ?1",
                params![key, now_ms()],
            )?;
        }
        Ok(row)
    }

    pub fn note_refused(c: &Connection, name: &str, reason: &str) -> Result<bool> {
        let n = exec(
            c,
            "INSERT INTO refused (name, reason, seen_at_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT(name) DO NOTHING",
            params![name, reason, now_ms()],
        )?;
        Ok(n == 1)
    }

    pub fn forget_refused(c: &Connection, name: &str) -> Result<()> {
        exec(c, "DELETE FROM refused WHERE name = ?1", [name])?;
        Ok(())
    }

    pub fn refused(c: &Connection) -> Result<Vec<(String, String)>> {
        let mut stmt = c.prepare("SELECT name, reason FROM refused ORDER BY name")?;
        let v = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(v)
    }

    pub fn rows_in(c: &Connection, states: &[State]) -> Result<Vec<Row>> {
        let list = states
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(",");
        let mut stmt = c.prepare(&format!(
            "SELECT {ROW_COLS} FROM files WHERE state IN ({list}) ORDER BY key"
        ))?;
        let v = stmt
            .query_map([], row_from)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(v)
    }

    /// Makes a waiting row due now (`sync --once`); a failed row goes back to queued.
    pub fn retry_now(c: &Connection, key: &str) -> Result<()> {
        exec(
            c,
            "UPDATE files SET state = CASE state WHEN 'failed' THEN 'queued' ELSE state END, \
             last_error = CASE state WHEN 'archive_failed' THEN NULL ELSE last_error END, \
             next_attempt_ms = 0 WHERE key = ?1 AND state IN ('queued', 'failed', 'archive_failed')",
            [key],
        )?;
        Ok(())
    }

    /// Keys changed after `after` (a change-log sequence number), oldest first, at most
    /// `limit`; and whether entries after `after` were already pruned (the reader fell
    /// behind and must forget everything). Returns the last sequence number seen.
    pub fn changes_since(
        c: &Connection,
        after: i64,
        limit: usize,
    ) -> Result<(Vec<String>, i64, bool)> {
        let oldest: Option<i64> = c
            .prepare_cached("SELECT MIN(seq) FROM changes")?
            .query_row([], |r| r.get(0))?;
        let gap = oldest.is_some_and(|o| o > after + 1);
        let mut stmt =
            c.prepare_cached("SELECT seq, key FROM changes WHERE seq > ?1 ORDER BY seq")?;
        let mut last = after;
        let mut keys = Vec::new();
        // `take`, not `LIMIT ?` (re-prepared on every run); seq is the rowid, so in order.
        for r in stmt
            .query_map(params![after], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })?
            .take(limit)
        {
            let (seq, key) = r?;
            last = seq;
            keys.push(key);
        }
        Ok((keys, last, gap))
    }

    /// The newest change-log sequence number (0 when empty).
    pub fn last_change(c: &Connection) -> Result<i64> {
        Ok(
            c.prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM changes")?
                .query_row([], |r| r.get(0))?,
        )
    }

    /// Archived rows whose copy is still kept, archived at or after `since_ms`; with
    /// `sample`, that many chosen at random.
    pub fn archived_rows(c: &Connection, since_ms: i64, sample: Option<usize>) -> Result<Vec<Row>> {
        let tail = match sample {
            Some(n) => format!("ORDER BY random() LIMIT {n}"),
            None => "ORDER BY key".to_string(),
        };
        let mut stmt = c.prepare(&format!(
            "SELECT {ROW_COLS} FROM files WHERE state = 'archived' AND archived_at_ms >= ?1 \
             AND archive_pruned_at_ms IS NULL {tail}"
        ))?;
        let v = stmt
            .query_map(params![since_ms], row_from)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(v)
    }

    /// Archived rows whose archive copy is older than `before_ms` and still kept.
    pub fn prunable(c: &Connection, before_ms: i64, limit: usize) -> Result<Vec<Row>> {
        let mut stmt = c.prepare(&format!(
            "SELECT {ROW_COLS} FROM files WHERE state = 'archived' AND archived_at_ms < ?1 \
             AND archive_pruned_at_ms IS NULL ORDER BY archived_at_ms LIMIT ?2"
        ))?;
        let v = stmt
            .query_map(params![before_ms, limit as i64], row_from)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(v)
    }

    pub fn mark_pruned(c: &Connection, key: &str, gen: i64) -> Result<()> {
        exec(
            c,
            "UPDATE files SET archive_pruned_at_ms = ?3 WHERE key = ?1 AND gen = ?2",
            params![key, gen, now_ms()],
        )?;
        Ok(())
    }

    /// Start-up repair: nothing is in flight, so `uploading` goes back to `queued`.
    pub fn reset_uploading(c: &Connection) -> Result<usize> {
        exec(
            c,
            "UPDATE files SET state = 'queued', next_attempt_ms = 0 WHERE state = 'uploading'",
            [],
        )
    }

    pub fn clear_upload_id(c: &Connection, key: &str, id: &str) -> Result<()> {
        exec(
            c,
            "UPDATE files SET upload_id = NULL WHERE key = ?1 AND upload_id = ?2",
            params![key, id],
        )?;
        Ok(())
    }

    /// The queue numbers, cheap enough for every `/metrics` scrape: the per-state counts and
    /// bytes the triggers keep, and the oldest waiting row as the first entry of
    /// `files_waiting` (one index probe however long the queue is).
    pub fn gauges(c: &Connection) -> Result<Gauges> {
        let mut counts = BTreeMap::new();
        let mut bytes = BTreeMap::new();
        for s in State::ALL {
            counts.insert(s.as_str().to_string(), 0u64);
            bytes.insert(s.as_str().to_string(), 0u64);
        }
        // Kept by triggers: counting every row per scrape cost a full scan of millions.
        let mut stmt = c.prepare_cached("SELECT state, n, bytes FROM state_counts")?;
        for r in stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })? {
            let (s, n, b) = r?;
            counts.insert(s.clone(), n.max(0) as u64);
            bytes.insert(s, b.max(0) as u64);
        }
        let waiting = |m: &BTreeMap<String, u64>| -> u64 {
            WAITING
                .iter()
                .map(|s| m.get(s.as_str()).copied().unwrap_or(0))
                .sum()
        };
        let (queue_depth, queued_bytes) = (waiting(&counts), waiting(&bytes));
        Ok(Gauges {
            counts,
            bytes,
            queue_depth,
            queued_bytes,
            oldest_queued_ms: oldest_waiting(c)?,
        })
    }

    /// When the longest-waiting file not yet archived was queued. INDEXED BY: a catalog
    /// without the index fails here rather than quietly reading every waiting row.
    pub fn oldest_waiting(c: &Connection) -> Result<Option<i64>> {
        Ok(c.prepare_cached(OLDEST_WAITING_SQL)?
            .query_row([], |r| r.get(0))
            .optional()?)
    }

    pub fn status(c: &Connection) -> Result<Status> {
        let g = gauges(c)?;
        let mut stmt = c.prepare(&format!(
            "SELECT {ROW_COLS} FROM files WHERE last_error IS NOT NULL \
             AND state IN ('queued', 'uploading', 'failed', 'verified', 'archive_failed') \
             ORDER BY updated_at_ms DESC LIMIT 20"
        ))?;
        let errors = stmt
            .query_map([], row_from)?
            .collect::<rusqlite::Result<Vec<_>>>()?
            .into_iter()
            .map(|r| ErrorLine {
                key: r.key,
                state: r.state,
                attempts: r.attempts,
                error: r.last_error.unwrap_or_default(),
                next_attempt_ms: r.next_attempt_ms,
            })
            .collect();
        let refused = refused(c)?
            .into_iter()
            .map(|(name, reason)| RefusedLine { name, reason })
            .collect();
        let (watch, notices): (Vec<Notice>, Vec<Notice>) = notices(c)?
            .into_iter()
            .partition(|n| n.topic == WATCH_NOTICE);
        let spool_watch = watch.into_iter().next().map(|n| SpoolWatch {
            mode: if n.message == "inotify" {
                "inotify"
            } else {
                "polling"
            },
            detail: n.message,
            since_ms: n.at_ms,
        });
        let outbox_on: bool = c
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM outbox_on)")?
            .query_row([], |r| r.get(0))?;
        let outbox = if outbox_on {
            Some(outbox_len(c)?)
        } else {
            None
        };
        Ok(Status {
            outbox,
            notices,
            spool_watch,
            counts: g.counts,
            queue_depth: g.queue_depth,
            queued_bytes: g.queued_bytes,
            oldest_queued_ms: g.oldest_queued_ms,
            errors,
            refused,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorLine {
    pub key: String,
    pub state: State,
    pub attempts: u32,
    pub error: String,
    pub next_attempt_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RefusedLine {
    pub name: String,
    pub reason: String,
}

/// The queue numbers `/metrics` exports (`ops::gauges`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Gauges {
    pub counts: BTreeMap<String, u64>,
    /// Sum of the sizes of the rows in each state.
    pub bytes: BTreeMap<String, u64>,
    pub queue_depth: u64,
    pub queued_bytes: u64,
    pub oldest_queued_ms: Option<i64>,
}

/// The oldest waiting row: the first entry of the partial index `files_waiting`, whose
/// WHERE this repeats word for word (SQLite uses a partial index only when the query's
/// WHERE implies the index's).
const OLDEST_WAITING_SQL: &str = "SELECT queued_at_ms FROM files INDEXED BY files_waiting \
    WHERE state IN ('queued', 'uploading', 'failed', 'verified', 'archive_failed') \
    ORDER BY queued_at_ms LIMIT 1";

/// What `ferry status` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub counts: BTreeMap<String, u64>,
    /// Files not yet archived (queued + uploading + failed + verified + archive_failed).
    pub queue_depth: u64,
    pub queued_bytes: u64,
    pub oldest_queued_ms: Option<i64>,
    pub errors: Vec<ErrorLine>,
    pub refused: Vec<RefusedLine>,
    /// Conditions that belong to no row: no leases, unreadable spool entries, bytes put
    /// aside as unverified.
    pub notices: Vec<Notice>,
    /// How the syncing process last said it watches the spool; None if none ever ran.
    pub spool_watch: Option<SpoolWatch>,
    /// Changes not yet published to the shared catalog; None when it is not in use.
    pub outbox: Option<u64>,
}

/// The spool's watch mode as the syncing process recorded it (`WATCH_NOTICE`).
#[derive(Debug, Clone, Serialize)]
pub struct SpoolWatch {
    /// "inotify", or "polling" while the kernel refuses a watch.
    pub mode: &'static str,
    pub detail: String,
    /// When this mode began (or the process that recorded it started).
    pub since_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Notice {
    pub topic: String,
    pub message: String,
    pub at_ms: i64,
}

/// Runs inside the batch transaction and returns what to do once the commit is known, so no
/// caller hears "done" before its change is durable.
type Job = Box<dyn FnOnce(&Transaction<'_>) -> Reply + Send>;
type Reply = Box<dyn FnOnce(Option<&rusqlite::Error>) + Send>;

/// The async face of the catalog: one writer thread with group commit, plus read connections.
#[derive(Clone)]
pub struct Catalog {
    tx: mpsc::Sender<Job>,
    readers: Arc<Vec<Mutex<Connection>>>,
    /// Its own connection: `data_version` is per connection, so it must always be one.
    version_conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

const READERS: usize = 4;

type Conns = (Connection, Vec<Mutex<Connection>>, Arc<Mutex<Connection>>);

/// Opens the writer (migrated) and reader connections. Two processes opening a new catalog
/// at once (the daemon starting while `ferry status` is polled) can get SQLITE_BUSY straight
/// away, without the busy handler: switching a new file to WAL needs it to themselves. That
/// is a moment's contention, not an error: try again for up to the busy timeout.
fn open_all_retrying(path: &Path) -> Result<Conns> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut pause = std::time::Duration::from_millis(5);
    loop {
        match open_all(path) {
            Err(e) if e.is_busy() && std::time::Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(200));
            }
            r => return r,
        }
    }
}

fn open_all(path: &Path) -> Result<Conns> {
    let mut conn = open_conn(path)?;
    migrate(&mut conn)?;
    let mut readers = Vec::with_capacity(READERS);
    for _ in 0..READERS {
        let r = open_conn(path)?;
        r.pragma_update(None, "query_only", true)?;
        readers.push(Mutex::new(r));
    }
    let version_conn = Arc::new(Mutex::new(open_conn(path)?));
    Ok((conn, readers, version_conn))
}
/// Most jobs committed together; bounds the latency one commit adds to the first job.
const BATCH: usize = 256;

impl Catalog {
    /// Opens (creating if needed) and migrates the catalog, and starts its writer thread.
    pub fn open(path: &Path) -> Result<Catalog> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|e| CatalogError::Open {
                    path: path.to_path_buf(),
                    source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
                })?;
            }
        }
        let (conn, readers, version_conn) = open_all_retrying(path)?;
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("ferry-catalog".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| CatalogError::Open {
                path: path.to_path_buf(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok(Catalog {
            tx,
            readers: Arc::new(readers),
            version_conn,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in the writer's next transaction and waits for the commit.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (otx, orx) = tokio::sync::oneshot::channel();
        self.send_job(f, move |r| {
            let _ = otx.send(r);
        })?;
        orx.await.map_err(|_| CatalogError::Closed)?
    }

    /// The blocking form of `write`, for threads that are not on the executor.
    pub fn write_blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (otx, orx) = mpsc::channel();
        self.send_job(f, move |r| {
            let _ = otx.send(r);
        })?;
        orx.recv().map_err(|_| CatalogError::Closed)?
    }

    fn send_job<T, F, R>(&self, f: F, reply: R) -> Result<()>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
        R: FnOnce(Result<T>) + Send + 'static,
    {
        let job: Job = Box::new(move |tx: &Transaction<'_>| {
            // A savepoint per job, so one failing job does not undo its batch-mates.
            // Cached statements: `execute_batch` would parse the SQL again for every job.
            let step = |sql: &str| -> rusqlite::Result<()> {
                tx.prepare_cached(sql)?.execute([]).map(|_| ())
            };
            let res = (|| {
                step("SAVEPOINT job")?;
                match f(tx) {
                    Ok(out) => {
                        step("RELEASE job")?;
                        Ok(out)
                    }
                    Err(e) => {
                        step("ROLLBACK TO job")?;
                        step("RELEASE job")?;
                        Err(e)
                    }
                }
            })();
            Box::new(
                move |commit_err: Option<&rusqlite::Error>| match (res, commit_err) {
                    (Ok(v), None) => reply(Ok(v)),
                    (Ok(_), Some(e)) => reply(Err(CatalogError::Sql(clone_err(e)))),
                    (Err(e), _) => reply(Err(e)),
                },
            )
        });
        self.tx.send(job).map_err(|_| CatalogError::Closed)
    }

    /// Runs a read on one of the read connections, on a blocking thread.
    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.read_blocking(f))
            .await
            .map_err(|_| CatalogError::Closed)?
    }

    /// A read from a blocking thread: takes a free reader, or waits for the first one.
    pub fn read_blocking<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Connection) -> Result<T>,
    {
        for m in self.readers.iter() {
            if let Ok(c) = m.try_lock() {
                return f(&c);
            }
        }
        let c = self.readers[0].lock().unwrap_or_else(|p| p.into_inner());
        f(&c)
    }

    /// SQLite's `data_version` as seen by a reader: changes when another connection (in
    /// this process or another) commits.
    pub fn data_version(&self) -> Result<i64> {
        let c = self.version_conn.lock().unwrap_or_else(|p| p.into_inner());
        Ok(c.pragma_query_value(None, "data_version", |r| r.get(0))?)
    }
}

/// rusqlite errors are not Clone; keep the code (for `is_full`) and the message.
fn clone_err(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, msg) => {
            rusqlite::Error::SqliteFailure(*code, msg.clone())
        }
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    }
}

/// Commits everything queued so far in one transaction: one fsync for many files.
fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        match conn.transaction() {
            Ok(tx) => {
                let replies: Vec<Reply> = batch.into_iter().map(|job| job(&tx)).collect();
                let res = tx.commit();
                if let Err(e) = &res {
                    tracing::error!(error = %e, "catalog commit failed");
                }
                for r in replies {
                    r(res.as_ref().err());
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "catalog: cannot begin a transaction");
                // Dropping the jobs drops their reply channels: callers see Closed.
                drop(batch);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Key;

    /// Any mtime a file can carry is a FileStat: one past 2262 overflowed the nanosecond sum
    /// (a panic in a scan worker, whose files were then dropped from the scan).
    #[test]
    fn far_future_mtimes_do_not_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = std::fs::File::create(&p).unwrap();
        let year_2400 = std::time::UNIX_EPOCH + std::time::Duration::new(13_569_465_600, 5);
        f.set_modified(year_2400).unwrap();
        let st = FileStat::of(&f.metadata().unwrap());
        assert_eq!(st.mtime_ns, i64::MAX);
        assert_eq!(stat_ns(13_569_465_600, 5), i64::MAX);
        assert_eq!(stat_ns(9_223_372_036, 999_999_999), i64::MAX);
        assert_eq!(stat_ns(-10_000_000_000, 0), i64::MIN);
        assert_eq!(stat_ns(1, 5), 1_000_000_005);
        assert_eq!(due_after(std::time::Duration::MAX), i64::MAX);
        assert!(ago(std::time::Duration::MAX) < 0);
    }

    fn stat(i: u64) -> FileStat {
        FileStat {
            size: i,
            mtime_ns: i as i64,
            ctime_ns: i as i64,
            inode: i,
        }
    }

    /// The outbox holds one entry per changed key (never a history), only while turned
    /// on; turning it on queues every row once; a publish clears an entry only if the key
    /// did not change again meanwhile.
    #[test]
    fn the_outbox_keeps_the_latest_change_per_key_and_survives_a_publish_race() {
        let t = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&t.path().join("c.db")).unwrap();
        cat.write_blocking(|c| {
            let a = Key::new("a.jpg", "").unwrap();
            let b = Key::new("b.jpg", "").unwrap();
            ops::note_ready(c, &a, stat(1))?;
            assert_eq!(ops::outbox_len(c)?, 0, "off: nothing is recorded");
            assert!(ops::outbox_enable(c, true)?);
            assert!(!ops::outbox_enable(c, true)?);
            assert_eq!(ops::outbox_len(c)?, 1, "on: every existing row once");
            for i in 2..50 {
                ops::note_ready(c, &b, stat(i))?;
            }
            assert_eq!(ops::outbox_len(c)?, 2, "one entry per key");
            let batch = ops::outbox_batch(c, 10)?;
            let row_b = batch.iter().find(|(k, _, _)| k == "b.jpg").unwrap();
            assert_eq!(row_b.2.as_ref().unwrap().stat.size, 49, "the current row");
            // b changes again after the batch was read: clearing the batch keeps it.
            ops::note_ready(c, &b, stat(60))?;
            let done: Vec<(String, i64)> = batch.iter().map(|(k, s, _)| (k.clone(), *s)).collect();
            ops::outbox_done(c, &done)?;
            let left = ops::outbox_batch(c, 10)?;
            assert_eq!(left.len(), 1);
            assert_eq!(left[0].0, "b.jpg");
            assert_eq!(left[0].2.as_ref().unwrap().stat.size, 60);
            // A removed row is published as gone.
            c.execute("DELETE FROM files WHERE key = 'a.jpg'", [])?;
            let gone = ops::outbox_batch(c, 10)?;
            assert!(gone.iter().any(|(k, _, r)| k == "a.jpg" && r.is_none()));
            // A retry's bookkeeping is nothing other nodes see: no entry.
            let left = ops::outbox_batch(c, 10)?;
            ops::outbox_done(
                c,
                &left
                    .iter()
                    .map(|(k, s, _)| (k.clone(), *s))
                    .collect::<Vec<_>>(),
            )?;
            c.execute(
                "UPDATE files SET state = 'uploading', attempts = attempts + 1, \
                 next_attempt_ms = 5, last_error = 'x' WHERE key = 'b.jpg'",
                [],
            )?;
            c.execute("UPDATE files SET state = 'failed' WHERE key = 'b.jpg'", [])?;
            assert_eq!(ops::outbox_len(c)?, 0, "retries are not published");
            c.execute(
                "UPDATE files SET state = 'verified', sha256 = 'ab' WHERE key = 'b.jpg'",
                [],
            )?;
            assert_eq!(ops::outbox_len(c)?, 1, "reaching S3 is");
            assert!(ops::outbox_enable(c, false)?);
            assert_eq!(ops::outbox_len(c)?, 0, "off empties it");
            ops::note_ready(c, &b, stat(70))?;
            assert_eq!(ops::outbox_len(c)?, 0);
            Ok(())
        })
        .unwrap();
    }

    /// The per-state counts kept by triggers (what `/metrics` and `ferry status` read instead
    /// of counting every row) equal a real count after every kind of state change.
    #[test]
    fn state_counts_follow_every_change() {
        let t = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&t.path().join("c.db")).unwrap();
        cat.write_blocking(|c| {
            type Real = BTreeMap<String, (u64, u64)>;
            let real = |c: &Connection| -> Result<Real> {
                let mut stmt =
                    c.prepare("SELECT state, COUNT(*), SUM(size) FROM files GROUP BY state")?;
                let v = stmt
                    .query_map([], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            (r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64),
                        ))
                    })?
                    .collect::<rusqlite::Result<Real>>()?;
                Ok(v)
            };
            let check = |c: &Connection, when: &str| -> Result<()> {
                let want = real(c)?;
                let g = ops::gauges(c)?;
                let got: Real = g
                    .counts
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(s, n)| (s.clone(), (*n, g.bytes[s])))
                    .collect();
                assert_eq!(got, want, "after {when}");
                // Bytes of rows in no state are none.
                assert!(g.counts.iter().all(|(s, n)| *n > 0 || g.bytes[s] == 0));
                let waiting: (u64, u64) = WAITING
                    .iter()
                    .filter_map(|s| want.get(s.as_str()))
                    .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
                assert_eq!((g.queue_depth, g.queued_bytes), waiting, "after {when}");
                let st = ops::status(c)?;
                assert_eq!((st.queue_depth, st.queued_bytes), waiting, "after {when}");
                Ok(())
            };
            for i in 0..20u64 {
                ops::note_ready(c, &Key::new(&format!("k{i:02}"), "").unwrap(), stat(i))?;
            }
            check(c, "queueing")?;
            let rows = ops::claim_due(c, now_ms(), 10, &Default::default())?;
            check(c, "claims")?;
            for r in &rows[..5] {
                ops::mark_verified(c, &r.key, r.gen, r.stat, "00", None)?;
            }
            check(c, "verified")?;
            for r in &rows[..3] {
                ops::mark_archived(c, &r.key, r.gen)?;
            }
            ops::mark_archive_failed(c, &rows[3].key, rows[3].gen, 0, "EROFS")?;
            ops::mark_failed(c, &rows[5].key, rows[5].gen, 0, "denied")?;
            ops::mark_vanished(c, &rows[6].key, rows[6].gen)?;
            check(c, "outcomes")?;
            ops::mark_deleted(c, &rows[0].key)?;
            // A new version of an archived key.
            ops::note_ready(c, &Key::new(&rows[1].key, "").unwrap(), stat(99))?;
            ops::reset_uploading(c)?;
            check(c, "delete, re-drop, recovery")?;
            // A new version over a queued row: same state, other size.
            ops::note_ready(c, &Key::new(&rows[1].key, "").unwrap(), stat(12345))?;
            // And a verified upload whose stat is taken again (size updated with the state).
            let again = ops::claim_due(c, now_ms(), 1, &Default::default())?;
            let mut bigger = again[0].stat;
            bigger.size += 7;
            ops::mark_verified(c, &again[0].key, again[0].gen, bigger, "00", None)?;
            check(c, "size changes")?;
            c.execute("DELETE FROM files WHERE key = ?1", [&rows[2].key])?;
            check(c, "a row removed")?;
            Ok(())
        })
        .unwrap();
    }

    /// `/metrics` reads the oldest waiting row on every scrape: it must come from the
    /// `files_waiting` index in a handful of steps however many rows wait, never from a
    /// scan of the table or of the waiting rows.
    #[test]
    fn oldest_waiting_is_one_index_probe() {
        let t = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&t.path().join("c.db")).unwrap();
        cat.write_blocking(|c| {
            assert_eq!(ops::oldest_waiting(c)?, None);
            for i in 0..5_000u64 {
                ops::note_ready(c, &Key::new(&format!("k{i:05}"), "").unwrap(), stat(i))?;
            }
            // Spread the arrival times; the oldest waiting one is k02500 once the first
            // 2,500 are archived (their queued_at_ms stays, but they no longer wait).
            c.execute(
                "UPDATE files SET queued_at_ms = 1000000 + CAST(substr(key, 2) AS INTEGER)",
                [],
            )?;
            c.execute(
                "UPDATE files SET state = 'archived' WHERE CAST(substr(key, 2) AS INTEGER) < 2500",
                [],
            )?;
            assert_eq!(ops::oldest_waiting(c)?, Some(1_002_500));
            let plan: Vec<String> = c
                .prepare(&format!("EXPLAIN QUERY PLAN {OLDEST_WAITING_SQL}"))?
                .query_map([], |r| r.get::<_, String>(3))?
                .collect::<rusqlite::Result<_>>()?;
            assert!(
                plan.iter().any(|p| p.contains("INDEX files_waiting"))
                    && plan.iter().all(|p| !p.contains("TEMP B-TREE")),
                "{plan:?}"
            );
            // The plan could still walk the whole index: count what it really does.
            let mut stmt = c.prepare(OLDEST_WAITING_SQL)?;
            let _: Option<i64> = stmt.query_row([], |r| r.get(0)).optional()?;
            let steps = stmt.get_status(rusqlite::StatementStatus::VmStep);
            let full = stmt.get_status(rusqlite::StatementStatus::FullscanStep);
            assert!(
                steps < 100 && full < 10,
                "{steps} VM steps, {full} full-scan steps"
            );
            Ok(())
        })
        .unwrap();
    }

    /// The uploader takes due rows oldest-due first, skipping those in flight and not yet due,
    /// from the partial index (a plan without a sort over every waiting row).
    #[test]
    fn claims_come_from_the_queue_index_in_due_order() {
        let t = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&t.path().join("c.db")).unwrap();
        let claimed = cat
            .write_blocking(|c| {
                for i in 0..50u64 {
                    let key = Key::new(&format!("k{i:02}"), "").unwrap();
                    ops::note_ready(c, &key, stat(i))?;
                }
                // k00..k09 claimed and pushed back with later due times (k00 latest).
                let first = ops::claim_due(c, now_ms(), 10, &Default::default())?;
                for r in &first {
                    let n: i64 = r.key[1..].parse().unwrap();
                    ops::requeue(c, &r.key, r.gen, 1_000 + (10 - n), Some("later"))?;
                }
                let busy: std::collections::HashSet<String> = ["k10".to_string()].into();
                let mut out = ops::claim_due(c, 5_000, 3, &busy)?;
                out.extend(ops::claim_due(c, 5_000, 100, &busy)?);
                let plan: Vec<String> = c
                    .prepare(
                        "EXPLAIN QUERY PLAN SELECT key FROM files INDEXED BY files_due_order \
                         WHERE state IN ('queued', 'failed', 'archive_failed') \
                         AND next_attempt_ms <= 1 \
                         ORDER BY next_attempt_ms, queued_at_ms",
                    )?
                    .query_map([], |r| r.get::<_, String>(3))?
                    .collect::<rusqlite::Result<_>>()?;
                // Rows come in index order, so reading stops after the few taken.
                assert!(plan.iter().all(|p| !p.contains("TEMP B-TREE")), "{plan:?}");
                // A bound `LIMIT ?` made SQLite compile the claim again on every run.
                let reprepared = c
                    .prepare_cached(&ops::claim_sql())?
                    .get_status(rusqlite::StatementStatus::RePrepare);
                assert_eq!(reprepared, 0, "the claim statement is compiled once");
                Ok(out.into_iter().map(|r| r.key).collect::<Vec<_>>())
            })
            .unwrap();
        // Due at 0 first (k11..k49, k10 in flight), then the requeued ones by due time.
        let mut want: Vec<String> = (11..50).map(|i| format!("k{i:02}")).collect();
        want.extend((1..=9).rev().map(|i| format!("k{i:02}")));
        want.push("k00".into());
        assert_eq!(claimed[..3], want[..3]);
        assert_eq!(claimed, want);
    }

    /// Opening an up-to-date catalog (what `ferry status` does beside a running daemon) must
    /// not need the write lock: here another connection holds it for the whole open, and the
    /// open and a read still succeed.
    #[test]
    fn opening_a_current_catalog_does_not_wait_for_the_writer() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("c.db");
        drop(Catalog::open(&path).unwrap());
        let busy = open_conn(&path).unwrap();
        busy.execute_batch("BEGIN IMMEDIATE").unwrap();
        let cat = Catalog::open(&path).expect("open while another process writes");
        let st = cat
            .read_blocking(ops::status)
            .expect("read while another process writes");
        assert!(st.counts.iter().all(|(_, n)| *n == 0));
        busy.execute_batch("ROLLBACK").unwrap();
    }

    /// Several openers of a brand-new catalog at once (a daemon starting while `ferry status`
    /// is polled) all succeed: the moment's lock contention of the switch to WAL is waited out.
    #[test]
    fn simultaneous_first_opens_all_succeed() {
        for round in 0..5 {
            let t = tempfile::tempdir().unwrap();
            let path = t.path().join("c.db");
            let gate = std::sync::Barrier::new(8);
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|_| {
                        s.spawn(|| {
                            gate.wait();
                            Catalog::open(&path).map(|_| ())
                        })
                    })
                    .collect();
                for h in handles {
                    let r = h.join().unwrap();
                    assert!(r.is_ok(), "round {round}: {r:?}");
                }
            });
        }
    }

    /// A rescan's stat, taken in the spool just before the archiver moved the file, names
    /// the archived version itself: it must not requeue the row (the uploader would then find
    /// no file and mark verified bytes vanished). A new file under the key must.
    #[test]
    fn stale_stat_of_the_archived_file_is_not_a_new_version() {
        let t = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&t.path().join("c.db")).unwrap();
        let key = Key::new("a.jpg", "").unwrap();
        let (stale, fresh) = cat
            .write_blocking(move |c| {
                assert_eq!(ops::note_ready(c, &key, stat(7))?, Noted::Queued);
                let row = ops::claim_due(c, now_ms(), 1, &Default::default())?.remove(0);
                assert!(ops::mark_verified(
                    c,
                    "a.jpg",
                    row.gen,
                    stat(7),
                    &"0".repeat(64),
                    None
                )?);
                assert!(ops::mark_archived(c, "a.jpg", row.gen)?);
                let stale = ops::note_ready(c, &key, stat(7))?;
                let fresh = ops::note_ready(c, &key, stat(8))?;
                Ok((stale, fresh))
            })
            .unwrap();
        assert_eq!(stale, Noted::Unchanged);
        assert_eq!(fresh, Noted::Queued);
    }
}
