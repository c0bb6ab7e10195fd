//! Owns every kernel attachment. Nothing else attaches or detaches; dropping [`Attachments`]
//! detaches everything, and TCX links also go away by themselves if the process dies.

use anyhow::{anyhow, Context as _};
use aya::{
    programs::{
        raw_trace_point::RawTracePointLinkId,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcError},
        trace_point::TracePointLinkId,
        LinkOrder, ProgramError, RawTracePoint, SchedClassifier, TcAttachType, TracePoint,
    },
    Ebpf,
};

use netrace_common::parse;

use crate::{
    error::UsageError,
    kernel::loader::{
        EGRESS_L3_PROGRAM, EGRESS_PROGRAM, INGRESS_L3_PROGRAM, INGRESS_PROGRAM,
        POD_INGRESS_PROGRAM, SOCK_STATE_PROGRAM, XMIT_PROGRAM, XMIT_TRACEPOINT,
    },
    kernel::netlink::{self, Hook},
    kernel::tracefs,
    node::iface,
    options::AttachMode,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Tcx,
    Clsact,
}

/// The (egress, ingress) programs for one interface.
type Programs = (&'static str, &'static str);

struct Link {
    program: &'static str,
    iface: String,
    id: Option<SchedClassifierLinkId>,
}

pub struct Attachments {
    ebpf: Ebpf,
    links: Vec<Link>,
    /// Interfaces where netrace added the clsact qdisc (and so may remove it).
    created_qdiscs: Vec<String>,
    pub via: Option<Via>,
    tracepoint: Option<TracePointLinkId>,
    /// The device hook, when outbound SYNs are taken at the device instead of tc egress.
    xmit: Option<RawTracePointLinkId>,
    /// Whether [`Attachments::attach`] puts a classifier on egress (false with the device hook).
    pub tc_egress: bool,
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut SchedClassifier> {
    let p: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("the kernel object has no program {name}"))?
        .try_into()?;
    Ok(p)
}

impl Attachments {
    /// Loads (verifies) both programs; attaches nothing yet.
    pub fn new(mut ebpf: Ebpf) -> anyhow::Result<Self> {
        for name in [EGRESS_PROGRAM, INGRESS_PROGRAM] {
            program(&mut ebpf, name)?
                .load()
                .with_context(|| format!("the kernel refused program {name}"))?;
        }
        Ok(Self {
            ebpf,
            links: Vec::new(),
            created_qdiscs: Vec::new(),
            via: None,
            tracepoint: None,
            xmit: None,
            tc_egress: true,
        })
    }

