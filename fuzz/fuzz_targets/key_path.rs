//! Key::from_rel_path on arbitrary bytes as a Unix path (what the watcher can see on disk).
//! Input: byte 0 picks the prefix length, the rest is the path's bytes.
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use ferry::key::Key;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let prefix = common::prefix_for(sel);
    let path = Path::new(OsStr::from_bytes(rest));
    let got = Key::from_rel_path(path, &prefix);
    if let Ok(k) = &got {
        common::check_key(k, &prefix);
        // Bytes kept as they are: no normalisation of separators, dots or Unicode.
        assert_eq!(k.as_str().as_bytes(), rest, "{path:?} became {k:?}");
    }
    // One set of rules: a name Key::new accepts is accepted as a path too, and vice versa.
    if let Ok(s) = std::str::from_utf8(rest) {
        assert_eq!(
            got.is_ok(),
            Key::new(s, &prefix).is_ok(),
            "from_rel_path {got:?} vs Key::new {:?} on {s:?}",
            Key::new(s, &prefix)
        );
    }
});
