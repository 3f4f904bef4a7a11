//! Sync daemon end to end: the real `ferry` binary against a real local S3 server (s3s-fs).

mod common;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;

/// Asserts S3 holds exactly `bytes` under `key` (read back and hashed through the S3 API).
fn assert_in_s3(s3: &S3, key: &str, bytes: &[u8]) {
    let rt = rt();
    let (n, sha) = rt
        .block_on(async { s3.store().await.read_back(key).await })
        .unwrap_or_else(|e| panic!("{key} is not in S3: {e}"));
    assert_eq!(n, bytes.len() as u64, "size of {key} in S3");
    assert_eq!(sha, sha256_hex(bytes), "SHA-256 of {key} in S3");
}

fn wait_archived(env: &Env, n: u64, limit: Duration) {
    wait_for(limit, &format!("{n} archived"), || {
        env.count("archived") >= n
    });
}

#[test]
fn many_files_nested_with_spaces_and_unicode_all_verified_and_archived() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = Env::for_s3(&s3);
    let d = env.spawn(&["sync"]);
    let mut expected = Vec::new();
    for i in 0..200 {
        let key = match i % 4 {
            0 => format!("2026/11/photo {i}.jpg"),
            1 => format!("été/naïve-{i}.png"),
            2 => format!("a/b/c/d/{i}.bin"),
            _ => format!("top-{i}.txt"),
        };
        let bytes = content(&key, 100 + i * 37);
        env.drop_file(&key, &bytes);
        expected.push((key, bytes));
    }
    wait_archived(&env, 200, Duration::from_secs(120));
    for (key, bytes) in &expected {
        assert_in_s3(&s3, key, bytes);
        let archived = std::fs::read(env.archive().join(key)).unwrap();
        assert_eq!(&archived, bytes, "archive copy of {key}");
    }
    assert!(
        env.spool_files().is_empty(),
        "spool empty: {:?}",
        env.spool_files()
    );
    assert!(env.spool().exists(), "the spool root stays");
    // Every single PUT was proved by its own response echoing our SHA-256 (both servers
    // compute it); only a retried upload reads back (an earlier attempt may have left
    // other bytes).
    let log = d.log();
    let verified: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("uploaded and verified"))
        .collect();
    assert!(verified.len() >= 200, "{log}");
    for line in verified {
        if line.contains("by=read-back") {
            let key = line
                .split("key=")
                .nth(1)
                .and_then(|r| r.split(" size=").next())
                .unwrap_or_default();
            assert!(
                log.lines()
                    .any(|l| l.contains("will be retried") && l.contains(key)),
                "read back without a failed attempt: {line}"
            );
        } else {
            assert!(line.contains("by=put-sha256"), "{line}");
        }
    }
}

#[test]
fn large_file_goes_up_in_parts_and_is_verified() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = Env::for_s3(&s3);
    let bytes = content("big", 100 << 20);
    env.drop_file("big.bin", &bytes);
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    assert_in_s3(&s3, "big.bin", &bytes);
    // Garage gives the composite SHA-256 of the parts, as AWS does; s3s-fs gives no checksum
    // for a multipart object, so its multipart ETag (MD5 of the parts' MD5s) is the proof.
    let by = match s3.backend {
        Backend::Garage => "by=composite-sha256",
        Backend::S3sFs => "by=etag-md5",
    };
    assert!(err.contains(by), "verified {by}: {err}");
    // Multipart: the ETag has the "-N" parts suffix (100 MiB / 16 MiB = 7 parts).
    let rt = rt();
    let head = rt.block_on(async { s3.store().await.head("big.bin").await.unwrap() });
    assert!(
        head.etag.unwrap_or_default().ends_with("-7\""),
        "multipart upload"
    );
    assert_eq!(std::fs::read(env.archive().join("big.bin")).unwrap(), bytes);
}

