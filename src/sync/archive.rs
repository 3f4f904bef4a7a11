//! Moving a verified file from the spool to the archive: rename or cross-device copy,
//! fsyncs, earlier versions kept under `.ferry-versions/`, empty spool folders removed.
//!
//! Runs on a blocking thread. Never deletes a file that has no verified copy elsewhere, and
//! never unlinks or replaces a newer file that took a name while we worked: every move that
//! could land on a name someone else may have taken is `renameat2(RENAME_NOREPLACE)`, and the
//! one unlink (the cross-device path) is of a reserved `.ferry-*` name whose inode was checked
//! there.
//!
//! A read lease is held from the final stat through the rename (DESIGN.md "Ready file"): a
//! writer that opens the file in between breaks it, and the file goes back to the spool.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::catalog::FileStat;
use crate::crashpoint;
use crate::key::Key;
use crate::sync::lease;

/// Where earlier archive copies of a re-dropped key go.
pub const VERSIONS_DIR: &str = ".ferry-versions";
/// Where bytes go that came back from the archive when a new file already held their
/// spool name: never counted as archived, listed in `ferry status`.
pub const UNVERIFIED_DIR: &str = ".ferry-unverified";
/// Prefix of the archive side's temp copies (removed at start-up by [`remove_stale_temps`]).
pub const TMP_PREFIX: &str = ".ferry-tmp.";
/// The longest file name Linux filesystems take.
const NAME_MAX: usize = 255;

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The file is at `archive/KEY` and gone from the spool.
    Archived,
    /// The spool file is not the verified one any more; it stays and is queued again.
    Changed,
    /// Someone has the file open for writing (lease refused or broken); it stays.
    Busy,
    /// The spool file is gone; if `archive/KEY` holds it, a crash interrupted a move.
    Missing,
    /// The bytes came back from the archive but a new file held their spool name: they are
    /// at this path under `archive/.ferry-unverified/`.
    PutAside(PathBuf),
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `rename` that never replaces what is at `to` (EEXIST instead). A filesystem without
/// RENAME_NOREPLACE (EINVAL) gets `link` + `unlink`, which never replaces either.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (f, t) = (cpath(from)?, cpath(to)?);
    // SAFETY: two NUL-terminated paths, alive for the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) {
        return Err(err);
    }
    fs::hard_link(from, to)?;
    fs::remove_file(from)
}

/// `name@stamp[-n]`, shortened so the whole name fits in 255 bytes and stays unique: a long
/// name keeps its head and gains a hash of the whole name.
fn stamped_name(name: &[u8], stamp: &str, n: u32) -> Vec<u8> {
    let suffix = if n == 0 {
        format!("@{stamp}")
    } else {
        format!("@{stamp}-{n}")
    };
    if name.len() + suffix.len() <= NAME_MAX {
        let mut v = name.to_vec();
        v.extend_from_slice(suffix.as_bytes());
        return v;
    }
    let digest = hex::encode(&Sha256::digest(name)[..8]);
    let keep = NAME_MAX - suffix.len() - digest.len() - 1;
    // Cut on a UTF-8 boundary so the name stays valid text.
    let mut cut = keep.min(name.len());
    while cut > 0 && (name[cut] & 0xC0) == 0x80 {
        cut -= 1;
    }
    let mut v = name[..cut].to_vec();
    v.push(b'~');
    v.extend_from_slice(digest.as_bytes());
    v.extend_from_slice(suffix.as_bytes());
    v
}

/// A free path `DIR/.../NAME@20261122T201304Z` for `key` under `archive/<dir>/`.
fn stamped_path(archive: &Path, dir: &str, key: &Key, at: SystemTime) -> PathBuf {
    let stamp = humantime::format_rfc3339_seconds(at)
        .to_string()
        .replace(['-', ':'], "");
    let base = key.path_in(&archive.join(dir));
    let parent = base.parent().map(Path::to_path_buf).unwrap_or_default();
    let name = base
        .file_name()
        .map(|n| n.as_bytes().to_vec())
        .unwrap_or_default();
    let mut n = 0;
    loop {
        let p = parent.join(std::ffi::OsStr::from_bytes(&stamped_name(&name, &stamp, n)));
        if p.symlink_metadata().is_err() {
            return p;
        }
        n += 1;
    }
}

