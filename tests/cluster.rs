//! Many nodes, one view: three `ferry run` nodes on loopback behind `ferry route`, one real
//! PostgreSQL as the shared catalog (`catalog.shared`) and one s3s-fs. A file dropped on one
//! node is served by the others before it is uploaded (`peer`); deletes reach every node
//! within a second; PostgreSQL going down costs freshness, never an upload or the one rule.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::cluster::{drop_renamed, eventually, run_all, within};
use common::pg::Postgres;
use common::{content, metric, nodes, raw_request, wait_for, Daemon, Env, RawResponse, S3};

/// A node of this cluster: `common::cluster::node_env` with the test's PostgreSQL.
fn node_env(name: &str, s3_endpoint: &str, bucket: &str, pg: &Postgres) -> Env {
    common::cluster::node_env(name, s3_endpoint, bucket, &pg.url())
}

fn get_via(addr: SocketAddr, host: &str, path: &str) -> RawResponse {
    raw_request(addr, "GET", path.as_bytes(), &[("Host", host)])
}

/// A Host the router sends to `node` (every answer names its node).
fn host_owned_by(router: SocketAddr, node: &str) -> String {
    for i in 0..500 {
        let host = format!("site{i}.example");
        let r = get_via(router, &host, "/static/__which-node");
        if r.header("x-ferry-node") == Some(node) {
            return host;
        }
    }
    panic!("no Host of 500 routed to {node}");
}

struct Three {
    x: Daemon,
    y: Daemon,
    z: Daemon,
    ex: Env,
    ey: Env,
    ez: Env,
    router: nodes::Proc,
    _rdir: tempfile::TempDir,
}

/// Nodes x and z upload to `s3`; y's S3 is unreachable unless `y_uploads`.
fn three(s3: &S3, pg: &Postgres, y_uploads: bool) -> Three {
    let ex = node_env("x", &s3.endpoint(), &s3.bucket, pg);
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let y_s3 = if y_uploads { s3.endpoint() } else { dead };
    let ey = node_env("y", &y_s3, &s3.bucket, pg);
    let ez = node_env("z", &s3.endpoint(), &s3.bucket, pg);
    let [x, y, z] = run_all([&ex, &ey, &ez]);
    let backends: Vec<String> = [&x, &y, &z]
        .iter()
        .map(|d| format!("http://{}", d.addr()))
        .collect();
    let rdir = tempfile::tempdir().unwrap();
    let router = nodes::start_router(rdir.path(), &backends, &[]);
    Three {
        x,
        y,
        z,
        ex,
        ey,
        ez,
        router,
        _rdir: rdir,
    }
}

