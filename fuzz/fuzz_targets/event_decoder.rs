//! The ring-buffer decoders on arbitrary bytes. `Event::try_from(&[u8])` never panics, accepts
//! exactly the connection records of the right size with a known kind and family, rejects
//! everything else with the right error, and a decoded record is the input byte for byte.
//! `Record::try_from(&[u8])`, the dispatching decoder `watch` uses, agrees with it on
//! connection records and decodes socket records only at their own size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netrace::kernel::events::{addrs, DecodeError, Event, Record};
use netrace_common::{
    EventKind, OutcomeEvent, FAMILY_V4, FAMILY_V6, OUTCOME_EVENT_SIZE, SOCK_EVENT_SIZE,
};

fn bytes_of(ev: &OutcomeEvent) -> &[u8] {
    // SAFETY: OutcomeEvent is repr(C) plain data without implicit padding.
    unsafe {
        std::slice::from_raw_parts((ev as *const OutcomeEvent).cast::<u8>(), OUTCOME_EVENT_SIZE)
    }
}

fuzz_target!(|data: &[u8]| {
    let decoded = Event::try_from(data);
    match decoded {
        Ok(ev) => {
            assert_eq!(data.len(), OUTCOME_EVENT_SIZE);
            assert_eq!(EventKind::from_u32(ev.raw.kind), Some(ev.kind));
            assert_eq!(ev.kind as u32, ev.raw.kind);
            assert!(ev.raw.key.family == FAMILY_V4 || ev.raw.key.family == FAMILY_V6);
            assert_eq!(bytes_of(&ev.raw), data, "decoding changed the record");
            let (src, dst) = addrs(&ev.raw.key);
            assert_eq!(src.is_ipv4(), ev.raw.key.family == FAMILY_V4);
            assert_eq!(dst.is_ipv4(), src.is_ipv4());
        }
        Err(DecodeError::WrongSize { got, expected }) => {
            assert_eq!(got, data.len());
            assert_eq!(expected, OUTCOME_EVENT_SIZE, "a connection event's size");
            assert_ne!(got, expected);
        }
        Err(DecodeError::UnknownKind(k)) => {
            assert_eq!(data.len(), OUTCOME_EVENT_SIZE);
            assert_eq!(EventKind::from_u32(k), None);
            assert_eq!(k.to_ne_bytes(), data[..4]);
        }
        Err(DecodeError::UnknownFamily(f)) => {
            assert_eq!(data.len(), OUTCOME_EVENT_SIZE);
            assert!(f != FAMILY_V4 && f != FAMILY_V6);
            assert_eq!(f, data[8], "the family is the key's first byte");
            assert!(
                EventKind::from_u32(u32::from_ne_bytes([data[0], data[1], data[2], data[3]]))
                    .is_some()
            );
        }
        Err(DecodeError::NotAConnectionEvent(k)) => {
            assert_eq!(data.len(), OUTCOME_EVENT_SIZE);
            assert!(EventKind::from_u32(k).is_some());
        }
        // Variants added later: rejecting is always safe.
        #[allow(unreachable_patterns)]
        Err(_) => {}
    }
    match Record::try_from(data) {
        Ok(Record::Conn(ev)) => assert_eq!(Ok(ev), decoded),
        Ok(Record::Sock(s)) => {
            assert_eq!(data.len(), SOCK_EVENT_SIZE);
            assert_eq!(s.kind as u32, s.raw.kind);
            assert!(s.raw.key.family == FAMILY_V4 || s.raw.key.family == FAMILY_V6);
            assert!(
                s.comm().len() <= 16 * 3,
                "the command name is at most 16 bytes"
            );
        }
        Err(_) => assert!(decoded.is_err() || data.len() != OUTCOME_EVENT_SIZE),
    }
});
