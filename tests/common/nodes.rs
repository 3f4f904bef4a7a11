//! Fronts in front of real serving nodes: `ferry serve` nodes on loopback ports (no S3;
//! each serves `/static/x.jpg` from its spool, and every answer names its node in
//! X-Ferry-Node), `ferry route`, and plain HTTP/1.1 requests with an explicit Host. Used by the HAProxy and the dashboard/alert tests; the
//! same shapes as tests/route.rs's own helpers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Leaves the child none of our FERRY_*/AWS_* variables: each test sets what it means.
pub fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("FERRY_") || k.starts_with("AWS_") {
            cmd.env_remove(&*k);
        }
    }
}

/// A `ferry` child process, killed on drop.
pub struct Proc {
    child: Child,
    pub addr: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Runs `ferry <sub>` with only `vars` from the FERRY_/AWS_ families, and waits for its
    /// "ferry: <what> listening on ADDR" line.
    pub fn start(sub: &str, what: &str, dir: &Path, vars: &[(&str, String)]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
        cmd.arg(sub).current_dir(dir);
        clean_env(&mut cmd);
        cmd.env("AWS_EC2_METADATA_DISABLED", "true");
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let log = std::fs::File::create(dir.join(format!("{sub}.log"))).expect("log file");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start ferry");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let prefix = format!("ferry: {what} listening on ");
        std::thread::spawn(move || {
            // Keeps reading after the line so the child never blocks on a full pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix(&prefix) {
                    let _ = tx.send(a.trim().to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a.parse().expect("a socket address"),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log =
                    std::fs::read_to_string(dir.join(format!("{sub}.log"))).unwrap_or_default();
                panic!("ferry {sub} did not print its address; its log:\n{log}");
            }
        };
        Proc { child, addr }
    }

    /// SIGKILL: no graceful anything.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn node_vars(dir: &Path, name: &str, listen: &str) -> Vec<(&'static str, String)> {
    let p = |s: &str| dir.join(s).to_string_lossy().into_owned();
    vec![
        ("FERRY_HTTP_LISTEN", listen.to_string()),
        ("FERRY_HTTP_NODE_NAME", name.to_string()),
        ("FERRY_SPOOL_DIR", p("spool")),
        ("FERRY_ARCHIVE_DIR", p("archive")),
        ("FERRY_CATALOG_PATH", p("ferry.db")),
        ("FERRY_CACHE_DIR", p("cache")),
        ("FERRY_S3_ENDPOINT", "http://127.0.0.1:1".to_string()),
        ("AWS_ACCESS_KEY_ID", "x".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "y".to_string()),
    ]
}

/// One serving node (`ferry serve`) and its working directory.
pub struct Node {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    proc: Option<Proc>,
}

impl Node {
    pub fn start(name: &str) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        // Served from the spool, without asking S3 (which these nodes do not have): a
        // quick 200 naming the node, so a round over many Hosts takes milliseconds.
        std::fs::create_dir_all(dir.path().join("spool")).expect("spool");
        std::fs::write(dir.path().join("spool/x.jpg"), name).expect("spool file");
        let p = Proc::start(
            "serve",
            "http",
            dir.path(),
            &node_vars(dir.path(), name, "127.0.0.1:0"),
        );
        Node {
            name: name.to_string(),
            addr: p.addr,
            dir,
            proc: Some(p),
        }
    }

