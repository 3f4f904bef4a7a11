//! Opening a file beneath a root (the spool, the archive, the hot cache) without following
//! links, with the fstat facts its representation is built from; `serve::semantics` answers for it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::time::SystemTime;

use bytes::Bytes;

use super::semantics::SMALL_BODY;
use crate::catalog::FileStat;

/// An open spool file with the fstat facts its validators are built from.
#[derive(Debug)]
pub struct LocalFile {
    pub file: File,
    pub len: u64,
    pub mtime: SystemTime,
    pub inode: u64,
    /// Size, mtime, ctime and inode as the catalog records them: a spool file is ready only
    /// when its row holds exactly this stat.
    pub stat: FileStat,
    /// The whole content of a small file, read on the same blocking thread as the open, so
    /// a small hit costs one hop off the executor instead of two.
    pub preloaded: Option<Bytes>,
    /// Someone else writes this file (the spool, the archive): a rewrite in place can race
    /// the read, so a body sent under a public, strong tag is checked against `stat` once
    /// read. Files ferry wrote itself (the hot cache) skip the extra fstat.
    pub foreign: bool,
}

impl LocalFile {
    /// Whether the file's bytes may have changed since it was opened: its size, mtime or
    /// inode now differ from `stat`, or cannot be had. A rewrite in place bumps mtime before
    /// its first byte lands, so a read that saw any new byte is followed by a stat that
    /// differs. Not ctime: a rename sets it (ferry's own archive move, mid-download), and so
    /// do chmod and link, none of which touch a byte.
    pub fn changed_since_open(&self) -> bool {
        self.file
            .metadata()
            .map_or(true, |m| !same_bytes(&FileStat::of(&m), &self.stat))
    }

    /// Reads a small file whole (at most [`SMALL_BODY`]). Blocking.
    pub fn preload(&mut self) -> io::Result<()> {
        self.preload_up_to(SMALL_BODY)
    }

    /// Reads the file whole if it is at most `max` bytes. Blocking.
    pub fn preload_up_to(&mut self, max: u64) -> io::Result<()> {
        if self.len <= max.min(SMALL_BODY) && self.preloaded.is_none() {
            self.preloaded = Some(read_whole(&self.file, self.len as usize, 0)?);
        }
        Ok(())
    }
}

/// Files up to this size are read whole as they are opened when their answer will likely
/// carry no promise about its bytes (a spool file not yet ready, ferry's own cache files),
/// and may be held in memory (`serve::memo`); the bytes of bigger ones go from the page
/// cache to the socket by sendfile(2) on ferry's own connections (`serve::h1`). Below it,
/// one copy costs less than the system calls sendfile adds. A ready spool file is read
/// whole up to [`SMALL_BODY`], as before: its answer is public, and sendfile cannot send it
/// (see `semantics::SendFile`).
pub const PRELOAD_MAX: u64 = 32 * 1024;

/// Whether every page of `range` of `file` is in the page cache (cachestat(2), Linux 6.5),
/// so sendfile(2) of it cannot wait for the disk. `false` when the kernel cannot say:
/// before 6.5, or for a file ferry may only read (cachestat wants write permission or
/// ownership), as the service's spool files are.
pub fn resident(file: &File, range: std::ops::Range<u64>) -> bool {
    #[repr(C)]
    struct CachestatRange {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Cachestat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    // The same number in every architecture's table (new system calls share one); libc
    // does not name it for x86_64 yet.
    const SYS_CACHESTAT: libc::c_long = 451;
    const PAGE: u64 = 4096;
    let first = range.start / PAGE;
    let pages = range.end.div_ceil(PAGE) - first;
    let r = CachestatRange {
        off: first * PAGE,
        len: pages * PAGE,
    };
    let mut cs = Cachestat::default();
    // SAFETY: cachestat(2) reads `r` and writes `cs`, both ours and laid out as the kernel's.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &r as *const CachestatRange,
            &mut cs as *mut Cachestat,
            0u32,
        )
    };
    // With pages bigger than 4 KiB the kernel counts its own pages, fewer than ours: then
    // this says "not resident", and the bytes are copied instead (never wrong, only slower).
    rc == 0 && cs.nr_cache >= pages
}

/// Opens `rel` (a validated relative key like "2026/11/a b.jpg", '/'-separated, no '..', no empty
/// segments) beneath the directory `dir`, never following a symlink in any component.
///
/// Returns `Ok(None)` when the file does not exist, a component is a symlink or not a directory,
/// or the object is not a regular file. Blocking: run it on a blocking thread.
pub fn open_beneath(dir: &File, rel: &str) -> io::Result<Option<LocalFile>> {
    open_with(dir.as_fd(), rel, confined)
}

