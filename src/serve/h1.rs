//! The node's HTTP/1.x connections: plain GET and HEAD requests are parsed, answered and
//! written here, with file bodies that promise nothing about their bytes sent by
//! `sendfile(2)` (see `semantics::SendFile`); any other request hands the
//! connection, with every byte read so far, to hyper for the rest of its life.
//!
//! Why not hyper for everything: hyper writes a body from user-space buffers, so a 100 KiB
//! file was copied twice (read into memory, then into the socket), where nginx's sendfile
//! copies it once, in the kernel (`_copy_from_iter` was 14.5% of the samples serving
//! 100 KiB files). Owning the connection is what lets a body go from the page cache to
//! the socket. hyper stays the judge of everything that is not the common case: a request
//! with a body, `Expect`, `Upgrade`, an absolute or asterisk target, another method, any
//! head httparse refuses, or more than [`MAX_HEADERS`] headers. Those are handed over
//! before anything was answered, with the bytes read so far put back in front of the
//! socket, so hyper sees the connection exactly as the client sent it.
//!
//! What this module promises, as hyper did: a head must arrive within the header deadline
//! (the idle time of a kept-alive connection counts, so idle connections close after it);
//! a write that makes no progress for the send timeout closes the connection; pipelined
//! requests are answered in order; HTTP/1.0 is kept alive only when it asks; a response
//! whose length is unknown is chunked (HTTP/1.1) or ends with the connection (HTTP/1.0);
//! a body that fails or falls short of its Content-Length aborts the connection, so no
//! cache keeps it; at shutdown an idle connection closes at once and a busy one after its
//! response.

use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use hyper::body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use warp::reply::Response;

use super::semantics::{Seg, SendFile};

/// Headers parsed per request; hyper's own limit, so a head refused here for its count is
/// refused by hyper too, at once.
pub const MAX_HEADERS: usize = 100;

/// A head still incomplete at this size goes to hyper, which allows more (and answers 431
/// past its own limit): the common case never comes near it.
const MAX_HEAD: usize = 64 * 1024;

/// One request this module answers itself.
#[derive(Debug)]
pub struct Head {
    pub method: Method,
    pub path: http::uri::PathAndQuery,
    pub version: Version,
    pub headers: HeaderMap,
}

/// What answers a [`Head`]: the node's resolver in service, a stub in the tests.
pub trait Answer {
    fn answer(&self, head: &Head) -> impl Future<Output = Response>;
}

/// Serves `stream` until the client closes, a deadline passes, `stop` is cancelled, or a
/// request this module does not take comes in; that one and the rest of the connection go
/// to `hyper`, with what was read. The caller has already waited for the first byte.
pub async fn serve<A, H, HF>(
    answer: &A,
    stream: TcpStream,
    timeouts: Timeouts,
    stop: &CancellationToken,
    hyper: H,
) where
    A: Answer,
    H: FnOnce(Prefixed<TcpStream>) -> HF,
    HF: Future<Output = ()>,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        let deadline = tokio::time::Instant::now() + timeouts.header;
        // How far `buf` was searched for the end of a head: each byte is looked at once,
        // so a head sent a byte at a time costs linear time, not a parse per byte. The first
        // bytes are parsed whatever they hold, so garbage goes to hyper (and its 400) at once.
        let mut searched: usize = 0;
        let (head, close) = loop {
            // Empty lines before a request line are ignored (RFC 9112 section 2.2) and
            // dropped as they come: kept, each CR LF read would have the whole buffer
            // parsed again, here and then by hyper, quadratic in what a client trickles.
            let blank = buf
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
            if blank > 0 {
                buf.advance(blank);
                searched = searched.saturating_sub(blank);
            }
            let first = searched == 0 && !buf.is_empty();
            if first || head_ends(&buf, searched) {
                match parse(&buf) {
                    Parsed::Fast(head, len, close) => {
                        buf.advance(len);
                        break (head, close);
                    }
                    Parsed::Partial if buf.len() < MAX_HEAD => {}
                    Parsed::Partial | Parsed::Other => {
                        return hyper(Prefixed::new(buf.freeze(), stream)).await;
                    }
                }
            } else if buf.len() >= MAX_HEAD {
                return hyper(Prefixed::new(buf.freeze(), stream)).await;
            }
            searched = buf.len();
            let read = tokio::select! {
                r = tokio::time::timeout_at(deadline, read_more(&stream, &mut buf)) => r,
                // Idle at shutdown: nothing is lost by closing now.
                _ = stop.cancelled(), if buf.is_empty() => return,
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(_)) => {}
            }
        };
        // A big head grew the buffer; an idle connection keeps no more than a small one.
        if buf.is_empty() && buf.capacity() > 2 * READ_CHUNK {
            buf = BytesMut::with_capacity(READ_CHUNK);
        }
        let close = close || stop.is_cancelled();
        // One unit of tokio's cooperative budget per request: reads and writes that are
        // ready at once never yield, so a client pipelining as fast as it reads would
        // otherwise hold its front thread, and every other connection on it, for as long
        // as it likes.
        tokio::task::coop::consume_budget().await;
        let resp = answer.answer(&head).await;
        match respond(&stream, resp, &head, close, timeouts.send).await {
            Ok(true) => {}
            Ok(false) => {
                shutdown_write(&stream);
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "connection ended with an error");
                return;
            }
        }
    }
}