    /// The program, for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self, name: &str) -> anyhow::Result<&mut SchedClassifier> {
        program(&mut self.ebpf, name)
    }

    /// Attaches egress and ingress to `iface`: the Ethernet programs, or the bare-IP ones on
    /// interfaces without a link-layer header; an interface of another type is refused.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> anyhow::Result<Via> {
        let progs = match iface::link(iface).map_err(UsageError)? {
            parse::Link::Ethernet => (EGRESS_PROGRAM, INGRESS_PROGRAM),
            parse::Link::RawIp => {
                for name in [EGRESS_L3_PROGRAM, INGRESS_L3_PROGRAM] {
                    let p = program(&mut self.ebpf, name)?;
                    if p.fd().is_err() {
                        p.load()
                            .with_context(|| format!("the kernel refused program {name}"))?;
                    }
                }
                (EGRESS_L3_PROGRAM, INGRESS_L3_PROGRAM)
            }
        };
        let via = match (mode, self.via) {
            (AttachMode::Tcx, _) | (AttachMode::Auto, Some(Via::Tcx)) => {
                self.attach_tcx(iface, progs)?;
                Via::Tcx
            }
            (AttachMode::Clsact, _) | (AttachMode::Auto, Some(Via::Clsact)) => {
                self.attach_clsact(iface, progs)?;
                Via::Clsact
            }
            (AttachMode::Auto, None) => match self.attach_tcx(iface, progs) {
                Ok(()) => Via::Tcx,
                Err(tcx) => {
                    log::debug!("TCX attach failed ({tcx:#}); falling back to clsact");
                    self.attach_clsact(iface, progs)
                        .with_context(|| format!("TCX failed too: {tcx:#}"))?;
                    Via::Clsact
                }
            },
        };
        self.via = Some(via);
        Ok(via)
    }

    /// Attaches the pod-side program to the ingress of `iface` (the pods' SYNs enter there).
    pub fn attach_pod_side(&mut self, iface: &str) -> anyhow::Result<()> {
        let p = program(&mut self.ebpf, POD_INGRESS_PROGRAM)?;
        if p.fd().is_err() {
            p.load()
                .with_context(|| format!("the kernel refused program {POD_INGRESS_PROGRAM}"))?;
        }
        match self.via {
            Some(Via::Clsact) => {
                match tc::qdisc_add_clsact(iface) {
                    Ok(()) => self.created_qdiscs.push(iface.to_string()),
                    Err(TcError::AlreadyAttached) => {}
                    Err(e) => return Err(anyhow!("adding a clsact qdisc to {iface}: {e}")),
                }
                self.attach_one(
                    POD_INGRESS_PROGRAM,
                    iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(NlOptions::default()),
                )
            }
            _ => self.attach_one(
                POD_INGRESS_PROGRAM,
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            ),
        }
    }

    /// Loads and attaches the device hook (the `net_dev_start_xmit` raw tracepoint). Its
    /// offsets and watched devices must be set first; until they are, it does nothing.
    pub fn attach_xmit(&mut self) -> anyhow::Result<()> {
        let tp: &mut RawTracePoint = self
            .ebpf
            .program_mut(XMIT_PROGRAM)
            .ok_or_else(|| anyhow!("the kernel object has no program {XMIT_PROGRAM}"))?
            .try_into()?;
        if tp.fd().is_err() {
            tp.load()
                .with_context(|| format!("the kernel refused program {XMIT_PROGRAM}"))?;
        }
        let id = tp
            .attach(XMIT_TRACEPOINT)
            .map_err(|e| describe_tp(e, XMIT_TRACEPOINT))?;
        self.xmit = Some(id);
        Ok(())
    }

    /// The device hook program, for its run-time statistics.
    pub fn xmit_program(&mut self) -> Option<&mut RawTracePoint> {
        self.ebpf
            .program_mut(XMIT_PROGRAM)
            .and_then(|p| p.try_into().ok())
    }

    /// Attaches the socket-state tracepoint (tracefs is found or privately mounted first).
    pub fn attach_tracepoint(&mut self) -> anyhow::Result<()> {
        tracefs::ensure()?;
        let tp: &mut TracePoint = self
            .ebpf
            .program_mut(SOCK_STATE_PROGRAM)
            .ok_or_else(|| anyhow!("the kernel object has no program {SOCK_STATE_PROGRAM}"))?
            .try_into()?;
        tp.load()
            .with_context(|| format!("the kernel refused program {SOCK_STATE_PROGRAM}"))?;
        let id = tp
            .attach(tracefs::CATEGORY, tracefs::EVENT)
            .with_context(|| format!("attaching to {}:{}", tracefs::CATEGORY, tracefs::EVENT))?;
        self.tracepoint = Some(id);
        Ok(())
    }

    fn attach_one(
        &mut self,
        name: &'static str,
        iface: &str,
        ty: TcAttachType,
        opts: TcAttachOptions,
    ) -> anyhow::Result<()> {
        let id = program(&mut self.ebpf, name)?
            .attach_with_options(iface, ty, opts)
            .map_err(|e| describe(e, iface))?;
        self.links.push(Link {
            program: name,
            iface: iface.to_string(),
            id: Some(id),
        });
        Ok(())
    }

    fn attach_tcx(&mut self, iface: &str, progs: Programs) -> anyhow::Result<()> {
        // First in line, so a program that redirects or drops cannot hide packets from us.
        if self.tc_egress {
            self.attach_one(
                progs.0,
                iface,
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )?;
        }
        self.attach_one(
            progs.1,
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )
    }

    fn attach_clsact(&mut self, iface: &str, progs: Programs) -> anyhow::Result<()> {
        match tc::qdisc_add_clsact(iface) {
            Ok(()) => self.created_qdiscs.push(iface.to_string()),
            Err(TcError::AlreadyAttached) => {}
            // aya reports a clsact qdisc that is already there (another tool's, or another
            // netrace's) as the kernel's EEXIST ("Exclusivity flag on, cannot modify").
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(anyhow!("adding a clsact qdisc to {iface}: {e}")),
        }
        // First in line, as with TCX: a classic filter that matches ends the classification,
        // so one running before netrace's would hide packets from it (and every connection
        // would look lost). An unused priority below the others; never replace a filter.
        if self.tc_egress {
            self.attach_one(
                progs.0,
                iface,
                TcAttachType::Egress,
                TcAttachOptions::Netlink(first_in_line(iface, Hook::Egress)),
            )?;
        }
        self.attach_one(
            progs.1,
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(first_in_line(iface, Hook::Ingress)),
        )
    }

    /// Detaches everything netrace attached. Links on interfaces that vanished are already
    /// gone; their errors are ignored.
    pub fn detach_all(&mut self) {
        let links = std::mem::take(&mut self.links);
        for mut l in links {
            if let (Some(id), Ok(p)) = (l.id.take(), program(&mut self.ebpf, l.program)) {
                if let Err(e) = p.detach(id) {
                    log::debug!("detaching {} from {}: {e}", l.program, l.iface);
                }
            }
        }
        if let Some(id) = self.tracepoint.take() {
            let tp: Option<&mut TracePoint> = self
                .ebpf
                .program_mut(SOCK_STATE_PROGRAM)
                .and_then(|p| p.try_into().ok());
            if let Some(tp) = tp {
                if let Err(e) = tp.detach(id) {
                    log::debug!("detaching the tracepoint: {e}");
                }
            }
        }
        if let Some(id) = self.xmit.take() {
            if let Some(tp) = self.xmit_program() {
                if let Err(e) = tp.detach(id) {
                    log::debug!("detaching the device hook: {e}");
                }
            }
        }
        for iface in std::mem::take(&mut self.created_qdiscs) {
            remove_qdisc_if_empty(&iface);
        }
    }
}

