//! Builds the test images (`tpd-test/busybox`, `tpd-test/echo`,
//! `tpd-test/debian`) that the tests and the demo use; skips fresh ones.

fn main() {
    if let Err(e) = tpd_e2e::images::ensure() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    for image in [tpd_e2e::images::BUSYBOX, tpd_e2e::images::ECHO, tpd_e2e::images::DEBIAN] {
        println!("{image}");
    }
}
