//! Invariants every accepted Key must hold, whichever constructor made it (DESIGN.md "Key").
//! Shared by the key_url and key_path targets.

use std::path::{Component, Path};

use ferry::key::{Key, MAX_OBJECT_KEY_LEN};

/// A prefix of 0..=1020 bytes picked by one fuzz byte, so the 1024-byte limit is reached with
/// short inputs. Ends in '/' like a real `s3.prefix`.
pub fn prefix_for(sel: u8) -> String {
    match sel {
        0 => String::new(),
        n => {
            let mut p = "p".repeat(usize::from(n) * 4 - 1);
            p.push('/');
            p
        }
    }
}

pub fn check_key(k: &Key, prefix: &str) {
    let s = k.as_str();
    assert!(!s.is_empty(), "empty key accepted: {k:?}");
    assert!(
        prefix.len() + s.len() <= MAX_OBJECT_KEY_LEN,
        "{} + {} bytes > {MAX_OBJECT_KEY_LEN}: {k:?}",
        prefix.len(),
        s.len()
    );
    assert!(!s.chars().any(char::is_control), "control char in {k:?}");
    assert!(!s.contains('\\'), "backslash in {k:?}");
    assert!(!s.starts_with('/'), "absolute key {k:?}");
    let segs: Vec<&str> = s.split('/').collect();
    for seg in &segs {
        assert!(
            !seg.is_empty() && *seg != "." && *seg != "..",
            "bad segment {seg:?} in {k:?}"
        );
        assert!(!seg.starts_with(".ferry"), "reserved segment in {k:?}");
    }

    // SECURITY: the path must stay under the root, one Normal component per segment.
    let root = Path::new("/spool");
    let p = k.path_in(root);
    let rel = p
        .strip_prefix(root)
        .unwrap_or_else(|_| panic!("{p:?} escapes {root:?} for {k:?}"));
    let comps: Vec<Component> = rel.components().collect();
    assert!(
        comps.iter().all(|c| matches!(c, Component::Normal(_))),
        "non-Normal component in {p:?} for {k:?}"
    );
    assert_eq!(comps.len(), segs.len(), "segments lost in {p:?} for {k:?}");

    // SECURITY: the Location header is built from this; no header splitting or URL tricks.
    let enc = k.encoded_object_path("");
    assert!(
        !enc.contains(['\r', '\n', '?', '#', '\\']),
        "unsafe encoding {enc:?} of {k:?}"
    );
    assert!(enc.is_ascii(), "non-ASCII encoding {enc:?} of {k:?}");
    assert!(
        !enc.starts_with('/'),
        "encoding {enc:?} of {k:?} is absolute"
    );
    assert_eq!(
        Key::from_url_path(&enc, ""),
        Ok(k.clone()),
        "URL round trip of {k:?} via {enc:?}"
    );
    assert_eq!(k.object_key(prefix), format!("{prefix}{s}"));

    // One set of rules: every constructor accepts what another accepted.
    assert_eq!(
        Key::new(s, prefix),
        Ok(k.clone()),
        "Key::new disagrees on {k:?}"
    );
    assert_eq!(
        Key::from_url_path(&enc, prefix),
        Ok(k.clone()),
        "from_url_path with prefix {prefix:?} disagrees on {k:?}"
    );
    assert_eq!(
        Key::from_rel_path(Path::new(s), prefix),
        Ok(k.clone()),
        "from_rel_path disagrees on {k:?}"
    );
}
