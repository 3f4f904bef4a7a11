//! Test harness: a real S3 protocol server (s3s-fs) per test on a loopback port, the real
//! `ferry` binary as a child process in a temp dir, and helpers to wait and to inspect S3.
#![allow(dead_code)]

pub mod cluster;
pub mod nodes;
pub mod pg;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest;

// In Garage's key format (GK + 24 hex digits, 64 hex digits), which s3s-fs accepts too.
pub const ACCESS_KEY: &str = "GK0123456789abcdef01234567";
pub const SECRET_KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// The S3 server the integration tests run against: `FERRY_TEST_S3=s3s-fs` (the default,
/// quick to install) or `garage` (a second implementation: composite multipart checksums,
/// nothing stored on a rejected PUT, no streaming checksum trailer over plain HTTP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    S3sFs,
    Garage,
}

pub fn backend() -> Backend {
    match std::env::var("FERRY_TEST_S3").as_deref() {
        Err(_) | Ok("") | Ok("s3s-fs") => Backend::S3sFs,
        Ok("garage") => Backend::Garage,
        Ok(other) => panic!("FERRY_TEST_S3={other}: expected s3s-fs or garage"),
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A server binary: `$ENV_VAR`, else on PATH, else in ~/.cargo/bin; `hint` says how to
/// install it.
fn server_bin(env_var: &str, name: &str, hint: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env_var) {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = Path::new(&home).join(".cargo/bin").join(name);
    assert!(p.exists(), "{name} is not installed: {hint}");
    p
}

fn s3s_fs_bin() -> PathBuf {
    server_bin(
        "S3S_FS",
        "s3s-fs",
        "run scripts/local-s3.sh install (or cargo install s3s-fs --version 0.14.1 --features binary --locked)",
    )
}

fn garage_bin() -> PathBuf {
    server_bin("GARAGE", "garage", "run scripts/local-s3.sh install-garage")
}

/// One S3 server (s3s-fs or Garage, see `backend`) with one bucket; stopped on drop.
pub struct S3 {
    pub port: u16,
    pub data: PathBuf,
    pub bucket: String,
    pub backend: Backend,
    /// Garage's cluster RPC port.
    rpc_port: u16,
    child: Option<Child>,
    ever_started: bool,
}

/// True when process `pid` holds the socket listening on loopback `port` (so the S3 server
/// that answered is our child, not another test's that took the port first).
fn listens(pid: u32, port: u16) -> bool {
    let want = format!(":{port:04X}");
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is field 1, st (0A = LISTEN) field 3, inode field 9.
            if f.len() > 9 && f[1].ends_with(&want) && f[3] == "0A" {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .map(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str()))
            .unwrap_or(false)
    })
}

/// True when something on `port` answers an unsigned request the way an S3 server does.
fn answers_as_s3(port: u16) -> bool {
    let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    if c.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = c.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.starts_with("HTTP/1.1 ") && text.contains("<Error>")
}

impl S3 {
    pub fn start(root: &Path) -> S3 {
        let mut s = S3 {
            port: free_port(),
            data: root.join("s3data"),
            bucket: "ferry-test".into(),
            backend: backend(),
            rpc_port: free_port(),
            child: None,
            ever_started: false,
        };
        match s.backend {
            Backend::S3sFs => std::fs::create_dir_all(s.data.join(&s.bucket)).unwrap(),
            Backend::Garage => std::fs::create_dir_all(&s.data).unwrap(),
        }
        s.up();
        s
    }

    fn garage_config(&self) -> PathBuf {
        self.data.join("garage.toml")
    }

    fn spawn_server(&self) -> Child {
        let mut c = match self.backend {
            Backend::S3sFs => {
                let mut c = Command::new(s3s_fs_bin());
                c.args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
                    .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                    .arg(&self.data);
                c
            }
            Backend::Garage => {
                let d = self.data.display();
                let config = format!(
                    "metadata_dir = \"{d}/meta\"\n\
                     data_dir = \"{d}/data\"\n\
                     db_engine = \"sqlite\"\n\
                     replication_factor = 1\n\
                     rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                     rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                     rpc_secret = \"{SECRET_KEY}\"\n\
                     [s3_api]\n\
                     s3_region = \"us-east-1\"\n\
                     api_bind_addr = \"127.0.0.1:{port}\"\n\
                     root_domain = \".s3.garage.localhost\"\n",
                    rpc = self.rpc_port,
                    port = self.port,
                );
                std::fs::write(self.garage_config(), config).unwrap();
                let mut c = Command::new(garage_bin());
                c.arg("-c").arg(self.garage_config()).arg("server");
                c.env("RUST_LOG", "warn");
                c
            }
        };
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the S3 server")
    }

