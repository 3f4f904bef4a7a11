//! Media types: the Content-Type a key is stored and served with, and which types a browser
//! could run as active content. Shared by the uploader and the serve path, which must not
//! import each other.

/// The Content-Type for a key, from its extension; unknown extensions are octet-stream.
pub fn content_type(key: &str) -> String {
    // Lowercase, as a parsed `Mime` gave it: the table spells a few (`.xlsm`, `.psc1`) with
    // capitals.
    content_type_str(key).to_ascii_lowercase()
}

/// The same as a static string. It runs on every served request: the photo types come from
/// a match (mime_guess's search of its table cost 1% of a hot-cache hit), and no type is
/// parsed (`first_raw`, not a `Mime`).
fn content_type_str(key: &str) -> &'static str {
    let ext = std::path::Path::new(key)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    for (e, t) in [
        ("jpg", "image/jpeg"),
        ("jpeg", "image/jpeg"),
        ("png", "image/png"),
        ("gif", "image/gif"),
        ("webp", "image/webp"),
    ] {
        if ext.eq_ignore_ascii_case(e) {
            return t;
        }
    }
    mime_guess::from_ext(ext)
        .first_raw()
        .unwrap_or("application/octet-stream")
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

    /// The fast path agrees with mime_guess's table, whatever the case of the extension.
    #[test]
    fn the_photo_fast_path_gives_what_the_table_gives() {
        for key in [
            "a.jpg",
            "a.JPG",
            "a.jpeg",
            "b/a.JpEg",
            "a.png",
            "a.PNG",
            "a.gif",
            "a.webp",
            "a.WEBP",
            "a.avif",
            "a.heic",
            "a.svg",
            "a.txt",
            "noext",
            "a.",
            ".jpg",
            "a.jpgx",
            "a.tar.gz",
            "dir.jpg/file",
            "a.xlsm",
            "a.psc1",
            "a.docm",
        ] {
            let table = mime_guess::from_path(key)
                .first_or_octet_stream()
                .essence_str()
                .to_string();
            assert_eq!(content_type(key), table, "{key}");
        }
    }

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
