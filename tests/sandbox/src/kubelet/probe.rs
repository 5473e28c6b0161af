//! Readiness and liveness probes (tcpSocket, httpGet, exec), run from the
//! host against the pod's IP, as the kubelet runs them from the node.

use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::ExecConfig;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::jiff::Timestamp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::spec::resolve_port;

/// What the probes of a running container say now.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    pub ready: bool,
    /// The liveness probe failed often enough: restart the container.
    pub kill: bool,
}

/// Probe bookkeeping of one container instance.
#[derive(Debug, Default)]
pub struct Prober {
    readiness: ProbeState,
    liveness: ProbeState,
}

impl Prober {
    pub async fn tick(
        &mut self,
        docker: &Docker,
        ip: &str,
        id: &str,
        c: &Container,
        started: Option<Timestamp>,
    ) -> Outcome {
        let age = started.map_or(Duration::ZERO, |t| {
            Duration::try_from(Timestamp::now().duration_since(t)).unwrap_or(Duration::ZERO)
        });
        let ready = match &c.readiness_probe {
            None => true,
            Some(p) => self.readiness.run(docker, ip, id, c, p, age, false).await,
        };
        let alive = match &c.liveness_probe {
            None => true,
            Some(p) => self.liveness.run(docker, ip, id, c, p, age, true).await,
        };
        Outcome { ready, kill: !alive }
    }
}

#[derive(Debug, Default)]
struct ProbeState {
    next: Option<Instant>,
    successes: i32,
    failures: i32,
    /// None until the thresholds decided.
    verdict: Option<bool>,
}

impl ProbeState {
    /// Runs the probe when it is due; returns its verdict, or `undecided`
    /// before the first one (readiness starts false, liveness true).
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &mut self,
        docker: &Docker,
        ip: &str,
        id: &str,
        c: &Container,
        p: &Probe,
        age: Duration,
        undecided: bool,
    ) -> bool {
        let delay = Duration::from_secs(u64::try_from(p.initial_delay_seconds.unwrap_or(0)).unwrap_or(0));
        let now = Instant::now();
        if age < delay || self.next.is_some_and(|n| now < n) {
            return self.verdict.unwrap_or(undecided);
        }
        let period = Duration::from_secs(u64::try_from(p.period_seconds.unwrap_or(10).max(1)).unwrap_or(10));
        self.next = Some(now + period);
        let timeout = Duration::from_secs(u64::try_from(p.timeout_seconds.unwrap_or(1).max(1)).unwrap_or(1));
        if tokio::time::timeout(timeout, check(docker, ip, id, c, p)).await.unwrap_or(false) {
            self.successes += 1;
            self.failures = 0;
            if self.successes >= p.success_threshold.unwrap_or(1) {
                self.verdict = Some(true);
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.failures >= p.failure_threshold.unwrap_or(3) {
                self.verdict = Some(false);
            }
        }
        self.verdict.unwrap_or(undecided)
    }
}

async fn check(docker: &Docker, ip: &str, id: &str, c: &Container, p: &Probe) -> bool {
    if let Some(tcp) = &p.tcp_socket {
        let Some(port) = resolve_port(c, &tcp.port) else {
            return false;
        };
        return TcpStream::connect((ip, port)).await.is_ok();
    }
    if let Some(http) = &p.http_get {
        let Some(port) = resolve_port(c, &http.port) else {
            return false;
        };
        return http_ok(ip, port, http.path.as_deref().unwrap_or("/")).await;
    }
    if let Some(exec) = &p.exec {
        return exec_ok(docker, id, exec.command.clone().unwrap_or_default()).await;
    }
    true
}

async fn http_ok(ip: &str, port: u16, path: &str) -> bool {
    let Ok(mut conn) = TcpStream::connect((ip, port)).await else {
        return false;
    };
    let req = format!("GET {path} HTTP/1.0\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/1.32\r\n\r\n");
    if conn.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 16];
    let Ok(n) = conn.read(&mut head).await else {
        return false;
    };
    parse_status(&head[..n]).is_some_and(|code| (200..400).contains(&code))
}

/// The status code of an HTTP response's first bytes.
fn parse_status(head: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(head.get(9..12)?).ok()?;
    head.starts_with(b"HTTP/").then_some(())?;
    text.parse().ok()
}

async fn exec_ok(docker: &Docker, id: &str, cmd: Vec<String>) -> bool {
    let config =
        ExecConfig { attach_stdout: Some(true), attach_stderr: Some(true), cmd: Some(cmd), ..Default::default() };
    let Ok(exec) = docker.create_exec(id, config).await else {
        return false;
    };
    let Ok(StartExecResults::Attached { mut output, .. }) =
        docker.start_exec(&exec.id, Some(StartExecOptions { detach: false, tty: false, output_capacity: None })).await
    else {
        return false;
    };
    while output.next().await.is_some() {}
    docker.inspect_exec(&exec.id).await.ok().and_then(|i| i.exit_code) == Some(0)
}

#[cfg(test)]
mod tests {
    use super::parse_status;

    #[test]
    fn status_line() {
        assert_eq!(parse_status(b"HTTP/1.1 204 No"), Some(204));
        assert_eq!(parse_status(b"HTTP/1.0 500"), Some(500));
        assert_eq!(parse_status(b"SSH-2.0"), None);
        assert_eq!(parse_status(b""), None);
    }
}
