//! The pod reconciler: watches the pods bound to this node and drives one
//! worker per pod that runs its containers and reports its status.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::{CreateContainerOptionsBuilder, StopContainerOptionsBuilder};
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Event, EventSource, ObjectReference, Pod, PodStatus, Secret, Service, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::env::{self, PodSources};
use super::probe::Prober;
use super::runtime::{self, LABEL_POD_UID, PAUSE_CONTAINER};
use super::spec::{self, Observed, PodView};
use super::volumes::{self, PodVolumes, ServiceAccountFiles};
use crate::layout;

/// How often a worker looks at its containers when nothing else happens.
const TICK: Duration = Duration::from_millis(500);
/// Crash-loop back-off: doubles from the first to the cap (the real kubelet
/// uses 10 s to 5 min; the sandbox is for tests, so it is shorter).
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(20);
/// After this long, ErrImagePull turns into ImagePullBackOff.
const PULL_BACKOFF_AFTER: Duration = Duration::from_secs(2);

pub struct Kubelet {
    pub docker: Docker,
    pub client: kube::Client,
    pub instance: String,
    pub state_dir: PathBuf,
    pub host_ip: String,
}

/// Watches this node's pods until shutdown.
pub async fn run(k: Arc<Kubelet>, shutdown: CancellationToken) {
    let api: Api<Pod> = Api::all(k.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", layout::NODE_NAME));
    let mut events = watcher(api, cfg).boxed();
    let mut workers: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let mut listed: BTreeSet<String> = BTreeSet::new();
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            e = events.next() => e,
        };
        let Some(event) = event else { return };
        match event {
            Ok(watcher::Event::Init) => listed.clear(),
            Ok(watcher::Event::InitApply(pod)) => {
                listed.insert(pod.metadata.uid.clone().unwrap_or_default());
                dispatch(&k, &mut workers, pod, &shutdown);
            }
            Ok(watcher::Event::InitDone) => {
                // Pods deleted while the watch was down: tear their workers down.
                let gone: Vec<String> = workers.keys().filter(|uid| !listed.contains(*uid)).cloned().collect();
                for uid in gone {
                    if let Some(tx) = workers.remove(&uid) {
                        let _ = tx.send(None);
                    }
                }
                if let Err(e) = remove_orphans(&k, &listed).await {
                    tracing::warn!(error = %e, "removing containers of pods that are gone");
                }
            }
            Ok(watcher::Event::Apply(pod)) => dispatch(&k, &mut workers, pod, &shutdown),
            Ok(watcher::Event::Delete(pod)) => {
                if let Some(tx) = workers.remove(pod.metadata.uid.as_deref().unwrap_or_default()) {
                    let _ = tx.send(None);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "pod watch");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        workers.retain(|_, tx| !tx.is_closed());
    }
}

fn dispatch(
    k: &Arc<Kubelet>,
    workers: &mut HashMap<String, watch::Sender<Option<Pod>>>,
    pod: Pod,
    shutdown: &CancellationToken,
) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    if let Some(tx) = workers.get(&uid)
        && tx.send(Some(pod.clone())).is_ok()
    {
        return;
    }
    let (tx, rx) = watch::channel(Some(pod));
    workers.insert(uid, tx);
    tokio::spawn(Worker::new(k.clone(), rx).run(shutdown.clone()));
}

/// Containers of pods the API no longer has (the server was down when
/// they were deleted).
async fn remove_orphans(k: &Kubelet, live: &BTreeSet<String>) -> runtime::Result<()> {
    for c in runtime::list_containers(&k.docker, &k.instance, &[]).await? {
        let uid = c.labels.as_ref().and_then(|l| l.get(LABEL_POD_UID));
        if let (Some(uid), Some(id)) = (uid, c.id)
            && !live.contains(uid)
        {
            runtime::remove_container(&k.docker, &id).await?;
            let _ = std::fs::remove_dir_all(volumes::pod_dir(&k.state_dir, uid));
        }
    }
    Ok(())
}

