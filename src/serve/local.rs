//! Spool hits: opening a file beneath the spool without following links, and answering for it with validators, conditionals and byte ranges (RFC 9110).

use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, SeekFrom};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::Stream;
use http::header::{
    HeaderName, HeaderValue, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE,
    CONTENT_TYPE, ETAG, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE,
    LAST_MODIFIED, RANGE,
};
use http::{HeaderMap, Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncSeek, AsyncSeekExt};
use tokio_util::io::ReaderStream;
use warp::reply::{Reply, Response};

/// Bodies up to this size are read in one blocking call: one thread hop instead of one per chunk.
const SMALL_BODY: u64 = 256 * 1024;
/// Read size for streamed bodies: large enough to keep syscalls rare, small enough to bound memory per request.
const CHUNK: usize = 64 * 1024;
/// Past this many ranges a multipart answer costs more than it saves; RFC 9110 §14.2 lets us send the whole file.
const MAX_PARTS: usize = 16;
/// Sorting and merging is the only super-linear step; a legitimate client never sends this many.
const MAX_SPECS: usize = 256;
/// 9999-12-31T23:59:59Z: httpdate cannot format anything later (and panics on it).
const MAX_HTTP_SECS: u64 = 253_402_300_799;

const X_FERRY_SOURCE: HeaderName = HeaderName::from_static("x-ferry-source");

/// An open spool file with the fstat facts its validators are built from.
#[derive(Debug)]
pub struct LocalFile {
    pub file: File,
    pub len: u64,
    pub mtime: SystemTime,
    pub inode: u64,
    /// The whole content of a small file, read on the same blocking thread as the open, so
    /// a small hit costs one hop off the executor instead of two.
    pub preloaded: Option<Bytes>,
}

impl LocalFile {
    /// Reads a small file whole (at most 256 KiB). Blocking.
    pub fn preload(&mut self) -> io::Result<()> {
        if self.len <= SMALL_BODY && self.preloaded.is_none() {
            let mut buf = vec![0u8; self.len as usize];
            self.file.read_exact_at(&mut buf, 0)?;
            self.preloaded = Some(Bytes::from(buf));
        }
        Ok(())
    }
}

/// Opens `rel` (a validated relative key like "2026/11/a b.jpg", '/'-separated, no '..', no empty
/// segments) beneath the directory `dir`, never following a symlink in any component.
///
/// Returns `Ok(None)` when the file does not exist, a component is a symlink or not a directory,
/// or the object is not a regular file. Blocking: run it on a blocking thread.
pub fn open_beneath(dir: &File, rel: &str) -> io::Result<Option<LocalFile>> {
    open_with(dir.as_fd(), rel, |dir, rel| {
        match openat2_beneath(dir, rel) {
            // Kernels before 5.6 (and some seccomp profiles) lack openat2; the walk gives the same guarantee, slower.
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => open_walk(dir, rel),
            other => other,
        }
    })
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
        file,
        preloaded: None,
    }))
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
    preload: bool,
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
                // Not cached, a rename race, or a kernel without openat2/RESOLVE_CACHED.
                Some(libc::EAGAIN | libc::EINTR | libc::ENOSYS | libc::EINVAL) => None,
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
        file,
        preloaded: None,
    };
    if preload && lf.len <= SMALL_BODY {
        lf.preloaded = read_nowait(&lf.file, lf.len as usize);
    }
    Some(Ok(Some(lf)))
}

/// Whether nothing exists at `path` beneath `dir` (ENOENT/ENOTDIR). A symlinked directory
/// could make this look further than RESOLVE_BENEATH allows, but it can only ever answer
/// "absent"; anything present is re-opened with every check on a blocking thread.
fn absent_by_lookup(dir: &File, path: &CString) -> bool {
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
    rc != 0
        && matches!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOENT | libc::ENOTDIR)
        )
}

/// Reads `len` bytes from offset 0 only if they are all in the page cache.
fn read_nowait(file: &File, len: usize) -> Option<Bytes> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let iov = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: len - done,
        };
        // SAFETY: one iovec over our own live buffer; the kernel writes at most iov_len bytes.
        let n = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &iov,
                1,
                done as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n <= 0 {
            // EAGAIN (not cached), EOPNOTSUPP (no RWF_NOWAIT here), or a file that shrank.
            return None;
        }
        done += n as usize;
    }
    Some(Bytes::from(buf))
}

/// One openat2(2) call with FILE_FLAGS and the given RESOLVE_* flags.
fn openat2_once(dir: BorrowedFd<'_>, path: &CString, resolve: u64) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: FILE_FLAGS as u64,
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

/// A strong ETag from (len, mtime nanos, inode), quoted, hex, e.g. `"5f3a-1a2b3c-77"`.
///
/// The inode distinguishes a file replaced by rename with the same size and mtime.
pub fn etag(len: u64, mtime: SystemTime, inode: u64) -> String {
    // Signed so an mtime before 1970 still yields a distinct tag instead of an error.
    let nanos: i128 = match mtime.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    };
    format!("\"{len:x}-{nanos:x}-{inode:x}\"")
}

/// Last-Modified as HTTP can express it: whole seconds within httpdate's range.
fn http_seconds(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .min(MAX_HTTP_SECS);
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// What to send, decided from the request headers only.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    NotModified,
    PreconditionFailed,
    Full,
    Partial(Range<u64>),
    Multi(Vec<Range<u64>>),
    Unsatisfiable,
}

