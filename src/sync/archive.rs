//! Moving a verified file from the spool to the archive: rename or cross-device copy,
//! fsyncs, earlier versions kept under `.ferry-versions/`, empty spool folders removed.
//!
//! Runs on a blocking thread. Never deletes a file that has no verified copy elsewhere.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::catalog::FileStat;
use crate::key::Key;

/// Where earlier archive copies of a re-dropped key go.
pub const VERSIONS_DIR: &str = ".ferry-versions";

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The file is at `archive/KEY` and gone from the spool.
    Archived,
    /// The spool file is not the verified one any more; it stays and is queued again.
    Changed,
    /// The spool file is gone; if `archive/KEY` holds it, a crash interrupted a move.
    Missing,
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The archive path of an earlier version: `archive/.ferry-versions/KEY@20261122T201304Z`.
fn version_path(archive: &Path, key: &Key, at: SystemTime) -> PathBuf {
    let stamp = humantime::format_rfc3339_seconds(at)
        .to_string()
        .replace(['-', ':'], "");
    let base = key.path_in(&archive.join(VERSIONS_DIR));
    let mut name = base.clone().into_os_string();
    name.push(format!("@{stamp}"));
    let mut p = PathBuf::from(name);
    let mut n = 1;
    while p.symlink_metadata().is_ok() {
        let mut name = base.clone().into_os_string();
        name.push(format!("@{stamp}-{n}"));
        p = PathBuf::from(name);
        n += 1;
    }
    p
}

