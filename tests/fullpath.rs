//! The full serve path end to end: hot cache, proxy mode with coalesced fetches, archive
//! fallback (local and `fallback_url`), deletion (410) across nodes, S3 HEAD for unknown keys.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn get(addr: std::net::SocketAddr, path: &str) -> RawResponse {
    raw_request(addr, "GET", path.as_bytes(), &[])
}

fn blob(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Uploads `files` with `sync --once` and returns the env (catalog knows them as archived).
fn uploaded(s3: &S3, files: &[(&str, &[u8])], extra: &[(&str, &str)]) -> Env {
    let mut env = Env::for_s3(s3);
    for (k, v) in extra {
        env.set(k, v);
    }
    for (k, b) in files {
        env.drop_file(k, b);
    }
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    env
}

#[test]
fn hot_threshold_then_cache_and_still_cached_after_restart() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let bytes = blob(1, 100_000);
    let env = uploaded(
        &s3,
        &[("hot.jpg", &bytes)],
        &[("FERRY_CACHE_HOT_HITS", "3")],
    );
    let mut d = env.spawn(&["serve"]);
    let addr = d.addr();
    for i in 1..3 {
        let r = get(addr, "/static/hot.jpg");
        assert_eq!(r.status, 302, "request {i} is below the threshold");
        assert_eq!(r.header("x-ferry-source"), Some("redirect"));
    }
    let r = get(addr, "/static/hot.jpg");
    assert_eq!(r.status, 200, "the request reaching hot_hits fetches");
    assert_eq!(r.header("x-ferry-source"), Some("s3"));
    assert_eq!(r.body, bytes);
    wait_for(
        Duration::from_secs(10),
        "the cache to hold the entry",
        || get(addr, "/static/hot.jpg").header("x-ferry-source") == Some("cache"),
    );
    let r = get(addr, "/static/hot.jpg");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ferry-source"), Some("cache"));
    assert_eq!(r.body, bytes);
    // Ranges work on cache hits too.
    let r = raw_request(addr, "GET", b"/static/hot.jpg", &[("Range", "bytes=10-19")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &bytes[10..20]);
    // The cache's copy is byte-identical to S3's.
    let cached: Vec<_> = walk(&env.dir.path().join("cache"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "data"))
        .collect();
    assert_eq!(cached.len(), 1);
    assert_eq!(
        std::fs::read(&cached[0]).unwrap(),
        s3.object_bytes("hot.jpg")
    );

    assert_eq!(d.terminate(), Some(0));
    let d = env.spawn(&["serve"]);
    let r = get(d.addr(), "/static/hot.jpg");
    assert_eq!(
        r.header("x-ferry-source"),
        Some("cache"),
        "still cached after a restart"
    );
    assert_eq!(r.body, bytes);
}

#[test]
fn corrupted_cache_entry_is_refetched_never_served() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let bytes = blob(2, 50_000);
    let env = uploaded(&s3, &[("c.jpg", &bytes)], &[("FERRY_CACHE_HOT_HITS", "1")]);
    let d = env.spawn(&["serve"]);
    let addr = d.addr();
    assert_eq!(
        get(addr, "/static/c.jpg").header("x-ferry-source"),
        Some("s3")
    );
    wait_for(Duration::from_secs(10), "cached", || {
        get(addr, "/static/c.jpg").header("x-ferry-source") == Some("cache")
    });
    let data = walk(&env.dir.path().join("cache"))
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "data"))
        .unwrap();
    let mut bad = bytes.clone();
    bad[100] ^= 0xff;
    std::fs::write(&data, &bad).unwrap();
    let r = get(addr, "/static/c.jpg");
    assert_eq!(r.body, bytes, "never the corrupted bytes");
    assert_ne!(r.header("x-ferry-source"), Some("cache"));
}

#[test]
fn concurrent_first_requests_share_one_s3_get() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let proxy = FaultProxy::start(s3.port);
    let bytes = blob(3, 1 << 20);
    let mut env = uploaded(&s3, &[("one.bin", &bytes)], &[]);
    env.set("FERRY_S3_ENDPOINT", &proxy.endpoint());
    env.set("FERRY_HTTP_MODE", "proxy");
    // A slow download keeps the fetch open while all 50 requests arrive.
    proxy
        .down_delay_ms
        .store(30, std::sync::atomic::Ordering::SeqCst);
    let d = env.spawn(&["serve"]);
    let addr = d.addr();
    let handles: Vec<_> = (0..50)
        .map(|_| std::thread::spawn(move || get(addr, "/static/one.bin")))
        .collect();
    for h in handles {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-ferry-source"), Some("s3"));
        assert_eq!(r.body.len(), bytes.len());
        assert!(r.body == bytes);
    }
    assert_eq!(
        proxy.count("GET", "/one.bin"),
        1,
        "{:?}",
        proxy.requests.lock().unwrap()
    );
}