#[test]
fn slow_writer_sftp_and_rsync_drops_are_uploaded_once_complete() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = Env::for_s3(&s3);
    let d = env.spawn(&["sync"]);

    // A writer that keeps the file open for 3 s, writing in pieces.
    let slow = content("slow", 300_000);
    let spool = env.spool();
    let slow2 = slow.clone();
    let writer = std::thread::spawn(move || {
        let mut f = std::fs::File::create(spool.join("slow.jpg")).unwrap();
        for chunk in slow2.chunks(25_000) {
            f.write_all(chunk).unwrap();
            f.flush().unwrap();
            std::thread::sleep(Duration::from_millis(250));
        }
    });

    // sftp-style: temp name, hard link to the final name, unlink the temp.
    let sftp = content("sftp", 50_000);
    std::fs::write(env.spool().join("upload.tmp"), &sftp).unwrap();
    std::fs::hard_link(env.spool().join("upload.tmp"), env.spool().join("sftp.jpg")).unwrap();
    std::fs::remove_file(env.spool().join("upload.tmp")).unwrap();

    // rsync-style: a hidden temp name, then rename.
    let rsync = content("rsync", 80_000);
    std::fs::write(env.spool().join(".rsync.jpg.Ab12Cd"), &rsync).unwrap();
    std::fs::rename(
        env.spool().join(".rsync.jpg.Ab12Cd"),
        env.spool().join("rsync.jpg"),
    )
    .unwrap();

    writer.join().unwrap();
    wait_archived(&env, 3, Duration::from_secs(60));
    assert_in_s3(&s3, "slow.jpg", &slow);
    assert_in_s3(&s3, "sftp.jpg", &sftp);
    assert_in_s3(&s3, "rsync.jpg", &rsync);
    // No temp name reached S3, and each final file went up exactly once.
    let rt = rt();
    let mut keys: Vec<String> = rt
        .block_on(async { s3.store().await.list_all().await.unwrap() })
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    keys.sort();
    assert_eq!(keys, vec!["rsync.jpg", "sftp.jpg", "slow.jpg"]);
    let log = d.log();
    assert_eq!(
        log.matches("uploaded and verified key=slow.jpg").count(),
        1,
        "{log}"
    );
}

#[test]
fn s3_down_at_start_files_wait_then_go_up() {
    let t = tempfile::tempdir().unwrap();
    let mut s3 = S3::start(t.path());
    s3.down();
    let env = Env::for_s3(&s3);
    let _d = env.spawn(&["sync"]);
    let a = content("a", 1000);
    env.drop_file("a.jpg", &a);
    wait_for(Duration::from_secs(30), "an error in status", || {
        env.status()["errors"]
            .as_array()
            .is_some_and(|e| !e.is_empty())
    });
    let st = env.status();
    let err = st["errors"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        err.contains("connection") || err.contains("timed out"),
        "{err}"
    );
    assert_eq!(env.spool_files().len(), 1, "file waits in the spool");
    s3.up();
    wait_archived(&env, 1, Duration::from_secs(60));
    assert_in_s3(&s3, "a.jpg", &a);
}

#[test]
fn kill_9_during_uploads_loses_nothing() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let proxy = FaultProxy::start(s3.port);
    let mut env = Env::for_s3(&s3);
    env.set("FERRY_S3_ENDPOINT", &proxy.endpoint());
    // Slow the link so the kill lands mid-upload.
    proxy.delay_ms.store(5, Ordering::SeqCst);
    let mut files = Vec::new();
    for i in 0..40 {
        let key = format!("k/{i}.jpg");
        let bytes = content(&key, 200_000 + i * 1000);
        env.drop_file(&key, &bytes);
        files.push((key, bytes));
    }
    let mut d = env.spawn(&["sync"]);
    wait_for(Duration::from_secs(60), "uploads in flight", || {
        env.count("uploading") > 0 || env.count("archived") > 0
    });
    std::thread::sleep(Duration::from_millis(300));
    d.kill9();
    // Whatever the catalog says is archived must be in S3 with the right bytes; everything
    // else is still in the spool, whole: at its name, or (killed inside the archive move)
    // at the reserved name beside it that the move takes first (`.ferry-move.<inode>`).
    for (key, bytes) in &files {
        if env.archive().join(key).exists() {
            assert_in_s3(&s3, key, bytes);
        } else {
            let at_name = env.spool().join(key);
            let dir = at_name.parent().unwrap().to_path_buf();
            let reserved = std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(".ferry-move."))
                .any(|e| std::fs::read(e.path()).is_ok_and(|b| &b == bytes));
            assert!(
                std::fs::read(&at_name).is_ok_and(|b| &b == bytes) || reserved,
                "{key} is whole neither in the spool (at its name or reserved) nor in the archive"
            );
        }
    }
    proxy.delay_ms.store(0, Ordering::SeqCst);
    let _d2 = env.spawn(&["sync"]);
    wait_archived(&env, files.len() as u64, Duration::from_secs(120));
    for (key, bytes) in &files {
        assert_in_s3(&s3, key, bytes);
        assert_eq!(&std::fs::read(env.archive().join(key)).unwrap(), bytes);
    }
}

