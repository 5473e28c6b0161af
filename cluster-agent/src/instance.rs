//! A session's half of the agent: its WireGuard endpoint, userspace stack,
//! control and inbound, and the services on its tunnel address. A swapped
//! or outbound-only agent runs one, locked to the first sidecar key it
//! admits; an intercept agent runs one per sidecar key ([`Instances`]),
//! since several developers' sidecars reach it. Instances are independent
//! (each has the same tunnel addresses) and share what is the pod's: the
//! mounts, the nameservers, the neighbour ports and the agent's key.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tpd_tunnel::{Endpoint, StaticKey};
use tpd_volumes::server as files;
use tpd_wire::names;
use tpd_wire::neighbours::PodPort;

use crate::control::Control;
use crate::inbound::Inbound;
use crate::neighbours::Own;
use crate::services::Services;
use crate::stack::{self, Ingress, Stack};
use crate::window::SendWindow;

/// What every instance of the agent shares: the pod's.
#[derive(Clone)]
pub struct Shared {
    pub key: StaticKey,
    pub mounts: Arc<files::MountTable>,
    pub nameservers: Arc<[SocketAddr]>,
    /// Ports of the pod's loopback that are the agent's or the app's it stands in front of.
    pub own: Own,
    /// The neighbour ports, as [`crate::neighbours::watch`] last found them.
    pub pod_ports: watch::Sender<Vec<PodPort>>,
}

pub struct Instance {
    pub wg: Arc<Endpoint>,
    pub window: Arc<SendWindow>,
    pub control: Arc<Control>,
    pub inbound: Arc<Inbound>,
    stack: Arc<Stack>,
    /// WireGuard's timers and the neighbour ports' forwarder; dropping the
    /// set (with the instance) stops them.
    tasks: tokio::sync::Mutex<JoinSet<&'static str>>,
}

impl Instance {
    pub fn start(shared: &Shared) -> Arc<Instance> {
        let (ingress, queues) = Ingress::new();
        let wg = Arc::new(Endpoint::with_key(shared.key.clone(), None, move |packet| ingress.deliver(packet)));
        let window = Arc::new(SendWindow::default());
        let control = Arc::new(Control::new(window.clone()));
        let inbound = Arc::new(Inbound::new(control.clone()));
        let services = local_services(&control, &inbound, shared);
        let stack =
            Stack::start(wg.clone(), services, shared.own.clone(), queues, window.clone(), shared.nameservers.clone());
        let mut tasks = JoinSet::new();
        let timers = wg.clone();
        tasks.spawn(async move {
            timers.run_timers().await;
            "the WireGuard timers"
        });
        tasks.spawn(forward_pod_ports(shared.pod_ports.subscribe(), control.clone()));
        Arc::new(Instance { wg, window, control, inbound, stack, tasks: tokio::sync::Mutex::new(tasks) })
    }

    /// Waits until one of the instance's tasks ends (they run for its life) and names it.
    pub async fn ended(&self) -> &'static str {
        match self.tasks.lock().await.join_next().await {
            Some(Ok(task)) => task,
            Some(Err(_)) => "a task of the session (it panicked)",
            None => std::future::pending().await,
        }
    }

    /// Whether one of the instance's tasks has ended, without waiting.
    fn broken(&self) -> bool {
        self.tasks.try_lock().is_ok_and(|mut t| t.try_join_next().is_some())
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // The tasks stop with their JoinSet; the stack's own with this.
        self.stack.stop();
    }
}

/// Hands `control` the neighbour ports now and whenever they change.
async fn forward_pod_ports(mut ports: watch::Receiver<Vec<PodPort>>, control: Arc<Control>) -> &'static str {
    loop {
        let now = ports.borrow_and_update().clone();
        control.set_pod_ports(now);
        if ports.changed().await.is_err() {
            return "the neighbour ports' watch";
        }
    }
}

