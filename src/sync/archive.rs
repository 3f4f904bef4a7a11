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
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::catalog::FileStat;
use crate::crashpoint;
use crate::key::Key;
use crate::lease;

/// Where earlier archive copies of a re-dropped key go.
pub const VERSIONS_DIR: &str = ".ferry-versions";
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
    /// The bytes came back but a new file held their spool name: they are at this conflict
    /// name beside it, still in the spool.
    PutAside(PathBuf),
}

/// Concurrent moves in one directory share an fsync (see `sync::dirsync`).
fn fsync_dir(dir: &Path) -> io::Result<()> {
    crate::sync::dirsync::sync(dir)
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
    Ok(crate::digest::sha256_path(path)?.1)
}

/// Hashes an archive copy (for `ferry verify --archive` and retention).
pub fn sha256_file(path: &Path) -> io::Result<String> {
    sha256_of(path)
}

/// Hashes the file at `path` through one descriptor: (SHA-256, inode), so what is removed
/// later can be checked to be what was hashed.
pub fn sha256_with_inode(path: &Path) -> io::Result<(String, u64)> {
    let f = lease::open_for_lease(path)?;
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let sha = sha256_fd(&f, m.len(), &|| false)?.unwrap_or_default();
    Ok((sha, m.ino()))
}

/// Removes `path` only if it is still the inode `ino`: the name goes to a reserved name
/// first and is checked there (a newer copy archived under the same name meanwhile is put
/// back, never removed). Returns whether it was removed.
pub fn remove_if_same(path: &Path, ino: u64) -> io::Result<bool> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let reserved = parent.join(format!(".ferry-prune.{:016x}", rand::random::<u64>()));
    rename_noreplace(path, &reserved)?;
    if reserved.symlink_metadata()?.ino() == ino {
        fs::remove_file(&reserved)?;
        fsync_dir(parent)?;
        return Ok(true);
    }
    if let Err(e) = rename_noreplace(&reserved, path) {
        tracing::warn!(path = %reserved.display(), error = %e, "cannot give an archive copy its name back; left under the reserved name");
    }
    Ok(false)
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

/// The reserved spool name a file takes on its way to the archive: in its own folder (no
/// mount point between), named after its inode, so a restart finds it again.
pub fn reserved_name(src: &Path, inode: u64) -> PathBuf {
    src.parent()
        .unwrap_or(Path::new("/"))
        .join(format!("{MOVE_PREFIX}{inode}"))
}

/// Prefix of the reserved spool names of files being archived (see [`reserved_name`]).
pub const MOVE_PREFIX: &str = ".ferry-move.";

/// Hashes an open file from its start, giving up as soon as `stop` says so.
fn sha256_fd(file: &File, size: u64, stop: &dyn Fn() -> bool) -> io::Result<Option<String>> {
    Ok(crate::digest::sha256_fd(file, size, stop)?.map(|(_, sha)| sha))
}

/// Whether the stat cannot be trusted to show an in-place rewrite: whole-second timestamps
/// (ext3-style inodes, HFS+, some NFS and FUSE mounts) or a small file (cheap to re-read,
/// and a rewrite within one clock tick keeps its mtime).
fn rehash_needed(st: &FileStat) -> bool {
    const SMALL: u64 = 8 << 20;
    st.size <= SMALL || (st.mtime_ns % 1_000_000_000 == 0 && st.ctime_ns % 1_000_000_000 == 0)
}

/// Where the file to archive is now: at its spool name, or (a crash or an earlier attempt
/// stopped mid-move) at its reserved name; or a finished move found in the archive.
enum Found {
    AtName,
    Reserved,
    InArchive,
    Missing,
    Changed,
}