#[test]
fn a_file_dropped_on_one_node_is_served_by_the_node_owning_its_host_before_it_is_uploaded() {
    let Some(pg) = common::pg::start_or_skip() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let c = three(&s3, &pg, false);
    let host = host_owned_by(c.router.addr, "x");
    let path = "/static/2026/12/new.jpg";
    let bytes = content("2026/12/new.jpg", 150_000);

    // Asked before it exists: a 404 that x caches negatively.
    assert_eq!(get_via(c.router.addr, &host, path).status, 404);
    drop_renamed(&c.ey, "2026/12/new.jpg", &bytes);
    let start = Instant::now();
    let mut last = None;
    let served = eventually(Duration::from_secs(3), || {
        let r = get_via(c.router.addr, &host, path);
        let ok = r.status == 200 && r.body == bytes;
        last = Some(r);
        ok
    });
    if !served {
        // What each part said, so a failure in CI can be told apart without a rerun.
        let seen = last.map(|r| (r.status, r.headers));
        let y_as_peer = raw_request(c.y.addr(), "GET", path.as_bytes(), &[("X-Ferry-Peer", "1")]);
        let x_direct = raw_request(c.x.addr(), "GET", path.as_bytes(), &[]);
        panic!(
            "x did not serve y's new file within 3s; last answer through the router: {seen:?}; \
             y asked as a peer now: {} {:?}; x asked directly now: {} {:?}",
            y_as_peer.status, y_as_peer.headers, x_direct.status, x_direct.headers
        );
    }
    eprintln!(
        "404 window after a drop on another node: {:?}",
        start.elapsed()
    );
    let r = get_via(c.router.addr, &host, path);
    assert_eq!(r.header("x-ferry-source"), Some("peer"));
    assert_eq!(r.header("x-ferry-node"), Some("x"));
    assert_eq!(
        r.header("content-length"),
        Some(bytes.len().to_string().as_str())
    );
    assert!(metric(c.x.addr(), "ferry_peer_requests_total") >= 1.0);
    // y could not upload it: it is still only in y's spool.
    assert!(c.ey.spool().join("2026/12/new.jpg").exists());

    // The same ETag as y's own answer, so revalidation works across nodes.
    let own = raw_request(c.y.addr(), "GET", path.as_bytes(), &[]);
    assert_eq!(own.header("x-ferry-source"), Some("local"));
    assert_eq!(r.header("etag"), own.header("etag"));
    let etag = own.header("etag").unwrap().to_string();
    let revalidated = raw_request(
        c.x.addr(),
        "GET",
        path.as_bytes(),
        &[("If-None-Match", &etag)],
    );
    assert_eq!(revalidated.status, 304);
    let ranged = raw_request(
        c.x.addr(),
        "GET",
        path.as_bytes(),
        &[("Range", "bytes=10-19")],
    );
    assert_eq!(ranged.status, 206);
    assert_eq!(ranged.body, &bytes[10..20]);

    // A peer request is answered from the spool only, never forwarded: z asked as a peer
    // for y's file says 404, it does not ask y.
    let as_peer = raw_request(c.z.addr(), "GET", path.as_bytes(), &[("X-Ferry-Peer", "1")]);
    assert_eq!(as_peer.status, 404);

    // Once y can upload, the key is served as S3-held keys are (a redirect), on x too.
    let mut y = c.y;
    y.kill9();
    let mut ey = c.ey;
    ey.set("FERRY_S3_ENDPOINT", &s3.endpoint());
    let y = ey.spawn(&["run"]);
    wait_for(Duration::from_secs(30), "y to archive it", || {
        ey.archive().join("2026/12/new.jpg").exists()
    });
    within(Duration::from_secs(3), "x redirects to S3", || {
        let r = raw_request(c.x.addr(), "GET", path.as_bytes(), &[]);
        r.status == 302 && r.header("x-ferry-source") == Some("redirect")
    });
    drop(y);
}

#[test]
fn a_delete_on_one_node_is_410_on_every_node_within_a_second() {
    let Some(pg) = common::pg::start_or_skip() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let c = three(&s3, &pg, true);
    let bytes = content("gone.jpg", 20_000);
    drop_renamed(&c.ez, "gone.jpg", &bytes);
    wait_for(Duration::from_secs(30), "z to archive it", || {
        c.ez.archive().join("gone.jpg").exists()
    });
    // Every node has it cached as in S3 (TTL 5 minutes).
    for d in [&c.x, &c.y, &c.z] {
        within(Duration::from_secs(3), "every node knows it", || {
            raw_request(d.addr(), "GET", b"/static/gone.jpg", &[]).status == 302
        });
    }
    let (code, out, err) = c.ex.run(&["delete", "gone.jpg"]);
    assert_eq!(code, 0, "{out}{err}");
    let start = Instant::now();
    for d in [&c.x, &c.y, &c.z] {
        within(Duration::from_secs(3), "410 on every node", || {
            raw_request(d.addr(), "GET", b"/static/gone.jpg", &[]).status == 410
        });
    }
    eprintln!("delete reached every node in {:?}", start.elapsed());
}