#[test]
fn s3_down_serves_the_archive_copy_locally_and_from_fallback_url() {
    let t = tempfile::tempdir().unwrap();
    let mut s3 = S3::start(t.path());
    let a = blob(4, 30_000);
    let b = blob(5, 40_000);
    let env = uploaded(
        &s3,
        &[("a.jpg", &a), ("sub/b.jpg", &b)],
        &[("FERRY_HTTP_MODE", "proxy")],
    );
    s3.down();
    let d = env.spawn(&["serve"]);
    let r = get(d.addr(), "/static/a.jpg");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ferry-source"), Some("archive"));
    assert_eq!(r.body, a);
    drop(d);

    // The archive on another box: a plain HTTP file server over the archive dir.
    // Port 0, and the port read from its banner: no window for another test to take it.
    let mut server = Command::new("python3")
        .args(["-u", "-m", "http.server", "--bind", "127.0.0.1", "0"])
        .current_dir(env.archive())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 -m http.server");
    let mut banner = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut banner,
    )
    .unwrap();
    // "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
    let port: u16 = banner
        .split(" port ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in http.server's banner: {banner:?}"));
    let mut env2 = Env::for_s3(&s3);
    env2.set("FERRY_HTTP_MODE", "proxy");
    env2.set(
        "FERRY_HTTP_FALLBACK_URL",
        &format!("http://127.0.0.1:{port}/"),
    );
    env2.set(
        "FERRY_CATALOG_PATH",
        &env.dir.path().join("ferry.db").to_string_lossy(),
    );
    let d2 = env2.spawn(&["serve"]);
    let r = get(d2.addr(), "/static/sub/b.jpg");
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ferry-source"), Some("archive"));
    assert_eq!(r.body, b);
}

#[test]
fn hot_key_with_s3_down_falls_back_to_archive() {
    let t = tempfile::tempdir().unwrap();
    let mut s3 = S3::start(t.path());
    let a = blob(6, 20_000);
    let env = uploaded(&s3, &[("h.jpg", &a)], &[("FERRY_CACHE_HOT_HITS", "1")]);
    s3.down();
    let d = env.spawn(&["serve"]);
    let r = get(d.addr(), "/static/h.jpg");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ferry-source"), Some("archive"));
    assert_eq!(r.body, a);
}

#[test]
fn delete_answers_410_here_at_once_and_elsewhere_within_ttl() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let a = blob(7, 10_000);
    let env = uploaded(&s3, &[("gone.jpg", &a)], &[]);
    let d = env.spawn(&["serve"]);
    assert_eq!(get(d.addr(), "/static/gone.jpg").status, 302);

    // Another node with its own (empty) catalog learns the key from S3.
    let mut other = Env::for_s3(&s3);
    other.set("FERRY_HTTP_METADATA_TTL", "2s");
    let d2 = other.spawn(&["serve"]);
    let r = get(d2.addr(), "/static/gone.jpg");
    assert_eq!(r.status, 302, "known through S3 HEAD");

    let (code, out, err) = env.run(&["delete", "gone.jpg"]);
    assert_eq!(code, 0, "{out}{err}");
    let start = Instant::now();
    wait_for(Duration::from_secs(1), "410 on this host", || {
        get(d.addr(), "/static/gone.jpg").status == 410
    });
    let here = start.elapsed();
    wait_for(Duration::from_secs(5), "410 on the other node", || {
        get(d2.addr(), "/static/gone.jpg").status == 410
    });
    assert!(here <= Duration::from_secs(1));
    // The bytes are gone from S3; the archive copy stays.
    assert_eq!(s3.object_bytes("gone.jpg").len(), 0);
    assert_eq!(std::fs::read(env.archive().join("gone.jpg")).unwrap(), a);
    assert_eq!(get(d.addr(), "/static/never.jpg").status, 404);
}

#[test]
fn unknown_key_with_s3_unreachable_is_503() {
    let t = tempfile::tempdir().unwrap();
    let mut s3 = S3::start(t.path());
    let env = Env::for_s3(&s3);
    s3.down();
    let d = env.spawn(&["serve"]);
    let r = get(d.addr(), "/static/who.jpg");
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.header("x-ferry-source"), None);
}

#[test]
fn proxy_mode_passes_ranges_through() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let a = blob(8, 5000);
    let env = uploaded(&s3, &[("r.jpg", &a)], &[("FERRY_HTTP_MODE", "proxy")]);
    let d = env.spawn(&["serve"]);
    let r = raw_request(
        d.addr(),
        "GET",
        b"/static/r.jpg",
        &[("Range", "bytes=100-199")],
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.header("x-ferry-source"), Some("s3"));
    assert_eq!(r.body, &a[100..200]);
    let r = get(d.addr(), "/static/r.jpg");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, a);
}

