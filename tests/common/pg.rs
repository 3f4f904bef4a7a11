//! PostgreSQL for the integration tests: a real server per test (Debian's binaries, initdb in
//! a temp dir, a loopback port, trust auth, superuser and database `ferry`), crashed with
//! SIGKILL and restarted on demand, stopped and its data removed on drop.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// How long a start or restart may take until the server accepts connections.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long one psql (or initdb, or pg_ctl) may run.
const COMMAND_WITHIN: Duration = Duration::from_secs(60);

/// The newest installed PostgreSQL's bin dir (Debian's layout, /usr/lib/postgresql/N/bin,
/// none of it on PATH), or why there is none.
pub fn available() -> Result<PathBuf, String> {
    let root = Path::new("/usr/lib/postgresql");
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    for entry in fs::read_dir(root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Versions compare as numbers: 9.6 < 15 < 16.
        let Ok(version) = name
            .split('.')
            .map(str::parse)
            .collect::<Result<Vec<u32>, _>>()
        else {
            continue;
        };
        let bin = entry.path().join("bin");
        let complete = ["initdb", "postgres", "pg_ctl", "psql"]
            .iter()
            .all(|b| bin.join(b).is_file());
        if complete && best.as_ref().is_none_or(|(v, _)| version > *v) {
            best = Some((version, bin));
        }
    }
    best.map(|(_, bin)| bin)
        .ok_or_else(|| "no /usr/lib/postgresql/*/bin/initdb".to_string())
}

/// A started server, or None when PostgreSQL is not installed here: the same policy as
/// `nodes::tool` for haproxy and promtool, a failure under CI (`.ci/run` installs it and sets
/// FERRY_TEST_REQUIRE_TOOLS) and a skip with the reason printed elsewhere.
pub fn start_or_skip() -> Option<Postgres> {
    match available() {
        Ok(bin) => Some(Postgres::start_with(bin)),
        Err(why) => {
            let required = std::env::var_os("FERRY_TEST_REQUIRE_TOOLS").is_some()
                || std::env::var_os("CI").is_some();
            assert!(
                !required,
                "PostgreSQL is not installed: {why} (apt-get install postgresql; .ci/run does)"
            );
            eprintln!(
                "SKIPPED: PostgreSQL is not installed here: {why} (apt-get install postgresql)"
            );
            None
        }
    }
}

/// One running PostgreSQL on 127.0.0.1. Dropping it stops it (immediate shutdown, then
/// SIGKILL) and removes its data.
pub struct Postgres {
    bin: PathBuf,
    port: u16,
    /// Who owns the data and runs the server: PostgreSQL refuses to run as root, so under
    /// root (as in CI) the `postgres` user, else `nobody`; None runs it as ourselves.
    owner: Option<(u32, u32)>,
    data: PathBuf,
    sock: PathBuf,
    /// The server's stderr, kept across restarts, outside the data dir.
    log: PathBuf,
    /// The postmaster, our own child (not daemonized by pg_ctl), so we reap it: where PID 1
    /// reaps no orphans (this machine's does not), a dead but unreaped postmaster keeps its
    /// pid alive and a restart refuses the stale postmaster.pid as "another postmaster".
    child: Option<Child>,
    /// Holds data, sock and log; removed after `drop` has stopped the server.
    dir: tempfile::TempDir,
}

impl Postgres {
    /// initdb and start a server, and create database `ferry`; panics when PostgreSQL is not
    /// installed (`start_or_skip` skips instead).
    pub fn start() -> Postgres {
        let bin = available().unwrap_or_else(|why| {
            panic!("PostgreSQL is not installed: {why} (apt-get install postgresql)")
        });
        Postgres::start_with(bin)
    }

