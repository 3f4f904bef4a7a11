//! Configuration: the `Config` tree, its defaults (in one place), env overrides, validation.
//!
//! Layers, lowest first: the defaults below, the TOML file (if any), then environment
//! variables `FERRY_<SECTION>_<KEY>`. The env layer is merged as a TOML table whose value
//! types come from the defaults, so there is one merge step and no per-field plumbing.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("config key {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// A duration written as "500ms", "5m", "7d".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| format!("{s:?} is not a duration like \"500ms\" or \"5m\": {e}"))?;
        // Every duration is added to a clock somewhere (a deadline, a due time, a cut-off in
        // milliseconds): past a century those sums overflow, and a wrapped one means "now".
        if d > Dur::MAX.0 {
            return Err(format!(
                "{s:?} is longer than the longest duration ferry takes (100 years)"
            ));
        }
        Ok(Dur(d))
    }
}

impl Dur {
    /// The longest duration a config key or flag takes: 100 years as humantime counts them
    /// (365.25 days each).
    pub const MAX: Dur = Dur(Duration::from_secs(100 * 31_557_600));
}
impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}
impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}
impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A byte size written as "16MiB", "1GiB", or a plain number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| Size(b.as_u64()))
            .map_err(|e| format!("{s:?} is not a size like \"16MiB\": {e}"))
    }
}
impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec_short())
    }
}
impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}
impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A size that may be left empty (`""`) to mean "derived from another setting".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaybeSize(pub Option<u64>);

impl FromStr for MaybeSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Ok(MaybeSize(None));
        }
        s.parse::<Size>().map(|z| MaybeSize(Some(z.0)))
    }
}
impl Serialize for MaybeSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            None => s.serialize_str(""),
            Some(n) => Size(n).serialize(s),
        }
    }
}
impl<'de> Deserialize<'de> for MaybeSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(MaybeSize(Some(n))),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A duration that may be left empty (`""`) to mean "derived from another setting".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaybeDur(pub Option<Duration>);

impl FromStr for MaybeDur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Ok(MaybeDur(None));
        }
        s.parse::<Dur>().map(|d| MaybeDur(Some(d.0)))
    }
}
impl Serialize for MaybeDur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            None => s.serialize_str(""),
            Some(d) => Dur(d).serialize(s),
        }
    }
}
impl<'de> Deserialize<'de> for MaybeDur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl HttpConfig {
    /// `http.metadata_grace` with its default (`http.metadata_ttl`) applied.
    pub fn metadata_grace(&self) -> Duration {
        self.metadata_grace.0.unwrap_or(self.metadata_ttl.0)
    }
}

