//! The hash router (`ferry route`): ranks backends per request by rendezvous hashing of the
//! Host (or first path segment), health-checks them, proxies, and fails over.

use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Runs the router on `router.listen` until `shutdown`.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _ = (cfg, shutdown);
    anyhow::bail!("ferry route is being built")
}