/// The header deadline and the send timeout of every connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header: Duration,
    pub send: Duration,
}

const READ_CHUNK: usize = 8 * 1024;

/// A file body's unit: its residency is checked, and it is sent or copied, one at a time.
const CHUNK: u64 = 1 << 20;

async fn read_more(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(READ_CHUNK);
    }
    loop {
        stream.readable().await?;
        // A read that did not fill the room it had, and ends where a head ends, took all the
        // socket held: its readiness is cleared then, so the next read waits for the poller
        // instead of paying a recvfrom that returns EAGAIN (one of a request's four system
        // calls). Short alone proves nothing: recv stops at TCP's urgent mark with bytes
        // still queued behind it, and a clear then would strand them until the header
        // deadline; a mark exactly at the end of a head still can, for the client that sent
        // it only. Cleared through the outer `try_io`, whose readiness tick was taken before
        // the read: bytes that arrived during or after it bring a new tick (their edge comes
        // with the next poll, or the driver has recorded it already), and a stale clear is a
        // no-op, so no wakeup is lost.
        let mut got = None;
        let r = stream.try_io(tokio::io::Interest::READABLE, || {
            let room = buf.capacity() - buf.len();
            let n = stream.try_read_buf(buf)?;
            got = Some(n);
            if n > 0 && n < room && (buf.ends_with(b"\r\n\r\n") || buf.ends_with(b"\n\n")) {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(n)
            }
        });
        match (got, r) {
            (Some(n), _) => return Ok(n),
            (None, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
            (None, r) => return r,
        }
    }
}

/// Whether `buf` holds an empty line (`\n\n` or `\n\r\n`: how every head ends, with or
/// without CRs) that ends at or after `from`: only then can httparse find a whole head.
fn head_ends(buf: &[u8], from: usize) -> bool {
    let start = from.saturating_sub(2);
    memchr::memchr_iter(b'\n', &buf[start.min(buf.len())..]).any(|i| {
        let rest = &buf[start + i + 1..];
        rest.first() == Some(&b'\n') || rest.starts_with(b"\r\n")
    })
}

enum Parsed {
    /// A request taken here: its head, the head's length, and whether the client asked for
    /// the connection to close after it.
    Fast(Head, usize, bool),
    Partial,
    /// Anything else: hyper's.
    Other,
}

fn parse(buf: &[u8]) -> Parsed {
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        // hyper parses the same bytes with the same parser and answers the error itself.
        Err(_) => return Parsed::Other,
    };
    let method = match req.method {
        Some("GET") => Method::GET,
        Some("HEAD") => Method::HEAD,
        _ => return Parsed::Other,
    };
    let version = match req.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Parsed::Other,
    };
    let Some(target) = req.path.filter(|p| p.starts_with('/')) else {
        return Parsed::Other;
    };
    let Ok(path) = http::uri::PathAndQuery::try_from(target) else {
        return Parsed::Other;
    };
    let (mut saw_close, mut saw_keep_alive) = (false, false);
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return Parsed::Other;
        }
        if name.eq_ignore_ascii_case(b"content-length") && h.value != b"0" {
            // A body to read (or a malformed length): hyper reads it, or refuses it.
            return Parsed::Other;
        }
        if name.eq_ignore_ascii_case(b"connection") {
            saw_close |= has_token(h.value, b"close");
            saw_keep_alive |= has_token(h.value, b"keep-alive");
        }
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::Other;
        };
        headers.append(name, value);
    }
    // "close" wins over "keep-alive", in any order; HTTP/1.0 stays open only when asked.
    let close = saw_close || (version == Version::HTTP_10 && !saw_keep_alive);
    Parsed::Fast(
        Head {
            method,
            path,
            version,
            headers,
        },
        len,
        close,
    )
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// HTTP/1.0 with no known length: the body ends with the connection.
    ToClose,
}

/// Writes `resp` for `req`; `Ok(true)` if the connection stays open for the next request.
async fn respond(
    stream: &TcpStream,
    mut resp: Response,
    req: &Head,
    close: bool,
    send_timeout: Duration,
) -> io::Result<bool> {
    let status = resp.status();
    let bodiless = req.method == Method::HEAD;
    let declared = resp
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let no_content = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let (framing, add_length) = if no_content {
        (Framing::None, None)
    } else if bodiless {
        // HEAD: the length a GET would have, as hyper sends it, and no body.
        let exact = resp.body().size_hint().exact();
        (Framing::None, exact.filter(|_| declared.is_none()))
    } else if let Some(n) = declared {
        (Framing::Length(n), None)
    } else if let Some(n) = resp.body().size_hint().exact() {
        (Framing::Length(n), Some(n))
    } else if req.version == Version::HTTP_10 {
        (Framing::ToClose, None)
    } else {
        (Framing::Chunked, None)
    };
    let close = close
        || framing == Framing::ToClose
        || resp
            .headers()
            .get_all(CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"close"));
    let sendfile = resp.extensions_mut().remove::<SendFile>();
    let mut head = Vec::with_capacity(512);
    encode_head(&mut head, &resp, framing, add_length, req.version, close);
    let w = Writer {
        stream,
        timeout: send_timeout,
    };
    match (framing, sendfile) {
        (Framing::None, _) => w.all(&[&head]).await?,
        (Framing::Length(n), Some(sf)) if sf.len == n => w.segments(&head, &sf).await?,
        (_, _) => w.body(head, resp.into_body(), framing).await?,
    }
    Ok(!close)
}

