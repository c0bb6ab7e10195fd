//! Putting netrace in place: the metrics server, the kernel object and its maps, the
//! attachments (uplink, pod side, tracepoint), the cgroup2 mount for naming pods, and the ready
//! file once everything is attached. What fails here before anything is attached is an error;
//! what only takes attribution away becomes a note.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::Context as _;
use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use netrace_common::{Counter, KernelFilter, SkbOffsets, TpOffsets, XmitIface};
use tokio::io::{unix::AsyncFd, Interest};

use super::{config::WatchConfig, interfaces::Interfaces};
use crate::{
    error::UsageError,
    kernel::{
        attach::{Attachments, Via},
        egress_hook::{self, Hook},
        loader::{self, Books, Maps, Pending},
        logs::Logs,
        mounts, tracefs,
    },
    metrics::{self, Metrics},
    node::{cgroups, iface},
    options::{EgressHook, OutputFormat},
    track::correlate::Correlator,
};

/// Where cgroup2 is mounted, or mounted by netrace when it is missing from its view.
const CGROUP2_MOUNT: &str = "/sys/fs/cgroup";

/// The metrics server, on a thread of its own with its own event loop: however it is used or
/// abused, it never takes time from the watch loop, and it answers while netrace is still
/// loading and attaching (`/readyz`: not yet). Stopped when dropped.
pub struct MetricsServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves `metrics` at `--metrics-addr`, if given. The port is bound here, so a busy port is a
/// usage error before anything is attached.
pub fn metrics_server(
    cfg: &WatchConfig,
    metrics: &Metrics,
) -> anyhow::Result<Option<MetricsServer>> {
    let Some(addr) = cfg.metrics_addr else {
        return Ok(None);
    };
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| UsageError(format!("--metrics-addr: cannot listen on {addr}: {e}")))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the metrics server's event loop")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = metrics.clone();
    std::thread::Builder::new()
        .name("netrace-metrics".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        log::warn!("metrics: cannot serve on {addr}: {e}");
                        return;
                    }
                };
                tokio::select! {
                    () = metrics::serve(listener, metrics) => {}
                    _ = stopped => {}
                }
            });
        })
        .context("starting the metrics server's thread")?;
    Ok(Some(MetricsServer { stop: Some(stop) }))
}

/// The loaded, attached kernel side: its attachments and the maps user space reads.
pub struct Kernel {
    pub attachments: Attachments,
    pub ring: AsyncFd<RingBuf<MapData>>,
    pub pending: Pending,
    pub books: Books,
    pub logs: Logs,
    counters: PerCpuArray<MapData, u64>,
    syn_ports: Array<MapData, u64>,
    /// Held only so the maps outlive the programs that read them.
    _filter: Array<MapData, KernelFilter>,
    _tp_offsets: Array<MapData, TpOffsets>,
    _skb_offsets: Array<MapData, SkbOffsets>,
    _xmit_ifaces: HashMap<MapData, u32, XmitIface>,
}

impl Kernel {
    /// One kernel counter, summed over CPUs.
    pub fn counter(&self, c: Counter) -> u64 {
        Maps::counters_view(&self.counters, &self.syn_ports).counter(c)
    }

    /// Every counter in one read (by `Counter as usize`), or `None` when they could not be
    /// read.
    pub fn all_counters(&self) -> Option<Vec<u64>> {
        Maps::counters_view(&self.counters, &self.syn_ports).all()
    }

    /// Every kernel counter, by name.
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        // One batched read; counter by counter only if that fails.
        let all = self.all_counters();
        loader::COUNTERS
            .iter()
            .map(|(c, name)| {
                let v = all.as_ref().and_then(|v| v.get(*c as usize).copied());
                (*name, v.unwrap_or_else(|| self.counter(*c)))
            })
            .collect()
    }

    /// SYN packets per source port, only the ports that saw any (read the logs first).
    pub fn syn_ports(&self) -> Vec<(u16, u64)> {
        Maps::counters_view(&self.counters, &self.syn_ports).syn_ports(self.logs.syn_ports())
    }
}

