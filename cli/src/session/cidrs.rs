//! The cluster's pod and service ranges, which the sidecar routes into the
//! tunnel. Pod ranges come from the Nodes' `spec.podCIDRs`; the service range
//! from the networking.k8s.io ServiceCIDR objects, or, on clusters without
//! them, from the Invalid error a ClusterIP outside the range gets (the way
//! Telepresence and Gefyra find it).

use std::net::Ipv4Addr;

use crate::error::Hint;
use anyhow::Context;
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use tpd_wire::sidecar::Cidr;
use tracing::debug;

/// Pod ranges then service ranges, deduplicated; IPv4 only, as the tunnel is.
pub async fn discover(client: &kube::Client) -> anyhow::Result<Vec<Cidr>> {
    let nodes: Api<Node> = Api::all(client.clone());
    // Both lists at once: one round trip to the API server, not two.
    let all = ListParams::default();
    let (nodes, services) = tokio::join!(nodes.list(&all), service_ranges(client));
    let mut ranges: Vec<String> = Vec::new();
    for node in nodes.context("cannot list nodes to find the pod range")?.items {
        let spec = node.spec.unwrap_or_default();
        ranges.extend(spec.pod_cidrs.unwrap_or_default().into_iter().chain(spec.pod_cidr));
    }
    ranges.extend(services?);
    Ok(routable(&ranges))
}

/// The IPv4 ranges among `ranges`, each once; the others are logged.
fn routable(ranges: &[String]) -> Vec<Cidr> {
    let mut cidrs: Vec<Cidr> = Vec::new();
    for range in ranges {
        match range.parse::<Cidr>() {
            Ok(cidr) if !cidrs.contains(&cidr) => cidrs.push(cidr),
            Ok(_) => {}
            Err(e) => debug!("not routed through the tunnel, which carries IPv4 only: {e}"),
        }
    }
    cidrs
}

async fn service_ranges(client: &kube::Client) -> anyhow::Result<Vec<String>> {
    let cidrs: Api<ServiceCIDR> = Api::all(client.clone());
    match cidrs.list(&ListParams::default()).await {
        Ok(list) if !list.items.is_empty() => {
            return Ok(list.items.into_iter().flat_map(|c| c.spec.and_then(|s| s.cidrs).unwrap_or_default()).collect());
        }
        Ok(_) => debug!("no ServiceCIDR objects"),
        Err(e) => debug!("ServiceCIDR not served: {e}"),
    }
    // A dry-run create with a ClusterIP no cluster uses: the API answers
    // Invalid and names the valid range; nothing is stored.
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let probe = Service {
        metadata: ObjectMeta { name: Some("tpd-range-probe".into()), ..Default::default() },
        spec: Some(ServiceSpec {
            cluster_ip: Some("1.1.1.1".into()),
            ports: Some(vec![ServicePort { port: 80, ..Default::default() }]),
            ..Default::default()
        }),
        status: None,
    };
    match services.create(&PostParams { dry_run: true, ..Default::default() }, &probe).await {
        Err(kube::Error::Api(status)) if status.code == 422 => {
            Ok(vec![range_in_message(&status.message).ok_or_else(|| range_unknown("the cluster did not name it"))?])
        }
        Ok(_) => Err(range_unknown("a dry-run Service with an unusable ClusterIP was accepted").into()),
        Err(e) => Err(range_unknown(&crate::cluster::describe(&e)).into()),
    }
}

fn range_unknown(why: &str) -> Hint {
    Hint::new(
        format!("cannot find the cluster's service range: {why}"),
        "name it yourself: --also-proxy CIDR (the API server's --service-cluster-ip-range)",
    )
}

/// The CIDR after "The range of valid IPs is" in an Invalid message.
pub fn range_in_message(message: &str) -> Option<String> {
    let rest = message.split("The range of valid IPs is").nth(1)?;
    let cidr = rest.split(|c: char| c.is_whitespace() || c == ',' || c == '"').find(|w| !w.is_empty())?;
    let (ip, len) = cidr.split_once('/')?;
    let ok = ip.parse::<Ipv4Addr>().is_ok() || ip.parse::<std::net::Ipv6Addr>().is_ok();
    (ok && len.parse::<u8>().is_ok_and(|l| l <= 128)).then(|| cidr.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ipv4_ranges_are_routed_each_once() {
        let ranges = ["10.244.0.0/24", "fd00:10:96::/108", "10.96.0.0/12", "10.244.0.0/24"].map(String::from);
        let routed: Vec<String> = routable(&ranges).iter().map(Cidr::to_string).collect();
        assert_eq!(routed, ["10.244.0.0/24", "10.96.0.0/12"]);
    }

    #[test]
    fn range_from_the_invalid_message() {
        let table = [
            (
                "Service \"x\" is invalid: spec.clusterIPs: Invalid value: []string{\"1.1.1.1\"}: failed to allocate IP 1.1.1.1: the provided IP (1.1.1.1) is not in the valid range. The range of valid IPs is 10.96.0.0/12",
                Some("10.96.0.0/12"),
            ),
            ("... The range of valid IPs is fd00:10:96::/108, ...", Some("fd00:10:96::/108")),
            ("The range of valid IPs is banana", None),
            ("something else entirely", None),
            ("The range of valid IPs is ", None),
        ];
        for (msg, want) in table {
            assert_eq!(range_in_message(msg).as_deref(), want, "{msg}");
        }
    }
}