#[test]
fn wrong_secret_key_archives_nothing_and_says_why() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = Env::for_s3(&s3);
    env.set("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let a = content("w", 5000);
    env.drop_file("w.jpg", &a);
    let (code, _, err) = env.run(&["sync", "--once", "--timeout", "20s"]);
    assert_ne!(code, 0, "a permanent error fails --once");
    assert!(
        err.contains("SignatureDoesNotMatch") || err.contains("AccessDenied"),
        "{err}"
    );
    assert_eq!(env.count("failed"), 1);
    assert_eq!(env.count("archived"), 0);
    let st = env.status();
    let msg = st["errors"][0]["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("SignatureDoesNotMatch") || msg.contains("AccessDenied"),
        "{msg}"
    );
    let (_, human, _) = env.run(&["status"]);
    assert!(human.contains("w.jpg"), "{human}");
    assert!(env.spool().join("w.jpg").exists());

    env.set("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    // The failed row waits for the max interval (2 s here), then goes through.
    let (code, _, err) = env.run(&["sync", "--once", "--timeout", "60s"]);
    assert_eq!(code, 0, "{err}");
    assert_in_s3(&s3, "w.jpg", &a);
}

#[test]
fn corrupted_put_is_never_archived_with_wrong_bytes() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let proxy = FaultProxy::start(s3.port);
    proxy.corrupt_left.store(2, Ordering::SeqCst);
    let mut env = Env::for_s3(&s3);
    env.set("FERRY_S3_ENDPOINT", &proxy.endpoint());
    let a = content("c", 40_000);
    env.drop_file("c.jpg", &a);
    let (code, _, err) = env.run(&["sync", "--once", "--timeout", "60s"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        proxy.corrupted.load(Ordering::SeqCst),
        2,
        "the proxy flipped bytes twice"
    );
    // s3s-fs stored the rejected bodies; what is there at the end must be right.
    assert_in_s3(&s3, "c.jpg", &a);
    assert_eq!(s3.object_bytes("c.jpg"), a);
    assert_eq!(std::fs::read(env.archive().join("c.jpg")).unwrap(), a);
}

#[test]
fn read_back_mode_verifies_by_reading_the_object() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = Env::for_s3(&s3);
    env.set("FERRY_S3_VERIFY", "read-back");
    let a = content("rb", 10_000);
    env.drop_file("rb.jpg", &a);
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    assert_in_s3(&s3, "rb.jpg", &a);
}

#[test]
fn small_then_large_same_key_both_versions_archived() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = Env::for_s3(&s3);
    env.set("FERRY_S3_MULTIPART_THRESHOLD", "6MiB");
    env.set("FERRY_S3_PART_SIZE", "5MiB");
    let small = content("v1", 1000);
    env.drop_file("same.jpg", &small);
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    let large = content("v2", 12 << 20);
    env.drop_file("same.jpg", &large);
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    assert_in_s3(&s3, "same.jpg", &large);
    assert_eq!(
        std::fs::read(env.archive().join("same.jpg")).unwrap(),
        large
    );
    let versions = walk(&env.archive().join(".ferry-versions"));
    assert_eq!(versions.len(), 1, "{versions:?}");
    assert_eq!(std::fs::read(&versions[0]).unwrap(), small);
    let name = versions[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with("same.jpg@") && name.ends_with('Z'),
        "{name}"
    );
}

#[test]
fn empty_file_is_uploaded_verified_and_archived() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = Env::for_s3(&s3);
    env.drop_file("empty.txt", b"");
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    assert_in_s3(&s3, "empty.txt", b"");
    assert!(env.archive().join("empty.txt").exists());
}

#[test]
fn file_modified_during_upload_ends_with_new_content() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let proxy = FaultProxy::start(s3.port);
    proxy.delay_ms.store(20, Ordering::SeqCst);
    let mut env = Env::for_s3(&s3);
    env.set("FERRY_S3_ENDPOINT", &proxy.endpoint());
    let first = content("m1", 3 << 20);
    env.drop_file("m.jpg", &first);
    let d = env.spawn(&["sync"]);
    wait_for(Duration::from_secs(30), "the upload to start", || {
        env.count("uploading") == 1
    });
    // Rewrite in place while the slow PUT is on the wire.
    let second = content("m2", 3 << 20);
    env.drop_file("m.jpg", &second);
    proxy.delay_ms.store(0, Ordering::SeqCst);
    wait_for(Duration::from_secs(60), "m.jpg archived", || {
        env.archive().join("m.jpg").exists() && env.count("archived") == 1
    });
    drop(d);
    assert_in_s3(&s3, "m.jpg", &second);
    assert_eq!(std::fs::read(env.archive().join("m.jpg")).unwrap(), second);
}

