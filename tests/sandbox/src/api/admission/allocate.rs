//! ClusterIP and NodePort allocation, with the 422 causes kube-apiserver
//! gives for an address outside the service range or one already taken.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use serde_json::Value;

use crate::api::status::Cause;
use crate::layout;

/// The service range as (network, prefix length).
fn service_range() -> (Ipv4Addr, u32) {
    let (net, len) = layout::SERVICE_CIDR.split_once('/').unwrap_or((layout::SERVICE_CIDR, "32"));
    (net.parse().unwrap_or(Ipv4Addr::UNSPECIFIED), len.parse().unwrap_or(32))
}

fn in_range(ip: Ipv4Addr) -> bool {
    let (net, len) = service_range();
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    let (ip, net) = (u32::from(ip), u32::from(net));
    ip & mask == net & mask && ip != net && ip != (net | !mask)
}

/// Addresses never handed out dynamically (they are requested by name).
fn reserved(ip: Ipv4Addr) -> bool {
    ip == layout::KUBERNETES_SERVICE_IP || ip == layout::DNS_SERVICE_IP
}

/// Picks the Service's ClusterIP: the requested one if valid and free, or
/// the lowest free address of the range.
pub fn cluster_ip(requested: Option<&str>, used: &HashSet<Ipv4Addr>) -> Result<Ipv4Addr, Cause> {
    let invalid = |ip: &str, why: String| Cause::invalid("spec.clusterIPs", &Value::from(vec![ip]), &why);
    if let Some(req) = requested.filter(|r| !r.is_empty()) {
        let ip: Ipv4Addr = req.parse().map_err(|_| invalid(req, "must be a valid IP address".into()))?;
        if !in_range(ip) {
            return Err(invalid(
                req,
                format!(
                    "failed to allocate IP {req}: the provided IP ({req}) is not in the valid range. The range of valid IPs is {}",
                    layout::SERVICE_CIDR
                ),
            ));
        }
        if used.contains(&ip) {
            return Err(invalid(req, format!("failed to allocate IP {req}: provided IP is already allocated")));
        }
        return Ok(ip);
    }
    let (net, len) = service_range();
    let size = 1u32 << (32 - len);
    (1..size - 1)
        .map(|i| Ipv4Addr::from(u32::from(net) + i))
        .find(|ip| !reserved(*ip) && !used.contains(ip))
        .ok_or_else(|| invalid("", "range is full".into()))
}

/// Assigns NodePorts to every port of a NodePort/LoadBalancer Service.
pub fn node_ports(ports: &mut [Value], used: &HashSet<u16>) -> Result<(), Cause> {
    let mut taken = used.clone();
    for (i, p) in ports.iter_mut().enumerate() {
        match p.get("nodePort").and_then(Value::as_i64) {
            Some(n) if n != 0 => {
                let field = format!("spec.ports[{i}].nodePort");
                let port = u16::try_from(n).ok().filter(|n| layout::NODE_PORT_RANGE.contains(n));
                let (lo, hi) = (layout::NODE_PORT_RANGE.start(), layout::NODE_PORT_RANGE.end());
                let port = port.ok_or_else(|| {
                    Cause::invalid(
                        &field,
                        &Value::from(n),
                        &format!("provided port is not in the valid range. The range of valid ports is {lo}-{hi}"),
                    )
                })?;
                if !taken.insert(port) {
                    return Err(Cause::invalid(&field, &Value::from(n), "provided port is already allocated"));
                }
            }
            _ => {
                let port = layout::NODE_PORT_RANGE.clone().find(|n| !taken.contains(n)).ok_or_else(|| {
                    Cause::invalid(format!("spec.ports[{i}].nodePort"), &Value::Null, "range is full")
                })?;
                taken.insert(port);
                p["nodePort"] = Value::from(port);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cluster_ips_come_from_the_service_range() {
        let mut used = HashSet::new();
        let first = cluster_ip(None, &used).unwrap();
        assert_eq!(first, Ipv4Addr::new(10, 96, 0, 2));
        used.insert(first);
        assert_eq!(cluster_ip(None, &used).unwrap(), Ipv4Addr::new(10, 96, 0, 3));
        assert_eq!(cluster_ip(Some("10.96.0.1"), &used).unwrap(), layout::KUBERNETES_SERVICE_IP);
        let outside = cluster_ip(Some("10.0.0.5"), &used).unwrap_err();
        assert!(outside.message.contains("The range of valid IPs is 10.96.0.0/16"), "{}", outside.message);
        assert_eq!(outside.field, "spec.clusterIPs");
        assert!(cluster_ip(Some("10.96.0.2"), &used).unwrap_err().message.contains("already allocated"));
        assert!(cluster_ip(Some("10.96.255.255"), &used).is_err());
    }

    #[test]
    fn node_ports_are_checked_and_assigned() {
        let used: HashSet<u16> = [30000].into();
        let mut ports = vec![json!({"port": 80}), json!({"port": 81, "nodePort": 31000})];
        node_ports(&mut ports, &used).unwrap();
        assert_eq!(ports[0]["nodePort"], 30001);
        let mut bad = vec![json!({"port": 80, "nodePort": 80})];
        assert!(node_ports(&mut bad, &used).unwrap_err().message.contains("30000-32767"));
    }
}
