//! `?watch=1`: a chunked stream of JSON watch events, one per line, from a
//! resourceVersion (or from a synthetic list when none is given), with
//! `timeoutSeconds`, optional bookmarks, and 410 Expired for compacted history.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::App;
use super::handlers::{Filter, Query, accept};
use super::path::Target;
use super::resources::Resource;
use super::status::{ApiError, ApiResult};
use super::table;
use crate::store::{Event, StoreError};

const BOOKMARK_EVERY: Duration = Duration::from_secs(15);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

struct WatchSpec {
    res: &'static Resource,
    key: String,
    namespace: Option<String>,
    filter: Filter,
    as_table: bool,
    bookmarks: bool,
    timeout: Duration,
}

impl WatchSpec {
    fn wants(&self, e: &Event) -> bool {
        e.resource == self.key
            && self.namespace.as_deref().is_none_or(|ns| ns == e.namespace)
            && self.filter.matches(&e.object)
    }

    fn line(&self, kind: &str, object: &Value) -> Vec<u8> {
        let object = if self.as_table {
            table::table(self.res.kind, std::slice::from_ref(object), None)
        } else {
            object.clone()
        };
        let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
        line.push(b'\n');
        line
    }

    fn bookmark(&self, rv: u64) -> Vec<u8> {
        let obj = json!({"kind": self.res.kind, "apiVersion": self.res.api_version(), "metadata": {"resourceVersion": rv.to_string()}});
        let mut line = serde_json::to_vec(&json!({"type": "BOOKMARK", "object": obj})).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

fn expired_line(rv: u64) -> Vec<u8> {
    let mut line =
        serde_json::to_vec(&json!({"type": "ERROR", "object": ApiError::gone(rv).to_status()})).unwrap_or_default();
    line.push(b'\n');
    line
}

pub fn serve(app: &App, t: &Target, q: &Query, headers: &HeaderMap) -> ApiResult<Response> {
    let spec = WatchSpec {
        res: t.res,
        key: t.res.key(),
        namespace: t.namespace.clone().filter(|_| t.res.namespaced),
        filter: Filter::from_query(q)?,
        as_table: table::wants_table(accept(headers)),
        bookmarks: q.get("allowWatchBookmarks").is_some_and(|b| b == "true" || b == "1"),
        timeout: q.get("timeoutSeconds").and_then(|s| s.parse().ok()).map_or(DEFAULT_TIMEOUT, Duration::from_secs),
    };
    let since = match q.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(rv) => {
            Some(rv.parse::<u64>().map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}")))?)
        }
    };
    let store = app.registry.store.clone();
    let (tx, rx) = mpsc::channel::<Vec<u8>>(64);
    // Without a resourceVersion a watch starts with the current objects as ADDED.
    let (initial, from) = match since {
        Some(rv) => (Vec::new(), rv),
        None => {
            let (items, rv) = store.list(&spec.key, spec.namespace.as_deref());
            (items, rv)
        }
    };
    let sub = store.subscribe(Some(from));
    tokio::spawn(async move {
        let sub = match sub {
            Ok(s) => s,
            Err(StoreError::Gone(rv)) => {
                let _ = tx.send(expired_line(rv)).await;
                return;
            }
            Err(_) => return,
        };
        for obj in initial.iter().filter(|o| spec.filter.matches(o)) {
            if tx.send(spec.line("ADDED", obj)).await.is_err() {
                return;
            }
        }
        pump(spec, sub.replay, sub.live, tx, store).await;
    });
    let body = Body::from_stream(tokio_stream_of(rx));
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/json"), (header::TRANSFER_ENCODING, "chunked")], body)
        .into_response())
}

fn tokio_stream_of(rx: mpsc::Receiver<Vec<u8>>) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|line| (Ok(line), rx)) })
}

async fn pump(
    spec: WatchSpec,
    replay: Vec<Arc<Event>>,
    mut live: broadcast::Receiver<Arc<Event>>,
    tx: mpsc::Sender<Vec<u8>>,
    store: Arc<crate::store::Store>,
) {
    for e in replay.iter().filter(|e| spec.wants(e)) {
        if tx.send(spec.line(e.kind.as_str(), &e.object)).await.is_err() {
            return;
        }
    }
    let deadline = tokio::time::sleep(spec.timeout);
    tokio::pin!(deadline);
    let mut bookmarks = tokio::time::interval(BOOKMARK_EVERY);
    bookmarks.tick().await;
    loop {
        let (line, last) = tokio::select! {
            _ = &mut deadline => return,
            _ = tx.closed() => return,
            _ = bookmarks.tick(), if spec.bookmarks => (spec.bookmark(store.revision()), false),
            ev = live.recv() => match ev {
                Ok(e) if spec.wants(&e) => (spec.line(e.kind.as_str(), &e.object), false),
                Ok(_) => continue,
                // Too slow to keep up: the client must re-list, as after compaction.
                Err(broadcast::error::RecvError::Lagged(_)) => (expired_line(store.revision()), true),
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if tx.send(line).await.is_err() || last {
            return;
        }
    }
}
