//! Test images, built without a registry and reused by every test and the
//! demo. Each is rebuilt only when missing or when what it is made from
//! changed (recorded in a label), so repeated runs cost nothing.
//!
//! - `tpd-test/busybox`: FROM scratch + static busybox (sh, wget, nslookup, nc…).
//! - `tpd-test/echo`: busybox + `tpd-echo` as the default command.
//! - `tpd-test/debian`: Debian minbase from the host's apt sources via
//!   mmdebstrap, with python3 (full stdlib) and its Kubernetes client, curl,
//!   iproute2 and busybox.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

pub const BUSYBOX: &str = "tpd-test/busybox:latest";
pub const ECHO: &str = "tpd-test/echo:latest";
pub const DEBIAN: &str = "tpd-test/debian:latest";

/// The agent image tests and benchmarks run: this version's, as `cargo
/// xtask images` tags it, or `TPD_AGENT_IMAGE` (to compare two builds).
pub fn tpd_agent() -> String {
    tpd_image("TPD_AGENT_IMAGE", tpd_wire::names::AGENT_IMAGE_REPO)
}

/// The sidecar image: this version's, or `TPD_SIDECAR_IMAGE`.
pub fn tpd_sidecar() -> String {
    tpd_image("TPD_SIDECAR_IMAGE", tpd_wire::names::SIDECAR_IMAGE_REPO)
}

fn tpd_image(var: &str, repo: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| format!("{repo}:{}", tpd_wire::VERSION))
}

/// Label holding a digest of what an image was built from.
const SOURCE_LABEL: &str = "tpd.test.source";
const HOST_BUSYBOX: &str = "/bin/busybox";
// python3 rather than python3-minimal: tests and the demo serve files with
// `python3 -m http.server`, which the minimal package lacks. The official
// Kubernetes client is the in-cluster client of in_cluster_client.rs.
const DEBIAN_PACKAGES: &str = "python3,python3-kubernetes,python3-grpcio,curl,iproute2,busybox-static";

/// Builds whichever test images are missing or stale. Safe to call from
/// many tests at once: builds are serialised by a lock file.
pub fn ensure() -> Result<()> {
    let lock = File::create(std::env::temp_dir().join("tpd-test-images.lock"))?;
    lock.lock().context("locking the test-image build")?;
    ensure_busybox()?;
    ensure_echo()?;
    ensure_debian()
}

