//! The serve decision (DESIGN.md "Serve order"): spool file; metadata (catalog, else S3
//! HEAD); deleted → 410; a hot-cache entry of this very version; then redirect (302 to the
//! public or presigned URL) or proxy (GET from S3, one fetch per key at a time), where a hot
//! key is fetched into the cache; S3 failing → the archive copy (local, or `fallback_url`).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::{Reply, Response};

use super::cache::HotCache;
use super::fetch::{Fetcher, Started};
use super::meta::{MetaCache, MetaError, Where};
use super::{local, ServeError};
use crate::catalog::Catalog;
use crate::config::{Config, ServeMode};
use crate::key::Key;
use crate::store::Store;

pub struct Resolver {
    pub cfg: Arc<Config>,
    pub node_name: String,
    pub catalog: Catalog,
    pub store: Store,
    pub meta: Arc<MetaCache>,
    pub cache: Arc<HotCache>,
    fetcher: Arc<Fetcher>,
    /// The spool root, opened once; every local lookup resolves beneath it.
    spool: Arc<File>,
    /// The archive root, for the fallback.
    archive: Arc<File>,
    fallback: Option<FallbackClient>,
    allow: Option<regex::Regex>,
    redirect_base: String,
    cache_control: String,
    /// Presigned URLs reused for half their TTL, so every client gets at least half.
    presigned: Mutex<HashMap<String, (String, Instant)>>,
}

/// Most presigned URLs remembered.
const MAX_PRESIGNED: usize = 100_000;

impl Resolver {
    pub fn new(cfg: Arc<Config>, catalog: Catalog, store: Store) -> anyhow::Result<Resolver> {
        std::fs::create_dir_all(&cfg.spool.dir)
            .map_err(|e| anyhow::anyhow!("spool.dir {}: {e}", cfg.spool.dir.display()))?;
        let open_dir = |what: &str, dir: &std::path::Path| -> anyhow::Result<File> {
            std::fs::create_dir_all(dir)
                .and_then(|_| {
                    std::fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
                        .open(dir)
                })
                .map_err(|e| anyhow::anyhow!("{what} {}: {e}", dir.display()))
        };
        let spool = open_dir("spool.dir", &cfg.spool.dir)?;
        let archive = open_dir("archive.dir", &cfg.archive.dir)?;
        let cache = Arc::new(
            HotCache::open(
                &cfg.cache.dir,
                cfg.cache.max_size.0,
                cfg.cache.ttl.0,
                cfg.cache.hot_hits,
                cfg.cache.hot_window.0,
            )
            .map_err(|e| anyhow::anyhow!("cache.dir {}: {e}", cfg.cache.dir.display()))?,
        );
        let tmp_dir = if cache.enabled() {
            cfg.cache.dir.clone()
        } else {
            std::env::temp_dir()
        };
        let fetcher = Arc::new(Fetcher::new(
            store.clone(),
            cfg.s3.prefix.clone(),
            cache.clone(),
            tmp_dir,
        ));
        let fallback = if cfg.http.fallback_url.is_empty() {
            None
        } else {
            Some(FallbackClient::new(&cfg.http.fallback_url))
        };
        let allow = if cfg.http.allow.is_empty() {
            None
        } else {
            Some(regex::Regex::new(&cfg.http.allow)?)
        };
        let redirect_base = if cfg.http.redirect_base.is_empty() {
            store.bucket_url()
        } else if cfg.http.redirect_base.ends_with('/') {
            cfg.http.redirect_base.clone()
        } else {
            format!("{}/", cfg.http.redirect_base)
        };
        Ok(Resolver {
            node_name: cfg.node_name(),
            meta: Arc::new(MetaCache::new(
                catalog.clone(),
                store.clone(),
                cfg.s3.prefix.clone(),
                cfg.http.metadata_ttl.0,
            )),
            cache,
            fetcher,
            archive: Arc::new(archive),
            fallback,
            cache_control: cfg.http.cache_control.clone(),
            cfg,
            catalog,
            store,
            spool: Arc::new(spool),
            allow,
            redirect_base,
            presigned: Mutex::new(HashMap::new()),
        })
    }

