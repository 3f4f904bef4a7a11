//! Crash at every durable step, proven: a debug build of ferry aborts at the step that
//! `FERRY_DEBUG_CRASH_AT` names (src/crashpoint.rs); after each abort ferry is started again
//! and the file must end archived exactly once, with S3, the original and the archive copy
//! all the same bytes, nothing left in the spool, and at no moment an archive copy whose
//! bytes S3 does not hold. Covers a first drop, a re-dropped key (two versions) and the
//! cross-device archive path (an archive on /dev/shm, another filesystem).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn s3_sha(s3: &S3, key: &str) -> Option<(u64, String)> {
    rt().block_on(async { s3.store().await.read_back(key).await })
        .ok()
}

/// Drops a file the way uploaders finish one: written elsewhere, renamed in.
fn drop_by_rename(env: &Env, key: &str, bytes: &[u8]) {
    let tmp = env.dir.path().join("incoming.tmp");
    std::fs::write(&tmp, bytes).unwrap();
    let dst = env.spool().join(key);
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

fn wait_archived(env: &Env, d: &Daemon, n: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.count("archived") < n {
        assert!(
            Instant::now() < deadline,
            "{what}: not archived after restart; status {}\n{}",
            env.status(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// No archive copy without the same bytes in S3 (checked right after the crash). With a
/// re-dropped key, `archive/KEY` may still be the earlier version, verified when it went up
/// (an unversioned bucket keeps only the newest, so S3 may already hold the new one).
fn assert_archive_backed(s3: &S3, archive: &Path, key: &str, earlier: Option<&[u8]>, what: &str) {
    if let Ok(bytes) = std::fs::read(archive.join(key)) {
        if earlier == Some(&bytes[..]) {
            return;
        }
        assert_eq!(
            s3_sha(s3, key),
            Some((bytes.len() as u64, sha256_hex(&bytes))),
            "{what}: the archive copy of {key} is not what S3 holds"
        );
    }
}

/// Runs ferry with the crash armed until it aborts; false if the step was never reached
/// (the file was archived without passing it, e.g. `renamed` on the cross-device path).
fn crash_at(env: &mut Env, step: &str, what: &str) -> bool {
    env.set("FERRY_DEBUG_CRASH_AT", step);
    let mut d = env.spawn(&["sync"]);
    env.vars.remove("FERRY_DEBUG_CRASH_AT");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = d.child.try_wait().unwrap() {
            // The log threads may lag the exit a moment.
            std::thread::sleep(Duration::from_millis(200));
            assert!(
                d.log().contains(&format!("FERRY_DEBUG_CRASH_AT={step}")),
                "{what}: ferry exited ({status}) without reaching the crash point\n{}",
                d.log()
            );
            return true;
        }
        if env.count("archived") == 1 && env.spool_files().is_empty() {
            // Archived without passing this step on this path.
            d.terminate();
            return false;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: ferry neither crashed nor archived\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_case(s3: &S3, step: &str, cross_device: bool, redrop: bool) -> bool {
    let what = format!(
        "step {step}{}{}",
        if cross_device { ", cross-device" } else { "" },
        if redrop { ", re-dropped key" } else { "" }
    );
    let mut env = Env::for_s3(s3);
    let shm;
    if cross_device {
        shm = tempfile::tempdir_in("/dev/shm").unwrap();
        env.set("FERRY_ARCHIVE_DIR", &shm.path().display().to_string());
    }
    let archive = std::path::PathBuf::from(&env.vars["FERRY_ARCHIVE_DIR"]);
    let key = format!(
        "crash/{step}{}{}.jpg",
        if cross_device { "-x" } else { "" },
        if redrop { "-v2" } else { "" }
    );
    let first = content(&format!("{key} one"), 70_000);
    if redrop {
        drop_by_rename(&env, &key, &first);
        let d = env.spawn(&["sync"]);
        wait_archived(&env, &d, 1, &what);
        drop(d);
    }
    let bytes = content(&format!("{key} two"), 90_000);
    drop_by_rename(&env, &key, &bytes);
    if !crash_at(&mut env, step, &what) {
        eprintln!("{what}: not on this path");
        return false;
    }
    eprintln!("{what}: crashed there, repaired");
    assert_archive_backed(s3, &archive, &key, redrop.then_some(&first[..]), &what);
    let d = env.spawn(&["sync"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(env.spool_files().is_empty()
        && std::fs::read(archive.join(&key)).is_ok_and(|b| b == bytes)
        && env.count("archived") == 1)
    {
        assert!(
            Instant::now() < deadline,
            "{what}: not recovered; status {}\n{}",
            env.status(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        s3_sha(s3, &key),
        Some((bytes.len() as u64, sha256_hex(&bytes))),
        "{what}: S3 does not hold the original"
    );
    let st = env.status();
    assert_eq!(st["counts"]["archived"], 1, "{what}: {st}");
    assert_eq!(st["queue_depth"], 0, "{what}: {st}");
    if redrop {
        let versions = walk(&archive.join(".ferry-versions"));
        assert_eq!(versions.len(), 1, "{what}: {versions:?}");
        assert_eq!(std::fs::read(&versions[0]).unwrap(), first, "{what}");
    }
    // No temp copy left on the archive side.
    let temps: Vec<_> = walk(&archive)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".ferry-tmp."))
        })
        .collect();
    assert!(temps.is_empty(), "{what}: temp copies left: {temps:?}");
    true
}

#[test]
fn a_crash_at_every_durable_step_is_repaired() {
    if !cfg!(debug_assertions) {
        eprintln!("SKIPPED: crash points exist in debug builds only");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let cross = tempfile::tempdir_in("/dev/shm").is_ok_and(|shm| {
        use std::os::unix::fs::MetadataExt;
        shm.path().metadata().unwrap().dev() != t.path().metadata().unwrap().dev()
    });
    if !cross {
        eprintln!("SKIPPED (cross-device cases): /dev/shm is missing or not another filesystem");
    }
    for step in ferry::crashpoint::STEPS {
        let mut reached = run_case(&s3, step, false, false);
        reached |= run_case(&s3, step, false, true);
        if cross {
            reached |= run_case(&s3, step, true, false);
        }
        // A step no path reaches is a crash point that proves nothing.
        assert!(reached || !cross, "no case reached the crash point {step}");
    }
}

/// Runs ferry until it aborts at `crash` after pausing at `pause`; `during` runs inside the
/// pause (after the pause line appears in the log).
fn crash_with_pause(env: &mut Env, pause: &str, crash: &str, during: impl FnOnce()) -> Daemon {
    env.set("FERRY_DEBUG_PAUSE_AT", &format!("{pause}:1500"));
    env.set("FERRY_DEBUG_CRASH_AT", crash);
    let mut d = env.spawn(&["sync"]);
    env.vars.remove("FERRY_DEBUG_PAUSE_AT");
    env.vars.remove("FERRY_DEBUG_CRASH_AT");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.log().contains(&format!("FERRY_DEBUG_PAUSE_AT={pause}")) {
        assert!(
            Instant::now() < deadline,
            "never paused at {pause}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    during();
    while d.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "never crashed at {crash}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d
}

/// A writer whose open waits on ferry's archive lease when ferry dies right after the
/// rename: its open then completes on the archived inode and writes into it. The restart
/// must not call that copy archived: its bytes are not the verified ones, so it goes back to
/// the spool and is uploaded again; in the end S3 = archive = what the writer left.
#[test]
fn a_writer_waiting_on_the_lease_when_ferry_dies_is_not_lost() {
    if !cfg!(debug_assertions) {
        eprintln!("SKIPPED: crash points exist in debug builds only");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = Env::for_s3(&s3);
    let key = "waiting/writer.jpg";
    let mut bytes = content(key, 50_000);
    drop_by_rename(&env, key, &bytes);
    let ino = std::os::unix::fs::MetadataExt::ino(
        &std::fs::symlink_metadata(env.spool().join(key)).unwrap(),
    );
    // Where ferry holds the file, under its lease, while it pauses.
    let reserved = env.spool().join(format!("waiting/.ferry-move.{ino}"));
    let writer = std::sync::Mutex::new(None);
    let d = crash_with_pause(&mut env, "reserved", "renamed", || {
        // The lease is held: this open waits until ferry lets go (here: dies).
        *writer.lock().unwrap() = Some(std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&reserved)
                .unwrap();
            f.write_all(b"+ a late line").unwrap();
        }));
    });
    writer.into_inner().unwrap().unwrap().join().unwrap();
    drop(d);
    bytes.extend_from_slice(b"+ a late line");
    let d = env.spawn(&["sync"]);
    let archive = env.archive();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(env.count("archived") == 1
        && env.spool_files().is_empty()
        && std::fs::read(archive.join(key)).is_ok_and(|b| b == bytes))
    {
        assert!(
            Instant::now() < deadline,
            "not repaired; status {}\n{}",
            env.status(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        s3_sha(&s3, key),
        Some((bytes.len() as u64, sha256_hex(&bytes))),
        "S3 must hold what the writer left"
    );
}

/// The application replaces a file by rename while ferry is moving the old one, and ferry
/// dies right after its rename: only ferry's own (verified) inode may have reached the
/// archive, and the new file is uploaded as the next version.
#[test]
fn a_replace_by_rename_during_the_move_then_a_crash_keeps_both_versions() {
    if !cfg!(debug_assertions) {
        eprintln!("SKIPPED: crash points exist in debug builds only");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = Env::for_s3(&s3);
    let key = "swap/photo.jpg";
    let one = content("swap one", 40_000);
    let two = content("swap two", 45_000);
    drop_by_rename(&env, key, &one);
    let spool = env.spool();
    let tmpdir = env.dir.path().to_path_buf();
    let d = crash_with_pause(&mut env, "reserved", "renamed", || {
        let tmp = tmpdir.join("v2.tmp");
        std::fs::write(&tmp, &two).unwrap();
        std::fs::rename(&tmp, spool.join(key)).unwrap();
    });
    drop(d);
    let archive = env.archive();
    let d = env.spawn(&["sync"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(env.spool_files().is_empty()
        && std::fs::read(archive.join(key)).is_ok_and(|b| b == two)
        && env.count("archived") == 1)
    {
        assert!(
            Instant::now() < deadline,
            "not settled; status {}\n{}",
            env.status(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(s3_sha(&s3, key), Some((two.len() as u64, sha256_hex(&two))));
    let versions = walk(&archive.join(".ferry-versions"));
    assert_eq!(versions.len(), 1, "{versions:?}");
    assert_eq!(std::fs::read(&versions[0]).unwrap(), one);
    assert_eq!(env.count("vanished"), 0);
}

/// The application replaces the file by rename between ferry's final check and its rename
/// to the reserved name, and ferry dies right after that rename: the new file, carried to
/// ferry's reserved name, gets its spool name back at the restart and is uploaded; it is
/// never hidden, never called vanished or archived unseen.
#[test]
fn a_file_carried_to_a_reserved_name_by_a_crash_gets_its_name_back() {
    if !cfg!(debug_assertions) {
        eprintln!("SKIPPED: crash points exist in debug builds only");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let s3 = S3::start(t.path());
    let mut env = Env::for_s3(&s3);
    let key = "carried/photo.jpg";
    let one = content("carried one", 30_000);
    let two = content("carried two", 33_000);
    drop_by_rename(&env, key, &one);
    let spool = env.spool();
    let tmpdir = env.dir.path().to_path_buf();
    let d = crash_with_pause(&mut env, "final-stat", "reserved", || {
        let tmp = tmpdir.join("v2.tmp");
        std::fs::write(&tmp, &two).unwrap();
        std::fs::rename(&tmp, spool.join(key)).unwrap();
    });
    drop(d);
    let archive = env.archive();
    let d = env.spawn(&["sync"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(env.spool_files().is_empty()
        && std::fs::read(archive.join(key)).is_ok_and(|b| b == two)
        && env.count("archived") == 1)
    {
        assert!(
            Instant::now() < deadline,
            "the new file was not uploaded; spool {:?}; status {}\n{}",
            walk(&env.spool()),
            env.status(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(s3_sha(&s3, key), Some((two.len() as u64, sha256_hex(&two))));
    assert_eq!(env.count("vanished"), 0);
    let hidden: Vec<_> = walk(&env.spool())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".ferry-move."))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}