#[test]
fn postgres_down_never_stops_uploads_and_the_outbox_drains_when_it_returns() {
    let Some(mut pg) = common::pg::start_or_skip() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let c = three(&s3, &pg, true);
    drop_renamed(&c.ey, "before.jpg", &content("before.jpg", 5_000));
    within(Duration::from_secs(5), "published", || {
        pg.try_psql("SELECT count(*) FROM ferry_files WHERE key = 'before.jpg'")
            .is_ok_and(|n| n == "1")
    });

    pg.kill();
    let mut files = Vec::new();
    for i in 0..20 {
        let key = format!("down/{i}.jpg");
        let b = content(&key, 3_000 + i * 100);
        drop_renamed(&c.ey, &key, &b);
        files.push((key, b));
    }
    // Uploads and archiving go on, the one rule intact: each archived copy is in S3 with
    // the same bytes.
    wait_for(
        Duration::from_secs(60),
        "every file archived with PostgreSQL down",
        || files.iter().all(|(k, _)| c.ey.archive().join(k).exists()),
    );
    for (k, b) in &files {
        assert_eq!(&s3.object_bytes(k), b, "{k} in S3");
        assert_eq!(&std::fs::read(c.ey.archive().join(k)).unwrap(), b);
    }
    // Serving falls back to HEAD, and says it is degraded.
    let r = raw_request(c.x.addr(), "GET", b"/static/down/3.jpg", &[]);
    assert_eq!(r.status, 302, "x finds it in S3 by a HEAD");
    within(
        Duration::from_secs(10),
        "x reports the shared catalog degraded",
        || {
            let r = raw_request(c.x.addr(), "GET", b"/readyz", &[]);
            r.status == 200 && String::from_utf8_lossy(&r.body).contains("degraded")
        },
    );
    assert_eq!(metric(c.x.addr(), "ferry_shared_catalog_up"), 0.0);
    let st = c.ey.status();
    assert!(st["outbox"].as_u64().unwrap() >= 20, "{st}");
    let (_, human, _) = c.ey.run(&["status"]);
    assert!(human.contains("not yet published"), "{human}");
    assert!(human.contains("shared catalog"), "{human}");

    pg.restart();
    // The archive file appears just before its `archived` commit, so a row or two may
    // still be published as verified first: the outbox drains, and PostgreSQL ends up
    // with every file archived.
    within(
        Duration::from_secs(20),
        "the outbox drains and every row is archived",
        || {
            c.ey.status()["outbox"].as_u64() == Some(0)
                && pg
                    .try_psql(
                        "SELECT count(*) FROM ferry_files WHERE node = 'y' AND key LIKE 'down/%' \
                     AND state = 'archived'",
                    )
                    .is_ok_and(|n| n == "20")
        },
    );
    within(Duration::from_secs(15), "x is healthy again", || {
        let r = raw_request(c.x.addr(), "GET", b"/readyz", &[]);
        r.status == 200 && !String::from_utf8_lossy(&r.body).contains("degraded")
    });
    // Every node's view agrees.
    for d in [&c.x, &c.y, &c.z] {
        for (k, _) in files.iter().take(5) {
            let r = raw_request(d.addr(), "GET", format!("/static/{k}").as_bytes(), &[]);
            assert!(r.status == 302 || r.status == 200, "{k}: {}", r.status);
        }
    }
    let (code, out, err) = c.ex.run(&["status", "--cluster"]);
    assert_eq!(code, 0, "{err}");
    for n in ["x (this node)", "y", "z"] {
        assert!(out.contains(n), "{out}");
    }
    assert!(out.contains("published"), "{out}");
}

#[test]
fn a_kill_9_between_publishing_and_clearing_the_outbox_publishes_again_harmlessly() {
    let Some(pg) = common::pg::start_or_skip() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = node_env("solo", &s3.endpoint(), &s3.bucket, &pg);
    env.set("FERRY_DEBUG_CRASH_AT", "published");
    let bytes = content("crash.jpg", 4_000);
    let mut d = env.spawn(&["run"]);
    drop_renamed(&env, "crash.jpg", &bytes);
    // The first publish commits in PostgreSQL, then the process dies before the outbox
    // entry is cleared.
    wait_for(
        Duration::from_secs(30),
        "the crash after publishing",
        || d.child.try_wait().ok().flatten().is_some(),
    );
    assert!(
        d.log().contains("FERRY_DEBUG_CRASH_AT=published"),
        "{}",
        d.log()
    );
    d.kill9();
    assert!(env.status()["outbox"].as_u64().unwrap() >= 1);
    env.vars.remove("FERRY_DEBUG_CRASH_AT");
    let _d = env.spawn(&["run"]);
    wait_for(Duration::from_secs(30), "archived", || {
        env.archive().join("crash.jpg").exists()
    });
    within(Duration::from_secs(10), "the outbox drains", || {
        env.status()["outbox"].as_u64() == Some(0)
    });
    // One row per (node, key), holding the last state: publishing again changed nothing
    // that matters.
    assert_eq!(
        pg.psql("SELECT count(*) || ' ' || max(state) FROM ferry_files WHERE key = 'crash.jpg'"),
        "1 archived"
    );
    assert_eq!(
        pg.psql("SELECT sha256 FROM ferry_files WHERE key = 'crash.jpg'"),
        common::sha256_hex(&bytes)
    );
    assert_eq!(s3.object_bytes("crash.jpg"), bytes);
}