    pub async fn handle(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Response, ServeError> {
        let mount = self.cfg.http.mount.as_str();
        let Some(raw) = path.strip_prefix(mount) else {
            return match path {
                "/healthz" => Ok("ok\n".into_response()),
                // Boxed, like every rare path below: an inline S3 call would make every
                // request's future kilobytes larger (and hyper moves it into place).
                "/readyz" => Box::pin(self.readyz()).await,
                "/metrics" => Box::pin(self.metrics()).await,
                _ => Err(ServeError::NotFound),
            };
        };
        if method != Method::GET && method != Method::HEAD {
            return Err(ServeError::Method);
        }
        let key = Key::from_url_path(raw, &self.cfg.s3.prefix)?;
        if let Some(re) = &self.allow {
            if !re.is_match(key.as_str()) {
                return Err(ServeError::NotFound);
            }
        }

        // 1. The spool.
        let head = method == Method::HEAD;
        // Fast path: everything cached, nothing can block, no thread hop.
        let found = match local::try_open_cached(&self.spool, key.as_str(), !head) {
            Some(r) => r.map_err(|e| ServeError::Internal(format!("open {key}: {e}")))?,
            None => {
                let spool = self.spool.clone();
                let k = key.as_str().to_string();
                tokio::task::spawn_blocking(move || {
                    let mut f = local::open_beneath(&spool, &k)?;
                    if let (Some(lf), false) = (f.as_mut(), head) {
                        lf.preload()?;
                    }
                    Ok::<_, std::io::Error>(f)
                })
                .await
                .map_err(|e| ServeError::Internal(format!("open task: {e}")))?
                .map_err(|e| ServeError::Internal(format!("open {key}: {e}")))?
            }
        };
        if let Some(lf) = found {
            let ct = crate::sync::upload::content_type(key.as_str());
            return Ok(local::respond(lf, method, headers, &ct, &self.cache_control).await);
        }

        // 2. Metadata: this host's catalog, else S3.
        let meta = match self.meta.get(key.as_str()).await {
            Ok(m) => m,
            Err(e) => {
                return Err(match &*e {
                    MetaError::S3(se) => ServeError::NotReady(format!("S3: {}", se.message)),
                    MetaError::Catalog(ce) => ServeError::Internal(format!("catalog: {ce}")),
                })
            }
        };
        match meta.at {
            Where::Deleted => {
                self.cache.remove(key.as_str());
                return Err(ServeError::Gone);
            }
            Where::Unknown => return Err(ServeError::NotFound),
            // The catalog knows it but S3 does not hold it, and the spool has no copy (the
            // app removed it): the archive may still.
            Where::NotInS3 => return Box::pin(self.serve_archive(&key, method, headers)).await,
            Where::InS3 => {}
        }

        // 3. The hot cache, only for this exact version.
        let count = if self.cache.enabled() {
            self.cache.hit(key.as_str())
        } else {
            0
        };
        if let Some(sha) = meta.sha256.clone() {
            if self.cache.may_have(key.as_str(), &sha) {
                let head = method == Method::HEAD;
                // Fast path: a checked entry whose file opens from the dentry cache and reads
                // from the page cache, with no thread hop; else the checks on a blocking thread.
                let hit = match self.cache.try_hit_cached(key.as_str(), &sha, !head) {
                    Some(lf) => Some(lf),
                    None => {
                        let (c, k) = (self.cache.clone(), key.as_str().to_string());
                        tokio::task::spawn_blocking(move || {
                            let e = c.lookup(&k, &sha)?;
                            let mut lf = open_path(&e.data).ok().flatten()?;
                            if !head {
                                lf.preload().ok()?;
                            }
                            Some(lf)
                        })
                        .await
                        .ok()
                        .flatten()
                    }
                };
                if let Some(lf) = hit {
                    crate::telemetry::metrics().cache_hits.inc();
                    let ct = crate::sync::upload::content_type(key.as_str());
                    let r = local::respond(lf, method, headers, &ct, &self.cache_control).await;
                    return Ok(with_source(r, "cache"));
                }
            }
        }
        let hot = meta.sha256.is_some() && self.cache.wants(key.as_str(), count);
        if self.cache.enabled() {
            crate::telemetry::metrics().cache_misses.inc();
        }

        // 4. Redirect, or fetch from S3 (proxy mode, or a hot key filling the cache).
        if !hot && self.cfg.http.mode == ServeMode::Redirect {
            return self.redirect(&key).await;
        }
        if method == Method::HEAD {
            return Ok(self.s3_head_response(&key, meta.size, meta.sha256.as_deref()));
        }
        if !hot && headers.contains_key(http::header::RANGE) {
            return Box::pin(self.proxy_range(&key, method, headers)).await;
        }
        let reader = self
            .fetcher
            .fetch(key.as_str(), meta.sha256.clone(), hot)
            .map_err(|e| ServeError::Internal(format!("fill temp file: {e}")))?;
        match reader.started().await {
            Started::Body(len, reader) => {
                let mut r = warp::reply::stream(reader.into_stream()).into_response();
                let h = r.headers_mut();
                h.insert("x-ferry-source", HeaderValue::from_static("s3"));
                let ct = crate::sync::upload::content_type(key.as_str());
                if let Ok(v) = HeaderValue::from_str(&ct) {
                    h.insert(http::header::CONTENT_TYPE, v);
                }
                if let Some(n) = len {
                    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
                }
                if let Some(sha) = &meta.sha256 {
                    if let Ok(v) = HeaderValue::from_str(&format!("\"{sha}\"")) {
                        h.insert(http::header::ETAG, v);
                    }
                }
                Ok(r)
            }
            Started::Failed { error, timed_out } => {
                tracing::warn!(key = %key, error = %error, "S3 fetch failed; trying the archive");
                match Box::pin(self.serve_archive(&key, method, headers)).await {
                    Ok(r) => Ok(r),
                    Err(_) if timed_out => Err(ServeError::Timeout),
                    Err(_) => Err(ServeError::BadGateway),
                }
            }
        }
    }

    fn s3_head_response(&self, key: &Key, size: u64, sha: Option<&str>) -> Response {
        let mut r = Response::new(Default::default());
        let h = r.headers_mut();
        h.insert("x-ferry-source", HeaderValue::from_static("s3"));
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(size));
        let ct = crate::sync::upload::content_type(key.as_str());
        if let Ok(v) = HeaderValue::from_str(&ct) {
            h.insert(http::header::CONTENT_TYPE, v);
        }
        if let Some(sha) = sha {
            if let Ok(v) = HeaderValue::from_str(&format!("\"{sha}\"")) {
                h.insert(http::header::ETAG, v);
            }
        }
        r
    }

