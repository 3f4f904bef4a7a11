//! Client connections, shared by the node's front and the router: the thread-per-core
//! accept loop that hands each connection to one thread for its whole life, a cap on how
//! many are open (accepting waits at the cap, the kernel's backlog holds the rest), and a
//! write-progress timeout like nginx's `send_timeout`, so a client that stops reading
//! cannot pin a descriptor and the response buffers forever.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

/// One accepted connection, handed to the front thread that serves it.
#[derive(Debug)]
pub struct Handed {
    /// Nonblocking, with TCP_NODELAY; not yet registered with any runtime.
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    /// Its slot under the cap: hold it for the connection's life.
    pub slot: OwnedSemaphorePermit,
    /// Counts the connection on its thread until dropped: hold it for the connection's life.
    pub open: Open,
}

impl Handed {
    /// The socket, registered with the calling thread's runtime.
    pub fn into_tokio(self) -> io::Result<(tokio::net::TcpStream, Held)> {
        let s = tokio::net::TcpStream::from_std(self.stream)?;
        Ok((
            s,
            Held {
                _slot: self.slot,
                _open: self.open,
            },
        ))
    }
}

/// A connection's slot and count, released together when it ends.
#[derive(Debug)]
pub struct Held {
    _slot: OwnedSemaphorePermit,
    _open: Open,
}

/// One front thread's count of open connections; one unit per `Open`.
#[derive(Debug)]
pub struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The front threads `http.workers = 0` means on a host with `cores`: half of them, at
/// least one. ferry shares its host with the application whose uploads it serves, its own
/// sync and the kernel's network work, and a front thread that has to wait for a core
/// behind its sibling holds every request of its connections meanwhile. Measured on two
/// cores with the client beside it (README, Performance): one thread against two gave
/// 0.002 context switches per request against 0.3, and a lower p99 for 302s, 4 KiB and
/// 100 KiB bodies alike.
pub fn auto_front_threads(cores: usize) -> usize {
    (cores / 2).max(1)
}

/// Serves `listener` on `workers` threads (0 = [`auto_front_threads`]) until `shutdown`.
///
/// Each thread runs a single-threaded runtime and `thread(connections)` on it, which owns
/// every connection handed to it: a request is parsed, answered and written on one thread,
/// with no wake-up of another thread and no work-stealing queue in between (under the
/// multi-threaded runtime those cost a futex call every few requests). This task accepts
/// and hands each connection to the thread with the fewest open ones. Threads accepting
/// from one shared socket took connections in bursts (the first awake took a whole burst),
/// and SO_REUSEPORT's port hash ignores load and lets any process of the same user join
/// the port unnoticed. `thread` returns once its channel closes and its connections have
/// drained; this returns once every thread has.
pub async fn thread_per_core<F, Fut>(
    name: &str,
    listener: tokio::net::TcpListener,
    workers: usize,
    cap: Cap,
    shutdown: CancellationToken,
    thread: F,
) -> anyhow::Result<()>
where
    F: Fn(UnboundedReceiver<Handed>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let workers = match workers {
        0 => auto_front_threads(std::thread::available_parallelism().map_or(1, |n| n.get())),
        n => n,
    };
    tracing::info!(name, threads = workers, "front threads");
    // Accepted as plain sockets: a connection is registered once, with the epoll of the
    // thread that serves it.
    // SAFETY: the AsyncFd owns the std listener, so its descriptor stays open and the same
    // for the AsyncFd's whole life.
    let listener = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            listener.into_std()?,
            tokio::io::Interest::READABLE,
        )
    }
    .map_err(|e| anyhow::anyhow!("registering the listener: {e}"))?;
    let mut threads: Vec<(UnboundedSender<Handed>, Arc<AtomicUsize>)> = Vec::new();
    let mut ended = Vec::new();
    for i in 0..workers {
        let (tx, rx) = unbounded_channel();
        let (end_tx, end_rx) = tokio::sync::oneshot::channel();
        let thread = thread.clone();
        let stop = shutdown.clone();
        // Each runtime's share of the blocking pool the multi-threaded runtime had alone, so
        // a slow disk cannot make `workers` times as many threads.
        let blocking = (MAX_BLOCKING_THREADS / workers).max(8);
        std::thread::Builder::new()
            .name(format!("{name}-{i}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .max_blocking_threads(blocking)
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        // At once, not when a connection first lands on the missing thread.
                        stop.cancel();
                        let _ = end_tx.send(Err(anyhow::anyhow!(
                            "cannot start a front thread's runtime: {e}"
                        )));
                        return;
                    }
                };
                let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    rt.block_on(thread(rx))
                }));
                if served.is_err() {
                    stop.cancel();
                    let _ = end_tx.send(Err(anyhow::anyhow!("a front thread panicked")));
                    return;
                }
                let _ = end_tx.send(Ok(()));
                // The runtime lives until the process ends, as the multi-threaded one did:
                // tasks spawned on it outlive this thread's connections. A pooled S3 or
                // PostgreSQL connection opened by a request here carries the sync's uploads
                // too, and a cache fill started here feeds clients on other threads; dropping
                // the runtime now would cut them off mid-shutdown.
                rt.block_on(std::future::pending::<()>());
            })?;
        threads.push((tx, Arc::new(AtomicUsize::new(0))));
        ended.push(end_rx);
    }
    let mut failure = None;
    loop {
        // At the cap, wait here: new connections queue in the kernel's backlog rather than
        // being accepted with no descriptor or memory left to serve them.
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            s = cap.slot() => s,
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = accept(&listener) => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE/ENFILE: out of descriptors; back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some((tx, count)) = threads
            .iter()
            .min_by_key(|(_, count)| count.load(Ordering::Relaxed))
        else {
            break;
        };
        count.fetch_add(1, Ordering::Relaxed);
        let handed = Handed {
            stream,
            peer,
            slot,
            open: Open(count.clone()),
        };
        if tx.send(handed).is_err() {
            // A thread is gone (its runtime did not start, or it panicked): a node serving
            // on a fraction of its threads is worse than one that stops and is restarted.
            failure = Some(anyhow::anyhow!("{name}: a front thread stopped"));
            shutdown.cancel();
            break;
        }
    }
    drop(listener);
    // Closed channels tell each thread to drain and finish.
    drop(threads);
    for end in ended {
        let r = match end.await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => anyhow::anyhow!("{name}: {e}"),
            Err(_) => anyhow::anyhow!("{name}: a front thread ended without a word"),
        };
        failure.get_or_insert(r);
    }
    failure.map_or(Ok(()), Err)
}

