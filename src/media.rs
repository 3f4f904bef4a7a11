//! Media types: the Content-Type a key is stored and served with, and which types a browser
//! could run as active content. Shared by the uploader and the serve path, which must not
//! import each other.

/// The Content-Type for a key, from its extension; unknown extensions are octet-stream.
pub fn content_type(key: &str) -> String {
    mime_guess::from_path(key)
        .first_or_octet_stream()
        .essence_str()
        .to_string()
}

/// Whether a browser only ever displays this type (images, video, audio, fonts) rather than
/// running it. SVG is an image that can carry script, so it is not passive; neither is
/// anything we do not recognise.
pub fn is_passive(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let Some((top, sub)) = essence.split_once('/') else {
        return false;
    };
    match top {
        "image" => !sub.contains("svg") && !sub.contains("xml"),
        "video" | "audio" | "font" => !sub.contains("xml"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_capable_types_are_active() {
        for key in [
            "a.html",
            "a.htm",
            "a.xhtml",
            "a.svg",
            "a.xml",
            "a.js",
            "a.mjs",
            "a.txt",
            "a.pdf",
            "a.json",
            "noext",
            "a.unknownext",
        ] {
            assert!(!is_passive(&content_type(key)), "{key}");
        }
        for key in [
            "a.jpg", "a.png", "a.gif", "a.webp", "a.mp4", "a.mp3", "a.woff2",
        ] {
            assert!(is_passive(&content_type(key)), "{key}");
        }
        assert!(!is_passive("image/svg+xml; charset=utf-8"));
        assert!(!is_passive("IMAGE/SVG+XML"));
        assert!(is_passive("Image/JPEG"));
        assert!(!is_passive(""));
        assert!(!is_passive("image"));
    }
}
