//! Nodes of a cluster with a shared catalog (tests/cluster.rs, tests/cluster_review.rs):
//! a node's environment, drops that are ready at once, and bounded polling.

use std::time::{Duration, Instant};

use super::{Daemon, Env};

/// A node's environment: its own spool, archive and catalog, the shared catalog at
/// `pg_url`, and an S3 endpoint (a dead one holds its uploads back).
pub fn node_env(name: &str, s3_endpoint: &str, bucket: &str, pg_url: &str) -> Env {
    let mut e = Env::new(s3_endpoint, bucket);
    e.set("FERRY_HTTP_NODE_NAME", name)
        .set("FERRY_CATALOG_SHARED", pg_url)
        // Fewer threads: nodes, PostgreSQL, s3s-fs and the router share two cores.
        .set("FERRY_HTTP_WORKERS", "2")
        // Never hot: a hot key's S3 fetch would find a deletion marker by itself, and the
        // tests must show what the shared catalog's notifications do.
        .set("FERRY_CACHE_HOT_HITS", "1000000");
    e
}

/// An S3 endpoint nothing listens on.
pub fn dead_endpoint() -> String {
    format!("http://127.0.0.1:{}", super::free_port())
}

/// Drops a file the way an uploader that renames would: ready at once. The temp name is
/// short, since a long key's own name may be near NAME_MAX.
pub fn drop_renamed(env: &Env, key: &str, bytes: &[u8]) {
    let tmp = env.spool().join(format!(
        ".incoming-{}",
        &super::sha256_hex(key.as_bytes())[..16]
    ));
    std::fs::write(&tmp, bytes).unwrap();
    let to = env.spool().join(key);
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::rename(&tmp, &to).unwrap();
}

/// Polls until `f` holds, returning how long it took; panics past `limit`.
pub fn within(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Polls `f` until it holds or `limit` passes; whether it held.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Starts `ferry run` for every node at once (their migrations meet under the advisory
/// lock), then waits until each one's sync runs.
pub fn run_all<const N: usize>(envs: [&Env; N]) -> [Daemon; N] {
    let daemons = envs.map(|e| e.spawn(&["run"]));
    for d in &daemons {
        d.wait_log("sync running", Duration::from_secs(30));
    }
    daemons
}
