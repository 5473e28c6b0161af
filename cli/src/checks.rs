//! Checks `tpd run` makes before it changes anything, each failing with the
//! fix: the images exist locally, the host ports are free, the namespace exists.

use std::net::{Ipv4Addr, TcpListener};

use bollard::Docker;
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;

use crate::cluster::Cluster;
use crate::error::Hint;

/// The image is in the local engine (tpd never pulls behind the user's back).
pub async fn image_present(docker: &Docker, image: &str, fix: &str) -> anyhow::Result<()> {
    match docker.inspect_image(image).await {
        Ok(_) => Ok(()),
        Err(e) if crate::docker::is_not_found(&e) => {
            Err(Hint::new(format!("the image {image} is not in the local Docker engine"), fix.replace("IMAGE", image))
                .into())
        }
        Err(e) => Err(anyhow::Error::from(e).context(format!("cannot inspect the image {image}"))),
    }
}

/// What to do about a missing tpd image: a user of a release loads or
/// pulls it (or names another); a source checkout builds it.
pub const TPD_IMAGE_FIX: &str = "load or pull IMAGE (`docker load -i FILE`, `docker pull IMAGE`), or name another with \
     --sidecar-image/--agent-image; in a source checkout of tpd, `cargo xtask images` builds it";

/// Every host port to publish can be bound now.
pub fn ports_free(ports: impl IntoIterator<Item = u16>) -> anyhow::Result<()> {
    for port in ports {
        if let Err(e) = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)) {
            return Err(Hint::new(
                format!("local port {port} is not available: {e}"),
                format!(
                    "pick another HOST port in -p HOST:CONTAINER (`ss -ltnp 'sport = :{port}'` shows who uses {port})"
                ),
            )
            .into());
        }
    }
    Ok(())
}

/// The namespace exists (this is also the first request to the cluster, so
/// an unreachable API server is reported here).
pub async fn namespace_exists(cluster: &Cluster) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(cluster.client.clone());
    match api.get(&cluster.namespace).await {
        Ok(_) => Ok(()),
        Err(e) if crate::cluster::is_not_found(&e) => Err(Hint::new(
            format!("namespace {:?} does not exist in context {:?}", cluster.namespace, cluster.context),
            "list namespaces with `kubectl get namespaces`, then pass one with -n NS",
        )
        .into()),
        Err(e) => Err(Hint::new(
            format!("cannot reach the cluster of context {:?} at {}: {e}", cluster.context, cluster.server),
            "check it with `kubectl cluster-info` (with tpd's source checkout, `tpd-sandbox up` starts a test cluster)",
        )
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_in_use_is_named_with_the_fix() {
        let taken = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = ports_free([port]).unwrap_err();
        let hint = err.downcast_ref::<Hint>().unwrap();
        assert!(hint.message.contains(&format!("local port {port} is not available")), "{}", hint.message);
        assert!(hint.help.contains("-p HOST:CONTAINER"));
        drop(taken);
        ports_free([port]).unwrap();
    }
}
