//! The router's backend side for a GET or HEAD without a body, by hand: a connection from
//! this front thread's idle pool (or a new one), the request head written in one call, the
//! response head parsed with httparse, and the body read by the response body itself, in
//! the client connection's own task.
//!
//! Why not hyper's client here: it gives every backend connection a task of its own and
//! hands each request and response across a channel to it, two task hops per request that
//! cost more than the parsing (the profile in README's "Router"). A request with a body, or
//! any other method, still goes through hyper-util's pooled client (`proxy`).
//!
//! Framing follows RFC 9112 section 6.3: no body after HEAD, 1xx, 204 and 304; a
//! Transfer-Encoding ending in `chunked` is decoded, any other one reads to the close; a
//! Content-Length must be one number (repeats allowed only when equal); else the body runs
//! to the close. A connection goes back to the pool only when its response ended exactly
//! where its framing said, on HTTP/1.1 without `Connection: close`.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use hyper::body::{Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::BoxError;

/// The most a response head may take; a backend that sends more is broken.
const MAX_HEAD: usize = 64 * 1024;
/// As hyper's own limit.
const MAX_HEADERS: usize = 100;
/// A chunk-size line (with extensions) or trailer line longer than this is refused.
const MAX_LINE: usize = 4096;
/// Read size for bodies.
const READ_CHUNK: usize = 16 * 1024;
/// Interim (1xx) responses taken before the final one; a node that sends more is broken.
const MAX_INTERIM: usize = 16;
/// Idle connections kept per backend per front thread; past it the oldest is closed. Far
/// above what a front thread has in flight to one node at -c256, so it only bounds the
/// file descriptors a burst of thousands of concurrent requests would leave open.
const MAX_IDLE: usize = 1024;

/// Why a backend exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("connect: no connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the backend closed the connection before a response")]
    Closed,
    /// What arrived does not begin like a response at all.
    #[error("bad response from the backend: not HTTP")]
    NotHttp,
    #[error("bad response from the backend: {0}")]
    Protocol(&'static str),
}

impl UpstreamError {
    /// The backend could not be reached at all (counts toward marking it down).
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(_) | UpstreamError::ConnectTimeout(_)
        )
    }

    /// Nothing of an answer to this request arrived on a reused connection: the node closed
    /// or reset it while it sat idle (its keep-alive ran out as we wrote), or what came
    /// first is no response head (late bytes of an earlier exchange). A new connection is
    /// tried. A head that arrived and was refused is the node's answer: sent again it would
    /// only be refused again, at the cost of another request to the node.
    fn stale(&self) -> bool {
        matches!(self, UpstreamError::Closed | UpstreamError::NotHttp)
            || matches!(self, UpstreamError::Io(e) if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted
            ))
    }
}

/// One open connection to a backend, with any bytes read past the last response.
pub(super) struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// A front thread's idle backend connections, per backend (config order), newest last.
pub(super) struct Pool {
    idle: Vec<Mutex<Vec<Idle>>>,
    idle_timeout: Duration,
    max_idle: usize,
}

impl Pool {
    pub(super) fn new(backends: usize, idle_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            idle: (0..backends).map(|_| Mutex::new(Vec::new())).collect(),
            idle_timeout,
            max_idle: MAX_IDLE,
        })
    }

    fn slot(&self, backend: usize) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle[backend].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used idle connection that has not sat past the idle timeout and
    /// has had nothing arrive on it since its last response.
    fn take(&self, backend: usize) -> Option<Conn> {
        let mut idle = self.slot(backend);
        while let Some(i) = idle.pop() {
            if i.since.elapsed() < self.idle_timeout && quiet(&i.conn.stream) {
                return Some(i.conn);
            }
        }
        None
    }

    fn put(&self, backend: usize, conn: Conn) {
        let mut idle = self.slot(backend);
        if idle.len() >= self.max_idle {
            // The oldest is the likeliest to be closed by the node soon anyway.
            idle.remove(0);
        }
        idle.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// Idle connections to `backend` now (tests).
    #[cfg(test)]
    fn idle_count(&self, backend: usize) -> usize {
        self.slot(backend).len()
    }

    /// Closes connections idle past the timeout, every half timeout, until the pool is gone:
    /// a node that would close them itself a little later never sees a request on one.
    pub(super) async fn sweep(pool: Weak<Pool>) {
        let period = match pool.upgrade() {
            Some(p) => (p.idle_timeout / 2).max(Duration::from_millis(50)),
            None => return,
        };
        loop {
            tokio::time::sleep(period).await;
            let Some(p) = pool.upgrade() else { return };
            for b in 0..p.idle.len() {
                p.slot(b).retain(|i| i.since.elapsed() < p.idle_timeout);
            }
        }
    }
}