/// Opens `rel` (as for [`open_beneath`]) beneath `dir` read-only, non-blocking, with no
/// symlink in any component and no way out of `dir`: the descriptor, whatever it is (the
/// caller checks the type). A symlink anywhere fails with ELOOP, an escape with EXDEV, a
/// symlinked directory on the walk's fallback with ELOOP or ENOTDIR.
pub fn open_confined(dir: BorrowedFd<'_>, rel: &str) -> io::Result<File> {
    if !is_plain_relative(rel) {
        return Err(io::Error::from_raw_os_error(libc::EXDEV));
    }
    confined(dir, rel).map(File::from)
}

fn confined(dir: BorrowedFd<'_>, rel: &str) -> io::Result<OwnedFd> {
    match openat2_beneath(dir, rel) {
        // Kernels before 5.6 lack openat2 (ENOSYS), and seccomp filters that do not know it
        // refuse it: systemd's SystemCallErrorNumber=EPERM, Docker before 20.10. The walk
        // gives the same guarantee, slower.
        Err(e) if openat2_missing(&e) => open_walk(dir, rel),
        other => other,
    }
}

/// openat2 itself is not to be had here, as opposed to the file refusing us: a filtered call
/// answers EPERM (or ENOSYS), an old kernel ENOSYS, a kernel that knows no flag EINVAL or
/// E2BIG. A permission refusal on the file itself is EACCES, so EPERM is safe to take here.
fn openat2_missing(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSYS | libc::EPERM | libc::EINVAL | libc::E2BIG)
    )
}

fn open_with(
    dir: BorrowedFd<'_>,
    rel: &str,
    open: impl FnOnce(BorrowedFd<'_>, &str) -> io::Result<OwnedFd>,
) -> io::Result<Option<LocalFile>> {
    // SECURITY: the caller validated `rel`, but the component walk has no RESOLVE_BENEATH to catch a slip.
    if !is_plain_relative(rel) {
        return Ok(None);
    }
    let fd = match open(dir, rel) {
        Ok(fd) => fd,
        Err(e) if means_absent(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let file = File::from(fd);
    let meta = file.metadata()?;
    // SECURITY: only regular files are served; a directory, device or socket in the spool is not content.
    if !meta.file_type().is_file() {
        return Ok(None);
    }
    Ok(Some(LocalFile {
        len: meta.len(),
        mtime: meta.modified()?,
        inode: meta.ino(),
        stat: FileStat::of(&meta),
        file,
        preloaded: None,
        foreign: true,
    }))
}

/// Size, mtime and inode agree: what a reader can check of the bytes without reading them.
pub fn same_bytes(a: &FileStat, b: &FileStat) -> bool {
    (a.size, a.mtime_ns, a.inode) == (b.size, b.mtime_ns, b.inode)
}

fn is_plain_relative(rel: &str) -> bool {
    !rel.is_empty()
        && !rel.contains('\0')
        && rel
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

/// Errors that say "there is nothing servable here" rather than "something is broken".
fn means_absent(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENOENT      // missing
            | libc::ELOOP     // a symlink where we refuse to follow one
            | libc::ENOTDIR   // a file used as a directory, or a symlinked directory in the walk
            | libc::EXDEV     // RESOLVE_BENEATH saw an escape
            | libc::ENXIO     // a socket: never content
            | libc::ENAMETOOLONG
        )
    )
}

/// O_NONBLOCK: opening a FIFO someone dropped in the spool must not park a blocking thread
/// forever; it is a no-op for the regular files we go on to read.
const FILE_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK;

/// `struct open_how` from linux/openat2.h; libc's is non_exhaustive and cannot be built outside it.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// The executor-safe fast path: resolves `rel` only through the dentry cache
/// (`RESOLVE_CACHED`) and reads a small file only from the page cache (`RWF_NOWAIT`), so
/// nothing here can wait for a disk. `None` means "that would block: use `open_beneath` on a
/// blocking thread"; `Some` is the final answer. A file whose bytes are not cached comes back
/// without `preloaded`, and `respond` reads it on a blocking thread.
pub fn try_open_cached(
    dir: &File,
    rel: &str,
    preload: u64,
) -> Option<io::Result<Option<LocalFile>>> {
    if !is_plain_relative(rel) {
        return Some(Ok(None));
    }
    let path = CString::new(rel).ok()?;
    // SECURITY: the same confinement as openat2_beneath, plus "dentry cache only".
    let resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_BENEATH | libc::RESOLVE_CACHED;
    let fd = match openat2_once(dir.as_fd(), &path, resolve) {
        Ok(fd) => fd,
        Err(err) => {
            return match err.raw_os_error() {
                // RESOLVE_CACHED never trusts a negative dentry, so a missing file (every redirect)
                // lands here. A plain lookup answers "absent" from the dentry cache in a
                // microsecond; only a directory block not in memory could make it wait, and that
                // is a metadata read, not file I/O. Anything found goes the careful way.
                Some(libc::EAGAIN) if absent_by_lookup(dir, &path) => Some(Ok(None)),
                // Not cached, a rename race, or a kernel (or seccomp filter) without
                // openat2/RESOLVE_CACHED.
                Some(libc::EAGAIN | libc::EINTR | libc::ENOSYS | libc::EINVAL) => None,
                _ if openat2_missing(&err) => None,
                _ if means_absent(&err) => Some(Ok(None)),
                _ => Some(Err(err)),
            };
        }
    };
    let file = File::from(fd);
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Some(Err(e)),
    };
    // SECURITY: only regular files are served.
    if !meta.file_type().is_file() {
        return Some(Ok(None));
    }
    let mtime = match meta.modified() {
        Ok(t) => t,
        Err(e) => return Some(Err(e)),
    };
    let mut lf = LocalFile {
        len: meta.len(),
        mtime,
        inode: meta.ino(),
        stat: FileStat::of(&meta),
        file,
        preloaded: None,
        foreign: true,
    };
    if lf.len <= preload.min(SMALL_BODY) {
        lf.preloaded = read_nowait(&lf.file, lf.len as usize);
    }
    Some(Ok(Some(lf)))
}

/// What one stat of a path found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathStat {
    pub stat: FileStat,
    pub dev: u64,
    /// A regular file (not a directory, device, FIFO, socket or symlink).
    pub is_file: bool,
    /// Found with the careful open's confinement (no symlink in any component, nothing
    /// outside the directory): always for a name without '/', else only by
    /// [`stat_confined`].
    pub confined: bool,
}

