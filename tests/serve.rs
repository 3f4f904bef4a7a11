//! HTTP front end to end: real HTTP requests to `ferry run`/`ferry serve` on port 0, real
//! files, the real local S3 server.

mod common;

use std::time::Duration;

use common::*;

fn get(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> RawResponse {
    raw_request(addr, "GET", path.as_bytes(), headers)
}

/// Fetches an absolute http:// URL (a Location) with a plain GET.
fn fetch(url: &str) -> (u16, Vec<u8>) {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr: std::net::SocketAddr = hostport.parse().expect("loopback address");
    let r = raw_request(addr, "GET", path.as_bytes(), &[("Host", hostport)]);
    (r.status, r.body)
}

#[test]
fn local_then_presigned_redirect_returns_the_same_bytes() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = Env::for_s3(&s3);
    env.set("FERRY_HTTP_PRESIGN", "true");
    // Long settle: the first GET must find the file still in the spool.
    env.set("FERRY_SPOOL_SETTLE", "2s");
    let d = env.spawn(&["run"]);
    let addr = d.addr();
    let bytes: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 256) as u8).collect();
    env.drop_file("2026/11/cat pic.jpg", &bytes);

    let r = get(addr, "/static/2026/11/cat%20pic.jpg", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, bytes);
    assert_eq!(r.header("x-ferry-source"), Some("local"));
    assert_eq!(r.header("x-ferry-node"), Some("test-node"));
    assert_eq!(r.header("content-type"), Some("image/jpeg"));

    wait_for(Duration::from_secs(30), "archived", || {
        env.count("archived") == 1
    });
    let r = get(addr, "/static/2026/11/cat%20pic.jpg", &[]);
    assert_eq!(r.status, 302, "{}", String::from_utf8_lossy(&r.raw_head));
    assert_eq!(r.header("x-ferry-source"), Some("redirect"));
    let loc = r.header("location").unwrap().to_string();
    assert!(loc.starts_with(&s3.endpoint()), "{loc}");
    assert!(loc.contains("X-Amz-Signature="), "{loc}");
    let (status, body) = fetch(&loc);
    assert_eq!(status, 200);
    assert_eq!(body, bytes);
    // The signed URL is reused rather than signed per request.
    let again = get(addr, "/static/2026/11/cat%20pic.jpg", &[]);
    assert_eq!(again.header("location"), Some(loc.as_str()));
}

#[test]
fn plain_redirect_location_is_base_plus_encoded_prefix_and_key() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = Env::for_s3(&s3);
    env.set("FERRY_S3_PREFIX", "photos/");
    env.set("FERRY_HTTP_REDIRECT_BASE", "https://cdn.example.com/");
    env.drop_file("a b/ü#?.jpg", b"x");
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    let d = env.spawn(&["serve"]);
    let r = get(d.addr(), "/static/a%20b/%C3%BC%23%3F.jpg?ignored=1", &[]);
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location"),
        Some("https://cdn.example.com/photos/a%20b/%C3%BC%23%3F.jpg")
    );
    // Unknown key: 404, with the node header and no source.
    let r = get(d.addr(), "/static/nope.jpg", &[]);
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-ferry-node"), Some("test-node"));
    assert_eq!(r.header("x-ferry-source"), None);
}

