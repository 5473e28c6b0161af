//! CPU time that processes spend, read from `/proc`: what a figure costs,
//! next to how long it took.
//!
//! On this project's two-core machines both ends of a tunnel, the client
//! and the server share the same cores, so throughput and latency move
//! with whatever else runs; CPU time per operation moves much less, and
//! says where a target is bounded. A process tree is summed from every
//! thread's `schedstat` (time on a CPU, in the kernel included, and the
//! softirq work done in its context), so containers and the baselines'
//! daemons, which run as plain host processes, are read the same way.
//! Time of a thread or process that ends between two readings is lost:
//! read around work during which the measured processes live.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};

/// The processes whose CPU time one figure counts: each root and all its
/// descendants (found again at every reading, so children started in
/// between count too).
#[derive(Debug, Clone, Default)]
pub struct Processes(Vec<u32>);

impl Processes {
    pub fn new(roots: impl IntoIterator<Item = u32>) -> Self {
        Processes(roots.into_iter().collect())
    }

    /// The main processes of Docker containers (`State.Pid`).
    pub fn containers(names: &[&str]) -> Result<Self> {
        let mut roots = Vec::new();
        for name in names {
            let pid = tpd_e2e::dataplane::docker(&["inspect", "-f", "{{.State.Pid}}", name])?;
            roots.push(pid.trim().parse().with_context(|| format!("pid of container {name}: {pid:?}"))?);
        }
        Ok(Processes(roots))
    }

    /// The CPU time the processes have used so far.
    pub fn used(&self) -> Duration {
        tree(&self.0).into_iter().map(process_cpu).sum()
    }

    /// Runs `work` and returns its result with the CPU time the processes
    /// used meanwhile.
    pub fn during<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
        let before = self.used();
        let out = work()?;
        Ok((out, self.used().saturating_sub(before)))
    }
}

/// `roots` and every live descendant of theirs.
fn tree(roots: &[u32]) -> Vec<u32> {
    if roots.is_empty() {
        return Vec::new();
    }
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (pid, parent) in parents() {
        children.entry(parent).or_default().push(pid);
    }
    let mut all = roots.to_vec();
    let mut next = 0;
    while let Some(&pid) = all.get(next) {
        all.extend(children.get(&pid).into_iter().flatten());
        next += 1;
    }
    all
}

/// `(pid, parent pid)` of every process.
fn parents() -> Vec<(u32, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, parent_of(pid)?)))
        .collect()
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields resume after the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// Time on a CPU of all threads of `pid` (0 if it is gone).
fn process_cpu(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Duration::ZERO };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(Duration::from_nanos)
        .sum()
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    use super::*;

    #[test]
    fn a_childs_time_counts_for_its_parent() {
        let me = Processes::new([std::process::id()]);
        let before = me.used();
        // Some fixed work, then it waits (alive) until killed.
        let mut child = Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; echo busy; exec sleep 60"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let (childs, after) = (process_cpu(child.id()), me.used());
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(line.trim(), "busy");
        assert!(childs > Duration::ZERO, "the child's work took no CPU time?");
        assert!(after - before >= childs, "parent tree {:?} < child {childs:?}", after - before);
    }
}
