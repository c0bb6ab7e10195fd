//! Every netlink conversation netrace has with the kernel beyond what aya does itself: listing
//! the clsact filters on an interface, deleting a clsact qdisc netrace added, and looking up a
//! conntrack entry by its reply tuple. No external program (`tc`, `conntrack`) is ever run.
//!
//! Each call opens its own socket, sends one request and reads until the kernel's final
//! acknowledgement; the kernel answers these requests within the send, and a receive timeout
//! bounds the wait if it ever does not.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;

const RTM_DELQDISC: u16 = 37;
const RTM_GETTFILTER: u16 = 46;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;

const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
const TC_H_MIN_INGRESS: u32 = 0xFFF2;
const TC_H_MIN_EGRESS: u32 = 0xFFF3;

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// How long one tc request may wait for the kernel's answer.
const RECV_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a conntrack lookup may wait: it runs on the event loop, for lost connections
/// only (the kernel answers within the request; this bounds the case where it does not).
const CONNTRACK_TIMEOUT: Duration = Duration::from_millis(50);

/// A clsact direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    fn parent(self) -> u32 {
        (TC_H_CLSACT & 0xFFFF_0000)
            | match self {
                Hook::Ingress => TC_H_MIN_INGRESS,
                Hook::Egress => TC_H_MIN_EGRESS,
            }
    }
}

/// One classic tc filter (one line of `tc filter show`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    /// `bpf`, `u32`, `flower`, ...
    pub kind: String,
    /// For `bpf` filters: the program's name as tc shows it (e.g. `netrace_egress`).
    pub bpf_name: Option<String>,
}

/// A netlink message builder: header, fixed payload, attributes.
struct Msg(Vec<u8>);

impl Msg {
    fn new(ty: u16, flags: u16, fixed: &[u8]) -> Self {
        let mut b = vec![0u8; NLMSG_HDRLEN];
        b[4..6].copy_from_slice(&ty.to_ne_bytes());
        b[6..8].copy_from_slice(&flags.to_ne_bytes());
        b[8..12].copy_from_slice(&1u32.to_ne_bytes());
        b.extend_from_slice(fixed);
        let mut m = Self(b);
        m.pad();
        m
    }

    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn attr(&mut self, ty: u16, value: &[u8]) -> &mut Self {
        let len = u16::try_from(4 + value.len()).unwrap_or(u16::MAX);
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.pad();
        self
    }

    /// A nested attribute whose content `f` writes.
    fn nested(&mut self, ty: u16, f: impl FnOnce(&mut Self)) -> &mut Self {
        let start = self.0.len();
        self.0.extend_from_slice(&[0, 0]);
        self.0.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        f(self);
        let len = u16::try_from(self.0.len() - start).unwrap_or(u16::MAX);
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.0.len()).unwrap_or(u32::MAX);
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

fn tcmsg(ifindex: u32, handle: u32, parent: u32) -> [u8; 20] {
    let mut t = [0u8; 20];
    // family AF_UNSPEC, padding; then ifindex, handle, parent, info.
    t[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    t[8..12].copy_from_slice(&handle.to_ne_bytes());
    t[12..16].copy_from_slice(&parent.to_ne_bytes());
    t
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// The attributes in `b`: (type without flags, value).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(b, 0)?);
        let ty = u16_at(b, 2)? & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let value = &b[4..len];
        b = b.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        Some((ty, value))
    })
}

fn attr(b: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(b).find(|(t, _)| *t == ty).map(|(_, v)| v)
}