#[test]
fn ranges_conditionals_and_head_over_http() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = Env::for_s3(&s3);
    // Keep the file local for the whole test.
    env.set("FERRY_SPOOL_SETTLE", "1h");
    let d = env.spawn(&["serve"]);
    let addr = d.addr();
    let bytes: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    env.drop_file("r.bin", &bytes);
    // Ready, as the watcher of a `ferry sync` beside this `serve` would record it: a file
    // still being written gets a weak ETag, which If-Range (below) rightly refuses.
    record_ready(&env, "r.bin", None);
    let p = "/static/r.bin";

    let r = get(addr, p, &[("Range", "bytes=0-9")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &bytes[..10]);
    assert_eq!(r.header("content-range"), Some("bytes 0-9/1000"));

    let r = get(addr, p, &[("Range", "bytes=-100")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &bytes[900..]);

    let r = get(addr, p, &[("Range", "bytes=990-")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &bytes[990..]);

    let r = get(addr, p, &[("Range", "bytes=5000-6000")]);
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */1000"));

    let r = get(addr, p, &[("Range", "bytes=0-1,10-11")]);
    assert_eq!(r.status, 206);
    let ct = r.header("content-type").unwrap();
    assert!(ct.starts_with("multipart/byteranges; boundary="), "{ct}");
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("Content-Range: bytes 0-1/1000"));
    assert!(body.contains("Content-Range: bytes 10-11/1000"));

    let full = get(addr, p, &[]);
    let etag = full.header("etag").unwrap().to_string();
    let lm = full.header("last-modified").unwrap().to_string();
    assert_eq!(full.header("accept-ranges"), Some("bytes"));
    assert!(full.header("cache-control").is_some());
    let r = get(addr, p, &[("If-None-Match", &etag)]);
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    let r = get(addr, p, &[("If-Modified-Since", &lm)]);
    assert_eq!(r.status, 304);
    let r = get(
        addr,
        p,
        &[("If-Range", "\"other\""), ("Range", "bytes=0-9")],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 1000);
    let r = get(addr, p, &[("If-Range", &etag), ("Range", "bytes=0-9")]);
    assert_eq!(r.status, 206);

    let h = raw_request(addr, "HEAD", p.as_bytes(), &[]);
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-length"), Some("1000"));
    assert!(h.body.is_empty());

    let r = raw_request(addr, "POST", p.as_bytes(), &[]);
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = raw_request(addr, "DELETE", p.as_bytes(), &[]);
    assert_eq!(r.status, 405);

    assert_eq!(get(addr, "/healthz", &[]).status, 200);
    assert_eq!(get(addr, "/readyz", &[]).status, 200);
}

#[test]
fn hostile_urls_never_escape_never_split_headers_never_500() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = Env::for_s3(&s3);
    env.set("FERRY_SPOOL_SETTLE", "1h");
    env.set("FERRY_HTTP_REDIRECT_BASE", "https://cdn.example.com/");
    // Something worth stealing just outside the spool.
    std::fs::write(env.dir.path().join("secret.txt"), b"TOP SECRET").unwrap();
    std::fs::write(env.dir.path().join("ferry.toml"), b"TOP SECRET").unwrap();
    let d = env.spawn(&["serve"]);
    let addr = d.addr();
    let long = format!("/static/{}", "a".repeat(1100));
    let targets: Vec<Vec<u8>> = vec![
        b"/static/../secret.txt".to_vec(),
        b"/static/%2e%2e/secret.txt".to_vec(),
        b"/static/..%2fsecret.txt".to_vec(),
        b"/static/%252e%252e/secret.txt".to_vec(),
        b"/static/..\\secret.txt".to_vec(),
        b"/static/%5c..%5csecret.txt".to_vec(),
        b"/static//evil.example".to_vec(),
        b"//evil.example/static/x".to_vec(),
        b"/static/a%00b".to_vec(),
        b"/static/a%0d%0aSet-Cookie:%20x=1".to_vec(),
        b"/static/%0d%0aLocation:%20http://evil".to_vec(),
        long.into_bytes(),
        b"/static/%ff%fe".to_vec(),
        b"/static/\xff\xfe".to_vec(),
        b"/static/./secret.txt".to_vec(),
        b"/static/a/../../secret.txt".to_vec(),
        b"/static/.ferry-versions/x".to_vec(),
        b"/static/".to_vec(),
        b"/static".to_vec(),
        b"/secret.txt".to_vec(),
        b"/static/%2fetc%2fpasswd".to_vec(),
        b"/static/%".to_vec(),
    ];
    for target in &targets {
        let r = raw_request(addr, "GET", target, &[]);
        let shown = String::from_utf8_lossy(target);
        assert!(r.status != 500 && r.status != 0, "{shown}: {}", r.status);
        assert!(r.status >= 400, "{shown} was served: {}", r.status);
        assert!(
            !r.body.windows(10).any(|w| w == b"TOP SECRET"),
            "{shown} read outside the spool"
        );
        let head = String::from_utf8_lossy(&r.raw_head).to_ascii_lowercase();
        assert!(!head.contains("set-cookie"), "{shown}: header injected");
        assert_eq!(head.matches("location:").count(), 0, "{shown}: {head}");
    }
}

#[test]
fn symlink_to_outside_is_not_served() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = Env::for_s3(&s3);
    env.set("FERRY_SPOOL_SETTLE", "1h");
    let outside = t.path().join("outside.txt");
    std::fs::write(&outside, b"TOP SECRET").unwrap();
    std::os::unix::fs::symlink(&outside, env.spool().join("link.jpg")).unwrap();
    std::fs::create_dir_all(t.path().join("outdir")).unwrap();
    std::fs::write(t.path().join("outdir/x.jpg"), b"TOP SECRET").unwrap();
    std::os::unix::fs::symlink(t.path().join("outdir"), env.spool().join("dirlink")).unwrap();
    let d = env.spawn(&["serve"]);
    for p in ["/static/link.jpg", "/static/dirlink/x.jpg"] {
        let r = get(d.addr(), p, &[]);
        assert_eq!(r.status, 404, "{p}");
        assert!(!r.body.windows(10).any(|w| w == b"TOP SECRET"));
    }
}