/// Whether nothing (no close, no stray bytes such as a "408 Request Timeout" a server sends
/// before closing an idle connection) has arrived on an idle connection. Nearly free: tokio
/// clears a socket's read readiness after a short read, so on a quiet connection this makes
/// no system call; only an event the driver has seen since costs one read. An event still in
/// flight is caught by `send`'s retry when it is a close; stray bytes racing the request this
/// closely would need a node that closes idle connections sooner than the pool does, which
/// the pool's timeout (a third of the nodes' own) rules out for ferry nodes.
fn quiet(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Sends a bodiless `method` request for `path` with `headers` (hop-by-hop already removed,
/// forwarding headers added) to backend `backend` at `authority`, and returns the response
/// with its body still on the wire. A reused connection that gave nothing of an answer
/// (`stale`), or answered 408 with a close (a node's idle timeout racing the request, as
/// browsers treat it), is replaced by a new one once; the request is safe to repeat (GET or
/// HEAD, no body). A new connection's failure is the answer.
pub(super) async fn send(
    pool: &Arc<Pool>,
    backend: usize,
    authority: &str,
    connect_timeout: Duration,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    let head = request_head(method, path, headers, authority);
    let is_head = method == Method::HEAD;
    if let Some(conn) = pool.take(backend) {
        match exchange(conn, &head, is_head).await {
            Ok(r) if r.status == StatusCode::REQUEST_TIMEOUT && !r.keep_alive => {
                tracing::debug!(
                    backend = authority,
                    "a pooled connection answered 408 and closed; retrying on a new one"
                );
            }
            Ok(r) => return Ok(finish(r, pool, backend)),
            Err(e) if e.stale() => {
                tracing::debug!(backend = authority, error = %e, "a pooled connection was closed; retrying on a new one");
            }
            Err(e) => return Err(e),
        }
    }
    let conn = connect(authority, connect_timeout).await?;
    let r = exchange(conn, &head, is_head).await?;
    Ok(finish(r, pool, backend))
}

async fn connect(authority: &str, timeout: Duration) -> Result<Conn, UpstreamError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(authority))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout(timeout))?
        .map_err(UpstreamError::Connect)?;
    stream.set_nodelay(true).map_err(UpstreamError::Connect)?;
    Ok(Conn {
        stream,
        buf: BytesMut::with_capacity(READ_CHUNK),
    })
}

/// The request line and headers, as one buffer. Values came through hyper's parser (or are
/// ours), so none holds a CR or LF.
fn request_head(method: &Method, path: &str, headers: &HeaderMap, authority: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        64 + path.len()
            + headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 4)
                .sum::<usize>(),
    );
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // HTTP/1.1 requires a Host; a client's HTTP/1.0 request may have none.
    if !headers.contains_key(header::HOST) {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(authority.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A parsed response head, with the connection it came on.
struct Exchanged {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
    conn: Conn,
}

async fn exchange(mut conn: Conn, head: &[u8], is_head: bool) -> Result<Exchanged, UpstreamError> {
    // Bytes left over from a previous response mean the backend sent more than it framed.
    if !conn.buf.is_empty() {
        return Err(UpstreamError::Protocol("bytes after the previous response"));
    }
    conn.stream.write_all(head).await?;
    // Bytes already searched for the head's end: a head that arrives a byte at a time is
    // parsed once, not once per read.
    let mut searched = 0;
    let mut interim = 0;
    loop {
        // Empty lines before a status line are skipped (httparse does), as a request's are.
        let lead = conn
            .buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        let rest = &conn.buf[lead..];
        if !rest.starts_with(&b"HTTP/"[..rest.len().min(5)]) {
            return Err(UpstreamError::NotHttp);
        }
        let parsed = if head_may_end(&conn.buf, searched) {
            parse_head(&mut conn.buf, is_head)?
        } else {
            None
        };
        searched = conn.buf.len();
        if let Some(parsed) = parsed {
            let (status, version, headers, framing, keep_alive) = parsed;
            if status.is_informational() {
                // 100 Continue, 103 Early Hints: the real answer follows. 101 cannot: we never
                // ask to switch protocols.
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(UpstreamError::Protocol("101 without an upgrade request"));
                }
                interim += 1;
                if interim > MAX_INTERIM {
                    return Err(UpstreamError::Protocol("too many interim responses"));
                }
                searched = 0;
                continue;
            }
            return Ok(Exchanged {
                status,
                version,
                headers,
                framing,
                keep_alive,
                conn,
            });
        }
        if conn.buf.len() >= MAX_HEAD {
            return Err(UpstreamError::Protocol("response head too large"));
        }
        conn.buf.reserve(READ_CHUNK);
        let n = std::future::poll_fn(|cx| {
            tokio_util::io::poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.buf)
        })
        .await?;
        if n == 0 {
            return Err(if conn.buf.is_empty() {
                UpstreamError::Closed
            } else {
                UpstreamError::Protocol("connection closed inside the response head")
            });
        }
    }
}

