//! netrace's share of the machine's CPU while the traffic runs, from the kernel's own
//! accounts rather than from a rate: on a shared machine one run's rate differs from the
//! next by more than the one- and two-point targets, but the CPU time netrace's programs and
//! process take is counted exactly whatever else runs.
//!
//! Each round starts the empty classifier's holder with the kernel's run-time statistics on
//! (`bench_probe hold-noop IFACE READY --stats`) and `netrace watch` in its default mode on the
//! same interface, both attached at once, then runs the load (the connection-rate clients or
//! the bulk stream, as in the rate rounds). Around the load it reads, from /proc:
//! `run_time_ns` and `run_cnt` of every BPF program each process holds (fdinfo), netrace's
//! on-CPU time (schedstat), and the machine's busy CPU time (/proc/stat: user, nice, system,
//! irq, softirq; idle, I/O wait and time stolen by the hypervisor left out).
//!
//! netrace's cost beyond the floor is its programs' run time minus the empty classifier's
//! (which ran on the same packets, so the statistics' own clock reads cancel), plus its
//! process's CPU time; its share of the busy CPU is the fraction of the load's rate it costs
//! when the load is CPU-bound, as the rate runs are. What netrace's memory costs other code
//! (cache and TLB misses of the network stack) is not in these accounts; it shows only in
//! the rates.

use std::{collections::BTreeMap, path::Path};

use anyhow::{anyhow, bail};
use serde_json::{json, Value};

use super::{
    median,
    net::BenchNet,
    tracer::{sched_of, Bins, Mode, Tracer},
    traffic, Plan,
};

/// Run time (ns) and runs of each BPF program a process holds a descriptor of, by program
/// id (a program held twice counts once).
fn programs_of(pid: u32) -> BTreeMap<u64, Prog> {
    let mut progs = BTreeMap::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return progs;
    };
    for fd in fds.flatten() {
        let Ok(info) = std::fs::read_to_string(fd.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(ns), Some(runs)) =
            (field("prog_id:"), field("run_time_ns:"), field("run_cnt:"))
        {
            let kind = info
                .lines()
                .find_map(|l| l.strip_prefix("prog_type:"))
                .map_or(0, |v| v.trim().parse::<u32>().unwrap_or(0));
            progs.insert(id, Prog { ns, runs, kind });
        }
    }
    progs
}

/// One program's accounts: run time, runs, and its type (the kernel's `bpf_prog_type`).
#[derive(Clone, Copy, Default)]
struct Prog {
    ns: u64,
    runs: u64,
    kind: u32,
}

/// Each program's run time and runs between two snapshots, the programs that ran.
fn each_delta(before: &BTreeMap<u64, Prog>, after: &BTreeMap<u64, Prog>) -> Vec<Prog> {
    after
        .iter()
        .map(|(id, a)| {
            let b = before.get(id).copied().unwrap_or_default();
            Prog {
                ns: a.ns.saturating_sub(b.ns),
                runs: a.runs.saturating_sub(b.runs),
                kind: a.kind,
            }
        })
        .filter(|p| p.runs > 0)
        .collect()
}

/// The programs' run time and runs, summed.
fn total(progs: &[Prog]) -> (u64, u64) {
    progs
        .iter()
        .fold((0, 0), |(ns, runs), p| (ns + p.ns, runs + p.runs))
}

/// The programs as the results list them.
fn programs_json(progs: &[Prog]) -> Vec<Value> {
    progs
        .iter()
        .map(|p| json!({"type": p.kind, "runs": p.runs, "ns": p.ns}))
        .collect()
}

/// The machine's busy CPU time in seconds: user, nice, system, irq and softirq of all CPUs.
fn busy_s() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("/proc/stat has no cpu line"))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse::<f64>().unwrap_or(0.0))
        .collect();
    if v.len() < 7 {
        bail!("/proc/stat's cpu line is short: {line}");
    }
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    // user, nice, system, (idle, iowait left out), irq, softirq
    Ok((v[0] + v[1] + v[2] + v[5] + v[6]) / hz)
}

/// What one side of the load reads at one moment.
struct Snapshot {
    floor: BTreeMap<u64, Prog>,
    netrace: BTreeMap<u64, Prog>,
    netrace_cpu_s: f64,
    busy_s: f64,
}

fn snapshot(floor: u32, netrace: u32) -> anyhow::Result<Snapshot> {
    Ok(Snapshot {
        floor: programs_of(floor),
        netrace: programs_of(netrace),
        netrace_cpu_s: sched_of(netrace),
        busy_s: busy_s()?,
    })
}

