//! Keeps a session's routes registered with every intercept agent of its
//! workload. The agents have no API access: what they know of a session
//! comes from here, over a port-forward to each pod's intercept port (so
//! only someone Kubernetes lets port-forward can register), renewed every
//! `intercept::RENEW_EVERY`. One pod is the session's *home*, where its
//! sidecar's tunnel goes (the relay follows [`Registrar::home`]); every
//! registration names the home, so an agent that reads a matching request
//! elsewhere relays it there.
//!
//! Pods come and go (a rollout, a replaced pod, a scale): the workload's
//! pods are watched, new ready agent pods are registered with, and a home
//! that is gone is replaced, which every agent is told. A session that
//! stops renewing (tpd killed) is forgotten by the agents when its lease
//! runs out; a session that ends unregisters at once.
//!
//! Every agent's reply says what it did for the session; the sum over the
//! pods ([`Tally`]) goes into the session's entry at its next renewal, for
//! `tpd status`, and a port where an agent saw TLS is said once here.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tpd_wire::intercept::{self, Reply, Request, Route, Traffic};
use tpd_wire::preamble::{self, Kind};
use tracing::{debug, info};

use crate::cluster::Cluster;
use crate::output::progress;
use crate::rollout::is_ready;
use crate::session::portforward;

/// How long a registration task waits before it dials a failed agent again.
const REDIAL_AFTER: Duration = Duration::from_secs(1);
/// How long one request to an agent may take before the stream is redialled.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// How long the first registration may take (a home pod must be ready).
const FIRST_WITHIN: Duration = Duration::from_secs(60);
/// Bound on unregistering when the session ends.
const UNREGISTER_WITHIN: Duration = Duration::from_secs(3);

/// What the session tells every agent.
#[derive(Debug, Clone)]
pub struct Registration {
    pub session: String,
    /// Secret: relays between agents show it; never logged.
    pub token: String,
    pub holder: String,
    /// RFC 3339.
    pub since: String,
    pub routes: Vec<Route>,
}

/// A pod of the workload whose intercept agent is ready, with its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPod {
    pub name: String,
    pub ip: IpAddr,
    /// The agent's WireGuard transport port (where the relay forwards).
    pub transport: u16,
    /// The agent's intercept port (registrations; relays between agents).
    pub intercept: u16,
}

impl AgentPod {
    /// The pod, when it is ready, not terminating, and runs the agent.
    fn of(pod: &Pod) -> Option<AgentPod> {
        if pod.metadata.deletion_timestamp.is_some() || !is_ready(pod) {
            return None;
        }
        let agent = pod.spec.as_ref()?.containers.iter().find(|c| c.name == intercept::AGENT_CONTAINER)?;
        let port = |name: &str| {
            agent
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok())
        };
        Some(AgentPod {
            name: pod.metadata.name.clone()?,
            ip: pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?,
            transport: port(intercept::TRANSPORT_PORT_NAME)?,
            intercept: port(intercept::INTERCEPT_PORT_NAME)?,
        })
    }

    fn intercept_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.intercept)
    }
}

/// A session's registrations, kept until [`Registrar::end`].
#[derive(Debug)]
pub struct Registrar {
    home: watch::Receiver<Option<AgentPod>>,
    stop: CancellationToken,
    manager: JoinHandle<()>,
}

/// What every agent last said the session got, summed into the figures
/// the session's entry carries.
#[derive(Debug)]
struct Tally {
    by_pod: HashMap<String, Traffic>,
    /// What pods that are gone counted (their copies; not the last minute).
    gone: Traffic,
    /// Ports whose TLS the user was told of.
    warned: BTreeSet<u16>,
    figures: Arc<watch::Sender<Traffic>>,
}

impl Tally {
    fn new(figures: Arc<watch::Sender<Traffic>>) -> Self {
        Tally { by_pod: HashMap::new(), gone: Traffic::default(), warned: BTreeSet::new(), figures }
    }

    fn heard(&mut self, pod: &str, traffic: Traffic) {
        for &port in &traffic.tls_ports {
            if self.warned.insert(port) {
                progress(&format!(
                    "warning: clients speak TLS to port {port}: no filter can read those requests, so they go to \
                     the real container (and are not copied)"
                ));
            }
        }
        self.by_pod.insert(pod.to_owned(), traffic);
        self.publish();
    }

