//! scripts/install.sh and scripts/uninstall.sh, staged into a temp DESTDIR with the test
//! build of `ferry` (FERRY_BIN, so nothing is rebuilt): what lands where and with which
//! modes, that a re-run changes nothing, that an edited config survives, and that uninstall
//! keeps data and config. When `systemd-analyze` is on PATH (Debian: `apt-get install
//! systemd`), the installed units must also pass `systemd-analyze verify` and score an
//! overall exposure of at most 2.0 in `systemd-analyze security --offline=yes`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

/// Highest acceptable "Overall exposure level" of `systemd-analyze security`.
const MAX_EXPOSURE: f64 = 2.0;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// Runs a repository script with DESTDIR (and the test binary as FERRY_BIN); panics with
/// its output unless it exits 0.
fn run_script(script: &str, destdir: &Path, extra_env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("scripts").join(script))
        .env("DESTDIR", destdir)
        .env("FERRY_BIN", ferry_bin())
        .env_remove("PREFIX")
        // Run from somewhere else than the repository: the scripts must find their files.
        .current_dir(destdir);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run bash");
    let text = output_text(&out);
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{text}",
        out.status
    );
    text
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn sha256_hex(p: &Path) -> String {
    hex::encode(Sha256::digest(fs::read(p).unwrap()))
}