#[test]
fn allow_regex_refuses_other_keys_with_404() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = Env::for_s3(&s3);
    env.set("FERRY_SPOOL_SETTLE", "1h");
    env.set("FERRY_HTTP_ALLOW", r"^[^/]+\.jpg$");
    env.drop_file("ok.jpg", b"1");
    env.drop_file("no.txt", b"2");
    let d = env.spawn(&["serve"]);
    assert_eq!(get(d.addr(), "/static/ok.jpg", &[]).status, 200);
    assert_eq!(get(d.addr(), "/static/no.txt", &[]).status, 404);
}

#[test]
fn a_client_that_never_finishes_its_headers_is_cut_off() {
    use std::io::{Read, Write};
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = Env::for_s3(&s3);
    env.set("FERRY_HTTP_HEADER_READ_TIMEOUT", "1s");
    let d = env.spawn(&["serve"]);
    let mut slow = std::net::TcpStream::connect(d.addr()).unwrap();
    slow.write_all(b"GET /static/x HTTP/1.1\r\nHost: a\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let start = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "closed by the server"
    );
    // Others are served meanwhile.
    assert_eq!(get(d.addr(), "/healthz", &[]).status, 200);

    // A client that connects and never sends a byte is cut off on the same deadline.
    let mut silent = std::net::TcpStream::connect(d.addr()).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let start = std::time::Instant::now();
    let mut buf = Vec::new();
    let n = silent.read_to_end(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "nothing is sent to a client that asked nothing");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "a silent connection is closed by the server"
    );
}

/// Records `key`'s spool file in the catalog as the watcher does for a ready file (queued,
/// with its current stat), and with `sha256` as the uploader does once it verified it.
fn record_ready(env: &Env, key: &str, sha256: Option<&str>) {
    use ferry::catalog::{ops, Catalog, FileStat};
    let md = std::fs::metadata(env.spool().join(key)).unwrap();
    let stat = FileStat::of(&md);
    let k = ferry::key::Key::new(key, "").unwrap();
    let sha = sha256.map(str::to_string);
    rt().block_on(async move {
        let cat = Catalog::open(&env.dir.path().join("ferry.db")).unwrap();
        cat.write(move |c| {
            ops::note_ready(c, &k, stat)?;
            if let Some(sha) = sha {
                let rows = ops::claim_due(c, i64::MAX, 1, &Default::default())?;
                let row = rows.into_iter().find(|r| r.key == k.as_str()).expect("due");
                assert!(ops::mark_verified(
                    c,
                    k.as_str(),
                    row.gen,
                    stat,
                    &sha,
                    None
                )?);
            }
            Ok(())
        })
        .await
        .unwrap();
    });
}

fn env_serving_spool(s3: &S3) -> Env {
    let mut env = Env::for_s3(s3);
    // Nothing settles during the test: readiness comes only from what the test records.
    env.set("FERRY_SPOOL_SETTLE", "1h");
    env
}

#[test]
fn ignored_names_are_not_served() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = env_serving_spool(&s3);
    env.drop_file("upload.jpg.part", b"half an image");
    env.drop_file("photo.jpg.tmp", b"half a photo");
    env.drop_file("dl.bin.crdownload", b"half a download");
    env.drop_file("a/.hidden.jpg", b"hidden");
    env.drop_file("ok.jpg", b"whole");
    let d = env.spawn(&["serve"]);
    for p in [
        "/static/upload.jpg.part",
        "/static/photo.jpg.tmp",
        "/static/dl.bin.crdownload",
        "/static/a/.hidden.jpg",
    ] {
        let r = get(d.addr(), p, &[]);
        assert_eq!(r.status, 404, "{p} is work in progress, not content");
        assert_eq!(r.header("cache-control"), Some("no-store"), "{p}");
        assert!(!r.body.windows(4).any(|w| w == b"half"), "{p}");
    }
    assert_eq!(get(d.addr(), "/static/ok.jpg", &[]).status, 200);
}