/// Moves an existing `archive/KEY` aside so the new version can take its place.
fn keep_earlier_version(archive: &Path, key: &Key, dst: &Path) -> io::Result<()> {
    if dst.symlink_metadata().is_err() {
        return Ok(());
    }
    let vpath = version_path(archive, key, SystemTime::now());
    if let Some(parent) = vpath.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::rename(dst, &vpath)?;
    if let Some(parent) = vpath.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

fn sha256_of(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Moves `spool/KEY` to `archive/KEY` if it is still the file whose bytes were verified
/// (`expect`, `sha256_hex`).
pub fn archive(
    spool: &Path,
    archive: &Path,
    key: &Key,
    expect: FileStat,
    sha256_hex: &str,
    settle: Duration,
) -> io::Result<Outcome> {
    let src = key.path_in(spool);
    let dst = key.path_in(archive);
    let md = match src.symlink_metadata() {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Outcome::Missing),
        Err(e) => return Err(e),
    };
    if !md.file_type().is_file() || FileStat::of(&md) != expect {
        return Ok(Outcome::Changed);
    }
    let dst_parent = dst.parent().unwrap_or(archive).to_path_buf();
    let src_parent = src.parent().unwrap_or(spool).to_path_buf();
    fs::create_dir_all(&dst_parent)?;
    // The application may never have fsynced what it wrote; the archive copy must be durable.
    File::open(&src)?.sync_all()?;
    let same_fs = fs::metadata(&dst_parent)?.dev() == md.dev();
    if same_fs {
        keep_earlier_version(archive, key, &dst)?;
        fs::rename(&src, &dst)?;
        fsync_dir(&dst_parent)?;
        fsync_dir(&src_parent)?;
        // A writer may have slipped in between the check and the rename: the inode is
        // the same, so look again (not at ctime: the rename itself sets it), and put a
        // changed file back where it was.
        let after = FileStat::of(&dst.symlink_metadata()?);
        if (after.size, after.mtime_ns, after.inode) != (expect.size, expect.mtime_ns, expect.inode)
        {
            if src.symlink_metadata().is_err() {
                fs::rename(&dst, &src)?;
                fsync_dir(&src_parent)?;
                fsync_dir(&dst_parent)?;
            }
            return Ok(Outcome::Changed);
        }
    } else {
        if !copy_across(&src, &dst, &dst_parent, expect, sha256_hex, archive, key)? {
            return Ok(Outcome::Changed);
        }
        // Only unlink the spool file if it is still the one that was copied.
        let now = src.symlink_metadata().map(|m| FileStat::of(&m)).ok();
        if now != Some(expect) {
            return Ok(Outcome::Changed);
        }
        fs::remove_file(&src)?;
        fsync_dir(&src_parent)?;
    }
    remove_empty_parents(spool, &src_parent, settle);
    Ok(Outcome::Archived)
}

/// Copies to a temp name in the archive, fsyncs, re-hashes the copy, then renames it in.
/// Returns false if the copy does not hash to the verified SHA-256 (the file changed).
fn copy_across(
    src: &Path,
    dst: &Path,
    dst_parent: &Path,
    expect: FileStat,
    sha256_hex: &str,
    archive: &Path,
    key: &Key,
) -> io::Result<bool> {
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dst_parent.join(format!(".ferry-tmp.{}.{}", std::process::id(), name));
    let res = (|| -> io::Result<bool> {
        let mut input = File::open(src)?;
        if FileStat::of(&input.metadata()?) != expect {
            return Ok(false);
        }
        let mut out = File::create(&tmp)?;
        io::copy(&mut input, &mut out)?;
        out.flush()?;
        out.sync_all()?;
        drop(out);
        if sha256_of(&tmp)? != sha256_hex {
            return Ok(false);
        }
        keep_earlier_version(archive, key, dst)?;
        fs::rename(&tmp, dst)?;
        fsync_dir(dst_parent)?;
        Ok(true)
    })();
    if !matches!(res, Ok(true)) {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Removes now-empty folders between `dir` and the spool root (never the root). Folders
/// touched within `settle` are left: an application may be about to write into them.
pub fn remove_empty_parents(spool: &Path, dir: &Path, settle: Duration) {
    let mut cur = dir.to_path_buf();
    while cur != spool && cur.starts_with(spool) {
        let fresh = cur
            .symlink_metadata()
            .ok()
            .and_then(|m| {
                let mtime = SystemTime::UNIX_EPOCH
                    + Duration::new(m.mtime().max(0) as u64, m.mtime_nsec().max(0) as u32);
                SystemTime::now().duration_since(mtime).ok()
            })
            .is_none_or(|age| age < settle);
        if fresh || fs::remove_dir(&cur).is_err() {
            return;
        }
        match cur.parent() {
            Some(p) => cur = p.to_path_buf(),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(p: &Path) -> FileStat {
        FileStat::of(&p.symlink_metadata().unwrap())
    }

    #[test]
    fn moves_and_keeps_earlier_versions() {
        let t = tempfile::tempdir().unwrap();
        let spool = t.path().join("spool");
        let arch = t.path().join("archive");
        fs::create_dir_all(spool.join("a/b")).unwrap();
        let key = Key::new("a/b/c.jpg", "").unwrap();
        let src = key.path_in(&spool);
        fs::write(&src, b"one").unwrap();
        let sha = sha256_of(&src).unwrap();
        let out = archive(&spool, &arch, &key, stat(&src), &sha, Duration::ZERO).unwrap();
        assert_eq!(out, Outcome::Archived);
        assert_eq!(fs::read(key.path_in(&arch)).unwrap(), b"one");
        assert!(!spool.join("a").exists(), "empty folders are removed");
        assert!(spool.exists(), "never the root");

        fs::create_dir_all(spool.join("a/b")).unwrap();
        fs::write(&src, b"two").unwrap();
        let sha = sha256_of(&src).unwrap();
        archive(&spool, &arch, &key, stat(&src), &sha, Duration::ZERO).unwrap();
        assert_eq!(fs::read(key.path_in(&arch)).unwrap(), b"two");
        let versions: Vec<_> = fs::read_dir(arch.join(VERSIONS_DIR).join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(versions.len(), 1);
        assert!(versions[0].starts_with("c.jpg@") && versions[0].ends_with('Z'));
        let vp = arch.join(VERSIONS_DIR).join("a/b").join(&versions[0]);
        assert_eq!(fs::read(vp).unwrap(), b"one");
    }

    #[test]
    fn a_changed_file_stays() {
        let t = tempfile::tempdir().unwrap();
        let spool = t.path().join("spool");
        let arch = t.path().join("archive");
        fs::create_dir_all(&spool).unwrap();
        let key = Key::new("x", "").unwrap();
        let src = key.path_in(&spool);
        fs::write(&src, b"one").unwrap();
        let before = stat(&src);
        std::thread::sleep(Duration::from_millis(20));
        fs::write(&src, b"one more").unwrap();
        let out = archive(&spool, &arch, &key, before, "x", Duration::ZERO).unwrap();
        assert_eq!(out, Outcome::Changed);
        assert!(src.exists());
        let out = archive(
            &spool,
            &arch,
            &Key::new("gone", "").unwrap(),
            before,
            "x",
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(out, Outcome::Missing);
    }

    #[test]
    fn cross_device_copy_rehashes() {
        // /dev/shm is usually another filesystem than the temp dir; skip quietly if not.
        let Ok(shm) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        let t = tempfile::tempdir().unwrap();
        if shm.path().metadata().unwrap().dev() == t.path().metadata().unwrap().dev() {
            return;
        }
        let spool = t.path().to_path_buf();
        let arch = shm.path().to_path_buf();
        let key = Key::new("f.bin", "").unwrap();
        let src = key.path_in(&spool);
        fs::write(&src, vec![7u8; 100_000]).unwrap();
        let sha = sha256_of(&src).unwrap();
        let out = archive(&spool, &arch, &key, stat(&src), &sha, Duration::ZERO).unwrap();
        assert_eq!(out, Outcome::Archived);
        assert!(!src.exists());
        assert_eq!(sha256_of(&key.path_in(&arch)).unwrap(), sha);
        // A wrong expected hash never unlinks the spool file.
        fs::write(&src, b"abc").unwrap();
        let out = archive(&spool, &arch, &key, stat(&src), "00", Duration::ZERO).unwrap();
        assert_eq!(out, Outcome::Changed);
        assert!(src.exists());
    }
}