/// Whether `buf` may hold a whole head: an empty line (`\n\n` or `\n\r\n`, as httparse
/// accepts both) ends somewhere past the first `from` bytes, which were searched before.
fn head_may_end(buf: &[u8], from: usize) -> bool {
    let start = from.saturating_sub(2);
    let mut at = start;
    while let Some(i) = memchr::memchr(b'\n', &buf[at..]) {
        let i = at + i;
        match buf.get(i + 1) {
            Some(b'\n') => return true,
            Some(b'\r') if buf.get(i + 2) == Some(&b'\n') => return true,
            _ => at = i + 1,
        }
    }
    false
}

type Head = (StatusCode, Version, HeaderMap, Framing, bool);

/// Parses one response head off the front of `buf`, if it is all there.
fn parse_head(buf: &mut BytesMut, is_head: bool) -> Result<Option<Head>, UpstreamError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(UpstreamError::Protocol("too many headers"))
        }
        Err(_) => return Err(UpstreamError::Protocol("unparseable response head")),
    };
    let code = resp.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| UpstreamError::Protocol("bad status code"))?;
    let version = if resp.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoded = false;
    let mut cl_listed = false;
    let mut close = version == Version::HTTP_10;
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| UpstreamError::Protocol("bad header name"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| UpstreamError::Protocol("bad header value"))?;
        if name == header::CONTENT_LENGTH {
            cl_listed |= content_length.is_some() || value.as_bytes().contains(&b',');
            for part in value
                .to_str()
                .map_err(|_| UpstreamError::Protocol("bad content-length"))?
                .split(',')
            {
                let part = part.trim();
                if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(UpstreamError::Protocol("bad content-length"));
                }
                let n: u64 = part
                    .parse()
                    .map_err(|_| UpstreamError::Protocol("bad content-length"))?;
                if content_length.is_some_and(|m| m != n) {
                    return Err(UpstreamError::Protocol("conflicting content-length"));
                }
                content_length = Some(n);
            }
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoded = true;
            // Only the last coding decides: "gzip, chunked" is chunked, "chunked, gzip" is not.
            chunked = value
                .to_str()
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name == header::CONNECTION {
            let tokens = value.to_str().unwrap_or("");
            for t in tokens.split(',').map(str::trim) {
                if t.eq_ignore_ascii_case("close") {
                    close = true;
                } else if t.eq_ignore_ascii_case("keep-alive") && version == Version::HTTP_10 {
                    close = false;
                }
            }
        }
        headers.append(name, value);
    }
    buf.advance(len);
    if transfer_encoded {
        // The coding frames the body; a Content-Length beside it is a lie or an attack, and
        // hyper frames what we pass on anew (RFC 9112 6.3: an intermediary removes it). That,
        // or a Transfer-Encoding on HTTP/1.0, means the sender's framing cannot be trusted
        // past this response (RFC 9112 6.1, 6.3), even one without a body (HEAD, 204, 304):
        // the connection is not reused.
        if content_length.is_some() || version == Version::HTTP_10 {
            close = true;
        }
        headers.remove(header::CONTENT_LENGTH);
    } else if let Some(n) = content_length.filter(|_| cl_listed) {
        // "3, 3" or two equal headers are one length; pass on the one number.
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    let framing = if is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Length(0)
    } else if transfer_encoded {
        if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            close = true;
            Framing::Close
        }
    } else if let Some(n) = content_length {
        Framing::Length(n)
    } else {
        close = true;
        Framing::Close
    };
    Ok(Some((status, version, headers, framing, !close)))
}

fn finish(x: Exchanged, pool: &Arc<Pool>, backend: usize) -> Response<UpstreamBody> {
    let mut body = UpstreamBody {
        conn: Some(x.conn),
        framing: x.framing,
        keep_alive: x.keep_alive,
        pool: pool.clone(),
        backend,
    };
    body.settle();
    let mut r = Response::new(body);
    *r.status_mut() = x.status;
    *r.version_mut() = x.version;
    *r.headers_mut() = x.headers;
    r
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes remain.
    Length(u64),
    Chunked(Chunk),
    /// To the end of the connection.
    Close,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// This many bytes of the current chunk remain.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; this many bytes so far.
    Trailers(usize),
}

/// A backend response body read straight off its connection; the connection goes back to
/// the pool the moment the body's framing is complete (hyper may stop polling as soon as
/// `is_end_stream` says so), and is closed if the body is dropped before that.
pub(super) struct UpstreamBody {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    pool: Arc<Pool>,
    backend: usize,
}

