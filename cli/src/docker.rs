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