#[test]
fn same_key_dropped_twice_keeps_both_versions() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = Env::for_s3(&s3);
    let _d = env.spawn(&["sync"]);
    let one = content("one", 3000);
    env.drop_file("twice.jpg", &one);
    wait_archived(&env, 1, Duration::from_secs(30));
    let two = content("two", 4000);
    env.drop_file("twice.jpg", &two);
    wait_for(Duration::from_secs(30), "second version archived", || {
        std::fs::read(env.archive().join("twice.jpg"))
            .ok()
            .as_deref()
            == Some(&two[..])
            && env.count("archived") == 1
    });
    assert_in_s3(&s3, "twice.jpg", &two);
    let versions = walk(&env.archive().join(".ferry-versions"));
    assert_eq!(versions.len(), 1);
    assert_eq!(std::fs::read(&versions[0]).unwrap(), one);
}

#[test]
fn symlink_in_spool_is_never_uploaded() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = Env::for_s3(&s3);
    let secret = t.path().join("secret.txt");
    std::fs::write(&secret, b"outside the spool").unwrap();
    std::os::unix::fs::symlink(&secret, env.spool().join("link.jpg")).unwrap();
    env.drop_file("real.jpg", b"real");
    let d = env.spawn(&["sync"]);
    wait_archived(&env, 1, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(800));
    let rt = rt();
    let keys: Vec<String> = rt
        .block_on(async { s3.store().await.list_all().await.unwrap() })
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec!["real.jpg"]);
    assert!(
        env.spool().join("link.jpg").symlink_metadata().is_ok(),
        "left in place"
    );
    d.wait_log("link.jpg", Duration::from_secs(5));
}

#[test]
fn invalid_names_are_refused_and_shown_in_status() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = Env::for_s3(&s3);
    env.drop_file("bad\\name.jpg", b"x");
    env.drop_file("fine.jpg", b"y");
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    let st = env.status();
    let refused = st["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 1);
    assert!(refused[0]["reason"].as_str().unwrap().contains("backslash"));
    assert!(env.spool().join("bad\\name.jpg").exists());
}

#[test]
fn status_and_check_config_report_plainly() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = Env::for_s3(&s3);
    let (code, out, err) = env.run(&["check-config", "--write-probe"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("write probe"), "{out}");
    let mut bad = Env::for_s3(&s3);
    bad.set("FERRY_S3_BUCKET", "no-such-bucket");
    let (code, out, _) = bad.run(&["check-config"]);
    assert_ne!(code, 0);
    assert!(out.contains("FAILED"), "{out}");
    let mut badcfg = Env::for_s3(&s3);
    badcfg.set("FERRY_S3_PART_SIZE", "1KiB");
    let (code, _, err) = badcfg.run(&["status"]);
    assert_ne!(code, 0);
    assert!(err.contains("s3.part_size"), "{err}");
}

#[test]
fn sigterm_leaves_rows_consistent() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = Env::for_s3(&s3);
    let mut d = env.spawn(&["sync"]);
    for i in 0..20 {
        env.drop_file(&format!("t{i}.jpg"), &content(&format!("t{i}"), 20_000));
    }
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(d.terminate(), Some(0), "{}", d.log());
    assert_eq!(env.count("uploading"), 0, "no row left mid-upload");
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(env.count("archived"), 20);
}

#[test]
fn archive_retain_deletes_only_copies_that_s3_still_confirms() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = Env::for_s3(&s3);
    let keep = content("keep", 5000);
    let drop_me = content("drop", 6000);
    env.drop_file("keep.jpg", &keep);
    env.drop_file("old/drop.jpg", &drop_me);
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    // S3's copy of keep.jpg no longer matches: its archive copy must stay.
    let rt = rt();
    rt.block_on(async {
        s3.store()
            .await
            .put_bytes("keep.jpg", b"something else".to_vec(), &[])
            .await
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(1200));
    env.set("FERRY_ARCHIVE_RETAIN", "1s");
    let d = env.spawn(&["sync"]);
    // The copy goes, and the folder it leaves empty goes right after it.
    wait_for(
        Duration::from_secs(20),
        "the old copy and its emptied folder to go",
        || !env.archive().join("old/drop.jpg").exists() && !env.archive().join("old").exists(),
    );
    assert_in_s3(&s3, "old/drop.jpg", &drop_me);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(std::fs::read(env.archive().join("keep.jpg")).unwrap(), keep);
    d.wait_log("kept past archive.retain", Duration::from_secs(5));
}