#[test]
fn a_spool_file_is_public_only_once_ready_and_tagged_by_its_sha256_once_hashed() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = env_serving_spool(&s3);
    let bytes: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    env.drop_file("w.jpg", &bytes);
    let d = env.spawn(&["serve"]);
    let p = "/static/w.jpg";

    // Not ready (the catalog has no row for it): served, but never kept downstream, and
    // with a weak tag, so If-Range and If-Match cannot trust it.
    let r = get(d.addr(), p, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, bytes);
    assert_eq!(r.header("x-ferry-source"), Some("local"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let weak = r.header("etag").expect("etag").to_string();
    assert!(weak.starts_with("W/\""), "{weak}");
    let r = get(d.addr(), p, &[("If-None-Match", &weak)]);
    assert_eq!(r.status, 304, "weak comparison still revalidates");
    let r = get(d.addr(), p, &[("If-Range", &weak), ("Range", "bytes=0-9")]);
    assert_eq!(r.status, 200, "a weak tag never satisfies If-Range");
    assert_eq!(r.body, bytes);
    let r = get(d.addr(), p, &[("If-Match", &weak)]);
    assert_eq!(r.status, 412, "a weak tag never satisfies If-Match");

    // Ready (queued with this very stat): public, strong local tag.
    record_ready(&env, "w.jpg", None);
    let mut r = get(d.addr(), p, &[]);
    wait_for(
        Duration::from_secs(10),
        "the catalog's record to be seen",
        || {
            r = get(d.addr(), p, &[]);
            r.header("cache-control") != Some("no-store")
        },
    );
    assert_eq!(r.header("cache-control"), Some("public, max-age=300"));
    let strong = r.header("etag").expect("etag").to_string();
    assert!(strong.starts_with('"'), "{strong}");
    assert_eq!(
        strong.trim_start_matches("W/"),
        weak.trim_start_matches("W/")
    );
    let r = get(
        d.addr(),
        p,
        &[("If-Range", &strong), ("Range", "bytes=0-9")],
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &bytes[..10]);

    // The same file rewritten in place: a new stat, so not ready again.
    let mut changed = bytes.clone();
    changed.push(1);
    std::fs::write(env.spool().join("w.jpg"), &changed).unwrap();
    let r = get(d.addr(), p, &[]);
    assert_eq!(r.body, changed);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert!(r.header("etag").unwrap().starts_with("W/"));

    // Hashed and verified for this stat: the SHA-256 is its tag, as from every other source.
    let sha = sha256_hex(&changed);
    record_ready(&env, "w.jpg", Some(&sha));
    let want = format!("\"{sha}\"");
    wait_for(Duration::from_secs(10), "the sha256 tag", || {
        get(d.addr(), p, &[]).header("etag") == Some(want.as_str())
    });
    let r = get(d.addr(), p, &[("If-None-Match", &want)]);
    assert_eq!(r.status, 304);
    assert_eq!(r.header("etag"), Some(want.as_str()));
}

#[test]
fn active_content_is_sandboxed_and_nothing_is_sniffed() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = env_serving_spool(&s3);
    for k in [
        "x.html", "x.svg", "x.xml", "x.js", "x.xhtml", "x.txt", "noext", "x.jpg", "x.mp4",
    ] {
        env.drop_file(k, b"<svg onload=alert(1)>");
    }
    let d = env.spawn(&["serve"]);
    for k in [
        "x.html", "x.svg", "x.xml", "x.js", "x.xhtml", "x.txt", "noext",
    ] {
        let r = get(d.addr(), &format!("/static/{k}"), &[]);
        assert_eq!(r.status, 200, "{k}");
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{k}");
        assert_eq!(r.header("content-security-policy"), Some("sandbox"), "{k}");
        assert_eq!(r.header("content-disposition"), None, "{k}");
    }
    for k in ["x.jpg", "x.mp4"] {
        let r = get(d.addr(), &format!("/static/{k}"), &[]);
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{k}");
        assert_eq!(r.header("content-security-policy"), None, "{k}");
    }
    // Every response, errors and health checks too.
    for p in [
        "/static/none.jpg",
        "/healthz",
        "/nothing",
        "/static/%2e%2e/x",
    ] {
        let r = get(d.addr(), p, &[]);
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{p}");
    }
    drop(d);

    env.set("FERRY_HTTP_ACTIVE_CONTENT", "attachment");
    let d = env.spawn(&["serve"]);
    let r = get(d.addr(), "/static/x.svg", &[]);
    assert_eq!(r.header("content-disposition"), Some("attachment"));
    assert_eq!(r.header("content-security-policy"), Some("sandbox"));
    let r = get(d.addr(), "/static/x.jpg", &[]);
    assert_eq!(r.header("content-disposition"), None);
    drop(d);

    env.set("FERRY_HTTP_ACTIVE_CONTENT", "allow");
    let d = env.spawn(&["serve"]);
    let r = get(d.addr(), "/static/x.html", &[]);
    assert_eq!(r.header("content-security-policy"), None);
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
}