impl CacheConfig {
    /// `cache.max_object` with its default applied.
    pub fn max_object(&self) -> u64 {
        self.max_object.0.unwrap_or(self.max_size.0 / 8)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub spool: SpoolConfig,
    pub archive: ArchiveConfig,
    pub catalog: CatalogConfig,
    pub s3: S3Config,
    pub retry: RetryConfig,
    pub http: HttpConfig,
    pub cache: CacheConfig,
    pub router: RouterConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// How long a finished file must stay unchanged before it is uploaded.
    pub settle: Dur,
    /// A full rescan catches anything inotify missed.
    pub rescan_interval: Dur,
    /// Globs on each path segment's name; matches are never uploaded (temp names).
    pub ignore: Vec<String>,
}
impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: "var/spool".into(),
            settle: Dur(Duration::from_secs(1)),
            rescan_interval: Dur(Duration::from_secs(60)),
            ignore: vec![
                ".*".into(),
                "*.part".into(),
                "*.tmp".into(),
                "*.crdownload".into(),
            ],
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    pub dir: PathBuf,
    /// "" keeps archive copies forever.
    pub retain: String,
}
impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            dir: "var/archive".into(),
            retain: String::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogConfig {
    pub path: PathBuf,
    /// The shared catalog of a cluster: "postgres://user@host/db" (what the URL leaves out
    /// comes from the PG* environment variables); "" = none, this node knows only its own
    /// files and S3.
    pub shared: String,
}
impl Default for CatalogConfig {
    fn default() -> Self {
        CatalogConfig {
            path: "var/ferry.db".into(),
            shared: String::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyMode {
    /// The PUT's own response, else a HEAD, else a read-back (DESIGN "Verification").
    Auto,
    /// Never trust the PUT's response: a HEAD, else a read-back.
    Head,
    /// Always read the object back and hash it.
    ReadBack,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    pub bucket: String,
    pub prefix: String,
    pub region: String,
    /// "" means AWS; anything else is an S3-compatible endpoint URL.
    pub endpoint: String,
    pub path_style: bool,
    pub concurrency: usize,
    pub multipart_threshold: Size,
    pub part_size: Size,
    pub verify: VerifyMode,
}
impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            bucket: "ferry".into(),
            prefix: String::new(),
            region: "us-east-1".into(),
            endpoint: String::new(),
            path_style: false,
            concurrency: 32,
            multipart_threshold: Size(64 << 20),
            part_size: Size(16 << 20),
            verify: VerifyMode::Auto,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub initial: Dur,
    pub max_interval: Dur,
    pub multiplier: f64,
}
impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial: Dur(Duration::from_millis(500)),
            max_interval: Dur(Duration::from_secs(300)),
            multiplier: 2.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServeMode {
    Redirect,
    Proxy,
}

/// How uploads a browser could run (HTML, SVG, script, unknown types) are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActiveContent {
    /// `Content-Security-Policy: sandbox`: shown, but in an opaque origin with no script.
    Sandbox,
    /// Sandboxed and `Content-Disposition: attachment`: downloaded, never shown inline.
    Attachment,
    /// As uploaded: only for a spool whose every writer is trusted.
    Allow,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: String,
    pub mount: String,
    /// A regex every served KEY must match; "" allows all.
    pub allow: String,
    /// Sent as X-Ferry-Node; "" means the hostname.
    pub node_name: String,
    pub mode: ServeMode,
    pub redirect_base: String,
    pub presign: bool,
    pub presign_ttl: Dur,
    pub metadata_ttl: Dur,
    /// While S3 cannot be asked, metadata is served this long past its TTL ("" = as long
    /// as `metadata_ttl`): an S3 outage then costs no 503 for keys seen lately.
    pub metadata_grace: MaybeDur,
    pub fallback_url: String,
    /// Cache-Control on local hits: uploads never change under one key for long, but can.
    pub cache_control: String,
    /// A client must send its request headers within this long (slowloris defence).
    pub header_read_timeout: Dur,
    /// Uploads are other people's content served from the site's own origin: stored XSS
    /// unless script-capable types are sandboxed.
    pub active_content: ActiveContent,
    /// A response write that makes no progress for this long ends the connection: a client
    /// that stops reading must not pin a descriptor and its buffers.
    pub send_timeout: Dur,
    /// Open client connections at most; at the cap, accepting waits (the listen backlog
    /// holds newcomers) rather than running out of descriptors.
    pub max_connections: usize,
    /// A body from S3 or the archive server that sends no byte for this long is cut off
    /// (the proxied response ends short, a cache fill is abandoned): a stalled upstream
    /// must not hold a client, a connection and a fill slot forever.
    pub upstream_stall: Dur,
    /// This node's internal URL for other nodes (`peer` answers, with a shared catalog);
    /// "" = http:// and the address the node bound.
    pub advertise_url: String,
    /// HTTP front threads of `ferry serve`/`run` and `ferry route`, each owning the
    /// connections it is handed, and the worker threads of the runtime that syncs; 0 = one
    /// per core. Where a load generator or the local S3 server shares the cores, fewer can
    /// win.
    pub workers: usize,
    /// Bytes of small spool files (at most 256 KiB each) kept in memory for local hits, each
    /// answered while a stat of its path shows it unchanged (`serve::memo`); 0 = off.
    pub spool_memory: Size,
}
impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".into(),
            mount: "/static/".into(),
            allow: String::new(),
            node_name: String::new(),
            mode: ServeMode::Redirect,
            redirect_base: String::new(),
            presign: false,
            presign_ttl: Dur(Duration::from_secs(15 * 60)),
            metadata_ttl: Dur(Duration::from_secs(5 * 60)),
            metadata_grace: MaybeDur(None),
            fallback_url: String::new(),
            cache_control: "public, max-age=300".into(),
            header_read_timeout: Dur(Duration::from_secs(30)),
            active_content: ActiveContent::Sandbox,
            send_timeout: Dur(Duration::from_secs(60)),
            max_connections: 16_384,
            upstream_stall: Dur(Duration::from_secs(30)),
            advertise_url: String::new(),
            workers: 0,
            spool_memory: Size(64 << 20),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub dir: PathBuf,
    pub max_size: Size,
    /// The largest object the hot cache takes; "" = max_size / 8. A larger one would be
    /// fetched from S3 in full on every request and never fit.
    pub max_object: MaybeSize,
    /// The bytes S3 fetches in flight may hold in their temp files under `dir` (each holds
    /// its whole object); past it, a proxied object streams straight from S3 uncoalesced.
    pub fill_limit: Size,
    pub hot_hits: u32,
    pub hot_window: Dur,
    pub ttl: Dur,
}
impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: "var/cache".into(),
            max_size: Size(1 << 30),
            max_object: MaybeSize(None),
            fill_limit: Size(1 << 30),
            hot_hits: 10,
            hot_window: Dur(Duration::from_secs(300)),
            ttl: Dur(Duration::from_secs(7 * 86400)),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    pub listen: String,
    pub backends: Vec<String>,
    pub hash: String,
    pub health_interval: Dur,
    /// Open client connections at most (as `http.max_connections`, for the router).
    pub max_connections: usize,
    /// Consistent hashing with bounded loads: a backend with more than this many times the
    /// average requests in flight takes no new one (the Host's next-ranked backend does).
    /// `0` turns the bound off; see `route::load`.
    pub balance_factor: f64,
}
impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            listen: "127.0.0.1:8000".into(),
            backends: vec!["http://127.0.0.1:8080".into()],
            hash: "host".into(),
            health_interval: Dur(Duration::from_secs(1)),
            max_connections: 16_384,
            balance_factor: 1.25,
        }
    }
}

