//! REST verbs on resource paths: list, get, create, update, patch, delete,
//! deletecollection, and the scale subresource.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::App;
use super::admission::FieldValidation;
use super::patch::PatchType;
use super::path::Target;
use super::registry::Written;
use super::selectors::{FieldSelector, LabelSelector};
use super::status::{self, ApiError, ApiResult};
use super::table;

pub type Query = HashMap<String, String>;

pub fn json_response(code: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    (code, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

fn with_warnings(mut resp: Response, warnings: &[String]) -> Response {
    for w in warnings {
        let text = format!("299 - {w:?}");
        if let Ok(v) = HeaderValue::from_str(&text) {
            resp.headers_mut().append("Warning", v);
        }
    }
    resp
}

fn written(code: StatusCode, (obj, warnings): Written) -> Response {
    with_warnings(json_response(code, &obj), &warnings)
}

pub fn parse_body(body: &[u8]) -> ApiResult<Value> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}")))
}

/// Label and field selectors of a list or watch.
pub struct Filter {
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    pub fn from_query(q: &Query) -> ApiResult<Self> {
        let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(Self { labels, fields })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }
}

fn field_validation(q: &Query) -> FieldValidation {
    FieldValidation::from_query(q.get("fieldValidation").map(String::as_str))
}

fn namespace(t: &Target) -> ApiResult<&str> {
    match (&t.namespace, t.res.namespaced) {
        (Some(ns), true) => Ok(ns),
        (_, false) => Ok(""),
        (None, true) => Err(ApiError::no_such_resource()),
    }
}

fn name(t: &Target) -> &str {
    t.name.as_deref().unwrap_or_default()
}

pub fn list(app: &App, t: &Target, q: &Query, headers: &HeaderMap) -> ApiResult<Response> {
    let filter = Filter::from_query(q)?;
    let (items, rv) = app.registry.list(t.res, t.namespace.as_deref());
    let items: Vec<Value> = items.into_iter().filter(|o| filter.matches(o)).collect();
    if table::wants_table(accept(headers)) {
        return Ok(json_response(StatusCode::OK, &table::table(t.res.kind, &items, Some(rv))));
    }
    let body = json!({
        "kind": format!("{}List", t.res.kind),
        "apiVersion": t.res.api_version(),
        "metadata": {"resourceVersion": rv.to_string()},
        "items": items,
    });
    Ok(json_response(StatusCode::OK, &body))
}

pub fn accept(headers: &HeaderMap) -> &str {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

pub fn get(app: &App, t: &Target, headers: &HeaderMap) -> ApiResult<Response> {
    let obj = app.registry.get(t.res, namespace(t)?, name(t))?;
    if table::wants_table(accept(headers)) {
        return Ok(json_response(StatusCode::OK, &table::table(t.res.kind, &[obj], None)));
    }
    Ok(json_response(StatusCode::OK, &obj))
}

pub fn create(app: &App, t: &Target, q: &Query, body: &[u8]) -> ApiResult<Response> {
    let obj = parse_body(body)?;
    if t.res.create_only {
        // Access reviews: the sandbox has no authorization, so everything is allowed.
        let mut review = obj;
        review["status"] = json!({"allowed": true, "reason": "the tpd sandbox authorizes every request"});
        return Ok(json_response(StatusCode::CREATED, &review));
    }
    let ns = namespace(t)?;
    // `dryRun=All`: admitted (or refused) as a create is, and not stored.
    if q.get("dryRun").is_some_and(|d| d == "All") {
        return Ok(written(StatusCode::CREATED, app.registry.admit_create(t.res, ns, obj, field_validation(q))?));
    }
    Ok(written(StatusCode::CREATED, app.registry.create(t.res, ns, obj, field_validation(q))?))
}

pub fn update(app: &App, t: &Target, q: &Query, body: &[u8]) -> ApiResult<Response> {
    let obj = parse_body(body)?;
    let status_only = t.sub.as_deref() == Some("status");
    let w = app.registry.update(t.res, namespace(t)?, name(t), obj, status_only, field_validation(q))?;
    Ok(written(StatusCode::OK, w))
}

pub fn patch(app: &App, t: &Target, q: &Query, headers: &HeaderMap, body: &[u8]) -> ApiResult<Response> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let kind = PatchType::from_content_type(ct).ok_or_else(|| ApiError::unsupported_media_type(ct))?;
    let status_only = t.sub.as_deref() == Some("status");
    let w = app.registry.patch(t.res, namespace(t)?, name(t), (kind, body), status_only, field_validation(q))?;
    Ok(written(StatusCode::OK, w))
}

/// `Orphan` leaves dependents in place; `Background` and `Foreground` delete them.
fn orphan(q: &Query, body: &[u8]) -> bool {
    let from_body = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|b| b.get("propagationPolicy").and_then(Value::as_str).map(str::to_owned));
    let policy = q.get("propagationPolicy").cloned().or(from_body);
    policy.as_deref() == Some("Orphan")
}

pub fn delete(app: &App, t: &Target, q: &Query, body: &[u8]) -> ApiResult<Response> {
    let gone = app.registry.delete(t.res, namespace(t)?, name(t), orphan(q, body))?;
    let uid = gone.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default();
    Ok(json_response(StatusCode::OK, &status::success(t.res.group, t.res.plural, name(t), uid)))
}

