//! The metadata cache: key → {state, size, sha256}, for `http.metadata_ttl` (unknown keys a
//! few seconds only). Loaded from the local catalog, else from an S3 HEAD, so serving nodes
//! need no shared database. Concurrent lookups of one key share one load. Dropped whole
//! within 200 ms of any catalog commit on this host (SQLite's `data_version`).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use tokio_util::sync::CancellationToken;

use crate::catalog::{ops, Catalog, State};
use crate::store::{Store, StoreError};

/// Where a key's bytes are, as far as serving is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Where {
    /// S3 holds the current version.
    InS3,
    /// Tombstoned: 410.
    Deleted,
    /// The catalog knows it, but it is not (yet) in S3.
    NotInS3,
    /// Nobody knows it: 404.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub at: Where,
    pub size: u64,
    /// Hex SHA-256 of the current version, when known: the cache's version check.
    pub sha256: Option<String>,
    /// From this host's catalog (vs learned from S3).
    pub local: bool,
}

/// How long "unknown" is remembered: a file may be dropped any moment.
const NEGATIVE_TTL: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(200);

struct Ttl {
    positive: Duration,
}

impl moka::Expiry<String, Meta> for Ttl {
    fn expire_after_create(&self, _k: &String, v: &Meta, _at: Instant) -> Option<Duration> {
        Some(if v.at == Where::Unknown {
            NEGATIVE_TTL.min(self.positive)
        } else {
            self.positive
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("catalog: {0}")]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error("S3 cannot be asked: {0}")]
    S3(StoreError),
}

pub struct MetaCache {
    catalog: Catalog,
    store: Store,
    prefix: String,
    cache: moka::future::Cache<String, Meta>,
    version: AtomicI64,
}

impl MetaCache {
    pub fn new(catalog: Catalog, store: Store, prefix: String, ttl: Duration) -> MetaCache {
        MetaCache {
            catalog,
            store,
            prefix,
            cache: moka::future::Cache::builder()
                .max_capacity(500_000)
                .expire_after(Ttl { positive: ttl })
                .build(),
            version: AtomicI64::new(i64::MIN),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Meta, Arc<MetaError>> {
        // A hit builds no loader: the loader's future (an S3 HEAD inside) is large, and only
        // a miss needs it, boxed so it does not size every request's future.
        if let Some(m) = self.cache.get(key).await {
            return Ok(m);
        }
        self.cache
            .try_get_with_by_ref(key, Box::pin(self.load(key.to_string())))
            .await
    }

    /// Forgets one key (this process saw it change).
    pub async fn forget(&self, key: &str) {
        self.cache.invalidate(key).await;
    }

    async fn load(&self, key: String) -> Result<Meta, MetaError> {
        let k = key.clone();
        let row = self.catalog.read(move |c| ops::get(c, &k)).await?;
        if let Some(r) = row {
            let at = match r.state {
                State::Verified | State::Archived | State::ArchiveFailed => Where::InS3,
                State::Deleted => Where::Deleted,
                State::Queued | State::Uploading | State::Failed | State::Vanished => {
                    Where::NotInS3
                }
            };
            return Ok(Meta {
                at,
                size: r.stat.size,
                sha256: r.sha256,
                local: true,
            });
        }
        let object_key = format!("{}{}", self.prefix, key);
        match self.store.head(&object_key).await {
            Ok(h) => {
                if h.metadata.contains_key("ferry-deleted") {
                    return Ok(Meta {
                        at: Where::Deleted,
                        size: 0,
                        sha256: None,
                        local: false,
                    });
                }
                let sha = h
                    .metadata
                    .get("sha256")
                    .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
                    .map(|s| s.to_ascii_lowercase())
                    .or_else(|| {
                        // A full-object checksum (single PUT) is the SHA-256 itself.
                        h.checksum_sha256
                            .as_deref()
                            .filter(|c| !c.contains('-'))
                            .and_then(|c| base64::engine::general_purpose::STANDARD.decode(c).ok())
                            .filter(|b| b.len() == 32)
                            .map(hex::encode)
                    });
                Ok(Meta {
                    at: Where::InS3,
                    size: h.size,
                    sha256: sha,
                    local: false,
                })
            }
            Err(e) if e.is_not_found() => Ok(Meta {
                at: Where::Unknown,
                size: 0,
                sha256: None,
                local: false,
            }),
            Err(e) => Err(MetaError::S3(e)),
        }
    }

    /// Clears the cache whenever the catalog changes; runs until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let c = self.catalog.clone();
            if let Ok(Ok(v)) = tokio::task::spawn_blocking(move || c.data_version()).await {
                let old = self.version.swap(v, Ordering::Relaxed);
                if old != v && old != i64::MIN {
                    self.cache.invalidate_all();
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
}
