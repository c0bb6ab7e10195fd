//! `cargo xtask demo`: the seed failure in a box. A pod whose node SNATs it with
//! `MASQUERADE --random-fully` into 1024-65535, behind a firewall that lets SYN-ACKs back only
//! to 32768-65535. netrace watches the node's uplink while the pod runs the article's test,
//! real `nc -vv` and `nc -vvu` processes inside the pod's namespace, then reports (naming `nc`
//! as the process that lost its connections); then the fix it suggests is applied to the same
//! node and the run repeated. Every command shown is the command that runs.

mod nc;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use netrace_lab::{Family, Lab, LabOptions, NetraceOptions, NetraceRun, Output, SnatMode};

use nc::{NcCounts, NcRun};

const TCP: usize = 300;
const UDP: usize = 100;
/// `nc` processes running at once.
const WORKERS: usize = 16;
/// `nc -w`: seconds to wait for a connection (TCP) or an answer (UDP).
const NC_WAIT_S: u32 = 1;
const SYN_TIMEOUT: Duration = Duration::from_millis(1500);
const PROGRESS_EVERY: usize = 50;

/// Runs the demo with the netrace binary at `netrace_bin`.
pub fn run(netrace_bin: &Path) -> Result<()> {
    let started = Instant::now();
    if !netrace_bin.is_file() {
        bail!("no netrace binary at {}", netrace_bin.display());
    }
    // Labs of demos or tests that were killed before they could clean up.
    let removed = netrace_lab::remove_stale().context("removing stale lab namespaces")?;
    if !removed.is_empty() {
        println!("removed leftovers of an earlier run: {}", removed.join(" "));
    }

    phase("building the lab: four network namespaces joined by veth pairs");
    let mut lab = Lab::new(LabOptions::seed()).context("building the lab")?;
    describe(&lab);

    phase("1/2  the failure: SNAT into 1024-65535, firewall lets 32768-65535 back");
    let before = scenario(&lab, netrace_bin)?;

    phase("2/2  the fix netrace suggests, applied on the node: SNAT --to-ports 32768-65535");
    lab.set_snat(SnatMode::RandomFully, 32768, 65535)
        .context("applying the fix")?;
    for line in lab.snat_description() {
        println!("  node: {line}");
    }
    // The failed attempts' conntrack entries keep the ports SNAT gave them until they expire
    // (2 min unanswered): a pod that reuses such a source port (nc binds port 0, and the
    // kernel hands out a failed connection's port again) would go out through the old,
    // blocked port. Part of applying the fix on a real node too.
    let flush = ["conntrack", "-D", "-p", "tcp", "--state", "SYN_SENT"];
    println!("  node: {}", flush.join(" "));
    // conntrack exits 1 when nothing matched: the entries may have expired already.
    let _ = lab.exec(lab.node_ns(), &flush);
    let after = scenario(&lab, netrace_bin)?;

    phase("tearing down the lab");
    lab.teardown().context("tearing down the lab")?;
    println!("  nothing left: no nrt* namespace of this run remains");

    phase("summary");
    println!("  before the fix: {}", before.line());
    println!("  after the fix:  {}", after.line());
    println!("  (demo took {:.1} s)", started.elapsed().as_secs_f64());
    if before.netrace_exit != Some(1) || after.netrace_exit != Some(0) {
        bail!(
            "netrace exited {:?} before the fix (expected 1: loss) and {:?} after (expected 0)",
            before.netrace_exit,
            after.netrace_exit
        );
    }
    real_node();
    Ok(())
}

fn phase(title: &str) {
    println!("\n== {title}");
}

fn describe(lab: &Lab) {
    let server = lab.server_addr(Family::V4);
    println!(
        "  pod {pod} ─▶ node {node} ─▶ firewall {fw} ─▶ server {server} (TCP accept + UDP echo)",
        pod = lab.pod_ns(),
        node = lab.node_ns(),
        fw = lab.firewall_ns(),
    );
    println!(
        "  node uplink {} ({}): netrace watches here, after SNAT",
        lab.node_uplink(),
        lab.node_uplink_ip(Family::V4)
    );
    for line in lab.snat_description() {
        println!("  node: {line}");
    }
    println!(
        "  firewall: stateless, drops TCP towards the node with destination port < {}",
        lab.options().firewall_min_port
    );
}

struct RunOutcome {
    tcp: NcCounts,
    udp: NcCounts,
    netrace_exit: Option<i32>,
}