    /// Runs a `garage` admin command against this node; Err(output) when it fails.
    fn garage(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(garage_bin())
            .arg("-c")
            .arg(self.garage_config())
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run garage");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "garage {args:?}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// A new Garage node: one-node layout, the test key, the bucket.
    fn garage_setup(&self) {
        let mut id = String::new();
        wait_for(Duration::from_secs(30), "garage RPC", || {
            match self.garage(&["node", "id", "-q"]) {
                Ok(out) => {
                    id = out.trim().split('@').next().unwrap_or_default().to_string();
                    !id.is_empty()
                }
                Err(_) => false,
            }
        });
        let steps: [&[&str]; 5] = [
            &["layout", "assign", "-z", "dc1", "-c", "10G", &id],
            &["layout", "apply", "--version", "1"],
            &[
                "key",
                "import",
                "--yes",
                "-n",
                "ferry-test",
                ACCESS_KEY,
                SECRET_KEY,
            ],
            &["bucket", "create", &self.bucket],
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                &self.bucket,
                "--key",
                ACCESS_KEY,
            ],
        ];
        for step in steps {
            if let Err(e) = self.garage(step) {
                panic!("{e}");
            }
        }
        // The bucket answers once the layout has reached the S3 front.
        let store = rt().block_on(self.store());
        wait_for(Duration::from_secs(30), "garage bucket", || {
            rt().block_on(store.head_bucket()).is_ok()
        });
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts (or restarts) the server on its port. A port picked by `free_port` can be taken
    /// by another test's listener before s3s-fs binds it, and a connect alone would then
    /// succeed against the wrong server: so the server must answer as S3 (an XML error to an
    /// unsigned request) while our child is alive. On a first start a lost port is replaced.
    pub fn up(&mut self) {
        assert!(self.child.is_none());
        for attempt in 0..5 {
            let mut child = self.spawn_server();
            let start = Instant::now();
            let mut exited = false;
            while start.elapsed() < Duration::from_secs(20) {
                if child.try_wait().ok().flatten().is_some() {
                    exited = true;
                    break;
                }
                if answers_as_s3(self.port)
                    && child.try_wait().ok().flatten().is_none()
                    && listens(child.id(), self.port)
                {
                    self.child = Some(child);
                    if self.backend == Backend::Garage && !self.ever_started {
                        self.garage_setup();
                    }
                    self.ever_started = true;
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            if !exited {
                panic!(
                    "{:?} did not answer on port {} within 20 s",
                    self.backend, self.port
                );
            }
            // It could not bind: on a restart the port may still be held briefly.
            if self.ever_started {
                std::thread::sleep(Duration::from_millis(200 * (attempt + 1)));
            } else {
                self.port = free_port();
                self.rpc_port = free_port();
            }
        }
        panic!(
            "{:?} could not listen on 127.0.0.1:{}",
            self.backend, self.port
        );
    }

    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The object's bytes, read through the S3 API.
    pub fn object_bytes(&self, object_key: &str) -> Vec<u8> {
        rt().block_on(async {
            let out = self
                .store()
                .await
                .get(object_key, None)
                .await
                .unwrap_or_else(|e| panic!("GET {object_key}: {e}"));
            out.body
                .collect()
                .await
                .unwrap_or_else(|e| panic!("GET {object_key} body: {e}"))
                .into_bytes()
                .to_vec()
        })
    }

    /// Deletes an object behind ferry's back.
    pub fn remove_object(&self, object_key: &str) {
        rt().block_on(async { self.store().await.delete(object_key).await })
            .unwrap_or_else(|e| panic!("DELETE {object_key}: {e}"));
    }

    /// A real S3 client for checks.
    pub async fn store(&self) -> ferry::store::Store {
        let cfg = self.config_for_client();
        ferry::store::Store::with_credentials(&cfg, ACCESS_KEY, SECRET_KEY).await
    }

    fn config_for_client(&self) -> ferry::config::Config {
        let mut cfg = ferry::config::Config::default();
        cfg.s3.endpoint = self.endpoint();
        cfg.s3.bucket = self.bucket.clone();
        cfg.s3.path_style = true;
        cfg
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.down();
    }
}

/// Polls `f` every 50 ms until true; panics with `what` after `limit`.
pub fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// Bytes that differ per name, so a mix-up between files cannot pass.
pub fn content(name: &str, len: usize) -> Vec<u8> {
    let seed = sha256_hex(name.as_bytes());
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(sha256_hex(format!("{seed}{i}").as_bytes()).as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

/// A ferry working directory: spool, archive, catalog, env.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub vars: HashMap<String, String>,
}

impl Env {
    pub fn new(s3_endpoint: &str, bucket: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let mut vars = HashMap::new();
        let p = |s: &str| dir.path().join(s).to_string_lossy().into_owned();
        vars.insert("FERRY_SPOOL_DIR".into(), p("spool"));
        vars.insert("FERRY_ARCHIVE_DIR".into(), p("archive"));
        vars.insert("FERRY_CATALOG_PATH".into(), p("ferry.db"));
        vars.insert("FERRY_CACHE_DIR".into(), p("cache"));
        vars.insert("FERRY_SPOOL_SETTLE".into(), "300ms".into());
        vars.insert("FERRY_SPOOL_RESCAN_INTERVAL".into(), "5s".into());
        vars.insert("FERRY_S3_ENDPOINT".into(), s3_endpoint.into());
        vars.insert("FERRY_S3_BUCKET".into(), bucket.into());
        vars.insert("FERRY_S3_PATH_STYLE".into(), "true".into());
        vars.insert("FERRY_RETRY_INITIAL".into(), "200ms".into());
        vars.insert("FERRY_RETRY_MAX_INTERVAL".into(), "2s".into());
        vars.insert("FERRY_HTTP_LISTEN".into(), "127.0.0.1:0".into());
        vars.insert("FERRY_HTTP_NODE_NAME".into(), "test-node".into());
        vars.insert("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into());
        vars.insert("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into());
        std::fs::create_dir_all(dir.path().join("spool")).unwrap();
        Env { dir, vars }
    }

    pub fn for_s3(s3: &S3) -> Env {
        Env::new(&s3.endpoint(), &s3.bucket)
    }

    pub fn set(&mut self, k: &str, v: &str) -> &mut Self {
        self.vars.insert(k.into(), v.into());
        self
    }

    pub fn spool(&self) -> PathBuf {
        self.dir.path().join("spool")
    }
    pub fn archive(&self) -> PathBuf {
        self.dir.path().join("archive")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        self.command_for(env!("CARGO_BIN_EXE_ferry"), args)
    }

    /// Like `command`, for another program (a wrapper that execs ferry).
    pub fn command_for(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.args(args).current_dir(self.dir.path());
        // Nothing from the developer's own environment leaks in.
        for (k, _) in std::env::vars() {
            if k.starts_with("FERRY_") || k.starts_with("AWS_") {
                c.env_remove(k);
            }
        }
        c.envs(&self.vars);
        c.env("AWS_EC2_METADATA_DISABLED", "true");
        c.env("FERRY_LOG", "info");
        c
    }

    /// Runs a subcommand to completion: (exit code, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.command(args).output().expect("run ferry");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts a long-running subcommand (`sync`, `run`, `serve`).
    pub fn spawn(&self, args: &[&str]) -> Daemon {
        self.spawn_with(env!("CARGO_BIN_EXE_ferry"), args)
    }

    pub fn spawn_with(&self, program: &str, args: &[&str]) -> Daemon {
        self.spawn_command(self.command_for(program, args))
    }

    /// Starts ferry as another user (root drops to it, and with it every capability).
    pub fn spawn_as(&self, uid: u32, gid: u32, args: &[&str]) -> Daemon {
        use std::os::unix::process::CommandExt;
        let mut c = self.command(args);
        c.uid(uid).gid(gid);
        self.spawn_command(c)
    }

    pub fn spawn_command(&self, mut cmd: Command) -> Daemon {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry");
        let log = Arc::new(Mutex::new(String::new()));
        let addr = Arc::new(Mutex::new(None));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        {
            let addr = addr.clone();
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(a) = line.strip_prefix("ferry: http listening on ") {
                        *addr.lock().unwrap() = a.trim().parse::<SocketAddr>().ok();
                    }
                    log.lock().unwrap().push_str(&line);
                    log.lock().unwrap().push('\n');
                }
            });
        }
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().unwrap().push_str(&line);
                    log.lock().unwrap().push('\n');
                }
            });
        }
        Daemon { child, log, addr }
    }

    /// `ferry status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let (code, out, err) = self.run(&["status", "--json"]);
        assert_eq!(code, 0, "status failed: {err}");
        serde_json::from_str(&out).expect("status --json is JSON")
    }

    pub fn count(&self, state: &str) -> u64 {
        self.status()["counts"][state].as_u64().unwrap_or(0)
    }

    /// Files left in the spool (regular files, any depth).
    pub fn spool_files(&self) -> Vec<PathBuf> {
        walk(&self.spool())
    }

    /// Writes a file into the spool the way `cp` would (create, write, close).
    pub fn drop_file(&self, key: &str, bytes: &[u8]) {
        let p = self.spool().join(key);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
}

