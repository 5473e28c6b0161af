//! The caches of `--volume-cache` through real FUSE mounts (root and
//! /dev/fuse): what they save in requests, and how soon a change made on
//! the pod's side directly (not through a mount, as the pod's own
//! containers do) shows locally, with the cache on and off.

use std::time::{Duration, Instant};

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

/// Every path under `root`, as `find` lists them, by readdir alone.
fn walk(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root).expect("readdir") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_dir() {
            found.extend(walk(&entry.path()));
        }
        found.push(entry.path());
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and /dev/fuse; `cargo xtask test` runs it"]
async fn a_walk_uses_listings_fetched_ahead_and_sees_the_pods_changes_in_them() {
    let m = mount_fixture_with(true).await;
    let (rw, pod) = (m.rw(), m.pod_rw());
    for a in 0..3 {
        for b in 0..4 {
            let d = pod.join(format!("t/a{a}/b{b}"));
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join("f"), "x").expect("write");
        }
    }
    m.requests.take();
    let requests = m.requests.clone();
    let walked = blocking(move || {
        let first = walk(&rw.join("t"));
        // Each directory listed at most twice: ahead of use, and on demand
        // when the walk gets there before the listing asked for ahead.
        let lists = requests.take().get("readdir").copied().unwrap_or(0);
        assert!(lists <= 2 * 16, "{lists} listings for 16 directories");
        // Made in a directory whose listing was fetched ahead: shows once reported.
        std::fs::write(pod.join("t/a2/b3/new"), "n").expect("write");
        within(REPORTED, || walk(&rw.join("t")).iter().any(|p| p.ends_with("a2/b3/new")).then_some(()));
        first.len()
    });
    let walked = tokio::time::timeout(Duration::from_secs(20), walked).await.expect("the walk finished");
    assert_eq!(walked, 3 + 3 * 4 * 2);
}
