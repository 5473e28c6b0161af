//! The Docker side: connecting (honouring `DOCKER_HOST`) with errors that
//! say how to fix them.

use bollard::Docker;

use crate::error::Hint;

/// Where we look for Docker, for messages.
pub fn host() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into())
}

/// Connects to Docker and agrees on an API version with the engine (old
/// engines reject requests made with a newer version than they know).
pub async fn connect() -> Result<Docker, Hint> {
    let unreachable = |e: bollard::errors::Error| {
        Hint::new(
            format!("Docker is not reachable at {}: {e}", host()),
            "start Docker (e.g. `sudo systemctl start docker`), or point DOCKER_HOST at a running engine",
        )
    };
    Docker::connect_with_defaults().map_err(unreachable)?.negotiate_version().await.map_err(unreachable)
}

/// Whether a bollard error is Docker's "no such …" (HTTP 404).
pub fn is_not_found(err: &bollard::errors::Error) -> bool {
    matches!(err, bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })
}

/// Whether a removal failed only because the container is already gone or
/// another removal of it is under way (a killed `tpd` and its guardian
/// cleaning up the same session).
pub fn is_gone_or_going(err: &bollard::errors::Error) -> bool {
    match err {
        bollard::errors::Error::DockerResponseServerError { status_code: 404, .. } => true,
        bollard::errors::Error::DockerResponseServerError { status_code: 409, message } => {
            message.contains("already in progress")
        }
        _ => false,
    }
}

/// How a container ended, as a user is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Removed (e.g. `docker rm -f`) before its exit could be read.
    Removed,
    Exited {
        code: i64,
        oom: bool,
    },
}

impl Ended {
    /// The exit code a shell would show (137 for a container removed by force).
    pub fn code(self) -> i64 {
        match self {
            Ended::Removed => 137,
            Ended::Exited { code, .. } => code,
        }
    }

    /// Why it ended, unless it exited with 0: "was killed for lack of
    /// memory (OOM, exit code 137)", "was killed by signal 9", "exited with code 3".
    pub fn why(self) -> Option<String> {
        match self {
            Ended::Exited { code: 0, oom: false } => None,
            Ended::Removed => Some("was removed".into()),
            Ended::Exited { code, oom: true } => Some(format!("was killed: out of memory (OOM, exit code {code})")),
            Ended::Exited { code: code @ 129..=159, .. } => {
                Some(format!("was killed by signal {} (exit code {code})", code - 128))
            }
            Ended::Exited { code, .. } => Some(format!("exited with code {code}")),
        }
    }
}

/// Waits until container `id` stops and reads how.
pub async fn wait_ended(docker: &Docker, id: &str) -> Ended {
    use bollard::query_parameters::{InspectContainerOptions, WaitContainerOptions};
    use futures::StreamExt;
    let code = match docker.wait_container(id, None::<WaitContainerOptions>).next().await {
        Some(Ok(w)) => w.status_code,
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
        Some(Err(e)) if is_not_found(&e) => return Ended::Removed,
        _ => 1,
    };
    match docker.inspect_container(id, None::<InspectContainerOptions>).await {
        Ok(c) => Ended::Exited { code, oom: c.state.and_then(|s| s.oom_killed).unwrap_or(false) },
        Err(e) if is_not_found(&e) => Ended::Removed,
        Err(_) => Ended::Exited { code, oom: false },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status_code: u16, message: &str) -> bollard::errors::Error {
        bollard::errors::Error::DockerResponseServerError { status_code, message: message.into() }
    }

    #[test]
    fn a_removal_under_way_elsewhere_counts_as_done() {
        assert!(is_gone_or_going(&answer(404, "No such container: abc")));
        assert!(is_gone_or_going(&answer(409, "removal of container abc is already in progress")));
        assert!(!is_gone_or_going(&answer(409, "You cannot remove a running container abc")));
        assert!(!is_gone_or_going(&answer(500, "driver failed")));
    }
}
