//! Bounded loads: consistent hashing where a backend far above the average number of
//! requests in flight takes no new one, and the request goes to its Host's next-ranked
//! backend instead (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded
//! Loads"; HAProxy's `hash-balance-factor`).
//!
//! The rule, for one request, over the backends it may go to (the healthy ones; all of them
//! when none is believed healthy):
//!
//! ```text
//! capacity = ceil(balance_factor × (total_in_flight + 1) / nodes)
//! ```
//!
//! The `+ 1` is the request being placed, as in the paper and HAProxy. It goes to the first
//! backend of its ranking whose in-flight count is below `capacity`. Because `capacity` is
//! above the average whenever the factor is above 1, some backend always qualifies. The
//! counts are read without a lock, so two requests placed at the same instant can both see
//! the same backend below capacity: the bound is a little soft under races, never off by
//! more than the number of requests that arrive together.
//!
//! A request counts as in flight from just before it is sent to a backend until its
//! response body is finished or dropped (sent out, the client gone, or an error), through
//! [`InFlight`], a guard that the response body carries.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::{Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::*;
use crate::telemetry::BackendLabel;

/// The factor as an integer in ten-thousandths, so capacity is computed exactly (a float
/// 1.1 × 10 is 11.000000000000002, whose ceiling would be 12).
const SCALE: u64 = 10_000;

/// The most requests a backend may have in flight, counting the one being placed, when
/// `total` are in flight over `nodes` backends. `None` when `factor` is 0 (no bound).
pub fn capacity(factor: f64, total: usize, nodes: usize) -> Option<usize> {
    if factor <= 0.0 || nodes == 0 {
        return None;
    }
    let f = (factor * SCALE as f64).round() as u64;
    let num = (total as u64).saturating_add(1).saturating_mul(f);
    let den = SCALE.saturating_mul(nodes as u64);
    Some(usize::try_from(num.div_ceil(den)).unwrap_or(usize::MAX))
}

/// Which of `loads` (in-flight counts, in rank order) takes the request: the first below
/// `capacity`, else the first (cannot happen with a factor above 1, but a wrong guess must
/// still route).
pub fn pick(loads: &[usize], capacity: Option<usize>) -> usize {
    match capacity {
        None => 0,
        Some(cap) => loads.iter().position(|&l| l < cap).unwrap_or(0),
    }
}

/// The router's own per-backend metrics (the process-wide ones live in telemetry).
pub(super) struct LoadMetrics {
    pub(super) in_flight: Family<BackendLabel, Gauge>,
    pub(super) spills: Family<BackendLabel, Counter>,
    pub(super) registry: Registry,
}

impl LoadMetrics {
    pub(super) fn new() -> LoadMetrics {
        let in_flight = Family::<BackendLabel, Gauge>::default();
        let spills = Family::<BackendLabel, Counter>::default();
        let mut registry = Registry::with_prefix("ferry");
        registry.register(
            "router_backend_in_flight",
            "Requests the router has sent to this backend whose response is not yet \
             finished (headers awaited or body still being sent)",
            in_flight.clone(),
        );
        registry.register(
            "router_backend_spills",
            "Requests that ranked this backend first among the healthy ones but went to the \
             next-ranked one because this one was at capacity (router.balance_factor)",
            spills.clone(),
        );
        LoadMetrics {
            in_flight,
            spills,
            registry,
        }
    }

    /// The gauge and counter of one backend; clones share the values.
    pub(super) fn for_backend(&self, name: &str) -> (Gauge, Counter) {
        let label = BackendLabel {
            backend: name.to_string(),
        };
        (
            self.in_flight.get_or_create(&label).clone(),
            self.spills.get_or_create(&label).clone(),
        )
    }
}

/// One request in flight on one backend; the count goes down when this is dropped.
pub(super) struct InFlight(Gauge);