/// Evaluates the conditionals in RFC 9110 §13.2.2 order, then If-Range and Range.
pub fn plan(method: &Method, headers: &HeaderMap, len: u64, mtime: SystemTime, etag: &str) -> Plan {
    let safe = method == Method::GET || method == Method::HEAD;
    let last_modified = http_seconds(mtime);

    if let Some(matched) = tag_list_matches(headers, &IF_MATCH, etag, false) {
        if !matched {
            return Plan::PreconditionFailed;
        }
    } else if let Some(since) = header_date(headers, &IF_UNMODIFIED_SINCE) {
        if last_modified > since {
            return Plan::PreconditionFailed;
        }
    }

    if let Some(matched) = tag_list_matches(headers, &IF_NONE_MATCH, etag, true) {
        if matched {
            return if safe {
                Plan::NotModified
            } else {
                Plan::PreconditionFailed
            };
        }
    } else if safe {
        if let Some(since) = header_date(headers, &IF_MODIFIED_SINCE) {
            if last_modified <= since {
                return Plan::NotModified;
            }
        }
    }

    if !safe {
        return Plan::Full;
    }
    let Some(specs) = range_specs(headers) else {
        return Plan::Full;
    };
    // Nothing in an empty file is satisfiable, but a 416 would break clients that always send
    // Range (media players, resumers) on a file that is merely empty; the whole (empty) file is
    // the useful answer.
    if len == 0 {
        return Plan::Full;
    }
    if !if_range_holds(headers, etag, last_modified) {
        return Plan::Full;
    }
    ranges(&specs, len)
}

/// `None` when the field is absent. A malformed list matches nothing: for If-Match that fails
/// safe (412), for If-None-Match it falls back to a full answer.
fn tag_list_matches(
    headers: &HeaderMap,
    name: &HeaderName,
    etag: &str,
    weak_compare: bool,
) -> Option<bool> {
    let mut values = headers.get_all(name).iter().peekable();
    values.peek()?;
    let mut found = false;
    for value in values {
        match list_matches(value.as_bytes(), etag.as_bytes(), weak_compare) {
            Some(true) => found = true,
            Some(false) => {}
            None => return Some(false),
        }
    }
    Some(found)
}

/// `None` when the value is not `*` nor a valid entity-tag list.
fn list_matches(value: &[u8], etag: &[u8], weak_compare: bool) -> Option<bool> {
    let value = value.trim_ascii();
    if value == b"*" {
        return Some(true);
    }
    let mut rest = value;
    let mut found = false;
    loop {
        rest = trim_start_list(rest);
        if rest.is_empty() {
            return Some(found);
        }
        let weak = rest.starts_with(b"W/");
        if weak {
            rest = &rest[2..];
        }
        if rest.first() != Some(&b'"') {
            return None;
        }
        let close = rest[1..].iter().position(|&b| b == b'"')? + 2;
        let (tag, after) = rest.split_at(close);
        // Our tag is always strong, so the strong function only has to reject W/.
        if (weak_compare || !weak) && tag == etag {
            found = true;
        }
        rest = after.trim_ascii_start();
        if !rest.is_empty() && rest[0] != b',' {
            return None;
        }
    }
}

fn trim_start_list(mut s: &[u8]) -> &[u8] {
    while let Some((&b, tail)) = s.split_first() {
        if b == b',' || b == b' ' || b == b'\t' {
            s = tail;
        } else {
            break;
        }
    }
    s
}

/// An invalid date means the condition is ignored (RFC 9110 §13.1.3, §13.1.4).
fn header_date(headers: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    let value = headers.get(name)?.to_str().ok()?;
    httpdate::parse_http_date(value.trim()).ok()
}

/// If-Range needs an exact strong match; anything else (weak tag, other date, garbage) means the
/// client's partial copy is not ours and it must get the whole file.
fn if_range_holds(headers: &HeaderMap, etag: &str, last_modified: SystemTime) -> bool {
    let Some(value) = headers.get(IF_RANGE) else {
        return true;
    };
    let value = value.as_bytes().trim_ascii();
    if value.starts_with(b"\"") || value.starts_with(b"W/") {
        return value == etag.as_bytes();
    }
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| httpdate::parse_http_date(s).ok())
        .is_some_and(|date| date == last_modified)
}

#[derive(Debug, Clone, Copy)]
enum Spec {
    /// `a-` or `a-b`
    From(u64, Option<u64>),
    /// `-n`
    Suffix(u64),
}

/// `None` means "ignore Range": absent, repeated, another unit, or any syntactically bad spec.
fn range_specs(headers: &HeaderMap) -> Option<Vec<Spec>> {
    let mut values = headers.get_all(RANGE).iter();
    let value = values.next()?;
    // Range is a singleton field; two of them have no defined meaning.
    if values.next().is_some() {
        return None;
    }
    let value = value.to_str().ok()?.trim_matches([' ', '\t']);
    let (unit, set) = value.split_once('=')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut specs = Vec::new();
    for item in set.split(',') {
        let item = item.trim_matches([' ', '\t']);
        if item.is_empty() {
            continue;
        }
        specs.push(parse_spec(item)?);
        if specs.len() > MAX_SPECS {
            return None;
        }
    }
    (!specs.is_empty()).then_some(specs)
}

fn parse_spec(item: &str) -> Option<Spec> {
    let (first, last) = item.split_once('-')?;
    if first.is_empty() {
        return Some(Spec::Suffix(digits(last)?));
    }
    let first = digits(first)?;
    if last.is_empty() {
        return Some(Spec::From(first, None));
    }
    let last = digits(last)?;
    (last >= first).then_some(Spec::From(first, Some(last)))
}

