//! Ring-buffer records decoded into typed events, field by field with `bytes::Buf` (no
//! pointer casts): the layouts are the `#[repr(C)]` ones of netrace-common, in the kernel's
//! (native) byte order, their sizes checked at compile time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::Buf;

use netrace_common::{
    EventKind, FlowKey, OutcomeEvent, PendingSyn, SockEvent, FAMILY_V4, FAMILY_V6,
    OUTCOME_EVENT_SIZE, SOCK_EVENT_SIZE,
};

/// Why a ring-buffer record could not be decoded.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The record's size does not match the size its kind must have.
    #[error("record of {got} bytes, expected {expected}")]
    WrongSize { got: usize, expected: usize },
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("unknown address family {0}")]
    UnknownFamily(u8),
    #[error("event kind {0} is not a connection event")]
    NotAConnectionEvent(u32),
}

/// One decoded record: the raw event with its kind checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub raw: OutcomeEvent,
}

impl Event {
    /// An event as the kernel would send it (tests, fuzzing, models of the kernel side).
    pub fn new(kind: EventKind, key: FlowKey, pending: PendingSyn, ts_ns: u64) -> Self {
        Self {
            kind,
            raw: OutcomeEvent {
                kind: kind as u32,
                key,
                pending,
                ts_ns,
                ..Default::default()
            },
        }
    }
}

impl TryFrom<&[u8]> for Event {
    type Error = DecodeError;

    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        if bytes.len() != OUTCOME_EVENT_SIZE {
            return Err(DecodeError::WrongSize {
                got: bytes.len(),
                expected: OUTCOME_EVENT_SIZE,
            });
        }
        let raw = outcome_event(bytes);
        let kind = EventKind::from_u32(raw.kind).ok_or(DecodeError::UnknownKind(raw.kind))?;
        if matches!(kind, EventKind::SockConnect | EventKind::SockLeftSynSent) {
            return Err(DecodeError::NotAConnectionEvent(raw.kind));
        }
        check_family(raw.key.family)?;
        Ok(Self { kind, raw })
    }
}

// The layouts decoded below; a change in netrace-common must change the decoders too.
const _: () = assert!(OUTCOME_EVENT_SIZE == 96 && SOCK_EVENT_SIZE == 96);
const _: () = assert!(std::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(std::mem::size_of::<PendingSyn>() == 32);

fn flow_key(b: &mut &[u8]) -> FlowKey {
    let family = b.get_u8();
    b.advance(3);
    let src_port = b.get_u16_ne();
    let dst_port = b.get_u16_ne();
    let mut k = FlowKey {
        family,
        src_port,
        dst_port,
        ..Default::default()
    };
    b.copy_to_slice(&mut k.src_addr);
    b.copy_to_slice(&mut k.dst_addr);
    k
}

/// An `OutcomeEvent` from exactly [`OUTCOME_EVENT_SIZE`] bytes.
fn outcome_event(mut b: &[u8]) -> OutcomeEvent {
    let kind = b.get_u32_ne();
    let ifindex = b.get_u32_ne();
    let key = flow_key(&mut b);
    let pending = PendingSyn {
        first_ns: b.get_u64_ne(),
        last_ns: b.get_u64_ne(),
        isn: b.get_u32_ne(),
        syns: b.get_u32_ne(),
        ifindex: b.get_u32_ne(),
        data_len: b.get_u16_ne(),
        state: b.get_u8(),
        _pad: b.get_u8(),
    };
    let ts_ns = b.get_u64_ne();
    let icmp_type = b.get_u8();
    let icmp_code = b.get_u8();
    OutcomeEvent {
        kind,
        ifindex,
        key,
        pending,
        ts_ns,
        icmp_type,
        icmp_code,
        ..Default::default()
    }
}

/// A `SockEvent` from exactly [`SOCK_EVENT_SIZE`] bytes.
fn sock_event(mut b: &[u8]) -> SockEvent {
    let kind = b.get_u32_ne();
    let tgid = b.get_u32_ne();
    let key = flow_key(&mut b);
    let skaddr = b.get_u64_ne();
    let cgroup_id = b.get_u64_ne();
    let ts_ns = b.get_u64_ne();
    let mut comm = [0u8; 16];
    b.copy_to_slice(&mut comm);
    SockEvent {
        kind,
        tgid,
        key,
        skaddr,
        cgroup_id,
        ts_ns,
        comm,
        new_state: b.get_u32_ne(),
        pid: b.get_u32_ne(),
    }
}

fn check_family(family: u8) -> Result<(), DecodeError> {
    if family != FAMILY_V4 && family != FAMILY_V6 {
        return Err(DecodeError::UnknownFamily(family));
    }
    Ok(())
}

/// A socket state change from the tracepoint, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRecord {
    pub kind: EventKind,
    pub raw: SockEvent,
}

