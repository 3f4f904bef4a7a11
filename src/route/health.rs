//! Backend health: the probe loop, the counters it and the proxy keep per backend, and the
//! rules that flip a backend down or up.

use super::*;

/// One backend's health as the probes and the proxy saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    /// Failed probes in a row; 2 mark an up backend down.
    pub fails: u32,
    /// Successful probes in a row; 2 mark a down backend up.
    pub successes: u32,
    /// Connect failures seen while proxying since `window_start`.
    pub connect_fails: u32,
    pub window_start: Option<std::time::Instant>,
}

impl Default for Health {
    /// Every backend starts up: routing begins at once, and a dead one is found by the first
    /// request (connect error) or the first two probes.
    fn default() -> Self {
        Health {
            healthy: true,
            fails: 0,
            successes: 0,
            connect_fails: 0,
            window_start: None,
        }
    }
}

impl Health {
    /// Counts one probe result; returns the new state when it changed.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.fails = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.healthy && self.successes >= FLIP_AFTER {
                self.healthy = true;
                return Some(true);
            }
        } else {
            self.successes = 0;
            self.fails = self.fails.saturating_add(1);
            if self.healthy && self.fails >= FLIP_AFTER {
                self.healthy = false;
                return Some(false);
            }
        }
        None
    }

    /// A connect error while proxying at `now`: the backend goes down without waiting for
    /// probes once CONNECT_FAILS_TO_DOWN of them fall within CONNECT_FAIL_WINDOW (the request
    /// that found it is retried elsewhere either way). Returns whether this marked it down.
    pub fn connect_failed(&mut self, now: std::time::Instant) -> bool {
        let in_window = self
            .window_start
            .is_some_and(|t| now.saturating_duration_since(t) <= CONNECT_FAIL_WINDOW);
        if in_window {
            self.connect_fails = self.connect_fails.saturating_add(1);
        } else {
            self.window_start = Some(now);
            self.connect_fails = 1;
        }
        if self.connect_fails >= CONNECT_FAILS_TO_DOWN {
            self.connect_fails = 0;
            self.window_start = None;
            return self.mark_down();
        }
        false
    }

    /// Down now, without waiting for probes. Returns whether it was up.
    pub fn mark_down(&mut self) -> bool {
        let was = self.healthy;
        self.healthy = false;
        self.successes = 0;
        self.fails = self.fails.max(FLIP_AFTER);
        was
    }
}

pub(super) struct Backend {
    /// `http://host:port`, the form that is hashed, so "http://a:1/" and "http://a:1" rank
    /// alike.
    pub(super) name: String,
    pub(super) authority: Authority,
    pub(super) healthz: Uri,
    /// A std Mutex: held only to read or update the counters, never across an await.
    pub(super) health: Mutex<Health>,
    /// Requests in flight on it (the metric is the count itself: one source of truth).
    pub(super) in_flight: prometheus_client::metrics::gauge::Gauge,
    /// Requests it passed on because it was at capacity.
    pub(super) spills: prometheus_client::metrics::counter::Counter,
}

impl Backend {
    pub(super) fn parse(raw: &str) -> Result<Backend, RouteError> {
        let bad = |reason| RouteError::Backend {
            backend: raw.to_string(),
            reason,
        };
        let uri: Uri = raw
            .trim()
            .parse()
            .map_err(|_| bad("is not a URL like http://10.0.0.2:8080"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad(
                "must start with http:// (the router speaks plain HTTP to its nodes)",
            ));
        }
        let authority = uri.authority().cloned().ok_or(bad("has no host:port"))?;
        if authority.port_u16().is_none() || authority.host().is_empty() {
            return Err(bad(
                "must name a host and a port, like http://10.0.0.2:8080",
            ));
        }
        if authority.as_str().contains('@') {
            return Err(bad("must not contain credentials"));
        }
        if uri.query().is_some() || !matches!(uri.path(), "" | "/") {
            return Err(bad("must not have a path or query"));
        }
        // Host names are case-insensitive: "http://A:1" and "http://a:1" are one backend,
        // with one rank.
        let authority: Authority = authority
            .as_str()
            .to_ascii_lowercase()
            .parse()
            .map_err(|_| bad("is not a URL like http://10.0.0.2:8080"))?;
        let name = format!("http://{authority}");
        let healthz = format!("{name}/healthz")
            .parse()
            .map_err(|_| bad("is not a URL like http://10.0.0.2:8080"))?;
        Ok(Backend {
            name,
            authority,
            healthz,
            health: Mutex::new(Health::default()),
            in_flight: Default::default(),
            spills: Default::default(),
        })
    }

    /// Requests in flight on this backend now.
    pub(super) fn load(&self) -> usize {
        usize::try_from(self.in_flight.get()).unwrap_or(0)
    }

    pub(super) fn health(&self) -> Health {
        *self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn is_healthy(&self) -> bool {
        self.health().healthy
    }

    pub(super) fn update<T>(&self, f: impl FnOnce(&mut Health) -> T) -> T {
        f(&mut self.health.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Router {
    /// Probes every backend each `health_interval` until `shutdown`.
    pub async fn check_health(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A slow probe must not outlive the next round by much, nor fail a healthy backend
        // on a short interval.
        let limit = self
            .interval
            .clamp(Duration::from_millis(500), Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let round =
                futures_util::future::join_all(self.backends.iter().map(|b| self.probe(b, limit)));
            let results = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = round => r,
            };
            for (b, ok) in self.backends.iter().zip(results) {
                match b.update(|h| h.record(ok)) {
                    Some(true) => tracing::info!(backend = %b.name, "backend up"),
                    Some(false) => {
                        tracing::warn!(backend = %b.name, "backend down: /healthz failed twice")
                    }
                    None => {}
                }
            }
        }
    }

    async fn probe(&self, b: &Backend, limit: Duration) -> bool {
        let req = match Request::get(b.healthz.clone())
            .header(header::USER_AGENT, "ferry-router")
            .body(empty())
        {
            Ok(r) => r,
            Err(_) => return false,
        };
        let attempt = async {
            let resp = self.client.request(req).await.ok()?;
            let ok = resp.status().is_success();
            // Read the (tiny) body so the connection goes back to the pool.
            let _ = Limited::new(resp.into_body(), 4096).collect().await;
            Some(ok)
        };
        matches!(tokio::time::timeout(limit, attempt).await, Ok(Some(true)))
    }
}
