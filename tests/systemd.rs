//! The README's service install run for real in a booted systemd: a Debian bookworm
//! container (debootstrap, cached as a tarball under the target dir) booted with
//! systemd-nspawn, where scripts/install.sh installs the test build of ferry next to a real
//! s3s-fs, and the unit's promises are checked from inside: READY=1, a web application's
//! drop served locally then redirected and archived, `ferry status` as the ferry user,
//! restart after SIGKILL with nothing lost, the watchdog after SIGSTOP, a draining stop,
//! the journal, `systemd-analyze security`, the sandbox seen from the service's own mount
//! namespace, and uninstall keeping the data.
//!
//! Needs root, systemd-nspawn and nsenter (and debootstrap plus a Debian mirror for the first
//! run); without them it prints why and skips, unless FERRY_TEST_SYSTEMD=require (set by
//! .ci/run), where a skip is a failure.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{content, sha256_hex, ACCESS_KEY, SECRET_KEY};

const SUITE: &str = "bookworm";
const INCLUDE: &str = "systemd,systemd-sysv,dbus,curl,ca-certificates";
/// Cold run (debootstrap included) budget for the whole test.
const BUDGET: Duration = Duration::from_secs(7 * 60);
/// From systemd/ferry.service: the watchdog check waits for these.
const WATCHDOG_SEC: u64 = 30;
const RESTART_SEC: u64 = 2;
const TIMEOUT_START_SEC: u64 = 60;
const TIMEOUT_STOP_SEC: u64 = 30;
/// Highest acceptable "Overall exposure level" of `systemd-analyze security`.
const MAX_EXPOSURE: f64 = 2.0;
/// CAP_LEASE is capability 28.
const CAP_LEASE_MASK: &str = "0000000010000000";
const PATH_IN: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const SPOOL: &str = "/var/lib/ferry/spool";
const ARCHIVE: &str = "/var/lib/ferry/archive";
/// s3s-fs keeps each object as a plain file under DATA/BUCKET/KEY.
const S3_DATA: &str = "/var/lib/s3";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ferry_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry"))
}

/// CARGO_TARGET_DIR if set, else the target dir the test binary was built into.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => ferry_bin()
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_else(|| repo().join("target")),
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn s3s_fs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("S3S_FS") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    on_path("s3s-fs")
        .or_else(|| Some(Path::new(&home).join(".cargo/bin/s3s-fs")).filter(|p| p.is_file()))
        .expect("s3s-fs is not installed: run scripts/local-s3.sh install")
}

/// Printed straight to stderr: libtest captures print!/eprint!, and a skip or the timings
/// must be seen in a passing run too.
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "systemd test: {msg}");
}

/// The machine cannot run the test: skip with the reason, or fail where it is required.
fn cannot(reason: &str) {
    if std::env::var("FERRY_TEST_SYSTEMD").as_deref() == Ok("require") {
        panic!("FERRY_TEST_SYSTEMD=require, but: {reason}");
    }
    say(&format!("SKIPPED: {reason}"));
}

fn run_host(cmd: &mut Command) -> (bool, String) {
    match cmd.output() {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, format!("{cmd:?}: {e}")),
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The Debian mirror the host's apt uses (FERRY_DEBIAN_MIRROR wins): the first non-security
/// `deb` source in /etc/apt/sources.list and sources.list.d (one-line and deb822 formats)
/// whose URI looks like a Debian archive.
fn debian_mirror() -> String {
    if let Ok(m) = std::env::var("FERRY_DEBIAN_MIRROR") {
        if !m.is_empty() {
            return m;
        }
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    let debian = |uri: &str, suite: &str| {
        uri.trim_end_matches('/').ends_with("/debian") && !suite.contains("security")
    };
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => {
                for stanza in text.split("\n\n") {
                    let field = |name: &str| {
                        stanza.lines().find_map(|l| {
                            l.strip_prefix(name)
                                .and_then(|r| r.strip_prefix(':'))
                                .map(|v| v.trim().to_string())
                        })
                    };
                    let (Some(types), Some(uris), Some(suites)) =
                        (field("Types"), field("URIs"), field("Suites"))
                    else {
                        continue;
                    };
                    if !types.split_whitespace().any(|t| t == "deb")
                        || field("Enabled").as_deref() == Some("no")
                    {
                        continue;
                    }
                    let suite = suites.split_whitespace().next().unwrap_or("");
                    if let Some(uri) = uris.split_whitespace().find(|u| debian(u, suite)) {
                        return uri.to_string();
                    }
                }
            }
            Some("list") | None => {
                for l in text.lines() {
                    let mut w = l.split_whitespace();
                    if w.next() != Some("deb") {
                        continue;
                    }
                    let mut rest: Vec<&str> = w.collect();
                    if rest.first().is_some_and(|o| o.starts_with('[')) {
                        let end = rest.iter().position(|o| o.ends_with(']')).unwrap_or(0);
                        rest.drain(..=end);
                    }
                    if let [uri, suite, ..] = rest[..] {
                        if debian(uri, suite) {
                            return uri.to_string();
                        }
                    }
                }
            }
            _ => {}
        }
    }
    "http://deb.debian.org/debian".to_string()
}

