//! HTTP semantics for every source (spool, hot cache, S3 proxy, archive): a source describes
//! its *representation* (length, ETag, Last-Modified, content type, cacheability); this module
//! alone decides 200, 206, 304, 412 or 416 (RFC 9110 §13.2.2 order, then If-Range and Range)
//! and writes the validator, caching and active-content headers, so every source answers the
//! same request the same way (DESIGN.md "HTTP semantics"; nginx's range and not-modified
//! output filters are the model). A source then only supplies bytes.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{Stream, TryStreamExt};
use http::header::{
    HeaderName, HeaderValue, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_LENGTH,
    CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE,
    IF_UNMODIFIED_SINCE, LAST_MODIFIED, RANGE, RETRY_AFTER,
};
use http::{HeaderMap, Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncSeek, AsyncSeekExt};
use tokio_util::io::ReaderStream;
use warp::reply::{Reply, Response};

use super::local::LocalFile;
use crate::catalog::FileStat;
use crate::config::ActiveContent;

/// Bodies from bytes in memory up to this size are built as one buffer; past it, as slices.
pub const SMALL_BODY: u64 = 256 * 1024;
/// Read size for streamed bodies: large enough to keep syscalls rare, small enough to bound memory per request.
const CHUNK: usize = 64 * 1024;
/// Past this many ranges a multipart answer costs more than it saves; RFC 9110 §14.2 lets us send the whole file.
const MAX_PARTS: usize = 16;
/// Sorting and merging is the only super-linear step; a legitimate client never sends this many.
const MAX_SPECS: usize = 256;
/// 9999-12-31T23:59:59Z: httpdate cannot format anything later (and panics on it).
const MAX_HTTP_SECS: u64 = 253_402_300_799;

pub const X_FERRY_SOURCE: HeaderName = HeaderName::from_static("x-ferry-source");
const CSP: HeaderName = HeaderName::from_static("content-security-policy");
pub const NOSNIFF: HeaderName = HeaderName::from_static("x-content-type-options");

/// An entity tag: the quoted opaque part, and whether it is weak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Etag {
    /// With its quotes, as it appears after any `W/`.
    quoted: String,
    weak: bool,
}

impl Etag {
    /// The one tag of a version whose SHA-256 is known: the same from every source and every
    /// node, so revalidation and If-Range work across them.
    pub fn sha256(hex: &str) -> Etag {
        Etag {
            quoted: format!("\"{hex}\""),
            weak: false,
        }
    }

    /// A file not yet hashed, from (len, mtime nanos, inode, ctime nanos), quoted hex:
    /// `"5f3a-1a2b3c-77-1a2b3d"`. The inode distinguishes a file replaced by rename with the
    /// same size and mtime; the ctime one rewritten in place with its length and mtime kept
    /// (`cp -p`, `rsync --inplace -t`, `touch -d`), which the kernel cannot backdate.
    pub fn local(len: u64, mtime: SystemTime, inode: u64, ctime_ns: i64) -> Etag {
        // Signed so an mtime before 1970 still yields a distinct tag instead of an error.
        let nanos: i128 = match mtime.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        };
        Etag {
            quoted: format!("\"{len:x}-{nanos:x}-{inode:x}-{ctime_ns:x}\""),
            weak: false,
        }
    }

    /// A file that may still be written: a writer can change bytes without changing the stat
    /// the tag is made of (within mtime's granularity), so the tag must never satisfy a
    /// strong comparison (If-Match, If-Range); revalidation (If-None-Match) still works.
    pub fn weaken(mut self) -> Etag {
        self.weak = true;
        self
    }

    pub fn is_weak(&self) -> bool {
        self.weak
    }

    /// The header value: `"…"` or `W/"…"`.
    pub fn header(&self) -> String {
        if self.weak {
            format!("W/{}", self.quoted)
        } else {
            self.quoted.clone()
        }
    }
}

/// Whether downstream caches may keep the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caching {
    /// A finished version: `http.cache_control`.
    Public,
    /// Not final yet (a spool file that is not ready): `no-store`, so no CDN keeps a
    /// truncated body.
    NoStore,
}

/// What a source knows about the bytes it can send, before it sends any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Representation {
    pub len: u64,
    pub etag: Option<Etag>,
    pub last_modified: Option<SystemTime>,
    pub content_type: String,
    pub caching: Caching,
}

