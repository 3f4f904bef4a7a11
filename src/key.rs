//! Key: a validated relative path, the only way a spool name or URL becomes a path or S3 key.
//!
//! One set of rules for both directions (DESIGN.md "Key"): relative, '/'-separated, valid
//! UTF-8 kept byte for byte, no empty/`.`/`..` segments, no backslash, no NUL or control
//! characters, no segment starting with `.ferry`, and `s3.prefix` + KEY at most 1024 bytes.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// S3's limit on an object key, in bytes.
pub const MAX_OBJECT_KEY_LEN: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is empty")]
    Empty,
    #[error("key is not valid UTF-8")]
    NotUtf8,
    #[error("key has an empty segment")]
    EmptySegment,
    #[error("key has a '.' or '..' segment")]
    DotSegment,
    #[error("key contains a backslash")]
    Backslash,
    #[error("key contains a NUL or control character")]
    Control,
    #[error("key has a segment starting with '.ferry' (reserved)")]
    Reserved,
    #[error("prefix + key is {0} bytes; S3 allows {MAX_OBJECT_KEY_LEN}")]
    TooLong(usize),
    #[error("key contains an encoded '/' (%2F)")]
    EncodedSlash,
    #[error("key is not a relative path inside the spool")]
    NotRelative,
}

/// A validated key. Construction checks every rule, so holders never re-check.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", self.0)
    }
}
impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// RFC 3986 path encoding: unreserved characters stay, '/' stays as the separator, everything
/// else (including '%', '?', '#', CR, LF and every non-ASCII byte) is percent-encoded.
const PATH_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

impl Key {
    /// Validates `s` as a key stored under `prefix`.
    pub fn new(s: &str, prefix: &str) -> Result<Key, KeyError> {
        if s.is_empty() {
            return Err(KeyError::Empty);
        }
        let total = prefix.len() + s.len();
        if total > MAX_OBJECT_KEY_LEN {
            return Err(KeyError::TooLong(total));
        }
        if s.starts_with('/') {
            return Err(KeyError::NotRelative);
        }
        for seg in s.split('/') {
            if seg.is_empty() {
                return Err(KeyError::EmptySegment);
            }
            // SECURITY: dot segments are how a name escapes the spool.
            if seg == "." || seg == ".." {
                return Err(KeyError::DotSegment);
            }
            if seg.starts_with(".ferry") {
                return Err(KeyError::Reserved);
            }
        }
        // SECURITY: backslashes are separators on other systems and in some proxies.
        if s.contains('\\') {
            return Err(KeyError::Backslash);
        }
        // SECURITY: NUL truncates paths; CR/LF would split headers.
        if s.chars().any(char::is_control) {
            return Err(KeyError::Control);
        }
        Ok(Key(s.to_string()))
    }

    /// A key from a path relative to the spool root, as the watcher sees it.
    pub fn from_rel_path(rel: &Path, prefix: &str) -> Result<Key, KeyError> {
        let mut parts: Vec<&str> = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(os) => parts.push(os.to_str().ok_or(KeyError::NotUtf8)?),
                Component::CurDir | Component::ParentDir => return Err(KeyError::DotSegment),
                Component::RootDir | Component::Prefix(_) => return Err(KeyError::NotRelative),
            }
        }
        // Components() drops "." and doubled slashes; the raw bytes must pass too.
        let raw = rel.to_str().ok_or(KeyError::NotUtf8)?;
        let joined = parts.join("/");
        if raw != joined {
            return Err(KeyError::EmptySegment);
        }
        Key::new(&joined, prefix)
    }

    /// A key from the raw (still percent-encoded) URL path after the mount point.
    /// Percent-decodes exactly once; an encoded '/' inside a segment is refused.
    pub fn from_url_path(raw: &str, prefix: &str) -> Result<Key, KeyError> {
        if raw.is_empty() {
            return Err(KeyError::Empty);
        }
        let mut out: Vec<u8> = Vec::with_capacity(raw.len());
        for (i, seg) in raw.split('/').enumerate() {
            if i > 0 {
                out.push(b'/');
            }
            let decoded: Vec<u8> = percent_decode_str(seg).collect();
            // SECURITY: a decoded '/' would create a segment the router never saw.
            if decoded.contains(&b'/') {
                return Err(KeyError::EncodedSlash);
            }
            out.extend_from_slice(&decoded);
        }
        let s = String::from_utf8(out).map_err(|_| KeyError::NotUtf8)?;
        Key::new(&s, prefix)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path of this key under `root`; safe because every segment was validated.
    pub fn path_in(&self, root: &Path) -> PathBuf {
        let mut p = root.to_path_buf();
        for seg in self.0.split('/') {
            p.push(seg);
        }
        p
    }

    /// The object key in the bucket.
    pub fn object_key(&self, prefix: &str) -> String {
        format!("{prefix}{}", self.0)
    }

    /// RFC 3986 percent-encoding of `prefix + key`, '/' kept, for a Location URL.
    pub fn encoded_object_path(&self, prefix: &str) -> String {
        utf8_percent_encode(&self.object_key(prefix), PATH_ENCODE).to_string()
    }
}

/// Matches `spool.ignore` globs against each segment's name, so an ignored directory hides
/// everything under it.
#[derive(Clone)]
pub struct IgnoreSet(globset::GlobSet);

