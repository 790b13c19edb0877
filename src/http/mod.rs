//! The HTTP/1.1 server: accept loop, per-request bookkeeping, graceful shutdown.

pub mod body;
pub mod linger;
pub mod per_client;
pub mod query;
pub mod response;
pub mod router;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::app::App;
use crate::telemetry;

pub use response::Body;

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Every route (no `admin_listen` configured).
    All,
    /// `/v1` and the operations routes; `/admin` is served elsewhere.
    Public,
    /// `/admin` and the operations routes, on `admin_listen`.
    Admin,
}

impl Surface {
    /// Whether a listener serving this surface answers `path` at all (others are `404`,
    /// as if the route did not exist there).
    pub fn serves(self, path: &str) -> bool {
        let admin = path == "/admin" || path.starts_with("/admin/");
        match self {
            Surface::All => true,
            Surface::Public => !admin,
            Surface::Admin => admin || matches!(path, "/healthz" | "/readyz" | "/metrics"),
        }
    }
}

/// What every handler knows about the request besides the request itself.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub request_id: String,
    pub peer: SocketAddr,
}

impl Ctx {
    /// The client's address: the TCP peer, or the last address of `X-Forwarded-For` not
    /// added by a trusted proxy when the peer is one (only those may speak for a client).
    pub fn client_ip(&self, app: &App, headers: &hyper::HeaderMap) -> std::net::IpAddr {
        // On a dual-stack listener an IPv4 client arrives as ::ffff:a.b.c.d; allow-lists
        // and proxies are written as IPv4.
        let peer = self.peer.ip().to_canonical();
        let trusted = |ip: &std::net::IpAddr| app.settings.trusted_proxies.iter().any(|n| n.contains(ip));
        if !trusted(&peer) {
            return peer;
        }
        let mut client = peer;
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        for hop in hops.iter().rev() {
            match hop.parse::<std::net::IpAddr>().map(|ip| ip.to_canonical()) {
                Ok(ip) => {
                    client = ip;
                    if !trusted(&ip) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        client
    }
}

/// Serves `surface`'s routes until `shutdown` resolves, then stops accepting and gives
/// in-flight requests up to `http.shutdown_grace_ms` to finish.
pub async fn serve(listener: TcpListener, app: Arc<App>, surface: Surface, shutdown: impl Future<Output = ()>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .keep_alive(true)
        // Slowloris on headers: the connection is dropped when a request's headers take
        // longer than this. Slow bodies are bounded per route in `body`.
        .header_read_timeout(Duration::from_millis(app.config.http.header_read_timeout_ms))
        // What a connection may buffer: past it hyper itself answers a bare 431 and closes.
        // Well above `header_max_bytes`, so that below it the answer is ours (JSON, with a
        // request id); the default (~400 KiB) let every idle connection hold that much.
        .max_buf_size(head_buffer_max(app.config.http.header_max_bytes));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // A semaphore rather than a counter: the permit travels with the connection task and
    // is released however that task ends.
    let connections = Arc::new(Semaphore::new(app.config.http.connections_max));
    let linger = linger::Bounds {
        time: Duration::from_millis(app.config.http.linger_ms),
        bytes: app.config.http.linger_max_bytes,
    };
    let per_client = per_client::PerClient::new(
        app.config.http.connections_per_client_max,
        app.settings.trusted_proxies.clone(),
    );
    tokio::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning on the error.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics::counter!("cardgate_http_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let Some(client_slot) = per_client.enter(peer.ip()) else {
            metrics::counter!("cardgate_http_client_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = service_fn(move |req| handle(app.clone(), surface, peer, req));
        let stream = linger::Linger::new(stream, linger);
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop((permit, client_slot));
        });
    }

    drop(listener);
    let grace = Duration::from_millis(app.config.http.shutdown_grace_ms);
    tracing::info!("shutting down: no longer accepting, draining in-flight requests");
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "in-flight requests did not finish within the grace period"
        );
    }
}

async fn handle(
    app: Arc<App>,
    surface: Surface,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let _in_flight = telemetry::InFlight::enter();
    let ctx = Ctx {
        request_id: response::new_request_id(),
        peer,
    };
    let method = telemetry::method_label(req.method());
    let max = app.config.http.header_max_bytes;
    let (route, result) = if head_len(&req) > max {
        ("unmatched", Err(crate::error::ApiError::HeadersTooLarge { max }))
    } else {
        router::dispatch(&app, &ctx, surface, req).await
    };
    let mut resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            if let crate::error::ApiError::Internal(cause) = &e {
                tracing::error!(request_id = %ctx.request_id, route, error = format!("{cause:#}"), "request failed");
            }
            response::error(&e, &ctx.request_id)
        }
    };
    response::set_request_id(&mut resp, &ctx.request_id);
    telemetry::record_request(route, method, resp.status().as_u16(), started.elapsed());
    Ok(resp)
}

fn head_buffer_max(header_max_bytes: usize) -> usize {
    header_max_bytes.saturating_mul(4).max(64 * 1024)
}

/// The request line and header fields as they came on the wire, give or take the
/// version and line ends.
fn head_len(req: &Request<Incoming>) -> usize {
    let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let fields: usize = req.headers().iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    req.method().as_str().len() + target + fields
}