    /// Proxy mode with a Range: passed through to S3 (no coalescing, nothing cached).
    async fn proxy_range(
        &self,
        key: &Key,
        method: &Method,
        headers: &HeaderMap,
    ) -> Result<Response, ServeError> {
        let range = headers
            .get(http::header::RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let obj = key.object_key(&self.cfg.s3.prefix);
        let out = match self.store.get(&obj, range).await {
            Ok(o) => o,
            Err(e) if e.status == Some(416) => {
                let mut r = Response::new(Default::default());
                *r.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                return Ok(r);
            }
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "S3 range GET failed; trying the archive");
                return self
                    .serve_archive(key, method, headers)
                    .await
                    .map_err(|_| ServeError::BadGateway);
            }
        };
        let content_range = out.content_range().map(str::to_string);
        let len = out.content_length();
        let stream = tokio_util::io::ReaderStream::new(out.body.into_async_read());
        let mut r = warp::reply::stream(stream).into_response();
        if content_range.is_some() {
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        }
        let h = r.headers_mut();
        h.insert("x-ferry-source", HeaderValue::from_static("s3"));
        h.insert(
            http::header::ACCEPT_RANGES,
            HeaderValue::from_static("bytes"),
        );
        if let Some(cr) = content_range.and_then(|c| HeaderValue::from_str(&c).ok()) {
            h.insert(http::header::CONTENT_RANGE, cr);
        }
        if let Some(n) = len {
            h.insert(
                http::header::CONTENT_LENGTH,
                HeaderValue::from(n.max(0) as u64),
            );
        }
        let ct = crate::sync::upload::content_type(key.as_str());
        if let Ok(v) = HeaderValue::from_str(&ct) {
            h.insert(http::header::CONTENT_TYPE, v);
        }
        Ok(r)
    }

    /// The archive copy: the local archive dir, or the archive file server.
    async fn serve_archive(
        &self,
        key: &Key,
        method: &Method,
        headers: &HeaderMap,
    ) -> Result<Response, ServeError> {
        if let Some(fb) = &self.fallback {
            return fb.get(key, method, headers).await;
        }
        let dir = self.archive.clone();
        let k = key.as_str().to_string();
        let found = tokio::task::spawn_blocking(move || local::open_beneath(&dir, &k))
            .await
            .map_err(|e| ServeError::Internal(format!("open task: {e}")))?
            .map_err(|e| ServeError::Internal(format!("open archive {key}: {e}")))?;
        match found {
            Some(lf) => {
                let ct = crate::sync::upload::content_type(key.as_str());
                let r = local::respond(lf, method, headers, &ct, &self.cache_control).await;
                Ok(with_source(r, "archive"))
            }
            None => Err(ServeError::NotFound),
        }
    }

    /// The Location for a key in S3: built only from config and the validated key.
    pub fn public_location(&self, key: &Key) -> String {
        format!(
            "{}{}",
            self.redirect_base,
            key.encoded_object_path(&self.cfg.s3.prefix)
        )
    }

    async fn presigned_location(&self, key: &Key) -> Result<String, ServeError> {
        let ttl = self.cfg.http.presign_ttl.0;
        if let Ok(m) = self.presigned.lock() {
            if let Some((url, at)) = m.get(key.as_str()) {
                if at.elapsed() < ttl / 2 {
                    return Ok(url.clone());
                }
            }
        }
        let url = self
            .store
            .presign_get(&key.object_key(&self.cfg.s3.prefix), ttl)
            .await
            .map_err(|e| ServeError::Internal(format!("presign: {e}")))?;
        if let Ok(mut m) = self.presigned.lock() {
            if m.len() >= MAX_PRESIGNED {
                m.retain(|_, (_, at)| at.elapsed() < ttl / 2);
                if m.len() >= MAX_PRESIGNED {
                    m.clear();
                }
            }
            m.insert(key.as_str().to_string(), (url.clone(), Instant::now()));
        }
        Ok(url)
    }

    async fn redirect(&self, key: &Key) -> Result<Response, ServeError> {
        let location = if self.cfg.http.presign {
            Box::pin(self.presigned_location(key)).await?
        } else {
            self.public_location(key)
        };
        // SECURITY: the value is built from config and a validated key; from_str refuses
        // CR/LF anyway, and a refusal is an internal error, never a header split.
        let loc = HeaderValue::from_str(&location).map_err(|_| {
            ServeError::Internal(format!("location for {key} is not a header value"))
        })?;
        let mut r = Response::new(Default::default());
        *r.status_mut() = StatusCode::FOUND;
        let h = r.headers_mut();
        h.insert(http::header::LOCATION, loc);
        h.insert("x-ferry-source", HeaderValue::from_static("redirect"));
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        if self.cfg.http.presign {
            h.insert(
                http::header::CACHE_CONTROL,
                HeaderValue::from_static("private, no-store"),
            );
        }
        Ok(r)
    }

    /// Prometheus text; file counts by state are read from the catalog at scrape time.
    async fn metrics(&self) -> Result<Response, ServeError> {
        let m = crate::telemetry::metrics();
        if let Ok(st) = self.catalog.read(crate::catalog::ops::status).await {
            for (state, n) in st.counts {
                m.files
                    .get_or_create(&crate::telemetry::StateLabel { state })
                    .set(n as i64);
            }
        }
        let mut r = m.encode().into_response();
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        Ok(r)
    }

    async fn readyz(&self) -> Result<Response, ServeError> {
        self.catalog
            .read(|c| Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?))
            .await
            .map_err(|e| ServeError::NotReady(format!("catalog: {e}")))?;
        match tokio::time::timeout(Duration::from_secs(3), self.store.head_bucket()).await {
            Ok(Ok(())) => Ok("ready\n".into_response()),
            Ok(Err(e)) => Err(ServeError::NotReady(format!("S3: {}", e.message))),
            Err(_) => Err(ServeError::NotReady("S3: timed out".into())),
        }
    }
}