fn locate(
    src: &Path,
    reserved: &Path,
    (archive, key): (&Path, &Key),
    expect: FileStat,
    sha256_hex: &str,
) -> io::Result<Found> {
    let natural = key.path_in(archive);
    let dst = natural.as_path();
    match src.symlink_metadata() {
        Ok(md) if md.file_type().is_file() && same_version(&FileStat::of(&md), &expect) => {
            return Ok(Found::AtName)
        }
        Ok(md) if md.ino() == expect.inode => return Ok(Found::Changed),
        Ok(_) | Err(_) => {}
    }
    match reserved.symlink_metadata() {
        Ok(m) if m.is_file() && m.ino() == expect.inode => return Ok(Found::Reserved),
        // Someone else's file, carried to our reserved name: it goes back (Changed).
        Ok(_) => return Ok(Found::Changed),
        Err(_) => {}
    }
    // A move that finished before a crash: the archive holds our inode (same filesystem)
    // or a copy; either way only its bytes decide.
    if let Ok(m) = dst.symlink_metadata() {
        if m.is_file() && m.len() == expect.size && sha256_of(dst)? == sha256_hex {
            return Ok(Found::InArchive);
        }
        if m.is_file() && m.ino() == expect.inode {
            // Our inode, written to after the move (a writer whose open waited on our
            // lease when the process died): its bytes are not the verified ones.
            return Ok(Found::Changed);
        }
    }
    // Or under `.ferry-versions/`, where a copy goes whose archive path another key holds.
    if let Some(p) = find_copy(archive, key, expect.size).filter(|p| p != dst) {
        if sha256_of(&p)? == sha256_hex {
            return Ok(Found::InArchive);
        }
    }
    if src.symlink_metadata().is_ok() {
        return Ok(Found::Changed);
    }
    Ok(Found::Missing)
}

