//! Key::from_url_path on any UTF-8 string (the raw path after the mount), under prefixes of
//! every length. Input: byte 0 picks the prefix length, the rest is the raw URL path.
#![no_main]

use ferry::key::Key;
use libfuzzer_sys::fuzz_target;
use percent_encoding::percent_decode_str;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    // from_url_path takes &str: the HTTP front has already refused non-UTF-8 paths.
    let Ok(raw) = std::str::from_utf8(rest) else {
        return;
    };
    let prefix = common::prefix_for(sel);
    let got = Key::from_url_path(raw, &prefix);
    if let Ok(k) = &got {
        common::check_key(k, &prefix);
        // Decoded exactly once: with no %2F allowed, segment-wise decoding equals a whole one.
        let once: Vec<u8> = percent_decode_str(raw).collect();
        assert_eq!(
            once,
            k.as_str().as_bytes(),
            "not decoded exactly once: {raw:?}"
        );
    }
    // With nothing to decode, the URL rules are exactly Key::new's.
    if !raw.contains('%') {
        assert_eq!(
            got,
            Key::new(raw, &prefix),
            "from_url_path vs Key::new on {raw:?}"
        );
    }
});