#[test]
fn errors_are_never_cacheable_and_say_nothing_internal() {
    let t = tempfile::tempdir().unwrap();
    let mut s3 = S3::start(t.path());
    let env = Env::for_s3(&s3);
    env.drop_file("gone.jpg", b"soon deleted");
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = env.run(&["delete", "gone.jpg"]);
    assert_eq!(code, 0, "{err}");
    let d = env.spawn(&["serve"]);
    let r = get(d.addr(), "/static/nope.jpg", &[]);
    assert_eq!(r.status, 404);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let r = get(d.addr(), "/static/gone.jpg", &[]);
    assert_eq!(r.status, 410);
    assert_eq!(r.header("cache-control"), Some("no-store"));

    // S3 unreachable, no archive copy: 503, and the body names no host, port or error chain.
    s3.down();
    let r = get(d.addr(), "/static/who.jpg", &[]);
    assert_eq!(r.status, 503);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let body = String::from_utf8_lossy(&r.body).to_ascii_lowercase();
    let port = s3.port.to_string();
    for leak in [
        "127.0.0.1",
        port.as_str(),
        "dispatch",
        "connect",
        "error",
        "s3:",
    ] {
        assert!(!body.contains(leak), "503 body leaks {leak:?}: {body}");
    }
}

#[test]
fn a_client_that_stops_reading_is_cut_off_after_send_timeout() {
    use std::io::{Read, Write};
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = env_serving_spool(&s3);
    env.set("FERRY_HTTP_SEND_TIMEOUT", "1s");
    // Far more than the socket buffers on both sides can hold.
    let size = 64 << 20;
    let bytes = vec![7u8; size];
    env.drop_file("big.bin", &bytes);
    let d = env.spawn(&["serve"]);
    let mut s = std::net::TcpStream::connect(d.addr()).unwrap();
    s.write_all(b"GET /static/big.bin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    // Reads nothing for 3x the timeout...
    std::thread::sleep(Duration::from_secs(3));
    // ... then all there is: what the buffers held when the server gave up, not the file.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        got.len() < size,
        "the whole {size} bytes arrived: the stalled connection was never cut"
    );
    assert!(got.starts_with(b"HTTP/1.1 200"), "it was being served");
    // Others are served.
    assert_eq!(get(d.addr(), "/healthz", &[]).status, 200);
}

#[test]
fn at_the_connection_cap_accepting_waits_until_a_slot_frees() {
    use std::io::{Read, Write};
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = env_serving_spool(&s3);
    env.set("FERRY_HTTP_MAX_CONNECTIONS", "2");
    let d = env.spawn(&["serve"]);
    let addr = d.addr();
    let a = std::net::TcpStream::connect(addr).unwrap();
    let b = std::net::TcpStream::connect(addr).unwrap();
    // The kernel completes the handshake (backlog), but ferry does not take it on.
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 64];
    match c.read(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("answered beyond the cap: {other:?}"),
    }
    drop(a);
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    drop(b);
}

#[test]
fn readyz_asks_s3_at_most_about_once_a_second() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let proxy = FaultProxy::start(s3.port);
    let mut env = Env::for_s3(&s3);
    env.set("FERRY_S3_ENDPOINT", &proxy.endpoint());
    let d = env.spawn(&["serve"]);
    let head_bucket = || {
        let want = format!("HEAD /{} ", s3.bucket);
        let want_slash = format!("HEAD /{}/ ", s3.bucket);
        proxy
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(&want) || l.starts_with(&want_slash))
            .count()
    };
    let before = head_bucket();
    let start = std::time::Instant::now();
    let mut asked = 0;
    while asked < 30 {
        assert_eq!(get(d.addr(), "/readyz", &[]).status, 200);
        asked += 1;
    }
    let secs = start.elapsed().as_secs() as usize;
    let checks = head_bucket() - before;
    assert!(checks >= 1, "readyz does ask S3");
    assert!(
        checks <= secs + 1,
        "{checks} HeadBucket calls for {asked} probes in {secs}+ s"
    );
}