/// The services on the agent's tunnel address, by port.
fn local_services(control: &Arc<Control>, inbound: &Arc<Inbound>, shared: &Shared) -> Services {
    let mut services = Services::default();
    let control = control.clone();
    services.insert(names::AGENT_CONTROL_PORT, move |c| {
        let control = control.clone();
        async move { control.serve(c).await }
    });
    let inbound = inbound.clone();
    services.insert(names::AGENT_INBOUND_PORT, move |c| {
        let inbound = inbound.clone();
        async move { inbound.relay(c).await }
    });
    // DNS over TCP, for answers too large for UDP (UDP is the stack's own).
    let nameservers = shared.nameservers.clone();
    services.insert(names::AGENT_DNS_PORT, move |c| stack::dns::serve_tcp(c, nameservers.clone()));
    let mounts = shared.mounts.clone();
    services.insert(names::AGENT_FILES_PORT, move |c| {
        let mounts = mounts.clone();
        async move {
            if let Err(e) = files::serve_connection(c, mounts).await {
                tracing::warn!("file service connection closed: {e}");
            }
        }
    });
    services
}

/// Most sessions an intercept agent holds at once; more are refused.
pub const MAX_SESSIONS: usize = 32;
/// An intercept agent's instance with no transport stream for this long is dropped.
pub const IDLE: Duration = Duration::from_secs(60);

/// The agent's instances, by the sidecar key each serves.
pub struct Instances {
    key: StaticKey,
    mode: Mode,
}

enum Mode {
    /// A swap or an outbound-only agent: one instance, locked to the first key admitted.
    Single(Arc<Instance>),
    /// An intercept agent: an instance per key, created on first sight.
    PerKey { shared: Shared, slots: Mutex<HashMap<[u8; 32], Slot>> },
}

struct Slot {
    instance: Arc<Instance>,
    /// Transport streams open now.
    streams: usize,
    /// When the last of them closed.
    idle_since: Instant,
}

/// Why a sidecar's key was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("refusing a second peer: this agent's session is locked to the first sidecar that connected")]
    Locked,
    #[error("refusing another session: this agent holds {MAX_SESSIONS} already")]
    Full,
}

/// An admitted transport stream: the instance it feeds, held open while it lives.
pub struct Admitted {
    pub instance: Arc<Instance>,
    _stream: Option<StreamGuard>,
}