/// Where `key`'s copy goes: `archive/KEY`, unless another key's copies hold part of that
/// path (a folder where this file should be: the key `a` after `a/b`; or a file where a
/// folder should be: `a/b` after `a`). Then it goes to a stamped name under
/// `.ferry-versions/`, so no key's copy is ever moved aside for another key's.
pub fn archive_path(archive: &Path, key: &Key) -> (PathBuf, bool) {
    let dst = key.path_in(archive);
    let mut blocked = dst.symlink_metadata().is_ok_and(|m| m.is_dir());
    let mut cur = dst.parent();
    while let Some(p) = cur {
        if blocked || p == archive || !p.starts_with(archive) {
            break;
        }
        if p.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
            blocked = true;
        }
        cur = p.parent();
    }
    if blocked {
        (
            stamped_path(archive, VERSIONS_DIR, key, SystemTime::now()),
            true,
        )
    } else {
        (dst, false)
    }
}

/// The archive copy of `key` with `size` bytes: `archive/KEY`, else (the name was taken by
/// another key's copies, see [`archive_path`]) the newest stamped copy of that size under
/// `.ferry-versions/`.
pub fn find_copy(archive: &Path, key: &Key, size: u64) -> Option<PathBuf> {
    let dst = key.path_in(archive);
    if dst.symlink_metadata().is_ok_and(|m| m.is_file()) {
        return Some(dst);
    }
    let base = key.path_in(&archive.join(VERSIONS_DIR));
    let (parent, name) = (base.parent()?, base.file_name()?.as_bytes());
    let digest = format!("~{}@", hex::encode(&Sha256::digest(name)[..8]));
    let mut found: Vec<PathBuf> = fs::read_dir(parent)
        .ok()?
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.as_bytes();
            (n.starts_with(name) && n.get(name.len()) == Some(&b'@'))
                || n.windows(digest.len()).any(|w| w == digest.as_bytes())
        })
        .filter(|e| e.metadata().is_ok_and(|m| m.is_file() && m.len() == size))
        .map(|e| e.path())
        .collect();
    // Stamps sort in time order.
    found.sort();
    found.pop()
}

/// Moves an existing `archive/KEY` file aside so the new version can take its place;
/// returns where it went. A folder there (the key was a folder of other keys' copies) is
/// left alone: it is not this key's earlier version.
fn keep_earlier_version(archive: &Path, key: &Key, dst: &Path) -> io::Result<Option<PathBuf>> {
    match dst.symlink_metadata() {
        Err(_) => return Ok(None),
        Ok(m) if m.is_dir() => {
            return Err(io::Error::other(format!(
                "{} is a folder of other keys' archive copies; the file {} cannot take its name",
                dst.display(),
                key.as_str()
            )))
        }
        Ok(_) => {}
    }
    let vpath = stamped_path(archive, VERSIONS_DIR, key, SystemTime::now());
    if let Some(parent) = vpath.parent() {
        fs::create_dir_all(parent)?;
    }
    rename_noreplace(dst, &vpath)?;
    if let Some(parent) = vpath.parent() {
        fsync_dir(parent)?;
    }
    Ok(Some(vpath))
}

