//! Ranking: which backend a request goes to. Rendezvous hashing of the Host (or the first
//! path segment), with weights from SHA-256 so every router ranks alike, forever.

use super::*;

/// What a request is ranked by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashBy {
    /// The Host header, lower-cased, without port: one site, one node.
    Host,
    /// The first path segment after `http.mount` (`/static/<blog>/...`): for sites that
    /// share one Host.
    Path,
}

impl HashBy {
    pub fn parse(s: &str) -> Result<HashBy, RouteError> {
        match s {
            "host" => Ok(HashBy::Host),
            "path" => Ok(HashBy::Path),
            other => Err(RouteError::Hash(other.to_string())),
        }
    }
}

/// The rendezvous weight of `backend` for `key`: the first 8 bytes of
/// SHA-256(backend + "\0" + key). The NUL keeps ("ab", "c") and ("a", "bc") apart.
pub fn weight(backend: &str, key: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(backend.as_bytes());
    h.update([0u8]);
    h.update(key.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Indices into `backends`, best first, for `key`.
pub fn rank_indices(backends: &[String], key: &str) -> Vec<usize> {
    let mut w: Vec<(u64, usize)> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| (weight(b, key), i))
        .collect();
    // Ties (astronomically rare) break on the name, so the order of the config list never
    // matters.
    w.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| backends[a.1].cmp(&backends[b.1]))
    });
    w.into_iter().map(|(_, i)| i).collect()
}

/// `backends` ranked for `key`, best first.
pub fn rank<'a>(backends: &'a [String], key: &str) -> Vec<&'a str> {
    rank_indices(backends, key)
        .into_iter()
        .map(|i| backends[i].as_str())
        .collect()
}

/// The Host a request is ranked by: lower-cased, without port or trailing dot, so
/// `Example.com:80`, `example.com` and `example.com.` are one site. Falls back to the URI's
/// authority (absolute-form requests); "" when there is neither.
pub fn host_key(headers: &HeaderMap, uri: &Uri) -> String {
    let raw = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(Authority::as_str))
        .unwrap_or("")
        .trim();
    let host = if raw.starts_with('[') {
        // An IPv6 literal: the port, if any, follows the bracket.
        match raw.find(']') {
            Some(end) => &raw[..=end],
            None => raw,
        }
    } else {
        match raw.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => raw,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    host.to_ascii_lowercase()
}

/// The first path segment after `mount` (`/static/<blog>/a.jpg` -> `<blog>`), as sent
/// (not decoded: the same bytes always rank alike); "" outside the mount.
pub fn path_key<'p>(mount: &str, path: &'p str) -> &'p str {
    match path.strip_prefix(mount) {
        Some(rest) => rest.split_once('/').map_or(rest, |(first, _)| first),
        None => "",
    }
}