    pub fn backend(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn kill(&mut self) {
        if let Some(p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts it again on the very address it had.
    pub fn restart(&mut self) {
        assert!(self.proc.is_none());
        let vars = node_vars(self.dir.path(), &self.name, &self.addr.to_string());
        let p = Proc::start("serve", "http", self.dir.path(), &vars);
        assert_eq!(p.addr, self.addr);
        self.proc = Some(p);
    }
}

/// `ferry route` on a free loopback port in front of `backends`.
pub fn start_router(dir: &Path, backends: &[String], extra: &[(&'static str, String)]) -> Proc {
    let mut vars = vec![
        ("FERRY_ROUTER_LISTEN", "127.0.0.1:0".to_string()),
        ("FERRY_ROUTER_BACKENDS", backends.join(",")),
        ("FERRY_ROUTER_HEALTH_INTERVAL", "200ms".to_string()),
    ];
    vars.extend(extra.iter().cloned());
    Proc::start("route", "router", dir, &vars)
}

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn node(&self) -> String {
        self.header("x-ferry-node").unwrap_or("").to_string()
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 GET over a fresh connection, with the Host set explicitly.
pub fn get(addr: SocketAddr, host: &str, path: &str) -> Resp {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // One write: `write!` on a bare socket sends each piece as it goes, and a front that
    // waits for the rest sits out Nagle and the delayed ACK (40 ms a request).
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the response");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let len = usize::from_str_radix(String::from_utf8_lossy(&b[..nl]).trim(), 16).unwrap_or(0);
        if len == 0 || b.len() < nl + 2 + len {
            break;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + len]);
        b = &b[(nl + 2 + len + 2).min(b.len())..];
    }
    out
}

/// A GET through a front that must be answered by some node, never by the front itself
/// (whose own errors carry no X-Ferry-Node). Other keys than x.jpg are a node's 503: no S3.
pub fn node_for(front: SocketAddr, host: &str, path: &str) -> String {
    let r = get(front, host, path);
    let node = r.node();
    assert!(
        !node.is_empty(),
        "{host} {path}: status {} without a node: {}",
        r.status,
        r.text()
    );
    node
}

/// An external tool the test needs (haproxy, promtool): its path, or None when it truly is
/// not installed here, which is a failure under CI (`.ci/run` installs them, and sets
/// FERRY_TEST_REQUIRE_TOOLS) and a skip with the reason printed elsewhere.
pub fn tool(name: &str, debian_package: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        let required = std::env::var_os("FERRY_TEST_REQUIRE_TOOLS").is_some()
            || std::env::var_os("CI").is_some();
        assert!(
            !required,
            "{name} is not installed (apt-get install {debian_package}; .ci/run does)"
        );
        eprintln!("SKIPPED: {name} is not installed here (apt-get install {debian_package})");
    }
    found
}

/// One client connection kept alive across requests, as a browser's. Through a front with a
/// load bound (HAProxy's `hash-balance-factor`), a fresh connection per request can find
/// the previous request still counted on its node for a moment, and be sent to the next
/// node by design; one connection's requests follow each other, so each finds no load.
pub struct KeepAlive {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl KeepAlive {
    pub fn new(addr: SocketAddr) -> KeepAlive {
        KeepAlive { addr, conn: None }
    }

    /// A GET with `host`; a connection the front closed is opened again once.
    pub fn get(&mut self, host: &str, path: &str) -> Resp {
        for attempt in 0..2 {
            if self.conn.is_none() {
                let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
                    .expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.set_nodelay(true).unwrap();
                self.conn = Some(BufReader::new(s));
            }
            match self.exchange(host, path) {
                Some(r) => return r,
                None if attempt == 0 => self.conn = None,
                None => break,
            }
        }
        panic!("{host} {path}: no response on a kept-alive or a new connection");
    }

    fn exchange(&mut self, host: &str, path: &str) -> Option<Resp> {
        let c = self.conn.as_mut()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        c.get_mut().write_all(req.as_bytes()).ok()?;
        let mut line = String::new();
        if c.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let status = line.split(' ').nth(1)?.parse().ok()?;
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            c.read_line(&mut h).ok()?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':')?;
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let r = Resp {
            status,
            headers,
            body: Vec::new(),
        };
        let len: usize = r.header("content-length")?.parse().ok()?;
        let close = r
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let mut body = vec![0u8; len];
        c.read_exact(&mut body).ok()?;
        if close {
            self.conn = None;
        }
        Some(Resp { body, ..r })
    }

    /// Like `node_for`: the answer must come from a node.
    pub fn node_for(&mut self, host: &str, path: &str) -> String {
        let r = self.get(host, path);
        let node = r.node();
        assert!(
            !node.is_empty(),
            "{host} {path}: status {} without a node: {}",
            r.status,
            r.text()
        );
        node
    }
}