impl Config {
    /// Loads `path` (or the embedded defaults when `None`), applies `FERRY_*` variables from
    /// the process environment, and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (text, name) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
                p.display().to_string(),
            ),
            None => (String::new(), "(embedded defaults)".to_string()),
        };
        Self::from_toml_with_env(&text, &name, env)
    }

    pub fn from_toml_with_env(
        text: &str,
        name: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: name.to_string(),
            message: e.to_string(),
        })?;
        apply_env(&mut table, env)?;
        let cfg: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: name.to_string(),
                message: e.message().to_string(),
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what types alone cannot; every error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.s3.bucket.is_empty() {
            return Err(invalid("s3.bucket", "must not be empty"));
        }
        if self.s3.concurrency == 0 || self.s3.concurrency > 1024 {
            return Err(invalid("s3.concurrency", "must be between 1 and 1024"));
        }
        const MIB5: u64 = 5 << 20;
        const GIB5: u64 = 5 << 30;
        if self.s3.part_size.0 < MIB5 || self.s3.part_size.0 > GIB5 {
            return Err(invalid(
                "s3.part_size",
                format!(
                    "{} is outside S3's 5MiB..5GiB part limits",
                    self.s3.part_size
                ),
            ));
        }
        if self.s3.multipart_threshold.0 > GIB5 {
            return Err(invalid(
                "s3.multipart_threshold",
                "a single PUT is limited to 5GiB by S3",
            ));
        }
        if self.s3.prefix.len() >= crate::key::MAX_OBJECT_KEY_LEN {
            return Err(invalid(
                "s3.prefix",
                "leaves no room for a key in 1024 bytes",
            ));
        }
        if !self.s3.prefix.is_empty() {
            if self.s3.prefix.starts_with('/') {
                return Err(invalid("s3.prefix", "must not start with '/'"));
            }
            if self.s3.prefix.chars().any(|c| c.is_control()) {
                return Err(invalid("s3.prefix", "must not contain control characters"));
            }
        }
        if !is_http_url_or_empty(&self.s3.endpoint) {
            return Err(invalid(
                "s3.endpoint",
                "must start with http:// or https://",
            ));
        }
        if !(self.retry.multiplier >= 1.0 && self.retry.multiplier <= 100.0) {
            return Err(invalid("retry.multiplier", "must be between 1.0 and 100.0"));
        }
        if self.retry.initial.0.is_zero() {
            return Err(invalid("retry.initial", "must be more than 0"));
        }
        if self.retry.max_interval.0 < self.retry.initial.0 {
            return Err(invalid(
                "retry.max_interval",
                "must be at least retry.initial",
            ));
        }
        for g in &self.spool.ignore {
            globset::Glob::new(g)
                .map_err(|e| invalid("spool.ignore", format!("bad glob {g:?}: {e}")))?;
        }
        if self.spool.rescan_interval.0 < Duration::from_millis(100) {
            return Err(invalid("spool.rescan_interval", "must be at least 100ms"));
        }
        if self.http.max_connections == 0 {
            return Err(invalid("http.max_connections", "must be at least 1"));
        }
        if self.router.max_connections == 0 {
            return Err(invalid("router.max_connections", "must be at least 1"));
        }
        if self.http.workers > 1024 {
            return Err(invalid(
                "http.workers",
                "must be at most 1024 (0 = automatic: front threads for half the cores, at least one)",
            ));
        }
        if self.http.upstream_stall.0.is_zero() {
            return Err(invalid("http.upstream_stall", "must be more than 0"));
        }
        if self.http.send_timeout.0.is_zero() {
            return Err(invalid("http.send_timeout", "must be more than 0"));
        }
        if !self.http.mount.starts_with('/') || !self.http.mount.ends_with('/') {
            return Err(invalid("http.mount", "must start and end with '/'"));
        }
        if !self.http.allow.is_empty() {
            regex::Regex::new(&self.http.allow)
                .map_err(|e| invalid("http.allow", format!("bad regex: {e}")))?;
        }
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "http.listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:8080",
                    self.http.listen
                ),
            ));
        }
        if self.router.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "router.listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:8000",
                    self.router.listen
                ),
            ));
        }
        if self
            .http
            .node_name
            .chars()
            .any(|c| c.is_control() || !c.is_ascii())
        {
            return Err(invalid("http.node_name", "must be printable ASCII"));
        }
        if !is_http_url_or_empty(&self.http.advertise_url) {
            return Err(invalid(
                "http.advertise_url",
                "must start with http:// or https://",
            ));
        }
        if !self.catalog.shared.is_empty() {
            if !(self.catalog.shared.starts_with("postgres://")
                || self.catalog.shared.starts_with("postgresql://"))
            {
                return Err(invalid(
                    "catalog.shared",
                    "must be a URL like postgres://ferry@db.internal/ferry (or \"\" for none)",
                ));
            }
            crate::shared::pg_config(&self.catalog.shared)
                .map_err(|e| invalid("catalog.shared", e.to_string()))?;
        }
        if !is_http_url_or_empty(&self.http.redirect_base) {
            return Err(invalid(
                "http.redirect_base",
                "must start with http:// or https://",
            ));
        }
        if self.http.redirect_base.chars().any(|c| c.is_control()) {
            return Err(invalid(
                "http.redirect_base",
                "must not contain control characters",
            ));
        }
        if self.http.cache_control.chars().any(|c| c.is_control()) {
            return Err(invalid(
                "http.cache_control",
                "must not contain control characters",
            ));
        }
        if self.http.presign_ttl.0 < Duration::from_secs(10)
            || self.http.presign_ttl.0 > Duration::from_secs(7 * 86400)
        {
            return Err(invalid("http.presign_ttl", "must be between 10s and 7d"));
        }
        if !self.archive.retain.is_empty() {
            self.archive
                .retain
                .parse::<Dur>()
                .map_err(|e| invalid("archive.retain", e))?;
        }
        if self.router.hash != "host" && self.router.hash != "path" {
            return Err(invalid("router.hash", "must be \"host\" or \"path\""));
        }
        let f = self.router.balance_factor;
        // A factor of 1 or less leaves no room above the average: a node could refuse
        // requests while every node is at it, and the Hosts would scatter for nothing.
        if !f.is_finite() || f < 0.0 || (f > 0.0 && f <= 1.0) {
            return Err(invalid(
                "router.balance_factor",
                format!(
                    "{f} must be 0 (no load bound) or more than 1 (e.g. 1.25: at most 25% \
                     above the average in flight)"
                ),
            ));
        }
        if self.cache.hot_hits == 0 {
            return Err(invalid("cache.hot_hits", "must be at least 1"));
        }
        Ok(())
    }

    /// Whether the store is something other than AWS (custom endpoint).
    pub fn custom_endpoint(&self) -> bool {
        !self.s3.endpoint.is_empty()
    }

    /// The name sent as X-Ferry-Node.
    pub fn node_name(&self) -> String {
        if !self.http.node_name.is_empty() {
            return self.http.node_name.clone();
        }
        // gethostname(2), not /proc/sys/kernel/hostname: the unit's ProcSubset=pid hides /proc/sys.
        let mut buf = [0u8; 256];
        // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it
        // (or truncates, which the NUL search below handles).
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        let name = if rc == 0 {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).trim().to_string()
        } else {
            String::new()
        };
        if name.is_empty() || name.chars().any(|c| c.is_control() || !c.is_ascii()) {
            "ferry".to_string()
        } else {
            name
        }
    }

    /// The archive retention as a duration; `None` keeps copies forever.
    pub fn archive_retain(&self) -> Option<Duration> {
        self.archive.retain.parse::<Dur>().ok().map(|d| d.0)
    }
}

