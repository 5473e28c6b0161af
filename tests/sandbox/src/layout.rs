//! The sandbox's address plan and names: one place that the API server, the
//! kubelet, the service proxies and the DNS server all read.
//!
//! One internal Docker network holds every pod and every service address. A
//! Docker bridge network has a single IPv4 subnet, so the service range and
//! the pod range are carved out of it: services get static addresses from
//! [`SERVICE_CIDR`], pods are allocated by Docker from [`POD_CIDR`] (the
//! network's `--ip-range`).

use std::net::Ipv4Addr;

/// Default instance name; every Docker object is named `<name>-...` and
/// labelled [`LABEL_INSTANCE`]`=<name>`.
pub const DEFAULT_NAME: &str = "tpd-sandbox";

/// Label on every container, network and volume the sandbox creates, so
/// `down` can find them even after the server was killed.
pub const LABEL_INSTANCE: &str = "dev.tpd.sandbox";

/// The Docker network's subnet (services and pods both live in it).
pub const NETWORK_SUBNET: &str = "10.96.0.0/12";
/// The bridge's own address, kept out of the service and pod ranges.
pub const NETWORK_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 111, 255, 254);
/// The API server's secure port on [`NETWORK_GATEWAY`]: the `kubernetes`
/// Service's endpoint, as kube-apiserver's 6443.
pub const API_SECURE_PORT: u16 = 6443;
/// ClusterIPs are allocated from here (the ServiceCIDR object reports it).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Pod addresses: the node's `spec.podCIDR` and the network's `--ip-range`.
pub const POD_CIDR: &str = "10.100.0.0/16";
/// The `kubernetes` Service's ClusterIP.
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// Cluster DNS (kube-dns Service in kube-system), written into every pod's
/// resolv.conf.
pub const DNS_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The cluster domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// NodePorts are allocated from here and listened on by the host.
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;
/// The single node's name.
pub const NODE_NAME: &str = "sandbox-node";
