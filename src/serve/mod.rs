//! The HTTP front: routes, the listener, and the one place errors become status codes.

pub mod cache;
pub mod conn;
pub mod fetch;
pub mod h1;
pub mod local;
pub mod memo;
pub mod meta;
pub mod resolve;
pub mod semantics;

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, StatusCode};
use tokio_util::sync::CancellationToken;
use warp::reply::{Reply, Response};

use crate::catalog::Catalog;
use crate::config::Config;
use crate::store::Store;

/// Every way a request can fail; `into_response` is the only status-code mapping.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("bad key: {0}")]
    BadKey(#[from] crate::key::KeyError),
    #[error("not found")]
    NotFound,
    #[error("gone")]
    Gone,
    #[error("method not allowed")]
    Method,
    #[error("not ready: {0}")]
    NotReady(String),
    /// S3 holds another version than the metadata describes; nothing was sent yet.
    #[error("stale metadata: {0}")]
    Stale(String),
    #[error("bad gateway: S3 and the archive both failed")]
    BadGateway,
    #[error("gateway timeout: S3 and the archive both failed")]
    Timeout,
    #[error("internal: {0}")]
    Internal(String),
}

impl ServeError {
    pub fn status(&self) -> StatusCode {
        match self {
            ServeError::BadKey(_) => StatusCode::BAD_REQUEST,
            ServeError::NotFound => StatusCode::NOT_FOUND,
            ServeError::Gone => StatusCode::GONE,
            ServeError::Method => StatusCode::METHOD_NOT_ALLOWED,
            ServeError::NotReady(_) | ServeError::Stale(_) => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::BadGateway => StatusCode::BAD_GATEWAY,
            ServeError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ServeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short plain-text body that says nothing internal (no S3 error chain, no host
    /// names, no paths): the log has the detail. Never cacheable downstream: a 404 may be a
    /// file that lands a second later, a 5xx a moment's outage.
    pub fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            ServeError::BadKey(e) => format!("bad request: {e}\n"),
            ServeError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error serving a request");
                "internal server error\n".to_string()
            }
            ServeError::NotReady(why) | ServeError::Stale(why) => {
                tracing::warn!(reason = %why, "answering 503");
                "service unavailable, try again\n".to_string()
            }
            ServeError::BadGateway => "bad gateway\n".to_string(),
            ServeError::Timeout => "gateway timeout\n".to_string(),
            other => format!("{other}\n"),
        };
        let mut r = body.into_response();
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        match self {
            ServeError::Method => {
                h.insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            }
            ServeError::NotReady(_) | ServeError::Stale(_) => {
                h.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        r
    }
}

/// Runs the HTTP front on `listener` until `shutdown`: `http.workers` threads, each owning
/// the connections handed to it (see `conn::thread_per_core`).
pub async fn serve(
    state: Arc<resolve::Resolver>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cap = conn::Cap::new(state.cfg.http.max_connections);
    let workers = state.cfg.http.workers;
    let stop = shutdown.clone();
    conn::thread_per_core("ferry-http", listener, workers, cap, shutdown, move |rx| {
        front_thread(state.clone(), rx, stop.clone())
    })
    .await
}

/// What every mount response gets on its way out, and the request metrics: the same for
/// ferry's own connections (`h1`) and hyper's.
struct Front {
    state: Arc<resolve::Resolver>,
    /// X-Ferry-Node, built once.
    node: HeaderValue,
}

impl Front {
    async fn answer_parts(
        &self,
        method: &http::Method,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Response {
        let started = std::time::Instant::now();
        let mut resp = match self.state.handle(method, path, headers).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
        let h = resp.headers_mut();
        h.insert("x-ferry-node", self.node.clone());
        // SECURITY: no browser guesses a type we did not send (an "image" that sniffs
        // as HTML would run as the site).
        h.insert(semantics::NOSNIFF, HeaderValue::from_static("nosniff"));
        if path.starts_with(&self.state.cfg.http.mount) {
            let m = crate::telemetry::metrics();
            let source = resp
                .headers()
                .get("x-ferry-source")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none");
            m.http(source, resp.status().as_u16());
            m.http_seconds.observe(started.elapsed().as_secs_f64());
        }
        resp
    }
}

impl h1::Answer for Front {
    fn answer(&self, head: &h1::Head) -> impl std::future::Future<Output = Response> {
        // Boxed, as hyper's service future is: inline, the resolver's state machine would
        // size every connection's task.
        Box::pin(self.answer_parts(&head.method, head.path.path(), &head.headers))
    }
}

/// One front thread: serves the connections handed to it until the accept loop stops,
/// then drains them within `DRAIN_DEADLINE`. Each connection starts on `h1`; what it does
/// not take goes to hyper.
async fn front_thread(
    state: Arc<resolve::Resolver>,
    mut handed: tokio::sync::mpsc::UnboundedReceiver<conn::Handed>,
    shutdown: CancellationToken,
) {
    let timeouts = h1::Timeouts {
        header: state.cfg.http.header_read_timeout.0,
        send: state.cfg.http.send_timeout.0,
    };
    let node = HeaderValue::from_str(&state.node_name)
        .unwrap_or_else(|_| HeaderValue::from_static("ferry"));
    let front = Arc::new(Front { state, node });
    // A plain hyper service: the request's parts are taken, not copied (warp's filter chain
    // cloned the whole header map per request).
    let svc = {
        let front = front.clone();
        hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let front = front.clone();
            // Boxed: hyper moves the service's future into place on every request, and inline
            // this state machine is kilobytes of memcpy per request.
            Box::pin(async move {
                let (parts, _body) = req.into_parts();
                let resp = front
                    .answer_parts(&parts.method, parts.uri.path(), &parts.headers)
                    .await;
                Ok::<_, std::convert::Infallible>(resp)
            })
        })
    };
    // A client that never finishes its headers is cut off, and shutdown drains connections
    // with a deadline.
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(timeouts.header)
        .keep_alive(true);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    while let Some(handed) = handed.recv().await {
        let (stream, held) = match handed.into_tokio() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "could not register a connection");
                continue;
            }
        };
        let svc = svc.clone();
        let http = http.clone();
        // Held for the connection's life, on either side of the hand-over: the drain waits
        // for every watcher.
        let watcher = graceful.watcher();
        let stop = shutdown.clone();
        let front = front.clone();
        tokio::spawn(async move {
            let _held = held;
            // A silent client holds no buffers, and does not hold up shutdown.
            let spoke = tokio::select! {
                ok = first_byte(&stream, timeouts.header) => ok,
                _ = stop.cancelled() => false,
            };
            if !spoke {
                return;
            }
            let to_hyper = move |io: h1::Prefixed<tokio::net::TcpStream>| async move {
                let io = hyper_util::rt::TokioIo::new(conn::SendTimeout::new(io, timeouts.send));
                let conn = http.serve_connection(io, svc);
                // Boxed: the connection's state machine is several KiB.
                if let Err(e) = Box::pin(watcher.watch(conn)).await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            };
            Box::pin(h1::serve(&*front, stream, timeouts, &stop, to_hyper)).await;
        });
    }
    if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open after the drain deadline; closing them");
    }
}

