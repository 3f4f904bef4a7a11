//! Bounds on client connections, shared by the node's front and the router: a cap on how
//! many are open (accepting waits at the cap, the kernel's backlog holds the rest), and a
//! write-progress timeout like nginx's `send_timeout`, so a client that stops reading
//! cannot pin a descriptor and the response buffers forever.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

/// At most `max` connections at once; a permit is held for a connection's whole life.
#[derive(Clone, Debug)]
pub struct Cap(Arc<Semaphore>);

impl Cap {
    pub fn new(max: usize) -> Cap {
        Cap(Arc::new(Semaphore::new(
            max.clamp(1, Semaphore::MAX_PERMITS),
        )))
    }

    /// Waits for a free slot. Called before `accept`, so at the cap new connections wait
    /// in the listen backlog instead of being accepted and failed.
    pub async fn slot(&self) -> OwnedSemaphorePermit {
        match self.0.clone().acquire_owned().await {
            Ok(p) => p,
            // Never closed: the semaphore lives as long as every clone of the cap.
            Err(_) => unreachable!("the connection cap's semaphore is never closed"),
        }
    }
}

/// A stream whose writes fail with `TimedOut` once a write (or flush) has made no progress
/// for `timeout`: the time runs between two successful writes, not over the whole response,
/// so a slow but reading client is never cut off.
#[derive(Debug)]
pub struct SendTimeout<S> {
    inner: S,
    timeout: Duration,
    /// Armed when a write could not go on; any progress disarms it.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> SendTimeout<S> {
    pub fn new(inner: S, timeout: Duration) -> SendTimeout<S> {
        SendTimeout {
            inner,
            timeout,
            stalled: None,
        }
    }

    fn progress<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let sleep = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("client read nothing for {timeout:?}"),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progress(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_reader_that_stops_fails_the_writer_after_the_timeout() {
        let timeout = Duration::from_millis(300);
        let (a, b) = tokio::io::duplex(1024);
        let mut w = SendTimeout::new(a, timeout);
        let chunk = vec![7u8; 1024];
        // The pipe takes one chunk; the next write waits for a reader that never comes.
        w.write_all(&chunk).await.expect("first chunk fits");
        let started = std::time::Instant::now();
        let err = w.write_all(&chunk).await.expect_err("stalled");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= timeout);
        drop(b);
    }

    #[tokio::test]
    async fn a_slow_reader_that_keeps_reading_is_never_cut_off() {
        // Each pause is far shorter than the timeout; all of them together far longer.
        let timeout = Duration::from_secs(2);
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = SendTimeout::new(a, timeout);
        let reader = tokio::spawn(async move {
            let mut got = 0usize;
            let mut buf = [0u8; 1024];
            while got < 300 * 1024 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                got += b.read(&mut buf).await.expect("read");
            }
            got
        });
        let chunk = vec![7u8; 1024];
        for _ in 0..300 {
            w.write_all(&chunk).await.expect("slow but moving");
        }
        assert_eq!(reader.await.expect("reader"), 300 * 1024);
    }

    #[tokio::test]
    async fn the_cap_holds_slots_until_their_permits_drop() {
        let cap = Cap::new(2);
        let a = cap.slot().await;
        let _b = cap.slot().await;
        let third = tokio::spawn({
            let cap = cap.clone();
            async move { cap.slot().await }
        });
        tokio::task::yield_now().await;
        assert!(!third.is_finished());
        drop(a);
        let _c = tokio::time::timeout(Duration::from_secs(10), third)
            .await
            .expect("a slot freed")
            .expect("task");
    }
}
