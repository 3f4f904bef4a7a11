//! Proxying one request: hop-by-hop headers out, forwarding headers in, the ranked
//! backends tried in order with one retry of a replayable request, and the router's own
//! plain-text answers.

use super::*;

impl Router {
    /// Sends one request to the first backend of its ranking that answers.
    pub(super) async fn proxy(
        &self,
        req: Request<Incoming>,
        peer: IpAddr,
        lanes: &Lanes,
    ) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        host_from_target(&mut parts.headers, &parts.uri);
        let key = self.key_for(&parts.headers, &parts.uri);
        let order = rank_indices(&self.names, &key);
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        add_forwarded(&mut headers, peer);
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        // Only a request whose whole body is known (none) can be sent twice; GET and HEAD are
        // safe to repeat, and nothing has reached the client yet when we retry. These are
        // also what the hand-written backend client takes (`upstream`).
        let replayable = matches!(parts.method, Method::GET | Method::HEAD) && body.is_end_stream();
        let mut body = Some(body);
        let mut attempts = 0;
        // With every backend believed down, the belief is what is most likely wrong (a
        // probe lost, a node back before its next probe): try them in rank order anyway
        // rather than answer 502 without asking anyone.
        let any_up = order.iter().any(|&i| self.backends[i].is_healthy());
        let order: Vec<usize> = order
            .into_iter()
            .filter(|&i| !any_up || self.backends[i].is_healthy())
            .collect();
        let order = self.bounded(order);
        for i in order {
            let b = &self.backends[i];
            attempts += 1;
            // Counted from before the send, so concurrent placements see it at once; the
            // guard goes down with a failed attempt, or rides in the response body.
            let guard = load::InFlight::new(&b.in_flight);
            let sent = if replayable {
                let send = upstream::send(
                    &lanes.pool,
                    i,
                    b.authority.as_str(),
                    CONNECT_TIMEOUT,
                    &parts.method,
                    path,
                    &headers,
                );
                match tokio::time::timeout(RESPONSE_TIMEOUT, send).await {
                    Ok(Ok(resp)) => Ok(Ok(counted(resp, guard, self.body_stall))),
                    Ok(Err(e)) => Ok(Err((e.is_connect(), e.to_string()))),
                    Err(elapsed) => Err(elapsed),
                }
            } else {
                let Some(incoming) = body.take() else { break };
                let out = match upstream_request(
                    b,
                    &parts.method,
                    path,
                    &headers,
                    incoming.map_err(BoxError::from).boxed_unsync(),
                ) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(backend = %b.name, error = %e, "cannot build the upstream request");
                        return text(StatusCode::BAD_REQUEST, "bad request\n");
                    }
                };
                match tokio::time::timeout(RESPONSE_TIMEOUT, lanes.client.request(out)).await {
                    Ok(Ok(resp)) => Ok(Ok(counted(resp, guard, self.body_stall))),
                    Ok(Err(e)) => Ok(Err((e.is_connect(), e.to_string()))),
                    Err(elapsed) => Err(elapsed),
                }
            };
            match sent {
                Ok(Ok(resp)) => return resp,
                Ok(Err((connect, error))) => {
                    let now = std::time::Instant::now();
                    if connect && b.update(|h| h.connect_failed(now)) {
                        tracing::warn!(backend = %b.name, %error, "backend down: connect failed");
                    } else {
                        tracing::warn!(backend = %b.name, %error, "proxying failed");
                    }
                    if !replayable || attempts >= 2 {
                        break;
                    }
                    // A non-connect error (a pooled connection that died under us) leaves
                    // the backend up, so skip it explicitly: the retry goes to the next one.
                }
                Err(_) => {
                    tracing::warn!(backend = %b.name, "no response headers within {RESPONSE_TIMEOUT:?}");
                    return text(StatusCode::GATEWAY_TIMEOUT, "gateway timeout\n");
                }
            }
        }
        if attempts == 0 {
            text(StatusCode::BAD_GATEWAY, "no healthy backend\n")
        } else {
            text(StatusCode::BAD_GATEWAY, "backend unreachable\n")
        }
    }
}