pub fn delete_collection(app: &App, t: &Target, q: &Query, body: &[u8]) -> ApiResult<Response> {
    let filter = Filter::from_query(q)?;
    let (items, _) = app.registry.list(t.res, t.namespace.as_deref());
    let mut deleted = Vec::new();
    for obj in items.into_iter().filter(|o| filter.matches(o)) {
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default();
        let n = obj["metadata"]["name"].as_str().unwrap_or_default();
        // Gone meanwhile (a cascade got it first) is fine.
        if let Ok(gone) = app.registry.delete(t.res, ns, n, orphan(q, body)) {
            deleted.push(gone);
        }
    }
    let list = json!({"kind": format!("{}List", t.res.kind), "apiVersion": t.res.api_version(), "metadata": {}, "items": deleted});
    Ok(json_response(StatusCode::OK, &list))
}

/// The autoscaling/v1 Scale view of a Deployment or ReplicaSet.
fn scale_of(obj: &Value) -> Value {
    let sel = super::table::selector_string(&obj["spec"]["selector"]);
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"],
            "uid": obj["metadata"]["uid"], "resourceVersion": obj["metadata"]["resourceVersion"],
            "creationTimestamp": obj["metadata"]["creationTimestamp"],
        },
        "spec": {"replicas": obj["spec"]["replicas"]},
        "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0), "selector": sel},
    })
}

pub fn scale(
    app: &App,
    t: &Target,
    method: &Method,
    q: &Query,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult<Response> {
    let (ns, n) = (namespace(t)?, name(t));
    let current = app.registry.get(t.res, ns, n)?;
    let scale = scale_of(&current);
    let wanted = match *method {
        Method::GET => return Ok(json_response(StatusCode::OK, &scale)),
        Method::PUT => parse_body(body)?,
        _ => {
            let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
            let kind = PatchType::from_content_type(ct).ok_or_else(|| ApiError::unsupported_media_type(ct))?;
            super::patch::apply(kind, &scale, body).map_err(ApiError::from)?
        }
    };
    let replicas = wanted.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(0);
    let mut obj = current;
    obj["spec"]["replicas"] = json!(replicas);
    if let Some(rv) =
        wanted.pointer("/metadata/resourceVersion").filter(|rv| rv.as_str().is_some_and(|s| !s.is_empty()))
    {
        obj["metadata"]["resourceVersion"] = rv.clone();
    }
    let (updated, _) = app.registry.update(t.res, ns, n, obj, false, field_validation(q))?;
    Ok(json_response(StatusCode::OK, &scale_of(&updated)))
}

/// TokenRequest (`POST serviceaccounts/NAME/token`, as a kubelet asks for
/// a pod's token): a new token for the service account, which the secure
/// port accepts from then on.
fn token_request(app: &App, t: &Target, body: &[u8]) -> ApiResult<Response> {
    let (ns, account) = (namespace(t)?, name(t));
    app.registry.get(t.res, ns, account)?;
    let req = parse_body(body)?;
    let seconds = req.pointer("/spec/expirationSeconds").and_then(Value::as_i64).unwrap_or(3600);
    let expires = k8s_openapi::jiff::Timestamp::now()
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(seconds))
        .map_err(|e| ApiError::bad_request(format!("spec.expirationSeconds: {e}")))?;
    let token = app.tokens.issue(ns, account);
    Ok(json_response(
        StatusCode::CREATED,
        &json!({
            "kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": account, "namespace": ns, "creationTimestamp": null},
            "spec": req.get("spec").cloned().unwrap_or_else(|| json!({})),
            "status": {"token": token, "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()},
        }),
    ))
}

/// Dispatches a request on a resource path by verb and subresource.
pub async fn object(
    app: &App,
    t: Target,
    q: Query,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let body = match ct {
        c if c.starts_with("application/vnd.kubernetes.protobuf")
            && (method == Method::POST || method == Method::PUT) =>
        {
            let obj = super::protobuf::decode(&body)
                .map_err(|e| ApiError::unsupported_media_type_because(c, &e.to_string()))?;
            Bytes::from(serde_json::to_vec(&obj).unwrap_or_default())
        }
        _ => body,
    };
    let watching = q.get("watch").is_some_and(|w| w == "1" || w == "true");
    match (&method, t.name.is_some(), t.sub.as_deref()) {
        (&Method::GET, false, _) if watching => super::watch::serve(app, &t, &q, &headers),
        (&Method::GET, false, _) => list(app, &t, &q, &headers),
        (&Method::POST, false, _) => create(app, &t, &q, &body),
        (&Method::DELETE, false, _) => delete_collection(app, &t, &q, &body),
        (_, true, Some("scale")) => scale(app, &t, &method, &q, &headers, &body),
        (&Method::POST, true, Some("token")) => token_request(app, &t, &body),
        (&Method::GET, true, None | Some("status")) => get(app, &t, &headers),
        (&Method::PUT, true, None | Some("status")) => update(app, &t, &q, &body),
        (&Method::PATCH, true, None | Some("status")) => patch(app, &t, &q, &headers, &body),
        (&Method::DELETE, true, None) => delete(app, &t, &q, &body),
        (_, true, Some("log")) => super::stream::log::serve(app, &t, &q).await,
        _ => Err(ApiError::method_not_allowed(method.as_str(), t.res.plural)),
    }
}