/// The container's root file system as a tarball under the target dir, made once with
/// debootstrap (a minute or two) and reused after (the key names the suite and packages).
/// Err: the machine cannot make it.
fn rootfs_tarball(work: &Path, budget: Duration) -> Result<PathBuf, String> {
    let key = &sha256_hex(format!("{SUITE} minbase {INCLUDE}").as_bytes())[..12];
    let tarball = work.join(format!("{SUITE}-minbase-{key}.tar"));
    if tarball.is_file() {
        return Ok(tarball);
    }
    if on_path("debootstrap").is_none() {
        return Err(format!(
            "no cached root file system ({}) and debootstrap is not installed \
             (Debian: apt-get install debootstrap)",
            tarball.display()
        ));
    }
    let mirror = debian_mirror();
    let build = work.join(format!("build.{}", std::process::id()));
    let _ = fs::remove_dir_all(&build);
    fs::create_dir_all(&build).expect("create the debootstrap dir");
    let root = build.join("root");
    say(&format!(
        "building the {SUITE} root file system with debootstrap from {mirror} (cached after)"
    ));
    let (ok, out) = run_host(
        Command::new("timeout")
            .arg(budget.as_secs().to_string())
            .args(["nice", "-n", "10", "debootstrap", "--variant=minbase"])
            .arg(format!("--include={INCLUDE}"))
            .arg(SUITE)
            .arg(&root)
            .arg(&mirror),
    );
    if !ok {
        let _ = fs::remove_dir_all(&build);
        return Err(format!(
            "debootstrap {SUITE} from {mirror} failed:\n{}",
            tail(&out, 30)
        ));
    }
    // Renamed into place only when complete, so a run cut short never leaves half a cache.
    let tmp = work.join(format!(
        "{SUITE}-minbase-{key}.tar.tmp.{}",
        std::process::id()
    ));
    let (ok, out) = run_host(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tmp)
            .arg("."),
    );
    assert!(ok, "tar of the root file system failed:\n{out}");
    fs::rename(&tmp, &tarball).expect("rename the tarball into place");
    let _ = fs::remove_dir_all(&build);
    Ok(tarball)
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The cgroup hierarchies this process is in that the container's systemd will use (the v2
/// one, and the named systemd one on hybrid hosts), as (mount point + own path).
fn own_cgroups() -> Vec<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mount_of = |want_v2: bool| {
        mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let hit = if want_v2 {
                f.get(2) == Some(&"cgroup2")
            } else {
                f.get(2) == Some(&"cgroup")
                    && f.get(3)
                        .is_some_and(|o| o.split(',').any(|o| o == "name=systemd"))
            };
            hit.then(|| PathBuf::from(f[1]))
        })
    };
    let mut out = Vec::new();
    for l in fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
    {
        let mut parts = l.splitn(3, ':');
        let (Some(_), Some(ctl), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let mount = match ctl {
            "" => mount_of(true),
            "name=systemd" => mount_of(false),
            _ => None,
        };
        if let Some(m) = mount {
            out.push(m.join(path.trim_start_matches('/')));
        }
    }
    out
}

/// Removes a cgroup and its children, deepest first (only empty cgroups can go).
fn remove_cgroup(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

fn cgroup_pids(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                cgroup_pids(&e.path(), out);
            }
        }
    }
}

const CGROUP_PREFIX: &str = "ferry-systemd-test.";