    fn start_with(bin: PathBuf) -> Postgres {
        let owner = server_user();
        let dir = tempfile::Builder::new()
            .prefix("ferry-pg-")
            .tempdir()
            .expect("a temp dir for PostgreSQL");
        // tempfile makes it 0700 and ours: the server's user must pass through it to its
        // data dir and socket dir, which it owns and keeps private (initdb wants 0700).
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        for d in [&data, &sock] {
            fs::create_dir(d).unwrap();
            fs::set_permissions(d, fs::Permissions::from_mode(0o700)).unwrap();
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
            }
        }
        let mut pg = Postgres {
            bin,
            port: 0,
            owner,
            data,
            sock,
            log: dir.path().join("postgres.log"),
            child: None,
            dir,
        };
        // Locale C and UTC: nothing depends on the machine's locales, and initdb skips the
        // scan of the zoneinfo files it does to guess the time zone.
        let mut initdb = pg.server_cmd("initdb");
        initdb
            .arg("-D")
            .arg(&pg.data)
            .args(["-U", "ferry", "-A", "trust", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"]);
        let (status, out, err) =
            run_bounded(initdb, COMMAND_WITHIN).unwrap_or_else(|e| panic!("initdb: {e}"));
        assert!(status.success(), "initdb: {status}\n{out}{err}");
        // The port comes from `free_port`, so another test may take it before the server
        // binds it: then another port, a few times.
        let mut last = String::new();
        for _ in 0..5 {
            pg.port = free_port();
            match pg.spawn() {
                Ok(()) => {
                    pg.psql_on("postgres", "create database ferry");
                    return pg;
                }
                Err(Spawn::PortTaken(why)) => last = why,
                Err(Spawn::Failed(why)) => panic!("PostgreSQL did not start: {why}"),
            }
        }
        panic!("PostgreSQL found no free port: {last}")
    }

    /// `postgres://ferry@127.0.0.1:PORT/ferry`.
    pub fn url(&self) -> String {
        format!("postgres://ferry@127.0.0.1:{}/ferry", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log (every start's, in order), to read when a test fails.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Crash it: the postmaster and every process it started die at once by SIGKILL, as on an
    /// OOM kill or a power cut of the database host. Returns once all of them are dead; the
    /// data dir keeps its stale postmaster.pid, for the restart to deal with as after a
    /// real crash. Nothing happens when the server is down.
    pub fn kill(&mut self) {
        if let Err(why) = self.crash() {
            panic!("{why}");
        }
    }

    /// `kill`, its one failure (a process that outlives SIGKILL, as in uninterruptible
    /// sleep) returned, since `stop` runs in drop.
    fn crash(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // Reaped, its pid may be another process's by now: nothing to signal. (Its children
        // end by themselves once they see the postmaster gone.)
        if let Ok(Some(_)) = child.try_wait() {
            return Ok(());
        }
        let pid = child.id() as i32;
        // Stopped, the postmaster starts no new backend between the listing and the kill.
        // Its children are their own process groups (each calls setsid), so they are found
        // by parent pid, not killed as a group.
        // SAFETY: kill has no memory preconditions; pid is our unreaped child.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let kids = children_of(pid);
        for &k in &kids {
            // SAFETY: as above; a kid that already exited is at worst an unreaped zombie of
            // the stopped postmaster, so its pid is not reused.
            unsafe { libc::kill(k, libc::SIGKILL) };
        }
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while kids.iter().any(|&k| alive(k)) {
            if Instant::now() >= deadline {
                return Err(format!(
                    "PostgreSQL's processes {kids:?} outlived a SIGKILL by 10 s"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Start it again on the same port and data dir (after `kill`: crash recovery), and wait
    /// until it accepts connections. A running server is first stopped (immediate).
    pub fn restart(&mut self) {
        self.stop();
        if let Err(Spawn::PortTaken(why) | Spawn::Failed(why)) = self.spawn() {
            panic!("PostgreSQL did not come back on port {}: {why}", self.port);
        }
    }

    /// Runs `sql` in database `ferry` with psql; its output unaligned without headers
    /// (one row a line, columns separated by `|`), trimmed. Panics with psql's stderr when it
    /// fails.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_on("ferry", sql)
    }

    /// As `psql`, but a failure (the server down, an SQL error) is psql's stderr.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        self.try_psql_on("ferry", sql)
    }

    /// Turns TLS on (a throwaway CA and a server certificate for 127.0.0.1 and localhost,
    /// made with openssl) and returns the CA certificate's path, for `SSL_CERT_FILE`.
    pub fn enable_tls(&self) -> PathBuf {
        let dir = self.dir.path().join("tls");
        fs::create_dir_all(&dir).unwrap();
        let ext = dir.join("server.ext");
        fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let openssl = |args: &[&str]| {
            let mut c = Command::new("openssl");
            c.args(args).current_dir(&dir);
            let (status, out, err) =
                run_bounded(c, COMMAND_WITHIN).unwrap_or_else(|e| panic!("openssl: {e}"));
            assert!(status.success(), "openssl {args:?}: {out}{err}");
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=ferry test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&ca);
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        openssl(&csr);
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        for f in ["server.crt", "server.key"] {
            let to = self.data.join(f);
            fs::copy(dir.join(f), &to).unwrap();
            fs::set_permissions(&to, fs::Permissions::from_mode(0o600)).unwrap();
            if let Some((uid, gid)) = self.owner {
                std::os::unix::fs::chown(&to, Some(uid), Some(gid)).unwrap();
            }
        }
        self.psql("ALTER SYSTEM SET ssl = 'on'");
        self.psql("SELECT pg_reload_conf()");
        // The reload is asynchronous: wait until a new session can use TLS.
        let start = Instant::now();
        while self
            .try_psql("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .map_or(true, |v| v != "t")
        {
            assert!(
                start.elapsed() < READY_WITHIN,
                "TLS never came on:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        dir.join("ca.crt")
    }

    fn psql_on(&self, db: &str, sql: &str) -> String {
        self.try_psql_on(db, sql)
            .unwrap_or_else(|err| panic!("psql -c {sql:?} on port {}: {err}", self.port))
    }

    fn try_psql_on(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut cmd = Command::new(self.bin.join("psql"));
        clean_env(&mut cmd);
        // A server that takes the connection but never answers fails in 5 s, not never.
        cmd.env("PGCONNECT_TIMEOUT", "5")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(format!("postgres://ferry@127.0.0.1:{}/{db}", self.port))
            .arg("-c")
            .arg(sql);
        let (status, out, err) = run_bounded(cmd, COMMAND_WITHIN)?;
        if status.success() {
            Ok(out.trim().to_string())
        } else {
            Err(format!("{status}: {}", err.trim()))
        }
    }

    /// A PostgreSQL program run as the server's user, with none of our PG* variables and in
    /// a dir that user may enter (ours may be /root).
    fn server_cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        clean_env(&mut cmd);
        cmd.env("LC_ALL", "C")
            .env("TZ", "UTC")
            .env("HOME", self.dir.path())
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        if let Some((uid, gid)) = self.owner {
            // std drops the supplementary groups too when it changes the uid as root (what
            // `setpriv --clear-groups` does), and there is no wrapper process in between.
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Runs the postmaster on `self.port` and waits until it accepts connections.
    fn spawn(&mut self) -> Result<(), Spawn> {
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let from = log.seek(SeekFrom::End(0)).unwrap();
        let mut cmd = self.server_cmd("postgres");
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.sock.display()))
            // Throwaway data: surviving an OS crash costs time and proves nothing here.
            // Without fsync a commit still writes its WAL to the kernel, so what was
            // committed survives `kill` (which kills processes, not the kernel) and crash
            // recovery replays it. Not synchronous_commit=off: that defers the WAL write
            // itself, and a SIGKILL loses the last ~0.6 s of commits.
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut child = cmd.spawn().expect("run postgres");
        let pid = child.id();
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let tail = self.log_from(from);
                let why = format!("postgres exited ({status}) before it was ready:\n{tail}");
                // "could not bind IPv4 address ...: Address already in use", then "could not
                // create any TCP/IP sockets".
                return Err(if tail.contains("could not create any TCP/IP sockets") {
                    Spawn::PortTaken(why)
                } else {
                    Spawn::Failed(why)
                });
            }
            if self.ready(pid) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Spawn::Failed(format!(
                    "not accepting connections within {READY_WITHIN:?}:\n{}",
                    self.log_from(from)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The postmaster `pid` says in postmaster.pid that it accepts connections (its 8th line,
    /// what `pg_ctl start -w` waits for; written after the sockets listen).
    fn ready(&self, pid: u32) -> bool {
        let Ok(text) = fs::read_to_string(self.data.join("postmaster.pid")) else {
            return false;
        };
        let lines: Vec<&str> = text.lines().collect();
        lines.len() > 7 && lines[0].trim() == pid.to_string() && lines[7].trim() == "ready"
    }

    fn log_from(&self, from: u64) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.seek(SeekFrom::Start(from));
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Immediate shutdown (`pg_ctl stop -m immediate`), SIGKILL if that did not end it.
    /// Never panics: it runs in drop.
    fn stop(&mut self) {
        if self.child.is_some() {
            let mut ctl = self.server_cmd("pg_ctl");
            ctl.args(["stop", "-m", "immediate", "-w", "-t", "10", "-s", "-D"])
                .arg(&self.data);
            let _ = run_bounded(ctl, Duration::from_secs(15));
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Some(child) = self.child.as_mut() {
                if matches!(child.try_wait(), Ok(Some(_))) || Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Gone already: reaped, and the wait for its children returns at once.
        let _ = self.crash();
    }

    /// After a crash (`kill` with no restart), the postmaster's SysV segment stays behind in
    /// the kernel: a restart would reclaim it, nothing else does. postmaster.pid's 7th line
    /// names it (key, id).
    fn remove_stale_segment(&self) {
        let Ok(text) = fs::read_to_string(self.data.join("postmaster.pid")) else {
            return;
        };
        let Some(id) = text
            .lines()
            .nth(6)
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|id| id.parse::<i32>().ok())
        else {
            return;
        };
        // SAFETY: shmid_ds is plain data, filled by IPC_STAT; IPC_RMID takes no buffer.
        unsafe {
            let mut ds: libc::shmid_ds = std::mem::zeroed();
            if libc::shmctl(id, libc::IPC_STAT, &mut ds) == 0 && ds.shm_nattch == 0 {
                libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
            }
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        self.remove_stale_segment();
    }
}

enum Spawn {
    /// Another process holds the port.
    PortTaken(String),
    Failed(String),
}

/// Under root, the user to run PostgreSQL as: `postgres` (Debian's package makes it), else
/// `nobody`; None when we are not root.
fn server_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    // /etc/passwd read directly: getpwnam is not thread-safe, and tests run in threads.
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    for name in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() > 3 && f[0] == name {
                if let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse()) {
                    return Some((uid, gid));
                }
            }
        }
    }
    panic!("running as root, with no postgres or nobody user to run PostgreSQL as")
}

/// None of our PG* variables (PGHOST, PGDATABASE, PGOPTIONS, ...) reach PostgreSQL's
/// programs: each call says what it means.
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PG") {
            cmd.env_remove(k);
        }
    }
}

/// Runs `cmd` to its end, killed after `within`: its status, stdout and stderr, or why not.
fn run_bounded(mut cmd: Command, within: Duration) -> Result<(ExitStatus, String, String), String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    // Read on threads while we wait, so a full pipe cannot block the child.
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = reader(Box::new(child.stdout.take().unwrap()));
    let err = reader(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + within;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{program} still running after {within:?}, killed"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let text = |t: std::thread::JoinHandle<String>| t.join().unwrap_or_default();
    Ok((status, text(out), text(err)))
}

/// The pids whose parent is `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let mut kids = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if stat_fields(p).is_some_and(|(_, ppid)| ppid == pid) {
            kids.push(p);
        }
    }
    kids
}

/// A process that still runs: a zombie is dead (the postmaster's dead children are
/// reparented to PID 1, which may never reap them).
fn alive(pid: i32) -> bool {
    stat_fields(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// State and parent pid from /proc/PID/stat (after the command, which may hold spaces or
/// parentheses, so after its last ')').
fn stat_fields(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}
