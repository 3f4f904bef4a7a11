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
