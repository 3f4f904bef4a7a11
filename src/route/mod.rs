//! The hash router (`ferry route`): ranks backends per request by rendezvous hashing of the
//! Host (or first path segment), health-checks them, proxies, and fails over.
//!
//! Why rendezvous hashing: each key ranks every backend by `weight(backend, key)`, so a dead
//! backend's keys go to their second choice and nobody else's move; when it heals, the same
//! keys come back. That keeps each site's hot objects in one node's cache (DESIGN.md
//! "Hotness"). The weights come from SHA-256, never from a seeded hasher, so every router
//! process, on every machine and after every restart, ranks alike.
//!
//! Health: every backend starts up. A `/healthz` probe every `router.health_interval` marks
//! it down after 2 failures in a row and up after 2 successes in a row; 3 connect errors
//! within 10 s while proxying mark it down at once. A GET/HEAD without a body is retried
//! once on the next-ranked healthy backend, so clients do not see the failover; with none
//! believed healthy the ranked list is tried anyway.
//!
//! Bounded loads (`router.balance_factor`): a backend far above the average number of
//! requests in flight is passed over for the request's next-ranked one, so one very hot
//! site cannot pile requests onto its node (see `load`).
//!
//! Here: the `Router` (config, the client connections' bounds, the accept loop) and its own
//! endpoints. `ring` ranks, `health` probes and keeps each backend's counters, `load`
//! bounds each backend's requests in flight, `proxy` forwards one request.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, Uri};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;

mod health;
pub mod load;
mod proxy;
mod ring;
mod upstream;

use health::Backend;
pub use health::Health;
pub use proxy::{add_forwarded, strip_hop_by_hop};
use proxy::{empty, text};
pub use ring::{host_key, path_key, rank, rank_indices, weight, HashBy};

/// The body type on both sides of the proxy: a client's or backend's stream, or our own text.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;
/// A body's error: hyper's, or the hand-written backend client's (`upstream`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What one front thread sends requests to the backends with: its own idle connections for
/// bodiless GET and HEAD (`upstream`), and hyper-util's pooled client for the rest.
pub(super) struct Lanes {
    client: Client<HttpConnector, Body>,
    pool: Arc<upstream::Pool>,
}

/// The router's own endpoints live under this prefix; everything else is proxied, including
/// `/healthz`, which belongs to the nodes.
const OWN_PREFIX: &str = "/-/router/";
/// Connections get this long to finish after shutdown starts.
const DRAIN: Duration = Duration::from_secs(10);
/// A backend that accepts no connection by then is treated as unreachable (failover).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A backend that sends no response headers by then gets the client a 504. Generous: a node
/// may be fetching from S3 before it answers.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Consecutive probe results needed to change a backend's state.
const FLIP_AFTER: u32 = 2;
/// Connect failures while proxying that mark a backend down at once (before the probes
/// agree), when they all fall within CONNECT_FAIL_WINDOW. One is not enough: a single
/// connect timeout (a full accept queue, a lost SYN) would move a node's sites to the next
/// node, whose extra load could then make it time out in turn.
pub const CONNECT_FAILS_TO_DOWN: u32 = 3;
const CONNECT_FAIL_WINDOW: Duration = Duration::from_secs(10);
/// The longest a pooled connection to a node may sit idle.
const POOL_IDLE_MAX: Duration = Duration::from_secs(10);
/// Below this, probes would be a load of their own (and a zero interval cannot tick).
const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("router.backends: must list at least one backend")]
    NoBackends,
    #[error("router.backends: {backend:?} {reason}")]
    Backend {
        backend: String,
        reason: &'static str,
    },
    #[error("router.hash: {0:?} must be \"host\" or \"path\"")]
    Hash(String),
    #[error("router.health_interval: {0:?} is too short (at least 10ms)")]
    HealthInterval(Duration),
    #[error("router.listen: {addr:?} is not an address like 127.0.0.1:8000")]
    ListenAddr { addr: String },
    #[error("router.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The router's state: backends with their health, and the one pooled client.
pub struct Router {
    backends: Vec<Backend>,
    /// The backend names in config order, as `rank` takes them.
    names: Vec<String>,
    hash: HashBy,
    mount: String,
    interval: Duration,
    /// The health probes' client; each front thread builds its own (`Router::client`).
    client: Client<HttpConnector, Body>,
    /// `pool_idle_timeout` of every client.
    pool_idle: Duration,
    /// `http.workers`: front threads; 0 = half the cores, at least one.
    workers: usize,
    /// `http.header_read_timeout`: a client gets this long to send its first request head.
    header_timeout: Duration,
    /// `http.send_timeout`: a response write may stall this long.
    send_timeout: Duration,
    /// `http.upstream_stall`: a backend that sends nothing of a response body for this long
    /// has the client's response cut off (`load::Counted`), on either lane.
    body_stall: Duration,
    /// `router.max_connections`.
    max_connections: usize,
    /// `router.balance_factor`; 0 = no load bound.
    balance_factor: f64,
    /// In flight and spills per backend, served beside the process metrics.
    load_metrics: load::LoadMetrics,
}