/// The operator's choices that shape every answer.
#[derive(Debug, Clone)]
pub struct Policy {
    pub cache_control: String,
    pub active_content: ActiveContent,
}

/// What to send, decided from the request headers and the representation only.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    NotModified,
    PreconditionFailed,
    Full,
    Partial(Range<u64>),
    Multi(Vec<Range<u64>>),
    Unsatisfiable,
}

/// Last-Modified as HTTP can express it: whole seconds within httpdate's range.
fn http_seconds(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .min(MAX_HTTP_SECS);
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Evaluates the conditionals in RFC 9110 §13.2.2 order, then If-Range and Range.
pub fn plan(method: &Method, headers: &HeaderMap, rep: &Representation) -> Plan {
    let safe = method == Method::GET || method == Method::HEAD;
    let last_modified = rep.last_modified.map(http_seconds);
    let etag = rep.etag.as_ref();
    let len = rep.len;

    if let Some(matched) = tag_list_matches(headers, &IF_MATCH, etag, false) {
        if !matched {
            return Plan::PreconditionFailed;
        }
    } else if let (Some(since), Some(lm)) =
        (header_date(headers, &IF_UNMODIFIED_SINCE), last_modified)
    {
        if lm > since {
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
        if let (Some(since), Some(lm)) = (header_date(headers, &IF_MODIFIED_SINCE), last_modified) {
            if lm <= since {
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
/// safe (412), for If-None-Match it falls back to a full answer. With no ETag only `*` matches.
fn tag_list_matches(
    headers: &HeaderMap,
    name: &HeaderName,
    etag: Option<&Etag>,
    weak_compare: bool,
) -> Option<bool> {
    let mut values = headers.get_all(name).iter().peekable();
    values.peek()?;
    let mut found = false;
    for value in values {
        match list_matches(value.as_bytes(), etag, weak_compare) {
            Some(true) => found = true,
            Some(false) => {}
            None => return Some(false),
        }
    }
    Some(found)
}

/// `None` when the value is not `*` nor a valid entity-tag list.
fn list_matches(value: &[u8], etag: Option<&Etag>, weak_compare: bool) -> Option<bool> {
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
        // RFC 9110 §8.8.3.2: the strong function needs both tags strong; the weak one only
        // compares the opaque parts.
        if let Some(ours) = etag {
            let strong_ok = !weak && !ours.weak;
            if (weak_compare || strong_ok) && tag == ours.quoted.as_bytes() {
                found = true;
            }
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

/// If-Range needs an exact strong match; anything else (weak tag, other date, garbage, a
/// representation that is itself weak) means the client's partial copy may not be ours and
/// it must get the whole file.
fn if_range_holds(
    headers: &HeaderMap,
    etag: Option<&Etag>,
    last_modified: Option<SystemTime>,
) -> bool {
    let Some(value) = headers.get(IF_RANGE) else {
        return true;
    };
    if etag.is_some_and(|t| t.weak) {
        return false;
    }
    let value = value.as_bytes().trim_ascii();
    if value.starts_with(b"\"") || value.starts_with(b"W/") {
        return etag.is_some_and(|t| value == t.quoted.as_bytes());
    }
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| httpdate::parse_http_date(s).ok())
        .is_some_and(|date| Some(date) == last_modified)
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
#[derive(Debug, Clone)]
pub enum Seg {
    Bytes(Bytes),
    File(Range<u64>),
}

impl Seg {
    /// The bytes `segs` put on the wire.
    pub fn total(segs: &[Seg]) -> u64 {
        segs.iter()
            .map(|s| match s {
                Seg::Bytes(b) => b.len() as u64,
                Seg::File(r) => r.end - r.start,
            })
            .sum()
    }
}

/// The answers that carry no bytes of the representation: 304, 412 and 416. `None` means
/// the plan needs a body (200 or 206), which the source supplies.
pub fn bodiless(
    plan: &Plan,
    rep: &Representation,
    policy: &Policy,
    source: &'static str,
) -> Option<Response> {
    match plan {
        Plan::PreconditionFailed => Some(StatusCode::PRECONDITION_FAILED.into_response()),
        Plan::Unsatisfiable => {
            let mut resp = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            let h = resp.headers_mut();
            set(h, CONTENT_RANGE, &format!("bytes */{}", rep.len));
            set(h, ACCEPT_RANGES, "bytes");
            Some(resp)
        }
        Plan::NotModified => {
            let mut resp = StatusCode::NOT_MODIFIED.into_response();
            decorate(resp.headers_mut(), rep, policy, source);
            Some(resp)
        }
        Plan::Full | Plan::Partial(_) | Plan::Multi(_) => None,
    }
}

/// The content type as it may go out. SECURITY: a type that could not be a header value
/// could also forge part headers inside a multipart body; neither is ours to pass through.
fn sendable_type(rep: &Representation) -> &str {
    if HeaderValue::from_str(&rep.content_type).is_ok() {
        &rep.content_type
    } else {
        "application/octet-stream"
    }
}

/// Validators, caching and active-content headers, the same on every 200, 206 and 304 of
/// every source.
pub fn decorate(h: &mut HeaderMap, rep: &Representation, policy: &Policy, source: &'static str) {
    if let Some(tag) = &rep.etag {
        set(h, ETAG, &tag.header());
    }
    if let Some(lm) = rep.last_modified {
        set(h, LAST_MODIFIED, &httpdate::fmt_http_date(http_seconds(lm)));
    }
    match rep.caching {
        Caching::Public => set(h, CACHE_CONTROL, &policy.cache_control),
        Caching::NoStore => set(h, CACHE_CONTROL, "no-store"),
    }
    set(h, ACCEPT_RANGES, "bytes");
    set(h, X_FERRY_SOURCE, source);
    // SECURITY: an upload that a browser could run (HTML, SVG, XML, script, or any type we
    // cannot vouch for) runs in an opaque origin, or is downloaded, never as the site itself.
    if !crate::media::is_passive(sendable_type(rep)) {
        match policy.active_content {
            ActiveContent::Sandbox => set(h, CSP, "sandbox"),
            ActiveContent::Attachment => {
                set(h, CSP, "sandbox");
                set(h, CONTENT_DISPOSITION, "attachment");
            }
            ActiveContent::Allow => {}
        }
    }
}

/// Status and entity headers of a one-part answer whose bytes the source streams itself
/// (the S3 proxy, the archive file server): `range` is `None` for the whole representation.
fn one_part(resp: &mut Response, rep: &Representation, range: Option<&Range<u64>>) {
    let h = resp.headers_mut();
    set(h, CONTENT_TYPE, sendable_type(rep));
    match range {
        Some(r) => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = resp.headers_mut();
            set(h, CONTENT_LENGTH, &(r.end - r.start).to_string());
            set(
                h,
                CONTENT_RANGE,
                &format!("bytes {}-{}/{}", r.start, r.end - 1, rep.len),
            );
        }
        None => {
            *resp.status_mut() = StatusCode::OK;
            set(resp.headers_mut(), CONTENT_LENGTH, &rep.len.to_string());
        }
    }
}

/// What a source that streams one part (the S3 proxy, the archive file server) does next.
pub enum Streamed {
    /// Decided without bytes: 304, 412 or 416.
    Answer(Response),
    /// Fetch this range (`None`: the whole object). Several ranges are answered whole, as
    /// RFC 9110 §14.2 allows: S3 serves one range per GET.
    Fetch(Option<Range<u64>>),
}

/// The plan for a source that streams one part.
pub fn streamed(
    method: &Method,
    headers: &HeaderMap,
    rep: &Representation,
    policy: &Policy,
    source: &'static str,
) -> Streamed {
    let plan = plan(method, headers, rep);
    if let Some(r) = bodiless(&plan, rep, policy, source) {
        return Streamed::Answer(r);
    }
    Streamed::Fetch(match plan {
        Plan::Partial(r) => Some(r),
        _ => None,
    })
}

/// Finishes a streamed body (or an empty one, for HEAD) fetched for `range`.
pub fn streamed_response(
    mut resp: Response,
    rep: &Representation,
    range: Option<&Range<u64>>,
    policy: &Policy,
    source: &'static str,
) -> Response {
    one_part(&mut resp, rep, range);
    decorate(resp.headers_mut(), rep, policy, source);
    resp
}

/// The S3 form of a one-part plan's range (`None`: the whole object).
pub fn range_header(r: &Range<u64>) -> String {
    format!("bytes={}-{}", r.start, r.end - 1)
}

/// The complete answer from an open file (spool, hot cache, local archive), any plan. The
/// caller checked that `rep.len` is the file's length.
pub async fn respond_file(
    lf: LocalFile,
    method: &Method,
    headers: &HeaderMap,
    rep: &Representation,
    policy: &Policy,
    source: &'static str,
) -> Response {
    let plan = plan(method, headers, rep);
    if let Some(resp) = bodiless(&plan, rep, policy, source) {
        return resp;
    }
    // A public answer promises these bytes are the version its tag names: a file someone
    // rewrites in place while it is read must not go out under it.
    let guard = lf.foreign && matches!(rep.caching, Caching::Public);
    let head = method == Method::HEAD;
    let mut resp = match body_response(lf, head, plan, sendable_type(rep), guard).await {
        Ok(resp) => resp,
        Err(e) if e.get_ref().is_some_and(|r| r.is::<ChangedWhileRead>()) => {
            tracing::info!(
                source,
                "the file changed while it was read; asking the client to retry"
            );
            let mut resp = StatusCode::SERVICE_UNAVAILABLE.into_response();
            set(resp.headers_mut(), CACHE_CONTROL, "no-store");
            set(resp.headers_mut(), RETRY_AFTER, "1");
            return resp;
        }
        Err(e) => {
            tracing::warn!(error = %e, source, "reading a local file failed");
            let mut resp = StatusCode::INTERNAL_SERVER_ERROR.into_response();
            set(resp.headers_mut(), CACHE_CONTROL, "no-store");
            return resp;
        }
    };
    decorate(resp.headers_mut(), rep, policy, source);
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
/// The file's stat moved between the open and the end of the read: what was read may mix
/// two versions.
#[derive(Debug, thiserror::Error)]
#[error("the file changed while it was read")]
struct ChangedWhileRead;

fn changed_while_read() -> io::Error {
    io::Error::other(ChangedWhileRead)
}

/// A 200/206 answer's status, body segments, Content-Type and Content-Range, from the plan.
struct Layout {
    status: StatusCode,
    segs: Vec<Seg>,
    part_type: String,
    content_range: Option<String>,
    body_len: u64,
}

fn layout(plan: Plan, len: u64, content_type: &str) -> Layout {
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
    let body_len = Seg::total(&segs);
    Layout {
        status,
        segs,
        part_type,
        content_range,
        body_len,
    }
}

impl Layout {
    /// Status and entity headers onto `resp`, whose body the source made.
    fn finish(self, mut resp: Response) -> Response {
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        set(h, CONTENT_TYPE, &self.part_type);
        set(h, CONTENT_LENGTH, &self.body_len.to_string());
        if let Some(content_range) = &self.content_range {
            set(h, CONTENT_RANGE, content_range);
        }
        resp
    }
}

/// The complete answer from a whole file's bytes in memory (`serve::memo`), any plan: no
/// read, no copy of a one-part body. The caller checked that `rep.len` is `all`'s length.
pub fn respond_bytes(
    all: Bytes,
    method: &Method,
    headers: &HeaderMap,
    rep: &Representation,
    policy: &Policy,
    source: &'static str,
) -> Response {
    let plan = plan(method, headers, rep);
    if let Some(resp) = bodiless(&plan, rep, policy, source) {
        return resp;
    }
    let mut l = layout(plan, all.len() as u64, sendable_type(rep));
    let segs = std::mem::take(&mut l.segs);
    let resp = if method == Method::HEAD {
        StatusCode::OK.into_response()
    } else {
        bytes_body(all, segs, l.body_len)
    };
    let mut resp = l.finish(resp);
    decorate(resp.headers_mut(), rep, policy, source);
    resp
}

async fn body_response(
    lf: LocalFile,
    head: bool,
    plan: Plan,
    content_type: &str,
    guard: bool,
) -> io::Result<Response> {
    let len = lf.len;
    let mut l = layout(plan, len, content_type);
    let segs = std::mem::take(&mut l.segs);
    let body_len = l.body_len;

    let preloaded = lf
        .preloaded
        .as_ref()
        .filter(|p| p.len() as u64 == len)
        .cloned();
    let resp = if head {
        StatusCode::OK.into_response()
    } else if let Some(all) = preloaded {
        if guard && lf.changed_since_open() {
            return Err(changed_while_read());
        }
        bytes_body(all, segs, body_len)
    } else if !guard && sendable(&lf.file, &segs) {
        sendfile_response(lf, segs)
    } else if let Some(all) = (lf.len <= SMALL_BODY)
        .then(|| super::local::read_nowait(&lf.file, lf.len as usize))
        .flatten()
    {
        // Cached pages, read on this thread (where cachestat may not be asked, or a file
        // was not read whole at its open): no hop to a blocking thread.
        if guard && lf.changed_since_open() {
            return Err(changed_while_read());
        }
        bytes_body(all, segs, body_len)
    } else if body_len <= SMALL_BODY {
        let body = tokio::task::spawn_blocking(move || {
            let body = read_segments(&lf.file, segs, body_len);
            // Checked on a failed read too: a file cut short mid-read is a rewrite, not a
            // fault of ours.
            if guard && lf.changed_since_open() {
                return Err(changed_while_read());
            }
            body
        })
        .await
        .map_err(io::Error::other)??;
        http::Response::new(Bytes::from(body)).into_response()
    } else {
        // Headers go before the last byte is read: a change found at the end cuts the body
        // short of its Content-Length, which no cache keeps.
        let check = if guard {
            Some((lf.file.try_clone()?, lf.stat))
        } else {
            None
        };
        stream_segments(lf.file, segs, check).await?
    };

    Ok(l.finish(resp))
}

/// The body from a file's bytes in memory. Many ranges can make a body larger than the
/// file: past [`SMALL_BODY`] it goes as slices of the one buffer, never a copy of that size.
fn bytes_body(all: Bytes, segs: Vec<Seg>, body_len: u64) -> Response {
    if body_len <= SMALL_BODY {
        return http::Response::new(assemble(&all, segs, body_len)).into_response();
    }
    let parts = segs.into_iter().map(move |seg| {
        Ok::<_, io::Error>(match seg {
            Seg::Bytes(b) => b,
            Seg::File(r) => all.slice(r.start as usize..r.end as usize),
        })
    });
    warp::reply::stream(futures_util::stream::iter(parts)).into_response()
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

/// A body the connection may send straight from the file, by sendfile(2), instead of
/// polling the response's own body; `serve::h1` takes it from the response's extensions.
/// hyper never looks at it and streams the body, which reads the same spans.
///
/// Only for answers that promise nothing about their bytes: a spool file not yet ready
/// (`no-store`, a weak tag) and ferry's own cache files, which nobody rewrites. sendfile
/// copies nothing: until the client has read them, the bytes queued in the socket (on
/// loopback, in the client's own receive queue) are still the file's page-cache pages, so
/// a rewrite in place after any check ferry could make would still reach the client, under
/// the tag and length of the version checked. A public spool or archive answer is copied.
#[derive(Debug, Clone)]
pub struct SendFile {
    pub file: std::sync::Arc<File>,
    pub segs: std::sync::Arc<[Seg]>,
    /// The body's length, all segments together: the Content-Length.
    pub len: u64,
}

impl SendFile {
    /// `segs` of `file`.
    pub fn new(file: File, segs: Vec<Seg>) -> SendFile {
        let len = Seg::total(&segs);
        SendFile {
            file: std::sync::Arc::new(file),
            segs: segs.into(),
            len,
        }
    }
}

/// Whether `segs` of `file` may go by sendfile(2): the pages of the first megabyte are in
/// the page cache (`serve::h1` checks each further one before it sends it, and copies one
/// that is not on a blocking thread), so the front thread does not wait for the disk. One
/// cachestat of a bounded span, whatever the file's size or the ranges asked for.
fn sendable(file: &File, segs: &[Seg]) -> bool {
    segs.iter()
        .find_map(|s| match s {
            Seg::File(r) if r.end > r.start => Some(r.clone()),
            _ => None,
        })
        .is_some_and(|r| super::local::resident(file, r.start..r.end.min(r.start + (1 << 20))))
}

/// The response for a body sent from the file: a [`SendFile`] for ferry's own connections,
/// and for hyper's a body that opens its stream only when first polled (hyper's
/// connections are the rare ones: requests with bodies, other methods).
fn sendfile_response(lf: LocalFile, segs: Vec<Seg>) -> Response {
    let sf = SendFile::new(lf.file, segs);
    let (file, segs) = (sf.file.clone(), sf.segs.clone());
    let lazy = futures_util::stream::once(async move {
        let own = file.try_clone()?;
        drop(file);
        segment_stream(own, segs.to_vec(), None).await
    })
    .try_flatten();
    let mut resp = warp::reply::stream(lazy).into_response();
    resp.extensions_mut().insert(sf);
    resp
}

type BoxedBody = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send + Sync>>;

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

async fn stream_segments(
    file: File,
    segs: Vec<Seg>,
    check: Option<(File, FileStat)>,
) -> io::Result<Response> {
    Ok(warp::reply::stream(segment_stream(file, segs, check).await?).into_response())
}

async fn segment_stream(
    file: File,
    segs: Vec<Seg>,
    check: Option<(File, FileStat)>,
) -> io::Result<BoxedBody> {
    let mut file = tokio::fs::File::from_std(file);
    if let [Seg::File(r)] = segs.as_slice() {
        let r = r.clone();
        file.seek(SeekFrom::Start(r.start)).await?;
        // Take: a file that grew since fstat must not overrun the Content-Length we announced.
        let stream = ReaderStream::with_capacity(file.take(r.end - r.start), CHUNK);
        let len = r.end - r.start;
        return Ok(Box::pin(checked_at_end(stream, len, check)));
    }
    let len = Seg::total(&segs);
    let stream = SegmentStream {
        file,
        segs: VecDeque::from(segs),
        step: Step::Next,
        buf: BytesMut::new(),
    };
    Ok(Box::pin(checked_at_end(stream, len, check)))
}

/// A body whose last frame goes out only if the file's stat still matches: hyper stops
/// polling once Content-Length bytes are written, so the check must come before the last
/// byte, and a failed one leaves the body short (the connection is aborted, and no cache
/// keeps a response cut short of its length).
struct CheckedAtEnd<S> {
    body: S,
    /// Bytes still to come.
    left: u64,
    /// The file (a second descriptor) and the stat it was opened with.
    check: Option<(File, FileStat)>,
}

impl<S: Stream<Item = io::Result<Bytes>> + Unpin> Stream for CheckedAtEnd<S> {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let item = std::task::ready!(Pin::new(&mut this.body).poll_next(cx));
        if let Some(Ok(b)) = &item {
            this.left = this.left.saturating_sub(b.len() as u64);
            if this.left == 0 {
                if let Some((file, stat)) = this.check.take() {
                    // An fstat of an open local file reads the in-memory inode: no disk wait.
                    let now = file.metadata().map(|m| FileStat::of(&m));
                    if !now.is_ok_and(|now| super::local::same_bytes(&now, &stat)) {
                        return Poll::Ready(Some(Err(changed_while_read())));
                    }
                }
            }
        }
        Poll::Ready(item)
    }
}

fn checked_at_end<S>(body: S, len: u64, check: Option<(File, FileStat)>) -> CheckedAtEnd<S> {
    CheckedAtEnd {
        body,
        left: len,
        check,
    }
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
    use std::os::unix::fs::MetadataExt;

    const TAG: &str = "\"a-1-2\"";

    /// A strong tag given as its header text.
    fn strong(tag: &str) -> Etag {
        Etag {
            quoted: tag.to_string(),
            weak: false,
        }
    }

    fn rep(len: u64, mtime: SystemTime, tag: &str) -> Representation {
        Representation {
            len,
            etag: Some(strong(tag)),
            last_modified: Some(mtime),
            content_type: CT.into(),
            caching: Caching::Public,
        }
    }

    /// The plan for a representation given by its parts (the form these tests were written in).
    fn plan(method: &Method, headers: &HeaderMap, len: u64, mtime: SystemTime, tag: &str) -> Plan {
        super::plan(method, headers, &rep(len, mtime, tag))
    }

    fn etag(len: u64, mtime: SystemTime, inode: u64, ctime_ns: i64) -> String {
        Etag::local(len, mtime, inode, ctime_ns).header()
    }

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
        assert_eq!(etag(0x5f3a, t, 0x77, 0x1a2b3d), "\"5f3a-1a2b3c-77-1a2b3d\"");
        let before = UNIX_EPOCH - Duration::from_secs(1);
        assert_ne!(
            etag(1, before, 1, 1),
            etag(1, UNIX_EPOCH + Duration::from_secs(1), 1, 1)
        );
        // Only the ctime differs: a rewrite in place that put length and mtime back.
        assert_ne!(etag(1, t, 1, 1), etag(1, t, 1, 2));
        assert!(HeaderValue::from_str(&etag(u64::MAX, before, u64::MAX, i64::MIN)).is_ok());
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
    // ---- respond ----

    const CT: &str = "image/jpeg";
    const CC: &str = "public, max-age=60";

    fn content(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// The spool's answer for an open file, the way resolve builds it for a ready file.
    async fn respond(
        lf: LocalFile,
        method: &Method,
        headers: &HeaderMap,
        content_type: &str,
        cache_control: &str,
    ) -> Response {
        respond_as(
            lf,
            method,
            headers,
            content_type,
            cache_control,
            Caching::Public,
        )
        .await
    }

    /// The same, for a file whose answer is `caching`.
    async fn respond_as(
        lf: LocalFile,
        method: &Method,
        headers: &HeaderMap,
        content_type: &str,
        cache_control: &str,
        caching: Caching,
    ) -> Response {
        let rep = Representation {
            len: lf.len,
            etag: Some(Etag::local(lf.len, lf.mtime, lf.inode, lf.stat.ctime_ns)),
            last_modified: Some(lf.mtime),
            content_type: content_type.to_string(),
            caching,
        };
        let policy = Policy {
            cache_control: cache_control.to_string(),
            active_content: ActiveContent::Sandbox,
        };
        respond_file(lf, method, headers, &rep, &policy, "local").await
    }
    fn local(data: &[u8]) -> (tempfile::NamedTempFile, LocalFile) {
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        f.write_all(data).expect("write");
        let lf = open_local(&f);
        (f, lf)
    }

    /// A spool file dated back, as a settled one is: a later rewrite's mtime (now) differs
    /// from it even on a coarse clock.
    fn settled(data: &[u8]) -> (tempfile::NamedTempFile, LocalFile) {
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        f.write_all(data).expect("write");
        f.as_file()
            .set_modified(UNIX_EPOCH + Duration::from_secs(1_600_000_000))
            .expect("set mtime");
        let lf = open_local(&f);
        (f, lf)
    }

    fn open_local(f: &tempfile::NamedTempFile) -> LocalFile {
        let file = File::open(f.path()).expect("open");
        let meta = file.metadata().expect("meta");
        LocalFile {
            len: meta.len(),
            mtime: meta.modified().expect("mtime"),
            inode: meta.ino(),
            stat: crate::catalog::FileStat::of(&meta),
            file,
            preloaded: None,
            foreign: true,
        }
    }

    /// The body's bytes, and whether it ended in an error (cut short) rather than cleanly.
    async fn drain(resp: Response) -> (Response, Vec<u8>, bool) {
        let (parts, mut body) = resp.into_parts();
        let mut out = Vec::new();
        let mut failed = false;
        while let Some(frame) =
            std::future::poll_fn(|cx| warp::hyper::body::Body::poll_frame(Pin::new(&mut body), cx))
                .await
        {
            match frame {
                Ok(f) => out.extend_from_slice(&f.into_data().unwrap_or_default()),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        (Response::from_parts(parts, Default::default()), out, failed)
    }

    /// A ready file someone rewrites in place while it is read never goes out whole under
    /// the public tag of the version it was opened as: a small body answers 503 no-store, a
    /// streamed one ends in an error short of its Content-Length. (It went out whole, mixed
    /// bytes under the old strong tag, before the stat was taken again after the read.)
    #[tokio::test]
    async fn a_rewrite_during_the_read_is_not_sent_under_the_opened_tag() {
        use std::os::unix::fs::FileExt;
        for (size, preload) in [(1000, true), (1000, false), (600_000, false)] {
            let (f, mut lf) = settled(&vec![b'a'; size]);
            if preload {
                lf.preload().unwrap();
            }
            // The writer comes back between the open (and any preload) and the end of the read.
            let w = std::fs::OpenOptions::new()
                .write(true)
                .open(f.path())
                .unwrap();
            w.write_all_at(&vec![b'b'; size / 2], 0).unwrap();
            let resp = respond(lf, &Method::GET, &HeaderMap::new(), CT, CC).await;
            let (resp, body, failed) = drain(resp).await;
            if size <= SMALL_BODY as usize {
                assert_eq!(
                    resp.status(),
                    StatusCode::SERVICE_UNAVAILABLE,
                    "{size} {preload}"
                );
                assert_eq!(header(&resp, "cache-control"), Some("no-store"));
                assert_eq!(header(&resp, "retry-after"), Some("1"));
                assert!(header(&resp, "etag").is_none());
            } else {
                assert_eq!(resp.status(), StatusCode::OK);
                assert!(failed, "the streamed body must end in an error");
                assert!(body.len() < size, "{} of {size} bytes went out", body.len());
            }
        }
    }

    /// The check costs an unchanged file nothing: it streams whole, and ends cleanly.
    #[tokio::test]
    async fn an_unchanged_file_streams_whole_with_the_check_on() {
        let data = vec![b'z'; 600_000];
        let (_f, lf) = local(&data);
        let (resp, body, failed) =
            drain(respond(lf, &Method::GET, &HeaderMap::new(), CT, CC).await).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(!failed);
        assert_eq!(body, data);
    }

    /// A small file cut short between the open and the read is a rewrite in progress: the
    /// client is told to retry (503), not that ferry failed (500).
    #[tokio::test]
    async fn a_file_truncated_before_the_read_is_a_retry_not_a_fault() {
        let (f, lf) = settled(&[b'a'; 1000]);
        f.as_file().set_len(10).unwrap();
        let resp = respond(lf, &Method::GET, &HeaderMap::new(), CT, CC).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(header(&resp, "cache-control"), Some("no-store"));
    }

    /// A rename mid-stream (ferry's own archive move) sets the ctime and not one byte: the
    /// body still goes out whole. (It was cut short while the check compared ctime too.)
    #[tokio::test]
    async fn a_rename_mid_stream_does_not_cut_an_unchanged_body() {
        let data = vec![b'z'; 600_000];
        let (f, lf) = local(&data);
        // Past the coarse clock's tick of the write, so the rename's ctime differs.
        std::thread::sleep(Duration::from_millis(20));
        let resp = respond(lf, &Method::GET, &HeaderMap::new(), CT, CC).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::rename(f.path(), dir.path().join("archived")).unwrap();
        let (resp, body, failed) = drain(resp).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(!failed, "cut short: {} of {} bytes", body.len(), data.len());
        assert_eq!(body, data);
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
        let tag = etag(lf.len, lf.mtime, lf.inode, lf.stat.ctime_ns);
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

    /// sendfile sends the page cache as it is when the client reads it, after any check:
    /// a public answer (a ready spool file, a foreign file under a strong tag) is copied,
    /// and only answers that promise nothing about their bytes, or ferry's own cache files,
    /// go by sendfile. The body is the same bytes either way.
    #[tokio::test]
    async fn only_answers_that_promise_nothing_about_their_bytes_go_by_sendfile() {
        let data = content(100_000);
        let cases = [
            // (caching, foreign, by sendfile)
            (Caching::Public, true, false),
            (Caching::NoStore, true, true),
            (Caching::Public, false, true),
        ];
        for (caching, foreign, by_sendfile) in cases {
            let (_f, mut lf) = local(&data);
            lf.foreign = foreign;
            let resp = respond_as(lf, &Method::GET, &HeaderMap::new(), CT, CC, caching).await;
            let sf = resp.extensions().get::<SendFile>().map(|sf| sf.len);
            assert_eq!(
                sf.is_some(),
                by_sendfile,
                "{caching:?} foreign={foreign}: sendfile {sf:?}"
            );
            let (_, body, failed) = drain(resp).await;
            assert!(!failed);
            assert_eq!(body, data, "{caching:?} foreign={foreign}");
        }
    }

    /// sendfile(2) of pages not in the page cache reads the disk on a front thread, and
    /// readahead(2) does not wait for a whole large file: a file not wholly cached is read
    /// on a blocking thread instead (found by the attack review of the sendfile path).
    #[tokio::test]
    async fn a_file_not_in_the_page_cache_is_not_sent_by_sendfile() {
        use std::os::fd::AsRawFd;
        let data = content(100_000);
        let (f, mut lf) = local(&data);
        f.as_file().sync_all().expect("fsync");
        // SAFETY: fadvise on a descriptor we hold; clean pages are dropped.
        let rc = unsafe {
            libc::posix_fadvise(f.as_file().as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
        };
        assert_eq!(rc, 0);
        if super::super::local::resident(&lf.file, 0..100_000) {
            // Some filesystems keep every page in memory (tmpfs): nothing to show there.
            eprintln!("skipped: the pages stayed cached");
            return;
        }
        lf.foreign = false;
        let resp = respond_as(
            lf,
            &Method::GET,
            &HeaderMap::new(),
            CT,
            CC,
            Caching::NoStore,
        )
        .await;
        assert!(resp.extensions().get::<SendFile>().is_none());
        let (_, body, failed) = drain(resp).await;
        assert!(!failed);
        assert_eq!(body, data);
    }
}