pub fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// A running ferry; killed on drop.
pub struct Daemon {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    addr: Arc<Mutex<Option<SocketAddr>>>,
}

impl Daemon {
    pub fn addr(&self) -> SocketAddr {
        let mut found = None;
        wait_for(Duration::from_secs(30), "ferry to listen", || {
            found = *self.addr.lock().unwrap();
            found.is_some()
        });
        found.unwrap()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for `needle` in the log: the log reaches the test through a pipe and a reader
    /// thread, so a line written just before a response can arrive after it.
    pub fn wait_log(&self, needle: &str, limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.log().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "timed out after {limit:?} waiting for {needle:?} in ferry's log:\n{}",
            self.log()
        );
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failed test shows what ferry said; the panic message alone rarely explains a hang.
        if std::thread::panicking() {
            // Let the reader threads take in the last lines.
            std::thread::sleep(Duration::from_millis(100));
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(200).collect();
            eprintln!("---- ferry's log (last {} lines) ----", tail.len());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
            eprintln!("---- end of ferry's log ----");
        }
    }
}

/// A raw HTTP/1.1 exchange: the request path is sent exactly as given (no client-side
/// normalisation), so hostile URLs reach the server as written.
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub raw_head: Vec<u8>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The first sample of `name` (a series name as exposed, e.g. `ferry_uploads_total`) in
/// the node's `/metrics`.
pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    let r = raw_request(addr, "GET", b"/metrics", &[]);
    String::from_utf8_lossy(&r.body)
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

