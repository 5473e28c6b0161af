//! Compiles the pod sandbox's pause program (src/kubelet/pause.c) into a
//! static executable that the binary embeds and turns into a FROM scratch
//! image at run time, so the sandbox needs no registry and no base image.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "src/kubelet/pause.c";
    println!("cargo::rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("pause");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let status = Command::new(&cc).args(["-static", "-Os", "-s", "-o"]).arg(&out).arg(src).status().unwrap_or_else(|e| {
        panic!(
            "running `{cc}` to build the pause program: {e} (install a C compiler with static libc, e.g. `apt-get install gcc libc6-dev`)"
        )
    });
    assert!(status.success(), "`{cc} -static` failed on {src}: install libc6-dev for a static libc");
}