/// Puts an earlier version back at `archive/KEY` after our move was undone.
fn restore_earlier_version(earlier: Option<PathBuf>, dst: &Path) {
    if let Some(v) = earlier {
        let _ = rename_noreplace(&v, dst);
    }
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

/// Hashes an archive copy (for `ferry verify --archive` and retention).
pub fn sha256_file(path: &Path) -> io::Result<String> {
    sha256_of(path)
}

#[cfg(test)]
type Hook = Option<Box<dyn Fn(&str)>>;

#[cfg(test)]
thread_local! {
    /// Runs at the named point between a check and its act (tests of the races).
    pub static HOOK: std::cell::RefCell<Hook> = const { std::cell::RefCell::new(None) };
}

#[inline]
fn hook(_point: &str) {
    #[cfg(test)]
    HOOK.with(|h| {
        if let Some(f) = h.borrow().as_ref() {
            f(_point)
        }
    });
}

fn same_version(a: &FileStat, b: &FileStat) -> bool {
    // Not ctime: a rename sets it.
    (a.size, a.mtime_ns, a.inode) == (b.size, b.mtime_ns, b.inode)
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
    let (dst, displaced) = archive_path(archive, key);
    let md = match src.symlink_metadata() {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Outcome::Missing),
        Err(e) => return Err(e),
    };
    if !md.file_type().is_file() || FileStat::of(&md) != expect {
        return Ok(Outcome::Changed);
    }
    let file = match lease::open_for_lease(&src) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Outcome::Missing),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(Outcome::Changed),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => return Ok(Outcome::Busy),
        Err(e) => return Err(e),
    };
    let lease = match lease::take(&file) {
        lease::Probe::Held(l) => Some(l),
        lease::Probe::Busy => return Ok(Outcome::Busy),
        // The watcher already made such a file wait the long quiet time.
        lease::Probe::Unavailable(_) => None,
    };
    let broken = |l: &Option<lease::Lease<'_>>| l.as_ref().is_some_and(|l| l.broken());
    // The final stat, under the lease: the descriptor and the name are still the verified
    // file.
    if file.metadata().map(|m| FileStat::of(&m)).ok() != Some(expect)
        || src.symlink_metadata().map(|m| FileStat::of(&m)).ok() != Some(expect)
    {
        return Ok(Outcome::Changed);
    }
    let dst_parent = dst.parent().unwrap_or(archive).to_path_buf();
    let src_parent = src.parent().unwrap_or(spool).to_path_buf();
    fs::create_dir_all(&dst_parent)?;
    // Already fsynced before the PUT; cheap now, and the archive copy must be durable.
    file.sync_all()?;
    let earlier = if displaced {
        tracing::warn!(key = %key, path = %dst.display(), "archive/KEY is taken by another key's copies (a file and a folder under one name); this copy is kept under .ferry-versions/");
        None
    } else {
        keep_earlier_version(archive, key, &dst)?
    };
    hook("before-rename");
    match rename_noreplace(&src, &dst) {
        Ok(()) => {}
        // Bind mounts (Docker volumes, `mount --bind`, systemd's ReadWritePaths=) refuse
        // a rename across mount points even on one device: copy instead.
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let out = cross_device(&file, &lease, &src, &dst, &dst_parent, expect, sha256_hex);
            return match out {
                Ok(Outcome::Archived) => {
                    drop(lease);
                    fsync_dir(&src_parent)?;
                    remove_empty_parents(spool, &src_parent, settle);
                    Ok(Outcome::Archived)
                }
                other => {
                    if !dst.exists() {
                        restore_earlier_version(earlier, &dst);
                    }
                    other
                }
            };
        }
        Err(e) => {
            restore_earlier_version(earlier, &dst);
            return Err(e);
        }
    }
    crashpoint::hit("renamed");
    // A writer may have opened the file while we moved it (its open waits on our lease),
    // or written through a descriptor older than the lease (unleased fallback): either
    // way the bytes go back to the spool and the file is queued again.
    let after = dst.symlink_metadata().map(|m| FileStat::of(&m)).ok();
    if broken(&lease) || after.is_none_or(|a| !same_version(&a, &expect)) {
        let back = put_back(archive, key, &dst, &src);
        restore_earlier_version(earlier, &dst);
        drop(lease);
        fsync_dir(&src_parent)?;
        fsync_dir(&dst_parent)?;
        return match back? {
            Some(aside) => Ok(Outcome::PutAside(aside)),
            None => Ok(Outcome::Changed),
        };
    }
    drop(lease);
    fsync_dir(&dst_parent)?;
    fsync_dir(&src_parent)?;
    crashpoint::hit("archive-fsync-dirs");
    remove_empty_parents(spool, &src_parent, settle);
    Ok(Outcome::Archived)
}

/// Moves `dst` back to `src` without replacing a file that took the name meanwhile; if one
/// did, the bytes go to `archive/.ferry-unverified/` instead (returned).
fn put_back(archive: &Path, key: &Key, dst: &Path, src: &Path) -> io::Result<Option<PathBuf>> {
    hook("before-put-back");
    match rename_noreplace(dst, src) {
        Ok(()) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            let aside = stamped_path(archive, UNVERIFIED_DIR, key, SystemTime::now());
            if let Some(parent) = aside.parent() {
                fs::create_dir_all(parent)?;
            }
            rename_noreplace(dst, &aside)?;
            if let Some(parent) = aside.parent() {
                fsync_dir(parent)?;
            }
            tracing::warn!(key = %key, path = %aside.display(), "a file changed while it was archived and a new one took its spool name; its bytes were put aside unverified");
            Ok(Some(aside))
        }
        Err(e) => Err(e),
    }
}

