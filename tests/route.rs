//! The hash router end to end: real `ferry serve` nodes and a real `ferry route` on loopback
//! ports, plain HTTP over TCP, nodes killed and restarted under it.
//!
//! The nodes need no S3 (tests/common/nodes.rs): `x.jpg` is a spool file on each, any other
//! key a node's own 503, and every answer names its node in X-Ferry-Node, which is all these
//! tests look at.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry::route::rank;

mod common;

use common::nodes::*;

fn free_port_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

#[test]
fn hosts_stick_to_their_node_fail_over_and_come_back() {
    let mut nodes: Vec<Node> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| Node::start(n))
        .collect();
    let backends: Vec<String> = nodes.iter().map(Node::backend).collect();
    let name_of: BTreeMap<String, String> = nodes
        .iter()
        .map(|n| (n.backend(), n.name.clone()))
        .collect();
    let rdir = tempfile::tempdir().unwrap();
    let router = start_router(rdir.path(), &backends, &[]);
    let r = router.addr;

    let hosts: Vec<String> = (0..30).map(|i| format!("h{i}.example")).collect();
    // The router's own health answer, whatever the Host.
    let own = get(r, "h0.example", "/-/router/healthz");
    assert_eq!((own.status, own.body.as_slice()), (200, &b"ok\n"[..]));

    // Each host has one node, the one the ranking names, every time.
    let mut owner = BTreeMap::new();
    for h in &hosts {
        let ranked = rank(&backends, h);
        let first = node_for(r, h, "/static/x.jpg");
        assert_eq!(first, name_of[ranked[0]], "{h}");
        for _ in 0..3 {
            assert_eq!(node_for(r, h, "/static/x.jpg"), first, "{h} moved");
        }
        // The port is not part of the site.
        assert_eq!(
            node_for(r, &format!("{}:8000", h.to_uppercase()), "/static/y.jpg"),
            first
        );
        owner.insert(h.clone(), first);
    }
    let used: BTreeSet<&String> = owner.values().collect();
    assert_eq!(used.len(), 3, "30 hosts should use all 3 nodes: {owner:?}");

    // SIGKILL one node: its hosts go to their second choice, at once; nobody else moves,
    // and no request fails on the way.
    let victim = 1;
    let vname = nodes[victim].name.clone();
    let vbackend = nodes[victim].backend();
    let expected_after: BTreeMap<String, String> = hosts
        .iter()
        .map(|h| {
            let next = rank(&backends, h)
                .into_iter()
                .find(|b| *b != vbackend)
                .expect("another backend");
            let o = if owner[h] == vname {
                name_of[next].clone()
            } else {
                owner[h].clone()
            };
            (h.clone(), o)
        })
        .collect();
    assert!(expected_after.values().all(|n| *n != vname));
    nodes[victim].kill();
    let killed = Instant::now();
    // Before any probe can notice (2 x 200ms), a request for one of its hosts meets the
    // connect error, and is retried on the next-ranked node instead of failing.
    let orphan = hosts
        .iter()
        .find(|h| owner[*h] == vname)
        .expect("the victim owns a host");
    assert_eq!(node_for(r, orphan, "/static/x.jpg"), expected_after[orphan]);
    loop {
        let now: BTreeMap<String, String> = hosts
            .iter()
            .map(|h| (h.clone(), node_for(r, h, "/static/x.jpg")))
            .collect();
        for (h, n) in &now {
            assert_ne!(n, &vname, "{h} answered by the killed node");
            if owner[h] != vname {
                assert_eq!(n, &owner[h], "{h} is not on the dead node but moved");
            }
        }
        if now == expected_after {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "hosts did not fail over within 2s: {now:?} vs {expected_after:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // And they stay there while it is down.
    for h in &hosts {
        assert_eq!(node_for(r, h, "/static/x.jpg"), expected_after[h]);
    }

    // Restart it on the same port: its hosts come back after two good probes.
    nodes[victim].restart();
    let restarted = Instant::now();
    loop {
        let now: BTreeMap<String, String> = hosts
            .iter()
            .map(|h| (h.clone(), node_for(r, h, "/static/x.jpg")))
            .collect();
        for (h, n) in &now {
            if owner[h] != vname {
                assert_eq!(n, &owner[h], "{h} moved while another node healed");
            }
        }
        if now == owner {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(10),
            "hosts did not return within 10s: {now:?} vs {owner:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(router);
}

#[test]
fn path_hashing_keeps_a_first_segment_on_one_node() {
    let nodes: Vec<Node> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| Node::start(n))
        .collect();
    let backends: Vec<String> = nodes.iter().map(Node::backend).collect();
    let name_of: BTreeMap<String, String> = nodes
        .iter()
        .map(|n| (n.backend(), n.name.clone()))
        .collect();
    let rdir = tempfile::tempdir().unwrap();
    let router = start_router(
        rdir.path(),
        &backends,
        &[("FERRY_ROUTER_HASH", "path".to_string())],
    );
    let r = router.addr;
    let mut used = BTreeSet::new();
    for i in 0..40 {
        let blog = format!("blog{i}");
        let want = &name_of[rank(&backends, &blog)[0]];
        // Whatever the Host and the rest of the path, the segment decides.
        for (host, path) in [
            ("a.example", format!("/static/{blog}/x.jpg")),
            ("b.example", format!("/static/{blog}/2026/11/y.png")),
            ("c.example:8000", format!("/static/{blog}/z.gif?v=2")),
        ] {
            assert_eq!(&node_for(r, host, &path), want, "{host}{path}");
        }
        used.insert(want.clone());
    }
    assert_eq!(used.len(), 3, "40 segments should use all 3 nodes");
}

#[test]
fn no_healthy_backend_is_a_plain_502() {
    // Addresses that nothing listens on.
    let backends: Vec<String> = (0..3)
        .map(|_| format!("http://{}", free_port_addr()))
        .collect();
    let rdir = tempfile::tempdir().unwrap();
    let router = start_router(rdir.path(), &backends, &[]);
    // First while they are still believed up (connect errors), then once probes agree.
    for round in 0..2 {
        let resp = get(router.addr, "h1.example", "/static/x.jpg");
        assert_eq!(resp.status, 502, "round {round}");
        assert!(
            resp.header("content-type")
                .is_some_and(|c| c.starts_with("text/plain")),
            "{:?}",
            resp.headers
        );
        assert!(!resp.body.is_empty() && resp.body.len() < 100);
        assert!(resp.header("x-ferry-node").is_none());
        std::thread::sleep(Duration::from_millis(600));
    }
    // The router itself is fine.
    assert_eq!(get(router.addr, "x", "/-/router/healthz").status, 200);
}

#[test]
fn bad_backend_is_refused_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    clean_env(&mut cmd);
    let out = cmd
        .arg("route")
        .current_dir(dir.path())
        .env("FERRY_ROUTER_LISTEN", "127.0.0.1:0")
        .env("FERRY_ROUTER_BACKENDS", "http://127.0.0.1:8080,ftp://x:1")
        .stdin(Stdio::null())
        .output()
        .expect("run ferry route");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("router.backends") && err.contains("ftp://x:1"),
        "{err}"
    );
}