/// What setting up leaves for the run.
pub struct Attached {
    pub kernel: Kernel,
    pub interfaces: Interfaces,
    /// Attribution that could not be set up, said once on standard error and in the report.
    pub notes: Vec<String>,
    /// Pod and process attribution, when asked for.
    pub correlator: Option<Correlator>,
    /// Where outbound SYNs are observed, and the line that says why.
    pub hook: Hook,
    pub hook_reason: String,
}

/// Loads the programs, attaches them, writes the ready file and says what is watched.
pub fn attach(cfg: &WatchConfig, metrics: &Metrics) -> anyhow::Result<Attached> {
    let (ebpf, maps) = loader::load(cfg.max_pending, cfg.ringbuf_bytes, cfg.kernel_filter())?;
    let Maps {
        events,
        pending,
        books,
        counters,
        syn_ports,
        logs,
        filter,
        mut tp_offsets,
        kernel_log,
        mut skb_offsets,
        mut xmit_ifaces,
    } = maps;
    if let Some(logger) = kernel_log {
        forward_kernel_log(logger);
    }
    let mut attachments = Attachments::new(ebpf)?;
    let (hook, hook_reason) =
        egress_hook(cfg, &mut attachments, &mut skb_offsets, &mut xmit_ifaces)?;
    let interfaces = attach_interfaces(cfg, &mut attachments, metrics)?;
    let mut notes = Vec::new();
    if cfg.processes {
        // Attribution is an extra: without it, the histogram and verdict still stand.
        if let Err(e) = attach_tracepoint(&mut attachments, &mut tp_offsets) {
            note(&mut notes, format!("process attribution is off: {e:#}"));
        }
    }
    let cgroup_root = cgroup_root(cfg, &mut notes);
    let correlator = cfg.correlating().then(|| {
        Correlator::new(cgroup_root.unwrap_or_else(|| CGROUP2_MOUNT.into()))
            .with_host_root(&cfg.host_root)
    });
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long as
    // the AsyncFd owns the ring buffer.
    let ring = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {}", e.into_parts().1))?;
    // Every program is attached: /readyz says so from now on.
    metrics.set_ready(true);
    if let Some(path) = &cfg.ready_file {
        crate::files::write_new(path, b"ready\n")
            .with_context(|| format!("writing --ready-file {}", path.display()))?;
    }
    if cfg.output == OutputFormat::Text {
        eprintln!(
            "netrace: watching {} ({}), SYN-ACKs allowed back to {}; Ctrl-C to stop and report",
            cfg.ifaces.join(", "),
            match attachments.via {
                Some(Via::Tcx) => "TCX",
                _ => "clsact",
            },
            cfg.allowed
        );
    }
    Ok(Attached {
        kernel: Kernel {
            attachments,
            ring,
            pending,
            books,
            logs,
            counters,
            syn_ports,
            _filter: filter,
            _tp_offsets: tp_offsets,
            _skb_offsets: skb_offsets,
            _xmit_ifaces: xmit_ifaces,
        },
        interfaces,
        notes,
        correlator,
        hook,
        hook_reason,
    })
}