#[test]
fn relative_spool_dir_from_the_embedded_defaults_is_watched() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = Env::for_s3(&s3);
    // The embedded defaults are relative (var/spool ...): events must still match.
    env.set("FERRY_SPOOL_DIR", "spool");
    env.set("FERRY_ARCHIVE_DIR", "archive");
    env.set("FERRY_CATALOG_PATH", "ferry.db");
    // A long rescan interval: only inotify events can find the file in time.
    env.set("FERRY_SPOOL_RESCAN_INTERVAL", "1h");
    let _d = env.spawn(&["sync"]);
    std::thread::sleep(Duration::from_millis(800));
    let bytes = content("rel", 4000);
    env.drop_file("new.jpg", &bytes);
    wait_archived(&env, 1, Duration::from_secs(15));
    assert_in_s3(&s3, "new.jpg", &bytes);
}

#[test]
fn unfinished_multipart_uploads_are_aborted_at_start_up() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let env = Env::for_s3(&s3);
    env.drop_file("m.bin", b"known to the catalog");
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    // As if a ferry had been killed after CreateMultipartUpload recorded its upload id.
    let rt = rt();
    let store = rt.block_on(s3.store());
    let meta = ferry::store::PutMeta {
        content_type: "application/octet-stream".into(),
        sha256_hex: sha256_hex(b"x"),
        mtime: "0".into(),
    };
    let id = rt.block_on(store.create_multipart("m.bin", &meta)).unwrap();
    let db = rusqlite::Connection::open(env.dir.path().join("ferry.db")).unwrap();
    db.execute("UPDATE files SET upload_id = ?1 WHERE key = 'm.bin'", [&id])
        .unwrap();
    drop(db);
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("aborted an unfinished multipart upload"),
        "{err}"
    );
    // Gone on the server: aborting it again is refused.
    assert!(rt.block_on(store.abort_multipart("m.bin", &id)).is_err());
    let db = rusqlite::Connection::open(env.dir.path().join("ferry.db")).unwrap();
    let left: Option<String> = db
        .query_row("SELECT upload_id FROM files WHERE key = 'm.bin'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(left, None, "the catalog forgets it");
}

/// The `by=` of each "uploaded and verified" line in a log.
fn verified_by(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("uploaded and verified"))
        .filter_map(|l| l.split(" by=").nth(1))
        .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn a_single_put_is_proven_by_its_own_response_without_a_head() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let proxy = FaultProxy::start(s3.port);
    let mut env = Env::for_s3(&s3);
    env.set("FERRY_S3_ENDPOINT", &proxy.endpoint());
    let files: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| (format!("p/{i}.jpg"), content(&format!("p{i}"), 30_000 + i)))
        .collect();
    for (k, b) in &files {
        env.drop_file(k, b);
    }
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    let by = verified_by(&err);
    eprintln!("this server's PUT proofs: {by:?}");
    assert_eq!(by.len(), 5, "{err}");
    assert!(
        by.iter().all(|b| b == "put-sha256" || b == "put-md5"),
        "every file proven by its PUT's response: {by:?}"
    );
    assert_eq!(
        proxy.count("HEAD", "/p/"),
        0,
        "no verifying HEAD: {:?}",
        proxy.requests.lock().unwrap()
    );
    for (k, b) in &files {
        assert_in_s3(&s3, k, b);
    }

    // s3.verify = "head" skips the PUT's response.
    env.set("FERRY_S3_VERIFY", "head");
    env.drop_file("h.jpg", &content("h", 20_000));
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    let by = verified_by(&err);
    assert!(
        by.len() == 1 && !by[0].starts_with("put-"),
        "verify = head asks with a HEAD: {by:?}"
    );
    assert_eq!(proxy.count("HEAD", "/h.jpg"), 1);
}

#[test]
fn a_put_response_whose_etag_is_not_our_md5_is_no_proof_and_the_object_is_read_back() {
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let proxy = FaultProxy::start(s3.port);
    let mut env = Env::for_s3(&s3);
    env.set("FERRY_S3_ENDPOINT", &proxy.endpoint());
    let a = content("lie", 40_000);
    env.drop_file("lie.jpg", &a);
    // The first response with an ETag is the PUT's.
    proxy.etag_lies_left.store(1, Ordering::SeqCst);
    let (code, _, err) = env.run(&["sync", "--once"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        proxy.etag_lies_left.load(Ordering::SeqCst),
        0,
        "the lie was told"
    );
    assert!(err.contains("contradicts our bytes"), "{err}");
    assert_eq!(verified_by(&err), vec!["read-back".to_string()], "{err}");
    assert_eq!(proxy.count("GET", "/lie.jpg"), 1, "read back once");
    assert_in_s3(&s3, "lie.jpg", &a);
    assert_eq!(std::fs::read(env.archive().join("lie.jpg")).unwrap(), a);
}