#[test]
fn verify_finds_and_repairs_missing_and_different_objects() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let a = blob(9, 7000);
    let b = blob(10, 9000);
    let c = blob(11, 3000);
    let env = uploaded(&s3, &[("a.jpg", &a), ("b.jpg", &b), ("c.jpg", &c)], &[]);
    let (code, out, err) = env.run(&["verify"]);
    assert_eq!(code, 0, "consistent at first: {out}{err}");

    // Lose one object and replace another behind ferry's back; lose c's archive copy too.
    s3.remove_object("a.jpg");
    let rt = rt();
    rt.block_on(async {
        s3.store()
            .await
            .put_bytes("b.jpg", b"not b".to_vec(), &[])
            .await
            .unwrap()
    });
    s3.remove_object("c.jpg");
    std::fs::remove_file(env.archive().join("c.jpg")).unwrap();

    let (code, out, _) = env.run(&["verify"]);
    assert_ne!(code, 0);
    assert!(out.contains("a.jpg: missing in S3"), "{out}");
    assert!(out.contains("b.jpg"), "{out}");
    let (code, out, _) = env.run(&["verify", "--repair"]);
    assert_ne!(code, 0, "c has no copy left to repair from: {out}");
    assert!(
        out.contains("c.jpg") && out.contains("no archive or spool copy"),
        "{out}"
    );
    assert!(out.contains("a.jpg: missing in S3 -> re-uploaded"), "{out}");
    rt.block_on(async {
        let st = s3.store().await;
        assert_eq!(st.read_back("a.jpg").await.unwrap().1, sha256_hex(&a));
        assert_eq!(st.read_back("b.jpg").await.unwrap().1, sha256_hex(&b));
    });
}

#[test]
fn cache_stays_within_max_size_and_one_hit_keys_do_not_evict_the_hot_set() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    // 8 hot keys fill about 40% of the cache; then 2× max_size of other keys go through it.
    let blob_len = 10 * 1024;
    let max = 200 * 1024u64;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..48u8 {
        files.push((format!("k{i}.bin"), blob(i, blob_len)));
    }
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(k, b)| (k.as_str(), b.as_slice()))
        .collect();
    let env = uploaded(
        &s3,
        &refs,
        &[
            ("FERRY_CACHE_HOT_HITS", "2"),
            ("FERRY_CACHE_MAX_SIZE", &max.to_string()),
        ],
    );
    let d = env.spawn(&["serve"]);
    let addr = d.addr();
    let cache_bytes = || -> u64 {
        walk(&env.dir.path().join("cache"))
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "data"))
            .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum()
    };
    // The hot set: requested often.
    let check = |r: RawResponse, want: &[u8]| {
        // Below the threshold a key is redirected; from it on, served with its exact bytes.
        if r.status == 302 {
            assert_eq!(r.header("x-ferry-source"), Some("redirect"));
        } else {
            assert_eq!(r.status, 200);
            assert_eq!(r.body, want);
        }
    };
    for round in 0..6 {
        let mut seen = Vec::new();
        for (key, bytes) in &files[..8] {
            let r = get(addr, &format!("/static/{key}"));
            seen.push(r.header("x-ferry-source").unwrap_or("-").to_string());
            check(r, bytes);
        }
        eprintln!("round {round}: {seen:?}");
    }
    // A scan: 40 other keys, each made just hot (2 hits), 2× the cache's size in all.
    for (key, bytes) in &files[8..] {
        for _ in 0..2 {
            check(get(addr, &format!("/static/{key}")), bytes);
        }
        assert!(
            cache_bytes() <= max,
            "cache holds {} > {max}",
            cache_bytes()
        );
    }
    let sources: Vec<String> = (0..8)
        .map(|i| {
            get(addr, &format!("/static/k{i}.bin"))
                .header("x-ferry-source")
                .unwrap_or("-")
                .to_string()
        })
        .collect();
    eprintln!("hot sources after the scan: {sources:?}");
    let hot_still_cached = sources.iter().filter(|s| *s == "cache").count();
    assert!(
        hot_still_cached >= 6,
        "the scan evicted the hot set: {hot_still_cached}/8 still cached"
    );
}

/// The conditional and range answers every source must give for one version, by its one
/// ETag: 304, 412, If-Range both ways, 206 with the ETag, 416 with `*/LEN`. A 304 needs no
/// bytes, so on the S3 path it is answered from the metadata (`revalidated_by`) without
/// asking S3 or the archive for anything.
fn check_semantics(
    addr: std::net::SocketAddr,
    path: &str,
    bytes: &[u8],
    source: &str,
    revalidated_by: &str,
) {
    let len = bytes.len();
    let tag = format!("\"{}\"", sha256_hex(bytes));
    let p = path.as_bytes();
    let ask = |h: &[(&str, &str)]| raw_request(addr, "GET", p, h);

    let r = ask(&[]);
    assert_eq!(r.status, 200, "{source}");
    assert_eq!(r.header("x-ferry-source"), Some(source));
    assert_eq!(
        r.header("etag"),
        Some(tag.as_str()),
        "{source}: one version, one ETag"
    );
    assert_eq!(r.header("accept-ranges"), Some("bytes"), "{source}");
    assert!(r.header("last-modified").is_some(), "{source}");
    assert_eq!(
        r.header("x-content-type-options"),
        Some("nosniff"),
        "{source}"
    );
    assert_eq!(r.body, bytes, "{source}");

    let r = ask(&[("If-None-Match", &tag)]);
    assert_eq!(r.status, 304, "{source}: its own ETag revalidates");
    assert_eq!(r.header("etag"), Some(tag.as_str()), "{source}");
    assert_eq!(r.header("x-ferry-source"), Some(revalidated_by));
    assert!(r.body.is_empty());

    let r = ask(&[("If-Match", "\"another\"")]);
    assert_eq!(r.status, 412, "{source}");
    let r = ask(&[("If-Match", &tag)]);
    assert_eq!(r.status, 200, "{source}");

    let r = ask(&[("Range", "bytes=10-19"), ("If-Range", &tag)]);
    assert_eq!(r.status, 206, "{source}");
    assert_eq!(
        r.header("etag"),
        Some(tag.as_str()),
        "{source}: 206 carries the ETag"
    );
    let cr = format!("bytes 10-19/{len}");
    assert_eq!(r.header("content-range"), Some(cr.as_str()), "{source}");
    assert_eq!(r.body, &bytes[10..20], "{source}");
    assert_eq!(r.header("x-ferry-source"), Some(source));

    let r = ask(&[("Range", "bytes=10-19"), ("If-Range", "\"another\"")]);
    assert_eq!(
        r.status, 200,
        "{source}: If-Range of another version gets it all"
    );
    assert_eq!(r.body, bytes, "{source}");

    let past = format!("bytes={len}-");
    let r = ask(&[("Range", &past)]);
    assert_eq!(r.status, 416, "{source}");
    let star = format!("bytes */{len}");
    assert_eq!(r.header("content-range"), Some(star.as_str()), "{source}");
}