    fn forget(&mut self, pod: &str) {
        if let Some(last) = self.by_pod.remove(pod) {
            self.gone.mirrored += last.mirrored;
            self.gone.dropped += last.dropped;
            self.publish();
        }
    }

    fn publish(&self) {
        let mut sum = self.gone.clone();
        self.by_pod.values().for_each(|t| sum.add(t));
        self.figures.send_replace(sum);
    }
}

fn lock(tally: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    tally.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a registration task reports to the manager.
enum News {
    Registered(String),
    Refused(String),
}

/// Registers `reg` with every ready agent of the pods `selector` picks, and
/// returns once the home agent has accepted it. A refusal (the same filter
/// as a live session's) fails here with the agent's message; one later (a
/// new pod whose agent knows a conflicting session) ends the session by
/// cancelling `session_end`. What the agents say the session got goes to
/// `figures`.
pub async fn start(
    cluster: &Cluster,
    selector: String,
    reg: Registration,
    figures: Arc<watch::Sender<Traffic>>,
    session_end: CancellationToken,
) -> anyhow::Result<Registrar> {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let (home_tx, home) = watch::channel(None);
    let (news_tx, mut news) = mpsc::channel(16);
    let stop = CancellationToken::new();
    let manager = Manager {
        pods,
        client: cluster.client.clone(),
        namespace: cluster.namespace.clone(),
        selector,
        reg,
        home: home_tx,
        news: news_tx,
        tally: Arc::new(Mutex::new(Tally::new(figures))),
        stop: stop.clone(),
    };
    let manager = tokio::spawn(manager.run());
    let registrar = Registrar { home, stop, manager };
    let first = async {
        loop {
            match news.recv().await {
                Some(News::Registered(pod)) if registrar.home_is(&pod) => return Ok(()),
                Some(News::Registered(_)) => {}
                Some(News::Refused(message)) => return Err(anyhow::anyhow!(message)),
                None => anyhow::bail!("the intercept registration stopped"),
            }
        }
    };
    let outcome = tokio::select! {
        r = tokio::time::timeout(FIRST_WITHIN, first) => r.unwrap_or_else(|_| Err(anyhow::anyhow!(
            "no intercept agent of the workload accepted the session within {} s", FIRST_WITHIN.as_secs()
        ))),
        () = session_end.cancelled() => Err(anyhow::anyhow!("interrupted before the intercept was registered")),
    };
    if let Err(e) = outcome {
        registrar.end().await;
        return Err(e);
    }
    tokio::spawn(async move {
        while let Some(n) = news.recv().await {
            if let News::Refused(message) = n {
                progress(&format!("{message}; ending the session"));
                session_end.cancel();
            }
        }
    });
    Ok(registrar)
}

impl Registrar {
    /// The pod whose agent holds the session's tunnel, as it changes.
    pub fn home(&self) -> watch::Receiver<Option<AgentPod>> {
        self.home.clone()
    }

    fn home_is(&self, pod: &str) -> bool {
        self.home.borrow().as_ref().is_some_and(|h| h.name == pod)
    }

    /// Unregisters from every agent (bounded), so requests that matched the
    /// session go to the real app at once instead of after the lease.
    pub async fn end(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(UNREGISTER_WITHIN + Duration::from_secs(1), self.manager).await;
    }
}

struct Manager {
    pods: Api<Pod>,
    client: kube::Client,
    namespace: String,
    selector: String,
    reg: Registration,
    home: watch::Sender<Option<AgentPod>>,
    news: mpsc::Sender<News>,
    tally: Arc<Mutex<Tally>>,
    stop: CancellationToken,
}

impl Manager {
    async fn run(self) {
        let mut tasks: HashMap<String, JoinHandle<()>> = HashMap::new();
        let (pods, writer) = reflector::store();
        let config = watcher::Config::default().labels(&self.selector);
        let mut events = std::pin::pin!(reflector(writer, watcher(self.pods.clone(), config)).default_backoff());
        loop {
            tokio::select! {
                event = events.next() => match event {
                    // The watch retries with backoff; pods known so far stay.
                    Some(Err(e)) => debug!("watching the workload's pods: {e}"),
                    Some(Ok(_)) => {}
                    // It never ends, as it retries; were it to, the
                    // registrations go on as they are until the session ends.
                    None => {
                        self.stop.cancelled().await;
                        break;
                    }
                },
                () = self.stop.cancelled() => break,
            }
            let ready: Vec<AgentPod> = pods.state().iter().filter_map(|p| AgentPod::of(p)).collect();
            self.choose_home(&ready);
            tasks.retain(|name, task| {
                let keep = ready.iter().any(|p| &p.name == name) && !task.is_finished();
                if !keep {
                    task.abort();
                    lock(&self.tally).forget(name);
                }
                keep
            });
            for pod in ready {
                tasks.entry(pod.name.clone()).or_insert_with(|| tokio::spawn(self.keep_registered(pod)));
            }
        }
        // Each task unregisters when it sees `stop`.
        let all = futures::future::join_all(tasks.into_values());
        let _ = tokio::time::timeout(UNREGISTER_WITHIN, all).await;
    }

    /// Keeps the home while it is ready; else takes the first ready pod.
    fn choose_home(&self, ready: &[AgentPod]) {
        let current = self.home.borrow().clone();
        if let Some(home) = &current
            && ready.contains(home)
        {
            return;
        }
        let next = ready.first().cloned();
        if next != current {
            if let (Some(old), Some(new)) = (&current, &next) {
                progress(&format!("the intercept's home pod {} is gone; moving to {}", old.name, new.name));
            }
            self.home.send_replace(next);
        }
    }

    /// A task that keeps `pod`'s agent told about the session, redialling
    /// when its stream fails, until the manager aborts it (the pod is gone)
    /// or the session ends.
    fn keep_registered(&self, pod: AgentPod) -> impl Future<Output = ()> + use<> {
        let agent = Agent {
            client: self.client.clone(),
            namespace: self.namespace.clone(),
            pod,
            reg: self.reg.clone(),
            home: self.home.subscribe(),
            news: self.news.clone(),
            tally: self.tally.clone(),
            stop: self.stop.clone(),
        };
        async move {
            loop {
                match agent.session().await {
                    Ok(()) => return,
                    Err(e) => info!(pod = %agent.pod.name, "intercept registration: {e:#}; dialling again"),
                }
                tokio::select! {
                    () = tokio::time::sleep(REDIAL_AFTER) => {}
                    () = agent.stop.cancelled() => return,
                }
            }
        }
    }
}

/// One agent's registration stream.
struct Agent {
    client: kube::Client,
    namespace: String,
    pod: AgentPod,
    reg: Registration,
    home: watch::Receiver<Option<AgentPod>>,
    news: mpsc::Sender<News>,
    tally: Arc<Mutex<Tally>>,
    stop: CancellationToken,
}

impl Agent {
    /// Registers, renews and follows the home until the session ends
    /// (`Ok`, after unregistering) or the stream fails.
    async fn session(&self) -> anyhow::Result<()> {
        let mut home = self.home.clone();
        // Every registration names the home: none until the manager chose one.
        home.wait_for(Option::is_some).await?;
        let mut conn = self.connect().await?;
        let mut registered_home = None;
        loop {
            let current = home.borrow_and_update().clone();
            let request = match current {
                Some(h) if registered_home.as_ref() != Some(&h) => {
                    let r = self.register(&h);
                    registered_home = Some(h);
                    r
                }
                _ => Request::Renew,
            };
            let registering = matches!(request, Request::Register { .. });
            match conn.ask(&request).await? {
                Reply::Ok { traffic } => {
                    lock(&self.tally).heard(&self.pod.name, traffic);
                    if registering {
                        debug!(pod = %self.pod.name, "intercept registered");
                        let _ = self.news.send(News::Registered(self.pod.name.clone())).await;
                    }
                }
                Reply::Refused { message } if registering => {
                    let _ = self.news.send(News::Refused(message)).await;
                    return Ok(());
                }
                // A renewal the agent does not take (its container restarted
                // and forgot, or the lease lapsed while the API server
                // stalled): register again at once.
                Reply::Refused { message } => {
                    info!(pod = %self.pod.name, "{message}");
                    registered_home = None;
                    continue;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(intercept::RENEW_EVERY) => {}
                changed = home.changed() => changed?,
                () = self.stop.cancelled() => {
                    let _ = tokio::time::timeout(UNREGISTER_WITHIN, conn.ask(&Request::Unregister)).await;
                    return Ok(());
                }
            }
        }
    }

    fn register(&self, home: &AgentPod) -> Request {
        let r = &self.reg;
        Request::Register {
            session: r.session.clone(),
            token: r.token.clone(),
            holder: r.holder.clone(),
            since: r.since.clone(),
            home: home.intercept_addr(),
            routes: r.routes.clone(),
        }
    }

    async fn connect(&self) -> anyhow::Result<Conn> {
        let forward = portforward::open(&self.client, &self.namespace, &self.pod.name, self.pod.intercept).await?;
        let (mut ours, theirs) = tokio::io::duplex(64 * 1024);
        let relay = tokio::spawn(async move {
            if let Err(e) = forward.relay(theirs).await {
                debug!("intercept registration port-forward closed: {e}");
            }
        });
        ours.write_all(&preamble::encode(Kind::Register)).await?;
        Ok(Conn { stream: ours, buf: BytesMut::new(), relay })
    }
}

/// A registration stream through a port-forward.
struct Conn {
    stream: DuplexStream,
    buf: BytesMut,
    relay: JoinHandle<()>,
}

impl Conn {
    async fn ask(&mut self, request: &Request) -> anyhow::Result<Reply> {
        let mut out = BytesMut::new();
        tpd_wire::control::encode(request, &mut out)?;
        let exchange = async {
            self.stream.write_all(&out).await?;
            loop {
                if let Some(reply) = tpd_wire::control::decode::<Reply>(&mut self.buf)? {
                    return Ok(reply);
                }
                if self.stream.read_buf(&mut self.buf).await? == 0 {
                    anyhow::bail!("the agent closed the registration stream");
                }
            }
        };
        tokio::time::timeout(ANSWER_WITHIN, exchange)
            .await
            .map_err(|_| anyhow::anyhow!("the agent did not answer within {} s", ANSWER_WITHIN.as_secs()))?
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.relay.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodCondition, PodSpec, PodStatus};

    fn pod(name: &str, ready: bool, agent: bool) -> Pod {
        let port =
            |name: &str, n: i32| ContainerPort { name: Some(name.into()), container_port: n, ..Default::default() };
        let mut containers = vec![Container { name: "app".into(), ..Default::default() }];
        if agent {
            containers.push(Container {
                name: intercept::AGENT_CONTAINER.into(),
                ports: Some(vec![
                    port(intercept::TRANSPORT_PORT_NAME, 7700),
                    port(intercept::INTERCEPT_PORT_NAME, 7701),
                    port("tpd-8080", 7702),
                ]),
                ..Default::default()
            });
        }
        Pod {
            metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
            spec: Some(PodSpec { containers, ..Default::default() }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some("10.244.0.9".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_figures_add_up_over_the_pods_and_keep_what_gone_pods_copied() {
        let (figures, read) = watch::channel(Traffic::default());
        let mut tally = Tally::new(Arc::new(figures));
        let said = |last_minute, mirrored, dropped| Traffic { last_minute, mirrored, dropped, tls_ports: vec![] };
        tally.heard("api-1", said(5, 10, 1));
        tally.heard("api-2", said(2, 4, 0));
        tally.heard("api-1", said(6, 12, 1));
        assert_eq!(*read.borrow(), said(8, 16, 1));
        tally.forget("api-1");
        assert_eq!(*read.borrow(), said(2, 16, 1), "a replaced pod's copies still count");
        tally.forget("api-9");
        tally.heard("api-3", Traffic { tls_ports: vec![8443], ..said(0, 0, 0) });
        assert_eq!(read.borrow().tls_ports, [8443]);
        assert!(tally.warned.contains(&8443));
    }

    #[test]
    fn only_ready_pods_running_the_agent_are_registered_with() {
        let found = AgentPod::of(&pod("api-1", true, true)).unwrap();
        assert_eq!(found.transport, 7700);
        assert_eq!(found.intercept_addr(), "10.244.0.9:7701".parse().unwrap());
        // Not ready yet, or an old pod of the rollout without the agent.
        assert_eq!(AgentPod::of(&pod("api-2", false, true)), None);
        assert_eq!(AgentPod::of(&pod("api-3", true, false)), None);
    }
}