pub fn raw_request(
    addr: SocketAddr,
    method: &str,
    target: &[u8],
    headers: &[(&str, &str)],
) -> RawResponse {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = Vec::new();
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.extend_from_slice(b"Host: test\r\n");
    }
    for (k, v) in headers {
        req.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    s.write_all(&req).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(buf.len());
    let head = buf[..split].to_vec();
    let body = buf.get(split + 4..).unwrap_or_default().to_vec();
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    RawResponse {
        status,
        headers,
        raw_head: head,
        body,
    }
}

/// A TCP proxy in front of the S3 server that can corrupt PUT bodies and slow traffic:
/// fault injection around the real server, not a replacement for it.
pub struct FaultProxy {
    pub port: u16,
    /// How many more request bodies to corrupt (one flipped byte each).
    pub corrupt_left: Arc<AtomicUsize>,
    pub corrupted: Arc<AtomicUsize>,
    /// Delay per forwarded client chunk, in ms.
    pub delay_ms: Arc<AtomicUsize>,
    /// Delay per forwarded server chunk, in ms (slow downloads).
    pub down_delay_ms: Arc<AtomicUsize>,
    /// Request lines seen ("GET /bucket/key HTTP/1.1"), to count what reached S3.
    pub requests: Arc<Mutex<Vec<String>>>,
    /// How many more responses get an ETag with one hex digit changed (a server whose
    /// ETag is not the MD5 of what it stored).
    pub etag_lies_left: Arc<AtomicUsize>,
}