/// The accept loop every fake peer shares: a thread per connection running its `serve`.
const PEER_LOOP: &str = r#"
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', 0)); s.listen(16)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Starts the fake peer `serve` (Python) with `arg` as argv[1]; returns it and its port.
fn fake_peer(serve: &str, arg: &str) -> (std::process::Child, u16) {
    let mut peer = std::process::Command::new("python3")
        .args(["-u", "-c", &format!("{serve}{PEER_LOOP}"), arg])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut port = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(peer.stdout.take().unwrap()),
        &mut port,
    )
    .unwrap();
    let port = port.trim().parse().expect("the peer's port");
    (peer, port)
}

/// A peer that answers a head and part of a body, then closes; or accepts and closes.
const BAD_PEER: &str = r#"
import socket, sys, threading
def serve(conn):
    try:
        req = b''
        while b'\r\n\r\n' not in req:
            d = conn.recv(4096)
            if not d: return
            req += d
        if b'/static/dies-early.jpg' in req:
            return
        head = 'HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nETag: %s\r\n\r\n' % sys.argv[1]
        conn.sendall(head.encode() + b'x' * 30000)
    finally:
        conn.close()
"#;

#[test]
fn a_peer_that_dies_mid_answer_never_yields_a_clean_looking_short_200() {
    let Some(pg) = common::pg::start_or_skip() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = node_env("x", &s3.endpoint(), &s3.bucket, &pg);
    let [d] = run_all([&env]);
    // The tag a peer sends for a spool file not yet hashed (len, mtime ns, inode, ctime ns):
    // the one published, so the answer is taken for the version and cut when the body dies.
    let etag = format!(
        "\"{:x}-{:x}-{:x}-{:x}\"",
        100_000, 1_700_000_000_000_000_000u64, 7, 1_700_000_000_000_000_005u64
    );
    let (mut peer, port) = fake_peer(BAD_PEER, &etag);
    // A node "bad" that claims two files in its spool, as the shared catalog would say.
    within(Duration::from_secs(10), "the schema", || {
        pg.try_psql("SELECT 1 FROM ferry_nodes LIMIT 1").is_ok()
    });
    pg.psql(&format!(
        "INSERT INTO ferry_nodes (node, url, published_ms) VALUES ('bad', 'http://127.0.0.1:{port}', 0);
         INSERT INTO ferry_files (key, node, gen, state, size, sha256, mtime_ns, inode, ctime_ns, deleted, still_local, changed_ms)
         VALUES ('dies-late.jpg', 'bad', 1, 'queued', 100000, NULL, 1700000000000000000, 7, 1700000000000000005, false, true, 1),
                ('dies-early.jpg', 'bad', 1, 'queued', 100000, NULL, 1700000000000000000, 8, 1700000000000000005, false, true, 1);"
    ));
    // Before the response head: S3 does not have it either, so a 503 to retry.
    let r = raw_request(d.addr(), "GET", b"/static/dies-early.jpg", &[]);
    assert_eq!(r.status, 503, "{:?}", String::from_utf8_lossy(&r.raw_head));
    assert!(r.header("retry-after").is_some());
    // After it: the response ends short of its Content-Length (the connection is cut),
    // never a complete-looking 200.
    let r = raw_request(d.addr(), "GET", b"/static/dies-late.jpg", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("100000"));
    assert!(r.body.len() < 100_000, "got all {} bytes", r.body.len());
    assert_eq!(r.header("x-ferry-source"), Some("peer"));
    let _ = peer.kill();
    let _ = peer.wait();
}

#[test]
fn tls_with_sslmode_require_verifies_the_server_against_ssl_cert_file() {
    let Some(pg) = common::pg::start_or_skip() else {
        return;
    };
    let ca = pg.enable_tls();
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let url = format!(
        "postgres://ferry@127.0.0.1:{}/ferry?sslmode=require",
        pg.port()
    );

    // A node that cannot verify the server (its CA is in no trust store) never talks to
    // it in the clear, and uploads regardless.
    let mut lost = Env::new(&s3.endpoint(), &s3.bucket);
    lost.set("FERRY_HTTP_NODE_NAME", "untrusting")
        .set("FERRY_CATALOG_SHARED", &url)
        .set(
            "SSL_CERT_FILE",
            &t.path().join("no-such-ca.pem").to_string_lossy(),
        );
    let [d] = run_all([&lost]);
    drop_renamed(&lost, "untrusted.jpg", &content("untrusted.jpg", 2_000));
    wait_for(
        Duration::from_secs(30),
        "archived without the shared catalog",
        || lost.archive().join("untrusted.jpg").exists(),
    );
    within(Duration::from_secs(10), "degraded", || {
        String::from_utf8_lossy(&raw_request(d.addr(), "GET", b"/readyz", &[]).body)
            .contains("degraded")
    });
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ferry'"),
        "0",
        "no session without a verified certificate"
    );
    drop(d);

    // With the CA: every session is TLS, and publishing works.
    let mut env = Env::new(&s3.endpoint(), &s3.bucket);
    env.set("FERRY_HTTP_NODE_NAME", "tls")
        .set("FERRY_CATALOG_SHARED", &url)
        .set("SSL_CERT_FILE", &ca.to_string_lossy());
    let [_d] = run_all([&env]);
    drop_renamed(&env, "tls.jpg", &content("tls.jpg", 2_000));
    within(Duration::from_secs(10), "published over TLS", || {
        pg.try_psql("SELECT state FROM ferry_files WHERE key = 'tls.jpg'")
            .is_ok_and(|s| s == "archived")
    });
    let sessions = pg.psql(
        "SELECT count(*) || ' ' || count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
         JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'ferry'",
    );
    let (all, tls) = sessions.split_once(' ').unwrap();
    assert!(all.parse::<u32>().unwrap() >= 2, "{sessions}");
    assert_eq!(all, tls, "every session is TLS: {sessions}");
}