fn is_http_url_or_empty(s: &str) -> bool {
    s.is_empty() || s.starts_with("http://") || s.starts_with("https://")
}

/// Merges `FERRY_<SECTION>_<KEY>` variables into `table`, typed like the default value of
/// that key, so "8" becomes an integer where the default is one and lists split on commas.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let defaults = match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t,
        _ => return Ok(()),
    };
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("FERRY_"))
        .collect();
    vars.sort();
    for (var, value) in vars {
        let rest = var["FERRY_".len()..].to_ascii_lowercase();
        // Variables that are not config keys (FERRY_LOG, FERRY_CONFIG, ...) are left alone.
        let Some((section, key)) = rest.split_once('_') else {
            continue;
        };
        let Some(toml::Value::Table(sec_defaults)) = defaults.get(section) else {
            continue;
        };
        let Some(default) = sec_defaults.get(key) else {
            return Err(ConfigError::Env {
                var,
                message: format!("[{section}] has no key {key:?}"),
            });
        };
        let err = |message: String| ConfigError::Env {
            var: var.clone(),
            message,
        };
        let v = match default {
            toml::Value::Integer(_) => toml::Value::Integer(
                value
                    .trim()
                    .parse()
                    .map_err(|_| err(format!("{value:?} is not an integer")))?,
            ),
            toml::Value::Float(_) => toml::Value::Float(
                value
                    .trim()
                    .parse()
                    .map_err(|_| err(format!("{value:?} is not a number")))?,
            ),
            toml::Value::Boolean(_) => match value.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => toml::Value::Boolean(true),
                "false" | "0" | "no" | "off" => toml::Value::Boolean(false),
                _ => return Err(err(format!("{value:?} is not true or false"))),
            },
            toml::Value::Array(_) => toml::Value::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
            ),
            _ => toml::Value::String(value.clone()),
        };
        let sec = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match sec {
            toml::Value::Table(t) => {
                t.insert(key.to_string(), v);
            }
            _ => return Err(err(format!("[{section}] in the file is not a table"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    /// A duration is added to a clock: one that would overflow the sum is refused when read,
    /// naming the value, instead of panicking (or wrapping to "due now") when used.
    #[test]
    fn durations_past_a_century_are_refused() {
        assert_eq!("100y".parse::<Dur>(), Ok(Dur::MAX));
        assert!("101y".parse::<Dur>().is_err());
        let e = "1000000000y".parse::<Dur>().unwrap_err();
        assert!(e.contains("1000000000y") && e.contains("100 years"), "{e}");
        assert!("36500d".parse::<Dur>().is_ok());
        let e = Config::from_toml_with_env("[archive]\nretain = \"500000y\"\n", "t.toml", no_env())
            .unwrap_err()
            .to_string();
        assert!(e.contains("500000y"), "{e}");
    }

    #[test]
    fn embedded_defaults_are_valid_and_under_var() {
        let c = Config::from_toml_with_env("", "t", no_env()).unwrap();
        assert_eq!(c.spool.dir, PathBuf::from("var/spool"));
        assert_eq!(c.s3.part_size, Size(16 << 20));
        assert_eq!(c.retry.initial, Dur(Duration::from_millis(500)));
        assert_eq!(c.http.mode, ServeMode::Redirect);
    }

    #[test]
    fn example_config_parses_and_matches_defaults() {
        let text = include_str!("../config/ferry.toml");
        let c = Config::from_toml_with_env(text, "config/ferry.toml", no_env()).unwrap();
        let d = Config::default();
        // The annotated example documents the defaults; it must not drift from them.
        assert_eq!(
            toml::Value::try_from(&c).unwrap(),
            toml::Value::try_from(&d).unwrap()
        );
    }

    #[test]
    fn quickstart_config_parses() {
        let text = include_str!("../config/quickstart.toml");
        let c = Config::from_toml_with_env(text, "config/quickstart.toml", no_env()).unwrap();
        assert!(c.http.presign);
        assert!(c.s3.path_style);
    }

    #[test]
    fn env_overrides_are_typed_by_defaults() {
        let env = vec![
            ("FERRY_S3_ENDPOINT".into(), "http://127.0.0.1:9000".into()),
            ("FERRY_S3_CONCURRENCY".into(), "3".into()),
            ("FERRY_S3_PATH_STYLE".into(), "true".into()),
            ("FERRY_SPOOL_IGNORE".into(), "*.a, *.b".into()),
            ("FERRY_SPOOL_SETTLE".into(), "250ms".into()),
            ("FERRY_HTTP_NODE_NAME".into(), "n1".into()),
            ("FERRY_LOG".into(), "debug".into()),
        ];
        let c = Config::from_toml_with_env("[s3]\nconcurrency = 9\n", "t", env).unwrap();
        assert_eq!(c.s3.endpoint, "http://127.0.0.1:9000");
        assert_eq!(c.s3.concurrency, 3);
        assert!(c.s3.path_style);
        assert_eq!(c.spool.ignore, vec!["*.a".to_string(), "*.b".to_string()]);
        assert_eq!(c.spool.settle, Dur(Duration::from_millis(250)));
        assert_eq!(c.http.node_name, "n1");
    }

    #[test]
    fn balance_factor_takes_zero_or_more_than_one() {
        let d = Config::from_toml_with_env("", "t", no_env()).unwrap();
        assert_eq!(d.router.balance_factor, 1.25);
        // Written as TOML integers too: `0` (off) is the natural way to say it.
        for (text, want) in [("0", 0.0), ("2", 2.0), ("1.5", 1.5), ("0.0", 0.0)] {
            let c = Config::from_toml_with_env(
                &format!("[router]\nbalance_factor = {text}\n"),
                "t",
                no_env(),
            )
            .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(c.router.balance_factor, want, "{text}");
        }
        let c = Config::from_toml_with_env(
            "",
            "t",
            vec![("FERRY_ROUTER_BALANCE_FACTOR".into(), "0".into())],
        )
        .unwrap();
        assert_eq!(c.router.balance_factor, 0.0);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml_with_env("[s3]\npart_size = \"1MiB\"\n", "t", no_env())
            .unwrap_err()
            .to_string();
        assert!(e.contains("s3.part_size"), "{e}");
        let e = Config::from_toml_with_env("[s3]\nbukket = \"x\"\n", "t", no_env())
            .unwrap_err()
            .to_string();
        assert!(e.contains("bukket"), "{e}");
        let e =
            Config::from_toml_with_env("", "t", vec![("FERRY_S3_CONCURENCY".into(), "3".into())])
                .unwrap_err()
                .to_string();
        assert!(e.contains("FERRY_S3_CONCURENCY"), "{e}");
        let e = Config::from_toml_with_env(
            "",
            "t",
            vec![("FERRY_S3_CONCURRENCY".into(), "lots".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not an integer"), "{e}");
        for bad in ["0.5", "1", "1.0", "-2", "nan"] {
            let e = Config::from_toml_with_env(
                "",
                "t",
                vec![("FERRY_ROUTER_BALANCE_FACTOR".into(), bad.into())],
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("router.balance_factor"), "{bad}: {e}");
        }
        let e = Config::from_toml_with_env("[spool]\nsettle = \"soon\"\n", "t", no_env())
            .unwrap_err()
            .to_string();
        assert!(e.contains("soon"), "{e}");
    }
}