/// Readiness is the watcher's own verdict, read from the catalog: a file closed by its
/// writer becomes public once it settled, one renamed in at once; before that, no-store.
/// (S3 is down so the files stay in the spool.)
#[test]
fn the_real_watcher_decides_when_a_spool_file_turns_public() {
    let t = tempfile::tempdir().unwrap();
    let mut s3 = S3::start(t.path());
    let mut env = Env::for_s3(&s3);
    env.set("FERRY_SPOOL_SETTLE", "2s");
    s3.down();
    let d = env.spawn(&["run"]);
    let addr = d.addr();

    env.drop_file("closed.jpg", b"written and closed");
    let r = get(addr, "/static/closed.jpg", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("cache-control"),
        Some("no-store"),
        "not settled yet"
    );
    wait_for(Duration::from_secs(15), "closed.jpg to settle", || {
        get(addr, "/static/closed.jpg", &[]).header("cache-control") == Some("public, max-age=300")
    });
    let r = get(addr, "/static/closed.jpg", &[]);
    assert!(r.header("etag").is_some_and(|t| t.starts_with('"')));

    // Written under an ignored name (never served), renamed into place: ready as soon as
    // the watcher sees the rename (no settle), and public from then on.
    let tmp = env.spool().join("renamed.jpg.tmp");
    std::fs::write(&tmp, b"renamed in").unwrap();
    assert_eq!(get(addr, "/static/renamed.jpg.tmp", &[]).status, 404);
    std::fs::rename(&tmp, env.spool().join("renamed.jpg")).unwrap();
    wait_for(Duration::from_secs(15), "renamed.jpg to be public", || {
        get(addr, "/static/renamed.jpg", &[]).header("cache-control") == Some("public, max-age=300")
    });
}

#[test]
fn a_catalog_that_cannot_answer_costs_public_status_and_a_head_never_a_500() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = Env::for_s3(&s3);
    env.drop_file("up.jpg", b"uploaded and archived");
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    env.set("FERRY_SPOOL_SETTLE", "1h");
    env.drop_file("here.jpg", b"still in the spool");
    record_ready(&env, "here.jpg", None);
    let d = env.spawn(&["serve"]);
    let r = get(d.addr(), "/static/here.jpg", &[]);
    assert_eq!(r.header("cache-control"), Some("public, max-age=300"));

    // The catalog's file turns to garbage under the running server (a disk fault).
    // Written in place, the shared-memory index too (it is mapped): no connection can
    // answer from what it read before.
    for name in ["ferry.db", "ferry.db-wal", "ferry.db-shm"] {
        let path = env.dir.path().join(name);
        let len = std::fs::metadata(&path).map_or(0, |m| m.len()).max(8192) as usize;
        std::fs::write(&path, vec![0xffu8; len]).unwrap();
    }

    // A fresh key: its record is not cached, so the catalog is asked and fails.
    env.drop_file("new.jpg", b"dropped after the fault");
    let r = get(d.addr(), "/static/new.jpg", &[]);
    assert_eq!(r.status, 200, "the bytes are still served");
    assert_eq!(r.body, b"dropped after the fault");
    assert_eq!(
        r.header("cache-control"),
        Some("no-store"),
        "but not as public"
    );
    assert!(r.header("etag").is_some_and(|e| e.starts_with("W/")));

    // A key only S3 holds: S3's HEAD answers instead of the catalog.
    let r = get(d.addr(), "/static/up.jpg", &[]);
    assert_eq!(r.status, 302, "{:?}", String::from_utf8_lossy(&r.body));
    // The log reaches the test through a pipe and a reader thread: a line written just
    // before the response can arrive after it (CI saw exactly that).
    d.wait_log(
        "serving the spool file as not ready",
        Duration::from_secs(5),
    );
    d.wait_log("catalog unreadable; asking S3", Duration::from_secs(5));
}

// ---- a ready spool file changing under a download (semantics.rs, the rewrite guard) ----

fn guard_get(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> RawResponse {
    raw_request(addr, "GET", path.as_bytes(), headers)
}

/// Starts a GET (keep-alive, so only an aborted connection ends the read early) for `path`,
/// reads `first` bytes, runs `mid`, then reads to EOF (10 s limit). Returns (header text,
/// body bytes received).
fn get_with_pause(
    addr: std::net::SocketAddr,
    path: &str,
    first: usize,
    mid: impl FnOnce(),
) -> (String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    // No "Connection: close": if hyper did not abort, read_to_end would hang on keep-alive.
    write!(s, "GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = vec![0u8; first];
    s.read_exact(&mut got).unwrap();
    mid();
    let _ = s.read_to_end(&mut got);
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&got[..end]).into_owned();
    (head, got[end..].to_vec())
}

/// `ferry serve` with one ready, verified 32 MiB spool file, `big.bin`, answered as public;
/// returns once the coarse clock's tick of its write is past, so a later rewrite shows.
fn serving_a_big_ready_file(dir: &std::path::Path) -> (S3, Env, Daemon, usize) {
    let s3 = S3::start(dir);
    let env = env_serving_spool(&s3);
    let size = 32 << 20;
    let bytes = content("big.bin", size);
    env.drop_file("big.bin", &bytes);
    record_ready(&env, "big.bin", Some(&sha256_hex(&bytes)));
    let d = env.spawn(&["serve"]);
    wait_for(Duration::from_secs(10), "public", || {
        guard_get(d.addr(), "/static/big.bin", &[("Range", "bytes=0-0")]).header("cache-control")
            != Some("no-store")
    });
    std::thread::sleep(Duration::from_millis(50));
    (s3, env, d, size)
}

/// The archive move (a rename, what ferry itself does once S3 verified the file) changes
/// the inode's ctime but not one byte: a download in flight completes. (It was cut short
/// while the rewrite guard compared ctime too.)
#[test]
fn archiving_a_spool_file_mid_download_does_not_cut_the_download() {
    let t = tempfile::tempdir().unwrap();
    let (_s3, env, d, size) = serving_a_big_ready_file(t.path());
    let (head, body) = get_with_pause(d.addr(), "/static/big.bin", 1 << 16, || {
        std::fs::create_dir_all(env.archive()).unwrap();
        std::fs::rename(env.spool().join("big.bin"), env.archive().join("big.bin")).unwrap();
    });
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("public"), "{head}");
    assert_eq!(
        body.len(),
        size,
        "the archive rename cut a download of unchanged bytes short"
    );
}

