//! The metadata cache: key → what the catalog says, kept for `http.metadata_ttl` and dropped
//! whole within a second of any catalog commit (SQLite's `data_version`), from any process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::catalog::{ops, Catalog, State};

/// What serving needs to know about a key that is not in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub state: State,
    pub size: u64,
    pub sha256: Option<String>,
}

/// Most entries kept; past this the map is cleared (cheap, and the catalog is fast).
const MAX_ENTRIES: usize = 200_000;
/// How often `data_version` is polled.
const POLL: Duration = Duration::from_millis(200);

pub struct MetaCache {
    catalog: Catalog,
    ttl: Duration,
    map: RwLock<HashMap<String, (Option<Meta>, Instant)>>,
    version: AtomicI64,
}

impl MetaCache {
    pub fn new(catalog: Catalog, ttl: Duration) -> MetaCache {
        MetaCache {
            catalog,
            ttl,
            map: RwLock::new(HashMap::new()),
            version: AtomicI64::new(i64::MIN),
        }
    }

    /// The catalog's view of `key`, from cache when fresh.
    pub async fn get(&self, key: &str) -> Result<Option<Meta>, crate::catalog::CatalogError> {
        if let Ok(m) = self.map.read() {
            if let Some((v, at)) = m.get(key) {
                // Unknown keys are only remembered briefly: they may arrive any moment.
                let ttl = if v.is_some() {
                    self.ttl
                } else {
                    self.ttl.min(Duration::from_secs(2))
                };
                if at.elapsed() < ttl {
                    return Ok(v.clone());
                }
            }
        }
        let k = key.to_string();
        let v = self
            .catalog
            .read(move |c| {
                Ok(ops::get(c, &k)?.map(|r| Meta {
                    state: r.state,
                    size: r.stat.size,
                    sha256: r.sha256,
                }))
            })
            .await?;
        if let Ok(mut m) = self.map.write() {
            if m.len() >= MAX_ENTRIES {
                m.clear();
            }
            m.insert(key.to_string(), (v.clone(), Instant::now()));
        }
        Ok(v)
    }

    /// Clears the cache whenever the catalog changes; runs until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let c = self.catalog.clone();
            if let Ok(Ok(v)) = tokio::task::spawn_blocking(move || c.data_version()).await {
                let old = self.version.swap(v, Ordering::Relaxed);
                if old != v {
                    if let Ok(mut m) = self.map.write() {
                        m.clear();
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Drops everything now (this process changed the catalog).
    pub fn clear(&self) {
        if let Ok(mut m) = self.map.write() {
            m.clear();
        }
    }
}
