//! Read leases (`F_SETLEASE`, `F_RDLCK`): the kernel's word on whether anyone holds a spool
//! file open for writing, and its notice when someone opens it for writing while we look.
//!
//! A read lease is refused (`EAGAIN`) while any process has the file open for writing
//! (including a writable shared mapping), and is broken when someone opens the file for
//! writing or truncates it. The breaker's `open` then waits until we let go, up to
//! `/proc/sys/fs/lease-break-time` (45 s by default): every lease here is short, and whoever
//! holds one polls [`Lease::broken`] and lets go at once.
//!
//! A break is announced by a signal, SIGIO unless `F_SETSIG` says otherwise, and SIGIO's
//! default action ends the process. [`init`] ignores SIGIO before the first lease, so a web
//! application opening a file ferry is looking at can never kill ferry.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

/// Why no lease could be had: not a sign of a writer, but of a mount or a permission that
/// does not allow leases. The caller falls back to the long quiet time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    pub errno: i32,
    pub reason: String,
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// What asking for a read lease told us.
#[derive(Debug)]
pub enum Probe<'a> {
    /// Granted: nobody has the file open for writing. The lease is held until dropped.
    Held(Lease<'a>),
    /// Refused because someone has the file open for writing.
    Busy,
    /// Leases cannot be had on this file (see [`Unavailable`]).
    Unavailable(Unavailable),
}

/// A read lease on an open file, released (`F_UNLCK`) when dropped; it borrows the file, so
/// it cannot outlive the descriptor it is on.
#[derive(Debug)]
pub struct Lease<'a> {
    file: &'a File,
}

static INIT: Once = Once::new();
static WARNED: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

/// True the first time in this process that leases were unavailable for this `errno`: the
/// log says so once per reason, not once per file.
pub fn warn_once(errno: i32) -> bool {
    let mut w = match WARNED.lock() {
        Ok(w) => w,
        Err(p) => p.into_inner(),
    };
    if w.contains(&errno) {
        return false;
    }
    w.push(errno);
    true
}
static SIGNALS_READY: AtomicBool = AtomicBool::new(false);

/// Makes lease-break signals harmless: SIGIO is ignored (breaks are noticed by polling
/// `F_GETLEASE`, see [`Lease::broken`]). Idempotent; called before every lease.
pub fn init() {
    INIT.call_once(|| {
        // SAFETY: installing SIG_IGN for SIGIO has no handler code to be unsafe in; nothing
        // in ferry or its libraries uses SIGIO.
        let prev = unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };
        SIGNALS_READY.store(prev != libc::SIG_ERR, Ordering::SeqCst);
    });
}

/// Asks for a read lease on `file`, which must be open read-only.
pub fn take(file: &File) -> Probe<'_> {
    init();
    if !SIGNALS_READY.load(Ordering::SeqCst) {
        // Without SIGIO ignored a lease break would kill us: never take one.
        return Probe::Unavailable(Unavailable {
            errno: 0,
            reason: "cannot ignore SIGIO, so leases are not used".into(),
        });
    }
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor owned by `file`, alive for this call.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) };
    if rc == 0 {
        return Probe::Held(Lease { file });
    }
    let err = io::Error::last_os_error();
    let errno = err.raw_os_error().unwrap_or(0);
    match errno {
        libc::EAGAIN => Probe::Busy,
        libc::EACCES | libc::EPERM => Probe::Unavailable(Unavailable {
            errno,
            reason: format!(
                "no read lease ({err}): the file belongs to another user and ferry lacks \
                 CAP_LEASE"
            ),
        }),
        _ => Probe::Unavailable(Unavailable {
            errno,
            reason: format!("no read lease ({err}): the filesystem does not support leases"),
        }),
    }
}

impl Lease<'_> {
    /// True once someone opened the file for writing or truncated it (the kernel is
    /// waiting for us to let go), or the lease is otherwise gone.
    pub fn broken(&self) -> bool {
        // SAFETY: fcntl on the borrowed file's live descriptor.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_GETLEASE) };
        rc != libc::F_RDLCK
    }

    /// Lets go now (also done on drop).
    pub fn release(self) {}
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        // SAFETY: fcntl on the borrowed file's live descriptor. Failure leaves the lease to
        // the descriptor's close.
        unsafe {
            libc::fcntl(self.file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK);
        }
    }
}

/// Opens `path` read-only without following a symlink, for a lease.
pub fn open_for_lease(path: &std::path::Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

/// One look: can a read lease be had on `path` right now? Taken and released at once.
pub fn probe_path(path: &std::path::Path) -> io::Result<ProbeResult> {
    let f = open_for_lease(path)?;
    let r = match take(&f) {
        Probe::Held(l) => {
            drop(l);
            ProbeResult::Free
        }
        Probe::Busy => ProbeResult::Busy,
        Probe::Unavailable(u) => ProbeResult::Unavailable(u),
    };
    Ok(r)
}

/// [`probe_path`]'s answer, with no lease left held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    Free,
    Busy,
    Unavailable(Unavailable),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn refused_while_a_writer_holds_the_file() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        let mut w = File::create(&p).unwrap();
        w.write_all(b"half").unwrap();
        assert_eq!(probe_path(&p).unwrap(), ProbeResult::Busy);
        drop(w);
        assert_eq!(probe_path(&p).unwrap(), ProbeResult::Free);
    }

    #[test]
    fn a_writer_opening_the_file_breaks_the_lease_and_does_not_kill_us() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        std::fs::write(&p, b"whole").unwrap();
        let f = open_for_lease(&p).unwrap();
        let Probe::Held(lease) = take(&f) else {
            panic!("no lease on a file nobody writes");
        };
        assert!(!lease.broken());
        let p2 = p.clone();
        let writer = std::thread::spawn(move || {
            // Blocks in the kernel until the lease is released.
            let started = std::time::Instant::now();
            let _w = std::fs::OpenOptions::new().append(true).open(&p2).unwrap();
            started.elapsed()
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !lease.broken() {
            assert!(
                std::time::Instant::now() < deadline,
                "the break was never seen"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        lease.release();
        let waited = writer.join().unwrap();
        assert!(
            waited < std::time::Duration::from_secs(10),
            "writer waited {waited:?}"
        );
    }
}
