//! serve::local::plan on any combination of Range and conditional headers.
//!
//! Input: 12 bytes of parameters, then header lines separated by '\n'; each line's first byte
//! picks the field (see FIELDS), the rest is its value (lines HeaderValue refuses are skipped).
//!   [0]     method: 0..=127 GET, 128..=191 HEAD, else POST/PUT/DELETE/OPTIONS
//!   [1..9]  file length, u64 little-endian, shaped by [9]
//!   [9]     length shape: small (0..64), medium (0..100000), raw, or near u64::MAX
//!   [10]    mtime: see MTIMES
//!   [11]    ETag: even = fixed TAG (also in the dictionary), odd = serve::local::etag(...)
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry::serve::local::{etag, plan, Plan};
use http::header::{
    HeaderName, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, RANGE,
};
use http::{HeaderMap, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;

const FIELDS: [HeaderName; 6] = [
    RANGE,
    IF_RANGE,
    IF_NONE_MATCH,
    IF_MODIFIED_SINCE,
    IF_MATCH,
    IF_UNMODIFIED_SINCE,
];

/// Matches the dictionary's `"1a-2b-3c"`.
const TAG: &str = "\"1a-2b-3c\"";

/// The spec's promise on multipart answers (serve/local.rs MAX_PARTS).
const MAX_PARTS: usize = 16;

fn mtime(sel: u8) -> SystemTime {
    match sel % 5 {
        // Tue, 14 Nov 2023 22:13:20 GMT (in the dictionary), with sub-second nanos.
        0 => UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
        1 => UNIX_EPOCH,
        // Before 1970: Last-Modified has to clamp, not panic.
        2 => UNIX_EPOCH - Duration::from_secs(10),
        // Past year 9999, beyond what an HTTP date can say.
        3 => UNIX_EPOCH + Duration::from_secs(300_000_000_000),
        _ => UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    }
}

fn method(sel: u8) -> Method {
    match sel {
        0..=127 => Method::GET,
        128..=191 => Method::HEAD,
        _ => [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS][usize::from(sel % 4)]
            .clone(),
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let (params, lines) = data.split_at(12);
    let method = method(params[0]);
    let raw_len = u64::from_le_bytes(params[1..9].try_into().unwrap());
    let len = match params[9] % 4 {
        0 => raw_len % 64,
        1 => raw_len % 100_000,
        2 => raw_len,
        _ => u64::MAX - raw_len % 64,
    };
    let mtime = mtime(params[10]);
    let tag = if params[11] % 2 == 0 {
        TAG.to_string()
    } else {
        etag(len, mtime, raw_len.rotate_left(17))
    };

    let mut headers = HeaderMap::new();
    for line in lines.split(|&b| b == b'\n') {
        let Some((&f, value)) = line.split_first() else {
            continue;
        };
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(FIELDS[usize::from(f) % FIELDS.len()].clone(), v);
        }
    }

    let got = plan(&method, &headers, len, mtime, &tag);
    let ctx = || format!("{method} len={len} tag={tag} mtime={mtime:?} headers={headers:?}");
    assert_eq!(
        got,
        plan(&method, &headers, len, mtime, &tag),
        "not deterministic: {}",
        ctx()
    );

    let safe = method == Method::GET || method == Method::HEAD;
    let ranged = safe && len > 0 && headers.contains_key(RANGE);
    match &got {
        Plan::Partial(r) => {
            assert!(ranged, "206 without a usable Range: {got:?} {}", ctx());
            assert!(
                r.start < r.end && r.end <= len,
                "bad range {r:?}: {}",
                ctx()
            );
        }
        Plan::Multi(rs) => {
            assert!(ranged, "206 without a usable Range: {got:?} {}", ctx());
            assert!(
                (2..=MAX_PARTS).contains(&rs.len()),
                "{} parts: {got:?} {}",
                rs.len(),
                ctx()
            );
            for r in rs {
                assert!(
                    r.start < r.end && r.end <= len,
                    "bad range {r:?} in {got:?}: {}",
                    ctx()
                );
            }
            for w in rs.windows(2) {
                // Sorted and disjoint; adjacent parts are merged too (what the unit tests want).
                assert!(
                    w[0].end < w[1].start,
                    "parts not sorted/disjoint: {got:?} {}",
                    ctx()
                );
            }
        }
        Plan::Unsatisfiable => {
            assert!(ranged, "416 without a usable Range: {}", ctx());
        }
        Plan::NotModified => {
            assert!(safe, "304 for an unsafe method: {}", ctx());
        }
        Plan::PreconditionFailed | Plan::Full => {}
    }
    if headers.is_empty() {
        assert_eq!(got, Plan::Full, "no headers: {}", ctx());
    }
});