#[derive(Clone, Copy)]
enum Load {
    Connections,
    Stream,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::Connections => "connections",
            Load::Stream => "stream",
        }
    }
}

/// One round under `load`: the figures of that round.
fn round(
    load: Load,
    net: &BenchNet,
    bins: &Bins,
    secs: f64,
    scratch: &Path,
) -> anyhow::Result<Value> {
    let floor = Tracer::start_with(Mode::Empty, net, bins, scratch, true)?;
    let nt = Tracer::start(Mode::Netrace, net, bins, scratch)?;
    let (Some(floor_pid), Some(nt_pid)) = (floor.pid(), nt.pid()) else {
        bail!("a tracer of the CPU-share round has no process");
    };
    // Warm-up under the load: the maps' first entries, caches; not counted.
    match load {
        Load::Connections => traffic::connections(net, 0.5, None).map(|_| ())?,
        Load::Stream => traffic::stream(net, 0.5).map(|_| ())?,
    }
    let before = snapshot(floor_pid, nt_pid)?;
    let done = match load {
        Load::Connections => traffic::connections(net, secs, None).map(|c| c.connections as f64),
        Load::Stream => traffic::stream(net, secs).map(|bps| bps * secs / 8.0),
    };
    let after = snapshot(floor_pid, nt_pid);
    let seen = nt.stop();
    let floor_seen = floor.stop();
    let (done, after, seen) = (done?, after?, seen?);
    floor_seen?;
    let floor_progs = each_delta(&before.floor, &after.floor);
    let nt_progs = each_delta(&before.netrace, &after.netrace);
    let (floor_ns, floor_runs) = total(&floor_progs);
    let (nt_ns, nt_runs) = total(&nt_progs);
    if floor_runs == 0 || nt_runs == 0 {
        bail!(
            "no program runs were counted under the {} load (empty classifier {floor_runs}, \
             netrace {nt_runs}): are the kernel's run-time statistics on?",
            load.name()
        );
    }
    let busy = after.busy_s - before.busy_s;
    let process_s = after.netrace_cpu_s - before.netrace_cpu_s;
    let kernel_s = (nt_ns as f64 - floor_ns as f64) / 1e9;
    let share = (kernel_s + process_s) / busy;
    eprintln!(
        "bench: CPU share under {}: netrace {:.2} % of {:.2} s busy (programs {:.1} ms over the \
         empty classifier's {:.1} ms, process {:.1} ms; {} lost, {} dropped)",
        load.name(),
        share * 100.0,
        busy,
        nt_ns as f64 / 1e6,
        floor_ns as f64 / 1e6,
        process_s * 1e3,
        seen.lost,
        seen.dropped
    );
    Ok(json!({
        "done": done,
        "netrace_programs": programs_json(&nt_progs),
        "floor_programs": programs_json(&floor_progs),
        "busy_s": busy,
        "floor_ns": floor_ns, "floor_runs": floor_runs,
        "netrace_ns": nt_ns, "netrace_runs": nt_runs,
        "netrace_process_s": process_s,
        "share": share,
        "floor_share": floor_ns as f64 / 1e9 / busy,
        "netrace_answered": seen.count,
        "netrace_lost": seen.lost,
        "netrace_dropped": seen.dropped,
    }))
}

/// Rounds under each load; per load the rounds and the median and highest share.
pub fn run(net: &BenchNet, bins: &Bins, plan: &Plan, scratch: &Path) -> anyhow::Result<Value> {
    let rounds = if plan.quick { 1 } else { SHARE_ROUNDS };
    let mut out = serde_json::Map::new();
    for load in [Load::Connections, Load::Stream] {
        let runs = (0..rounds)
            .map(|_| round(load, net, bins, plan.secs, scratch))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let shares: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.get("share").and_then(Value::as_f64))
            .collect();
        out.insert(
            load.name().into(),
            json!({
                "median_share": median(&shares),
                "max_share": shares.iter().copied().fold(f64::NAN, f64::max),
                "runs": runs,
            }),
        );
    }
    out.insert("seconds".into(), json!(plan.secs));
    out.insert("rounds".into(), json!(rounds));
    Ok(out.into())
}

/// Rounds per load in a full run: the shares scatter little, so a few show the spread.
const SHARE_ROUNDS: usize = 5;
