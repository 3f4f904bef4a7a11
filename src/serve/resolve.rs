//! The serve decision (DESIGN.md "Serve order"): spool file, else what the catalog says —
//! deleted → 410, in S3 → 302 to the public or presigned URL, unknown → 404.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::{Reply, Response};

use super::meta::MetaCache;
use super::{local, ServeError};
use crate::catalog::{Catalog, State};
use crate::config::Config;
use crate::key::Key;
use crate::store::Store;

pub struct Resolver {
    pub cfg: Arc<Config>,
    pub node_name: String,
    pub catalog: Catalog,
    pub store: Store,
    pub meta: Arc<MetaCache>,
    /// The spool root, opened once; every local lookup resolves beneath it.
    spool: Arc<File>,
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
        let spool = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&cfg.spool.dir)
            .map_err(|e| anyhow::anyhow!("spool.dir {}: {e}", cfg.spool.dir.display()))?;
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
            meta: Arc::new(MetaCache::new(catalog.clone(), cfg.http.metadata_ttl.0)),
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
                "/readyz" => self.readyz().await,
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
        let spool = self.spool.clone();
        let k = key.as_str().to_string();
        let found = tokio::task::spawn_blocking(move || local::open_beneath(&spool, &k))
            .await
            .map_err(|e| ServeError::Internal(format!("open task: {e}")))?
            .map_err(|e| ServeError::Internal(format!("open {key}: {e}")))?;
        if let Some(lf) = found {
            let ct = crate::sync::upload::content_type(key.as_str());
            return Ok(local::respond(lf, method, headers, &ct, &self.cache_control).await);
        }

        // 2. The catalog (through the metadata cache).
        let meta = self
            .meta
            .get(key.as_str())
            .await
            .map_err(|e| ServeError::Internal(format!("catalog: {e}")))?;
        match meta.map(|m| m.state) {
            Some(State::Deleted) => Err(ServeError::Gone),
            Some(s) if s.in_s3() => self.redirect(&key).await,
            _ => Err(ServeError::NotFound),
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
            self.presigned_location(key).await?
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
