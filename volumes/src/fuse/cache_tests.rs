//! The caches of `--volume-cache` through real FUSE mounts (root and
//! /dev/fuse): what they save in requests, and how soon a change made on
//! the pod's side directly (not through a mount, as the pod's own
//! containers do) shows locally, with the cache on and off.

use std::time::Instant;

use super::tests::{REPORTED, blocking, errno, mount_fixture_with, within};

const ENOENT: i32 = 2;

/// `Some` once `path` is missing.
pub fn gone(path: &std::path::Path) -> Option<()> {
    std::fs::metadata(path).err().filter(|e| e.raw_os_error() == Some(ENOENT)).map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and /dev/fuse; `cargo xtask test` runs it"]
async fn missing_names_and_attributes_are_kept_until_the_agent_reports_a_change() {
    let m = mount_fixture_with(true).await;
    let (rw, pod) = (m.rw(), m.pod_rw());
    std::fs::create_dir(pod.join("pkg")).expect("mkdir");
    std::fs::write(pod.join("pkg/package.json"), "{}").expect("write");
    m.requests.take();
    let shown = blocking(move || {
        // A resolver's misses: asked once, then answered by the kernel.
        for _ in 0..10 {
            assert_eq!(errno(std::fs::metadata(rw.join("pkg/index.json"))), ENOENT);
            assert_eq!(std::fs::metadata(rw.join("pkg/package.json")).expect("stat").len(), 2);
        }
        // Made, then changed, on the pod's side: each shows once reported.
        let made = Instant::now();
        std::fs::write(pod.join("pkg/index.json"), "[1]").expect("write");
        within(REPORTED, || std::fs::metadata(rw.join("pkg/index.json")).ok().filter(|m| m.len() == 3));
        let shown = made.elapsed();
        std::fs::write(pod.join("pkg/package.json"), "{\"a\":1}").expect("write");
        within(REPORTED, || std::fs::metadata(rw.join("pkg/package.json")).ok().filter(|m| m.len() == 7));
        std::fs::remove_file(pod.join("pkg/index.json")).expect("rm");
        within(REPORTED, || gone(&rw.join("pkg/index.json")));
        shown
    })
    .await;
    eprintln!("a file made on the pod's side showed after {shown:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and /dev/fuse; `cargo xtask test` runs it"]
async fn ten_misses_cost_one_request_with_the_cache_and_two_each_without() {
    // Without the cache each stat looks `pkg` up again too.
    for (cache, expected) in [(true, 1), (false, 20)] {
        let m = mount_fixture_with(cache).await;
        let rw = m.rw();
        std::fs::create_dir(m.pod_rw().join("pkg")).expect("mkdir");
        blocking({
            let rw = rw.clone();
            move || std::fs::metadata(rw.join("pkg")).expect("stat")
        })
        .await;
        m.requests.take();
        blocking(move || {
            for _ in 0..10 {
                assert_eq!(errno(std::fs::metadata(rw.join("pkg/index.js"))), ENOENT);
            }
        })
        .await;
        let stats = m.requests.take().get("stat").copied().unwrap_or(0);
        assert_eq!(stats, expected, "stat requests for 10 misses, cache {cache}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and /dev/fuse; `cargo xtask test` runs it"]
async fn with_the_cache_off_a_change_in_the_pod_shows_at_once() {
    let m = mount_fixture_with(false).await;
    let (rw, pod) = (m.rw(), m.pod_rw());
    blocking(move || {
        assert_eq!(errno(std::fs::metadata(rw.join("later"))), ENOENT);
        std::fs::write(pod.join("later"), "1").expect("write");
        assert_eq!(std::fs::metadata(rw.join("later")).expect("made in the pod").len(), 1);
        std::fs::write(pod.join("later"), "123").expect("write");
        assert_eq!(std::fs::metadata(rw.join("later")).expect("stat").len(), 3);
        assert_eq!(std::fs::read_to_string(rw.join("later")).expect("read"), "123");
        std::fs::remove_file(pod.join("later")).expect("rm");
        assert_eq!(errno(std::fs::metadata(rw.join("later"))), ENOENT);
    })
    .await;
}