impl Router {
    /// Validates `[router]` and builds the client; does no I/O.
    pub fn new(cfg: &Config) -> Result<Router, RouteError> {
        let r = &cfg.router;
        if r.backends.is_empty() {
            return Err(RouteError::NoBackends);
        }
        let load_metrics = load::LoadMetrics::new();
        let backends = r
            .backends
            .iter()
            .map(|b| {
                let mut b = Backend::parse(b)?;
                (b.in_flight, b.spills) = load_metrics.for_backend(&b.name);
                Ok(b)
            })
            .collect::<Result<Vec<_>, RouteError>>()?;
        for (i, b) in backends.iter().enumerate() {
            if backends[..i].iter().any(|o| o.name == b.name) {
                return Err(RouteError::Backend {
                    backend: b.name.clone(),
                    reason: "is listed twice",
                });
            }
        }
        let hash = HashBy::parse(&r.hash)?;
        if r.health_interval.0 < MIN_HEALTH_INTERVAL {
            return Err(RouteError::HealthInterval(r.health_interval.0));
        }
        // Well below the nodes' idle close (http.header_read_timeout, when they share the
        // setting): a pooled connection the node is about to close is dropped here first,
        // instead of failing the request that reuses it.
        let pool_idle = (cfg.http.header_read_timeout.0 / 3).min(POOL_IDLE_MAX);
        let client = build_client(pool_idle);
        Ok(Router {
            names: backends.iter().map(|b| b.name.clone()).collect(),
            backends,
            hash,
            mount: cfg.http.mount.clone(),
            interval: r.health_interval.0,
            client,
            pool_idle,
            workers: cfg.http.workers,
            header_timeout: cfg.http.header_read_timeout.0,
            send_timeout: cfg.http.send_timeout.0,
            body_stall: cfg.http.upstream_stall.0,
            max_connections: r.max_connections,
            balance_factor: r.balance_factor,
            load_metrics,
        })
    }

    /// A pooled client of its own for the calling thread: its connection tasks run on the
    /// thread that made it.
    fn client(&self) -> Client<HttpConnector, Body> {
        build_client(self.pool_idle)
    }

    /// Each backend with its requests in flight, in config order.
    pub fn backend_loads(&self) -> Vec<(String, usize)> {
        self.backends
            .iter()
            .map(|b| (b.name.clone(), b.load()))
            .collect()
    }

    /// Each backend (`http://host:port`) and whether it takes requests, in config order.
    pub fn backend_health(&self) -> Vec<(String, bool)> {
        self.backends
            .iter()
            .map(|b| (b.name.clone(), b.is_healthy()))
            .collect()
    }

    /// Each backend with its probe counters, in config order (for metrics).
    pub fn backend_states(&self) -> Vec<(String, Health)> {
        self.backends
            .iter()
            .map(|b| (b.name.clone(), b.health()))
            .collect()
    }

    /// The key a request is ranked by.
    pub fn key_for(&self, headers: &HeaderMap, uri: &Uri) -> String {
        match self.hash {
            HashBy::Host => host_key(headers, uri),
            HashBy::Path => path_key(&self.mount, uri.path()).to_string(),
        }
    }

    /// Answers one client request: the router's own endpoints, else the proxy.
    async fn handle(&self, req: Request<Incoming>, peer: IpAddr, lanes: &Lanes) -> Response<Body> {
        // The router's own metrics answer /metrics; nodes are scraped directly.
        if req.uri().path().starts_with(OWN_PREFIX) || req.uri().path() == "/metrics" {
            return self.own(&req);
        }
        self.proxy(req, peer, lanes).await
    }