/// What a stat of a spool path says before anything is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Looked {
    /// Nothing is there (ENOENT, ENOTDIR, or a name no key can have): no open is needed.
    Absent,
    /// Something is there; only the careful open (no symlink anywhere, nothing outside
    /// `dir`) may decide whether it is servable.
    Found(PathStat),
    /// The stat could not tell (a permission, a name too long): the careful open decides.
    Unsure,
}

/// One `fstatat` of `rel` beneath `dir`, not following a symlink in the last component.
/// Symlinks in the directories above are followed, so `Found` proves nothing about
/// confinement: it is for matching an inode a careful open already read (`serve::memo`),
/// and for answering "absent" without an open, as [`absent_by_lookup`] does. The one
/// system call of a miss (every redirect), where the cached open took two.
pub fn stat_at(dir: &File, rel: &str) -> Looked {
    if !is_plain_relative(rel) {
        return Looked::Absent;
    }
    let Ok(path) = CString::new(rel) else {
        return Looked::Absent;
    };
    match lstat_at(dir, &path) {
        Ok(st) => Looked::Found(path_stat(&st, !rel.contains('/'))),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => Looked::Absent,
        Err(_) => Looked::Unsure,
    }
}

/// [`stat_at`] with the careful open's confinement: no symlink in any component (the last
/// included), nothing outside `dir`, resolved from the dentry cache alone. An `O_PATH` open,
/// an `fstat` and a close: for a held key with a directory in it, where [`stat_at`] would
/// follow a symlinked directory to the same unchanged inode (a directory moved out of the
/// spool and linked back is not the spool's any more).
pub fn stat_confined(dir: &File, rel: &str) -> Looked {
    if !is_plain_relative(rel) {
        return Looked::Absent;
    }
    let Ok(path) = CString::new(rel) else {
        return Looked::Absent;
    };
    let resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_BENEATH | libc::RESOLVE_CACHED;
    let fd = match openat2_with(dir.as_fd(), &path, libc::O_PATH | libc::O_CLOEXEC, resolve) {
        Ok(fd) => fd,
        Err(err) => {
            return match err.raw_os_error() {
                // Nothing servable there: what the careful open would conclude too.
                Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::EXDEV) => Looked::Absent,
                // Not cached (EAGAIN), no openat2, anything odd: the careful open decides.
                _ => Looked::Unsure,
            };
        }
    };
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: a descriptor we own, alive for the call, and a stat buffer the kernel fills.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Looked::Unsure;
    }
    // SAFETY: fstat returned 0, so it filled the buffer.
    Looked::Found(path_stat(unsafe { &st.assume_init() }, true))
}