/// tokio's default cap on a runtime's blocking threads, shared out among the front's.
const MAX_BLOCKING_THREADS: usize = 512;

/// Accepts one connection as a plain nonblocking socket with TCP_NODELAY.
async fn accept(
    listener: &tokio::io::unix::AsyncFd<std::net::TcpListener>,
) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        if let Ok(r) = ready.try_io(|l| l.get_ref().accept()) {
            let (stream, peer) = r?;
            stream.set_nonblocking(true)?;
            let _ = stream.set_nodelay(true);
            return Ok((stream, peer));
        }
    }
}

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

    #[test]
    fn http_workers_0_is_half_the_cores_and_at_least_one() {
        let got: Vec<usize> = [1, 2, 3, 4, 8, 64].map(auto_front_threads).to_vec();
        assert_eq!(got, [1, 1, 1, 2, 4, 32]);
    }

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

    /// Starts `thread_per_core` on a loopback port with `workers` threads running `thread`.
    async fn front<F, Fut>(
        workers: usize,
        thread: F,
    ) -> (
        SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    )
    where
        F: Fn(UnboundedReceiver<Handed>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let run = tokio::spawn(thread_per_core(
            "test-front",
            listener,
            workers,
            Cap::new(100),
            stop.clone(),
            thread,
        ));
        (addr, stop, run)
    }

    /// Stops the front and waits for it to finish without a failed thread.
    async fn stop_cleanly(
        stop: &CancellationToken,
        run: tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("stops within 10 s")
            .expect("task")
            .expect("no thread failed");
    }

    #[tokio::test]
    async fn each_connection_goes_to_the_thread_with_the_fewest_open() {
        let (seen_tx, mut seen) = unbounded_channel::<String>();
        let (addr, stop, run) = front(2, move |mut rx: UnboundedReceiver<Handed>| {
            let seen_tx = seen_tx.clone();
            async move {
                // Every connection stays open (and counted) until the channel closes.
                let mut open = Vec::new();
                while let Some(h) = rx.recv().await {
                    let name = std::thread::current().name().unwrap_or("?").to_string();
                    let _ = seen_tx.send(name);
                    open.push(h);
                }
            }
        })
        .await;
        let mut clients = Vec::new();
        let mut names = Vec::new();
        for _ in 0..6 {
            clients.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
            // One at a time, so each hand-off sees the counts of the ones before.
            let name = tokio::time::timeout(Duration::from_secs(10), seen.recv())
                .await
                .expect("handed within 10 s")
                .expect("a thread name");
            names.push(name);
        }
        let on = |t: &str| names.iter().filter(|n| *n == t).count();
        assert_eq!(
            (on("test-front-0"), on("test-front-1")),
            (3, 3),
            "{names:?}"
        );
        stop_cleanly(&stop, run).await;
        drop(clients);
    }

    #[tokio::test]
    async fn tasks_a_front_thread_spawned_outlive_its_drained_connections() {
        // As a pooled S3 connection opened by a request carries the sync's upload, or a
        // cache fill feeds a client on another thread, after shutdown drained this thread.
        let (done_tx, mut done) = unbounded_channel::<&'static str>();
        let (handed_tx, mut handed_rx) = unbounded_channel::<()>();
        let (addr, stop, run) = front(1, move |mut rx: UnboundedReceiver<Handed>| {
            let (done_tx, handed_tx) = (done_tx.clone(), handed_tx.clone());
            async move {
                while let Some(h) = rx.recv().await {
                    let done_tx = done_tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let _ = done_tx.send("finished");
                    });
                    let _ = handed_tx.send(());
                    drop(h);
                }
            }
        })
        .await;
        let _c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tokio::time::timeout(Duration::from_secs(10), handed_rx.recv())
            .await
            .expect("handed within 10 s");
        stop_cleanly(&stop, run).await;
        let got = tokio::time::timeout(Duration::from_secs(10), done.recv())
            .await
            .expect("within 10 s");
        assert_eq!(
            got,
            Some("finished"),
            "the task died with its thread's runtime"
        );
    }

    #[tokio::test]
    async fn a_front_thread_that_dies_stops_the_front_with_an_error() {
        let (addr, stop, run) = front(1, |mut rx: UnboundedReceiver<Handed>| async move {
            if rx.recv().await.is_some() {
                panic!("a bug in a connection's thread");
            }
        })
        .await;
        // The first connection kills the only thread; the next one finds it gone.
        let _a = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let res = tokio::time::timeout(Duration::from_secs(10), async {
            let mut clients = Vec::new();
            loop {
                if run.is_finished() {
                    return run.await;
                }
                if let Ok(c) = tokio::net::TcpStream::connect(addr).await {
                    clients.push(c);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the front stops within 10 s")
        .expect("task");
        let err = res.expect_err("a dead thread is an error");
        assert!(err.to_string().contains("front thread"), "{err}");
        assert!(
            stop.is_cancelled(),
            "the rest of the process is told to stop"
        );
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
