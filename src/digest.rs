//! SHA-256 of whole files, the one way every part of ferry hashes a copy: the uploader's
//! archive checks, the hot cache's corruption check and the serve path's archive fallback.

use std::fs::File;
use std::io;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Hashes an open file from its start with `pread` (the file's offset is not shared, so a
/// reader of the same descriptor is not disturbed), giving up as soon as `stop` says so.
/// `size_hint` sizes the buffer: a small file costs a small buffer. Returns the bytes read
/// and the lowercase hex digest, or `None` when stopped.
pub fn sha256_fd(
    file: &File,
    size_hint: u64,
    stop: &dyn Fn() -> bool,
) -> io::Result<Option<(u64, String)>> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; (size_hint as usize).clamp(4096, 1 << 20)];
    let mut off = 0u64;
    loop {
        if stop() {
            return Ok(None);
        }
        let n = std::os::unix::fs::FileExt::read_at(file, &mut buf, off)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(Some((off, hex::encode(h.finalize()))))
}

/// Opens `path` and hashes it whole: the bytes read and the hex digest.
pub fn sha256_path(path: &Path) -> io::Result<(u64, String)> {
    let f = File::open(path)?;
    let size = f.metadata().map_or(1 << 20, |m| m.len());
    Ok(sha256_fd(&f, size, &|| false)?.unwrap_or_default())
}