#[test]
fn every_source_answers_conditionals_and_ranges_alike_under_one_etag() {
    let t = tempfile::tempdir().unwrap();
    let mut s3 = S3::start(t.path());
    let a = blob(12, 5000);
    let mut env = uploaded(
        &s3,
        &[("e.jpg", &a)],
        &[
            ("FERRY_HTTP_MODE", "proxy"),
            ("FERRY_CACHE_HOT_HITS", "1000"),
        ],
    );
    let d = env.spawn(&["serve"]);
    check_semantics(d.addr(), "/static/e.jpg", &a, "s3", "s3");
    drop(d);

    env.set("FERRY_CACHE_HOT_HITS", "1");
    let d = env.spawn(&["serve"]);
    let addr = d.addr();
    wait_for(Duration::from_secs(10), "the cache to hold e.jpg", || {
        get(addr, "/static/e.jpg").header("x-ferry-source") == Some("cache")
    });
    check_semantics(addr, "/static/e.jpg", &a, "cache", "cache");
    drop(d);

    // S3 down and no cache: the local archive copy.
    s3.down();
    env.set("FERRY_CACHE_MAX_SIZE", "0");
    let d = env.spawn(&["serve"]);
    check_semantics(d.addr(), "/static/e.jpg", &a, "archive", "s3");
}

#[test]
fn a_hot_key_larger_than_max_object_is_never_fetched_and_a_hot_range_is_206() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let proxy = FaultProxy::start(s3.port);
    let big = blob(13, 300_000);
    let small = blob(14, 50_000);
    let mut env = uploaded(&s3, &[("big.mp4", &big), ("small.mp4", &small)], &[]);
    env.set("FERRY_S3_ENDPOINT", &proxy.endpoint());
    env.set("FERRY_CACHE_HOT_HITS", "1");
    // max_object defaults to an eighth of this: 128 KiB.
    env.set("FERRY_CACHE_MAX_SIZE", "1MiB");
    let d = env.spawn(&["serve"]);
    let addr = d.addr();
    for _ in 0..5 {
        let r = get(addr, "/static/big.mp4");
        assert_eq!(
            r.status, 302,
            "too big for the cache: redirected, not proxied"
        );
        assert_eq!(r.header("x-ferry-source"), Some("redirect"));
    }
    assert_eq!(proxy.count("GET", "big.mp4"), 0, "never fetched from S3");

    // A hot key's Range is a 206 of just that range, with the version's ETag.
    let tag = format!("\"{}\"", sha256_hex(&small));
    let r = raw_request(
        addr,
        "GET",
        b"/static/small.mp4",
        &[("Range", "bytes=0-99")],
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.header("x-ferry-source"), Some("s3"));
    assert_eq!(r.body, &small[..100]);
    assert_eq!(r.header("content-range"), Some("bytes 0-99/50000"));
    assert_eq!(r.header("etag"), Some(tag.as_str()));
    // ... and the cache still fills, and answers ranges from then on.
    wait_for(Duration::from_secs(10), "small.mp4 cached", || {
        get(addr, "/static/small.mp4").header("x-ferry-source") == Some("cache")
    });
    let r = raw_request(
        addr,
        "GET",
        b"/static/small.mp4",
        &[("Range", "bytes=100-199")],
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.header("x-ferry-source"), Some("cache"));
    assert_eq!(r.body, &small[100..200]);
    drop(d);

    env.set("FERRY_CACHE_MAX_OBJECT", "512KiB");
    let d = env.spawn(&["serve"]);
    let r = get(d.addr(), "/static/big.mp4");
    assert_eq!(r.status, 200, "within cache.max_object: hot-fetched");
    assert_eq!(r.header("x-ferry-source"), Some("s3"));
    assert_eq!(r.body, big);
}