impl SockRecord {
    /// The command name, up to its first NUL.
    pub fn comm(&self) -> String {
        let end = self.raw.comm.iter().position(|b| *b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.raw.comm[..end]).into_owned()
    }
}

/// Any ring-buffer record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    Conn(Event),
    Sock(SockRecord),
}

impl TryFrom<&[u8]> for Record {
    type Error = DecodeError;

    /// Dispatches on the leading kind, then checks the size that kind must have.
    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        let head: [u8; 4] = bytes
            .get(..4)
            .and_then(|h| h.try_into().ok())
            // Too short to hold a kind: at least the smallest record was expected.
            .ok_or(DecodeError::WrongSize {
                got: bytes.len(),
                expected: OUTCOME_EVENT_SIZE.min(SOCK_EVENT_SIZE),
            })?;
        let raw_kind = u32::from_ne_bytes(head);
        match EventKind::from_u32(raw_kind) {
            Some(kind @ (EventKind::SockConnect | EventKind::SockLeftSynSent)) => {
                if bytes.len() != SOCK_EVENT_SIZE {
                    return Err(DecodeError::WrongSize {
                        got: bytes.len(),
                        expected: SOCK_EVENT_SIZE,
                    });
                }
                let raw = sock_event(bytes);
                check_family(raw.key.family)?;
                Ok(Self::Sock(SockRecord { kind, raw }))
            }
            Some(_) => Event::try_from(bytes).map(Self::Conn),
            None => Err(DecodeError::UnknownKind(raw_kind)),
        }
    }
}

/// The addresses of a key as std types.
pub fn addrs(key: &FlowKey) -> (IpAddr, IpAddr) {
    let conv = |b: &[u8; 16]| -> IpAddr {
        if key.family == FAMILY_V4 {
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(*b))
        }
    };
    (conv(&key.src_addr), conv(&key.dst_addr))
}