    fn own(&self, req: &Request<Incoming>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/-/router/healthz") => {
                let mut r = text(StatusCode::OK, "ok\n");
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                r
            }
            (&Method::GET | &Method::HEAD, "/metrics" | "/-/router/metrics") => {
                let m = crate::telemetry::metrics();
                for (backend, up) in self.backend_health() {
                    m.backend_up
                        .get_or_create(&crate::telemetry::BackendLabel { backend })
                        .set(i64::from(up));
                }
                // One exposition: the process's registry, then the router's own (in flight,
                // spills), then the single EOF marker OpenMetrics allows.
                let mut body = m.encode();
                if let Some(n) = body.rfind("# EOF\n") {
                    body.truncate(n);
                }
                let _ = prometheus_client::encoding::text::encode_registry(
                    &mut body,
                    &self.load_metrics.registry,
                );
                let _ = prometheus_client::encoding::text::encode_eof(&mut body);
                let mut r = text(StatusCode::OK, body);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// Serves `listener` on `http.workers` threads until `shutdown` (see
    /// `conn::thread_per_core`), then lets open connections finish for up to 10 s.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let cap = crate::serve::conn::Cap::new(self.max_connections);
        let workers = self.workers;
        let stop = shutdown.clone();
        crate::serve::conn::thread_per_core(
            "ferry-route",
            listener,
            workers,
            cap,
            shutdown,
            move |rx| self.clone().front_thread(rx, stop.clone()),
        )
        .await
    }

    /// One front thread: its own pool of backend connections, so a request and the
    /// backend connection it rides stay on one thread.
    async fn front_thread(
        self: Arc<Self>,
        mut handed: tokio::sync::mpsc::UnboundedReceiver<crate::serve::conn::Handed>,
        shutdown: CancellationToken,
    ) {
        // HTTP/1 only: hyper-util's auto builder reads an HTTP/2 preface with no deadline
        // (its header timeout covers HTTP/1 only), so one byte of "PRI * HTTP/2.0" held a
        // connection forever. Here every connection is under one deadline until its first
        // complete request head.
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            .keep_alive(true);
        let builder = Arc::new(builder);
        let pool = upstream::Pool::new(self.backends.len(), self.pool_idle);
        tokio::spawn(upstream::Pool::sweep(Arc::downgrade(&pool)));
        let lanes = Arc::new(Lanes {
            client: self.client(),
            pool,
        });
        let header_timeout = self.header_timeout;
        let send_timeout = self.send_timeout;
        let tracker = TaskTracker::new();
        while let Some(handed) = handed.recv().await {
            let peer = handed.peer;
            let (stream, held) = match handed.into_tokio() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "could not register a connection");
                    continue;
                }
            };
            let router = self.clone();
            let lanes = lanes.clone();
            let builder = builder.clone();
            let stop = shutdown.clone();
            tracker.spawn(async move {
                let _held = held;
                // A silent client holds no hyper buffers, and does not hold up shutdown.
                let spoke = tokio::select! {
                    ok = crate::serve::first_byte(&stream, header_timeout) => ok,
                    _ = stop.cancelled() => false,
                };
                if !spoke {
                    return;
                }
                let ip = peer.ip().to_canonical();
                let svc = hyper::service::service_fn(move |req| {
                    let router = router.clone();
                    let lanes = lanes.clone();
                    // Boxed: hyper moves the service's future into place, and inline it is
                    // kilobytes.
                    Box::pin(
                        async move { Ok::<_, Infallible>(router.handle(req, ip, &lanes).await) },
                    )
                });
                let io = crate::serve::conn::SendTimeout::new(stream, send_timeout);
                let conn = builder.serve_connection(TokioIo::new(io), svc);
                tokio::pin!(conn);
                let res = tokio::select! {
                    r = conn.as_mut() => r,
                    _ = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = res {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                }
            });
        }
        tracker.close();
        if tokio::time::timeout(DRAIN, tracker.wait()).await.is_err() {
            tracing::warn!(
                open = tracker.len(),
                "connections still open after {DRAIN:?}; closing them"
            );
        }
    }
}

/// A pooled HTTP/1 client for the backends.
fn build_client(pool_idle: Duration) -> Client<HttpConnector, Body> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(pool_idle)
        .build(connector)
}

