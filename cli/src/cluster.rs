//! The Kubernetes side: which cluster, context and namespace a command
//! talks to, and a client for it, with errors that say how to fix them.

use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::cli::GlobalArgs;
use crate::error::Hint;

/// A client plus what it points at, for messages.
#[derive(Clone)]
pub struct Cluster {
    pub client: kube::Client,
    pub context: String,
    pub server: String,
    pub namespace: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("context", &self.context).field("server", &self.server).finish()
    }
}

/// Loads the kubeconfig (`--kubeconfig`, else `$KUBECONFIG`, else
/// ~/.kube/config), picks the context, and builds a client. Does not contact
/// the cluster.
pub async fn connect(args: &GlobalArgs) -> Result<Cluster, Hint> {
    let kubeconfig = read_kubeconfig(args.kubeconfig.as_ref())?;
    let context = match &args.context {
        Some(name) => {
            if !kubeconfig.contexts.iter().any(|c| &c.name == name) {
                let known: Vec<&str> = kubeconfig.contexts.iter().map(|c| c.name.as_str()).collect();
                return Err(Hint::new(
                    format!("the kubeconfig has no context named {name:?}"),
                    format!("use one of: {} (`kubectl config get-contexts` lists them)", known.join(", ")),
                ));
            }
            name.clone()
        }
        None => kubeconfig.current_context.clone().ok_or_else(|| {
            Hint::new(
                "the kubeconfig has no current context",
                "pick one with `--context NAME` or `kubectl config use-context NAME`",
            )
        })?,
    };
    let options = KubeConfigOptions { context: Some(context.clone()), ..Default::default() };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options).await.map_err(|e| {
        Hint::new(format!("cannot use context {context:?}: {e}"), "check it with `kubectl config view --minify`")
    })?;
    let namespace = args.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let server = config.cluster_url.to_string();
    let client = client_with_nodelay(config).map_err(|e| {
        Hint::new(format!("cannot build a client for {server}: {e}"), "check the context's cluster and user settings")
    })?;
    Ok(Cluster { client, context, server, namespace })
}

/// kube-rs's own client leaves Nagle's algorithm on (kube-rs/kube#2056),
/// so the session's port-forward holds each small write of the tunnel (the
/// tail of a FUSE request, an HTTP response) until the API server acks the
/// previous segment. This is kube's stack (TLS with the context's server
/// name and CA, base URI, auth with exec plugins and token refresh, extra
/// headers, the connect timeout) on a connector with TCP_NODELAY.
fn client_with_nodelay(config: kube::Config) -> kube::Result<kube::Client> {
    use kube::client::ConfigExt as _;
    use tower::{BoxError, ServiceBuilder, ServiceExt as _};

    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    let https = config.rustls_https_connector_with_connector(http)?;
    let hyper = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .service(hyper.map_err(BoxError::from));
    Ok(kube::Client::new(service, config.default_namespace))
}

fn read_kubeconfig(explicit: Option<&PathBuf>) -> Result<Kubeconfig, Hint> {
    let result = match explicit {
        Some(path) => Kubeconfig::read_from(path),
        None => Kubeconfig::read(),
    };
    result.map_err(|e| {
        Hint::new(
            format!("no usable kubeconfig: {e}"),
            "pass --kubeconfig FILE or set KUBECONFIG (with tpd's source checkout, `tpd-sandbox up` starts a test cluster)",
        )
    })
}

/// Whether a kube error is the API's 404.
pub fn is_not_found(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 404)
}

/// A kube error in one line a user can read: kube's own text of an API
/// error carries the whole `Status` object.
pub fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) if status.message.is_empty() => format!("the API server said {}", status.code),
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    }
}