/// Forwards the kernel programs' debug messages to the logger as they come, on the event loop
/// (each wake-up drains what is there; nothing blocks).
fn forward_kernel_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd, which stays open and unchanged for as
    // long as the AsyncFd owns the logger.
    let mut fd = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            log::warn!(
                "the kernel programs' debug messages are off: {}",
                e.into_parts().1
            );
            return;
        }
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Chooses where outbound SYNs are observed and sets the device hook up when it is chosen (its
/// offsets and watched devices first, then the tracepoint); the tc egress classifier is
/// attached with the interfaces only for the tc hook. Says the choice on standard error unless
/// it is the default case (auto, nothing else on egress: tc).
fn egress_hook(
    cfg: &WatchConfig,
    attachments: &mut Attachments,
    skb_offsets: &mut Array<MapData, SkbOffsets>,
    xmit_ifaces: &mut HashMap<MapData, u32, XmitIface>,
) -> anyhow::Result<(Hook, String)> {
    let choice = egress_hook::choose(cfg.egress_hook, &cfg.ifaces)
        .map_err(|e| UsageError(format!("{e:#}")))?;
    let (mut hook, mut reason, mut quiet) = (choice.hook, choice.reason, choice.quiet);
    if let Some(offsets) = choice.offsets {
        let mut set_up = || -> anyhow::Result<()> {
            skb_offsets
                .set(0, offsets, 0)
                .context("setting the device hook's offsets")?;
            let netns = egress_hook::own_netns()?;
            for name in &cfg.ifaces {
                let idx = iface::index(name)
                    .ok_or_else(|| anyhow::anyhow!("interface '{name}' went away"))?;
                xmit_ifaces
                    .insert(idx, egress_hook::xmit_iface(name, netns), 0)
                    .context("setting the device hook's interfaces")?;
            }
            attachments.attach_xmit()
        };
        if let Err(e) = set_up() {
            if cfg.egress_hook == EgressHook::Xmit {
                return Err(UsageError(format!(
                    "--egress-hook xmit: the device hook cannot run here: {e:#}"
                ))
                .into());
            }
            hook = Hook::Tc;
            reason = format!("egress hook: tc; the device hook could not attach: {e:#}");
            quiet = false;
        }
    }
    attachments.tc_egress = hook == Hook::Tc;
    if !quiet {
        eprintln!("netrace: {reason}");
    }
    Ok((hook, reason))
}

/// Says `msg` on standard error and keeps it for the report.
fn note(notes: &mut Vec<String>, msg: String) {
    eprintln!("netrace: {msg}");
    notes.push(msg);
}

/// Attaches to the uplink interfaces, then to the pod-side ones.
fn attach_interfaces(
    cfg: &WatchConfig,
    attachments: &mut Attachments,
    metrics: &Metrics,
) -> anyhow::Result<Interfaces> {
    let mut interfaces = Interfaces::default();
    for name in &cfg.ifaces {
        let idx = iface::index(name)
            .ok_or_else(|| UsageError(format!("--iface: interface '{name}' went away")))?;
        attachments.attach(name, cfg.attach)?;
        metrics.set_attached(name, "egress", true);
        metrics.set_attached(name, "ingress", true);
        interfaces.attached(idx, name);
    }
    for name in &cfg.pod_ifaces {
        let idx = iface::index(name)
            .ok_or_else(|| UsageError(format!("--pod-iface: interface '{name}' went away")))?;
        attachments.attach_pod_side(name)?;
        metrics.set_attached(name, "pod_ingress", true);
        interfaces.attached(idx, name);
    }
    Ok(interfaces)
}

/// The socket-state tracepoint, with the field offsets this kernel uses.
fn attach_tracepoint(
    attachments: &mut Attachments,
    tp_offsets: &mut Array<MapData, TpOffsets>,
) -> anyhow::Result<()> {
    let root = tracefs::ensure()?;
    let offsets = tracefs::offsets(&root)?;
    tp_offsets
        .set(0, offsets, 0)
        .context("setting tracepoint offsets")?;
    attachments.attach_tracepoint()
}

/// Where cgroup2 is mounted; mounted privately when processes are named and it is missing.
fn cgroup_root(cfg: &WatchConfig, notes: &mut Vec<String>) -> Option<PathBuf> {
    if let Some(given) = &cfg.cgroup_root {
        return Some(given.clone());
    }
    let root = cgroups::cgroup2_root();
    if !cfg.processes || root.is_some() {
        return root;
    }
    match mounts::ensure("cgroup2", CGROUP2_MOUNT, "cgroup.controllers") {
        Ok(()) => Some(CGROUP2_MOUNT.into()),
        Err(e) => {
            note(notes, format!("cgroups cannot be named: {e:#}"));
            None
        }
    }
}