/// Moves `spool/KEY` to `archive/KEY` if it is still the file whose bytes were verified
/// (`expect`, `sha256_hex`).
///
/// The move is in steps, each safe to die after: (1) the spool name goes to a reserved
/// name beside it, so nothing but our inode can reach the archive whatever lands on the
/// spool name meanwhile; (2) there its inode, stat and (where the stat cannot be trusted)
/// bytes are checked under the lease; (3) it is renamed (or copied, across filesystems)
/// into the archive. A restart finds the file at the spool name, at the reserved name, or
/// in the archive, and goes on from there after checking its bytes.
pub fn archive(
    spool: &Path,
    archive: &Path,
    key: &Key,
    expect: FileStat,
    sha256_hex: &str,
    settle: Duration,
) -> io::Result<Outcome> {
    let started = coarse_now();
    let src = key.path_in(spool);
    let src_parent = src.parent().unwrap_or(spool).to_path_buf();
    let reserved = reserved_name(&src, expect.inode);
    let natural = key.path_in(archive);
    let at = match locate(&src, &reserved, (archive, key), expect, sha256_hex)? {
        Found::Missing => return Ok(Outcome::Missing),
        Found::Changed => {
            // A changed file at the reserved name goes back to the spool name, and so
            // does a foreign one (a file that took the spool name just before our rename).
            if reserved.symlink_metadata().is_ok() {
                return put_back(archive, key, &reserved, &src).map(|a| match a {
                    Some(p) => Outcome::PutAside(p),
                    None => Outcome::Changed,
                });
            }
            if natural
                .symlink_metadata()
                .is_ok_and(|m| m.ino() == expect.inode)
            {
                return put_back(archive, key, &natural, &src).map(|a| match a {
                    Some(p) => Outcome::PutAside(p),
                    None => Outcome::Changed,
                });
            }
            return Ok(Outcome::Changed);
        }
        Found::InArchive => {
            // Only a reserved leftover (the cross-device path's spool copy) may remain.
            if reserved.symlink_metadata().is_ok() {
                let f = lease::open_for_lease(&reserved)?;
                let lease = match lease::take(&f) {
                    lease::Probe::Busy => return Ok(Outcome::Busy),
                    lease::Probe::Held(l) => Some(l),
                    lease::Probe::Unavailable(_) => None,
                };
                if f.metadata()?.ino() == expect.inode {
                    fs::remove_file(&reserved)?;
                }
                drop(lease);
                fsync_dir(&src_parent)?;
            }
            remove_empty_parents(spool, &src_parent, settle, started);
            return Ok(Outcome::Archived);
        }
        Found::AtName => src.clone(),
        Found::Reserved => reserved.clone(),
    };
    let file = match lease::open_for_lease(&at) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Outcome::Changed),
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
    let broken = || lease.as_ref().is_some_and(|l| l.broken());
    // The final stat, under the lease: the descriptor is the verified inode.
    let fd_stat = FileStat::of(&file.metadata()?);
    if !same_version(&fd_stat, &expect) {
        return Ok(Outcome::Changed);
    }
    // A moved ctime (our own undone move, or a rewrite that put the mtime back) leaves
    // only the bytes to decide.
    let must_hash = rehash_needed(&expect) || fd_stat.ctime_ns != expect.ctime_ns;
    // Room in the archive first: an archive that refuses (read-only, no permission) fails
    // here, before the spool name is touched.
    let (dst, displaced) = archive_path(archive, key);
    let dst_parent = dst.parent().unwrap_or(archive).to_path_buf();
    fs::create_dir_all(&dst_parent)?;
    // (1) Take the name: from here only this inode can travel to the archive.
    if at == src {
        hook("before-reserve");
        // Not a crash step (nothing durable happened): a pause point for tests of the
        // window between the check and the rename.
        crashpoint::hit("final-stat");
        rename_noreplace(&src, &reserved)?;
        crashpoint::hit("reserved");
    }
    let undo = |why: Outcome| -> io::Result<Outcome> {
        match put_back(archive, key, &reserved, &src)? {
            Some(p) => Ok(Outcome::PutAside(p)),
            None => Ok(why),
        }
    };
    // (2) What we took is ours and unchanged (a file renamed onto the spool name after
    //     our stat is someone else's; a rewrite with the same stat shows in the bytes).
    let there = reserved.symlink_metadata().map(|m| FileStat::of(&m)).ok();
    if broken() || there.is_none_or(|t| !same_version(&t, &expect)) {
        return undo(Outcome::Changed);
    }
    if must_hash && sha256_fd(&file, expect.size, &broken)?.as_deref() != Some(sha256_hex) {
        return undo(Outcome::Changed);
    }
    // (3) Into the archive.
    // Already fsynced before the PUT; cheap now, and the archive copy must be durable.
    file.sync_all()?;
    let earlier = if displaced {
        tracing::warn!(key = %key, path = %dst.display(), "archive/KEY is taken by another key's copies (a file and a folder under one name); this copy is kept under .ferry-versions/");
        None
    } else {
        match keep_earlier_version(archive, key, &dst) {
            Ok(e) => e,
            Err(e) => {
                undo(Outcome::Changed)?;
                return Err(e);
            }
        }
    };
    hook("before-rename");
    match rename_noreplace(&reserved, &dst) {
        Ok(()) => {}
        // Bind mounts (Docker volumes, `mount --bind`, systemd's ReadWritePaths=) refuse
        // a rename across mount points even on one device: copy instead.
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let out = cross_device(
                &file,
                lease,
                &reserved,
                &dst,
                &dst_parent,
                expect,
                sha256_hex,
            );
            return match out {
                Ok(Outcome::Archived) => {
                    fsync_dir(&src_parent)?;
                    remove_empty_parents(spool, &src_parent, settle, started);
                    Ok(Outcome::Archived)
                }
                other => {
                    if !dst.exists() {
                        restore_earlier_version(earlier, &dst);
                    }
                    if reserved.symlink_metadata().is_ok() {
                        undo(Outcome::Changed)?;
                    }
                    other
                }
            };
        }
        Err(e) => {
            restore_earlier_version(earlier, &dst);
            undo(Outcome::Changed)?;
            return Err(e);
        }
    }
    crashpoint::hit("renamed");
    // A writer may have opened the file while we moved it (its open waits on our lease),
    // or written through a descriptor older than the lease (unleased fallback): either
    // way the bytes go back to the spool and the file is queued again.
    let after = dst.symlink_metadata().map(|m| FileStat::of(&m)).ok();
    if broken() || after.is_none_or(|a| !same_version(&a, &expect)) {
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
    // An open whose path lookup beat our rename but whose lease break came after our
    // check has its descriptor now: a fresh lease on the archived file is refused then.
    if let Ok(f) = lease::open_for_lease(&dst) {
        if matches!(lease::take(&f), lease::Probe::Busy) {
            drop(f);
            let back = put_back(archive, key, &dst, &src)?;
            restore_earlier_version(earlier, &dst);
            return Ok(back.map_or(Outcome::Busy, Outcome::PutAside));
        }
    }
    fsync_dir(&dst_parent)?;
    fsync_dir(&src_parent)?;
    crashpoint::hit("archive-fsync-dirs");
    remove_empty_parents(spool, &src_parent, settle, started);
    Ok(Outcome::Archived)
}