/// A node that learned a key from S3 (no catalog row of its own) while another node deletes
/// it, or re-uploads it: it must never send the marker's 0 bytes or the new bytes under the
/// old version's ETag. S3's GET response is checked before a byte goes out, and the key is
/// resolved again: 410 after the delete, the new version after the re-upload.
#[test]
fn a_proxying_node_never_sends_another_versions_bytes_under_the_old_etag() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let old = blob(15, 8000);
    let env = uploaded(&s3, &[("v.jpg", &old), ("w.jpg", &old)], &[]);
    let old_tag = format!("\"{}\"", sha256_hex(&old));

    let start_node = || {
        let mut other = Env::for_s3(&s3);
        other.set("FERRY_HTTP_MODE", "proxy");
        other.set("FERRY_HTTP_METADATA_TTL", "1h");
        let d = other.spawn(&["serve"]);
        for p in ["/static/v.jpg", "/static/w.jpg"] {
            let r = get(d.addr(), p);
            assert_eq!(r.status, 200);
            assert_eq!(r.header("etag"), Some(old_tag.as_str()));
            assert_eq!(r.body, old);
        }
        (other, d)
    };
    // One node for whole bodies, one for ranges: both paths check before sending.
    let (_e1, whole) = start_node();
    let (_e2, ranged) = start_node();
    let range = |path: &str| {
        raw_request(
            ranged.addr(),
            "GET",
            path.as_bytes(),
            &[("Range", "bytes=0-9")],
        )
    };

    let (code, out, err) = env.run(&["delete", "v.jpg"]);
    assert_eq!(code, 0, "{out}{err}");
    let r = get(whole.addr(), "/static/v.jpg");
    assert_eq!(r.status, 410, "not the marker's {} bytes", r.body.len());
    assert_eq!(range("/static/v.jpg").status, 410);

    // Re-uploaded with other bytes of the same length: only the sha256 metadata tells.
    let new = blob(16, 8000);
    env.drop_file("w.jpg", &new);
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(s3.object_bytes("w.jpg"), new);
    let new_tag = format!("\"{}\"", sha256_hex(&new));
    let r = get(whole.addr(), "/static/w.jpg");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("etag"), Some(new_tag.as_str()));
    assert_eq!(r.body, new, "the new bytes, under the new ETag");
    let r = range("/static/w.jpg");
    assert_eq!(r.status, 206);
    assert_eq!(r.header("etag"), Some(new_tag.as_str()));
    assert_eq!(r.body, &new[..10]);
}

/// Fill temp files under `cache.dir`, never in the system temp dir, even with the cache off;
/// and a fill nobody waits for (and the cache will not keep) stops instead of downloading
/// the rest.
#[test]
fn fills_stay_under_cache_dir_and_stop_when_every_client_left() {
    use std::io::{Read, Write};
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let proxy = FaultProxy::start(s3.port);
    let bytes = blob(17, 4 << 20);
    let mut env = uploaded(&s3, &[("slow.bin", &bytes)], &[]);
    env.set("FERRY_S3_ENDPOINT", &proxy.endpoint());
    env.set("FERRY_HTTP_MODE", "proxy");
    env.set("FERRY_CACHE_MAX_SIZE", "0");
    let tmp = t.path().join("systmp");
    std::fs::create_dir_all(&tmp).unwrap();
    env.set("TMPDIR", &tmp.to_string_lossy());
    // 64 chunks of 64 KiB at 100 ms each: the whole download takes over 6 s.
    proxy
        .down_delay_ms
        .store(100, std::sync::atomic::Ordering::SeqCst);
    let d = env.spawn(&["serve"]);
    let cache_dir = env.dir.path().join("cache");
    let fills = || -> Vec<std::path::PathBuf> {
        walk(&cache_dir)
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(".tmp-fill-"))
            .collect()
    };

    let mut c = std::net::TcpStream::connect(d.addr()).unwrap();
    c.write_all(b"GET /static/slow.bin HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut head = [0u8; 16];
    c.read_exact(&mut head).unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200"));
    assert_eq!(fills().len(), 1, "the fill's temp file is under cache.dir");
    assert!(walk(&tmp).is_empty(), "nothing in the system temp dir");

    // The only client leaves: the fill stops long before the download would have ended.
    drop(c);
    let left = Instant::now();
    wait_for(Duration::from_secs(3), "the abandoned fill to stop", || {
        fills().is_empty()
    });
    assert!(left.elapsed() < Duration::from_secs(3));
}

/// S3 hangs (no answer to a HEAD): a node answers from what S3 last said within
/// `http.metadata_grace`, after the HEAD's own 10 s bound, instead of hanging for the SDK's
/// timeouts or answering 503.
#[test]
fn a_hanging_s3_is_bounded_and_recent_metadata_still_answers() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let proxy = FaultProxy::start(s3.port);
    let bytes = blob(18, 3000);
    let _owner = uploaded(&s3, &[("seen.jpg", &bytes)], &[]);
    // Another node: no catalog row, so it learns the key from S3 (through the proxy).
    let mut env = Env::for_s3(&s3);
    env.set("FERRY_S3_ENDPOINT", &proxy.endpoint());
    env.set("FERRY_HTTP_METADATA_TTL", "1s");
    env.set("FERRY_HTTP_METADATA_GRACE", "1h");
    let d = env.spawn(&["serve"]);
    let r = get(d.addr(), "/static/seen.jpg");
    assert_eq!(r.status, 302);
    let location = r.header("location").map(str::to_string);

    // S3 stops answering (each reply held back 25 s); the metadata's TTL runs out.
    proxy
        .down_delay_ms
        .store(25_000, std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1500));
    let asked = Instant::now();
    let r = get(d.addr(), "/static/seen.jpg");
    let took = asked.elapsed();
    assert_eq!(r.status, 302, "the last known metadata answers");
    assert_eq!(r.header("location").map(str::to_string), location);
    assert!(
        took < Duration::from_secs(20),
        "bounded by the HEAD timeout, not the SDK's: {took:?}"
    );
}

