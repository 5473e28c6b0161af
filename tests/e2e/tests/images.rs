//! The sidecar and agent images as a user gets them from `cargo xtask
//! images`: they run, report the workspace version, stay small, and the agent
//! does not run as root.

// A failed unwrap is a failed test, with its message and line.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use tpd_wire::names::{AGENT_IMAGE_REPO, AGENT_UID, SIDECAR_IMAGE_REPO};

fn tag(repo: &str) -> String {
    format!("{repo}:{}", tpd_wire::VERSION)
}

fn inspect(image: &str, format: &str) -> String {
    let out =
        Command::new("docker").args(["image", "inspect", "--format", format, image]).output().expect("docker runs");
    assert!(out.status.success(), "{image} is missing: build it with `cargo xtask images`");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn version_from(image: &str) -> String {
    let out = Command::new("docker")
        .args(["run", "--rm", "--label", "tpd.test=1", image, "--version"])
        .output()
        .expect("docker runs");
    assert!(out.status.success(), "{image} --version failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn both_images_report_the_workspace_version() {
    for repo in [SIDECAR_IMAGE_REPO, AGENT_IMAGE_REPO] {
        let printed = version_from(&tag(repo));
        assert!(printed.ends_with(tpd_wire::VERSION), "{repo} printed {printed:?}");
    }
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn agent_image_runs_as_a_non_root_uid() {
    let user = inspect(&tag(AGENT_IMAGE_REPO), "{{.Config.User}}");
    let uid = user.split(':').next().unwrap_or_default();
    assert_eq!(uid, AGENT_UID.to_string(), "agent image user is {user:?}");
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn images_are_scratch_images_under_15_mb() {
    for repo in [SIDECAR_IMAGE_REPO, AGENT_IMAGE_REPO] {
        let image = tag(repo);
        let size: u64 = inspect(&image, "{{.Size}}").parse().expect("a size");
        assert!(size <= 15_000_000, "{image} is {size} bytes");
        let layers = inspect(&image, "{{len .RootFS.Layers}}");
        assert_eq!(layers, "1", "{image} should be one binary on scratch, found {layers} layers");
    }
}