fn encode_head(
    out: &mut Vec<u8>,
    resp: &Response,
    framing: Framing,
    add_length: Option<u64>,
    version: Version,
    close: bool,
) {
    let status = resp.status();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut has_date = false;
    for (name, value) in resp.headers() {
        // Framing is this module's: a handler's Transfer-Encoding would contradict it.
        if name == TRANSFER_ENCODING || name == CONNECTION {
            continue;
        }
        has_date |= name == DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        date::with(|d| out.extend_from_slice(d));
        out.extend_from_slice(b"\r\n");
    }
    if let Some(n) = add_length {
        use std::io::Write as _;
        // Writing to a Vec cannot fail.
        let _ = write!(out, "content-length: {n}\r\n");
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The Date header's value, formatted once per second per thread (as hyper caches it).
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, Vec<u8>)> = const { RefCell::new((0, Vec::new())) };
    }

    pub fn with(f: impl FnOnce(&[u8])) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs || c.1.is_empty() {
                c.0 = secs;
                c.1 = httpdate::fmt_http_date(now).into_bytes();
            }
            f(&c.1);
        });
    }
}

/// Writes to the socket, failing once a write has made no progress for `timeout`.
struct Writer<'a> {
    stream: &'a TcpStream,
    timeout: Duration,
}