impl FaultProxy {
    pub fn start(upstream: u16) -> FaultProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let corrupt_left = Arc::new(AtomicUsize::new(0));
        let corrupted = Arc::new(AtomicUsize::new(0));
        let delay_ms = Arc::new(AtomicUsize::new(0));
        let down_delay_ms = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let etag_lies_left = Arc::new(AtomicUsize::new(0));
        let (cl, cd, dm) = (corrupt_left.clone(), corrupted.clone(), delay_ms.clone());
        let (ddm, reqs) = (down_delay_ms.clone(), requests.clone());
        let lies = etag_lies_left.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (cl, cd, dm, reqs) = (cl.clone(), cd.clone(), dm.clone(), reqs.clone());
                std::thread::spawn(move || pump_up(client, server, cl, cd, dm, reqs));
                let (ddm, lies) = (ddm.clone(), lies.clone());
                std::thread::spawn(move || {
                    let (mut s, mut c) = (s2, c2);
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        lie_about_etag(&mut buf[..n], &lies);
                        let d = ddm.load(Ordering::Relaxed);
                        if d > 0 {
                            std::thread::sleep(Duration::from_millis(d as u64));
                        }
                        if c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        FaultProxy {
            port,
            corrupt_left,
            corrupted,
            delay_ms,
            down_delay_ms,
            requests,
            etag_lies_left,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// How many requests with this method reached the server for a path containing `needle`.
    pub fn count(&self, method: &str, needle: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(&format!("{method} ")) && l.contains(needle))
            .count()
    }
}

/// Server → client: while `lies` > 0, changes the first hex digit of an `ETag` header in
/// this chunk (a response head arrives in one read on loopback).
fn lie_about_etag(chunk: &mut [u8], lies: &AtomicUsize) {
    if lies.load(Ordering::SeqCst) == 0 {
        return;
    }
    let lower = chunk.to_ascii_lowercase();
    let Some(at) = lower.windows(7).position(|w| w == b"\r\netag:") else {
        return;
    };
    let Some(q) = chunk[at + 7..].iter().position(|&b| b == b'"') else {
        return;
    };
    let i = at + 7 + q + 1;
    if i < chunk.len()
        && chunk[i].is_ascii_hexdigit()
        && lies
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
            .is_ok()
    {
        chunk[i] = if chunk[i] == b'0' { b'1' } else { b'0' };
    }
}

/// Client → server: records each request line and flips the first body byte of a PUT with
/// a non-empty body while `corrupt_left` > 0. Bodies are skipped by their Content-Length, so
/// requests that follow a body on a kept-alive connection are seen as requests.
fn pump_up(
    mut client: TcpStream,
    mut server: TcpStream,
    corrupt_left: Arc<AtomicUsize>,
    corrupted: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut window: Vec<u8> = Vec::new();
    let mut body_left = 0u64;
    let mut flip_pending = false;
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        let mut pos = 0;
        while pos < n {
            if body_left > 0 {
                let k = (body_left as usize).min(n - pos);
                if flip_pending {
                    chunk[pos] ^= 0xff;
                    flip_pending = false;
                    corrupted.fetch_add(1, Ordering::SeqCst);
                }
                body_left -= k as u64;
                pos += k;
                continue;
            }
            let before = window.len();
            window.extend_from_slice(&chunk[pos..]);
            let Some(end) = window.windows(4).position(|w| w == b"\r\n\r\n") else {
                if window.len() > 64 * 1024 {
                    window.drain(..window.len() - 4);
                }
                break;
            };
            let raw_head = String::from_utf8_lossy(&window[..end]).into_owned();
            if let Some(line) = raw_head.lines().next() {
                requests.lock().unwrap().push(line.to_string());
            }
            let head = raw_head.to_ascii_lowercase();
            body_left = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            if head.starts_with("put ")
                && body_left > 0
                && corrupt_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
                    .is_ok()
            {
                flip_pending = true;
            }
            pos += end + 4 - before;
            window.clear();
        }
        let d = delay_ms.load(Ordering::Relaxed);
        if d > 0 {
            std::thread::sleep(Duration::from_millis(d as u64));
        }
        if server.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = server.shutdown(std::net::Shutdown::Write);
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
