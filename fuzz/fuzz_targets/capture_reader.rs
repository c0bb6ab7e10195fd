//! The capture reader on arbitrary bytes, plain and gzip-wrapped: never panics, always ends,
//! never reads past the input, every error is one line, and a gzip-compressed copy reads to
//! the same frames and the same kind of ending. Every frame then goes through the packet
//! parser both ways, as `analyze` sends it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netrace::capture::{write, Capture, OwnedFrame};
use netrace_common::parse::{parse, Direction, Link};

/// Frames read and how the reading ended (`None`: at the end of the capture). `len` is the
/// uncompressed capture's length (usize::MAX when the input is itself gzip).
fn read(name: &str, bytes: Vec<u8>, len: usize) -> (Vec<OwnedFrame>, Option<String>) {
    let mut c = match Capture::from_bytes(name, bytes) {
        Ok(c) => c,
        Err(e) => return (Vec::new(), Some(e.to_string())),
    };
    let mut frames = Vec::new();
    loop {
        match c.next_frame() {
            Ok(Some(f)) => {
                // A frame's bytes come from the input, plus at most a made-up Ethernet header.
                assert!(f.ethernet.len() <= len.saturating_add(14));
                assert!(f.captured_len as usize <= len);
                for dir in [Direction::Egress, Direction::Ingress] {
                    let _ = parse(f.ethernet, Link::Ethernet, dir);
                }
                frames.push(f.to_owned());
            }
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e.to_string())),
        }
        assert!(
            frames.len() <= len / 12 + 1,
            "more frames than the input holds"
        );
        assert!(frames.iter().all(|f| f.iface < c.interfaces().len()));
    }
}

fuzz_target!(|data: &[u8]| {
    // A gzip input decompresses to more than its own length.
    let len = if data.starts_with(&[0x1f, 0x8b]) {
        usize::MAX
    } else {
        data.len()
    };
    let (frames, end) = read("fuzz.pcap", data.to_vec(), len);
    if let Some(e) = &end {
        assert!(!e.contains('\n'), "one line: {e}");
        assert!(e.contains("fuzz.pcap"), "names the file: {e}");
    }
    // Gzip of a gzip file is another test; of a capture, the same capture.
    if data.len() < 4096 && !data.starts_with(&[0x1f, 0x8b]) {
        if let Ok(gz) = write::gzip(data) {
            let (gz_frames, gz_end) = read("fuzz.pcap.gz", gz, data.len());
            assert_eq!(frames, gz_frames, "gzip changed the frames");
            assert_eq!(end.is_none(), gz_end.is_none(), "{end:?} vs {gz_end:?}");
        }
    }
});