/// A peer that answers every GET whole: 1000 bytes, with the ETag argv[1] maps its path to.
const GOOD_PEER: &str = r#"
import socket, sys, threading, json
tags = json.loads(sys.argv[1])
def serve(conn):
    try:
        req = b''
        while b'\r\n\r\n' not in req:
            d = conn.recv(4096)
            if not d: return
            req += d
        path = req.split(b' ')[1].decode()
        head = 'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nCache-Control: public\r\nETag: %s\r\n\r\n' % tags.get(path, '"none"')
        conn.sendall(head.encode() + b'x' * 1000)
    finally:
        conn.close()
"#;

/// Schema version 2 during and after a rolling upgrade. (1) A node still on version 1
/// publishes without ctime_ns (it reads 0) and sends its 3-part local tag. (2) A node
/// upgraded after it published: its row still says ctime_ns = 0 (nothing republishes a row
/// whose state did not change), while it now sends the 4-part tag with its real ctime. Both
/// files are served by the proxying node, with no ETag (it cannot name the owner's); both
/// were a 503 while the proxy wanted the 4-part tag exactly.
#[test]
fn peer_files_published_under_schema_1_are_still_served() {
    let Some(pg) = common::pg::start_or_skip() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = node_env("x", &s3.endpoint(), &s3.bucket, &pg);
    let [d] = run_all([&env]);
    let (len, mt, ino, ct) = (
        1000u64,
        1_700_000_000_000_000_000u64,
        7u64,
        1_700_000_000_000_000_005u64,
    );
    let tags = format!(
        r#"{{"/static/old-node.jpg": "\"{len:x}-{mt:x}-{ino:x}\"", "/static/upgraded-node.jpg": "\"{len:x}-{mt:x}-{ino:x}-{ct:x}\""}}"#
    );
    let (mut peer, port) = fake_peer(GOOD_PEER, &tags);
    within(Duration::from_secs(10), "the schema", || {
        pg.try_psql("SELECT 1 FROM ferry_nodes LIMIT 1").is_ok()
    });
    // The version-1 UPSERT's columns: no ctime_ns.
    pg.psql(&format!(
        "INSERT INTO ferry_nodes (node, url, published_ms) VALUES ('old', 'http://127.0.0.1:{port}', 0);
         INSERT INTO ferry_files (key, node, gen, state, size, sha256, mtime_ns, inode, deleted, still_local, changed_ms)
         VALUES ('old-node.jpg', 'old', 1, 'queued', {len}, NULL, {mt}, {ino}, false, true, 1),
                ('upgraded-node.jpg', 'old', 1, 'queued', {len}, NULL, {mt}, {ino}, false, true, 1);"
    ));
    let mut statuses = Vec::new();
    for k in ["old-node.jpg", "upgraded-node.jpg"] {
        let r = raw_request(d.addr(), "GET", format!("/static/{k}").as_bytes(), &[]);
        statuses.push((k, r.status));
        if r.status == 200 {
            assert_eq!(r.body.len(), 1000, "{k}");
            assert_eq!(
                r.header("etag"),
                None,
                "{k}: a tag that may not be the owner's"
            );
        }
    }
    let _ = peer.kill();
    let _ = peer.wait();
    assert_eq!(
        statuses,
        [("old-node.jpg", 200), ("upgraded-node.jpg", 200)],
        "{}",
        d.log()
    );
}