/// A client that starts an HTTP/2 preface (or any request) and then goes quiet is cut off on
/// the header deadline: nothing may hold a router connection forever without a request.
#[test]
fn a_partial_http2_preface_is_cut_off_on_the_header_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::start("n1");
    let router = start_router(
        dir.path(),
        &[node.backend()],
        &[("FERRY_HTTP_HEADER_READ_TIMEOUT", "1s".to_string())],
    );
    // 3x the deadline: a bound for "closed", not a speed test.
    let bound = Duration::from_secs(3);
    for sent in [
        &b"P"[..],
        b"PRI * HTTP/2.0\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n",
        b"GET / HT",
    ] {
        let mut s =
            TcpStream::connect_timeout(&router.addr, Duration::from_secs(5)).expect("connect");
        s.write_all(sent).expect("send");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let start = Instant::now();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let took = start.elapsed();
        assert!(
            took < bound,
            "{:?}: still open after {took:?}",
            String::from_utf8_lossy(sent)
        );
    }
    // The router still serves.
    assert_eq!(get(router.addr, "a.example", "/static/x.jpg").node(), "n1");
}

/// What the router believes about its only backend, from its own metrics.
fn believed_up(router: SocketAddr) -> bool {
    let m = get(router, "x", "/-/router/metrics");
    let text = String::from_utf8_lossy(&m.body).into_owned();
    !text
        .lines()
        .any(|l| l.starts_with("ferry_router_backend_up{") && l.ends_with(" 0"))
}

#[test]
fn with_every_backend_marked_down_the_ranked_list_is_still_tried() {
    let mut node = Node::start("n1");
    let rdir = tempfile::tempdir().unwrap();
    // Probes so rare that only requests change what the router believes.
    let router = start_router(
        rdir.path(),
        &[node.backend()],
        &[("FERRY_ROUTER_HEALTH_INTERVAL", "1h".to_string())],
    );
    assert_eq!(get(router.addr, "a.example", "/static/x.jpg").node(), "n1");
    node.kill();
    for _ in 0..10 {
        if !believed_up(router.addr) {
            break;
        }
        let r = get(router.addr, "a.example", "/static/x.jpg");
        assert_eq!(r.status, 502);
    }
    assert!(
        !believed_up(router.addr),
        "a failed connect marks the node down"
    );
    node.restart();
    let r = get(router.addr, "a.example", "/static/x.jpg");
    assert_eq!(r.node(), "n1", "tried although marked down: {}", r.status);
}