/// Counts one open transport stream of an intercept agent's instance.
struct StreamGuard {
    instances: Arc<Instances>,
    key: [u8; 32],
    /// The instance counted: the key's slot may hold a newer one by the
    /// time the stream ends, if this one was dropped as broken.
    instance: Weak<Instance>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Mode::PerKey { slots, .. } = &self.instances.mode
            && let Some(slot) = lock(slots).get_mut(&self.key)
            && std::ptr::eq(Arc::as_ptr(&slot.instance), self.instance.as_ptr())
        {
            slot.streams -= 1;
            slot.idle_since = Instant::now();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Instances {
    /// `instance` alone, locked to the first key admitted (a swap, or outbound only).
    pub fn single(shared: &Shared, instance: Arc<Instance>) -> Arc<Instances> {
        Arc::new(Instances { key: shared.key.clone(), mode: Mode::Single(instance) })
    }

    /// An instance per sidecar key (an intercept agent).
    pub fn per_key(shared: Shared) -> Arc<Instances> {
        Arc::new(Instances { key: shared.key.clone(), mode: Mode::PerKey { shared, slots: Mutex::default() } })
    }

    /// The key every instance holds, which the transport's hello says.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.public_key()
    }

    /// The instance for a transport stream from the sidecar with `key`.
    pub fn admit(self: &Arc<Self>, key: [u8; 32]) -> Result<Admitted, Refused> {
        let (shared, slots) = match &self.mode {
            Mode::Single(instance) => {
                return match instance.wg.lock_peer(key) {
                    true => Ok(Admitted { instance: instance.clone(), _stream: None }),
                    false => Err(Refused::Locked),
                };
            }
            Mode::PerKey { shared, slots } => (shared, slots),
        };
        let mut slots = lock(slots);
        let held = slots.len();
        let slot = match slots.entry(key) {
            Entry::Occupied(slot) => slot.into_mut(),
            Entry::Vacant(_) if held >= MAX_SESSIONS => return Err(Refused::Full),
            Entry::Vacant(slot) => {
                let instance = Instance::start(shared);
                instance.wg.set_peer(key);
                tracing::info!(sessions = held + 1, "a new sidecar key: started its session");
                slot.insert(Slot { instance, streams: 0, idle_since: Instant::now() })
            }
        };
        slot.streams += 1;
        let instance = slot.instance.clone();
        let counted = StreamGuard { instances: self.clone(), key, instance: Arc::downgrade(&instance) };
        Ok(Admitted { instance, _stream: Some(counted) })
    }

    /// The instance whose sidecar said `session` in its control hello. A
    /// sidecar that restarted has a new key, so for a while (until the old
    /// one idles out) two instances may say it: the one whose control
    /// connection is up is the session's now.
    pub fn by_session(&self, session: &str) -> Option<Arc<Instance>> {
        let serves = |i: &Arc<Instance>| i.control.session().as_deref() == Some(session);
        match &self.mode {
            Mode::Single(instance) => Some(instance.clone()).filter(serves),
            Mode::PerKey { slots, .. } => {
                let slots = lock(slots);
                let serving = slots.values().map(|s| &s.instance).filter(|i| serves(i));
                serving.max_by_key(|i| i.control.connected()).cloned()
            }
        }
    }

    /// Drops the instances idle for `idle` (no transport stream) or broken
    /// (a task of theirs ended), every `every`. Runs for the agent's life.
    pub async fn sweep(self: Arc<Self>, idle: Duration, every: Duration) {
        let Mode::PerKey { slots, .. } = &self.mode else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(every).await;
            lock(slots).retain(|_, slot| {
                if slot.instance.broken() {
                    tracing::warn!("a session's task ended; dropping the session");
                    return false;
                }
                let keep = slot.streams > 0 || slot.idle_since.elapsed() < idle;
                if !keep {
                    tracing::info!("dropped a session with no transport stream for {}s", idle.as_secs());
                }
                keep
            });
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        match &self.mode {
            Mode::Single(_) => 1,
            Mode::PerKey { slots, .. } => lock(slots).len(),
        }
    }
}

/// What the tests' instances share: no mounts, no nameservers, no neighbours.
#[cfg(test)]
pub fn test_shared() -> Shared {
    Shared {
        key: StaticKey::generate(),
        mounts: Arc::new(files::MountTable::new(Vec::new())),
        nameservers: Arc::from(Vec::new()),
        own: Own::default(),
        pod_ports: watch::Sender::new(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_swap_locks_to_the_first_key() {
        let shared = test_shared();
        let instances = Instances::single(&shared, Instance::start(&shared));
        assert!(instances.admit([1; 32]).is_ok());
        assert!(instances.admit([1; 32]).is_ok(), "the same sidecar redials");
        assert!(matches!(instances.admit([2; 32]), Err(Refused::Locked)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_intercept_agent_holds_a_session_per_key_until_it_idles() {
        let instances = Instances::per_key(test_shared());
        let alice = instances.admit([1; 32]).unwrap();
        let bob = instances.admit([2; 32]).unwrap();
        assert!(!Arc::ptr_eq(&alice.instance, &bob.instance));
        assert_eq!(alice.instance.wg.public_key(), bob.instance.wg.public_key(), "one agent key");
        assert_eq!(alice.instance.wg.peer_key(), Some([1; 32]));
        let again = instances.admit([1; 32]).unwrap();
        assert!(Arc::ptr_eq(&alice.instance, &again.instance), "a redial finds its session");
        assert_eq!(instances.len(), 2);

        tokio::spawn(instances.clone().sweep(IDLE, Duration::from_secs(1)));
        drop((alice, again));
        tokio::time::sleep(IDLE / 2).await;
        assert_eq!(instances.len(), 2, "alice is idle, not yet gone");
        tokio::time::sleep(IDLE).await;
        assert_eq!(instances.len(), 1, "alice idled out; bob's stream is open");
        drop(bob);
        tokio::time::sleep(IDLE * 2).await;
        assert_eq!(instances.len(), 0);
    }

    #[tokio::test]
    async fn an_intercept_agent_refuses_past_its_bound() {
        let instances = Instances::per_key(test_shared());
        let held: Vec<_> = (0..MAX_SESSIONS).map(|i| instances.admit([i as u8; 32]).unwrap()).collect();
        assert!(matches!(instances.admit([0xff; 32]), Err(Refused::Full)));
        assert!(instances.admit([0; 32]).is_ok(), "a known key still gets in");
        drop(held);
    }
}