/// A ready file rewritten in place mid-download: hyper aborts the connection short of the
/// Content-Length (the guard replaces the last chunk with an error), so no cache keeps it.
#[test]
fn a_rewrite_mid_download_cuts_the_body_and_closes_the_connection() {
    let t = tempfile::tempdir().unwrap();
    let (_s3, env, d, size) = serving_a_big_ready_file(t.path());
    let started = std::time::Instant::now();
    let (head, body) = get_with_pause(d.addr(), "/static/big.bin", 1 << 16, || {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(env.spool().join("big.bin"))
            .unwrap();
        f.write_all_at(&vec![b'X'; size], 0).unwrap();
    });
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.len() < size, "whole body went out");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "connection was not closed"
    );
}

/// A ready file's whole answer, already written to the socket and not yet read by the
/// client, must be the bytes its tag names when the file is rewritten in place then: a body
/// sent by sendfile(2) is still the file's page cache until read, so it would carry the new
/// version under the old SHA-256, public and complete (found by the attack review of the
/// sendfile path). A public answer is copied; the client gets the old bytes or a short body.
#[test]
fn a_public_answer_in_flight_keeps_its_bytes_when_the_file_is_rewritten() {
    use std::io::{Read, Write};
    use std::os::unix::fs::FileExt;
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = env_serving_spool(&s3);
    // Past the 256 KiB read whole as it opens: the body is streamed, or sent by sendfile.
    let size = 320 << 10;
    let bytes = content("inflight.bin", size);
    env.drop_file("inflight.bin", &bytes);
    record_ready(&env, "inflight.bin", Some(&sha256_hex(&bytes)));
    let d = env.spawn(&["serve"]);
    wait_for(Duration::from_secs(10), "public", || {
        guard_get(d.addr(), "/static/inflight.bin", &[("Range", "bytes=0-0")])
            .header("cache-control")
            != Some("no-store")
    });
    let mut c = std::net::TcpStream::connect(d.addr()).unwrap();
    // Room for the whole answer, so the server finishes before the rewrite.
    let room: libc::c_int = 4 << 20;
    // SAFETY: setsockopt on our own socket with a valid int.
    let rc = unsafe {
        use std::os::fd::AsRawFd;
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&room as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    c.write_all(b"GET /static/inflight.bin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(env.spool().join("inflight.bin"))
        .unwrap();
    f.write_all_at(&vec![b'X'; size], 0).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&got[..end]).into_owned();
    let body = &got[end..];
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("public"), "{head}");
    assert!(
        body.len() < size || body == &bytes[..],
        "a complete public body that is not the version its tag names ({} bytes, {} of them new)",
        body.len(),
        body.iter().filter(|b| **b == b'X').count()
    );
}