/// TCP connections between the two loopback ports, as `ss` sees them: (state, local port,
/// peer port) for every socket with `port` on either side.
fn sockets_on(port: u16) -> Vec<(String, u16, u16)> {
    let out = Command::new("ss")
        .args(["-Htan"])
        .output()
        .expect("ss (iproute2)");
    let port_of = |a: &str| a.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, peer) = (port_of(f.get(3)?)?, port_of(f.get(4)?)?);
            (local == port || peer == port).then(|| (f[0].to_string(), local, peer))
        })
        .collect()
}

#[test]
fn the_router_drops_an_idle_pooled_connection_before_the_node_would() {
    // The node closes a connection idle for http.header_read_timeout (6 s here). The router,
    // sharing the setting, must let go first (at a third of it), so a request never reuses a
    // connection the node is closing at that instant. hyper's idle sweep runs once per idle
    // timeout, so a connection goes between 2 s and 4 s; at 5 s it must be gone. Whoever
    // closes first keeps TIME-WAIT: it must sit on the router's side.
    let dir = tempfile::tempdir().unwrap();
    let mut vars = node_vars(dir.path(), "n1", "127.0.0.1:0");
    vars.push(("FERRY_HTTP_HEADER_READ_TIMEOUT", "6s".into()));
    let node = Proc::start("serve", "http", dir.path(), &vars);
    let port = node.addr.port();
    let rdir = tempfile::tempdir().unwrap();
    let router = start_router(
        rdir.path(),
        &[format!("http://{}", node.addr)],
        // No probes: they would keep the pooled connection busy.
        &[
            ("FERRY_ROUTER_HEALTH_INTERVAL", "1h".into()),
            ("FERRY_HTTP_HEADER_READ_TIMEOUT", "6s".into()),
        ],
    );
    let r = get(router.addr, "idle.example", "/static/x.jpg");
    assert_eq!(r.node(), "n1");
    let pooled = sockets_on(port);
    assert!(
        pooled.iter().any(|(s, _, p)| s == "ESTAB" && *p == port),
        "the router keeps the connection pooled after a request: {pooled:?}"
    );
    std::thread::sleep(Duration::from_millis(5000));
    let after = sockets_on(port);
    assert!(
        !after
            .iter()
            .any(|(s, l, p)| s == "ESTAB" && (*l == port || *p == port)),
        "5 s idle: the pooled connection must be gone well before the node's 6 s: {after:?}"
    );
    assert!(
        after.iter().any(|(s, _, p)| s == "TIME-WAIT" && *p == port),
        "the router closed it (TIME-WAIT on its side): {after:?}"
    );
    // And the next request simply opens a new one.
    assert_eq!(
        get(router.addr, "idle.example", "/static/x.jpg").node(),
        "n1"
    );
}

/// A request whose response head has arrived and whose body is left unread: the router
/// cannot finish sending it, so it stays in flight on its backend until this is dropped.
struct Held {
    stream: TcpStream,
    node: String,
}

fn hold(addr: SocketAddr, host: &str, path: &str) -> Held {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").expect("send");
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).expect("read the response head");
        assert!(n > 0, "{host}: closed before the response head");
        head.extend_from_slice(&buf[..n]);
        assert!(head.len() < 1 << 20, "{host}: no end of the response head");
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{host}: {text}");
    let node = text
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("x-ferry-node"))
        .map(|(_, v)| v.trim().to_string())
        .expect("X-Ferry-Node");
    Held { stream: s, node }
}

/// `ferry_router_backend_<what>{backend="..."}` from the router's metrics, by backend.
fn router_metric(router: SocketAddr, what: &str) -> BTreeMap<String, f64> {
    let m = get(router, "x", "/-/router/metrics");
    let text = String::from_utf8_lossy(&m.body).into_owned();
    let prefix = format!("ferry_router_backend_{what}{{backend=\"");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| {
            let (backend, rest) = l.split_once("\"} ")?;
            Some((backend.to_string(), rest.trim().parse().ok()?))
        })
        .collect()
}

