//! DNS on the agent's tunnel address: queries are forwarded as they are to
//! the pod's nameservers (from its /etc/resolv.conf), so cluster names,
//! ExternalName CNAMEs and headless services resolve exactly as they would
//! for the swapped container. A query no nameserver answers in time gets an
//! empty answer for AAAA (clients then use the A answer at once) and
//! SERVFAIL otherwise.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tpd_wire::dns;

use super::udp::UdpFlow;

const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// The nameservers of a resolv.conf text, in order.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

pub fn system_nameservers() -> Vec<SocketAddr> {
    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let found = nameservers(&conf);
    if found.is_empty() {
        tracing::warn!("no nameserver in /etc/resolv.conf: cluster names will not resolve");
    }
    found
}

/// Serves one tunnelled UDP flow to port 53, each datagram one query,
/// answered concurrently (resolvers send A and AAAA at once), until no
/// query came for `idle`.
pub async fn serve(mut flow: UdpFlow, servers: &[SocketAddr], idle: Duration) {
    let servers: Arc<[SocketAddr]> = servers.into();
    while let Ok(Some(query)) = tokio::time::timeout(idle, flow.recv()).await {
        let (reply, servers) = (flow.reply().clone(), servers.clone());
        tokio::spawn(async move {
            if let Some(answer) = answer(&query, &servers).await {
                reply.send(&answer);
            }
        });
    }
}

async fn answer(query: &[u8], servers: &[SocketAddr]) -> Option<Vec<u8>> {
    let Ok(q) = dns::question(query) else {
        tracing::debug!("dropped a malformed DNS query");
        return None;
    };
    for server in servers {
        match tpd_tunnel::io::dns_exchange(query, *server, QUERY_TIMEOUT).await {
            Ok(reply) => return Some(reply),
            Err(e) => tracing::debug!(%server, "DNS forward failed: {e}"),
        }
    }
    let rcode = if q.qtype == dns::TYPE_AAAA { 0 } else { dns::RCODE_SERVFAIL };
    dns::empty_response(query, rcode).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nameservers_in_order() {
        let conf = "search ns.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\n# c\nnameserver fe80::1%eth0\noptions ndots:5\n";
        assert_eq!(nameservers(conf), vec!["10.96.0.10:53".parse().unwrap(), "[fe80::1]:53".parse().unwrap()]);
    }
}