/// Waits until the client sends its first byte, within `deadline`; false if it closed,
/// failed or stayed silent. hyper gives every connection its buffers as soon as it polls
/// it: waiting here first keeps a connection that sends nothing down to its socket and a
/// small task (about 1.3 KiB instead of 14). A peek, not `readable()`: a fresh socket can
/// report stale readiness, and the peek's EAGAIN clears it.
pub async fn first_byte(stream: &tokio::net::TcpStream, deadline: std::time::Duration) -> bool {
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout(deadline, stream.peek(&mut first)).await,
        Ok(Ok(n)) if n > 0
    )
}

/// Accept-queue length asked of the kernel (capped by `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;

/// How long shutdown waits for responses in flight.
const DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Raises the soft open-files limit to the hard limit: every connection and every file served
/// holds a descriptor, and the default soft limit (1024) is far below what a busy node needs.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::debug!("could not raise the open-files limit");
            }
        }
    }
}

/// Binds `http.listen` (port 0 picks a free port) and returns the listener and address.
pub async fn bind(cfg: &Config) -> anyhow::Result<(tokio::net::TcpListener, SocketAddr)> {
    let addr: SocketAddr = cfg.http.listen.parse()?;
    let l = listen(addr).map_err(|e| anyhow::anyhow!("http.listen {addr}: {e}"))?;
    let local = l.local_addr()?;
    Ok((l, local))
}

/// A listening socket with a deep accept queue: a burst of connections (a page with many
/// images, many clients at once) waits in the kernel instead of being dropped, up to
/// `net.core.somaxconn`.
pub fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(LISTEN_BACKLOG)
}

/// Builds the resolver from config and the opened catalog and store.
pub fn resolver(
    cfg: Arc<Config>,
    catalog: Catalog,
    store: Store,
    shared: Option<Arc<crate::shared::Shared>>,
) -> anyhow::Result<Arc<resolve::Resolver>> {
    Ok(Arc::new(resolve::Resolver::new(
        cfg, catalog, store, shared,
    )?))
}
