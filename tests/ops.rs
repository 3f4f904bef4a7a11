//! Running as a service: sd_notify (READY after the port answers, WATCHDOG, STOPPING) and
//! Prometheus metrics that move when files are uploaded and served.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn sd_notify_ready_after_port_answers_watchdog_and_stopping() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let sock_path = t.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut env = Env::for_s3(&s3);
    env.set("NOTIFY_SOCKET", &sock_path.to_string_lossy());
    env.set("WATCHDOG_USEC", "400000");
    // systemd names the watched PID; `exec` keeps the shell's PID for ferry.
    env.set("FERRY_BIN", env!("CARGO_BIN_EXE_ferry"));
    let mut d = env.spawn_with("sh", &["-c", "WATCHDOG_PID=$$ exec \"$FERRY_BIN\" run"]);

    let mut buf = [0u8; 512];
    let mut got = Vec::<String>::new();
    let start = Instant::now();
    let mut ready_at = None;
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.contains("READY=1") && ready_at.is_none() {
                // The port must already answer when systemd hears READY.
                let addr = d.addr();
                assert!(
                    std::net::TcpStream::connect(addr).is_ok(),
                    "READY=1 before the port answers"
                );
                ready_at = Some(Instant::now());
            }
            got.push(msg);
        }
        if let Some(at) = ready_at {
            if at.elapsed() > Duration::from_millis(1200) {
                break;
            }
        }
    }
    assert!(ready_at.is_some(), "no READY=1: {got:?}\n{}", d.log());
    let watchdogs = got.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(watchdogs >= 2, "watchdog pings at half of 400ms: {got:?}");

    unsafe {
        libc::kill(d.child.id() as i32, libc::SIGTERM);
    }
    let mut stopping = false;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) && !stopping {
        if let Ok(n) = sock.recv(&mut buf) {
            stopping = String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
        }
    }
    assert!(stopping, "STOPPING=1 on SIGTERM");
    assert_eq!(d.terminate(), Some(0));
}

/// Parses Prometheus/OpenMetrics text: every sample line is `name{labels} value`.
fn samples(text: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let bare = name.split('{').next().unwrap();
        assert!(
            bare.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name {line:?}"
        );
        if name.contains('{') {
            assert!(name.ends_with('}'), "bad labels {line:?}");
        }
        out.push((name.to_string(), v));
    }
    out
}

fn value(s: &[(String, f64)], name: &str) -> f64 {
    s.iter().filter(|(n, _)| n == name).map(|(_, v)| *v).sum()
}

#[test]
fn metrics_parse_and_move_with_uploads_and_requests() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = Env::for_s3(&s3);
    let d = env.spawn(&["run"]);
    let addr = d.addr();
    let m0 = raw_request(addr, "GET", b"/metrics", &[]);
    assert_eq!(m0.status, 200);
    let text = String::from_utf8(m0.body).unwrap();
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    let before = samples(&text);
    assert_eq!(value(&before, "ferry_uploads_total"), 0.0);

    env.drop_file("m.jpg", &vec![1u8; 12345]);
    wait_for(Duration::from_secs(30), "archived", || {
        env.count("archived") == 1
    });
    let r = raw_request(addr, "GET", b"/static/m.jpg", &[]);
    assert_eq!(r.status, 302);
    raw_request(addr, "GET", b"/static/none.jpg", &[]);

    let text = String::from_utf8(raw_request(addr, "GET", b"/metrics", &[]).body).unwrap();
    let after = samples(&text);
    assert_eq!(value(&after, "ferry_uploads_total"), 1.0, "{text}");
    assert_eq!(value(&after, "ferry_upload_bytes_total"), 12345.0);
    assert_eq!(
        value(&after, r#"ferry_files{state="archived"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(
            &after,
            r#"ferry_http_requests_total{source="redirect",status="302"}"#
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(
            &after,
            r#"ferry_http_requests_total{source="none",status="404"}"#
        ),
        1.0
    );
    assert!(value(&after, "ferry_upload_seconds_count") >= 1.0);
    assert!(value(&after, "ferry_http_request_seconds_count") >= 2.0);
    // `ferry run` watches its spool with inotify (1), not the polling fallback (0), and
    // `ferry status` says so.
    assert_eq!(value(&after, "ferry_spool_watched"), 1.0, "{text}");
    assert_eq!(env.status()["spool_watch"]["mode"], "inotify");
    let (_, out, _) = env.run(&["status"]);
    assert!(out.contains("spool watch: inotify (since "), "{out}");
}

