//! Builds the sidecar and agent images without a registry: static binaries
//! on the host, copied into the Dockerfile's `FROM scratch` stages.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, run};

const TARGET: &str = "x86_64-unknown-linux-gnu";
/// The promise the README makes about image size.
const MAX_IMAGE_BYTES: u64 = 15 * 1000 * 1000;

/// An image `cargo xtask images` built: its tag and the binary it holds.
struct ImageSpec {
    stage: &'static str,
    binary: &'static str,
    repo: &'static str,
}

const IMAGES: [ImageSpec; 2] = [
    ImageSpec { stage: "sidecar", binary: "tpd-sidecar", repo: tpd_wire::names::SIDECAR_IMAGE_REPO },
    ImageSpec { stage: "agent", binary: "tpd-agent", repo: tpd_wire::names::AGENT_IMAGE_REPO },
];

/// Builds both images, tagged `tag` (tpd looks for its own version), and
/// prints their names and sizes.
pub fn build(root: &Path, tag: &str) -> Result<Vec<String>> {
    eprintln!("building static tpd-sidecar and tpd-agent…");
    let mut build = cargo(root);
    build
        .args(["build", "--profile", "image", "--target", TARGET])
        .args(IMAGES.iter().flat_map(|i| ["-p", i.binary]))
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    run(&mut build)?;

    let bin_dir = crate::target_dir(root)?.join(TARGET).join("image");
    let ctx = tempfile::tempdir()?;
    let mut tags = Vec::new();
    for image in &IMAGES {
        std::fs::copy(bin_dir.join(image.binary), ctx.path().join(image.binary))
            .with_context(|| format!("staging {}", image.binary))?;
    }
    std::fs::copy(root.join("Dockerfile"), ctx.path().join("Dockerfile"))?;
    for image in &IMAGES {
        let tag = format!("{}:{tag}", image.repo);
        run(Command::new("docker").args(["build", "--quiet", "--target", image.stage, "-t", &tag]).arg(ctx.path()))?;
        let size = image_size(&tag)?;
        println!("{tag:<24} {:>6.1} MB", size as f64 / 1e6);
        if size > MAX_IMAGE_BYTES {
            bail!("{tag} is {size} bytes, over the {MAX_IMAGE_BYTES}-byte budget");
        }
        tags.push(tag);
    }
    Ok(tags)
}

fn image_size(tag: &str) -> Result<u64> {
    let out = Command::new("docker").args(["image", "inspect", "--format", "{{.Size}}", tag]).output()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().with_context(|| format!("reading the size of {tag}"))
}