impl RunOutcome {
    fn line(&self) -> String {
        format!(
            "nc: {} TCP connects, {} timed out; {} UDP exchanges, {} without answer; netrace \
             exit {}",
            self.tcp.runs,
            self.tcp.failed,
            self.udp.runs,
            self.udp.failed,
            self.netrace_exit
                .map_or_else(|| "by signal".to_owned(), |c| c.to_string())
        )
    }
}

fn scenario(lab: &Lab, netrace_bin: &Path) -> Result<RunOutcome> {
    let pod_side = lab.names().node_pod_if.clone();
    let opts = NetraceOptions::for_lab(lab, netrace_bin)
        .output(Output::Text)
        .syn_timeout(SYN_TIMEOUT)
        .args(["--pod-iface", pod_side.as_str()]);
    let mut netrace = NetraceRun::spawn(&opts).context("starting netrace")?;
    println!("  running: {}", netrace.command_line());
    netrace
        .wait_ready(Duration::from_secs(30))
        .context("starting netrace")?;
    println!("  netrace is attached");

    let server = lab.server_addr(Family::V4);
    let wait = NC_WAIT_S.to_string();
    let (host, port) = (server.ip().to_string(), server.port().to_string());
    let tcp_run = NcRun::new(
        lab.pod_ns(),
        &["-vv", "-z", "-w", &wait, &host, &port],
        None,
    );
    println!(
        "  pod: {TCP} × `{}` ({WORKERS} at a time)",
        tcp_run.command_line()
    );
    let tcp = tcp_run.repeat(TCP, WORKERS, &|done, c| {
        if done % PROGRESS_EVERY == 0 || done == TCP {
            println!("    TCP {done:>3}/{TCP}: {} timed out so far", c.failed);
        }
    })?;
    let udp_run = NcRun::new(
        lab.pod_ns(),
        &["-vvu", "-w", &wait, &host, &port],
        Some(nc::UDP_PAYLOAD),
    );
    println!(
        "  pod: {UDP} × `echo {} | {}` ({WORKERS} at a time; the server echoes)",
        nc::UDP_PAYLOAD.trim_end(),
        udp_run.command_line()
    );
    let udp = udp_run.repeat(UDP, WORKERS, &|done, c| {
        if done % PROGRESS_EVERY == 0 || done == UDP {
            println!(
                "    UDP {done:>3}/{UDP}: {} without answer so far",
                c.failed
            );
        }
    })?;
    println!(
        "  nc: {} TCP connects, {} timed out, {} other failures; {} UDP exchanges, {} without \
         answer",
        tcp.runs, tcp.failed, tcp.other, udp.runs, udp.failed
    );

    let settle = netrace.syn_timeout() + Duration::from_secs(1);
    println!(
        "  waiting {:.1} s (--syn-timeout + 1 s) so netrace decides the last SYNs, then Ctrl-C",
        settle.as_secs_f64()
    );
    netrace.settle();
    let out = netrace.stop().context("stopping netrace")?;
    println!("\n---------------------------------- netrace ----------------------------------");
    print!("{}", out.stdout);
    if !out.stdout.ends_with('\n') {
        println!();
    }
    if !out.stderr.trim().is_empty() {
        println!("---------------------------------- stderr -----------------------------------");
        print!("{}", out.stderr);
    }
    println!("-----------------------------------------------------------------------------");
    let code = out.code();
    let meaning = match code {
        Some(0) => "no connection lost",
        Some(1) => "connections lost",
        Some(2) => "error",
        _ => "unexpected",
    };
    println!(
        "  netrace exit status: {} ({meaning})",
        code.map_or_else(|| "killed by a signal".to_owned(), |c| c.to_string())
    );
    if code == Some(2) || code.is_none() {
        bail!("netrace failed: {}", out.stderr.trim());
    }
    Ok(RunOutcome {
        tcp,
        udp,
        netrace_exit: code,
    })
}

fn real_node() {
    phase("on a real node");
    println!(
        "  sudo netrace watch --iface eth0          # Ctrl-C prints the report; or --duration 5m"
    );
    println!("  sudo netrace watch --iface eth0 --allowed-ports 32768-65535 --list-lost");
    println!("  On Kubernetes, with the image you built and pushed (docs/operations.md; it has no");
    println!("  shell, so give the command):");
    println!("  kubectl debug node/NODE-NAME -it --profile=sysadmin \\");
    println!("      --image=REGISTRY/netrace:TAG \\");
    println!("      -- /usr/bin/netrace watch --iface eth0 --procfs /host/proc");
    println!("  (or deploy/debug-pod.yaml where `kubectl debug` is not available)");
}