/// A test process killed outright (no Drop) leaves its container running in its cgroup and
/// its tree under the target dir: end those whose test process is gone.
fn reap_stale(work: &Path) {
    let mut reaped = std::collections::BTreeSet::new();
    for parent in own_cgroups() {
        let Ok(rd) = fs::read_dir(&parent) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(pid) = name
                .strip_prefix(CGROUP_PREFIX)
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            if pid_alive(pid) {
                continue;
            }
            let mut pids = Vec::new();
            cgroup_pids(&e.path(), &mut pids);
            for p in &pids {
                // SAFETY: kill(2) on PIDs listed in our own test's cgroup.
                unsafe { libc::kill(*p, libc::SIGKILL) };
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && pids.iter().any(|p| pid_alive(*p)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            remove_cgroup(&e.path());
            reaped.insert(pid);
        }
    }
    for pid in reaped {
        say(&format!("reaped a stale container of test process {pid}"));
    }
    if let Ok(rd) = fs::read_dir(work) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let pid = name
                .strip_prefix("run.")
                .or_else(|| name.strip_prefix("build."))
                .and_then(|p| p.parse::<i32>().ok());
            if pid.is_some_and(|p| !pid_alive(p)) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// One command's result inside the container.
struct Out {
    ok: bool,
    code: Option<i32>,
    stdout: Vec<u8>,
    text: String,
}

/// The booted container: stopped on drop, pass or fail (poweroff, else SIGKILL of its PID 1
/// and of nspawn); its tmpfs root goes with its mount namespace, and its cgroups and run
/// dir are removed.
struct Machine {
    run_dir: PathBuf,
    nspawn: Option<Child>,
    leader: i32,
    cgroups: Vec<PathBuf>,
}

impl Machine {
    /// A path in the running container, seen from the host.
    fn path(&self, p: &str) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.leader)).join(p.trim_start_matches('/'))
    }

    /// `sh -c SCRIPT` as root inside the container (all its namespaces), with a clean
    /// environment and a time limit.
    fn exec(&self, script: &str, stdin: Option<&[u8]>, limit: Duration) -> Out {
        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "5"])
            .arg(limit.as_secs().max(1).to_string())
            .args(["nsenter", "-t"])
            .arg(self.leader.to_string())
            .args(["-a", "--", "/usr/bin/env", "-i"])
            .arg(format!("PATH={PATH_IN}"))
            .args([
                "HOME=/root",
                "LANG=C.UTF-8",
                "SYSTEMD_COLORS=0",
                "SYSTEMD_PAGER=",
                "/bin/sh",
                "-c",
                script,
            ])
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn nsenter");
        if let Some(bytes) = stdin {
            let mut w = child.stdin.take().expect("stdin");
            // A command that fails early closes its stdin: its exit status and output say
            // why, not this EPIPE.
            let _ = w.write_all(bytes);
        }
        let o = child.wait_with_output().expect("wait for nsenter");
        Out {
            ok: o.status.success(),
            code: o.status.code(),
            text: format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            stdout: o.stdout,
        }
    }

    fn try_sh(&self, script: &str) -> Out {
        self.exec(script, None, Duration::from_secs(60))
    }

    /// Runs SCRIPT and panics with its output unless it exits 0; returns stdout.
    fn sh(&self, script: &str) -> String {
        let o = self.try_sh(script);
        assert!(
            o.ok,
            "in the container: `{script}` failed ({:?}):\n{}",
            o.code, o.text
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    fn show(&self, prop: &str) -> String {
        self.sh(&format!("systemctl show -P {prop} ferry.service"))
    }

    fn journal(&self) -> String {
        self.sh("journalctl -u ferry.service --no-pager --no-hostname -o short-precise")
    }

    /// GET http://127.0.0.1:8080PATH inside the container (its own loopback).
    fn get(&self, path: &str) -> Http {
        let o = self.exec(
            &format!("curl -sS -i --max-time 10 'http://127.0.0.1:8080{path}'"),
            None,
            Duration::from_secs(20),
        );
        assert!(o.ok, "curl {path}: {}", o.text);
        Http::parse(&o.stdout)
    }

    /// A web application's drop: user www-data (group ferry), umask 0002, written under a
    /// temporary name and renamed into place.
    fn drop_file(&self, key: &str, bytes: &[u8]) {
        let o = self.exec(
            &format!(
                "cd {SPOOL} && exec runuser -u www-data -- sh -c \
                 'umask 0002; cat > .{key}.part && mv .{key}.part {key}'"
            ),
            Some(bytes),
            Duration::from_secs(60),
        );
        assert!(o.ok, "dropping {key} as www-data: {}", o.text);
    }

    /// True once KEY is in the archive with these bytes and gone from the spool.
    fn archived(&self, key: &str, bytes: &[u8]) -> bool {
        !self.path(SPOOL).join(key).exists()
            && fs::read(self.path(ARCHIVE).join(key)).is_ok_and(|b| b == bytes)
    }

    /// The bytes s3s-fs stores for KEY in bucket `ferry`.
    fn s3_object(&self, key: &str) -> Option<Vec<u8>> {
        fs::read(self.path(S3_DATA).join("ferry").join(key)).ok()
    }

    fn main_pid(&self) -> i64 {
        self.show("MainPID").parse().expect("MainPID is a number")
    }

    /// Waits (bounded) until ferry.service is active with a main PID other than `old`.
    fn wait_restarted(&self, old: i64, limit: Duration, what: &str) -> i64 {
        let start = Instant::now();
        loop {
            let pid = self.main_pid();
            let active = self.try_sh("systemctl is-active ferry.service");
            if pid != 0 && pid != old && String::from_utf8_lossy(&active.stdout).trim() == "active"
            {
                return pid;
            }
            assert!(
                start.elapsed() < limit,
                "ferry.service was not active again within {limit:?} after {what} \
                 (MainPID {pid}, is-active {}):\n{}",
                active.text.trim(),
                tail(&self.journal(), 40)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if std::thread::panicking() && self.leader > 0 {
            let o = self.exec(
                "journalctl --no-pager --no-hostname -n 150 -u ferry.service -u s3s-fs.service; \
                 systemctl --no-pager --failed",
                None,
                Duration::from_secs(20),
            );
            eprintln!(
                "---- the container's journal (ferry, s3s-fs) ----\n{}",
                o.text
            );
        }
        if let Some(mut nspawn) = self.nspawn.take() {
            let t = Instant::now();
            if self.leader > 0 {
                let _ = self.exec("systemctl poweroff", None, Duration::from_secs(10));
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut gone = false;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = nspawn.try_wait() {
                    gone = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !gone {
                eprintln!("the container did not power off within 30 s: killing it");
                if self.leader > 0 {
                    // SAFETY: the container's PID 1, our nspawn's child; killing it ends the
                    // whole PID namespace.
                    unsafe { libc::kill(self.leader, libc::SIGKILL) };
                }
                let _ = nspawn.kill();
                let _ = nspawn.wait();
            }
            if std::thread::panicking() || t.elapsed() > Duration::from_secs(10) {
                let log = fs::read_to_string(self.run_dir.join("nspawn.log")).unwrap_or_default();
                eprintln!(
                    "poweroff took {:?}; the container's console:\n{}",
                    t.elapsed(),
                    tail(&log, 40)
                );
            }
        }
        for cg in &self.cgroups {
            let mut pids = Vec::new();
            cgroup_pids(cg, &mut pids);
            for p in &pids {
                // SAFETY: stragglers in this test's own cgroup.
                unsafe { libc::kill(*p, libc::SIGKILL) };
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && pids.iter().any(|p| pid_alive(*p)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            remove_cgroup(cg);
        }
        let _ = fs::remove_dir_all(&self.run_dir);
    }
}

/// The container's PID 1: the child of `nspawn` that is PID 1 in its own PID namespace.
fn find_leader(nspawn: u32) -> Option<i32> {
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        let child = field("PPid:").is_some_and(|p| p == nspawn.to_string());
        let init = field("NSpid:").is_some_and(|n| n.split_whitespace().last() == Some("1"));
        if child && init {
            return Some(pid);
        }
    }
    None
}

/// Printed once the root file system is unpacked, before nspawn starts.
const ROOT_READY: &str = "ferry-test: root file system ready";

const S3S_UNIT: &str = "[Unit]
Description=local S3 (s3s-fs) for the ferry container test

[Service]
ExecStartPre=/bin/mkdir -p /var/lib/s3/ferry
ExecStart=/src/bin/s3s-fs --host 127.0.0.1 --port 9000 --access-key @AK@ --secret-key @SK@ /var/lib/s3
";

/// Extracts the tarball, boots it, and waits for `is-system-running`. Err: it cannot boot.
fn boot(work: &Path, tarball: &Path, limit: Duration) -> Result<Machine, String> {
    let run_dir = work.join(format!("run.{}", std::process::id()));
    let _ = fs::remove_dir_all(&run_dir);
    let root = run_dir.join("root");
    let extra = run_dir.join("extra");
    fs::create_dir_all(&root).expect("create the container dir");
    fs::create_dir_all(extra.join("etc/systemd/system")).expect("create the extra files' dir");
    fs::write(extra.join("etc/hostname"), "ferry-test\n").expect("hostname");
    fs::write(
        extra.join("etc/systemd/system/s3s-fs.service"),
        S3S_UNIT
            .replace("@AK@", ACCESS_KEY)
            .replace("@SK@", SECRET_KEY),
    )
    .expect("s3s-fs unit");
    let mut m = Machine {
        run_dir: run_dir.clone(),
        nspawn: None,
        leader: 0,
        cgroups: Vec::new(),
    };

    // The container's systemd takes over the cgroup nspawn starts in (--keep-unit, no host
    // systemd to ask): give it one of its own, so two runs at once never share one.
    let name = format!("{CGROUP_PREFIX}{}", std::process::id());
    let mut enter = String::new();
    for parent in own_cgroups() {
        let cg = parent.join(&name);
        if fs::create_dir_all(&cg).is_ok() {
            enter.push_str(&format!("echo $$ > '{}/cgroup.procs'\n", cg.display()));
            m.cgroups.push(cg);
        }
    }
    let log = fs::File::create(run_dir.join("nspawn.log")).expect("nspawn log");
    let mut binds = Vec::new();
    for dir in ["scripts", "config", "systemd"] {
        binds.push(format!(
            "--bind-ro={}:/src/{dir}",
            repo().join(dir).display()
        ));
    }
    binds.push(format!(
        "--bind-ro={}:/src/bin/ferry",
        ferry_bin().display()
    ));
    binds.push(format!(
        "--bind-ro={}:/src/bin/s3s-fs",
        s3s_fs_bin().display()
    ));
    // The root file system lives on a tmpfs in a mount namespace of nspawn's own: unpacking
    // it costs no disk writes, and it vanishes with the container however the test ends
    // (deleting a written-back tree from a busy disk took 20 s). The host reads it through
    // /proc/LEADER/root.
    let script = format!(
        "set -e\n{enter}mount -t tmpfs -o mode=0755,size=4g ferry-test-root \"$1\"\n\
         tar -C \"$1\" -xf \"$2\"\ncp -a \"$3/.\" \"$1/\"\necho {ROOT_READY}\nshift 3\nexec \"$@\""
    );
    let nspawn = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ])
        .arg(&root)
        .arg(tarball)
        .arg(&extra)
        .args([
            "systemd-nspawn",
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--private-network",
        ])
        .arg(format!("--machine=ferry-test-{}", std::process::id()))
        .arg("-D")
        .arg(&root)
        .args(&binds)
        .arg("-b")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn unshare + systemd-nspawn");
    let nspawn_pid = nspawn.id();
    m.nspawn = Some(nspawn);
    let nspawn_log = || fs::read_to_string(run_dir.join("nspawn.log")).unwrap_or_default();

    let start = Instant::now();
    let exited = |m: &mut Machine| {
        m.nspawn
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
            .is_some()
    };
    while m.leader == 0 {
        if exited(&mut m) {
            let log = nspawn_log();
            assert!(
                log.contains(ROOT_READY),
                "unpacking the root file system onto a tmpfs failed:\n{}",
                tail(&log, 30)
            );
            return Err(format!(
                "systemd-nspawn exited before the container started:\n{}",
                tail(&log, 30)
            ));
        }
        if start.elapsed() > limit {
            return Err(format!(
                "no container PID 1 within {limit:?}:\n{}",
                tail(&nspawn_log(), 30)
            ));
        }
        if let Some(l) = find_leader(nspawn_pid) {
            m.leader = l;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Until the container's systemd answers on its bus this fails; then it waits for the
    // end of boot itself.
    loop {
        let left = limit.saturating_sub(start.elapsed());
        let o = m.exec("systemctl is-system-running --wait", None, left);
        let state = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if state == "running" || state == "degraded" {
            if state == "degraded" {
                println!(
                    "the container booted degraded:\n{}",
                    m.sh("systemctl --no-pager --failed")
                );
            }
            return Ok(m);
        }
        if exited(&mut m) || start.elapsed() > limit {
            return Err(format!(
                "the container's systemd did not finish booting within {limit:?} \
                 (is-system-running: {}):\n{}",
                o.text.trim(),
                tail(&nspawn_log(), 30)
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct Http {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Http {
    fn parse(raw: &[u8]) -> Http {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {head}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Http {
            status,
            headers,
            body: raw[split + 4..].to_vec(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Polls `f` every 250 ms until true; panics with `what` after `limit`.
fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Sets `key = value` (value as TOML text) in `[section]` of a config, which must have the
/// key there exactly once: the admin's edit of /etc/ferry/ferry.toml.
fn set_key(text: &str, section: &str, key: &str, value: &str) -> String {
    let mut current = String::new();
    let mut hits = 0;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            let t = l.trim();
            if t.starts_with('[') {
                current = t.trim_matches(|c| c == '[' || c == ']').to_string();
            } else if current == section && t.split_once('=').is_some_and(|(k, _)| k.trim() == key)
            {
                hits += 1;
                return format!("{key} = {value}");
            }
            l.to_string()
        })
        .collect();
    assert_eq!(hits, 1, "[{section}] {key} in the installed ferry.toml");
    out.join("\n") + "\n"
}

fn exposure(text: &str) -> f64 {
    // "→ Overall exposure level for ferry.service: 1.3 OK :-)"
    text.lines()
        .find_map(|l| l.split_once("Overall exposure level for ").map(|(_, r)| r))
        .and_then(|r| r.split_once(": ").map(|(_, r)| r))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{text}"))
}

#[test]
fn service_in_a_booted_systemd() {
    let t0 = Instant::now();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        cannot("not root: booting a container needs root (run cargo test as root)");
        return;
    }
    for tool in ["systemd-nspawn", "nsenter", "unshare", "tar", "timeout"] {
        if on_path(tool).is_none() {
            cannot(&format!(
                "{tool} is not installed (Debian: apt-get install systemd-container util-linux)"
            ));
            return;
        }
    }
    let work = target_dir().join("ferry-systemd");
    fs::create_dir_all(&work).expect("create the test's dir under the target dir");
    reap_stale(&work);

    let tarball = match rootfs_tarball(&work, BUDGET) {
        Ok(t) => t,
        Err(reason) => {
            cannot(&reason);
            return;
        }
    };
    let t_rootfs = t0.elapsed();
    let m = match boot(&work, &tarball, Duration::from_secs(120)) {
        Ok(m) => m,
        Err(reason) => {
            cannot(&format!(
                "systemd-nspawn cannot boot a container here: {reason}"
            ));
            return;
        }
    };
    let t_boot = t0.elapsed();
    println!("booted after {t_boot:?} (root file system ready after {t_rootfs:?})");

    // Both binaries come from the host: they must find their libraries in the container.
    for bin in ["/src/bin/ferry", "/src/bin/s3s-fs"] {
        let ldd = m.sh(&format!("ldd {bin} 2>&1 || true"));
        assert!(!ldd.contains("not found"), "{bin} in the container:\n{ldd}");
    }
    m.sh("systemctl start s3s-fs.service");
    wait_for(Duration::from_secs(30), "s3s-fs on 127.0.0.1:9000", || {
        m.try_sh("curl -s -o /dev/null --max-time 2 http://127.0.0.1:9000/")
            .ok
    });

    // --- README step 1: install (it enables and starts the service, not yet configured).
    let out = m.sh("FERRY_BIN=/src/bin/ferry /src/scripts/install.sh 2>&1");
    assert!(
        out.contains("ferry.service is enabled and started"),
        "install.sh in a booted systemd:\n{out}"
    );
    assert_eq!(m.sh("systemctl is-enabled ferry.service"), "enabled");

    // --- step 2: S3 in /etc/ferry, checked with a write probe as the ferry user.
    let conf_path = m.path("/etc/ferry/ferry.toml");
    let mut conf = fs::read_to_string(&conf_path).expect("installed ferry.toml");
    conf = set_key(&conf, "s3", "endpoint", "\"http://127.0.0.1:9000\"");
    conf = set_key(&conf, "s3", "path_style", "true");
    conf = set_key(&conf, "s3", "bucket", "\"ferry\"");
    conf = set_key(&conf, "http", "node_name", "\"ferry-test\"");
    fs::write(&conf_path, conf).expect("write ferry.toml");
    let env_path = m.path("/etc/ferry/ferry.env");
    let mut env = fs::read_to_string(&env_path).expect("installed ferry.env");
    // No instance-metadata lookups: explicit keys only.
    env.push_str(&format!(
        "AWS_ACCESS_KEY_ID={ACCESS_KEY}\nAWS_SECRET_ACCESS_KEY={SECRET_KEY}\nAWS_EC2_METADATA_DISABLED=true\n"
    ));
    fs::write(&env_path, env).expect("write ferry.env");
    assert_eq!(
        m.sh("stat -c '%a %U:%G' /etc/ferry/ferry.env"),
        "640 root:ferry"
    );
    let probe = m.sh("set -a; . /etc/ferry/ferry.env; exec runuser -u ferry -- \
         /usr/local/bin/ferry --config /etc/ferry/ferry.toml check-config --write-probe 2>&1");
    println!("check-config --write-probe:\n{probe}");

    // --- step 3: the web application's user joins group ferry.
    m.sh("usermod -aG ferry www-data");

    // --- step 4: restart. For Type=notify, `systemctl restart` returns once READY=1 came,
    // so the port must answer at once.
    let t = Instant::now();
    m.sh("systemctl restart ferry.service");
    println!("systemctl restart ferry.service took {:?}", t.elapsed());
    assert_eq!(m.sh("systemctl is-active ferry.service"), "active");
    assert_eq!(
        m.get("/healthz").status,
        200,
        "/healthz right after READY=1"
    );
    wait_for(Duration::from_secs(20), "/readyz 200", || {
        m.get("/readyz").status == 200
    });
    let pid = m.main_pid();
    let caps = m.sh(&format!("grep ^Cap /proc/{pid}/status"));
    for set in ["CapEff", "CapAmb", "CapBnd"] {
        assert!(
            caps.lines()
                .any(|l| l.starts_with(set) && l.ends_with(CAP_LEASE_MASK)),
            "ferry's {set} should be CAP_LEASE alone:\n{caps}"
        );
    }

    // --- a drop: local while S3 is away, then uploaded, redirected and archived.
    m.sh("systemctl stop s3s-fs.service");
    let photo = content("photo.jpg", 300_000);
    m.drop_file("photo.jpg", &photo);
    assert_eq!(
        m.sh(&format!("stat -c '%U:%G %a' {SPOOL}/photo.jpg")),
        "www-data:ferry 664",
        "the spool's setgid and the writer's umask"
    );
    let r = m.get("/static/photo.jpg");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ferry-source"), Some("local"));
    assert!(r.body == photo, "the local answer's body is not the file");
    m.sh("systemctl start s3s-fs.service");
    wait_for(Duration::from_secs(60), "photo.jpg archived", || {
        m.archived("photo.jpg", &photo)
    });
    assert!(m.s3_object("photo.jpg").is_some_and(|b| b == photo));
    let r = m.get("/static/photo.jpg");
    assert_eq!(r.status, 302, "after archiving");
    assert_eq!(r.header("x-ferry-source"), Some("redirect"));
    assert_eq!(
        r.header("location"),
        Some("http://127.0.0.1:9000/ferry/photo.jpg")
    );
    // www-data owns the file: a read lease on it needs CAP_LEASE, which the unit grants.
    let metrics = String::from_utf8_lossy(&m.get("/metrics").body).to_string();
    assert!(
        metrics
            .lines()
            .any(|l| l == "ferry_lease_fallbacks_total 0"),
        "ferry could not lease www-data's file:\n{metrics}"
    );

    // --- ferry status as the ferry user.
    let st: serde_json::Value = serde_json::from_str(&m.sh(
        "runuser -u ferry -- /usr/local/bin/ferry --config /etc/ferry/ferry.toml status --json",
    ))
    .expect("status --json is JSON");
    assert_eq!(st["counts"]["archived"], 1, "{st}");
    assert_eq!(st["queue_depth"], 0, "{st}");
    assert!(
        st["notices"].as_array().is_some_and(|n| n.is_empty()),
        "{st}"
    );
    let text =
        m.sh("runuser -u ferry -- /usr/local/bin/ferry --config /etc/ferry/ferry.toml status");
    assert!(text.contains("archived"), "{text}");

    // --- SIGKILL: systemd restarts it, and every file dropped around the kill arrives.
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for i in 0..20 {
        files.insert(format!("k{i:02}.bin"), content(&format!("k{i}"), 64 * 1024));
    }
    files.insert("kbig.bin".into(), content("kbig", 24 << 20));
    let old = m.main_pid();
    for (k, v) in &files {
        m.drop_file(k, v);
    }
    m.sh("systemctl kill -s KILL ferry.service");
    let t = Instant::now();
    let new = m.wait_restarted(
        old,
        Duration::from_secs(RESTART_SEC + TIMEOUT_START_SEC + 20),
        "SIGKILL",
    );
    println!(
        "restarted after SIGKILL in {:?} (pid {old} -> {new})",
        t.elapsed()
    );
    let j = m.journal();
    assert!(
        j.contains("Main process exited, code=killed, status=9/KILL"),
        "{}",
        tail(&j, 30)
    );
    assert_eq!(m.show("NRestarts"), "1");
    wait_for(
        Duration::from_secs(90),
        "every file archived after SIGKILL",
        || files.iter().all(|(k, v)| m.archived(k, v)),
    );
    for (k, v) in &files {
        assert!(m.s3_object(k).is_some_and(|b| &b == v), "{k} in S3");
    }

    // --- SIGSTOP: no watchdog ping, so systemd kills and restarts it.
    let old = m.main_pid();
    m.sh("systemctl kill -s STOP --kill-whom=main ferry.service");
    let stopped = content("while-stopped.txt", 10_000);
    m.drop_file("while-stopped.txt", &stopped);
    let t = Instant::now();
    let new = m.wait_restarted(
        old,
        Duration::from_secs(WATCHDOG_SEC + RESTART_SEC + TIMEOUT_START_SEC + 30),
        "SIGSTOP",
    );
    let t_watchdog = t.elapsed();
    println!("restarted by the watchdog {t_watchdog:?} after SIGSTOP (pid {old} -> {new})");
    let j = m.journal();
    assert!(
        j.contains("ferry.service: Watchdog timeout")
            && j.contains("Failed with result 'watchdog'"),
        "not the watchdog:\n{}",
        tail(&j, 30)
    );
    assert_eq!(m.show("NRestarts"), "2");
    wait_for(
        Duration::from_secs(60),
        "the file dropped while ferry was stopped",
        || m.archived("while-stopped.txt", &stopped),
    );

    // --- the journal carries ferry's log.
    let j = m.journal();
    assert!(
        j.lines()
            .any(|l| l.contains("uploaded and verified") && l.contains("key=photo.jpg")),
        "no `uploaded and verified` line for photo.jpg in journalctl -u ferry:\n{}",
        tail(&j, 30)
    );

    // --- systemd-analyze security, in the booted system (not --offline).
    let sec = m.sh("systemd-analyze security --no-pager ferry.service 2>&1");
    let level = exposure(&sec);
    println!("systemd-analyze security ferry.service (booted): {level}");
    assert!(
        level <= MAX_EXPOSURE,
        "exposure {level} > {MAX_EXPOSURE}:\n{sec}"
    );

    // --- the sandbox, from inside the running service's own mount namespace as user
    // ferry. /srv/probe belongs to ferry, so only the sandbox can refuse it (checked outside
    // the namespace first); the other paths are outside ReadWritePaths=.
    m.sh("mkdir -p /srv/probe && chown ferry:ferry /srv/probe && \
          setpriv --reuid=ferry --regid=ferry --init-groups -- touch /srv/probe/outside-the-sandbox && \
          rm /srv/probe/outside-the-sandbox");
    let report = m.sh(
        "pid=$(systemctl show -P MainPID ferry.service) && \
         exec nsenter -t \"$pid\" -m -- setpriv --reuid=ferry --regid=ferry --init-groups -- sh -c '
           echo \"id $(id -un)\"
           for p in /srv/probe /etc/ferry /usr/local/bin /var/lib /var/lib/s3/ferry /var/log /root /home; do
             if err=$(touch \"$p/.sandbox-probe\" 2>&1); then echo \"WROTE $p\"; rm -f \"$p/.sandbox-probe\";
             else echo \"DENIED $p: $err\"; fi
           done
           for p in /var/lib/ferry /var/lib/ferry/spool /var/lib/ferry/archive /var/lib/ferry/cache /tmp; do
             if err=$(touch \"$p/.sandbox-probe\" 2>&1); then echo \"WROTE $p\"; rm -f \"$p/.sandbox-probe\";
             else echo \"DENIED $p: $err\"; fi
           done
           touch /tmp/.private-tmp-probe'",
    );
    println!("sandbox probe:\n{report}");
    assert!(report.lines().any(|l| l == "id ferry"), "{report}");
    for p in [
        "/srv/probe",
        "/etc/ferry",
        "/usr/local/bin",
        "/var/lib",
        "/var/lib/s3/ferry",
        "/var/log",
        "/root",
        "/home",
    ] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with(&format!("DENIED {p}:"))),
            "ferry could write {p} from inside its sandbox:\n{report}"
        );
    }
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("DENIED /srv/probe:") && l.contains("Read-only file system")),
        "/srv/probe should be refused by the read-only sandbox:\n{report}"
    );
    for p in [
        "/var/lib/ferry",
        "/var/lib/ferry/spool",
        "/var/lib/ferry/archive",
        "/var/lib/ferry/cache",
        "/tmp",
    ] {
        assert!(
            report.lines().any(|l| l == format!("WROTE {p}")),
            "ferry cannot write its own {p}:\n{report}"
        );
    }
    // PrivateTmp=: the service's /tmp is its own directory under the system's /tmp.
    assert!(!m.path("/tmp/.private-tmp-probe").exists());
    let private = m.sh("ls -d /tmp/systemd-private-*-ferry.service-*/tmp/.private-tmp-probe");
    assert_eq!(private.lines().count(), 1, "{private}");
    m.sh("rm -rf /srv/probe");

    // --- catalog, bucket and archive agree (a real S3 read, as the ferry user).
    let verify = m.sh("set -a; . /etc/ferry/ferry.env; exec runuser -u ferry -- \
         /usr/local/bin/ferry --config /etc/ferry/ferry.toml verify 2>&1");
    println!("ferry verify:\n{verify}");

    // --- systemctl stop drains: SIGTERM, exit 0, and every file dropped just before is
    // either archived (and in S3) or still whole in the spool.
    let mut late: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for i in 0..8 {
        late.insert(
            format!("late{i}.bin"),
            content(&format!("late{i}"), 200_000),
        );
    }
    late.insert("latebig.bin".into(), content("latebig", 32 << 20));
    let pid = m.main_pid();
    for (k, v) in &late {
        m.drop_file(k, v);
    }
    let t = Instant::now();
    m.sh("systemctl stop ferry.service");
    let t_stop = t.elapsed();
    println!("systemctl stop took {t_stop:?}");
    assert!(t_stop < Duration::from_secs(TIMEOUT_STOP_SEC));
    assert_eq!(m.show("Result"), "success");
    assert_eq!(m.show("ExecMainCode"), "1", "CLD_EXITED");
    assert_eq!(m.show("ExecMainStatus"), "0");
    // ferry's own lines and systemd's reach the journal by different routes, so
    // "Stopping ferry.service" may be logged after ferry's SIGTERM line: order by ferry's.
    let j = m.journal();
    let lines: Vec<&str> = j.lines().collect();
    let sigterm = lines
        .iter()
        .rposition(|l| {
            l.contains(&format!("ferry[{pid}]: ")) && l.contains("SIGTERM: shutting down")
        })
        .unwrap_or_else(|| panic!("no SIGTERM line from ferry[{pid}]:\n{}", tail(&j, 30)));
    let since_stop = lines[sigterm..].join("\n");
    assert!(
        lines[sigterm..]
            .iter()
            .any(|l| l.contains("ferry.service: Deactivated successfully")),
        "no clean deactivation after ferry's SIGTERM line:\n{since_stop}"
    );
    assert!(
        !since_stop.contains("SIGKILL") && !since_stop.contains("timed out"),
        "{since_stop}"
    );
    println!("the stop, in the journal:\n{since_stop}");
    for (k, v) in &late {
        let whole_in_spool = fs::read(m.path(SPOOL).join(k)).is_ok_and(|b| &b == v);
        let archived = m.archived(k, v) && m.s3_object(k).is_some_and(|b| &b == v);
        assert!(
            whole_in_spool || archived,
            "{k} after the stop: neither whole in the spool nor archived with S3's copy"
        );
    }

    // --- uninstall: the binary and units go; data, config and the user stay.
    let out = m.sh("/src/scripts/uninstall.sh 2>&1");
    println!("uninstall.sh:\n{out}");
    assert!(!m.path("/usr/local/bin/ferry").exists());
    assert!(!m.path("/etc/systemd/system/ferry.service").exists());
    assert!(!m
        .path("/etc/systemd/system/multi-user.target.wants/ferry.service")
        .exists());
    assert!(!m.try_sh("systemctl is-active --quiet ferry.service").ok);
    for p in [
        "/var/lib/ferry/spool",
        "/var/lib/ferry/archive",
        "/var/lib/ferry/cache",
        "/var/lib/ferry/ferry.db",
        "/etc/ferry/ferry.toml",
        "/etc/ferry/ferry.env",
    ] {
        assert!(m.path(p).exists(), "uninstall.sh removed {p}");
    }
    assert!(
        m.archived("photo.jpg", &photo),
        "the archive copy after uninstall"
    );
    m.sh("getent passwd ferry");

    let total = t0.elapsed();
    drop(m);
    say(&format!(
        "passed in {:.1} s (root file system {:.1} s, boot {:.1} s, watchdog restart {:.1} s, \
         poweroff and clean-up {:.1} s)",
        t0.elapsed().as_secs_f64(),
        t_rootfs.as_secs_f64(),
        (t_boot - t_rootfs).as_secs_f64(),
        t_watchdog.as_secs_f64(),
        (t0.elapsed() - total).as_secs_f64(),
    ));
    assert!(
        t0.elapsed() < BUDGET,
        "the container test took {:?}, over its {BUDGET:?} budget",
        t0.elapsed()
    );
}