/// The cross-device path: copy from the leased descriptor to a temp name in the archive,
/// fsync, re-hash the copy, rename it in; then take the spool name to a reserved `.ferry-*`
/// name, check its inode there, and only then unlink it.
fn cross_device(
    file: &File,
    lease: &Option<lease::Lease<'_>>,
    src: &Path,
    dst: &Path,
    dst_parent: &Path,
    expect: FileStat,
    sha256_hex: &str,
) -> io::Result<Outcome> {
    let broken = || lease.as_ref().is_some_and(|l| l.broken());
    let tmp = dst_parent.join(format!(
        "{TMP_PREFIX}{}.{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let res = (|| -> io::Result<Outcome> {
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let mut buf = vec![0u8; (expect.size as usize).clamp(4096, 1 << 20)];
        let mut h = Sha256::new();
        let mut total = 0u64;
        loop {
            if broken() {
                return Ok(Outcome::Busy);
            }
            let n = std::os::unix::fs::FileExt::read_at(file, &mut buf, total)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            total += n as u64;
        }
        crashpoint::hit("archive-copy");
        out.flush()?;
        out.sync_all()?;
        drop(out);
        crashpoint::hit("archive-fsync-copy");
        if total != expect.size || hex::encode(h.finalize()) != sha256_hex {
            return Ok(Outcome::Changed);
        }
        // What landed on the other disk is what was verified.
        if sha256_of(&tmp)? != sha256_hex {
            return Ok(Outcome::Changed);
        }
        rename_noreplace(&tmp, dst)?;
        fsync_dir(dst_parent)?;
        Ok(Outcome::Archived)
    })();
    if !matches!(res, Ok(Outcome::Archived)) {
        let _ = fs::remove_file(&tmp);
        return res;
    }
    // The archive holds the verified bytes. The spool copy goes only if it is still the
    // file that was copied and nobody opened it for writing meanwhile.
    if broken() {
        return Ok(Outcome::Busy);
    }
    let src_parent = src.parent().unwrap_or(Path::new("/"));
    let reserved = src_parent.join(format!(
        ".ferry-unlink.{}.{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    hook("before-reserve");
    rename_noreplace(src, &reserved)?;
    let there = reserved.symlink_metadata().map(|m| FileStat::of(&m)).ok();
    if broken() || there.is_none_or(|t| !same_version(&t, &expect)) {
        // Not ours (a new file took the name) or being written: give the name back.
        if let Err(e) = rename_noreplace(&reserved, src) {
            tracing::warn!(path = %reserved.display(), error = %e, "cannot give a spool file its name back; left under the reserved name");
        }
        return Ok(Outcome::Changed);
    }
    hook("before-unlink");
    fs::remove_file(&reserved)?;
    Ok(Outcome::Archived)
}

/// Removes temp copies a crash left on the archive side (`.ferry-tmp.*` anywhere under the
/// archive). Never touches the spool. Returns how many went.
pub fn remove_stale_temps(archive: &Path) -> usize {
    let mut removed = 0;
    let mut dirs = vec![archive.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let name = e.file_name();
            if ft.is_dir() {
                dirs.push(e.path());
            } else if ft.is_file()
                && name.as_bytes().starts_with(TMP_PREFIX.as_bytes())
                && fs::remove_file(e.path()).is_ok()
            {
                removed += 1;
            }
        }
    }
    removed
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

    /// A 239-byte name archived twice: the earlier version's name gains a time stamp, is
    /// shortened to fit in 255 bytes, and stays unique.
    #[test]
    fn version_names_fit_the_name_limit() {
        let t = tempfile::tempdir().unwrap();
        let spool = t.path().join("spool");
        let arch = t.path().join("archive");
        fs::create_dir_all(&spool).unwrap();
        let name = format!("{}.jpg", "é".repeat(117) + "n");
        assert_eq!(name.len(), 239);
        let key = Key::new(&name, "").unwrap();
        let src = key.path_in(&spool);
        for (i, body) in [&b"one"[..], b"two", b"three"].iter().enumerate() {
            fs::write(&src, body).unwrap();
            let sha = sha256_of(&src).unwrap();
            let out = archive(&spool, &arch, &key, stat(&src), &sha, Duration::ZERO).unwrap();
            assert_eq!(out, Outcome::Archived, "version {i}");
        }
        assert_eq!(fs::read(key.path_in(&arch)).unwrap(), b"three");
        let mut versions: Vec<_> = fs::read_dir(arch.join(VERSIONS_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        versions.sort();
        assert_eq!(versions.len(), 2);
        let mut bodies: Vec<Vec<u8>> = versions.iter().map(|p| fs::read(p).unwrap()).collect();
        bodies.sort();
        assert_eq!(bodies, vec![b"one".to_vec(), b"two".to_vec()]);
        for v in &versions {
            let n = v.file_name().unwrap();
            assert!(n.len() <= 255, "{} bytes", n.len());
            assert!(n.to_str().is_some(), "still valid UTF-8");
        }
    }

    /// A new file that takes the spool name while a changed file is being put back is
    /// never replaced: the returned bytes go to `.ferry-unverified/`.
    #[test]
    fn putting_back_never_replaces_a_new_file() {
        let t = tempfile::tempdir().unwrap();
        let spool = t.path().join("spool");
        let arch = t.path().join("archive");
        fs::create_dir_all(&spool).unwrap();
        let key = Key::new("race.jpg", "").unwrap();
        let src = key.path_in(&spool);
        fs::write(&src, b"verified bytes").unwrap();
        let expect = stat(&src);
        let sha = sha256_of(&src).unwrap();
        let dst = key.path_in(&arch);
        let src2 = src.clone();
        HOOK.with(|h| {
            *h.borrow_mut() = Some(Box::new(move |point: &str| match point {
                // After the final check, before the rename: the file changes (its mtime
                // is set by path, as `touch` does; an open for writing would wait on our
                // own lease).
                "before-rename" => {
                    let p = CString::new(src2.as_os_str().as_bytes()).unwrap();
                    let times = [
                        libc::timespec {
                            tv_sec: 0,
                            tv_nsec: libc::UTIME_OMIT,
                        },
                        libc::timespec {
                            tv_sec: 1_000_000,
                            tv_nsec: 0,
                        },
                    ];
                    // SAFETY: a valid path and two timespecs.
                    let rc =
                        unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) };
                    assert_eq!(rc, 0);
                }
                // After the move, before the put-back: a new upload takes the name.
                "before-put-back" => fs::write(&src2, b"brand new upload").unwrap(),
                _ => {}
            }))
        });
        let out = archive(&spool, &arch, &key, expect, &sha, Duration::ZERO).unwrap();
        HOOK.with(|h| *h.borrow_mut() = None);
        let Outcome::PutAside(aside) = out else {
            panic!("expected the bytes put aside, got {out:?}");
        };
        assert_eq!(
            fs::read(&src).unwrap(),
            b"brand new upload",
            "the new file was replaced"
        );
        assert_eq!(fs::read(&aside).unwrap(), b"verified bytes");
        assert!(aside.starts_with(arch.join(UNVERIFIED_DIR)));
        assert!(!dst.exists(), "changed bytes must not count as archived");
    }

    /// The cross-device path unlinks only the file it copied: a new file that took the
    /// name between the copy and the unlink is left alone.
    #[test]
    fn cross_device_never_unlinks_a_new_file() {
        let Ok(shm) = tempfile::tempdir_in("/dev/shm") else {
            eprintln!("SKIPPED: no /dev/shm for a second filesystem");
            return;
        };
        let t = tempfile::tempdir().unwrap();
        if shm.path().metadata().unwrap().dev() == t.path().metadata().unwrap().dev() {
            eprintln!("SKIPPED: /dev/shm is the temp dir's filesystem");
            return;
        }
        let (spool, arch) = (t.path().to_path_buf(), shm.path().to_path_buf());
        let key = Key::new("swap.bin", "").unwrap();
        let src = key.path_in(&spool);
        fs::write(&src, b"the verified one").unwrap();
        let (expect, sha) = (stat(&src), sha256_of(&src).unwrap());
        let src2 = src.clone();
        HOOK.with(|h| {
            *h.borrow_mut() = Some(Box::new(move |point: &str| {
                if point == "before-reserve" {
                    // The application replaces the file by rename, as uploaders do.
                    let tmp = src2.with_extension("tmp");
                    fs::write(&tmp, b"a newer upload").unwrap();
                    fs::rename(&tmp, &src2).unwrap();
                }
            }))
        });
        let out = archive(&spool, &arch, &key, expect, &sha, Duration::ZERO).unwrap();
        HOOK.with(|h| *h.borrow_mut() = None);
        assert_eq!(out, Outcome::Changed);
        assert_eq!(
            fs::read(&src).unwrap(),
            b"a newer upload",
            "a new file was unlinked"
        );
        assert_eq!(fs::read(key.path_in(&arch)).unwrap(), b"the verified one");
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