/// One container slot of the pod across its restarts.
#[derive(Default)]
struct Slot {
    obs: Observed,
    id: Option<String>,
    attempt: u32,
    backoff_until: Option<Instant>,
    image_missing_since: Option<Instant>,
    prober: Prober,
}

struct Sandbox {
    pause_id: String,
    ip: String,
    sources: PodSources,
    volumes: PodVolumes,
}

struct Worker {
    k: Arc<Kubelet>,
    rx: watch::Receiver<Option<Pod>>,
    pod: Pod,
    sandbox: Option<Sandbox>,
    init: Vec<Slot>,
    init_done: usize,
    main: Vec<Slot>,
    terminal: Option<&'static str>,
    last_status: Option<serde_json::Value>,
}

impl Worker {
    fn new(k: Arc<Kubelet>, rx: watch::Receiver<Option<Pod>>) -> Self {
        let pod = rx.borrow().clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let slots = |cs: &[Container]| -> Vec<Slot> {
            cs.iter()
                .map(|c| Slot {
                    obs: Observed {
                        name: c.name.clone(),
                        image: c.image.clone().unwrap_or_default(),
                        ..Default::default()
                    },
                    ..Default::default()
                })
                .collect()
        };
        let init = slots(spec.init_containers.as_deref().unwrap_or_default());
        let main = slots(&spec.containers);
        let terminal = match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
            Some("Succeeded") => Some("Succeeded"),
            Some("Failed") => Some("Failed"),
            _ => None,
        };
        Self { k, rx, pod, sandbox: None, init, init_done: 0, main, terminal, last_status: None }
    }

    fn name(&self) -> String {
        format!(
            "{}/{}",
            self.pod.metadata.namespace.as_deref().unwrap_or_default(),
            self.pod.metadata.name.as_deref().unwrap_or_default()
        )
    }

    async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let current = self.rx.borrow_and_update().clone();
            match current {
                None => return self.terminate(false).await,
                Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
                    self.pod = pod;
                    return self.terminate(true).await;
                }
                Some(pod) => self.pod = pod,
            }
            if self.terminal.is_none()
                && let Err(e) = self.step().await
            {
                tracing::warn!(pod = %self.name(), error = %e, "pod step");
            }
            self.publish().await;
            tokio::select! {
                () = shutdown.cancelled() => return,
                r = self.rx.changed() => if r.is_err() { return self.terminate(false).await },
                () = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// One reconcile pass: sandbox, init containers in order, then the app
    /// containers and their restarts and probes.
    async fn step(&mut self) -> anyhow::Result<()> {
        if self.sandbox.is_none() {
            match self.make_sandbox().await {
                Ok(sb) => self.sandbox = Some(sb),
                Err(e) => {
                    let reason = format!("{e:#}");
                    for slot in self.init.iter_mut().chain(self.main.iter_mut()) {
                        slot.obs.waiting = Some(("ContainerCreating".into(), reason.clone()));
                    }
                    return Err(e);
                }
            }
        }
        let policy = self.pod.spec.as_ref().and_then(|s| s.restart_policy.clone()).unwrap_or_else(|| "Always".into());
        let spec = self.pod.spec.clone().unwrap_or_default();
        let init_specs = spec.init_containers.unwrap_or_default();
        while self.init_done < init_specs.len() {
            let i = self.init_done;
            self.observe(true, i).await;
            let slot = &self.init[i];
            match slot.obs.current.as_ref().map(|(_, s)| s.clone()) {
                Some(s) if spec::has_exited(&s) && s.exit_code == Some(0) => {
                    self.init_done += 1;
                    continue;
                }
                Some(s) if spec::has_exited(&s) => {
                    if policy == "Never" {
                        self.terminal = Some("Failed");
                        return Ok(());
                    }
                    self.restart_or_wait(true, i, &init_specs[i]).await?;
                }
                Some(_) => {}
                None => self.start(true, i, &init_specs[i]).await?,
            }
            return Ok(());
        }
        for (i, c) in spec.containers.iter().enumerate() {
            self.observe(false, i).await;
            let state = self.main[i].obs.current.as_ref().map(|(_, s)| s.clone());
            match state {
                None => self.start(false, i, c).await?,
                Some(s) if spec::has_exited(&s) => {
                    let restart = match policy.as_str() {
                        "Never" => false,
                        "OnFailure" => s.exit_code != Some(0),
                        _ => true,
                    };
                    if restart {
                        self.restart_or_wait(false, i, c).await?;
                    }
                }
                Some(_) => self.probe(i, c).await,
            }
        }
        self.settle_terminal(&policy);
        Ok(())
    }

    /// Succeeded/Failed once no container runs and none will restart.
    fn settle_terminal(&mut self, policy: &str) {
        let codes: Vec<Option<i64>> = self
            .main
            .iter()
            .map(|s| {
                s.obs
                    .current
                    .as_ref()
                    .filter(|(_, st)| spec::has_exited(st))
                    .and_then(|(_, st)| st.exit_code.or(Some(1)))
            })
            .collect();
        if codes.iter().any(Option::is_none) || self.main.iter().any(|s| s.obs.waiting.is_some()) {
            return;
        }
        let all_ok = codes.iter().all(|c| *c == Some(0));
        self.terminal = match policy {
            "Never" => Some(if all_ok { "Succeeded" } else { "Failed" }),
            "OnFailure" if all_ok => Some("Succeeded"),
            _ => None,
        };
    }

    fn slot(&mut self, init: bool, i: usize) -> &mut Slot {
        if init { &mut self.init[i] } else { &mut self.main[i] }
    }

    /// Refreshes a slot's view of its current Docker container.
    async fn observe(&mut self, init: bool, i: usize) {
        let docker = self.k.docker.clone();
        let slot = self.slot(init, i);
        let Some(id) = slot.id.clone() else { return };
        match docker.inspect_container(&id, None).await {
            Ok(info) => {
                if let Some(state) = info.state {
                    if spec::has_exited(&state) {
                        slot.obs.ready = false;
                    }
                    slot.obs.current = Some((id, state));
                }
                if let Some(image) = info.image {
                    slot.obs.image_id = format!("docker-pullable://{image}");
                }
            }
            Err(e) if runtime::status_of(&e) == Some(404) => {
                // Someone removed it: start over as a restart.
                slot.id = None;
                slot.obs.current = None;
            }
            Err(e) => tracing::debug!(error = %e, "inspecting container"),
        }
    }

    async fn restart_or_wait(&mut self, init: bool, i: usize, c: &Container) -> anyhow::Result<()> {
        let now = Instant::now();
        let slot = self.slot(init, i);
        match slot.backoff_until {
            None => {
                let exp = slot.attempt.min(5);
                let delay = (BACKOFF_FIRST * 2u32.pow(exp)).min(BACKOFF_CAP);
                slot.backoff_until = Some(now + delay);
                if let Some((id, s)) = &slot.obs.current {
                    slot.obs.last_terminated = Some(spec::terminated(id, s));
                }
                let name = slot.obs.name.clone();
                slot.obs.waiting = Some((
                    "CrashLoopBackOff".into(),
                    format!("back-off {}s restarting failed container={name}", delay.as_secs()),
                ));
                self.event(
                    true,
                    "BackOff",
                    format!("Back-off restarting failed container {name} in pod {}", self.name()),
                );
                Ok(())
            }
            Some(until) if now < until => Ok(()),
            Some(_) => {
                slot.backoff_until = None;
                slot.attempt += 1;
                slot.obs.restart_count += 1;
                slot.obs.current = None;
                let previous = slot.id.take();
                self.start(init, i, c).await?;
                // Keep the previous instance for `logs --previous`, drop older ones.
                self.remove_older(init, i, previous.as_deref()).await;
                Ok(())
            }
        }
    }

    async fn remove_older(&self, init: bool, i: usize, keep: Option<&str>) {
        let slot = if init { &self.init[i] } else { &self.main[i] };
        let Ok(all) = runtime::list_containers(
            &self.k.docker,
            &self.k.instance,
            &[
                (LABEL_POD_UID, self.pod.metadata.uid.as_deref().unwrap_or_default()),
                (runtime::LABEL_CONTAINER, &slot.obs.name),
            ],
        )
        .await
        else {
            return;
        };
        for c in all {
            let Some(id) = c.id else { continue };
            if Some(id.as_str()) != keep && Some(&id) != slot.id.as_ref() {
                let _ = runtime::remove_container(&self.k.docker, &id).await;
            }
        }
    }

    /// Creates and starts the slot's next container instance.
    async fn start(&mut self, init: bool, i: usize, c: &Container) -> anyhow::Result<()> {
        let image = c.image.clone().unwrap_or_default();
        let found = match self.k.docker.inspect_image(&image).await {
            Ok(found) => Some(found),
            Err(e) if runtime::status_of(&e) != Some(404) => return Err(e.into()),
            Err(_) => None,
        };
        let Some(found) = found else {
            let slot = self.slot(init, i);
            let first = slot.image_missing_since.is_none();
            let since = *slot.image_missing_since.get_or_insert_with(Instant::now);
            if first {
                self.event(
                    true,
                    "Failed",
                    format!("Failed to pull image {image:?}: not present locally and the sandbox has no registry"),
                );
            }
            let slot = self.slot(init, i);
            let reason = if since.elapsed() < PULL_BACKOFF_AFTER { "ErrImagePull" } else { "ImagePullBackOff" };
            slot.obs.waiting = Some((
                reason.into(),
                format!(
                    "image {image:?} is not in the local Docker engine and the sandbox cannot pull: build or tag it locally"
                ),
            ));
            return Ok(());
        };
        let image_user = found.config.and_then(|c| c.user).unwrap_or_default();
        if let Err(e) = spec::verify_run_as_non_root(&self.pod, c, &image_user) {
            let waiting = Some(("CreateContainerConfigError".to_owned(), e.clone()));
            let slot = self.slot(init, i);
            let first = slot.obs.waiting != waiting;
            slot.obs.waiting = waiting;
            if first {
                self.event(true, "Failed", format!("Error: {e}"));
            }
            return Ok(());
        }
        let Some(sb) = &self.sandbox else {
            return Ok(());
        };
        let env = match env::container_env(&self.pod, c, &sb.sources) {
            Ok(env) => env,
            Err(e) => {
                self.slot(init, i).obs.waiting = Some(("CreateContainerConfigError".into(), e.to_string()));
                return Ok(());
            }
        };
        let binds = match sb.volumes.binds(c) {
            Ok(b) => b,
            Err(e) => {
                self.slot(init, i).obs.waiting = Some(("CreateContainerConfigError".into(), e.to_string()));
                return Ok(());
            }
        };
        let attempt = if init { self.init[i].attempt } else { self.main[i].attempt };
        let body = spec::container_body(&self.k.instance, &self.pod, c, attempt, &sb.pause_id, &env, binds);
        let name = spec::container_name(&self.k.instance, &self.pod, &c.name, attempt);
        let id = create_and_start(&self.k.docker, &name, body).await;
        let slot = self.slot(init, i);
        slot.image_missing_since = None;
        match id {
            Ok(id) => {
                slot.obs.waiting = None;
                slot.prober = Prober::default();
                slot.id = Some(id);
                self.event(false, "Pulled", format!("Container image {image:?} already present on machine"));
                self.event(false, "Created", format!("Created container {}", c.name));
                self.event(false, "Started", format!("Started container {}", c.name));
            }
            Err(e) => {
                slot.obs.waiting = Some(("RunContainerError".into(), e.to_string()));
                self.event(true, "Failed", format!("Error: {e}"));
            }
        }
        self.observe(init, i).await;
        Ok(())
    }

    async fn probe(&mut self, i: usize, c: &Container) {
        let Some(sb) = &self.sandbox else { return };
        let ip = sb.ip.clone();
        let docker = self.k.docker.clone();
        let slot = &mut self.main[i];
        let Some((id, state)) = slot.obs.current.clone() else {
            return;
        };
        let started = state.started_at.as_deref().and_then(|s| s.parse::<Timestamp>().ok());
        let outcome = slot.prober.tick(&docker, &ip, &id, c, started).await;
        slot.obs.ready = outcome.ready;
        if outcome.kill {
            let _ = docker.stop_container(&id, Some(StopContainerOptionsBuilder::default().t(1).build())).await;
        }
    }

    /// Pulls what env and volumes need, writes the volumes and starts the
    /// pause container.
    async fn make_sandbox(&mut self) -> anyhow::Result<Sandbox> {
        // The API reads and the pause container do not depend on each other.
        let (sources, sa, pause) = tokio::join!(self.fetch_sources(), self.service_account_files(), self.start_pause());
        let (pause_id, ip) = pause?;
        let mut sources = sources?;
        // Known only now, and needed by downward API volumes and env.
        sources.pod_ip = ip.clone();
        let vols = volumes::prepare(&self.pod, &sources, &sa, &self.k.state_dir)?;
        self.adopt_existing().await;
        Ok(Sandbox { pause_id, ip, sources, volumes: vols })
    }

    /// Starts the pod's pause container (reusing one an earlier run of the
    /// server left) and returns its id and the pod's IP.
    async fn start_pause(&self) -> anyhow::Result<(String, String)> {
        let name = spec::container_name(&self.k.instance, &self.pod, PAUSE_CONTAINER, 0);
        let existing = self.k.docker.inspect_container(&name, None).await.ok().and_then(|i| i.id);
        let pause_id = match existing {
            Some(id) => {
                let _ = self.k.docker.start_container(&id, None).await;
                id
            }
            None => create_and_start(&self.k.docker, &name, spec::pause_body(&self.k.instance, &self.pod)).await?,
        };
        let info = self.k.docker.inspect_container(&pause_id, None).await?;
        let ip = info
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|n| n.get(&runtime::network_name(&self.k.instance)).and_then(|e| e.ip_address.clone()))
            .filter(|ip| !ip.is_empty())
            .ok_or_else(|| anyhow::anyhow!("the pause container got no address on network {}", self.k.instance))?;
        Ok((pause_id, ip))
    }

    /// After a server restart, picks up the containers it had started.
    async fn adopt_existing(&mut self) {
        let uid = self.pod.metadata.uid.clone().unwrap_or_default();
        let Ok(found) = runtime::list_containers(&self.k.docker, &self.k.instance, &[(LABEL_POD_UID, &uid)]).await
        else {
            return;
        };
        for c in found {
            let labels = c.labels.unwrap_or_default();
            let (Some(name), Some(id)) = (labels.get(runtime::LABEL_CONTAINER), c.id) else {
                continue;
            };
            let attempt: u32 = labels.get(runtime::LABEL_ATTEMPT).and_then(|a| a.parse().ok()).unwrap_or(0);
            for slot in self.init.iter_mut().chain(self.main.iter_mut()) {
                if &slot.obs.name == name && (slot.id.is_none() || attempt >= slot.attempt) {
                    slot.id = Some(id.clone());
                    slot.attempt = attempt;
                    slot.obs.restart_count = i32::try_from(attempt).unwrap_or(i32::MAX);
                }
            }
        }
    }

    async fn fetch_sources(&self) -> anyhow::Result<PodSources> {
        let ns = self.pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let (cms, secrets) = referenced(&self.pod);
        let mut out = PodSources { host_ip: self.k.host_ip.clone(), ..Default::default() };
        let cm_api: Api<ConfigMap> = Api::namespaced(self.k.client.clone(), &ns);
        for name in cms {
            if let Some(cm) = cm_api.get_opt(&name).await? {
                out.config_maps.insert(name, cm);
            }
        }
        let secret_api: Api<Secret> = Api::namespaced(self.k.client.clone(), &ns);
        for name in secrets {
            if let Some(s) = secret_api.get_opt(&name).await? {
                out.secrets.insert(name, s);
            }
        }
        let svc_ns: Api<Service> = Api::namespaced(self.k.client.clone(), &ns);
        out.services = svc_ns.list(&ListParams::default()).await?.items;
        if ns != "default" {
            let default: Api<Service> = Api::namespaced(self.k.client.clone(), "default");
            out.services.extend(default.get_opt("kubernetes").await?);
        }
        Ok(out)
    }

    /// A token for the pod's service account (TokenRequest, as a kubelet
    /// asks for one) and the cluster CA from `kube-root-ca.crt`. A server
    /// that serves neither still gets the files, with what it has.
    async fn service_account_files(&self) -> ServiceAccountFiles {
        let ns = self.pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let sa =
            self.pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
        let api: Api<ServiceAccount> = Api::namespaced(self.k.client.clone(), &ns);
        let req = TokenRequest {
            spec: TokenRequestSpec { audiences: vec![], expiration_seconds: Some(3607), ..Default::default() },
            ..Default::default()
        };
        let token = match api.create_token_request(&sa, &Default::default(), &req).await {
            Ok(t) => t.status.map(|s| s.token).unwrap_or_default(),
            Err(e) => {
                tracing::debug!(error = %e, "TokenRequest failed; the token file holds a placeholder");
                format!("sandbox-token:{ns}:{sa}")
            }
        };
        let cm: Api<ConfigMap> = Api::namespaced(self.k.client.clone(), &ns);
        let ca_crt = cm
            .get_opt("kube-root-ca.crt")
            .await
            .ok()
            .flatten()
            .and_then(|c| c.data.and_then(|d| d.get("ca.crt").cloned()))
            .unwrap_or_default();
        ServiceAccountFiles { token, ca_crt }
    }

    /// Records a core/v1 Event about the pod, as `kubectl describe` shows
    /// them; best effort, in the background.
    fn event(&self, warning: bool, reason: &str, message: String) {
        let meta = &self.pod.metadata;
        let ns = meta.namespace.clone().unwrap_or_else(|| "default".into());
        let now = Time(Timestamp::now());
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", meta.name.as_deref().unwrap_or("pod"))),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: meta.name.clone(),
                namespace: Some(ns.clone()),
                uid: meta.uid.clone(),
                ..Default::default()
            },
            reason: Some(reason.into()),
            message: Some(message),
            type_: Some(if warning { "Warning" } else { "Normal" }.into()),
            source: Some(EventSource { component: Some("kubelet".into()), host: Some(layout::NODE_NAME.into()) }),
            reporting_component: Some("kubelet".into()),
            reporting_instance: Some(layout::NODE_NAME.into()),
            count: Some(1),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(self.k.client.clone(), &ns);
        tokio::spawn(async move {
            if let Err(e) = api.create(&PostParams::default(), &event).await {
                tracing::debug!(error = %e, "recording an event");
            }
        });
    }

    /// Writes the status when it changed since the last write.
    async fn publish(&mut self) {
        let view = PodView {
            pod_ip: self.sandbox.as_ref().map(|s| s.ip.clone()),
            host_ip: self.k.host_ip.clone(),
            init: self.init.iter().map(|s| s.obs.clone()).collect(),
            initialized: self.init_done >= self.init.len(),
            containers: self.main.iter().map(|s| s.obs.clone()).collect(),
            terminal: self.terminal,
        };
        let status: PodStatus = spec::pod_status(&view, self.pod.status.as_ref(), Timestamp::now());
        let Ok(value) = serde_json::to_value(&status) else {
            return;
        };
        if self.last_status.as_ref() == Some(&value) {
            return;
        }
        let api: Api<Pod> =
            Api::namespaced(self.k.client.clone(), self.pod.metadata.namespace.as_deref().unwrap_or("default"));
        let patch = serde_json::json!({ "status": value });
        match api
            .patch_status(
                self.pod.metadata.name.as_deref().unwrap_or_default(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(pod) => {
                self.pod.status = pod.status;
                self.last_status = Some(value);
            }
            Err(e) => tracing::debug!(pod = %self.name(), error = %e, "writing pod status"),
        }
    }

    /// Stops and removes the pod's containers; when the API asked for the
    /// deletion (`graceful`), finishes it by deleting the object.
    async fn terminate(&mut self, graceful: bool) {
        let grace = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| self.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
            .unwrap_or(30);
        let grace = if graceful { grace } else { grace.min(2) };
        let uid = self.pod.metadata.uid.clone().unwrap_or_default();
        if graceful {
            for slot in self.main.iter().filter(|s| s.id.is_some()) {
                self.event(false, "Killing", format!("Stopping container {}", slot.obs.name));
            }
        }
        if let Ok(all) = runtime::list_containers(&self.k.docker, &self.k.instance, &[(LABEL_POD_UID, &uid)]).await {
            let t = i32::try_from(grace).unwrap_or(30);
            // The app containers first, together; the pause container (the
            // network) last, so they can finish their connections.
            let (pause, apps): (Vec<_>, Vec<_>) = all.into_iter().partition(|c| {
                c.labels.as_ref().and_then(|l| l.get(runtime::LABEL_CONTAINER)).map(String::as_str)
                    == Some(PAUSE_CONTAINER)
            });
            for group in [apps, pause] {
                let stops = group.into_iter().filter_map(|c| c.id).map(|id| {
                    let docker = self.k.docker.clone();
                    async move {
                        let _ =
                            docker.stop_container(&id, Some(StopContainerOptionsBuilder::default().t(t).build())).await;
                        let _ = runtime::remove_container(&docker, &id).await;
                    }
                });
                futures::future::join_all(stops).await;
            }
        }
        let _ = std::fs::remove_dir_all(volumes::pod_dir(&self.k.state_dir, &uid));
        if graceful {
            let api: Api<Pod> =
                Api::namespaced(self.k.client.clone(), self.pod.metadata.namespace.as_deref().unwrap_or("default"));
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions { uid: Some(uid), resource_version: None }),
                ..Default::default()
            };
            if let Err(e) = api.delete(self.pod.metadata.name.as_deref().unwrap_or_default(), &dp).await {
                tracing::debug!(pod = %self.name(), error = %e, "finalizing pod deletion");
            }
        }
    }
}