fn c_string(v: &[u8]) -> String {
    let end = v.iter().position(|c| *c == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// An open netlink socket of one protocol.
struct Socket(OwnedFd);

impl Socket {
    fn open(protocol: libc::c_int, timeout: Duration) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: `tv` is a valid timeval whose size is passed along.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    /// Sends `msg` and collects the payloads (after the netlink header) of every answer
    /// until the final acknowledgement or `NLMSG_DONE`. A kernel error is returned as such.
    fn request(&self, msg: &[u8]) -> io::Result<Vec<(u16, Vec<u8>)>> {
        // SAFETY: an all-zero sockaddr_nl is valid; the kernel is pid 0.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `msg` and `to` are valid for the lengths passed.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const to).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut b = &buf[..n as usize];
            while b.len() >= NLMSG_HDRLEN {
                let len = u32_at(b, 0).map_or(0, |l| l as usize);
                let ty = u16_at(b, 4).unwrap_or(0);
                if len < NLMSG_HDRLEN || len > b.len() {
                    return Err(io::Error::other("a malformed netlink message"));
                }
                let payload = &b[NLMSG_HDRLEN..len];
                match ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = u32_at(payload, 0).map_or(0, |c| c as i32);
                        return if code == 0 {
                            Ok(out)
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    _ => out.push((ty, payload.to_vec())),
                }
                b = b.get(len.next_multiple_of(4)..).unwrap_or(&[]);
            }
        }
    }
}

/// The classic filters on `ifindex`'s clsact `hook`, in the kernel's order (by priority).
/// An interface without a clsact qdisc has none.
pub fn filters(ifindex: u32, hook: Hook) -> io::Result<Vec<Filter>> {
    let s = Socket::open(libc::NETLINK_ROUTE, RECV_TIMEOUT)?;
    let msg = Msg::new(
        RTM_GETTFILTER,
        NLM_F_REQUEST | NLM_F_DUMP,
        &tcmsg(ifindex, 0, hook.parent()),
    )
    .finish();
    let answers = match s.request(&msg) {
        Ok(a) => a,
        // No clsact qdisc: nothing to list.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for (_, p) in answers {
        let Some(info) = u32_at(&p, 16) else { continue };
        let rest = p.get(20..).unwrap_or(&[]);
        let kind = attr(rest, TCA_KIND).map(c_string).unwrap_or_default();
        let bpf_name = (kind == "bpf")
            .then(|| attr(rest, TCA_OPTIONS).and_then(|o| attr(o, TCA_BPF_NAME)))
            .flatten()
            .map(c_string);
        out.push(Filter {
            priority: (info >> 16) as u16,
            kind,
            bpf_name,
        });
    }
    Ok(out)
}

/// Deletes the clsact qdisc of `ifindex` (and with it every filter still on it).
pub fn delete_clsact(ifindex: u32) -> io::Result<()> {
    let s = Socket::open(libc::NETLINK_ROUTE, RECV_TIMEOUT)?;
    let mut m = Msg::new(
        RTM_DELQDISC,
        NLM_F_REQUEST | NLM_F_ACK,
        &tcmsg(ifindex, TC_H_CLSACT & 0xFFFF_0000, TC_H_CLSACT),
    );
    m.attr(TCA_KIND, b"clsact\0");
    s.request(&m.finish()).map(drop)
}

/// A TCP connection as conntrack knows it, in one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

fn put_tuple(m: &mut Msg, t: &Tuple) {
    m.nested(CTA_TUPLE_IP, |m| match (t.src, t.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            m.attr(CTA_IP_V4_SRC, &s.octets());
            m.attr(CTA_IP_V4_DST, &d.octets());
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                IpAddr::V6(a) => a.octets(),
            };
            m.attr(CTA_IP_V6_SRC, &v6(s));
            m.attr(CTA_IP_V6_DST, &v6(d));
        }
    });
    m.nested(CTA_TUPLE_PROTO, |m| {
        m.attr(CTA_PROTO_NUM, &[libc::IPPROTO_TCP as u8]);
        m.attr(CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes());
        m.attr(CTA_PROTO_DST_PORT, &t.dport.to_be_bytes());
    });
}

fn parse_tuple(b: &[u8]) -> Option<Tuple> {
    let ip = attr(b, CTA_TUPLE_IP)?;
    let proto = attr(b, CTA_TUPLE_PROTO)?;
    let addr = |v4: u16, v6: u16| -> Option<IpAddr> {
        if let Some(v) = attr(ip, v4) {
            let o: [u8; 4] = v.try_into().ok()?;
            return Some(IpAddr::from(o));
        }
        let o: [u8; 16] = attr(ip, v6)?.try_into().ok()?;
        Some(IpAddr::from(o))
    };
    let port =
        |ty: u16| -> Option<u16> { Some(u16::from_be_bytes(attr(proto, ty)?.try_into().ok()?)) };
    Some(Tuple {
        src: addr(CTA_IP_V4_SRC, CTA_IP_V6_SRC)?,
        dst: addr(CTA_IP_V4_DST, CTA_IP_V6_DST)?,
        sport: port(CTA_PROTO_SRC_PORT)?,
        dport: port(CTA_PROTO_DST_PORT)?,
    })
}

/// The original-direction tuple of the TCP connection whose reply direction is `reply`
/// (`conntrack -L --reply-src ... --reply-port-dst ...`), or `None` when conntrack has no
/// such entry.
pub fn conntrack_original(reply: &Tuple) -> io::Result<Option<Tuple>> {
    let s = Socket::open(NETLINK_NETFILTER, CONNTRACK_TIMEOUT)?;
    let family = if reply.src.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // nfgenmsg: family, version 0, resource id 0.
    let mut m = Msg::new(
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_ACK,
        &[family as u8, 0, 0, 0],
    );
    m.nested(CTA_TUPLE_REPLY, |m| put_tuple(m, reply));
    let answers = match s.request(&m.finish()) {
        Ok(a) => a,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(answers
        .iter()
        .find_map(|(_, p)| parse_tuple(attr(p.get(4..)?, CTA_TUPLE_ORIG)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let t = Tuple {
            src: "198.18.3.2".parse().unwrap_or(IpAddr::from([0u8; 4])),
            dst: "198.18.2.1".parse().unwrap_or(IpAddr::from([0u8; 4])),
            sport: 8080,
            dport: 2000,
        };
        let mut m = Msg::new(1, 0, &[2, 0, 0, 0]);
        m.nested(CTA_TUPLE_ORIG, |m| put_tuple(m, &t));
        let b = m.finish();
        assert_eq!(u32_at(&b, 0), Some(b.len() as u32));
        let payload = &b[NLMSG_HDRLEN + 4..];
        let parsed = attr(payload, CTA_TUPLE_ORIG).and_then(parse_tuple);
        assert_eq!(parsed, Some(t));
    }

    #[test]
    fn clsact_parents() {
        assert_eq!(Hook::Ingress.parent(), 0xFFFF_FFF2);
        assert_eq!(Hook::Egress.parent(), 0xFFFF_FFF3);
    }
}
