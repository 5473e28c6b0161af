//! The pod subresources that stream, served through the node
//! ([`crate::node::Node`]) as kube-apiserver proxies them to the kubelet.

pub mod channel;
pub mod exec;
pub mod log;
pub mod portforward;

use std::sync::Arc;

use serde_json::Value;

use super::App;
use super::handlers::Query;
use super::path::Target;
use super::status::{ApiError, ApiResult};
use crate::node::{Node, NodeError, PodRef};

/// The pod a stream is for, its node, and the container asked for (or the
/// only one).
struct PodTarget {
    pod: PodRef,
    container: String,
    node: Arc<dyn Node>,
}

fn resolve(app: &App, t: &Target, q: &Query) -> ApiResult<PodTarget> {
    let ns = t.namespace.clone().unwrap_or_default();
    let name = t.name.clone().unwrap_or_default();
    let pod = app.registry.get(t.res, &ns, &name)?;
    let names: Vec<&str> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let inits: Vec<&str> = pod
        .pointer("/spec/initContainers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let container = match q.get("container") {
        Some(c) if names.contains(&c.as_str()) || inits.contains(&c.as_str()) => c.clone(),
        Some(c) => {
            return Err(ApiError::bad_request(format!("container {c} is not valid for pod {name}")));
        }
        None if names.len() == 1 => names[0].to_owned(),
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                names.join(" ")
            )));
        }
    };
    let node = app
        .node
        .get()
        .cloned()
        .ok_or_else(|| ApiError::bad_request(format!("pod {name} is not running: the sandbox node is not up")))?;
    Ok(PodTarget { pod: PodRef { namespace: ns, name }, container, node })
}

fn node_error(e: NodeError) -> ApiError {
    match e {
        NodeError::NotFound(what) => ApiError::not_found("", "pods", &what),
        NodeError::NotReady(msg) => ApiError::bad_request(msg),
        NodeError::Runtime(msg) => ApiError::internal(msg),
    }
}