/// A ready file not yet hashed is public under its local tag. Rewritten in place with the
/// same length and its mtime put back (cp -p, rsync --inplace -t, touch -d), then ready
/// again: a new tag, so a cache holding the first version is not told it is current. (Both
/// versions had one tag while it was "len-mtime-inode", without the ctime.)
#[test]
fn an_mtime_preserving_rewrite_gets_a_new_local_tag() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = env_serving_spool(&s3);
    env.drop_file("a.jpg", b"version one");
    let p = env.spool().join("a.jpg");
    let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
    record_ready(&env, "a.jpg", None);
    let d = env.spawn(&["serve"]);
    let mut r = guard_get(d.addr(), "/static/a.jpg", &[]);
    wait_for(Duration::from_secs(10), "public", || {
        r = guard_get(d.addr(), "/static/a.jpg", &[]);
        r.header("cache-control") != Some("no-store")
    });
    let tag1 = r.header("etag").unwrap().to_string();
    // Past the coarse clock's tick of the first write, as any later rewrite is.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&p, b"VERSION TWO").unwrap(); // same length, same inode
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    record_ready(&env, "a.jpg", None);
    wait_for(Duration::from_secs(10), "public again", || {
        r = guard_get(d.addr(), "/static/a.jpg", &[]);
        r.header("cache-control") != Some("no-store")
    });
    assert_eq!(r.body, b"VERSION TWO");
    let r304 = guard_get(d.addr(), "/static/a.jpg", &[("If-None-Match", &tag1)]);
    assert_ne!(
        r.header("etag").unwrap(),
        tag1,
        "two versions, one strong public tag"
    );
    assert_ne!(
        r304.status, 304,
        "a cache holding 'version one' is told it is current"
    );
}

#[test]
fn the_memory_tier_answers_an_unchanged_spool_file_and_never_a_changed_one() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = env_serving_spool(&s3);
    let one = content("m.jpg", 5000);
    env.drop_file("m.jpg", &one);
    record_ready(&env, "m.jpg", None);
    let d = env.spawn(&["serve"]);
    let p = "/static/m.jpg";
    let hits = || metric(d.addr(), "ferry_spool_memory_hits_total");
    // Held only once its ctime has settled (memo::SETTLED); answered from memory from then on.
    std::thread::sleep(ferry::serve::memo::SETTLED + Duration::from_millis(200));
    let mut first = get(d.addr(), p, &[]);
    wait_for(Duration::from_secs(10), "public and held", || {
        first = get(d.addr(), p, &[]);
        first.header("cache-control") != Some("no-store") && hits() > 0.0
    });
    assert_eq!(first.status, 200);
    assert_eq!(first.body, one);

    let before = hits();
    let again = get(d.addr(), p, &[]);
    assert_eq!(hits(), before + 1.0, "the second GET came from memory");
    assert_eq!(again.status, 200);
    assert_eq!(again.body, one);
    for h in [
        "etag",
        "last-modified",
        "cache-control",
        "content-type",
        "content-length",
        "accept-ranges",
        "x-ferry-source",
        "x-content-type-options",
    ] {
        assert_eq!(again.header(h), first.header(h), "{h}");
    }
    let etag = again.header("etag").unwrap().to_string();

    let r = get(d.addr(), p, &[("Range", "bytes=10-19")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &one[10..20]);
    assert_eq!(r.header("content-range"), Some("bytes 10-19/5000"));
    let r = get(d.addr(), p, &[("Range", "bytes=0-1,4998-")]);
    assert_eq!(r.status, 206);
    let ct = r.header("content-type").unwrap();
    assert!(ct.starts_with("multipart/byteranges; boundary="), "{ct}");
    assert!(r.body.windows(2).any(|w| w == &one[..2]));
    assert!(r.body.windows(2).any(|w| w == &one[4998..]));
    assert_eq!(get(d.addr(), p, &[("If-None-Match", &etag)]).status, 304);
    let r = get(d.addr(), p, &[("If-Range", &etag), ("Range", "bytes=0-3")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &one[..4]);
    let h = raw_request(d.addr(), "HEAD", p.as_bytes(), &[]);
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-length"), Some("5000"));
    assert!(h.body.is_empty());
    assert_eq!(hits(), before + 6.0, "every answer above came from memory");

    // Rewritten in place: the same inode, length and mtime; only the ctime differs.
    let path = env.spool().join("m.jpg");
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let two = content("m.jpg, version two", 5000);
    std::fs::write(&path, &two).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let before = hits();
    let r = get(d.addr(), p, &[]);
    assert_eq!(r.body, two, "held bytes of an older version were served");
    assert_eq!(
        r.header("cache-control"),
        Some("no-store"),
        "a new stat is not ready"
    );
    assert_ne!(r.header("etag"), Some(etag.as_str()));
    assert_eq!(get(d.addr(), p, &[("If-None-Match", &etag)]).status, 200);
    assert_eq!(hits(), before, "a changed file is read from disk");

    // Archived (renamed out of the spool): never answered from memory again.
    std::thread::sleep(ferry::serve::memo::SETTLED + Duration::from_millis(200));
    get(d.addr(), p, &[]);
    assert!(get(d.addr(), p, &[]).body == two);
    std::fs::rename(&path, t.path().join("elsewhere.jpg")).unwrap();
    let r = get(d.addr(), p, &[]);
    assert_ne!(r.header("x-ferry-source"), Some("local"));
    assert!(r.body != two && r.body != one);
}