/// Past `cache.fill_limit`, a proxied object streams straight from S3 with no temp file:
/// the bytes that fills hold on disk stay bounded.
#[test]
fn past_the_fill_limit_a_proxied_object_streams_without_a_temp_file() {
    use std::io::{Read, Write};
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let proxy = FaultProxy::start(s3.port);
    let bytes = blob(19, 2 << 20);
    let mut env = uploaded(&s3, &[("large.bin", &bytes)], &[]);
    env.set("FERRY_S3_ENDPOINT", &proxy.endpoint());
    env.set("FERRY_HTTP_MODE", "proxy");
    env.set("FERRY_CACHE_FILL_LIMIT", "1MiB");
    // Slow enough to look at the cache dir while the body is on its way.
    proxy
        .down_delay_ms
        .store(50, std::sync::atomic::Ordering::SeqCst);
    let d = env.spawn(&["serve"]);
    let cache_dir = env.dir.path().join("cache");
    let mut c = std::net::TcpStream::connect(d.addr()).unwrap();
    c.write_all(b"GET /static/large.bin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = [0u8; 16];
    c.read_exact(&mut head).unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200"));
    let temp: Vec<_> = walk(&cache_dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".tmp-fill-"))
        .collect();
    assert!(temp.is_empty(), "a 2 MiB fill past a 1 MiB limit: {temp:?}");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    let mut all = head.to_vec();
    all.extend_from_slice(&rest);
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head_text = String::from_utf8_lossy(&all[..split]).to_ascii_lowercase();
    assert!(head_text.contains("x-ferry-source: s3"), "{head_text}");
    let tag = format!("etag: \"{}\"", sha256_hex(&bytes));
    assert!(head_text.contains(&tag), "{head_text}");
    assert!(all[split..] == bytes[..], "the whole object, unchanged");
}

/// The object in S3 changed its bytes but not its length or metadata (bit rot, a PUT by
/// something else). A proxied or hot-filled answer can only check the SHA-256 at the end:
/// its last byte waits for that check, so wrong bytes never make a complete 200 under the
/// version's ETag (the body ends short of its Content-Length; no client or CDN keeps it).
#[test]
fn other_bytes_from_s3_never_make_a_complete_body_under_the_versions_etag() {
    // The object's bytes are changed in s3s-fs's own files; Garage keeps content-addressed
    // blocks that cannot be changed behind its back.
    if backend() != Backend::S3sFs {
        eprintln!("SKIPPED on Garage: the test changes an object's bytes in s3s-fs's files");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let good = blob(3, 200_000);
    let env = uploaded(
        &s3,
        &[("x.jpg", &good), ("h.jpg", &good), ("d.jpg", &good)],
        &[],
    );
    let mut bad = good.clone();
    bad[199_990] ^= 0xff; // near the end: only the final hash can tell
    for key in ["x.jpg", "h.jpg", "d.jpg"] {
        let f = walk(&s3.data)
            .into_iter()
            .find(|p| p.to_string_lossy().ends_with(&format!("/{key}")))
            .unwrap_or_else(|| panic!("no s3s-fs file for {key}"));
        std::fs::write(&f, &bad).unwrap();
    }
    let tag = format!("\"{}\"", sha256_hex(&good));
    // Proxied through a shared fetch, filled into the hot cache, and proxied straight from
    // S3 (past `cache.fill_limit`).
    for (mode, hot_hits, fill_limit, key) in [
        ("proxy", "1000", "1GiB", "x.jpg"),
        ("redirect", "1", "1GiB", "h.jpg"),
        ("proxy", "1000", "1KiB", "d.jpg"),
    ] {
        let mut env = Env {
            dir: tempfile::tempdir().unwrap(),
            vars: env.vars.clone(),
        };
        env.set("FERRY_HTTP_MODE", mode);
        env.set("FERRY_CACHE_HOT_HITS", hot_hits);
        env.set("FERRY_CACHE_FILL_LIMIT", fill_limit);
        let d = env.spawn(&["serve"]);
        let r = get(d.addr(), &format!("/static/{key}"));
        let cl: usize = r
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let complete = r.status == 200 && cl == r.body.len();
        assert!(
            !(complete && r.header("etag") == Some(tag.as_str())),
            "{mode}: a complete 200 of other bytes went out under the version's ETag"
        );
        assert_ne!(r.body, bad, "{mode}: the wrong bytes were delivered whole");
    }
}

/// With S3 down, the archive fallback serves a copy under the version's SHA-256 ETag only
/// if its bytes are that version: a copy of the same length with other bytes (an older
/// same-size version, bit rot) gets its own tag and `no-store`; the true copy keeps the ETag.
#[test]
fn the_archive_fallback_never_serves_other_bytes_under_the_versions_etag() {
    let t = tempfile::tempdir().unwrap();
    let mut s3 = S3::start(t.path());
    let good = blob(5, 50_000);
    let mut env = uploaded(&s3, &[("a.jpg", &good), ("b.jpg", &good)], &[]);
    env.set("FERRY_HTTP_MODE", "proxy");
    let mut other = good.clone();
    other[10] ^= 0xff;
    std::fs::write(env.archive().join("a.jpg"), &other).unwrap();
    s3.down();
    let d = env.spawn(&["serve"]);
    let tag = format!("\"{}\"", sha256_hex(&good));
    let r = get(d.addr(), "/static/a.jpg");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ferry-source"), Some("archive"));
    assert_ne!(
        r.header("etag"),
        Some(tag.as_str()),
        "other bytes under the version's ETag"
    );
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let r = get(d.addr(), "/static/b.jpg");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("etag"),
        Some(tag.as_str()),
        "the true copy keeps the ETag"
    );
    assert_eq!(r.body, good);
}