/// Writes `addr` into a key's 16-byte address field.
pub fn addr_bytes(addr: IpAddr) -> (u8, [u8; 16]) {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            (FAMILY_V4, out)
        }
        IpAddr::V6(a) => (FAMILY_V6, a.octets()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(ev: &OutcomeEvent) -> Vec<u8> {
        // SAFETY: OutcomeEvent is repr(C) plain data without implicit padding.
        unsafe {
            std::slice::from_raw_parts((ev as *const OutcomeEvent).cast::<u8>(), OUTCOME_EVENT_SIZE)
        }
        .to_vec()
    }

    #[test]
    fn field_by_field_equals_the_memory_layout() {
        let mut ev = OutcomeEvent {
            kind: EventKind::Unreachable as u32,
            ifindex: 7,
            ts_ns: 0x0102_0304_0506_0708,
            icmp_type: 3,
            icmp_code: 13,
            ..Default::default()
        };
        ev.key.family = FAMILY_V6;
        ev.key.src_port = 40000;
        ev.key.dst_port = 443;
        ev.key.src_addr = [1; 16];
        ev.key.dst_addr[15] = 9;
        ev.pending = PendingSyn {
            first_ns: 11,
            last_ns: 12,
            isn: 13,
            syns: 2,
            ifindex: 7,
            data_len: 300,
            state: netrace_common::STATE_LOST,
            _pad: 0,
        };
        assert_eq!(outcome_event(&bytes_of(&ev)), ev);
        let s = SockEvent {
            kind: EventKind::SockConnect as u32,
            tgid: 42,
            key: ev.key,
            skaddr: 0xffff_8880_0000_1000,
            cgroup_id: 99,
            ts_ns: 5,
            comm: *b"client\0\0\0\0\0\0\0\0\0\0",
            new_state: 2,
            pid: 43,
        };
        // SAFETY: SockEvent is repr(C) plain data without implicit padding.
        let b = unsafe { std::slice::from_raw_parts((&raw const s).cast::<u8>(), SOCK_EVENT_SIZE) };
        assert_eq!(sock_event(b), s);
    }

    #[test]
    fn decodes_and_rejects() {
        let mut ev = OutcomeEvent {
            kind: EventKind::Answered as u32,
            ..Default::default()
        };
        ev.key.family = FAMILY_V4;
        ev.key.src_port = 40000;
        let b = bytes_of(&ev);
        let d = Event::try_from(b.as_slice()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.kind, EventKind::Answered);
        assert_eq!(d.raw.key.src_port, 40000);
        assert_eq!(
            Event::try_from(&b[..10]),
            Err(DecodeError::WrongSize {
                got: 10,
                expected: OUTCOME_EVENT_SIZE
            })
        );
        ev.kind = 77;
        assert_eq!(
            Event::try_from(bytes_of(&ev).as_slice()),
            Err(DecodeError::UnknownKind(77))
        );
        ev.kind = 1;
        ev.key.family = 3;
        assert_eq!(
            Event::try_from(bytes_of(&ev).as_slice()),
            Err(DecodeError::UnknownFamily(3))
        );
    }

    #[test]
    fn records_dispatch_on_kind() {
        let mut ev = OutcomeEvent {
            kind: EventKind::PodSyn as u32,
            ..Default::default()
        };
        ev.key.family = FAMILY_V6;
        assert!(matches!(
            Record::try_from(bytes_of(&ev).as_slice()),
            Ok(Record::Conn(Event {
                kind: EventKind::PodSyn,
                ..
            }))
        ));
        let mut sock = SockEvent {
            kind: EventKind::SockConnect as u32,
            tgid: 42,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            ..Default::default()
        };
        sock.key.family = FAMILY_V4;
        // SAFETY: SockEvent is repr(C) plain data without implicit padding.
        let b = unsafe {
            std::slice::from_raw_parts((&sock as *const SockEvent).cast::<u8>(), SOCK_EVENT_SIZE)
        }
        .to_vec();
        match Record::try_from(b.as_slice()) {
            Ok(Record::Sock(r)) => {
                assert_eq!(r.raw.tgid, 42);
                assert_eq!(r.comm(), "curl");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Event::try_from(b.as_slice()),
            Err(DecodeError::NotAConnectionEvent(7))
        );
        assert!(matches!(
            Record::try_from(&b[..3]),
            Err(DecodeError::WrongSize { got: 3, .. })
        ));
        // A socket record names the socket record's size (today both records happen to be
        // the same size; the error names the one its kind must have).
        let short = Record::try_from(&b[..50]);
        assert_eq!(
            short,
            Err(DecodeError::WrongSize {
                got: 50,
                expected: SOCK_EVENT_SIZE
            })
        );
        let text = short.err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(
            text,
            format!("record of 50 bytes, expected {SOCK_EVENT_SIZE}")
        );
    }

    #[test]
    fn addresses_round_trip() {
        let a: IpAddr = "198.18.2.1".parse().unwrap_or_else(|e| panic!("{e}"));
        let b: IpAddr = "2001:db8::1".parse().unwrap_or_else(|e| panic!("{e}"));
        let (fa, ba) = addr_bytes(a);
        let (fb, bb) = addr_bytes(b);
        let key = FlowKey {
            family: fa,
            src_addr: ba,
            ..Default::default()
        };
        assert_eq!(addrs(&key).0, a);
        let key6 = FlowKey {
            family: fb,
            dst_addr: bb,
            ..Default::default()
        };
        assert_eq!(addrs(&key6).1, b);
    }
}