fn path_stat(st: &libc::stat, confined: bool) -> PathStat {
    PathStat {
        stat: FileStat {
            size: st.st_size as u64,
            mtime_ns: crate::catalog::stat_ns(st.st_mtime, st.st_mtime_nsec),
            ctime_ns: crate::catalog::stat_ns(st.st_ctime, st.st_ctime_nsec),
            inode: st.st_ino,
        },
        dev: st.st_dev,
        is_file: st.st_mode & libc::S_IFMT == libc::S_IFREG,
        confined,
    }
}

/// Whether nothing exists at `path` beneath `dir` (ENOENT/ENOTDIR). A symlinked directory
/// could make this look further than RESOLVE_BENEATH allows, but it can only ever answer
/// "absent"; anything present is re-opened with every check on a blocking thread.
fn absent_by_lookup(dir: &File, path: &CString) -> bool {
    matches!(
        lstat_at(dir, path).map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENOENT | libc::ENOTDIR))
    )
}

/// `fstatat(dir, path, AT_SYMLINK_NOFOLLOW)`.
fn lstat_at(dir: &File, path: &CString) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: NUL-terminated path, a valid dir fd and a stat buffer the kernel fills.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            path.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatat returned 0, so it filled the buffer.
    Ok(unsafe { st.assume_init() })
}

/// Reads `len` bytes from offset 0 only if they are all in the page cache.
pub(crate) fn read_nowait(file: &File, len: usize) -> Option<Bytes> {
    // EAGAIN (not cached), EOPNOTSUPP (no RWF_NOWAIT here), or a file that shrank.
    read_whole(file, len, libc::RWF_NOWAIT).ok()
}

/// Reads `len` bytes from offset 0 with `preadv2(flags)`, into memory the kernel fills
/// (nothing zeroed first: a small hit's buffer is written once). A file shorter than `len`
/// is an `UnexpectedEof`.
fn read_whole(file: &File, len: usize, flags: libc::c_int) -> io::Result<Bytes> {
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let done = buf.len();
        let iov = libc::iovec {
            iov_base: buf.spare_capacity_mut().as_mut_ptr().cast(),
            iov_len: len - done,
        };
        // SAFETY: one iovec over the vector's own spare capacity (len - done bytes); the
        // kernel writes at most iov_len bytes there.
        let n = unsafe {
            if flags == 0 {
                // Plain pread: a seccomp filter that refuses preadv2 costs only the no-wait path.
                libc::pread(
                    file.as_raw_fd(),
                    iov.iov_base,
                    iov.iov_len,
                    done as libc::off_t,
                )
            } else {
                libc::preadv2(file.as_raw_fd(), &iov, 1, done as libc::off_t, flags)
            }
        };
        match n {
            n if n > 0 => {
                // SAFETY: the kernel initialised the n bytes after `done`, and n ≤ iov_len.
                unsafe { buf.set_len(done + n as usize) };
            }
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted || flags != 0 {
                    return Err(err);
                }
            }
        }
    }
    Ok(Bytes::from(buf))
}

/// One openat2(2) call with FILE_FLAGS and the given RESOLVE_* flags.
fn openat2_once(dir: BorrowedFd<'_>, path: &CString, resolve: u64) -> io::Result<OwnedFd> {
    openat2_with(dir, path, FILE_FLAGS, resolve)
}

/// One openat2(2) call with the given open and RESOLVE_* flags.
fn openat2_with(
    dir: BorrowedFd<'_>,
    path: &CString,
    flags: libc::c_int,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: flags as u64,
        mode: 0,
        resolve,
    };
    // SAFETY: `path` is NUL-terminated and `how` is a live open_how of the size we pass;
    // the kernel reads both only during the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a non-negative return is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as libc::c_int) })
}

fn openat2_beneath(dir: BorrowedFd<'_>, rel: &str) -> io::Result<OwnedFd> {
    let path = CString::new(rel)?;
    // SECURITY: the kernel refuses symlinks in every component and any path leaving `dir`.
    let resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_BENEATH;
    // EAGAIN: RESOLVE_BENEATH may bail out when it races a rename; a retry is the documented answer.
    let mut tries = 0;
    loop {
        match openat2_once(dir, &path, resolve) {
            Ok(fd) => return Ok(fd),
            Err(err) => {
                tries += 1;
                match err.raw_os_error() {
                    Some(libc::EINTR | libc::EAGAIN) if tries < 8 => continue,
                    _ => return Err(err),
                }
            }
        }
    }
}