impl Writer<'_> {
    async fn writable(&self) -> io::Result<()> {
        match tokio::time::timeout(self.timeout, self.stream.writable()).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("client read nothing for {:?}", self.timeout),
            )),
        }
    }

    /// Writes every byte of `parts` (at most four), in one system call when the socket
    /// takes them.
    async fn all(&self, parts: &[&[u8]]) -> io::Result<()> {
        let mut all = [IoSlice::new(&[]); 4];
        let n = parts.len().min(all.len());
        for (slot, part) in all.iter_mut().zip(parts) {
            *slot = IoSlice::new(part);
        }
        let mut slices = &mut all[..n];
        // Empty parts (no head left to send) are skipped before the first write.
        IoSlice::advance_slices(&mut slices, 0);
        while !slices.is_empty() {
            match self.stream.try_write_vectored(slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut slices, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// `bytes` with MSG_MORE: the kernel holds a short head back for the file pages that
    /// follow it (TCP_NODELAY would send it alone), as `sendfile` itself does between chunks.
    async fn more(&self, mut bytes: &[u8]) -> io::Result<()> {
        let fd = self.stream.as_raw_fd();
        while !bytes.is_empty() {
            let r = self.stream.try_io(Interest::WRITABLE, || {
                // SAFETY: a valid pointer and length into `bytes`, on our socket.
                let n = unsafe {
                    libc::send(
                        fd,
                        bytes.as_ptr().cast(),
                        bytes.len(),
                        libc::MSG_MORE | libc::MSG_NOSIGNAL,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// `range` of `file` by sendfile(2), from the page cache to the socket with no copy
    /// here, one [`CHUNK`] at a time: a chunk whose pages are not all cached
    /// (`local::resident`, one cachestat of that chunk only) is read on a blocking thread
    /// and written from there, so the front thread never waits for the disk and a check
    /// costs the same for a 2-byte range of a large file as for a small one.
    async fn file(
        &self,
        file: &std::sync::Arc<std::fs::File>,
        range: std::ops::Range<u64>,
    ) -> io::Result<()> {
        let mut off = range.start;
        while off < range.end {
            // A client that reads as fast as loopback sends would keep the thread here.
            tokio::task::coop::consume_budget().await;
            let end = range.end.min(off + CHUNK);
            if super::local::resident(file, off..end) {
                self.sendfile(file, off..end).await?;
            } else {
                let (f, n) = (file.clone(), (end - off) as usize);
                let buf = tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let mut buf = vec![0u8; n];
                    // A file that shrank fails here: the body stops short of its length.
                    f.read_exact_at(&mut buf, off).map(|()| buf)
                })
                .await
                .map_err(io::Error::other)??;
                self.all(&[&buf]).await?;
            }
            off = end;
        }
        Ok(())
    }

    async fn sendfile(&self, file: &std::fs::File, range: std::ops::Range<u64>) -> io::Result<()> {
        let (sock, src) = (self.stream.as_raw_fd(), file.as_raw_fd());
        let mut off = range.start;
        while off < range.end {
            let want = usize::try_from(range.end - off).unwrap_or(usize::MAX);
            let r = self.stream.try_io(Interest::WRITABLE, || {
                let mut o = off as libc::off_t;
                // SAFETY: two descriptors we hold open, and an offset we own.
                let n = unsafe { libc::sendfile(sock, src, &mut o, want) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                // The file shrank below what the head promised.
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank")),
                Ok(n) => off += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The head, then a body laid out by the source as file spans and framing bytes.
    async fn segments(&self, head: &[u8], sf: &SendFile) -> io::Result<()> {
        self.more(head).await?;
        let last = sf.segs.len().saturating_sub(1);
        for (i, seg) in sf.segs.iter().enumerate() {
            match seg {
                Seg::Bytes(b) if i == last => self.all(&[b]).await?,
                Seg::Bytes(b) => self.more(b).await?,
                Seg::File(r) => self.file(&sf.file, r.clone()).await?,
            }
        }
        Ok(())
    }

    /// The head and any body, framed; the head goes with the first bytes of the body.
    async fn body<B>(&self, head: Vec<u8>, mut body: B, framing: Framing) -> io::Result<()>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut head = Some(head);
        let mut sent: u64 = 0;
        loop {
            let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
            let data = match frame {
                None => break,
                Some(Err(e)) => return Err(io::Error::other(e)),
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) if !d.is_empty() => d,
                    // Trailers, or an empty frame: nothing for the wire.
                    _ => continue,
                },
            };
            let h = head.take().unwrap_or_default();
            match framing {
                Framing::Length(n) => {
                    let room = n.saturating_sub(sent);
                    let take = usize::try_from(room).unwrap_or(usize::MAX).min(data.len());
                    self.all(&[&h, &data[..take]]).await?;
                    sent += take as u64;
                    if take < data.len() {
                        return Err(io::Error::other(
                            "the body is longer than its Content-Length",
                        ));
                    }
                }
                Framing::Chunked => {
                    let size = format!("{:x}\r\n", data.len());
                    self.all(&[&h, size.as_bytes(), &data, b"\r\n"]).await?;
                }
                Framing::ToClose | Framing::None => self.all(&[&h, &data]).await?,
            }
        }
        let h = head.take().unwrap_or_default();
        match framing {
            Framing::Length(n) if sent < n => {
                // The head goes out so the client sees the response cut short, not silence.
                self.all(&[&h]).await?;
                Err(io::Error::other(
                    "the body ended short of its Content-Length",
                ))
            }
            Framing::Chunked => self.all(&[&h, b"0\r\n\r\n"]).await,
            _ => self.all(&[&h]).await,
        }
    }
}

fn shutdown_write(stream: &TcpStream) {
    // SAFETY: shutdown(2) on our own socket.
    unsafe {
        libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR);
    }
}

/// A stream whose reads give `prefix` first: the bytes this module read before handing
/// the connection to hyper.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Prefixed<S> {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream as StdStream;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use warp::reply::Reply;

    /// Answers by path: `/len/N` N bytes of 'x'; `/stream` two chunks of unknown length;
    /// `/short` a Content-Length of 10 over 5 bytes; `/file` spans of the file by sendfile.
    struct Stub {
        file: std::path::PathBuf,
    }

    impl Answer for Stub {
        fn answer(&self, head: &Head) -> impl Future<Output = Response> {
            let path = head.path.path().to_string();
            let file = self.file.clone();
            async move {
                if let Some(n) = path.strip_prefix("/len/") {
                    let n: usize = n.parse().expect("a length");
                    return Response::new(Bytes::from(vec![b'x'; n]).into());
                }
                match path.as_str() {
                    "/block" => {
                        // Holds the (current_thread) runtime: no poll of the driver meanwhile.
                        std::thread::sleep(Duration::from_millis(300));
                        Response::new(Bytes::from_static(b"b").into())
                    }
                    "/stream" => {
                        let parts = ["hello ", "world"]
                            .map(|p| Ok::<_, io::Error>(Bytes::from_static(p.as_bytes())));
                        warp::reply::stream(futures_util::stream::iter(parts)).into_response()
                    }
                    "/short" => {
                        let mut r = Response::new(Bytes::from_static(b"12345").into());
                        r.headers_mut()
                            .insert(CONTENT_LENGTH, HeaderValue::from_static("10"));
                        r
                    }
                    "/file" => {
                        let f = std::fs::File::open(&file).expect("open");
                        let segs = vec![
                            Seg::Bytes(Bytes::from_static(b"[")),
                            Seg::File(2..6),
                            Seg::Bytes(Bytes::from_static(b"|")),
                            Seg::File(0..10),
                        ];
                        by_sendfile(SendFile::new(f, segs), b"not this")
                    }
                    "/cold" => {
                        let f = std::fs::File::open(file.with_file_name("cold")).expect("open");
                        by_sendfile(SendFile::new(f, vec![Seg::File(0..COLD_LEN)]), b"")
                    }
                    _ => StatusCode::NOT_FOUND.into_response(),
                }
            }
        }
    }

    /// A response carrying `sf` and its length, over an own body (`decoy`) that must never
    /// be what goes out.
    fn by_sendfile(sf: SendFile, decoy: &'static [u8]) -> Response {
        let mut r = Response::new(Bytes::from_static(decoy).into());
        r.headers_mut().insert(
            CONTENT_LENGTH,
            HeaderValue::from_str(&sf.len.to_string()).expect("len"),
        );
        r.extensions_mut().insert(sf);
        r
    }

    const COLD_LEN: u64 = 3 * CHUNK;

    fn cold_bytes() -> Vec<u8> {
        (0..COLD_LEN).map(|i| (i * 13 % 251) as u8).collect()
    }

    /// A chunk whose pages are not cached is read on a blocking thread and copied, between
    /// chunks sent by sendfile: the body is the file's, whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_partly_out_of_the_page_cache_goes_whole_chunk_by_chunk() {
        let (mut c, task, _d) = served(QUICK, CancellationToken::new()).await;
        c.write_all(b"GET /cold HTTP/1.1\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut got = Vec::new();
        c.read_to_end(&mut got).expect("read");
        let end = got
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a head")
            + 4;
        assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert!(got[end..] == cold_bytes()[..], "{} bytes", got.len() - end);
        task.await.expect("task");
    }

    const QUICK: Timeouts = Timeouts {
        header: Duration::from_millis(500),
        send: Duration::from_secs(5),
    };

    /// A loopback connection served by `serve` with the stub; hyper's side echoes what it
    /// was handed as "HANDED <bytes>" and closes.
    async fn served(
        timeouts: Timeouts,
        stop: CancellationToken,
    ) -> (StdStream, tokio::task::JoinHandle<()>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("f");
        std::fs::write(&file, b"0123456789").expect("write");
        // Three chunks, the last two dropped from the page cache once on disk.
        let cold = std::fs::File::create(dir.path().join("cold")).expect("create");
        std::io::Write::write_all(&mut &cold, &cold_bytes()).expect("write");
        cold.sync_all().expect("fsync");
        // SAFETY: fadvise on a descriptor we hold; clean pages are dropped.
        let rc = unsafe {
            libc::posix_fadvise(
                cold.as_raw_fd(),
                CHUNK as libc::off_t,
                0,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        assert_eq!(rc, 0);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let stub = Stub { file };
            serve(
                &stub,
                stream,
                timeouts,
                &stop,
                |mut io: Prefixed<TcpStream>| async move {
                    let mut got = vec![0u8; 4096];
                    let n = io.read(&mut got).await.expect("read");
                    let mut out = b"HANDED ".to_vec();
                    out.extend_from_slice(&got[..n]);
                    io.write_all(&out).await.expect("write");
                    io.shutdown().await.expect("shutdown");
                },
            )
            .await;
        });
        let client = tokio::task::spawn_blocking(move || StdStream::connect(addr))
            .await
            .expect("task")
            .expect("connect");
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        (client, task, dir)
    }

    /// Everything the server sends until it closes (or 10 s pass, which fails).
    fn read_to_close(c: &mut StdStream) -> String {
        let mut out = Vec::new();
        c.read_to_end(&mut out)
            .expect("the server closes within 10 s");
        String::from_utf8_lossy(&out).into_owned()
    }

    fn without_dates(s: &str) -> String {
        s.lines()
            .filter(|l| !l.starts_with("date: "))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_requests_are_answered_in_order_and_close_is_honoured() {
        let (mut c, task, _d) = served(QUICK, CancellationToken::new()).await;
        c.write_all(b"GET /len/3 HTTP/1.1\r\nHost: a\r\n\r\nHEAD /len/5 HTTP/1.1\r\n\r\nGET /len/2 HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n")
            .expect("write");
        let got = read_to_close(&mut c);
        assert_eq!(
            without_dates(&got),
            "HTTP/1.1 200 OK\ncontent-length: 3\n\nxxxHTTP/1.1 200 OK\ncontent-length: 5\n\n\
             HTTP/1.1 200 OK\ncontent-length: 2\nconnection: close\n\nxx",
            "{got}"
        );
        assert_eq!(got.matches("date: ").count(), 3, "{got}");
        task.await.expect("task");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http10_stays_open_only_when_asked_and_unknown_lengths_end_with_the_connection() {
        let (mut c, task, _d) = served(QUICK, CancellationToken::new()).await;
        c.write_all(b"GET /len/1 HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\nGET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .expect("write");
        let got = read_to_close(&mut c);
        assert!(
            got.starts_with("HTTP/1.1 200 OK\r\n")
                && got.contains("content-length: 1\r\n")
                && got.contains("connection: keep-alive\r\n\r\nx"),
            "{got}"
        );
        // No length known and HTTP/1.0: no chunking, the close ends the body.
        let second = &got[got.find("xHTTP/1.1").expect("two answers") + 1..];
        assert!(!second.contains("transfer-encoding"), "{second}");
        assert!(second.contains("connection: close\r\n"), "{second}");
        assert!(second.ends_with("\r\n\r\nhello world"), "{second}");
        task.await.expect("task");

        let (mut c, task, _d) = served(QUICK, CancellationToken::new()).await;
        c.write_all(b"GET /len/1 HTTP/1.0\r\n\r\n").expect("write");
        let got = read_to_close(&mut c);
        assert!(got.contains("connection: close\r\n\r\nx"), "{got}");
        assert!(got.ends_with("\r\n\r\nx"), "{got}");
        task.await.expect("task");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unknown_length_is_chunked_on_http11() {
        let (mut c, task, _d) = served(QUICK, CancellationToken::new()).await;
        c.write_all(b"GET /stream HTTP/1.1\r\nConnection: close\r\n\r\n")
            .expect("write");
        let got = read_to_close(&mut c);
        assert!(got.contains("transfer-encoding: chunked\r\n"), "{got}");
        assert!(
            got.ends_with("\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"),
            "{got}"
        );
        task.await.expect("task");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_short_of_its_length_aborts_the_connection() {
        let (mut c, task, _d) = served(QUICK, CancellationToken::new()).await;
        c.write_all(b"GET /short HTTP/1.1\r\n\r\nGET /len/1 HTTP/1.1\r\n\r\n")
            .expect("write");
        let got = read_to_close(&mut c);
        // The head and what there was, then the close: the second request is never answered.
        assert!(got.contains("content-length: 10\r\n"), "{got}");
        assert!(got.ends_with("\r\n\r\n12345"), "{got}");
        assert_eq!(got.matches("HTTP/1.1").count(), 1, "{got}");
        task.await.expect("task");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_body_goes_by_sendfile_span_by_span() {
        let (mut c, task, _d) = served(QUICK, CancellationToken::new()).await;
        c.write_all(b"GET /file HTTP/1.1\r\n\r\nHEAD /file HTTP/1.1\r\nConnection: close\r\n\r\n")
            .expect("write");
        let got = read_to_close(&mut c);
        // The extension's bytes, never the response's own body; HEAD sends neither.
        assert!(got.contains("content-length: 16\r\n"), "{got}");
        assert!(
            got.contains("\r\n\r\n[2345|0123456789HTTP/1.1 200 OK"),
            "{got}"
        );
        assert!(got.ends_with("connection: close\r\n\r\n"), "{got}");
        assert!(!got.contains("not this"), "{got}");
        task.await.expect("task");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_with_a_body_goes_to_hyper_with_every_byte_read() {
        for req in [
            &b"GET /len/1 HTTP/1.1\r\n\r\nPOST /len/1 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"[..],
            b"GET /len/1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET /len/1 HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"GET http://a/len/1 HTTP/1.1\r\n\r\n",
            b"GET /len/1 HTTP/1.1\r\nBad Header: x\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            let (mut c, task, _d) = served(QUICK, CancellationToken::new()).await;
            c.write_all(req).expect("write");
            let got = read_to_close(&mut c);
            let handed = &got[got.find("HANDED ").expect("handed to hyper") + 7..];
            let first_len = if req.starts_with(b"GET /len/1 HTTP/1.1\r\n\r\n") {
                assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
                b"GET /len/1 HTTP/1.1\r\n\r\n".len()
            } else {
                0
            };
            assert_eq!(handed.as_bytes(), &req[first_len..], "{got}");
            task.await.expect("task");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn empty_lines_before_a_request_line_are_dropped_as_they_come() {
        let (mut c, task, _d) = served(QUICK, CancellationToken::new()).await;
        // More than a head may hold, trickled: kept, they would fill the buffer and the
        // connection would go to hyper with them.
        for _ in 0..40 {
            c.write_all(&b"\r\n".repeat(1024)).expect("write");
            std::thread::sleep(Duration::from_millis(2));
        }
        c.write_all(b"\nGET /len/2 HTTP/1.1\r\nConnection: close\r\n\r\n")
            .expect("write");
        let got = read_to_close(&mut c);
        assert!(
            got.starts_with("HTTP/1.1 200 OK") && got.ends_with("\r\n\r\nxx"),
            "{got}"
        );
        task.await.expect("task");
    }

    /// A client pipelining as fast as it reads the answers never makes a read or a write
    /// wait, so only the per-request budget lets the thread's other connections run.
    #[tokio::test(flavor = "current_thread")]
    async fn a_client_pipelining_without_pause_does_not_hold_its_thread() {
        let dir = tempfile::tempdir().expect("dir");
        let stub = std::sync::Arc::new(Stub {
            file: dir.path().join("f"),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let server = {
            let stop = stop.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (stub, stop) = (stub.clone(), stop.clone());
                    tokio::spawn(async move {
                        serve(
                            &*stub,
                            stream,
                            QUICK,
                            &stop,
                            |_io: Prefixed<TcpStream>| async {},
                        )
                        .await;
                    });
                }
            })
        };
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flood = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut w = StdStream::connect(addr).expect("connect");
                let mut r = w.try_clone().expect("clone");
                std::thread::spawn(move || {
                    let mut sink = vec![0u8; 1 << 16];
                    while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
                });
                let burst = b"GET /len/1 HTTP/1.1\r\n\r\n".repeat(2048);
                // Bounded: three seconds at most, then the connection closes.
                let until = std::time::Instant::now() + Duration::from_secs(3);
                while !done.load(std::sync::atomic::Ordering::Relaxed)
                    && std::time::Instant::now() < until
                {
                    if w.write_all(&burst).is_err() {
                        break;
                    }
                }
            })
        };
        let other = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let mut c = StdStream::connect(addr).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let started = std::time::Instant::now();
            c.write_all(b"GET /len/2 HTTP/1.1\r\nConnection: close\r\n\r\n")
                .expect("write");
            let got = read_to_close(&mut c);
            (started.elapsed(), got)
        });
        let (took, got) = tokio::task::spawn_blocking(move || other.join().expect("other"))
            .await
            .expect("join");
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        tokio::task::spawn_blocking(move || flood.join().expect("flood"))
            .await
            .expect("join");
        assert!(got.ends_with("\r\n\r\nxx"), "{got}");
        assert!(took < Duration::from_secs(1), "answered after {took:?}");
        stop.cancel();
        server.abort();
    }

    /// A runtime like a front thread's (current_thread) and a loopback listener on it.
    fn front_runtime() -> (
        tokio::runtime::Runtime,
        tokio::net::TcpListener,
        std::net::SocketAddr,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        (rt, listener, addr)
    }

    /// TCP urgent data: recv(2) stops at the urgent mark once it has copied anything, so a
    /// read that did not fill its room can leave bytes in the socket. The front thread is
    /// busy (a blocking answer) while the next head arrives split by an urgent byte, so the
    /// driver sees one edge for all of it: the rest of the head must still be read (found
    /// by the attack review of the readiness clear; stalled until the header deadline).
    #[test]
    fn an_urgent_byte_mid_head_does_not_strand_the_rest_of_it() {
        let (rt, listener, addr) = front_runtime();
        let dir = tempfile::tempdir().expect("dir");
        let t = Timeouts {
            header: Duration::from_secs(3),
            send: Duration::from_secs(5),
        };
        let file = dir.path().join("f");
        let server = std::thread::spawn(move || {
            rt.block_on(async move {
                let (stream, _) = listener.accept().await.expect("accept");
                let stub = Stub { file };
                serve(
                    &stub,
                    stream,
                    t,
                    &CancellationToken::new(),
                    |_io: Prefixed<TcpStream>| async {},
                )
                .await;
            })
        });
        let mut c = StdStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("t");
        c.write_all(b"GET /block HTTP/1.1\r\n\r\n").expect("write");
        std::thread::sleep(Duration::from_millis(100));
        c.write_all(b"GET /len/2 HTTP/1.1\r\n").expect("write");
        // SAFETY: a one-byte send on our own socket.
        let n = unsafe { libc::send(c.as_raw_fd(), b"!".as_ptr().cast(), 1, libc::MSG_OOB) };
        assert_eq!(n, 1);
        c.write_all(b"Connection: close\r\n\r\n").expect("write");
        let started = std::time::Instant::now();
        let mut out = Vec::new();
        let r = c.read_to_end(&mut out);
        let took = started.elapsed();
        let got = String::from_utf8_lossy(&out).into_owned();
        server.join().expect("server");
        assert!(
            got.ends_with("\r\n\r\nxx"),
            "second request not answered; connection closed after {took:?} ({r:?}): {got:?}"
        );
    }

    /// Many connections on one current_thread runtime (as the front threads are), clients
    /// that split heads into tiny segments with tiny pauses, pipeline, or send the next
    /// request the instant the answer arrives; no request may wait for the header deadline.
    #[test]
    fn no_request_waits_under_splits_pipelining_and_ping_pong() {
        let (rt, listener, addr) = front_runtime();
        let dir = tempfile::tempdir().expect("dir");
        let stub = std::sync::Arc::new(Stub {
            file: dir.path().join("f"),
        });
        let stop = CancellationToken::new();
        let slow = Timeouts {
            header: Duration::from_secs(20),
            send: Duration::from_secs(20),
        };
        let server = std::thread::spawn({
            let stop = stop.clone();
            move || {
                rt.block_on(async move {
                    loop {
                        tokio::select! {
                            a = listener.accept() => {
                                let Ok((stream, _)) = a else { break };
                                let (stub, stop) = (stub.clone(), stop.clone());
                                tokio::spawn(async move {
                                    serve(&*stub, stream, slow, &stop, |_io: Prefixed<TcpStream>| async {}).await;
                                });
                            }
                            _ = stop.cancelled() => break,
                        }
                    }
                })
            }
        });
        let mut clients = Vec::new();
        for c in 0..24u64 {
            clients.push(std::thread::spawn(move || {
                let mut s = StdStream::connect(addr).expect("connect");
                s.set_nodelay(true).expect("nodelay");
                s.set_read_timeout(Some(Duration::from_secs(10))).expect("t");
                let mut worst = Duration::ZERO;
                let mut buf = vec![0u8; 1 << 16];
                for i in 0..150u64 {
                    let n = (c * 7 + i) % 9000 + 1;
                    let pad = "a".repeat(((c + i) % 5) as usize * 4000); // heads up to ~16 KiB
                    let req = format!("GET /len/{n} HTTP/1.1\r\nHost: h\r\nX-Pad: {pad}\r\n\r\n");
                    let started = std::time::Instant::now();
                    let piped = i % 3 == 0;
                    match (c + i) % 4 {
                        0 => s.write_all(req.as_bytes()).expect("w"),
                        1 => {
                            for ch in req.as_bytes().chunks(7 + (i as usize % 13)) {
                                s.write_all(ch).expect("w");
                                if i % 2 == 0 {
                                    std::thread::sleep(Duration::from_micros(50));
                                }
                            }
                        }
                        2 => {
                            let (a, b) = req.as_bytes().split_at(req.len() - 1);
                            s.write_all(a).expect("w");
                            std::thread::yield_now();
                            s.write_all(b).expect("w");
                        }
                        _ => {
                            let (a, b) = req.as_bytes().split_at(req.len() / 2);
                            s.write_all(a).expect("w");
                            std::thread::sleep(Duration::from_millis(1));
                            s.write_all(b).expect("w");
                        }
                    }
                    let expect_n = if piped {
                        // A second request right behind the first, one segment.
                        let req2 = "GET /len/3 HTTP/1.1\r\n\r\n";
                        s.write_all(req2.as_bytes()).expect("w");
                        2
                    } else {
                        1
                    };
                    // Read the answers: each "HTTP/1.1 200" head plus its body length.
                    let mut got = Vec::new();
                    let want = {
                        let h = |len: u64| {
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\ndate: Sun, 06 Nov 1994 08:49:37 GMT\r\n\r\n").len() as u64 + len
                        };
                        h(n) + if expect_n == 2 { h(3) } else { 0 }
                    };
                    while (got.len() as u64) < want {
                        let k = s.read(&mut buf).unwrap_or_else(|e| {
                            panic!("client {c} request {i}: read failed after {:?}: {e}", started.elapsed())
                        });
                        assert!(k > 0, "client {c} request {i}: closed");
                        got.extend_from_slice(&buf[..k]);
                    }
                    worst = worst.max(started.elapsed());
                }
                worst
            }));
        }
        let mut worst = Duration::ZERO;
        for c in clients {
            worst = worst.max(c.join().expect("client"));
        }
        stop.cancel();
        server.join().expect("server");
        assert!(worst < Duration::from_secs(2), "a request waited {worst:?}");
    }

    #[test]
    fn the_end_of_a_head_is_found_once_whatever_the_split() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        // Fed a byte at a time, searched from where the last search stopped: found exactly
        // when the last byte arrives, never before.
        let mut searched = 0;
        for n in 1..=head.len() {
            assert_eq!(head_ends(&head[..n], searched), n == head.len(), "{n}");
            searched = n;
        }
        assert!(head_ends(b"GET / HTTP/1.1\nHost: a\n\n", 0));
        assert!(!head_ends(b"GET / HTTP/1.1\r\nHost: a\r\n", 0));
        // A CR LF CR LF split between two reads, with the search starting after the first LF.
        assert!(head_ends(b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 23));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_head_split_across_pauses_is_answered_within_the_deadline() {
        let (mut c, task, _d) = served(QUICK, CancellationToken::new()).await;
        for part in [
            &b"GET /len/2 HT"[..],
            b"TP/1.1\r\nHost:",
            b" a\r\nConnection: close\r\n",
            b"\r\n",
        ] {
            c.write_all(part).expect("write");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(read_to_close(&mut c).ends_with("\r\n\r\nxx"));
        task.await.expect("task");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_head_not_finished_within_the_deadline_closes_the_connection() {
        let (mut c, task, _d) = served(QUICK, CancellationToken::new()).await;
        let started = std::time::Instant::now();
        c.write_all(b"GET /len/2 HTTP/1.1\r\nHost: a\r\n")
            .expect("write");
        assert_eq!(read_to_close(&mut c), "");
        let took = started.elapsed();
        assert!(took >= QUICK.header, "{took:?}");
        assert!(took < QUICK.header * 3 + Duration::from_secs(1), "{took:?}");
        task.await.expect("task");

        // The idle time after an answer counts too: a kept-alive connection closes after it.
        let (mut c, task, _d) = served(QUICK, CancellationToken::new()).await;
        c.write_all(b"GET /len/1 HTTP/1.1\r\n\r\n").expect("write");
        assert!(read_to_close(&mut c).ends_with("\r\n\r\nx"));
        task.await.expect("task");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_connection_closes_at_shutdown_and_a_busy_one_after_its_answer() {
        let stop = CancellationToken::new();
        let long = Timeouts {
            header: Duration::from_secs(30),
            send: Duration::from_secs(5),
        };
        let (mut c, task, _d) = served(long, stop.clone()).await;
        c.write_all(b"GET /len/1 HTTP/1.1\r\n\r\n").expect("write");
        let mut first = [0u8; 256];
        let n = c.read(&mut first).expect("an answer");
        assert!(String::from_utf8_lossy(&first[..n]).ends_with("\r\n\r\nx"));
        stop.cancel();
        assert_eq!(read_to_close(&mut c), "");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("closes at once")
            .expect("task");

        // Cancelled before the request came: it is answered, with a close.
        let stop = CancellationToken::new();
        let (mut c, task, _d) = served(long, stop.clone()).await;
        c.write_all(b"GET /len").expect("write");
        std::thread::sleep(Duration::from_millis(100));
        stop.cancel();
        c.write_all(b"/1 HTTP/1.1\r\n\r\n").expect("write");
        let got = read_to_close(&mut c);
        assert!(got.ends_with("connection: close\r\n\r\nx"), "{got}");
        task.await.expect("task");
    }
}