fn ensure_busybox() -> Result<()> {
    let busybox = Path::new(HOST_BUSYBOX);
    if !busybox.exists() {
        bail!("{HOST_BUSYBOX} is missing: install it with `apt-get install busybox-static`");
    }
    let source = digest_file(busybox)?;
    if image_source(BUSYBOX).as_deref() == Some(source.as_str()) {
        return Ok(());
    }
    let ctx = tempfile::tempdir()?;
    std::fs::copy(busybox, ctx.path().join("busybox"))?;
    let dockerfile = "FROM scratch\n\
        COPY busybox /bin/busybox\n\
        RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
        RUN [\"/bin/busybox\", \"mkdir\", \"-p\", \"/tmp\", \"/etc\", \"/root\"]\n\
        CMD [\"/bin/sh\"]\n";
    docker_build(ctx.path(), dockerfile, BUSYBOX, &source)
}

fn ensure_echo() -> Result<()> {
    let binary = build_static_echo()?;
    let source = format!("{}+{}", digest_file(&binary)?, image_id(BUSYBOX)?);
    if image_source(ECHO).as_deref() == Some(source.as_str()) {
        return Ok(());
    }
    let ctx = tempfile::tempdir()?;
    std::fs::copy(&binary, ctx.path().join("tpd-echo"))?;
    let dockerfile =
        format!("FROM {BUSYBOX}\nCOPY tpd-echo /bin/tpd-echo\nEXPOSE 8080 9000 9000/udp\nCMD [\"/bin/tpd-echo\"]\n");
    docker_build(ctx.path(), &dockerfile, ECHO, &source)
}

fn ensure_debian() -> Result<()> {
    if image_source(DEBIAN).as_deref() == Some(DEBIAN_PACKAGES) {
        return Ok(());
    }
    if which("mmdebstrap").is_none() {
        bail!("mmdebstrap is missing: install it with `apt-get install mmdebstrap`");
    }
    eprintln!("building {DEBIAN} with mmdebstrap (about a minute)…");
    let mut strap = Command::new("mmdebstrap")
        .args(["--quiet", "--variant=minbase", &format!("--include={DEBIAN_PACKAGES}"), "bookworm", "-"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting mmdebstrap")?;
    let tar = strap.stdout.take().context("mmdebstrap's output")?;
    let imported = Command::new("docker")
        .args(["import", "--change", &format!("LABEL {SOURCE_LABEL}={DEBIAN_PACKAGES}")])
        .args(["--change", "CMD [\"/bin/bash\"]", "-", DEBIAN])
        .stdin(tar)
        .stdout(Stdio::null())
        .status()
        .context("running docker import")?;
    let strapped = strap.wait()?;
    if !strapped.success() || !imported.success() {
        bail!("building {DEBIAN} failed (mmdebstrap: {strapped}, docker import: {imported})");
    }
    Ok(())
}

/// Builds `tpd-echo` statically so it runs in a scratch image.
fn build_static_echo() -> Result<PathBuf> {
    let target = "x86_64-unknown-linux-gnu";
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--release", "--target", target, "-p", "tpd-echo"])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(workspace_root())
        .status()
        .context("running cargo to build tpd-echo")?;
    if !status.success() {
        bail!("building tpd-echo failed ({status})");
    }
    Ok(target_dir()?.join(target).join("release/tpd-echo"))
}

/// Builds a workspace binary (debug) once per test process, caching the
/// outcome in `cell`, and returns its path; the env var `override_var` names
/// a prebuilt binary instead.
pub fn cargo_binary(
    cell: &'static OnceLock<Result<PathBuf, String>>,
    package: &str,
    bin: &str,
    override_var: &str,
) -> Result<PathBuf> {
    cell.get_or_init(|| {
        if let Some(path) = std::env::var_os(override_var) {
            return Ok(PathBuf::from(path));
        }
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", package, "--bin", bin])
            .current_dir(workspace_root())
            .status()
            .map_err(|e| format!("running cargo build -p {package}: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build -p {package} failed"));
        }
        Ok(target_dir().map_err(|e| format!("{e:#}"))?.join("debug").join(bin))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// The workspace's root directory: the nearest directory above the running
/// package's (Cargo sets CARGO_MANIFEST_DIR at run time for `cargo run` and
/// `cargo test`) whose Cargo.toml declares the workspace. The path baked in
/// at build time is only the fallback: checkouts sharing one target
/// directory share this crate's build, and it may name another checkout.
pub fn workspace_root() -> PathBuf {
    let start =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    start
        .ancestors()
        .find(|dir| std::fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|toml| toml.contains("[workspace]")))
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."), Path::to_path_buf)
}

/// Cargo's target directory for this workspace, honouring CARGO_TARGET_DIR.
pub fn target_dir() -> Result<PathBuf> {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(workspace_root())
        .output()
        .context("running cargo metadata")?;
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading cargo metadata")?;
    meta["target_directory"].as_str().map(PathBuf::from).context("cargo metadata has no target_directory")
}

fn docker_build(ctx: &Path, dockerfile: &str, tag: &str, source: &str) -> Result<()> {
    std::fs::write(ctx.join("Dockerfile"), dockerfile)?;
    let out = Command::new("docker")
        .args(["build", "--quiet", "--label", &format!("{SOURCE_LABEL}={source}"), "-t", tag])
        .arg(ctx)
        .output()
        .context("running docker build")?;
    if !out.status.success() {
        bail!("docker build of {tag} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn inspect(image: &str, format: &str) -> Option<String> {
    let out = Command::new("docker").args(["image", "inspect", "--format", format, image]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn image_source(image: &str) -> Option<String> {
    inspect(image, &format!("{{{{index .Config.Labels \"{SOURCE_LABEL}\"}}}}"))
}

fn image_id(image: &str) -> Result<String> {
    inspect(image, "{{.Id}}").with_context(|| format!("image {image} is missing"))
}

fn digest_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes))[..16].to_string())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| Path::new(dir).join(program)).find(|p| p.exists())
}