/// Every path under `root` with its type, mode, and for files size, SHA-256 and mtime (so a
/// file rewritten with the same bytes also counts as a change).
fn listing(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let md = fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let m = md.permissions().mode() & 0o7777;
            let desc = if md.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(&path).unwrap().display())
            } else if md.is_dir() {
                walk(root, &path, out);
                format!("dir {m:04o}")
            } else {
                format!(
                    "file {m:04o} {} bytes sha256 {} mtime {}.{:09}",
                    md.len(),
                    sha256_hex(&path),
                    md.mtime(),
                    md.mtime_nsec()
                )
            };
            out.insert(rel, desc);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn assert_same_listing(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) {
    let mut diffs = Vec::new();
    for (k, v) in before {
        match after.get(k) {
            None => diffs.push(format!("- {k}: {v}")),
            Some(w) if w != v => diffs.push(format!("~ {k}: {v}  =>  {w}")),
            _ => {}
        }
    }
    for (k, w) in after {
        if !before.contains_key(k) {
            diffs.push(format!("+ {k}: {w}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "re-running install.sh changed the tree:\n{}",
        diffs.join("\n")
    );
}

fn toml_table(text: &str, what: &str) -> toml::Table {
    toml::from_str::<toml::Table>(text).unwrap_or_else(|e| panic!("{what} is not valid TOML: {e}"))
}

/// config/ferry.toml as install.sh must render it: the same keys and values, except the
/// four paths, which move under /var/lib/ferry.
fn expected_config() -> toml::Table {
    let mut t = toml_table(
        &fs::read_to_string(repo().join("config/ferry.toml")).unwrap(),
        "config/ferry.toml",
    );
    for (section, key, value) in [
        ("spool", "dir", "/var/lib/ferry/spool"),
        ("archive", "dir", "/var/lib/ferry/archive"),
        ("cache", "dir", "/var/lib/ferry/cache"),
        ("catalog", "path", "/var/lib/ferry/ferry.db"),
    ] {
        let s = t
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        s.as_table_mut()
            .unwrap()
            .insert(key.into(), toml::Value::String(value.into()));
    }
    t
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

#[test]
fn install_reinstall_edit_uninstall() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let p = |rel: &str| d.join(rel.trim_start_matches('/'));

    // --- first install
    let out = run_script("install.sh", d, &[]);
    assert!(
        out.contains("not creating user/group ferry"),
        "install.sh should say it skips the user with a DESTDIR:\n{out}"
    );
    assert!(
        out.contains("systemctl enable --now ferry.service"),
        "install.sh should print how to start the service:\n{out}"
    );

    let bin = p("/usr/local/bin/ferry");
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(sha256_hex(&bin), sha256_hex(Path::new(ferry_bin())));

    let conf = p("/etc/ferry/ferry.toml");
    assert_eq!(mode(&conf), 0o644);
    let installed = fs::read_to_string(&conf).unwrap();
    assert_eq!(
        toml_table(&installed, "the installed ferry.toml"),
        expected_config(),
        "installed ferry.toml should be config/ferry.toml with paths under /var/lib/ferry:\n{installed}"
    );

    let router_src = repo().join("config/router.toml");
    let router = p("/etc/ferry/router.toml");
    if router_src.exists() {
        assert_eq!(mode(&router), 0o644);
        assert_eq!(
            toml_table(
                &fs::read_to_string(&router).unwrap(),
                "the installed router.toml"
            ),
            toml_table(
                &fs::read_to_string(&router_src).unwrap(),
                "config/router.toml"
            ),
        );
    } else {
        assert!(!router.exists());
        assert!(
            out.contains("config/router.toml is not in this checkout"),
            "{out}"
        );
    }

    let env = p("/etc/ferry/ferry.env");
    assert_eq!(
        mode(&env),
        0o640,
        "the credentials file must not be world-readable"
    );
    assert_eq!(
        fs::read(&env).unwrap(),
        fs::read(repo().join("systemd/ferry.env.example")).unwrap()
    );

    for (unit, exec) in [
        (
            "ferry.service",
            "ExecStart=/usr/local/bin/ferry run --config /etc/ferry/ferry.toml",
        ),
        (
            "ferry-router.service",
            "ExecStart=/usr/local/bin/ferry route --config /etc/ferry/router.toml",
        ),
    ] {
        let u = p(&format!("/etc/systemd/system/{unit}"));
        assert_eq!(mode(&u), 0o644, "{unit}");
        let text = fs::read_to_string(&u).unwrap();
        assert!(text.lines().any(|l| l == exec), "{unit} lacks {exec}");
        assert_eq!(
            text,
            fs::read_to_string(repo().join("systemd").join(unit)).unwrap(),
            "with the default PREFIX, {unit} is installed unchanged"
        );
    }

    for (dir, m) in [
        ("/etc/ferry", 0o755),
        ("/var/lib/ferry", 0o750),
        ("/var/lib/ferry/spool", 0o2775),
        ("/var/lib/ferry/archive", 0o750),
        ("/var/lib/ferry/cache", 0o750),
    ] {
        assert!(p(dir).is_dir(), "{dir} missing");
        assert_eq!(mode(&p(dir)), m, "{dir}: mode {:04o}", mode(&p(dir)));
    }

    systemd_analyze(d);

    // --- second install: nothing changes, not even an mtime
    let before = listing(d);
    run_script("install.sh", d, &[]);
    assert_same_listing(&before, &listing(d));

    // --- an edited config (and credentials) survive a re-install; ours goes to .new
    let edited = format!("{installed}\n# edited by the admin\n");
    fs::write(&conf, &edited).unwrap();
    let secrets = "AWS_ACCESS_KEY_ID=AKIATEST\nAWS_SECRET_ACCESS_KEY=secret\n";
    fs::write(&env, secrets).unwrap();
    let out = run_script("install.sh", d, &[]);
    assert_eq!(fs::read_to_string(&conf).unwrap(), edited);
    assert_eq!(fs::read_to_string(&env).unwrap(), secrets);
    assert_eq!(mode(&env), 0o640);
    let new = p("/etc/ferry/ferry.toml.new");
    assert_eq!(fs::read_to_string(&new).unwrap(), installed);
    assert_eq!(mode(&new), 0o644);
    assert!(
        out.contains("ferry.toml.new"),
        "install.sh should point at the .new file:\n{out}"
    );
    // ... and with the .new file in place, a further run is again a no-op.
    let before = listing(d);
    run_script("install.sh", d, &[]);
    assert_same_listing(&before, &listing(d));

    // --- uninstall: binary and units go, data and config stay
    let out = run_script("uninstall.sh", d, &[]);
    assert!(!bin.exists(), "binary still there after uninstall");
    for unit in ["ferry.service", "ferry-router.service"] {
        assert!(
            !p(&format!("/etc/systemd/system/{unit}")).exists(),
            "{unit} still there"
        );
    }
    assert_eq!(fs::read_to_string(&conf).unwrap(), edited);
    assert_eq!(fs::read_to_string(&env).unwrap(), secrets);
    assert!(new.exists());
    for dir in [
        "/var/lib/ferry/spool",
        "/var/lib/ferry/archive",
        "/var/lib/ferry/cache",
    ] {
        assert!(p(dir).is_dir(), "uninstall removed {dir}");
    }
    assert_eq!(mode(&p("/var/lib/ferry/spool")), 0o2775);
    assert!(
        out.contains("never removed"),
        "uninstall.sh should say it keeps data and config:\n{out}"
    );
    // Uninstalling again is harmless.
    run_script("uninstall.sh", d, &[]);
}

#[test]
fn install_with_prefix_rewrites_exec_start() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    run_script("install.sh", d, &[("PREFIX", "/opt/ferry")]);
    assert_eq!(mode(&d.join("opt/ferry/bin/ferry")), 0o755);
    assert!(!d.join("usr/local/bin/ferry").exists());
    let unit = fs::read_to_string(d.join("etc/systemd/system/ferry.service")).unwrap();
    assert!(
        unit.lines()
            .any(|l| l == "ExecStart=/opt/ferry/bin/ferry run --config /etc/ferry/ferry.toml"),
        "{unit}"
    );
    let unit = fs::read_to_string(d.join("etc/systemd/system/ferry-router.service")).unwrap();
    assert!(
        unit.lines()
            .any(|l| l == "ExecStart=/opt/ferry/bin/ferry route --config /etc/ferry/router.toml"),
        "{unit}"
    );
    run_script("uninstall.sh", d, &[("PREFIX", "/opt/ferry")]);
    assert!(!d.join("opt/ferry/bin/ferry").exists());
}

/// `systemd-analyze verify` and `security` on the units as installed into `destdir`.
///
/// verify loads a unit the way the manager would, which needs (a) the ExecStart binary to
/// exist and (b) the units it depends on (sysinit.target, basic.target, ... through
/// DefaultDependencies=). So it runs with `--root` on a copy of the staged tree (which has
/// the binary at /usr/local/bin/ferry) plus a copy of the host's own system units. Unknown
/// or unparsable settings only print warnings with exit status 0, so any line that names
/// our units also fails the test.
fn systemd_analyze(destdir: &Path) {
    let Some(sa) = on_path("systemd-analyze") else {
        println!(
            "note: systemd-analyze is not installed; skipping `systemd-analyze verify` and \
             `security` on the units (Debian/Ubuntu: apt-get install systemd)"
        );
        return;
    };
    // `security --offline=` and `verify --root=` arrived in systemd 250 (Debian 12 has 252).
    let version = Command::new(&sa)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u32>().ok())
        });
    match version {
        Some(v) if v >= 250 => {}
        other => {
            println!(
                "note: systemd-analyze version {other:?} is older than 250 (no --offline/--root); \
                 skipping `systemd-analyze verify` and `security` on the units"
            );
            return;
        }
    }
    let units = ["ferry.service", "ferry-router.service"];

    let root = tempfile::tempdir().unwrap();
    let cp = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", destdir.display()))
        .arg(root.path())
        .output()
        .unwrap();
    assert!(cp.status.success(), "{}", output_text(&cp));
    let host_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|d| d.join("sysinit.target").exists())
        .expect("systemd-analyze is installed but no sysinit.target in /usr/lib/systemd/system");
    let dst = root.path().join("usr/lib/systemd");
    fs::create_dir_all(&dst).unwrap();
    let cp = Command::new("cp")
        .arg("-a")
        .arg(host_units)
        .arg(&dst)
        .output()
        .unwrap();
    assert!(cp.status.success(), "{}", output_text(&cp));

    let out = Command::new(&sa)
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .args(units)
        .env("SYSTEMD_COLORS", "0")
        .output()
        .unwrap();
    let text = output_text(&out);
    println!(
        "systemd-analyze verify --root=<staged tree> {units:?}: {}\n{text}",
        out.status
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("ferry")).collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify complained:\n{}",
        ours.join("\n")
    );

    for unit in units {
        let path = destdir.join("etc/systemd/system").join(unit);
        let out = Command::new(&sa)
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&path)
            .env("SYSTEMD_COLORS", "0")
            .output()
            .unwrap();
        let text = output_text(&out);
        assert!(
            out.status.success(),
            "systemd-analyze security {unit}:\n{text}"
        );
        // "→ Overall exposure level for ferry.service: 1.2 OK 🙂"
        let level = text
            .lines()
            .find_map(|l| l.split_once("Overall exposure level for ").map(|(_, r)| r))
            .and_then(|r| r.split_once(": ").map(|(_, r)| r))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no overall exposure level in:\n{text}"));
        println!("systemd-analyze security --offline=yes {unit}: exposure {level}");
        assert!(
            level <= MAX_EXPOSURE,
            "{unit}: exposure {level} > {MAX_EXPOSURE}:\n{text}"
        );
    }
}

/// The unit grants CAP_LEASE and nothing else, in both the bounding and the ambient set: a
/// read lease on the web application's spool files needs it (README, "The one rule"), and
/// nothing else may be granted.
#[test]
fn the_service_grants_cap_lease_and_nothing_else() {
    let unit = fs::read_to_string(repo().join("systemd/ferry.service")).unwrap();
    for setting in ["CapabilityBoundingSet=", "AmbientCapabilities="] {
        let lines: Vec<&str> = unit
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with(setting))
            .collect();
        assert_eq!(
            lines,
            vec![format!("{setting}CAP_LEASE")],
            "{setting} in ferry.service"
        );
    }
}
