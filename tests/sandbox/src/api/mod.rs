//! The HTTP API server: one handler that parses the Kubernetes path grammar
//! and dispatches to discovery, the REST verbs, watch, and the streaming pod
//! subresources (log, exec, portforward) that reach the node.

pub mod admission;
pub mod discovery;
mod handlers;
pub mod patch;
pub mod path;
mod protobuf;
pub mod registry;
pub mod resources;
pub mod selectors;
pub mod status;
mod stream;
mod table;
pub mod tls;
mod watch;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::handlers::{Query, json_response};
use self::path::Route;
use self::registry::Registry;
use self::status::ApiError;
use crate::node::Node;

/// Shared state of the server.
pub struct App {
    pub registry: Arc<Registry>,
    /// Set once the kubelet runs; pod streams answer "not ready" until then.
    pub node: OnceLock<Arc<dyn Node>>,
    /// `host:port` the server listens on, for discovery.
    pub address: String,
    /// Bumped (on SIGUSR1) to close every open pods/portforward stream, as a
    /// real API server or load balancer drops a long-lived connection; each
    /// stream watches it from its start.
    pub cut_streams: tokio::sync::watch::Sender<u64>,
    /// The service-account tokens issued, which the secure port accepts.
    pub tokens: Arc<tls::Tokens>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("address", &self.address).finish_non_exhaustive()
    }
}

const MAX_BODY: usize = 32 * 1024 * 1024;

fn query_of(req: &Request) -> Query {
    axum::extract::Query::<Query>::try_from_uri(req.uri()).map(|q| q.0).unwrap_or_default()
}

async fn handle(State(app): State<Arc<App>>, req: Request) -> Response {
    let started = std::time::Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let resp = dispatch(&app, req).await;
    tracing::debug!(%method, %path, status = resp.status().as_u16(), elapsed_us = started.elapsed().as_micros() as u64, "request");
    resp
}

async fn dispatch(app: &Arc<App>, req: Request) -> Response {
    let ok = |v: serde_json::Value| json_response(StatusCode::OK, &v);
    let Some(route) = path::parse(req.uri().path()) else {
        return ApiError::no_such_resource().into_response();
    };
    match route {
        Route::Version => ok(discovery::version()),
        Route::Health => (StatusCode::OK, "ok").into_response(),
        Route::CoreVersions => ok(discovery::core_versions(&app.address)),
        Route::Groups => ok(discovery::groups()),
        Route::Group(g) => ok(discovery::one_group(&g)),
        Route::ResourceList { group, version } => ok(discovery::resource_list(&group, &version)),
        Route::OpenApiRoot => ok(discovery::openapi_root()),
        Route::OpenApi { group, version } => ok(discovery::openapi_group_version(&group, &version)),
        Route::Object(t) => {
            let q = query_of(&req);
            if matches!(t.sub.as_deref(), Some("exec" | "portforward")) {
                return upgrade(app.clone(), t, q, req).await;
            }
            let (parts, body) = req.into_parts();
            let body = match axum::body::to_bytes(body, MAX_BODY).await {
                Ok(b) => b,
                Err(e) => {
                    return ApiError::bad_request(format!("reading the request body: {e}")).into_response();
                }
            };
            handlers::object(app, t, q, parts.method, parts.headers, body)
                .await
                .unwrap_or_else(IntoResponse::into_response)
        }
    }
}

/// exec and portforward: websocket upgrades handed to the node's streams.
async fn upgrade(app: Arc<App>, t: path::Target, q: Query, req: Request) -> Response {
    // `command` repeats, so it is read from the raw pairs.
    let pairs = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(req.uri()).map(|q| q.0).unwrap_or_default();
    let command: Vec<String> = pairs.into_iter().filter(|(k, _)| k == "command").map(|(_, v)| v).collect();
    let (mut parts, _) = req.into_parts();
    if parts.method != Method::GET && parts.method != Method::POST {
        return ApiError::method_not_allowed(parts.method.as_str(), t.res.plural).into_response();
    }
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws,
        Err(_) => {
            return ApiError::bad_request(
                "this sandbox serves exec and portforward over websockets (v4/v5.channel.k8s.io) only; SPDY is not supported",
            )
            .into_response();
        }
    };
    match t.sub.as_deref() {
        Some("exec") => stream::exec::serve(app, t, q, command, ws).await,
        _ => stream::portforward::serve(app, t, q, ws).await,
    }
    .unwrap_or_else(IntoResponse::into_response)
}

pub fn router(app: Arc<App>) -> Router {
    Router::new().fallback(handle).with_state(app)
}

/// Binds the listener (port 0 picks one) before serving, so the caller
/// learns the address first.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `shutdown` fires.
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: CancellationToken) -> std::io::Result<()> {
    // Nagle off, as Go's net/http has it for kube-apiserver.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(app)).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

/// Serves the secure port (pods' in-cluster clients) until `shutdown`
/// fires: the same API, for the tokens the server issued only.
pub async fn serve_secure(
    listener: tls::TlsListener,
    app: Arc<App>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let authenticated =
        router(app.clone()).layer(axum::middleware::from_fn_with_state(app.tokens.clone(), tls::authenticate));
    axum::serve(listener, authenticated).with_graceful_shutdown(shutdown.cancelled_owned()).await
}