/// One version, one Last-Modified on every node: the node whose catalog knows the key and
/// a node that learns it from an S3 HEAD both send the file's own mtime (stored with the
/// object), so If-Range and If-Modified-Since by date work across nodes. The file keeps an
/// old mtime, as `cp -p` or `rsync -t` leave it.
#[test]
fn one_version_has_one_last_modified_on_every_node() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let bytes = blob(6, 10_000);
    let mut env = Env::for_s3(&s3);
    env.set("FERRY_HTTP_MODE", "proxy");
    env.drop_file("m.jpg", &bytes);
    let f = std::fs::File::options()
        .write(true)
        .open(env.spool().join("m.jpg"))
        .unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    drop(f);
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    let a = env.spawn(&["serve"]);
    let mut other = Env::for_s3(&s3);
    other.set("FERRY_HTTP_MODE", "proxy");
    let b = other.spawn(&["serve"]);
    let ra = get(a.addr(), "/static/m.jpg");
    let rb = get(b.addr(), "/static/m.jpg");
    assert_eq!(ra.header("etag"), rb.header("etag"), "one ETag");
    let lm = ra
        .header("last-modified")
        .expect("Last-Modified")
        .to_string();
    assert_eq!(rb.header("last-modified"), Some(lm.as_str()));
    let r = raw_request(
        b.addr(),
        "GET",
        b"/static/m.jpg",
        &[("Range", "bytes=0-9"), ("If-Range", &lm)],
    );
    assert_eq!(r.status, 206, "If-Range with the other node's date");
}