impl IgnoreSet {
    pub fn new(globs: &[String]) -> Result<IgnoreSet, globset::Error> {
        let mut b = globset::GlobSetBuilder::new();
        for g in globs {
            b.add(
                globset::GlobBuilder::new(g)
                    .literal_separator(true)
                    .build()?,
            );
        }
        Ok(IgnoreSet(b.build()?))
    }

    /// Whether any segment of `rel` matches.
    pub fn is_ignored(&self, rel: &Path) -> bool {
        rel.components().any(|c| match c {
            Component::Normal(name) => self.0.is_match(Path::new(name)),
            _ => false,
        })
    }

    /// Whether a single name matches.
    pub fn matches_name(&self, name: &std::ffi::OsStr) -> bool {
        self.0.is_match(Path::new(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_ordinary_keys() {
        for k in [
            "a.jpg",
            "2026/11/a.jpg",
            "my photo.jpg",
            "été/ü.png",
            ".hidden",
            "a..b",
        ] {
            assert_eq!(Key::new(k, "").unwrap().as_str(), k);
        }
    }

    #[test]
    fn refuses_bad_keys() {
        let cases = [
            ("", KeyError::Empty),
            ("/a", KeyError::NotRelative),
            ("a//b", KeyError::EmptySegment),
            ("a/", KeyError::EmptySegment),
            ("../a", KeyError::DotSegment),
            ("a/./b", KeyError::DotSegment),
            ("a\\b", KeyError::Backslash),
            ("a\0b", KeyError::Control),
            ("a\r\nb", KeyError::Control),
            (".ferry-versions/a", KeyError::Reserved),
        ];
        for (k, want) in cases {
            assert_eq!(Key::new(k, ""), Err(want), "{k:?}");
        }
        let long = "a".repeat(1020);
        assert!(Key::new(&long, "").is_ok());
        assert_eq!(Key::new(&long, "pfx/x"), Err(KeyError::TooLong(1025)));
    }

    #[test]
    fn url_decoding_happens_once() {
        assert_eq!(
            Key::from_url_path("my%20photo.jpg", "").unwrap().as_str(),
            "my photo.jpg"
        );
        assert_eq!(
            Key::from_url_path("%2e%2e/etc", ""),
            Err(KeyError::DotSegment)
        );
        assert_eq!(
            Key::from_url_path("..%2fetc", ""),
            Err(KeyError::EncodedSlash)
        );
        // Double-encoded dots decode once to a literal "%2e%2e", which is a harmless name.
        assert_eq!(
            Key::from_url_path("%252e%252e/x", "").unwrap().as_str(),
            "%2e%2e/x"
        );
        assert_eq!(Key::from_url_path("a%00b", ""), Err(KeyError::Control));
        assert_eq!(Key::from_url_path("a%0d%0ab", ""), Err(KeyError::Control));
        assert_eq!(Key::from_url_path("%ff", ""), Err(KeyError::NotUtf8));
        assert_eq!(
            Key::from_url_path("/evil.example", ""),
            Err(KeyError::NotRelative)
        );
        assert_eq!(Key::from_url_path("a%5cb", ""), Err(KeyError::Backslash));
    }

    #[test]
    fn rel_paths() {
        assert_eq!(
            Key::from_rel_path(Path::new("2026/11/a.jpg"), "")
                .unwrap()
                .as_str(),
            "2026/11/a.jpg"
        );
        assert!(Key::from_rel_path(Path::new("../a"), "").is_err());
        assert!(Key::from_rel_path(Path::new("/a"), "").is_err());
        assert!(Key::from_rel_path(Path::new("a/./b"), "").is_err());
    }

    #[test]
    fn encoding_for_location() {
        let k = Key::new("2026/a b/ü?#%.jpg", "").unwrap();
        assert_eq!(
            k.encoded_object_path("p/"),
            "p/2026/a%20b/%C3%BC%3F%23%25.jpg"
        );
    }

    #[test]
    fn ignore_globs_match_segments() {
        let ig = IgnoreSet::new(&[".*".into(), "*.part".into()]).unwrap();
        assert!(ig.is_ignored(Path::new(".x.jpg.abc123")));
        assert!(ig.is_ignored(Path::new("a/.tmp/b.jpg")));
        assert!(ig.is_ignored(Path::new("a/b.jpg.part")));
        assert!(!ig.is_ignored(Path::new("a/b.jpg")));
    }

    proptest! {
        #[test]
        fn any_url_maps_inside_or_is_refused(raw in "[a-zA-Z0-9%./\\\\ \\x00-\\x1f\u{80}-\u{10ffff}]{0,64}") {
            if let Ok(k) = Key::from_url_path(&raw, "") {
                let root = Path::new("/spool");
                let p = k.path_in(root);
                prop_assert!(p.starts_with(root));
                for c in p.strip_prefix(root).unwrap().components() {
                    prop_assert!(matches!(c, Component::Normal(_)));
                }
                prop_assert!(!k.as_str().chars().any(char::is_control));
                let enc = k.encoded_object_path("");
                prop_assert!(!enc.contains(['\r', '\n', '?', '#', '\\']));
                prop_assert!(!enc.starts_with('/'));
            }
        }

        #[test]
        fn valid_keys_roundtrip_through_url_encoding(segs in proptest::collection::vec("[^/\\x00-\\x1f\\x7f\\\\]{1,12}", 1..4)) {
            let s = segs.join("/");
            if let Ok(k) = Key::new(&s, "") {
                let enc = k.encoded_object_path("");
                prop_assert_eq!(Key::from_url_path(&enc, "").unwrap(), k);
            }
        }
    }
}