/// Waits (bounded) until every backend's in-flight count is `want[backend]` (0 if absent).
fn wait_in_flight(router: SocketAddr, backends: &[String], want: &BTreeMap<String, usize>) {
    let start = Instant::now();
    loop {
        let got = router_metric(router, "in_flight");
        let ok = backends
            .iter()
            .all(|b| got.get(b).copied() == Some(want.get(b).copied().unwrap_or(0) as f64));
        if ok {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "in flight {got:?}, expected {want:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Bounded loads (router.balance_factor, default 1.25): a very hot Host fills its node to
/// capacity = ceil(1.25 × (in flight + 1) / 3) and then spills to its second-ranked node;
/// Hosts of the other nodes do not move; the in-flight counts return to 0 on every path
/// (body sent, client gone, backend dead mid-body) and everything returns to its node.
#[test]
fn a_hot_host_spills_to_its_second_node_and_returns() {
    const BIG: u64 = 1 << 30;
    let mut nodes: Vec<Node> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| Node::start(n))
        .collect();
    for n in &nodes {
        // Sparse: a GiB to stream that costs no disk.
        let spool = n.dir.path().join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        let f = std::fs::File::create(spool.join("big.bin")).unwrap();
        f.set_len(BIG).unwrap();
    }
    let backends: Vec<String> = nodes.iter().map(Node::backend).collect();
    let name_of: BTreeMap<String, String> = nodes
        .iter()
        .map(|n| (n.backend(), n.name.clone()))
        .collect();
    let rdir = tempfile::tempdir().unwrap();
    let router = start_router(rdir.path(), &backends, &[]);
    let r = router.addr;

    let hot = "hot.example";
    let ranked: Vec<String> = rank(&backends, hot)
        .into_iter()
        .map(str::to_string)
        .collect();
    let (first, second) = (name_of[&ranked[0]].clone(), name_of[&ranked[1]].clone());
    let hosts: Vec<String> = (0..30).map(|i| format!("h{i}.example")).collect();
    let owner: BTreeMap<String, String> = hosts
        .iter()
        .chain(std::iter::once(&hot.to_string()))
        .map(|h| (h.clone(), name_of[rank(&backends, h)[0]].clone()))
        .collect();
    let check_all_home = |what: &str| {
        for (h, o) in &owner {
            assert_eq!(&node_for(r, h, "/static/x.jpg"), o, "{what}: {h}");
        }
    };
    // Unloaded, every Host is on its first-ranked node; finished bodies count down.
    check_all_home("before any load");
    wait_in_flight(r, &backends, &BTreeMap::new());

    // Background load, even over the nodes: 4 slow requests each, on Hosts they own. Each
    // stays on its owner (the nodes are level, so none is at capacity).
    let mut held = Vec::new();
    let mut expect: BTreeMap<String, usize> = BTreeMap::new();
    for _round in 0..4 {
        for b in &ranked {
            let h = hosts
                .iter()
                .find(|h| owner[*h] == name_of[b])
                .expect("30 hosts give every node one");
            let x = hold(r, h, "/static/big.bin");
            assert_eq!(x.node, name_of[b], "background {h}");
            *expect.entry(b.clone()).or_default() += 1;
            held.push(x);
        }
    }
    wait_in_flight(r, &backends, &expect);

    // The hot Host: slow requests one at a time. They go to its first node until that
    // node is at capacity, then to its second, never elsewhere while the second has room.
    let mut on_first = 0;
    let mut spilled = None;
    for _ in 0..20 {
        let x = hold(r, hot, "/static/big.bin");
        let node = x.node.clone();
        held.push(x);
        if node == first {
            on_first += 1;
        } else {
            spilled = Some(node);
            break;
        }
    }
    assert!(
        on_first >= 2,
        "the hot Host's own node took {on_first} before spilling"
    );
    assert_eq!(
        spilled.as_deref(),
        Some(second.as_str()),
        "the hot Host spills to its second-ranked node"
    );
    let by_node = |n: &str| held.iter().filter(|x| x.node == n).count();
    let want: BTreeMap<String, usize> = ranked
        .iter()
        .map(|b| (b.clone(), by_node(&name_of[b])))
        .collect();
    wait_in_flight(r, &backends, &want);
    let spills = router_metric(r, "spills_total");
    assert!(
        spills.get(&ranked[0]).is_some_and(|&n| n >= 1.0),
        "spills counted on the full node: {spills:?}"
    );

    // With the load held, normal Hosts of the other nodes stay where they were.
    for h in &hosts {
        if owner[h] != first {
            assert_eq!(node_for(r, h, "/static/x.jpg"), owner[h], "{h} moved");
        }
    }

    // The clients go away with their bodies unsent: every count returns to 0, and every
    // Host to its own node.
    drop(held);
    wait_in_flight(r, &backends, &BTreeMap::new());
    check_all_home("after the load");

    // A backend that dies in the middle of a body (the client reading all along): the
    // error ends the body and its count.
    let hot_node = nodes
        .iter()
        .position(|n| n.name == first)
        .expect("the hot node");
    let x = hold(r, hot, "/static/big.bin");
    assert_eq!(x.node, first);
    let mut s = x.stream.try_clone().expect("clone the stream");
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    });
    wait_in_flight(r, &backends, &BTreeMap::from([(ranked[0].clone(), 1)]));
    nodes[hot_node].kill();
    let read = reader.join().expect("reader");
    assert!(read < BIG, "the body was cut, not finished ({read} bytes)");
    wait_in_flight(r, &backends, &BTreeMap::new());
    drop(x);
}