async fn create_and_start(
    docker: &Docker,
    name: &str,
    body: bollard::models::ContainerCreateBody,
) -> anyhow::Result<String> {
    let opts = CreateContainerOptionsBuilder::default().name(name).build();
    let id = match docker.create_container(Some(opts.clone()), body.clone()).await {
        Ok(r) => r.id,
        Err(e) if runtime::status_of(&e) == Some(409) => {
            // A leftover with the same name (a crash between create and
            // record): replace it.
            runtime::remove_container(docker, name).await?;
            docker.create_container(Some(opts), body).await?.id
        }
        Err(e) => return Err(e.into()),
    };
    docker.start_container(&id, None).await?;
    Ok(id)
}

/// The ConfigMaps and Secrets a pod's env and volumes name.
fn referenced(pod: &Pod) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut cms = BTreeSet::new();
    let mut secrets = BTreeSet::new();
    let Some(spec) = &pod.spec else {
        return (cms, secrets);
    };
    for c in spec.init_containers.iter().flatten().chain(spec.containers.iter()) {
        for from in c.env_from.iter().flatten() {
            cms.extend(from.config_map_ref.as_ref().map(|r| r.name.clone()));
            secrets.extend(from.secret_ref.as_ref().map(|r| r.name.clone()));
        }
        for var in c.env.iter().flatten() {
            let from = var.value_from.as_ref();
            cms.extend(from.and_then(|f| f.config_map_key_ref.as_ref()).map(|r| r.name.clone()));
            secrets.extend(from.and_then(|f| f.secret_key_ref.as_ref()).map(|r| r.name.clone()));
        }
    }
    for v in spec.volumes.iter().flatten() {
        cms.extend(v.config_map.as_ref().map(|c| c.name.clone()));
        secrets.extend(v.secret.as_ref().and_then(|s| s.secret_name.clone()));
        for s in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            cms.extend(s.config_map.as_ref().map(|c| c.name.clone()));
            secrets.extend(s.secret.as_ref().map(|c| c.name.clone()));
        }
    }
    (cms, secrets)
}
