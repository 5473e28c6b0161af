//! `tpd-sidecar selfcheck`: what `tpd doctor` runs in a throwaway sidecar
//! container to learn whether this Docker host lets the sidecar create a TUN
//! device and open /dev/fuse. One `name: ok` or `name: error: why` line per
//! device; the exit status is 0 only when both work.

use tpd_wire::names;

use crate::tun::Tun;

pub fn run() -> std::process::ExitCode {
    let tun = Tun::create(names::SIDECAR_TUNNEL_IP, names::TUNNEL_PREFIX_LEN, names::TUNNEL_MTU, &[])
        .map(drop)
        .map_err(|e| format!("{e:#}"));
    let fuse = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map(drop)
        .map_err(|e| format!("opening /dev/fuse: {e}"));
    let mut ok = true;
    for (name, result) in [("tun", tun), ("fuse", fuse)] {
        match result {
            Ok(()) => println!("{name}: ok"),
            Err(why) => {
                ok = false;
                println!("{name}: error: {why}");
            }
        }
    }
    if ok { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE }
}