/// A free name beside `src` for bytes that cannot have `src` back because a new file took
/// it: `NAME~conflict-20261201T093000Z` (shortened to fit 255 bytes). It is a visible,
/// valid spool name, so the bytes stay in the spool and go up under it; nothing that S3
/// does not hold ever leaves the spool this way.
pub fn conflict_path(src: &Path) -> PathBuf {
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace(['-', ':'], "");
    let parent = src.parent().map(Path::to_path_buf).unwrap_or_default();
    let name = src
        .file_name()
        .map(|n| n.as_bytes().to_vec())
        .unwrap_or_default();
    let mut n = 0;
    loop {
        let full = stamped_name(&name, &format!("conflict-{stamp}"), n);
        // stamped_name joins with '@'; a conflict copy is marked with '~' instead.
        let mut v = full;
        if let Some(i) = v.iter().rposition(|&b| b == b'@') {
            v[i] = b'~';
        }
        let p = parent.join(std::ffi::OsStr::from_bytes(&v));
        if p.symlink_metadata().is_err() {
            return p;
        }
        n += 1;
    }
}

/// Moves `from` back to the spool name `src` without replacing a file that took the name
/// meanwhile; if one did, `from` gets a conflict name beside it (returned), in the spool.
/// `from` is always on the spool's filesystem here (a reserved name, or an archive path a
/// same-filesystem rename just reached), so this is a rename, never a copy.
fn put_back(_archive: &Path, key: &Key, from: &Path, src: &Path) -> io::Result<Option<PathBuf>> {
    hook("before-put-back");
    match rename_noreplace(from, src) {
        Ok(()) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            let aside = conflict_path(src);
            rename_noreplace(from, &aside)?;
            if let Some(parent) = aside.parent() {
                fsync_dir(parent)?;
            }
            tracing::warn!(key = %key, path = %aside.display(), "a file changed while it was archived and a new one took its spool name; it stays in the spool under a conflict name and goes up under that name");
            Ok(Some(aside))
        }
        Err(e) => Err(e),
    }
}

/// Reserved names in `dir` (`.ferry-move.*`) whose inode is not the one their name gives:
/// a file that took the spool name between ferry's check and its rename, and was carried
/// along by a crash at the wrong moment. Each is given back a visible spool name: the
/// name of the row whose stat has its inode, else a conflict name for that row's key, else
/// `ferry-recovered-<inode>`. Returns what was put back, for the log.
pub fn return_foreign_reserved(
    dir: &Path,
    names_by_inode: &std::collections::HashMap<u64, PathBuf>,
) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(named) = name
            .to_str()
            .and_then(|n| n.strip_prefix(MOVE_PREFIX))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let Ok(m) = e.path().symlink_metadata() else {
            continue;
        };
        if m.ino() == named {
            continue; // ours: the archive step goes on from there
        }
        let target = names_by_inode
            .get(&m.ino())
            .cloned()
            .unwrap_or_else(|| dir.join(format!("ferry-recovered-{}", m.ino())));
        let dest = match rename_noreplace(&e.path(), &target) {
            Ok(()) => target,
            Err(_) => {
                let c = conflict_path(&target);
                if rename_noreplace(&e.path(), &c).is_err() {
                    continue;
                }
                c
            }
        };
        let _ = fsync_dir(dir);
        out.push(dest);
    }
    out
}