impl Drop for Attachments {
    fn drop(&mut self) {
        self.detach_all();
    }
}

/// A filter priority before every clsact filter already on `iface` in `hook`, or the
/// kernel's choice (after them) when there is none or no lower one is free.
fn first_in_line(iface: &str, hook: Hook) -> NlOptions {
    let lowest = iface::index(iface)
        .and_then(|idx| match netlink::filters(idx, hook) {
            Ok(f) => Some(f),
            Err(e) => {
                log::warn!("listing the tc filters on {iface}: {e}");
                None
            }
        })
        .and_then(|f| f.iter().map(|f| f.priority).min());
    let dir = hook_name(hook);
    match lowest {
        Some(p) if p > 1 => NlOptions {
            priority: p - 1,
            ..NlOptions::default()
        },
        Some(p) => {
            log::warn!(
                "a tc filter with priority {p} on {iface} {dir} runs before netrace's; packets \
                 it takes are not seen"
            );
            NlOptions::default()
        }
        None => NlOptions::default(),
    }
}

fn hook_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Ingress => "ingress",
        Hook::Egress => "egress",
    }
}

/// Removes the clsact qdisc netrace added, unless someone else's filters now live on it.
fn remove_qdisc_if_empty(iface: &str) {
    let Some(idx) = iface::index(iface) else {
        return; // The interface went away, and its qdisc with it.
    };
    let empty = |hook| netlink::filters(idx, hook).is_ok_and(|f| f.is_empty());
    if empty(Hook::Ingress) && empty(Hook::Egress) {
        if let Err(e) = netlink::delete_clsact(idx) {
            log::warn!("removing the clsact qdisc netrace added to {iface}: {e}");
        }
    } else {
        log::debug!("the clsact qdisc on {iface} carries other filters now; left in place");
    }
}

fn describe_tp(e: ProgramError, tracepoint: &str) -> anyhow::Error {
    let source = std::error::Error::source(&e)
        .map(|s| format!(": {s}"))
        .unwrap_or_default();
    anyhow!("attaching to the {tracepoint} tracepoint: {e}{source}")
}

fn describe(e: ProgramError, iface: &str) -> anyhow::Error {
    let text = format!("{e}");
    let source = std::error::Error::source(&e)
        .map(|s| format!(": {s}"))
        .unwrap_or_default();
    anyhow!("attaching to {iface}: {text}{source}")
}