/// Replaces X-Ferry-Source on a success response (local::respond marks its answers "local").
fn with_source(mut r: Response, source: &'static str) -> Response {
    if r.headers().contains_key("x-ferry-source") {
        r.headers_mut()
            .insert("x-ferry-source", HeaderValue::from_static(source));
    }
    r
}

/// Opens a cache file we wrote ourselves (no user-controlled path).
fn open_path(p: &std::path::Path) -> std::io::Result<Option<local::LocalFile>> {
    use std::os::unix::fs::MetadataExt;
    let file = File::open(p)?;
    let md = file.metadata()?;
    Ok(Some(local::LocalFile {
        len: md.len(),
        mtime: md.modified()?,
        inode: md.ino(),
        file,
        preloaded: None,
    }))
}

/// A client for `http.fallback_url` (the archive file server).
struct FallbackClient {
    base: String,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<bytes::Bytes>,
    >,
}

impl FallbackClient {
    fn new(base: &str) -> FallbackClient {
        let base = if base.ends_with('/') {
            base.to_string()
        } else {
            format!("{base}/")
        };
        FallbackClient {
            base,
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
        }
    }

    async fn get(
        &self,
        key: &Key,
        method: &Method,
        headers: &HeaderMap,
    ) -> Result<Response, ServeError> {
        // SECURITY: built from config and the validated, percent-encoded key only.
        let url = format!("{}{}", self.base, key.encoded_object_path(""));
        let mut req = http::Request::builder().method(method.clone()).uri(&url);
        for h in [
            http::header::RANGE,
            http::header::IF_NONE_MATCH,
            http::header::IF_MODIFIED_SINCE,
        ] {
            if let Some(v) = headers.get(&h) {
                req = req.header(h, v.clone());
            }
        }
        let req = req
            .body(http_body_util::Empty::new())
            .map_err(|e| ServeError::Internal(format!("fallback request: {e}")))?;
        let resp =
            match tokio::time::timeout(Duration::from_secs(10), self.client.request(req)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::warn!(url, error = %e, "archive file server failed");
                    return Err(ServeError::BadGateway);
                }
                Err(_) => return Err(ServeError::Timeout),
            };
        let status = resp.status();
        if !(status.is_success() || status == StatusCode::NOT_MODIFIED) {
            return Err(if status == StatusCode::NOT_FOUND {
                ServeError::NotFound
            } else {
                ServeError::BadGateway
            });
        }
        let (parts, body) = resp.into_parts();
        let stream = http_body_util::BodyStream::new(body);
        let stream = futures_util::StreamExt::filter_map(stream, |f| async move {
            match f {
                Ok(frame) => frame.into_data().ok().map(Ok::<_, hyper::Error>),
                Err(e) => Some(Err(e)),
            }
        });
        let mut r = warp::reply::stream(stream).into_response();
        *r.status_mut() = parts.status;
        for h in [
            http::header::CONTENT_TYPE,
            http::header::CONTENT_LENGTH,
            http::header::CONTENT_RANGE,
            http::header::ETAG,
            http::header::LAST_MODIFIED,
            http::header::ACCEPT_RANGES,
        ] {
            if let Some(v) = parts.headers.get(&h) {
                r.headers_mut().insert(h, v.clone());
            }
        }
        r.headers_mut()
            .insert("x-ferry-source", HeaderValue::from_static("archive"));
        Ok(r)
    }
}