/// Runs the router on `router.listen` until `shutdown`.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let router = Arc::new(Router::new(&cfg)?);
    let addr: SocketAddr = cfg
        .router
        .listen
        .parse()
        .map_err(|_| RouteError::ListenAddr {
            addr: cfg.router.listen.clone(),
        })?;
    let listener =
        crate::serve::listen(addr).map_err(|source| RouteError::Bind { addr, source })?;
    let local = listener.local_addr()?;
    tracing::info!(
        %local,
        backends = ?router.names,
        hash = %cfg.router.hash,
        interval = ?router.interval,
        "router listening"
    );
    // Tests and scripts read the bound address (port 0) from this line.
    println!("ferry: router listening on {local}");
    // systemd/ferry-router.service is Type=notify with a watchdog.
    crate::telemetry::notify_ready(shutdown.clone());
    let health = tokio::spawn(router.clone().check_health(shutdown.clone()));
    let served = router.serve(listener, shutdown.clone()).await;
    crate::telemetry::notify_stopping();
    shutdown.cancel();
    let _ = health.await;
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn weight_is_fixed_forever() {
        // Pinned: a change here would move every site to another node on upgrade.
        assert_eq!(
            weight("http://10.0.0.1:8080", "example.com"),
            u64::from_be_bytes({
                let d = Sha256::digest(b"http://10.0.0.1:8080\0example.com");
                let mut b = [0u8; 8];
                b.copy_from_slice(&d[..8]);
                b
            })
        );
        assert_ne!(weight("ab", "c"), weight("a", "bc"));
    }

    #[test]
    fn rank_spreads_keys_over_all_backends() {
        let b = names(&["http://a:1", "http://b:1", "http://c:1"]);
        let mut count = [0usize; 3];
        for i in 0..3000 {
            count[rank_indices(&b, &format!("site{i}.example"))[0]] += 1;
        }
        for c in count {
            assert!((800..1200).contains(&c), "{count:?}");
        }
    }

    #[test]
    fn rank_of_nothing_is_empty() {
        assert!(rank(&[], "k").is_empty());
        let one = names(&["http://a:1"]);
        assert_eq!(rank(&one, "k"), vec!["http://a:1"]);
    }

    #[test]
    fn host_key_is_lowercase_without_port() {
        let uri: Uri = "/static/x.jpg".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            header::HOST,
            HeaderValue::from_static("Blog.Example.COM:8080"),
        );
        assert_eq!(host_key(&h, &uri), "blog.example.com");
        h.insert(header::HOST, HeaderValue::from_static("blog.example.com."));
        assert_eq!(host_key(&h, &uri), "blog.example.com");
        h.insert(header::HOST, HeaderValue::from_static("[::1]:8000"));
        assert_eq!(host_key(&h, &uri), "[::1]");
        h.insert(header::HOST, HeaderValue::from_static("[::1]"));
        assert_eq!(host_key(&h, &uri), "[::1]");
        assert_eq!(host_key(&HeaderMap::new(), &uri), "");
        let abs: Uri = "http://Other.example:81/x".parse().unwrap();
        assert_eq!(host_key(&HeaderMap::new(), &abs), "other.example");
    }

    #[test]
    fn an_absolute_target_names_the_host_the_node_sees() {
        let mut h = HeaderMap::new();
        let abs: Uri = "http://user:pw@Site7.example:81/x".parse().unwrap();
        proxy::host_from_target(&mut h, &abs);
        assert_eq!(
            h.get(header::HOST).map(|v| v.as_bytes()),
            Some(&b"Site7.example:81"[..])
        );
        h.insert(header::HOST, HeaderValue::from_static("other.example"));
        let abs: Uri = "http://site8.example/x".parse().unwrap();
        proxy::host_from_target(&mut h, &abs);
        assert_eq!(
            h.get(header::HOST).map(|v| v.as_bytes()),
            Some(&b"site8.example"[..]),
            "the target wins over a Host"
        );
        // Origin form: the Host stays.
        let origin: Uri = "/x".parse().unwrap();
        proxy::host_from_target(&mut h, &origin);
        assert_eq!(
            h.get(header::HOST).map(|v| v.as_bytes()),
            Some(&b"site8.example"[..])
        );
    }

    #[test]
    fn path_key_is_the_first_segment_after_the_mount() {
        assert_eq!(path_key("/static/", "/static/blog1/2026/a.jpg"), "blog1");
        assert_eq!(path_key("/static/", "/static/a.jpg"), "a.jpg");
        assert_eq!(path_key("/static/", "/static/"), "");
        assert_eq!(path_key("/static/", "/healthz"), "");
        assert_eq!(path_key("/", "/blog2/x"), "blog2");
    }

    #[test]
    fn health_flips_after_two_in_a_row() {
        let mut h = Health::default();
        assert!(h.healthy);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(false), Some(false));
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(false), None);
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(true));
        assert!(h.mark_down());
        assert!(!h.mark_down());
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(true));
    }

    #[test]
    fn a_backend_goes_down_on_connect_failures_only_when_they_come_close_together() {
        let t0 = std::time::Instant::now();
        let mut h = Health::default();
        // Failures spread wider than the window never add up.
        for i in 0..10u32 {
            assert!(!h.connect_failed(t0 + (CONNECT_FAIL_WINDOW + Duration::from_secs(1)) * i));
            assert!(h.healthy);
        }
        let t1 = t0 + CONNECT_FAIL_WINDOW * 20;
        for i in 1..CONNECT_FAILS_TO_DOWN {
            assert!(!h.connect_failed(t1 + Duration::from_millis(u64::from(i))));
            assert!(h.healthy, "{i} failure(s) are not enough");
        }
        assert!(h.connect_failed(t1 + Duration::from_secs(1)));
        assert!(!h.healthy);
        // Back up through the probes as before.
        assert_eq!(h.record(true), None);
        assert_eq!(h.record(true), Some(true));
    }

    #[test]
    fn backend_names_are_case_insensitive() {
        let a = Backend::parse("http://NODE-A.example:8080").unwrap();
        assert_eq!(a.name, "http://node-a.example:8080");
        let mut cfg = Config::default();
        cfg.router.backends = names(&["http://A:1", "http://a:1"]);
        assert!(Router::new(&cfg).is_err(), "one backend named twice");
    }

    #[test]
    fn backends_are_validated_and_named() {
        let ok = Backend::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!(ok.name, "http://127.0.0.1:8080");
        assert_eq!(ok.healthz.to_string(), "http://127.0.0.1:8080/healthz");
        for bad in [
            "127.0.0.1:8080",
            "https://a:1",
            "http://a",
            "http://a:1/x",
            "http://u:p@a:1",
            "",
        ] {
            let e = Backend::parse(bad).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains("router.backends")),
                "{bad:?}: {e:?}"
            );
        }
        let mut cfg = Config::default();
        cfg.router.backends = names(&["http://a:1", "http://a:1/"]);
        let e = Router::new(&cfg)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("twice"), "{e}");
        cfg.router.backends.clear();
        assert!(matches!(Router::new(&cfg), Err(RouteError::NoBackends)));
    }

    #[tokio::test]
    async fn router_starts_with_every_backend_up() {
        let mut cfg = Config::default();
        cfg.router.backends = names(&["http://127.0.0.1:1", "http://127.0.0.1:2"]);
        let r = Router::new(&cfg).unwrap();
        assert_eq!(
            r.backend_health(),
            vec![
                ("http://127.0.0.1:1".to_string(), true),
                ("http://127.0.0.1:2".to_string(), true)
            ]
        );
    }

    #[test]
    fn forwarding_headers() {
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, "10.0.0.9".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("2.2.2.2, 3.3.3.3"),
        );
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        add_forwarded(&mut h, "::1".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 3.3.3.3, ::1");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret, host"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::RANGE, HeaderValue::from_static("bytes=0-1"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["host", "range"]);
    }

    #[test]
    fn example_router_config_parses() {
        let text = include_str!("../../config/router.toml");
        let c = Config::from_toml_with_env(text, "config/router.toml", Vec::new()).unwrap();
        let r = Router::new(&c).unwrap();
        assert_eq!(r.backend_health().len(), c.router.backends.len());
    }

    fn backend_set() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::btree_set("[a-z0-9.]{1,12}:[0-9]{1,5}", 1..9)
            .prop_map(|s| s.into_iter().map(|h| format!("http://{h}")).collect())
    }

    proptest! {
        #[test]
        fn ranking_is_stable_and_a_permutation(b in backend_set(), key in ".{0,40}") {
            let r1 = rank(&b, &key);
            prop_assert_eq!(&r1, &rank(&b, &key));
            let mut sorted = r1.clone();
            sorted.sort_unstable();
            let mut all: Vec<&str> = b.iter().map(String::as_str).collect();
            all.sort_unstable();
            prop_assert_eq!(sorted, all);
            // The config order does not matter.
            let mut rev = b.clone();
            rev.reverse();
            prop_assert_eq!(r1, rank(&rev, &key));
        }

        #[test]
        fn removing_a_backend_moves_only_its_keys(
            b in backend_set(),
            keys in proptest::collection::vec("[a-z0-9.-]{0,30}", 1..20),
            pick in any::<proptest::sample::Index>(),
        ) {
            let gone = pick.index(b.len());
            let rest: Vec<String> = b.iter().enumerate()
                .filter(|&(i, _)| i != gone).map(|(_, s)| s.clone()).collect();
            for key in &keys {
                let before = rank(&b, key);
                let after = rank(&rest, key);
                // The others keep their relative order...
                let expected: Vec<&str> = before.iter().copied()
                    .filter(|s| *s != b[gone]).collect();
                prop_assert_eq!(&after, &expected);
                // ...so a key moves only when its top choice was the removed backend.
                if before[0] != b[gone] {
                    prop_assert_eq!(after.first(), Some(&before[0]));
                }
            }
        }
    }
}