impl UpstreamBody {
    /// Returns the connection to the pool once nothing of this response is left to read.
    fn settle(&mut self) {
        if self.framing == Framing::Length(0) {
            self.framing = Framing::Done;
        }
        if self.framing == Framing::Done {
            if let Some(conn) = self.conn.take() {
                if self.keep_alive && conn.buf.is_empty() {
                    self.pool.put(self.backend, conn);
                }
            }
        }
    }

    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, BoxError>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Err("the backend connection is gone".into()));
        };
        conn.buf.reserve(READ_CHUNK);
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut conn.stream),
            cx,
            &mut conn.buf
        ))?;
        Poll::Ready(Ok(n))
    }

    /// One step of the chunked decoder over what is buffered: a data frame, the end, or
    /// `None` when more bytes are needed.
    fn step_chunked(&mut self, state: Chunk) -> Result<Option<Option<Bytes>>, BoxError> {
        let Some(conn) = self.conn.as_mut() else {
            return Err("the backend connection is gone".into());
        };
        let buf = &mut conn.buf;
        match state {
            Chunk::Size => {
                let Some(line) = take_line(buf)? else {
                    return Ok(None);
                };
                let digits = line[..].split(|&b| b == b';').next().unwrap_or(&[]);
                let digits = trim_ows(digits);
                // Leading zeros add nothing; the length check is on what is left.
                let digits = match digits.iter().position(|&b| b != b'0') {
                    Some(i) => &digits[i..],
                    None if digits.is_empty() => digits,
                    None => &digits[digits.len() - 1..],
                };
                if digits.is_empty()
                    || digits.len() > 16
                    || !digits.iter().all(u8::is_ascii_hexdigit)
                {
                    return Err("bad chunk size from the backend".into());
                }
                let size = u64::from_str_radix(std::str::from_utf8(digits)?, 16)?;
                self.framing = Framing::Chunked(if size == 0 {
                    Chunk::Trailers(0)
                } else {
                    Chunk::Data(size)
                });
                Ok(Some(Some(Bytes::new())))
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = left.min(buf.len() as u64) as usize;
                let data = buf.split_to(n).freeze();
                let left = left - n as u64;
                self.framing = Framing::Chunked(if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                });
                Ok(Some(Some(data)))
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(None);
                }
                if &buf[..2] != b"\r\n" {
                    return Err("chunk data longer than its size".into());
                }
                buf.advance(2);
                self.framing = Framing::Chunked(Chunk::Size);
                Ok(Some(Some(Bytes::new())))
            }
            Chunk::Trailers(seen) => {
                let Some(line) = take_line(buf)? else {
                    return Ok(None);
                };
                // Trailers are dropped: hyper would pass them on only to a client that
                // asked with "TE: trailers", and the nodes send none. Bounded as a head is.
                if line.is_empty() {
                    self.framing = Framing::Done;
                    Ok(Some(None))
                } else {
                    let seen = seen + line.len() + 2;
                    if seen > MAX_HEAD {
                        return Err("trailers too large from the backend".into());
                    }
                    self.framing = Framing::Chunked(Chunk::Trailers(seen));
                    Ok(Some(Some(Bytes::new())))
                }
            }
        }
    }
}

