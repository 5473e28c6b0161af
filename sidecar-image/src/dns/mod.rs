//! The DNS server the developer's container uses (127.0.0.1:53 in the shared
//! network namespace). Names under the cluster domain (or all names, with
//! the configuration's `dns.all_to_cluster`) go through the tunnel to the agent, which resolves
//! them as the swapped pod would; others go to the upstream resolver the
//! CLI passes (the host's). Queries are forwarded as they are.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tpd_wire::dns;
use tpd_wire::names::{AGENT_DNS_PORT, AGENT_TUNNEL_IP};
use tpd_wire::sidecar::Dns;

const QUERY_TIMEOUT: Duration = Duration::from_secs(4);

/// Where a query for `name` goes; `None` means refuse it.
fn server_for(routing: &Dns, name: &str) -> Option<SocketAddr> {
    if routing.all_to_cluster || dns::is_under(name, &routing.cluster_domain) {
        Some(SocketAddr::from((AGENT_TUNNEL_IP, AGENT_DNS_PORT)))
    } else {
        routing.upstream
    }
}

pub async fn serve(sock: UdpSocket, routing: Dns) {
    let sock = Arc::new(sock);
    let routing = Arc::new(routing);
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, client)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let query = buf[..n].to_vec();
        let (sock, routing) = (sock.clone(), routing.clone());
        tokio::spawn(async move {
            if let Some(reply) = answer(&query, &routing).await {
                let _ = sock.send_to(&reply, client).await;
            }
        });
    }
}

async fn answer(query: &[u8], routing: &Dns) -> Option<Vec<u8>> {
    let q = dns::question(query).ok()?;
    let Some(server) = server_for(routing, &q.name) else {
        return dns::empty_response(query, dns::RCODE_REFUSED).ok();
    };
    match tpd_tunnel::io::dns_exchange(query, server, QUERY_TIMEOUT).await {
        Ok(reply) => Some(reply),
        Err(e) => {
            tracing::debug!(%server, "DNS forward failed: {e}");
            let rcode = if q.qtype == dns::TYPE_AAAA { 0 } else { dns::RCODE_SERVFAIL };
            dns::empty_response(query, rcode).ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_cluster_names_to_the_agent() {
        let upstream: SocketAddr = "192.0.2.53:53".parse().unwrap();
        let r = Dns { upstream: Some(upstream), ..Dns::default() };
        let agent = SocketAddr::from((AGENT_TUNNEL_IP, AGENT_DNS_PORT));
        assert_eq!(server_for(&r, "echo.default.svc.cluster.local"), Some(agent));
        assert_eq!(server_for(&r, "example.org"), Some(upstream));
        let all = Dns { all_to_cluster: true, upstream: None, ..r };
        assert_eq!(server_for(&all, "example.org"), Some(agent));
        let none = Dns { all_to_cluster: false, ..all };
        assert_eq!(server_for(&none, "example.org"), None);
    }
}
