//! Names and numbers shared across processes: one source for each contract.

use std::net::Ipv4Addr;

/// Version of the on-the-wire protocol spoken inside and around the tunnel.
/// Bumped on any incompatible change; peers refuse a different version with a
/// clear "version mismatch" instead of misreading bytes.
pub const PROTOCOL_VERSION: u16 = 1;

/// The agent's address inside the tunnel. 198.18.0.0/15 is reserved for
/// benchmarking (RFC 2544), so it does not clash with pod or service ranges.
pub const AGENT_TUNNEL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The sidecar's address inside the tunnel (its TUN device).
pub const SIDECAR_TUNNEL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Stands for the pod's loopback inside the tunnel: a flow the sidecar sends
/// to `POD_LOOPBACK_TUNNEL_IP:<port>` the agent dials as `127.0.0.1:<port>`
/// in the pod, which is how the developer's container reaches the pod's
/// other containers on localhost (see `neighbours`).
pub const POD_LOOPBACK_TUNNEL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// Prefix length of the tunnel network: a /29, so that all three addresses
/// above are hosts of the sidecar's TUN network (in a /30, .3 would be its
/// broadcast address, which TCP cannot connect to).
pub const TUNNEL_PREFIX_LEN: u8 = 29;

/// Port on the agent's pod where WireGuard arrives: TCP for the framed stream
/// transport (what a port-forward carries), UDP for plain datagrams.
pub const AGENT_TRANSPORT_PORT: u16 = 7700;
/// Control service on the agent's tunnel address (version, health, env).
pub const AGENT_CONTROL_PORT: u16 = 7701;
/// File service on the agent's tunnel address (the volume bridge).
pub const AGENT_FILES_PORT: u16 = 7702;
/// DNS on the agent's tunnel address, answered with the pod's resolver.
pub const AGENT_DNS_PORT: u16 = 53;
/// Inbound relay on the agent's tunnel address: the sidecar dials it for each
/// cluster client the agent accepted (see `inbound::Header`).
pub const AGENT_INBOUND_PORT: u16 = 7703;
/// MTU of the tunnel: fits a 1500-byte path after WireGuard's 32 bytes of
/// overhead and the outer IPv4/UDP headers, like wg-quick's default.
pub const TUNNEL_MTU: u16 = 1420;
/// MTU of the tunnel when WireGuard rides the stream transport. A frame
/// holds any datagram up to 64 KiB and no path MTU applies inside a TCP
/// stream, so packets as large as a frame allows (less WireGuard's 32 bytes)
/// cut the per-packet work (TUN reads, encryption, the agent's TCP/IP) by
/// about 45 times for bulk transfers. TCP's MSS negotiation keeps both
/// kinds of tunnel safe for the agent, which uses this MTU always.
pub const STREAM_TUNNEL_MTU: u16 = 65_000;

/// Inside the sidecar container: the session directory the CLI bind-mounts.
/// The sidecar writes `status.json` there when ready; the CLI may put the
/// stream transport's Unix socket there too.
pub const SESSION_DIR: &str = "/run/tpd";
/// The readiness file in the session directory (mode 0600: it holds the env).
pub const STATUS_FILE: &str = "status.json";

/// Image names the CLI defaults to; a user overrides them with flags,
/// `TPD_SIDECAR_IMAGE` / `TPD_AGENT_IMAGE` or the config file.
pub const SIDECAR_IMAGE_REPO: &str = "tpd/sidecar";
pub const AGENT_IMAGE_REPO: &str = "tpd/agent";

/// Numeric uid/gid the agent image runs as by default (the "nonroot"
/// convention): the outbound-only agent pod's, and a swapped container's
/// when it is `runAsNonRoot` without naming a uid. Otherwise a swap runs the
/// agent as the container it replaces.
pub const AGENT_UID: u32 = 65532;

/// Label put on every object, container and network tpd creates, so cleanup
/// can find them by label even after a crash.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "tpd";
/// Label naming the session an object or container belongs to.
pub const LABEL_SESSION: &str = "tpd.dev/session";

/// Annotation on a swapped Deployment recording what restore needs, who holds
/// it and the lease (see the CLI's swap state).
pub const ANNOTATION_SWAP: &str = "tpd.dev/swap";

/// Env vars tpd sets on the agent container; the agent reads the same names.
pub mod agent_env {
    /// Comma-separated container ports the agent listens on for inbound traffic.
    pub const PORTS: &str = "TPD_AGENT_PORTS";
    /// Session id, for logs and to refuse a stray peer.
    pub const SESSION: &str = "TPD_SESSION_ID";
    /// JSON list of the swapped container's volume mounts to serve.
    pub const MOUNTS: &str = "TPD_AGENT_MOUNTS";
    /// Log filter for the agent (tracing `EnvFilter` syntax).
    pub const LOG: &str = "TPD_AGENT_LOG";
    /// JSON `intercept::Config`: the agent runs beside the app container
    /// and routes its traffic by request (personal intercepts).
    pub const INTERCEPT: &str = "TPD_AGENT_INTERCEPT";

    /// Every variable above; the agent strips these from the env it reports,
    /// so the developer's container gets the app's env and not tpd's.
    pub const ALL: &[&str] = &[PORTS, SESSION, MOUNTS, LOG, INTERCEPT];
}

/// Env var naming where, inside the developer's container, all remote volumes
/// are also visible (like Telepresence's `$TELEPRESENCE_ROOT`).
pub const ENV_TPD_ROOT: &str = "TPD_ROOT";