#[test]
fn status_json_carries_the_queue_numbers() {
    let t = tempfile::tempdir().unwrap();
    let mut s3 = S3::start(t.path());
    s3.down();
    let env = Env::for_s3(&s3);
    env.drop_file("q1.jpg", b"1");
    env.drop_file("q2.jpg", b"22");
    let (code, _, _) = env.run(&["sync", "--once", "--timeout", "2s"]);
    assert_eq!(code, 1, "timed out with transient errors");
    let st = env.status();
    assert_eq!(st["queue_depth"], 2);
    assert_eq!(st["queued_bytes"], 3);
    assert!(st["oldest_queued_ms"].as_i64().is_some());
}

/// The queue gauges: bytes and age of what waits, from the catalog at scrape time (kept by
/// triggers and an index, no row scan), back to 0 once everything is archived.
#[test]
fn queue_bytes_and_oldest_waiting_follow_the_queue() {
    let t = tempfile::tempdir().unwrap();
    let mut s3 = S3::start(t.path());
    s3.down();
    let env = Env::for_s3(&s3);
    let d = env.spawn(&["run"]);
    let addr = d.addr();
    env.drop_file("q1.jpg", &vec![1u8; 1000]);
    env.drop_file("q/q2.jpg", &vec![2u8; 234]);
    let scrape = || {
        let r = raw_request(addr, "GET", b"/metrics", &[]);
        assert_eq!(r.status, 200);
        let text = String::from_utf8(r.body).unwrap();
        (samples(&text), text)
    };
    wait_for(Duration::from_secs(30), "both queued", || {
        value(&scrape().0, "ferry_queue_bytes") == 1234.0
    });
    let (first, _) = scrape();
    std::thread::sleep(Duration::from_millis(1500));
    let (later, text) = scrape();
    let (a, b) = (
        value(&first, "ferry_queue_oldest_seconds"),
        value(&later, "ferry_queue_oldest_seconds"),
    );
    assert!(a > 0.0 && b >= a + 1.0 && b < 60.0, "{a} then {b}\n{text}");
    let waiting: f64 = [
        "queued",
        "uploading",
        "failed",
        "verified",
        "archive_failed",
    ]
    .iter()
    .map(|s| value(&later, &format!("ferry_files{{state=\"{s}\"}}")))
    .sum();
    assert_eq!(waiting, 2.0, "{text}");

    s3.up();
    wait_for(Duration::from_secs(60), "archived", || {
        env.count("archived") == 2
    });
    let (done, text) = scrape();
    assert_eq!(value(&done, "ferry_queue_bytes"), 0.0, "{text}");
    assert_eq!(value(&done, "ferry_queue_oldest_seconds"), 0.0, "{text}");
}

/// When the kernel refuses an inotify watch, the spool is polled: files still go up, and
/// the mode shows in `ferry status` (the daemon records it in the catalog) and in
/// `ferry_spool_watched`. The refusal is real: ferry runs in its own user namespace whose
/// inotify instance limit is 0, so inotify_init1 fails with EMFILE as it does on a host
/// whose fs.inotify.max_user_instances is used up, without touching the host's limit.
#[test]
fn polling_mode_shows_in_status_and_metrics() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = Env::for_s3(&s3);
    env.set("FERRY_BIN", env!("CARGO_BIN_EXE_ferry"));
    let d = env.spawn_with(
        "unshare",
        &[
            "--user",
            "--map-root-user",
            "sh",
            "-c",
            "echo 0 > /proc/sys/user/max_inotify_instances && exec \"$FERRY_BIN\" run",
        ],
    );
    let addr = d.addr();
    env.drop_file("p.jpg", b"polled");
    wait_for(Duration::from_secs(30), "archived by polling", || {
        env.count("archived") == 1
    });
    let text = String::from_utf8(raw_request(addr, "GET", b"/metrics", &[]).body).unwrap();
    assert_eq!(value(&samples(&text), "ferry_spool_watched"), 0.0, "{text}");
    let st = env.status();
    assert_eq!(st["spool_watch"]["mode"], "polling", "{st}");
    let detail = st["spool_watch"]["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("no inotify watch"), "{detail}");
    let (code, out, err) = env.run(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("spool watch: polling: scanning the spool every 1s"),
        "{out}"
    );
    d.wait_log("cannot watch the spool", Duration::from_secs(5));
}