/// A request in absolute form (`GET http://site.example/x`) names its site in the target,
/// which wins over any Host it carries (RFC 9112 3.2.2): the node and the hash both see
/// that one.
pub(super) fn host_from_target(headers: &mut HeaderMap, uri: &Uri) {
    let Some(authority) = uri.authority() else {
        return;
    };
    // Userinfo is never passed on.
    let host = authority.as_str().rsplit('@').next().unwrap_or("");
    if let Ok(v) = HeaderValue::from_str(host) {
        headers.insert(header::HOST, v);
    }
}

/// A backend's response with the hop-by-hop headers out, and the in-flight guard and the
/// body's stall deadline riding in its body.
fn counted<B>(resp: Response<B>, guard: load::InFlight, stall: Duration) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (mut rp, rb) = resp.into_parts();
    strip_hop_by_hop(&mut rp.headers);
    Response::from_parts(rp, load::Counted::new(rb, guard, stall).boxed_unsync())
}

impl Router {
    /// `order` (healthy candidates, best first) with the backend that takes the request
    /// first: the first one below capacity (see `load`). The rest keep their rank order,
    /// for the retry. Counts a spill on each backend passed over.
    fn bounded(&self, mut order: Vec<usize>) -> Vec<usize> {
        let loads: Vec<usize> = order.iter().map(|&i| self.backends[i].load()).collect();
        let total = loads.iter().sum();
        let cap = load::capacity(self.balance_factor, total, order.len());
        let chosen = load::pick(&loads, cap);
        if chosen > 0 {
            for &i in &order[..chosen] {
                self.backends[i].spills.inc();
            }
            tracing::debug!(
                from = %self.backends[order[0]].name,
                to = %self.backends[order[chosen]].name,
                in_flight = loads[0],
                capacity = cap.unwrap_or(0),
                "backend at capacity: request spilled to the next-ranked backend"
            );
            let i = order.remove(chosen);
            order.insert(0, i);
        }
        order
    }
}

pub(super) fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A short plain-text answer from the router itself (never cached: it describes a moment).
pub(super) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if status != StatusCode::OK {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

fn upstream_request(
    b: &Backend,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Request<Body>, http::Error> {
    let uri = Uri::builder()
        .scheme("http")
        .authority(b.authority.clone())
        .path_and_query(path_and_query)
        .build()?;
    let mut req = Request::builder()
        .method(method.clone())
        .uri(uri)
        .body(body)?;
    // The client's Host goes through unchanged: the nodes see the site that was asked for.
    *req.headers_mut() = headers.clone();
    Ok(req)
}

/// Removes the headers that describe one connection (RFC 9110 7.6.1), including any the
/// Connection header names: they must not leak onto our connection to the other side.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names instead of a lookup for each. Any
    // name the Connection header lists needs a Connection header, which is in the list.
    if !headers.keys().any(|n| is_hop_by_hop(n.as_str())) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        // The Host routes the request; "Connection: host" must not take it away.
        if n != header::HOST {
            headers.remove(n);
        }
    }
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(n);
    }
    headers.remove("keep-alive");
    // SECURITY: only a node may mark a request as another node's (it restricts the answer
    // to the spool); a client's own marker is dropped at the front.
    headers.remove("x-ferry-peer");
    headers.remove("proxy-connection");
}

/// The names `strip_hop_by_hop` always removes (lowercase, as HeaderName keeps them).
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "keep-alive"
            | "x-ferry-peer"
            | "proxy-connection"
    )
}

/// Appends the client's address to X-Forwarded-For and sets X-Forwarded-Proto.
pub fn add_forwarded(headers: &mut HeaderMap, client: IpAddr) {
    // Earlier hops' values are kept (joined into one line); a value that is not visible
    // ASCII cannot be passed on faithfully, so it is dropped rather than mangled.
    let prior: Vec<String> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let value = if prior.is_empty() {
        client.to_string()
    } else {
        format!("{}, {client}", prior.join(", "))
    };
    let value = HeaderValue::from_str(&value).unwrap_or_else(|_| {
        HeaderValue::from_str(&client.to_string()).unwrap_or(HeaderValue::from_static("unknown"))
    });
    headers.insert("x-forwarded-for", value);
    // SECURITY: set, not appended: a client must not be able to claim it came over https.
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
}