/// Takes one CRLF-terminated line off the front of `buf` (without the CRLF).
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, BoxError> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(i) if i > MAX_LINE => Err("chunk line too long from the backend".into()),
        Some(i) => {
            let line = buf.split_to(i);
            buf.advance(2);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err("chunk line too long from the backend".into()),
        None => Ok(None),
    }
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match this.framing {
                Framing::Done => {
                    this.settle();
                    return Poll::Ready(None);
                }
                Framing::Length(0) => {
                    this.settle();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    let buffered = this.conn.as_ref().map_or(0, |c| c.buf.len());
                    if buffered > 0 {
                        let n = left.min(buffered as u64) as usize;
                        let data = match this.conn.as_mut() {
                            Some(c) => c.buf.split_to(n).freeze(),
                            None => return Poll::Ready(Some(Err("connection gone".into()))),
                        };
                        this.framing = Framing::Length(left - n as u64);
                        // The last bytes: the connection is free before hyper drops us.
                        this.settle();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(this.poll_more(cx)) {
                        Ok(0) => {
                            this.conn = None;
                            return Poll::Ready(Some(Err(
                                "the backend closed the connection inside the body".into(),
                            )));
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            this.conn = None;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                }
                Framing::Close => {
                    let buffered = this.conn.as_ref().map_or(0, |c| c.buf.len());
                    if buffered > 0 {
                        let data = match this.conn.as_mut() {
                            Some(c) => c.buf.split().freeze(),
                            None => return Poll::Ready(Some(Err("connection gone".into()))),
                        };
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(this.poll_more(cx)) {
                        Ok(0) => {
                            this.conn = None;
                            this.framing = Framing::Done;
                            return Poll::Ready(None);
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            this.conn = None;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                }
                Framing::Chunked(state) => match this.step_chunked(state) {
                    Ok(Some(Some(data))) if !data.is_empty() => {
                        return Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Ok(Some(Some(_))) => continue,
                    Ok(Some(None)) => {
                        this.settle();
                        return Poll::Ready(None);
                    }
                    Ok(None) => match ready!(this.poll_more(cx)) {
                        Ok(0) => {
                            this.conn = None;
                            return Poll::Ready(Some(Err(
                                "the backend closed the connection inside a chunked body".into(),
                            )));
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            this.conn = None;
                            return Poll::Ready(Some(Err(e)));
                        }
                    },
                    Err(e) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done | Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// What a scripted backend does on one connection, per request: write these pieces (a
    /// short pause between them, so the client sees them in separate reads), then `after`.
    struct Script {
        replies: Vec<Vec<&'static [u8]>>,
        after: After,
    }

    enum After {
        /// Keep the connection open (until the test ends).
        Hold,
        Close,
        /// Send these bytes unasked after a pause, then close (a server's idle "408").
        Stray(&'static [u8]),
    }

    struct Backend {
        addr: String,
        accepted: Arc<AtomicUsize>,
        heads: Arc<Mutex<Vec<String>>>,
    }

    /// A backend on loopback that serves `scripts` to its connections, one script each.
    async fn backend(scripts: Vec<Script>) -> Backend {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (acc, hs) = (accepted.clone(), heads.clone());
        tokio::spawn(async move {
            for script in scripts {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                let hs = hs.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for reply in script.replies {
                        // One request head per reply.
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut b = [0u8; 4096];
                            match s.read(&mut b).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&b[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("end") + 4;
                        let head: Vec<u8> = buf.drain(..end).collect();
                        hs.lock()
                            .expect("heads")
                            .push(String::from_utf8_lossy(&head).into_owned());
                        for piece in reply {
                            if s.write_all(piece).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                    match script.after {
                        After::Hold => {
                            let mut b = [0u8; 1];
                            let _ = s.read(&mut b).await;
                        }
                        After::Close => {}
                        After::Stray(bytes) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            let _ = s.write_all(bytes).await;
                        }
                    }
                });
            }
        });
        Backend {
            addr,
            accepted,
            heads,
        }
    }

    fn hold(replies: Vec<Vec<&'static [u8]>>) -> Script {
        Script {
            replies,
            after: After::Hold,
        }
    }

    async fn get(
        pool: &Arc<Pool>,
        b: &Backend,
        method: Method,
    ) -> Result<(StatusCode, HeaderMap, Vec<u8>), UpstreamError> {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("site1.example"));
        let r = send(
            pool,
            0,
            &b.addr,
            Duration::from_secs(2),
            &method,
            "/static/a.jpg?x=1",
            &h,
        )
        .await?;
        let (parts, body) = r.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| UpstreamError::Io(io::Error::other(e.to_string())))?;
        Ok((parts.status, parts.headers, body.to_bytes().to_vec()))
    }

    /// A GET for "/" with only a Host, its body left on the wire.
    async fn get_head(
        pool: &Arc<Pool>,
        b: &Backend,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("x"));
        send(
            pool,
            0,
            &b.addr,
            Duration::from_secs(2),
            &Method::GET,
            "/",
            &h,
        )
        .await
    }

    fn pool() -> Arc<Pool> {
        Pool::new(1, Duration::from_secs(30))
    }

    /// A node whose first connection answers "a", then `second` and a close; a second
    /// connection would answer "b". Returns the node, the pool (the first connection back
    /// in it) and what the second request got.
    async fn second_answer(
        second: &'static [u8],
    ) -> (
        Backend,
        Arc<Pool>,
        Result<(StatusCode, HeaderMap, Vec<u8>), UpstreamError>,
    ) {
        let b = backend(vec![
            Script {
                replies: vec![
                    vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"],
                    vec![second],
                ],
                after: After::Close,
            },
            hold(vec![vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb"]]),
        ])
        .await;
        let p = pool();
        assert_eq!(get(&p, &b, Method::GET).await.expect("first").2, b"a");
        assert_eq!(p.idle_count(0), 1);
        let r = get(&p, &b, Method::GET).await;
        (b, p, r)
    }

    #[tokio::test]
    async fn a_sized_response_is_read_and_its_connection_reused() {
        let b = backend(vec![hold(vec![
            vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhel",
                b"lo",
            ],
            vec![b"HTTP/1.1 302 Found\r\nlocation: http://s3/x\r\ncontent-length: 0\r\n\r\n"],
        ])])
        .await;
        let p = pool();
        let (st, h, body) = get(&p, &b, Method::GET).await.expect("first");
        assert_eq!((st, &body[..]), (StatusCode::OK, &b"hello"[..]));
        assert_eq!(h.get("x-a").map(|v| v.as_bytes()), Some(&b"1"[..]));
        assert_eq!(p.idle_count(0), 1, "back in the pool once the body ended");
        let (st, h, body) = get(&p, &b, Method::GET).await.expect("second");
        assert_eq!((st, body.len()), (StatusCode::FOUND, 0));
        assert_eq!(
            h.get("location").map(|v| v.as_bytes()),
            Some(&b"http://s3/x"[..])
        );
        assert_eq!(
            b.accepted.load(Ordering::SeqCst),
            1,
            "one connection for both"
        );
        let heads = b.heads.lock().expect("heads").clone();
        assert_eq!(
            heads[0],
            "GET /static/a.jpg?x=1 HTTP/1.1\r\nhost: site1.example\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_chunked_body_is_decoded_across_reads_and_the_connection_reused() {
        let b = backend(vec![hold(vec![
            vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                b"4;ext=1\r\nab",
                b"cd\r",
                b"\n",
                b"A\r\n0123456789\r\n0\r\nx-trailer: t\r\n",
                b"\r\n",
            ],
            vec![b"HTTP/1.1 204 No Content\r\n\r\n"],
        ])])
        .await;
        let p = pool();
        let (st, _, body) = get(&p, &b, Method::GET).await.expect("chunked");
        assert_eq!((st, &body[..]), (StatusCode::OK, &b"abcd0123456789"[..]));
        assert_eq!(p.idle_count(0), 1);
        let (st, _, body) = get(&p, &b, Method::GET).await.expect("204");
        assert_eq!((st, body.len()), (StatusCode::NO_CONTENT, 0));
        assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_without_framing_runs_to_the_close_and_is_not_pooled() {
        let b = backend(vec![Script {
            replies: vec![vec![b"HTTP/1.1 200 OK\r\n\r\nto the ", b"end"]],
            after: After::Close,
        }])
        .await;
        let p = pool();
        let (_, _, body) = get(&p, &b, Method::GET).await.expect("close-delimited");
        assert_eq!(&body[..], b"to the end");
        assert_eq!(p.idle_count(0), 0);
    }

    #[tokio::test]
    async fn head_304_and_interim_responses_carry_no_body() {
        let b = backend(vec![hold(vec![
            // HEAD: the length of the GET's body, and no body.
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"],
            vec![b"HTTP/1.1 304 Not Modified\r\ncontent-length: 1000\r\netag: \"x\"\r\n\r\n"],
            vec![b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"],
        ])])
        .await;
        let p = pool();
        let (st, h, body) = get(&p, &b, Method::HEAD).await.expect("head");
        assert_eq!((st, body.len()), (StatusCode::OK, 0));
        assert_eq!(
            h.get(header::CONTENT_LENGTH).map(|v| v.as_bytes()),
            Some(&b"1000"[..])
        );
        let (st, _, body) = get(&p, &b, Method::GET).await.expect("304");
        assert_eq!((st, body.len()), (StatusCode::NOT_MODIFIED, 0));
        let (st, _, body) = get(&p, &b, Method::GET).await.expect("103 then 200");
        assert_eq!((st, &body[..]), (StatusCode::OK, &b"ok"[..]));
        assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn broken_framing_is_an_error_and_never_pooled() {
        for reply in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: +3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3, 4\r\n\r\nabc",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
            b"NOT HTTP\r\n\r\n",
        ] {
            let b = backend(vec![Script {
                replies: vec![vec![reply]],
                after: After::Close,
            }])
            .await;
            let p = pool();
            let r = get(&p, &b, Method::GET).await;
            assert!(
                r.is_err(),
                "{:?} gave {:?}",
                String::from_utf8_lossy(reply),
                r.map(|r| r.0)
            );
            assert_eq!(p.idle_count(0), 0);
        }
        // Equal repeats are one length.
        let b = backend(vec![hold(vec![vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\ncontent-length: 3\r\n\r\nabc",
        ]])])
        .await;
        let (_, h, body) = get(&pool(), &b, Method::GET).await.expect("equal lengths");
        assert_eq!(&body[..], b"abc");
        assert_eq!(
            h.get_all(header::CONTENT_LENGTH)
                .iter()
                .map(|v| v.as_bytes())
                .collect::<Vec<_>>(),
            vec![&b"3"[..]],
            "one length, passed on as one number"
        );
    }

    #[tokio::test]
    async fn a_huge_head_is_refused() {
        static HUGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let huge = HUGE.get_or_init(|| {
            let mut v = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
            v.resize(v.len() + MAX_HEAD + 10, b'a');
            v.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
            v
        });
        let b = backend(vec![Script {
            replies: vec![vec![&huge[..]]],
            after: After::Hold,
        }])
        .await;
        assert!(matches!(
            get(&pool(), &b, Method::GET).await,
            Err(UpstreamError::Protocol("response head too large"))
        ));
    }

    #[tokio::test]
    async fn a_pooled_connection_the_backend_closed_is_replaced_without_an_error() {
        let b = backend(vec![
            Script {
                replies: vec![vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"]],
                after: After::Close,
            },
            hold(vec![vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb"]]),
        ])
        .await;
        let p = pool();
        assert_eq!(get(&p, &b, Method::GET).await.expect("first").2, b"a");
        assert_eq!(p.idle_count(0), 1);
        // Send at once, before the close has been seen, and after: either way the request
        // lands on a new connection.
        assert_eq!(get(&p, &b, Method::GET).await.expect("second").2, b"b");
        assert_eq!(b.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn bytes_a_backend_sends_on_an_idle_connection_are_never_taken_as_a_response() {
        let b = backend(vec![
            Script {
                replies: vec![vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"]],
                after: After::Stray(
                    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                ),
            },
            hold(vec![vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb"]]),
        ])
        .await;
        let p = pool();
        assert_eq!(get(&p, &b, Method::GET).await.expect("first").2, b"a");
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (st, _, body) = get(&p, &b, Method::GET).await.expect("second");
        assert_eq!(
            (st, &body[..]),
            (StatusCode::OK, &b"b"[..]),
            "not the stray 408"
        );
        assert_eq!(b.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_body_dropped_half_read_closes_its_connection() {
        let b = backend(vec![
            hold(vec![vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
            ]]),
            hold(vec![vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb"]]),
        ])
        .await;
        let p = pool();
        let r = get_head(&p, &b).await.expect("head");
        let mut body = r.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok().as_deref(), Some(&b"abc"[..]));
        drop(body);
        assert_eq!(p.idle_count(0), 0);
        assert_eq!(get(&p, &b, Method::GET).await.expect("next").2, b"b");
        assert_eq!(b.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connections_idle_past_the_timeout_are_closed_not_reused() {
        let b = backend(vec![
            hold(vec![vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"]]),
            hold(vec![vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb"]]),
        ])
        .await;
        let p = Pool::new(1, Duration::from_millis(100));
        tokio::spawn(Pool::sweep(Arc::downgrade(&p)));
        assert_eq!(get(&p, &b, Method::GET).await.expect("first").2, b"a");
        assert_eq!(p.idle_count(0), 1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(p.idle_count(0), 0, "the sweep closed it");
        assert_eq!(get(&p, &b, Method::GET).await.expect("second").2, b"b");
        assert_eq!(b.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        drop(l);
        let p = pool();
        let r = send(
            &p,
            0,
            &addr,
            Duration::from_secs(2),
            &Method::GET,
            "/",
            &HeaderMap::new(),
        )
        .await;
        assert!(
            r.as_ref().err().is_some_and(UpstreamError::is_connect),
            "{:?}",
            r.err()
        );
    }

    #[tokio::test]
    async fn a_length_beside_chunked_or_chunked_on_http_1_0_is_decoded_but_not_reused() {
        for reply in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n2\r\nok\r\n0\r\n\r\n"[..],
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ] {
            let b = backend(vec![hold(vec![vec![reply]])]).await;
            let p = pool();
            let (st, h, body) = get(&p, &b, Method::GET).await.expect("chunked");
            assert_eq!((st, &body[..]), (StatusCode::OK, &b"ok"[..]));
            assert!(
                h.get(header::CONTENT_LENGTH).is_none(),
                "a length beside chunked is dropped"
            );
            assert_eq!(
                p.idle_count(0),
                0,
                "framing not to be trusted: {:?}",
                String::from_utf8_lossy(reply)
            );
        }
    }

    #[tokio::test]
    async fn a_chunk_line_or_trailers_past_their_limits_are_refused_even_when_whole() {
        static LONG_LINE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        static BIG_TRAILERS: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let long_line = LONG_LINE.get_or_init(|| {
            let mut v = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2;x=".to_vec();
            v.resize(v.len() + MAX_LINE + 10, b'a');
            v.extend_from_slice(b"\r\nok\r\n0\r\n\r\n");
            v
        });
        let big_trailers = BIG_TRAILERS.get_or_init(|| {
            let mut v =
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n".to_vec();
            for i in 0..(MAX_HEAD / 100 + 10) {
                v.extend_from_slice(format!("x-t{i}: {}\r\n", "b".repeat(90)).as_bytes());
            }
            v.extend_from_slice(b"\r\n");
            v
        });
        for reply in [&long_line[..], &big_trailers[..]] {
            let b = backend(vec![Script {
                replies: vec![vec![reply]],
                after: After::Hold,
            }])
            .await;
            let p = pool();
            assert!(get(&p, &b, Method::GET).await.is_err());
            assert_eq!(p.idle_count(0), 0);
        }
    }

    #[tokio::test]
    async fn a_pooled_connection_that_answers_with_no_response_is_retried_on_a_new_one() {
        // What late bytes of an earlier exchange would look like: not a response head.
        let (b, _, r) = second_answer(b"junk\r\n\r\n").await;
        let (st, _, body) = r.expect("second");
        assert_eq!((st, &body[..]), (StatusCode::OK, &b"b"[..]));
        assert_eq!(b.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_idle_pool_keeps_at_most_its_cap_per_backend() {
        let ok: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na";
        let b = backend(vec![
            hold(vec![vec![ok]]),
            hold(vec![vec![ok]]),
            hold(vec![vec![ok]]),
        ])
        .await;
        let p = Arc::new(Pool {
            idle: vec![Mutex::new(Vec::new())],
            idle_timeout: Duration::from_secs(30),
            max_idle: 2,
        });
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("x"));
        let t = Duration::from_secs(2);
        // Three at once: each head arrives before any body is read, so three connections.
        let (r1, r2, r3) = tokio::join!(
            send(&p, 0, &b.addr, t, &Method::GET, "/", &h),
            send(&p, 0, &b.addr, t, &Method::GET, "/", &h),
            send(&p, 0, &b.addr, t, &Method::GET, "/", &h),
        );
        for r in [r1, r2, r3] {
            let body = r.expect("head").into_body().collect().await.expect("body");
            assert_eq!(&body.to_bytes()[..], b"a");
        }
        assert_eq!(b.accepted.load(Ordering::SeqCst), 3);
        assert_eq!(p.idle_count(0), 2);
    }

    #[tokio::test]
    async fn a_body_the_backend_stops_sending_is_cut_off_after_the_stall() {
        let b = backend(vec![hold(vec![vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
            b"de",
        ]])])
        .await;
        let p = pool();
        let r = get_head(&p, &b).await.expect("head");
        let gauge = prometheus_client::metrics::gauge::Gauge::default();
        let stall = Duration::from_millis(200);
        let body = super::super::load::Counted::new(
            r.into_body(),
            super::super::load::InFlight::new(&gauge),
            stall,
        );
        let started = Instant::now();
        let got = tokio::time::timeout(Duration::from_secs(5), body.collect())
            .await
            .expect("the stall deadline ends the body, not the test's timeout");
        assert!(
            got.is_err(),
            "a cut-off body is an error, never a short 200"
        );
        assert!(started.elapsed() >= stall);
        assert_eq!(gauge.get(), 0, "no longer in flight");
        assert_eq!(p.idle_count(0), 0);
    }

    #[tokio::test]
    async fn a_refused_head_on_a_pooled_connection_is_the_answer_not_resent() {
        let (b, _, r) =
            second_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc")
                .await;
        assert!(matches!(
            r,
            Err(UpstreamError::Protocol("conflicting content-length"))
        ));
        assert_eq!(
            b.accepted.load(Ordering::SeqCst),
            1,
            "the node answered; sending again would only be refused again"
        );
    }

    #[tokio::test]
    async fn a_408_with_close_on_a_pooled_connection_is_retried_on_a_new_one() {
        let (b, _, r) = second_answer(
            b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        let (st, _, body) = r.expect("second");
        assert_eq!((st, &body[..]), (StatusCode::OK, &b"b"[..]));
        assert_eq!(b.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn transfer_encoding_rules_hold_for_responses_without_a_body_too() {
        for (method, reply) in [
            (
                Method::HEAD,
                &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n"[..],
            ),
            (
                Method::GET,
                b"HTTP/1.0 204 No Content\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n",
            ),
            (
                Method::GET,
                b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n",
            ),
        ] {
            let b = backend(vec![hold(vec![vec![reply]])]).await;
            let p = pool();
            let (_, h, body) = get(&p, &b, method).await.expect("bodiless");
            assert!(body.is_empty());
            assert!(h.get(header::CONTENT_LENGTH).is_none());
            assert_eq!(p.idle_count(0), 0, "{:?}", String::from_utf8_lossy(reply));
        }
    }

    #[tokio::test]
    async fn interim_responses_are_bounded() {
        static MANY: std::sync::OnceLock<[Vec<u8>; 2]> = std::sync::OnceLock::new();
        let many = MANY.get_or_init(|| {
            let with = |n: usize| {
                let mut v = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(n);
                v.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                v
            };
            [with(MAX_INTERIM), with(MAX_INTERIM + 1)]
        });
        let b = backend(vec![hold(vec![vec![&many[0][..]]])]).await;
        assert_eq!(get(&pool(), &b, Method::GET).await.expect("16").2, b"ok");
        let b = backend(vec![hold(vec![vec![&many[1][..]]])]).await;
        assert!(matches!(
            get(&pool(), &b, Method::GET).await,
            Err(UpstreamError::Protocol("too many interim responses"))
        ));
    }

    #[tokio::test]
    async fn chunk_sizes_with_leading_zeros_are_their_value() {
        let b = backend(vec![hold(vec![vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n00000000000000003\r\nabc\r\n0000000000000000000\r\n\r\n",
        ]])])
        .await;
        let p = pool();
        assert_eq!(get(&p, &b, Method::GET).await.expect("zeros").2, b"abc");
        assert_eq!(p.idle_count(0), 1);
    }

    #[test]
    fn a_head_may_end_only_at_an_empty_line_past_what_was_searched() {
        assert!(!head_may_end(b"HTTP/1.1 200 OK\r\nx: y\r\n", 0));
        assert!(head_may_end(b"HTTP/1.1 200 OK\r\nx: y\r\n\r\n", 0));
        assert!(head_may_end(b"HTTP/1.1 200 OK\nx: y\n\n", 0));
        // The end straddles the bytes searched before and the new ones.
        let h = b"HTTP/1.1 200 OK\r\n\r\n";
        for from in 0..=h.len() - 1 {
            assert!(head_may_end(h, from), "searched {from}");
        }
        // One byte at a time: only the last read can complete it.
        for end in 1..h.len() {
            assert!(!head_may_end(&h[..end], end - 1), "{end}");
        }
    }

    #[test]
    fn a_request_without_host_gets_the_backends() {
        let head = request_head(&Method::HEAD, "/x", &HeaderMap::new(), "10.0.0.2:8080");
        assert_eq!(head, b"HEAD /x HTTP/1.1\r\nhost: 10.0.0.2:8080\r\n\r\n");
    }
}
