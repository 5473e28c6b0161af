//! `pods/log`: the container's output as text, followed when asked.

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::super::App;
use super::super::handlers::Query;
use super::super::path::Target;
use super::super::status::ApiResult;
use super::{node_error, resolve};
use crate::node::LogOptions;

fn flag(q: &Query, key: &str) -> bool {
    q.get(key).is_some_and(|v| v == "true" || v == "1")
}

pub async fn serve(app: &App, t: &Target, q: &Query) -> ApiResult<Response> {
    let target = resolve(app, t, q)?;
    let opts = LogOptions {
        follow: flag(q, "follow"),
        previous: flag(q, "previous"),
        tail_lines: q.get("tailLines").and_then(|n| n.parse().ok()),
        timestamps: flag(q, "timestamps"),
    };
    let stream = target.node.logs(&target.pod, &target.container, opts).await.map_err(node_error)?;
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], Body::from_stream(stream)).into_response())
}