/// Saturating: a position past u64::MAX is past any file, which is what saturation preserves.
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |n, b| {
        n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

/// `len` is non-zero.
fn resolve(spec: Spec, len: u64) -> Option<Range<u64>> {
    match spec {
        Spec::From(first, _) if first >= len => None,
        Spec::From(first, None) => Some(first..len),
        Spec::From(first, Some(last)) => Some(first..last.min(len - 1) + 1),
        Spec::Suffix(0) => None,
        Spec::Suffix(n) => Some(len - n.min(len)..len),
    }
}

fn ranges(specs: &[Spec], len: u64) -> Plan {
    let mut wanted: Vec<Range<u64>> = specs.iter().filter_map(|&s| resolve(s, len)).collect();
    if wanted.is_empty() {
        return Plan::Unsatisfiable;
    }
    // A lone `bytes=0-` stays a 206: media players send it to learn whether ranges work.
    if specs.len() == 1 {
        return Plan::Partial(wanted.swap_remove(0));
    }
    wanted.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(wanted.len());
    for r in wanted {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    if merged.len() > MAX_PARTS || merged.first() == Some(&(0..len)) {
        return Plan::Full;
    }
    if merged.len() == 1 {
        return Plan::Partial(merged.swap_remove(0));
    }
    Plan::Multi(merged)
}

/// A piece of a response body: our own framing bytes, or a span of the file.
enum Seg {
    Bytes(Bytes),
    File(Range<u64>),
}

/// Builds the complete response for a local hit.
pub async fn respond(
    lf: LocalFile,
    method: &Method,
    headers: &HeaderMap,
    content_type: &str,
    cache_control: &str,
) -> Response {
    let tag = etag(lf.len, lf.mtime, lf.inode);
    let (len, mtime) = (lf.len, lf.mtime);
    let plan = plan(method, headers, len, mtime, &tag);

    let mut resp = match plan {
        Plan::PreconditionFailed => return StatusCode::PRECONDITION_FAILED.into_response(),
        Plan::Unsatisfiable => {
            let mut resp = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            set(resp.headers_mut(), CONTENT_RANGE, &format!("bytes */{len}"));
            set(resp.headers_mut(), ACCEPT_RANGES, "bytes");
            return resp;
        }
        Plan::NotModified => StatusCode::NOT_MODIFIED.into_response(),
        Plan::Full | Plan::Partial(_) | Plan::Multi(_) => {
            // SECURITY: a content type that could not be a header value could also forge part
            // headers inside a multipart body; neither is ours to pass through.
            let content_type = if HeaderValue::from_str(content_type).is_ok() {
                content_type
            } else {
                "application/octet-stream"
            };
            match body_response(lf, method == Method::HEAD, plan, content_type).await {
                Ok(resp) => resp,
                Err(e) => {
                    tracing::warn!(error = %e, "reading a spool file failed");
                    return StatusCode::INTERNAL_SERVER_ERROR.into_response();
                }
            }
        }
    };

    let h = resp.headers_mut();
    set(h, ETAG, &tag);
    set(
        h,
        LAST_MODIFIED,
        &httpdate::fmt_http_date(http_seconds(mtime)),
    );
    set(h, CACHE_CONTROL, cache_control);
    set(h, ACCEPT_RANGES, "bytes");
    set(h, X_FERRY_SOURCE, "local");
    resp
}

/// SECURITY: every header value goes through HeaderValue's check, which rejects CR/LF, so no
/// value can split the header block; an invalid one is dropped rather than sent.
fn set(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// The 200/206 response: status, entity headers and a body laid out as segments.
async fn body_response(
    lf: LocalFile,
    head: bool,
    plan: Plan,
    content_type: &str,
) -> io::Result<Response> {
    let len = lf.len;
    let (status, segs, part_type, content_range) = match plan {
        Plan::Partial(r) => {
            let content_range = format!("bytes {}-{}/{len}", r.start, r.end - 1);
            (
                StatusCode::PARTIAL_CONTENT,
                vec![Seg::File(r)],
                content_type.to_owned(),
                Some(content_range),
            )
        }
        Plan::Multi(ranges) => {
            // Random, so no file can contain the delimiter by design (RFC 2046 §5.1.1).
            let boundary = format!("ferry-{:032x}", rand::random::<u128>());
            let mut segs = Vec::with_capacity(ranges.len() * 2 + 1);
            for r in ranges {
                segs.push(Seg::Bytes(Bytes::from(format!(
                    "--{boundary}\r\nContent-Type: {content_type}\r\nContent-Range: bytes {}-{}/{len}\r\n\r\n",
                    r.start,
                    r.end - 1
                ))));
                segs.push(Seg::File(r));
                segs.push(Seg::Bytes(Bytes::from_static(b"\r\n")));
            }
            segs.push(Seg::Bytes(Bytes::from(format!("--{boundary}--\r\n"))));
            (
                StatusCode::PARTIAL_CONTENT,
                segs,
                format!("multipart/byteranges; boundary={boundary}"),
                None,
            )
        }
        _ => (
            StatusCode::OK,
            vec![Seg::File(0..len)],
            content_type.to_owned(),
            None,
        ),
    };
    let body_len: u64 = segs
        .iter()
        .map(|s| match s {
            Seg::Bytes(b) => b.len() as u64,
            Seg::File(r) => r.end - r.start,
        })
        .sum();

    let preloaded = lf
        .preloaded
        .as_ref()
        .filter(|p| p.len() as u64 == len)
        .cloned();
    let mut resp = if head {
        StatusCode::OK.into_response()
    } else if let (Some(all), true) = (preloaded, body_len <= SMALL_BODY) {
        http::Response::new(assemble(&all, segs, body_len)).into_response()
    } else if body_len <= SMALL_BODY {
        let file = lf.file;
        let body = tokio::task::spawn_blocking(move || read_segments(&file, segs, body_len))
            .await
            .map_err(io::Error::other)??;
        http::Response::new(Bytes::from(body)).into_response()
    } else {
        stream_segments(lf.file, segs).await?
    };

    *resp.status_mut() = status;
    let h = resp.headers_mut();
    set(h, CONTENT_TYPE, &part_type);
    set(h, CONTENT_LENGTH, &body_len.to_string());
    if let Some(content_range) = content_range {
        set(h, CONTENT_RANGE, &content_range);
    }
    Ok(resp)
}

/// The body from a preloaded file: a whole-file body is the buffer itself (no copy).
fn assemble(all: &Bytes, segs: Vec<Seg>, body_len: u64) -> Bytes {
    if let [Seg::File(r)] = segs.as_slice() {
        return all.slice(r.start as usize..r.end as usize);
    }
    let mut out = Vec::with_capacity(usize::try_from(body_len).unwrap_or(0));
    for seg in segs {
        match seg {
            Seg::Bytes(b) => out.extend_from_slice(&b),
            Seg::File(r) => out.extend_from_slice(&all[r.start as usize..r.end as usize]),
        }
    }
    Bytes::from(out)
}

/// Positioned reads: no seeking, so the segments need no shared cursor.
fn read_segments(file: &File, segs: Vec<Seg>, body_len: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(usize::try_from(body_len).unwrap_or(0));
    for seg in segs {
        match seg {
            Seg::Bytes(b) => out.extend_from_slice(&b),
            Seg::File(r) => {
                let start = out.len();
                let n = usize::try_from(r.end - r.start).map_err(io::Error::other)?;
                out.resize(start + n, 0);
                // A file that shrank since fstat fails here rather than sending a short body
                // under a Content-Length that promised more.
                file.read_exact_at(&mut out[start..], r.start)?;
            }
        }
    }
    Ok(out)
}

async fn stream_segments(file: File, segs: Vec<Seg>) -> io::Result<Response> {
    let mut file = tokio::fs::File::from_std(file);
    if let [Seg::File(r)] = segs.as_slice() {
        let r = r.clone();
        file.seek(SeekFrom::Start(r.start)).await?;
        // Take: a file that grew since fstat must not overrun the Content-Length we announced.
        let stream = ReaderStream::with_capacity(file.take(r.end - r.start), CHUNK);
        return Ok(warp::reply::stream(stream).into_response());
    }
    let stream = SegmentStream {
        file,
        segs: VecDeque::from(segs),
        step: Step::Next,
        buf: BytesMut::new(),
    };
    Ok(warp::reply::stream(stream).into_response())
}

/// A multipart body streamed from one file handle: framing bytes in between seek-and-read spans.
struct SegmentStream {
    file: tokio::fs::File,
    segs: VecDeque<Seg>,
    step: Step,
    buf: BytesMut,
}

enum Step {
    Next,
    Seeking(u64),
    Reading(u64),
    Done,
}

impl Stream for SegmentStream {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match this.poll_step(cx) {
            Poll::Ready(Some(Err(e))) => {
                // An error ends the body; hyper then aborts the connection, which is how a
                // client learns a response with a Content-Length was cut short.
                this.step = Step::Done;
                Poll::Ready(Some(Err(e)))
            }
            other => other,
        }
    }
}

impl SegmentStream {
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        loop {
            match self.step {
                Step::Done => return Poll::Ready(None),
                Step::Next => match self.segs.pop_front() {
                    None => {
                        self.step = Step::Done;
                        return Poll::Ready(None);
                    }
                    Some(Seg::Bytes(b)) => return Poll::Ready(Some(Ok(b))),
                    Some(Seg::File(r)) => {
                        Pin::new(&mut self.file).start_seek(SeekFrom::Start(r.start))?;
                        self.step = Step::Seeking(r.end - r.start);
                    }
                },
                Step::Seeking(n) => {
                    std::task::ready!(Pin::new(&mut self.file).poll_complete(cx))?;
                    self.step = Step::Reading(n);
                }
                Step::Reading(0) => self.step = Step::Next,
                Step::Reading(n) => {
                    let want = usize::try_from(n).map_or(CHUNK, |n| n.min(CHUNK));
                    self.buf.reserve(want);
                    let mut limited = (&mut self.buf).limit(want);
                    let got = std::task::ready!(tokio_util::io::poll_read_buf(
                        Pin::new(&mut self.file),
                        cx,
                        &mut limited
                    ))?;
                    if got == 0 {
                        return Poll::Ready(Some(Err(io::ErrorKind::UnexpectedEof.into())));
                    }
                    self.step = Step::Reading(n - got as u64);
                    return Poll::Ready(Some(Ok(self.buf.split().freeze())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;
    use std::os::unix::fs::symlink;

    const TAG: &str = "\"a-1-2\"";

    fn mtime() -> SystemTime {
        // Half a second past a whole second, to exercise second-granularity comparisons.
        UNIX_EPOCH + Duration::from_millis(1_700_000_000_500)
    }

    fn date(secs: u64) -> String {
        httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs))
    }

    fn hdrs(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("test header name"),
                HeaderValue::from_str(v).expect("test header value"),
            );
        }
        h
    }

    fn get(pairs: &[(&str, &str)]) -> Plan {
        plan(&Method::GET, &hdrs(pairs), 100, mtime(), TAG)
    }

    fn range(spec: &str) -> Plan {
        get(&[("range", spec)])
    }

    #[test]
    fn no_conditionals_is_full() {
        assert_eq!(get(&[]), Plan::Full);
        assert_eq!(
            plan(&Method::HEAD, &HeaderMap::new(), 100, mtime(), TAG),
            Plan::Full
        );
    }

    #[test]
    fn if_match_uses_strong_comparison() {
        assert_eq!(get(&[("if-match", TAG)]), Plan::Full);
        assert_eq!(get(&[("if-match", "*")]), Plan::Full);
        assert_eq!(get(&[("if-match", "\"x\", \"a-1-2\"")]), Plan::Full);
        assert_eq!(get(&[("if-match", "\"x\""), ("if-match", TAG)]), Plan::Full);
        assert_eq!(get(&[("if-match", "\"x\"")]), Plan::PreconditionFailed);
        assert_eq!(
            get(&[("if-match", "W/\"a-1-2\"")]),
            Plan::PreconditionFailed
        );
        assert_eq!(get(&[("if-match", "garbage")]), Plan::PreconditionFailed);
    }

    #[test]
    fn if_unmodified_since() {
        assert_eq!(
            get(&[("if-unmodified-since", &date(1_700_000_000))]),
            Plan::Full
        );
        assert_eq!(
            get(&[("if-unmodified-since", &date(1_699_999_999))]),
            Plan::PreconditionFailed
        );
        // Ignored when If-Match is present.
        assert_eq!(
            get(&[("if-match", TAG), ("if-unmodified-since", &date(1))]),
            Plan::Full
        );
        // An invalid date is ignored.
        assert_eq!(get(&[("if-unmodified-since", "yesterday")]), Plan::Full);
    }

    #[test]
    fn if_none_match_uses_weak_comparison() {
        assert_eq!(get(&[("if-none-match", TAG)]), Plan::NotModified);
        assert_eq!(get(&[("if-none-match", "W/\"a-1-2\"")]), Plan::NotModified);
        assert_eq!(get(&[("if-none-match", "*")]), Plan::NotModified);
        assert_eq!(
            get(&[("if-none-match", "\"x\" ,W/\"y\",  \"a-1-2\"")]),
            Plan::NotModified
        );
        assert_eq!(get(&[("if-none-match", "\"x\", \"y\"")]), Plan::Full);
        assert_eq!(get(&[("if-none-match", "\"a-1-2")]), Plan::Full);
        assert_eq!(
            plan(
                &Method::HEAD,
                &hdrs(&[("if-none-match", TAG)]),
                100,
                mtime(),
                TAG
            ),
            Plan::NotModified
        );
        assert_eq!(
            plan(
                &Method::POST,
                &hdrs(&[("if-none-match", TAG)]),
                100,
                mtime(),
                TAG
            ),
            Plan::PreconditionFailed
        );
    }

    #[test]
    fn if_modified_since_at_second_granularity() {
        assert_eq!(
            get(&[("if-modified-since", &date(1_700_000_000))]),
            Plan::NotModified
        );
        assert_eq!(
            get(&[("if-modified-since", &date(1_800_000_000))]),
            Plan::NotModified
        );
        assert_eq!(
            get(&[("if-modified-since", &date(1_699_999_999))]),
            Plan::Full
        );
        assert_eq!(get(&[("if-modified-since", "not a date")]), Plan::Full);
        // If-None-Match present (and not matching) overrides it.
        assert_eq!(
            get(&[
                ("if-none-match", "\"other\""),
                ("if-modified-since", &date(1_800_000_000))
            ]),
            Plan::Full
        );
        assert_eq!(
            plan(
                &Method::POST,
                &hdrs(&[("if-modified-since", &date(1_800_000_000))]),
                100,
                mtime(),
                TAG
            ),
            Plan::Full
        );
    }

    #[test]
    fn single_ranges() {
        assert_eq!(range("bytes=0-9"), Plan::Partial(0..10));
        assert_eq!(range("bytes=90-"), Plan::Partial(90..100));
        assert_eq!(range("bytes=0-"), Plan::Partial(0..100));
        assert_eq!(range("bytes=-10"), Plan::Partial(90..100));
        assert_eq!(range("bytes=-1000"), Plan::Partial(0..100));
        assert_eq!(range("bytes=50-1000"), Plan::Partial(50..100));
        assert_eq!(range("bytes=99-99"), Plan::Partial(99..100));
        assert_eq!(range("Bytes=1-2"), Plan::Partial(1..3));
        assert_eq!(range(" bytes= 1-2 , "), Plan::Partial(1..3));
        assert_eq!(
            range("bytes=0-99999999999999999999999"),
            Plan::Partial(0..100)
        );
        assert_eq!(
            plan(
                &Method::HEAD,
                &hdrs(&[("range", "bytes=0-9")]),
                100,
                mtime(),
                TAG
            ),
            Plan::Partial(0..10)
        );
    }

    #[test]
    fn unsatisfiable_ranges() {
        assert_eq!(range("bytes=100-"), Plan::Unsatisfiable);
        assert_eq!(range("bytes=100-200"), Plan::Unsatisfiable);
        assert_eq!(range("bytes=-0"), Plan::Unsatisfiable);
        assert_eq!(range("bytes=-0,200-300"), Plan::Unsatisfiable);
        assert_eq!(range("bytes=99999999999999999999999-"), Plan::Unsatisfiable);
    }

    #[test]
    fn invalid_range_headers_are_ignored() {
        for spec in [
            "bytes=5-2",
            "bytes=abc",
            "bytes=",
            "bytes=,",
            "bytes=-",
            "bytes=1-2-3",
            "bytes=0-1,x",
            "bytes=+1-2",
            "bytes = 0-1",
            "items=0-1",
            "0-1",
            "",
        ] {
            assert_eq!(range(spec), Plan::Full, "{spec:?}");
        }
        assert_eq!(
            get(&[("range", "bytes=0-1"), ("range", "bytes=2-3")]),
            Plan::Full
        );
        let many = format!("bytes={}", vec!["0-0"; MAX_SPECS + 1].join(","));
        assert_eq!(range(&many), Plan::Full);
    }

    #[test]
    fn several_ranges() {
        assert_eq!(range("bytes=50-59,0-9"), Plan::Multi(vec![0..10, 50..60]));
        assert_eq!(range("bytes=0-9,5-19"), Plan::Partial(0..20));
        assert_eq!(range("bytes=0-9,10-19"), Plan::Partial(0..20));
        assert_eq!(range("bytes=0-9,200-300"), Plan::Partial(0..10));
        assert_eq!(range("bytes=0-0,-1"), Plan::Multi(vec![0..1, 99..100]));
        assert_eq!(range("bytes=0-49,50-"), Plan::Full);
        assert_eq!(range("bytes=0-,0-"), Plan::Full);
        let sixteen: Vec<String> = (0..16).map(|i| format!("{0}-{0}", i * 2)).collect();
        assert!(matches!(
            range(&format!("bytes={}", sixteen.join(","))),
            Plan::Multi(v) if v.len() == 16
        ));
        let seventeen: Vec<String> = (0..17).map(|i| format!("{0}-{0}", i * 2)).collect();
        assert_eq!(range(&format!("bytes={}", seventeen.join(","))), Plan::Full);
    }

    #[test]
    fn empty_file_ignores_range() {
        for spec in ["bytes=0-", "bytes=-1", "bytes=5-9", "bytes=0-0,2-3"] {
            assert_eq!(
                plan(&Method::GET, &hdrs(&[("range", spec)]), 0, mtime(), TAG),
                Plan::Full
            );
        }
    }

    #[test]
    fn if_range() {
        let r = ("range", "bytes=0-9");
        assert_eq!(get(&[r, ("if-range", TAG)]), Plan::Partial(0..10));
        assert_eq!(get(&[r, ("if-range", "\"other\"")]), Plan::Full);
        assert_eq!(get(&[r, ("if-range", "W/\"a-1-2\"")]), Plan::Full);
        assert_eq!(
            get(&[r, ("if-range", &date(1_700_000_000))]),
            Plan::Partial(0..10)
        );
        assert_eq!(get(&[r, ("if-range", &date(1_700_000_001))]), Plan::Full);
        assert_eq!(get(&[r, ("if-range", "garbage")]), Plan::Full);
        // If-Range without Range changes nothing.
        assert_eq!(get(&[("if-range", "\"other\"")]), Plan::Full);
    }

    #[test]
    fn conditionals_come_before_range() {
        assert_eq!(
            get(&[("range", "bytes=0-9"), ("if-none-match", TAG)]),
            Plan::NotModified
        );
        assert_eq!(
            get(&[("range", "bytes=500-"), ("if-match", "\"x\"")]),
            Plan::PreconditionFailed
        );
        assert_eq!(
            plan(
                &Method::POST,
                &hdrs(&[("range", "bytes=0-9")]),
                100,
                mtime(),
                TAG
            ),
            Plan::Full
        );
    }

    #[test]
    fn etag_is_quoted_hex() {
        let t = UNIX_EPOCH + Duration::from_nanos(0x1a2b3c);
        assert_eq!(etag(0x5f3a, t, 0x77), "\"5f3a-1a2b3c-77\"");
        let before = UNIX_EPOCH - Duration::from_secs(1);
        assert_ne!(
            etag(1, before, 1),
            etag(1, UNIX_EPOCH + Duration::from_secs(1), 1)
        );
        assert!(HeaderValue::from_str(&etag(u64::MAX, before, u64::MAX)).is_ok());
    }

    #[test]
    fn http_seconds_never_panics_httpdate() {
        let far = UNIX_EPOCH + Duration::from_secs(MAX_HTTP_SECS + 1000);
        let _ = httpdate::fmt_http_date(http_seconds(far));
        let _ = httpdate::fmt_http_date(http_seconds(UNIX_EPOCH - Duration::from_secs(10)));
    }

    proptest! {
        #[test]
        fn plan_never_panics_on_any_range(spec in "\\PC*", len in 0u64..5000) {
            check_plan(&spec, len)?;
        }

        #[test]
        fn plan_keeps_ranges_inside(spec in "bytes=[0-9, \\-]{0,40}", len in 0u64..5000) {
            check_plan(&spec, len)?;
        }
    }

    fn check_plan(spec: &str, len: u64) -> Result<(), TestCaseError> {
        let Ok(value) = HeaderValue::from_str(spec) else {
            return Ok(());
        };
        let mut h = HeaderMap::new();
        h.insert(RANGE, value);
        match plan(&Method::GET, &h, len, mtime(), TAG) {
            Plan::Partial(r) => prop_assert!(r.start < r.end && r.end <= len),
            Plan::Multi(rs) => {
                prop_assert!(rs.len() >= 2 && rs.len() <= MAX_PARTS);
                for w in rs.windows(2) {
                    prop_assert!(w[0].end < w[1].start);
                }
                for r in rs {
                    prop_assert!(r.start < r.end && r.end <= len);
                }
            }
            Plan::Unsatisfiable => prop_assert!(len > 0),
            Plan::Full => {}
            other => prop_assert!(false, "unexpected {other:?}"),
        }
        Ok(())
    }

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

    // ---- respond ----

    const CT: &str = "image/jpeg";
    const CC: &str = "public, max-age=60";

    fn content(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
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
        let Some(fast) = (0..100).find_map(|_| try_open_cached(&dir, "a/f.jpg", true)) else {
            return;
        };
        let fast = fast.expect("open").expect("file");
        assert_eq!((fast.len, fast.inode), (slow.len, slow.inode));
        if let Some(b) = fast.preloaded {
            assert_eq!(&b[..], b"hello");
        }
        for absent in ["link", "nope", "a/f.jpg/x", "../x"] {
            if let Some(r) = try_open_cached(&dir, absent, true) {
                assert!(r.expect("no error").is_none(), "{absent}");
            }
        }
    }

    fn local(data: &[u8]) -> (tempfile::NamedTempFile, LocalFile) {
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        f.write_all(data).expect("write");
        let file = File::open(f.path()).expect("open");
        let meta = file.metadata().expect("meta");
        let lf = LocalFile {
            len: meta.len(),
            mtime: meta.modified().expect("mtime"),
            inode: meta.ino(),
            file,
            preloaded: None,
        };
        (f, lf)
    }

    async fn send(data: &[u8], method: Method, pairs: &[(&str, &str)]) -> (Response, Vec<u8>) {
        let (_f, lf) = local(data);
        let resp = respond(lf, &method, &hdrs(pairs), CT, CC).await;
        let (parts, mut body) = resp.into_parts();
        let mut out = Vec::new();
        while let Some(frame) =
            std::future::poll_fn(|cx| warp::hyper::body::Body::poll_frame(Pin::new(&mut body), cx))
                .await
        {
            if let Ok(data) = frame.expect("body frame").into_data() {
                out.extend_from_slice(&data);
            }
        }
        (Response::from_parts(parts, Default::default()), out)
    }

    fn header<'a>(resp: &'a Response, name: &str) -> Option<&'a str> {
        resp.headers().get(name).and_then(|v| v.to_str().ok())
    }

    fn assert_validators(resp: &Response) {
        assert!(header(resp, "etag").is_some_and(|t| t.starts_with('"')));
        assert!(header(resp, "last-modified").is_some());
        assert_eq!(header(resp, "cache-control"), Some(CC));
        assert_eq!(header(resp, "accept-ranges"), Some("bytes"));
        assert_eq!(header(resp, "x-ferry-source"), Some("local"));
    }

    #[tokio::test]
    async fn full_get() {
        let data = content(1000);
        let (resp, body) = send(&data, Method::GET, &[]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_validators(&resp);
        assert_eq!(header(&resp, "content-type"), Some(CT));
        assert_eq!(header(&resp, "content-length"), Some("1000"));
        assert_eq!(header(&resp, "content-range"), None);
        assert_eq!(body, data);
    }

    #[tokio::test]
    async fn single_suffix_and_open_ranges() {
        let data = content(1000);
        for (spec, want) in [
            ("bytes=10-19", 10..20),
            ("bytes=-5", 995..1000),
            ("bytes=990-", 990..1000),
        ] {
            let (resp, body) = send(&data, Method::GET, &[("range", spec)]).await;
            assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT, "{spec}");
            assert_validators(&resp);
            assert_eq!(header(&resp, "content-type"), Some(CT));
            let len = (want.end - want.start).to_string();
            assert_eq!(header(&resp, "content-length"), Some(len.as_str()));
            let cr = format!("bytes {}-{}/1000", want.start, want.end - 1);
            assert_eq!(header(&resp, "content-range"), Some(cr.as_str()));
            assert_eq!(body, data[want].to_vec(), "{spec}");
        }
    }

    /// Splits a multipart/byteranges body into (content-range, data) pairs, checking the framing.
    fn parse_multipart(body: &[u8], boundary: &str) -> Vec<(String, Vec<u8>)> {
        let delim = format!("--{boundary}");
        let mut parts = Vec::new();
        let mut rest = body;
        loop {
            assert!(rest.starts_with(delim.as_bytes()), "delimiter expected");
            rest = &rest[delim.len()..];
            if rest == b"--\r\n" {
                return parts;
            }
            assert!(rest.starts_with(b"\r\n"));
            rest = &rest[2..];
            let head_end = rest
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .expect("part headers end");
            let head = std::str::from_utf8(&rest[..head_end]).expect("ascii headers");
            rest = &rest[head_end + 4..];
            let mut range = None;
            for line in head.split("\r\n") {
                let (k, v) = line.split_once(": ").expect("header line");
                match k {
                    "Content-Type" => assert_eq!(v, CT),
                    "Content-Range" => range = Some(v.to_owned()),
                    other => panic!("unexpected part header {other}"),
                }
            }
            let range = range.expect("content-range");
            let (span, total) = range
                .strip_prefix("bytes ")
                .and_then(|r| r.split_once('/'))
                .expect("range form");
            let (a, b) = span.split_once('-').expect("span");
            let n = b.parse::<usize>().expect("b") - a.parse::<usize>().expect("a") + 1;
            assert!(total.parse::<usize>().is_ok());
            parts.push((range.clone(), rest[..n].to_vec()));
            rest = &rest[n..];
            assert!(rest.starts_with(b"\r\n"));
            rest = &rest[2..];
        }
    }

    async fn check_multi(size: usize) {
        let data = content(size);
        let spec = format!("bytes=-10,0-4,{}-{}", size / 2, size / 2 + 99);
        let (resp, body) = send(&data, Method::GET, &[("range", &spec)]).await;
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        assert_validators(&resp);
        assert_eq!(header(&resp, "content-range"), None);
        let ct = header(&resp, "content-type").expect("content-type");
        let boundary = ct
            .strip_prefix("multipart/byteranges; boundary=")
            .expect("multipart type");
        assert_eq!(
            header(&resp, "content-length"),
            Some(body.len().to_string().as_str())
        );
        let parts = parse_multipart(&body, boundary);
        let half = size / 2;
        let want = [
            (format!("bytes 0-4/{size}"), data[0..5].to_vec()),
            (
                format!("bytes {}-{}/{size}", half, half + 99),
                data[half..half + 100].to_vec(),
            ),
            (
                format!("bytes {}-{}/{size}", size - 10, size - 1),
                data[size - 10..].to_vec(),
            ),
        ];
        assert_eq!(parts, want);
    }

    #[tokio::test]
    async fn multi_range_small() {
        check_multi(1000).await;
    }

    #[tokio::test]
    async fn large_bodies_stream() {
        let size = 3 * SMALL_BODY as usize + 12345;
        let data = content(size);
        let (resp, body) = send(&data, Method::GET, &[]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body, data);

        let spec = format!("bytes=100-{}", 2 * SMALL_BODY);
        let (resp, body) = send(&data, Method::GET, &[("range", &spec)]).await;
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(body, data[100..=2 * SMALL_BODY as usize].to_vec());

        check_multi(size).await;
        // A multipart body large enough to be streamed.
        let spec = format!("bytes=0-{},-{}", SMALL_BODY, SMALL_BODY);
        let (resp, body) = send(&data, Method::GET, &[("range", &spec)]).await;
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        let ct = header(&resp, "content-type").expect("content-type");
        let boundary = ct
            .strip_prefix("multipart/byteranges; boundary=")
            .expect("multipart type");
        assert_eq!(
            header(&resp, "content-length"),
            Some(body.len().to_string().as_str())
        );
        let parts = parse_multipart(&body, boundary);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].1, data[..=SMALL_BODY as usize].to_vec());
        assert_eq!(parts[1].1, data[size - SMALL_BODY as usize..].to_vec());
    }

    #[tokio::test]
    async fn head_has_headers_but_no_body() {
        let data = content(1000);
        let (resp, body) = send(&data, Method::HEAD, &[]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_validators(&resp);
        assert_eq!(header(&resp, "content-length"), Some("1000"));
        assert_eq!(header(&resp, "content-type"), Some(CT));
        assert!(body.is_empty());

        let (resp, body) = send(&data, Method::HEAD, &[("range", "bytes=0-9")]).await;
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(header(&resp, "content-length"), Some("10"));
        assert_eq!(header(&resp, "content-range"), Some("bytes 0-9/1000"));
        assert!(body.is_empty());
    }

    #[tokio::test]
    async fn not_modified_on_matching_etag() {
        let data = content(100);
        let (_f, lf) = local(&data);
        let tag = etag(lf.len, lf.mtime, lf.inode);
        let resp = respond(lf, &Method::GET, &hdrs(&[("if-none-match", &tag)]), CT, CC).await;
        assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
        assert_validators(&resp);
        assert_eq!(header(&resp, "etag"), Some(tag.as_str()));
        assert_eq!(header(&resp, "content-type"), None);
    }

    #[tokio::test]
    async fn unsatisfiable_and_failed_preconditions() {
        let data = content(100);
        let (resp, body) = send(&data, Method::GET, &[("range", "bytes=100-")]).await;
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(header(&resp, "content-range"), Some("bytes */100"));
        assert_eq!(header(&resp, "x-ferry-source"), None);
        assert!(body.is_empty());

        let (resp, body) = send(&data, Method::GET, &[("if-match", "\"nope\"")]).await;
        assert_eq!(resp.status(), StatusCode::PRECONDITION_FAILED);
        assert_eq!(header(&resp, "x-ferry-source"), None);
        assert!(body.is_empty());
    }

    #[tokio::test]
    async fn empty_file_with_range_is_full() {
        let (resp, body) = send(b"", Method::GET, &[("range", "bytes=0-")]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header(&resp, "content-length"), Some("0"));
        assert!(body.is_empty());
    }

    #[tokio::test]
    async fn bad_content_type_is_replaced() {
        let (_f, lf) = local(b"abc");
        let resp = respond(
            lf,
            &Method::GET,
            &HeaderMap::new(),
            "text/plain\r\nX-Evil: 1",
            CC,
        )
        .await;
        assert_eq!(
            header(&resp, "content-type"),
            Some("application/octet-stream")
        );
        assert_eq!(header(&resp, "x-evil"), None);
    }
}