impl InFlight {
    pub(super) fn new(gauge: &Gauge) -> InFlight {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A backend's response body that holds its [`InFlight`] guard until the last frame (or an
/// error) is read, or until hyper drops it because the client went away; and that fails
/// when the backend sends nothing of it for `stall`. Without that deadline a backend that
/// stops mid-body would hold the client (and the in-flight count) for as long as the client
/// cares to wait: the head timeout ends at the head.
pub(super) struct Counted<B> {
    inner: B,
    guard: Option<InFlight>,
    stall: Duration,
    /// Armed the first time the body waits, so a body that is all there costs no timer.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the deadline was last set.
    moved: bool,
}

impl<B> Counted<B> {
    pub(super) fn new(inner: B, guard: InFlight, stall: Duration) -> Counted<B> {
        Counted {
            inner,
            guard: Some(guard),
            stall,
            deadline: None,
            moved: false,
        }
    }
}

impl<B> hyper::body::Body for Counted<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                let r = r.map(|f| f.map_err(Into::into));
                // Done as soon as the end is seen: hyper may keep the body value a little
                // longer.
                if matches!(r, None | Some(Err(_))) {
                    this.guard = None;
                    this.deadline = None;
                }
                this.moved = true;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let stall = this.stall;
                let deadline = match this.deadline.as_mut() {
                    Some(d) => {
                        if std::mem::take(&mut this.moved) {
                            d.as_mut().reset(tokio::time::Instant::now() + stall);
                        }
                        d
                    }
                    None => {
                        this.moved = false;
                        this.deadline.insert(Box::pin(tokio::time::sleep(stall)))
                    }
                };
                if deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.guard = None;
                this.deadline = None;
                tracing::warn!(
                    "a backend sent nothing of a response body for {stall:?}; the client's \
                     response is cut off"
                );
                Poll::Ready(Some(Err(format!(
                    "the backend sent nothing of the body for {stall:?}"
                )
                .into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_the_ceiling_of_factor_times_average_with_the_new_request() {
        // ceil(1.25 × 1 / 3) = 1: with nothing in flight every node takes one.
        assert_eq!(capacity(1.25, 0, 3), Some(1));
        // ceil(1.25 × 2 / 3) = 1
        assert_eq!(capacity(1.25, 1, 3), Some(1));
        // ceil(1.25 × 13 / 3) = ceil(5.42) = 6
        assert_eq!(capacity(1.25, 12, 3), Some(6));
        // Exact products stay exact: 1.25 × 12 / 3 = 5, and 1.1 × 10 / 1 = 11, not 12.
        assert_eq!(capacity(1.25, 11, 3), Some(5));
        assert_eq!(capacity(1.1, 9, 1), Some(11));
        assert_eq!(capacity(0.0, 100, 3), None);
        assert_eq!(capacity(1.25, 5, 0), None);
        assert_eq!(capacity(1.25, usize::MAX, 1).map(|c| c > 0), Some(true));
    }

    #[test]
    fn pick_takes_the_first_below_capacity_in_rank_order() {
        assert_eq!(pick(&[3, 0, 0], Some(3)), 1);
        assert_eq!(pick(&[2, 0, 0], Some(3)), 0);
        assert_eq!(pick(&[3, 3, 1], Some(3)), 2);
        assert_eq!(pick(&[9, 9], Some(3)), 0, "nobody below: the owner");
        assert_eq!(pick(&[100, 0], None), 0, "no bound: the owner");
    }

    #[test]
    fn with_a_factor_above_one_someone_always_has_room() {
        for nodes in 1..8usize {
            for total in 0..200usize {
                let cap = capacity(1.01, total, nodes).unwrap_or(0);
                // The least loaded node has at most the average, which is below capacity.
                assert!(
                    total / nodes < cap,
                    "{nodes} nodes, {total} in flight: {cap}"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_body_that_keeps_coming_outlives_the_stall_and_one_that_stops_does_not() {
        use http_body_util::BodyExt;
        // Five frames 120 ms apart: 600 ms in all, never 200 ms without one.
        let frames = |n: usize| {
            futures_util::stream::unfold(0usize, move |i| async move {
                if i == n {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(120)).await;
                Some((
                    Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"x"))),
                    i + 1,
                ))
            })
        };
        let g = Gauge::default();
        let stall = Duration::from_millis(200);
        let body = Counted::new(
            http_body_util::StreamBody::new(Box::pin(frames(5))),
            InFlight::new(&g),
            stall,
        );
        let got = body.collect().await.expect("a trickle is not a stall");
        assert_eq!(&got.to_bytes()[..], b"xxxxx");
        assert_eq!(g.get(), 0);

        // Two frames, then nothing.
        let stalled = futures_util::StreamExt::chain(
            frames(2),
            futures_util::stream::pending::<Result<Frame<Bytes>, BoxError>>(),
        );
        let mut body = Counted::new(
            http_body_util::StreamBody::new(Box::pin(stalled)),
            InFlight::new(&g),
            stall,
        );
        for _ in 0..2 {
            let f = body.frame().await.expect("a frame").expect("data");
            assert!(f.is_data());
        }
        assert_eq!(g.get(), 1);
        let started = std::time::Instant::now();
        let end = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the stall ends it");
        assert!(matches!(end, Some(Err(_))), "{end:?}");
        assert!(started.elapsed() >= stall);
        assert_eq!(g.get(), 0, "the guard went with the error");
    }

    #[test]
    fn the_guard_counts_down_once() {
        let g = Gauge::default();
        let a = InFlight::new(&g);
        let b = InFlight::new(&g);
        assert_eq!(g.get(), 2);
        drop(a);
        assert_eq!(g.get(), 1);
        drop(b);
        assert_eq!(g.get(), 0);
    }
}