fn openat(dir: BorrowedFd<'_>, name: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let name = CString::new(name)?;
    loop {
        // SAFETY: `name` is NUL-terminated and outlives the call.
        let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
        if fd >= 0 {
            // SAFETY: a non-negative return is a new descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// One component at a time, each opened relative to the last, so no name is ever re-resolved
/// from the top and a symlink anywhere fails the open.
fn open_walk(dir: BorrowedFd<'_>, rel: &str) -> io::Result<OwnedFd> {
    let mut segs: Vec<&str> = rel.split('/').collect();
    let last = segs.pop().unwrap_or_default();
    let mut cur: Option<OwnedFd> = None;
    for seg in segs {
        let base = cur.as_ref().map_or(dir, |fd| fd.as_fd());
        // SECURITY: O_NOFOLLOW|O_DIRECTORY refuses a symlinked directory (ELOOP or ENOTDIR);
        // O_PATH needs only search permission, as path resolution would.
        let next = openat(
            base,
            seg,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )?;
        cur = Some(next);
    }
    let base = cur.as_ref().map_or(dir, |fd| fd.as_fd());
    // SECURITY: O_NOFOLLOW on the last component, the one a plain open would follow.
    openat(base, last, FILE_FLAGS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    // ---- open_beneath ----

    type Opener = fn(BorrowedFd<'_>, &str) -> io::Result<OwnedFd>;

    fn openers() -> [(&'static str, Opener); 2] {
        [("openat2", openat2_or_walk), ("walk", open_walk)]
    }

    fn openat2_or_walk(dir: BorrowedFd<'_>, rel: &str) -> io::Result<OwnedFd> {
        match openat2_beneath(dir, rel) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => open_walk(dir, rel),
            other => other,
        }
    }

    fn spool() -> (tempfile::TempDir, File) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        std::fs::create_dir_all(root.join("2026/11")).expect("mkdir");
        std::fs::write(root.join("2026/11/a b.jpg"), b"hello").expect("write");
        std::fs::write(root.join("top.txt"), b"top").expect("write");
        std::fs::create_dir(root.join("adir")).expect("mkdir");
        symlink(root.join("top.txt"), root.join("link.txt")).expect("symlink");
        symlink(root.join("2026"), root.join("linkdir")).expect("symlink");
        symlink("/etc", root.join("etc")).expect("symlink");
        let fifo =
            std::ffi::CString::new(root.join("fifo").as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let dir = File::open(root).expect("open dir");
        (tmp, dir)
    }

    #[test]
    fn opens_regular_files_only_without_links() {
        let (_tmp, dir) = spool();
        for (name, opener) in openers() {
            let open = |rel: &str| open_with(dir.as_fd(), rel, opener).expect(name);
            let lf = open("2026/11/a b.jpg").expect(name);
            assert_eq!(lf.len, 5, "{name}");
            assert!(lf.inode != 0);
            assert!(open("top.txt").is_some(), "{name}");
            for absent in [
                "missing",
                "2026/missing/x",
                "link.txt",
                "linkdir/11/a b.jpg",
                "etc/passwd",
                "top.txt/x",
                "adir",
                "2026",
                "fifo",
                "../x",
                "2026/../top.txt",
                "/etc/passwd",
                "a//b",
                "",
            ] {
                assert!(open(absent).is_none(), "{name}: {absent}");
            }
        }
        assert!(open_beneath(&dir, "2026/11/a b.jpg")
            .expect("open")
            .is_some());
        assert!(open_beneath(&dir, "linkdir/11/a b.jpg")
            .expect("open")
            .is_none());
    }

    #[test]
    fn cached_fast_path_agrees_with_the_blocking_path() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(t.path().join("a")).expect("mkdir");
        std::fs::write(t.path().join("a/f.jpg"), b"hello").expect("write");
        std::os::unix::fs::symlink("/etc/passwd", t.path().join("link")).expect("symlink");
        let dir = File::open(t.path()).expect("dir");
        // Warm the dentry and page caches the way a first request would.
        let slow = open_beneath(&dir, "a/f.jpg").expect("open").expect("file");
        // A kernel without RESOLVE_CACHED always says "would block": nothing to compare then.
        let Some(fast) = (0..100).find_map(|_| try_open_cached(&dir, "a/f.jpg", SMALL_BODY)) else {
            return;
        };
        let fast = fast.expect("open").expect("file");
        assert_eq!((fast.len, fast.inode), (slow.len, slow.inode));
        if let Some(b) = fast.preloaded {
            assert_eq!(&b[..], b"hello");
        }
        for absent in ["link", "nope", "a/f.jpg/x", "../x"] {
            if let Some(r) = try_open_cached(&dir, absent, SMALL_BODY) {
                assert!(r.expect("no error").is_none(), "{absent}");
            }
        }
    }
}