/// An archive file server that lies or stalls: `/wrong.jpg` sends other bytes of the right
/// length, `/stall.jpg` sends its head and half its body, then nothing.
const LYING_ARCHIVE_SERVER: &str = r#"
import http.server, os, sys, time
root = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        name = self.path.lstrip('/')
        data = open(os.path.join(root, name), 'rb').read()
        if name == 'wrong.jpg':
            data = bytes(b ^ 0xff for b in data)
        self.send_response(200)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if name == 'stall.jpg':
            self.wfile.write(data[:len(data) // 2]); self.wfile.flush()
            time.sleep(60)
        self.wfile.write(data)
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(('127.0.0.1', 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

#[test]
fn a_fallback_url_that_lies_or_stalls_never_passes_as_the_version() {
    let t = tempfile::tempdir().unwrap();
    let mut s3 = S3::start(t.path());
    let good = blob(21, 200_000);
    let wrong = blob(22, 200_000);
    let stall = blob(23, 200_000);
    let env = uploaded(
        &s3,
        &[
            ("good.jpg", &good),
            ("wrong.jpg", &wrong),
            ("stall.jpg", &stall),
        ],
        &[],
    );
    s3.down();
    let mut server = Command::new("python3")
        .args(["-u", "-c", LYING_ARCHIVE_SERVER])
        .arg(env.archive())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3");
    let mut port = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut port,
    )
    .unwrap();
    let port: u16 = port.trim().parse().expect("the server's port");
    let mut node = Env::for_s3(&s3);
    node.set("FERRY_HTTP_MODE", "proxy");
    node.set("FERRY_HTTP_UPSTREAM_STALL", "2s");
    node.set(
        "FERRY_HTTP_FALLBACK_URL",
        &format!("http://127.0.0.1:{port}/"),
    );
    // The uploading node's catalog: it knows each version's SHA-256.
    node.set(
        "FERRY_CATALOG_PATH",
        &env.dir.path().join("ferry.db").to_string_lossy(),
    );
    let d = node.spawn(&["serve"]);
    let r = get(d.addr(), "/static/good.jpg");
    assert_eq!(
        (r.status, r.header("x-ferry-source")),
        (200, Some("archive"))
    );
    assert!(r.body == good);

    let r = get(d.addr(), "/static/wrong.jpg");
    assert!(
        r.body.len() < wrong.len(),
        "other bytes under this version's ETag must end short of Content-Length, got {} of {}",
        r.body.len(),
        wrong.len()
    );
    d.wait_log("do not match", Duration::from_secs(5));

    let start = Instant::now();
    let r = get(d.addr(), "/static/stall.jpg");
    let took = start.elapsed();
    assert!(r.body.len() < stall.len());
    assert!(
        took < Duration::from_secs(10),
        "a stalled archive server is cut after http.upstream_stall (2 s), took {took:?}"
    );
    d.wait_log("stalled", Duration::from_secs(5));
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn a_stalled_s3_body_on_the_direct_proxy_path_is_cut_after_upstream_stall() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let proxy = FaultProxy::start(s3.port);
    let bytes = blob(24, 1 << 20);
    let mut env = uploaded(&s3, &[("s.bin", &bytes)], &[]);
    env.set("FERRY_S3_ENDPOINT", &proxy.endpoint());
    env.set("FERRY_HTTP_MODE", "proxy");
    env.set("FERRY_HTTP_UPSTREAM_STALL", "1s");
    // No fill slot: the object streams straight from S3 (the uncoalesced path).
    env.set("FERRY_CACHE_FILL_LIMIT", "1");
    let d = env.spawn(&["serve"]);
    // The head still arrives within the 10 s first-byte bound; each body chunk does not.
    proxy
        .down_delay_ms
        .store(4000, std::sync::atomic::Ordering::SeqCst);
    let start = Instant::now();
    let r = get(d.addr(), "/static/s.bin");
    let took = start.elapsed();
    assert!(r.body.len() < bytes.len(), "got {} bytes", r.body.len());
    assert!(
        took < Duration::from_secs(15),
        "the stalled body was cut, took {took:?}"
    );
    d.wait_log("stalled", Duration::from_secs(5));
}

/// A small hot object (held in memory after its first cache hit) answers HEAD,
/// ranges, 416, multi-range and every precondition exactly as a file hit does; and after a
/// new version is uploaded, no answer ever carries bytes other than its ETag's SHA-256.
#[test]
fn held_cache_entries_answer_every_plan_and_never_another_versions_bytes() {
    use sha2::{Digest, Sha256};
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let v1 = blob(7, 4000);
    let mut env = uploaded(&s3, &[("small.txt", &v1)], &[("FERRY_CACHE_HOT_HITS", "1")]);
    env.set("FERRY_CACHE_HOT_HITS", "1");
    let d = env.spawn(&["serve"]);
    let addr = d.addr();
    wait_for(Duration::from_secs(10), "cached", || {
        get(addr, "/static/small.txt").header("x-ferry-source") == Some("cache")
    });
    // Several hits: the first read holds it, the rest are held hits.
    let mut etag = String::new();
    for _ in 0..3 {
        let r = get(addr, "/static/small.txt");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-ferry-source"), Some("cache"));
        assert_eq!(r.body, v1);
        etag = r.header("etag").unwrap().to_string();
    }
    assert_eq!(etag, format!("\"{}\"", hex::encode(Sha256::digest(&v1))));
    let req = |m: &str, h: &[(&str, &str)]| raw_request(addr, m, b"/static/small.txt", h);
    let r = req("HEAD", &[]);
    assert_eq!((r.status, r.header("content-length")), (200, Some("4000")));
    assert!(r.body.is_empty());
    let r = req("GET", &[("Range", "bytes=10-19")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 10-19/4000"));
    assert_eq!(r.body, &v1[10..20]);
    let r = req("GET", &[("Range", "bytes=-5")]);
    assert_eq!((r.status, &r.body[..]), (206, &v1[3995..]));
    let r = req("GET", &[("Range", "bytes=4000-")]);
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */4000"));
    let r = req("GET", &[("Range", "bytes=0-0,3999-3999")]);
    assert_eq!(r.status, 206);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("multipart/byteranges"));
    let r = req("GET", &[("If-None-Match", &etag)]);
    assert_eq!(r.status, 304);
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    assert!(r.body.is_empty());
    let r = req("HEAD", &[("If-None-Match", &etag)]);
    assert_eq!(r.status, 304);
    let r = req("GET", &[("If-Match", "\"nope\"")]);
    assert_eq!(r.status, 412);
    let r = req("GET", &[("Range", "bytes=0-9"), ("If-Range", "\"nope\"")]);
    assert_eq!((r.status, r.body.len()), (200, 4000));
    let r = req("GET", &[("Range", "bytes=0-9"), ("If-Range", &etag)]);
    assert_eq!((r.status, &r.body[..]), (206, &v1[..10]));
    let r = req("HEAD", &[("Range", "bytes=0-9")]);
    assert_eq!((r.status, r.header("content-length")), (206, Some("10")));

    // A new version of the same size: every answer's bytes are its ETag's.
    let v2 = blob(8, 4000);
    env.drop_file("small.txt", &v2);
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    let until = Instant::now() + Duration::from_secs(15);
    let mut saw_v2 = false;
    while Instant::now() < until && !saw_v2 {
        let r = get(addr, "/static/small.txt");
        if r.status != 200 {
            continue;
        }
        let tag = r.header("etag").unwrap_or("").trim_matches('"').to_string();
        assert_eq!(
            tag,
            hex::encode(Sha256::digest(&r.body)),
            "bytes not the ETag's"
        );
        saw_v2 = r.body == v2;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(saw_v2, "the new version is served in time");
}
