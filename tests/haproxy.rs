//! HAProxy as the production front: Debian's haproxy, run from contrib/haproxy/haproxy.cfg
//! with only its addresses substituted, in front of three real `ferry serve` nodes on
//! loopback, through the failover test `ferry route` passes (tests/route.rs): every Host
//! sticks to one node; a node killed moves its Hosts within 2 s and nothing else; back, they
//! return.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::nodes::*;

const SHIPPED: &str = include_str!("../contrib/haproxy/haproxy.cfg");

/// haproxy in the foreground (`-db`), killed on drop; its output in `log`.
struct Haproxy {
    child: Child,
    front: SocketAddr,
    stats: SocketAddr,
    log: std::path::PathBuf,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- haproxy's output ----\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// HAProxy cannot bind port 0: a port the kernel just handed out and let go.
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// The shipped file with its listen and node addresses replaced, each exactly once (a file
/// that no longer has one of them fails here, not silently later).
fn test_config(front: SocketAddr, stats: SocketAddr, nodes: &[SocketAddr]) -> String {
    let mut cfg = SHIPPED.to_string();
    let mut swap = |from: &str, to: &str| {
        assert_eq!(
            cfg.matches(from).count(),
            1,
            "{from:?} once in the shipped cfg"
        );
        cfg = cfg.replace(from, to);
    };
    swap("bind :8000\n", &format!("bind {front}\n"));
    swap("bind 127.0.0.1:8404\n", &format!("bind {stats}\n"));
    for (i, a) in nodes.iter().enumerate() {
        swap(&format!(" 10.0.0.1{}:8080\n", i + 1), &format!(" {a}\n"));
    }
    // Only root can switch to the haproxy user; elsewhere it runs as whoever runs the test.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: running haproxy without its `user`/`group` lines");
        cfg = cfg
            .lines()
            .filter(|l| !matches!(l.trim().split(' ').next(), Some("user" | "group")))
            .collect::<Vec<_>>()
            .join("\n");
    }
    cfg
}

fn start_haproxy(bin: &Path, dir: &Path, nodes: &[SocketAddr]) -> Haproxy {
    // A port picked here can be taken before haproxy binds it: then it exits, and we try
    // others.
    for attempt in 0..5 {
        let (front, stats) = (free_addr(), free_addr());
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, test_config(front, stats, nodes)).unwrap();
        let check = Command::new(bin)
            .arg("-c")
            .arg("-f")
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "haproxy -c rejects the config: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let log = dir.join(format!("haproxy-{attempt}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start haproxy");
        let mut h = Haproxy {
            child,
            front,
            stats,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if h.child.try_wait().ok().flatten().is_some() {
                break;
            }
            if TcpStream::connect(front).is_ok() && TcpStream::connect(stats).is_ok() {
                return h;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "haproxy did not come up (attempt {attempt}):\n{}",
            std::fs::read_to_string(&h.log).unwrap_or_default()
        );
        let _ = h.child.kill();
        let _ = h.child.wait();
    }
    panic!("haproxy never listened");
}

impl Haproxy {
    /// What haproxy believes about each node: server name -> "UP", "DOWN", "UP 1/2", ...
    /// from its own stats (CSV).
    fn server_status(&self) -> BTreeMap<String, String> {
        let r = get(self.stats, "stats", "/stats;csv");
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f.len() > 17 && f[0] == "ferry_nodes" && f[1].starts_with("node"))
                    .then(|| (f[1].to_string(), f[17].to_string()))
            })
            .collect()
    }
}

#[test]
fn hosts_stick_fail_over_and_come_back_through_haproxy() {
    let Some(bin) = tool("haproxy", "haproxy") else {
        return;
    };
    let mut nodes: Vec<Node> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| Node::start(n))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let hap = start_haproxy(&bin, dir.path(), &addrs);
    let f = hap.front;
    let mut c = KeepAlive::new(f);
    // haproxy's server names, in the order of the cfg's `server` lines.
    let server_of: BTreeMap<String, String> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.clone(), format!("node{}", i + 1)))
        .collect();

    // The front's own liveness, whatever the Host.
    assert_eq!(get(f, "h0.example", "/-/router/healthz").status, 200);
    let hosts: Vec<String> = (0..30).map(|i| format!("h{i}.example")).collect();

    // Each host has one node, every time; the Host's case does not matter; the client's
    // address reaches the node in X-Forwarded-For (its access to it is the node's log, so
    // check what haproxy says it adds: the header rule is in the shipped file).
    let mut owner = BTreeMap::new();
    for h in &hosts {
        let first = c.node_for(h, "/static/x.jpg");
        for _ in 0..3 {
            assert_eq!(c.node_for(h, "/static/x.jpg"), first, "{h} moved");
        }
        assert_eq!(c.node_for(&h.to_uppercase(), "/static/x.jpg"), first);
        owner.insert(h.clone(), first);
    }
    let used: BTreeSet<&String> = owner.values().collect();
    assert_eq!(used.len(), 3, "30 hosts should use all 3 nodes: {owner:?}");
    assert!(SHIPPED.contains("option forwardfor"));

    // SIGKILL one node: its hosts go elsewhere within 2 s, nobody else moves, and no request
    // fails on the way (a refused connection is redispatched at once).
    let victim = 1;
    let vname = nodes[victim].name.clone();
    let vserver = server_of[&vname].clone();
    nodes[victim].kill();
    let killed = Instant::now();
    let moved = loop {
        // Settled once haproxy has taken the node out: from then on its hosts' places are
        // the ring's, not a retry's (which may pick another survivor).
        let down = hap.server_status()[&vserver] == "DOWN";
        let now: BTreeMap<String, String> = hosts
            .iter()
            .map(|h| (h.clone(), c.node_for(h, "/static/x.jpg")))
            .collect();
        for (h, n) in &now {
            assert_ne!(n, &vname, "{h} answered by the killed node");
            if owner[h] != vname {
                assert_eq!(n, &owner[h], "{h} is not on the dead node but moved");
            }
        }
        if down {
            break now;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "{vserver} not marked down within 2 s: {:?}",
            hap.server_status()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        killed.elapsed() < Duration::from_secs(2),
        "failover took {:?}",
        killed.elapsed()
    );
    // And they stay where they went while it is down.
    for _ in 0..3 {
        for h in &hosts {
            assert_eq!(c.node_for(h, "/static/x.jpg"), moved[h], "{h} moved again");
        }
    }

    // Restart it on the same port: its hosts come back after two good checks; nobody else
    // moves meanwhile.
    nodes[victim].restart();
    let restarted = Instant::now();
    loop {
        let now: BTreeMap<String, String> = hosts
            .iter()
            .map(|h| (h.clone(), c.node_for(h, "/static/x.jpg")))
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
            "hosts did not return within 10s: {now:?} vs {owner:?} ({:?})",
            hap.server_status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(hap.server_status()[&vserver], "UP");
}