/// The cross-device path, from the reserved spool name: copy from the leased descriptor to
/// a temp name in the archive (the lease is let go after the copy, so a writer never waits
/// for our fsync), fsync, re-hash the copy, rename it in; then, under a fresh lease, unlink
/// the reserved name only if it is still the inode copied and nobody writes it.
fn cross_device(
    file: &File,
    lease: Option<lease::Lease<'_>>,
    reserved: &Path,
    dst: &Path,
    dst_parent: &Path,
    expect: FileStat,
    sha256_hex: &str,
) -> io::Result<Outcome> {
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
            if lease.as_ref().is_some_and(|l| l.broken()) {
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
        if total != expect.size || hex::encode(h.finalize()) != sha256_hex {
            return Ok(Outcome::Changed);
        }
        out.flush()?;
        out.sync_all()?;
        drop(out);
        crashpoint::hit("archive-fsync-copy");
        // What landed on the other disk is what was verified.
        if sha256_of(&tmp)? != sha256_hex {
            return Ok(Outcome::Changed);
        }
        rename_noreplace(&tmp, dst)?;
        fsync_dir(dst_parent)?;
        Ok(Outcome::Archived)
    })();
    drop(lease);
    if !matches!(res, Ok(Outcome::Archived)) {
        let _ = fs::remove_file(&tmp);
        return res;
    }
    // The archive holds the verified bytes. The spool copy goes only if it is still the
    // inode copied, unchanged, and nobody has it open for writing.
    let again = lease::open_for_lease(reserved)?;
    let fresh = lease::take(&again);
    if matches!(fresh, lease::Probe::Busy) {
        return Ok(Outcome::Busy);
    }
    let now = FileStat::of(&again.metadata()?);
    if !same_version(&now, &expect) {
        return Ok(Outcome::Changed);
    }
    hook("before-unlink");
    fs::remove_file(reserved)?;
    drop(fresh);
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

/// The clock filesystems stamp with (CLOCK_REALTIME_COARSE): a change we make after this
/// carries a time at or after it, one made before carries a time at or before it.
pub fn coarse_now() -> SystemTime {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } != 0 {
        return SystemTime::now();
    }
    SystemTime::UNIX_EPOCH + Duration::new(ts.tv_sec.max(0) as u64, ts.tv_nsec.max(0) as u32)
}

/// Removes now-empty folders between `dir` and the spool root (never the root). Folders
/// someone else touched within `settle` before `ours` (when our own move began) are left:
/// an application may be about to write into them. A change at or after `ours` is our
/// move or our removal of a child folder (another writer's new file makes `rmdir` fail).
pub fn remove_empty_parents(spool: &Path, dir: &Path, settle: Duration, ours: SystemTime) {
    let mut cur = dir.to_path_buf();
    while cur != spool && cur.starts_with(spool) {
        let fresh = cur.symlink_metadata().ok().is_none_or(|m| {
            let mtime = SystemTime::UNIX_EPOCH
                + Duration::new(m.mtime().max(0) as u64, m.mtime_nsec().max(0) as u32);
            mtime <= ours && ours.duration_since(mtime).is_ok_and(|age| age < settle)
        });
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
    /// never replaced: the returned bytes take a conflict name beside it, in the spool.
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
                // After the final stat, before the name is taken: the file changes (its
                // mtime is set by path, as `touch` does; an open for writing would wait
                // on our own lease).
                "before-reserve" => {
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
        assert!(
            aside.starts_with(&spool),
            "unverified bytes must stay in the spool"
        );
        assert!(
            aside.to_string_lossy().contains("race.jpg~conflict-"),
            "{aside:?}"
        );
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
        assert!(
            !key.path_in(&arch).exists(),
            "an unverified file reached the archive"
        );
        assert!(!reserved_name(&src, expect.inode).exists());
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
