//! Reader tests on captures written byte by byte here (see `write`): every format variant,
//! link type and failure the reader promises to handle.

use std::io::{self, Read};

use super::{write, Capture, CaptureError, Cooked, Interface, Link, OwnedFrame};

const T0: u64 = 1_700_000_000_123_456_789;

/// An Ethernet frame carrying the first bytes of an IPv4 header, `tag` making it unique.
fn eth4(tag: u8) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend_from_slice(&[0x45, 0, 0, 40, 0, tag, 0x40, 0, 64, 6]);
    f.resize(60, tag);
    f
}

fn ip6(tag: u8) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
    p.resize(60, tag);
    p
}

fn read_all(bytes: Vec<u8>) -> Result<(Vec<OwnedFrame>, Vec<Interface>), CaptureError> {
    let mut c = Capture::from_bytes("test.pcap", bytes)?;
    let mut frames = Vec::new();
    while let Some(f) = c.next_frame()? {
        frames.push(f.to_owned());
    }
    Ok((frames, c.interfaces().to_vec()))
}

fn frames(bytes: Vec<u8>) -> Vec<OwnedFrame> {
    match read_all(bytes) {
        Ok((f, _)) => f,
        Err(e) => panic!("capture should read: {e}"),
    }
}

fn error(bytes: Vec<u8>) -> CaptureError {
    match read_all(bytes) {
        Ok((f, _)) => panic!("capture should fail, read {} frames", f.len()),
        Err(e) => {
            let line = e.to_string();
            assert!(!line.contains('\n'), "one line: {line}");
            e
        }
    }
}

#[test]
fn pcap_micro_and_nano_both_byte_orders() {
    for big_endian in [false, true] {
        for nanos in [false, true] {
            let mut p = write::Pcap::new(1, 262_144, nanos, big_endian);
            p.packet(T0, &eth4(1), 60)
                .packet(T0 + 1_500_000_000, &eth4(2), 60);
            let (got, ifaces) = match read_all(p.bytes) {
                Ok(x) => x,
                Err(e) => panic!("{e}"),
            };
            assert_eq!(got.len(), 2, "be {big_endian} ns {nanos}");
            let t0 = if nanos { T0 } else { T0 / 1000 * 1000 };
            assert_eq!(got[0].ts_ns, t0);
            assert_eq!(got[1].ts_ns, t0 + 1_500_000_000);
            assert_eq!(got[0].ethernet, eth4(1));
            assert_eq!(got[1].ethernet, eth4(2));
            assert_eq!(got[0].link, Link::Ethernet);
            assert_eq!(got[0].iface, 0);
            assert_eq!(ifaces.len(), 1);
            assert_eq!(ifaces[0].snaplen, 262_144);
            assert_eq!(ifaces[0].label(0), "if0");
        }
    }
}

#[test]
fn frame_views() {
    let mut p = write::Pcap::new(1, 0, false, false);
    let mut tagged = eth4(3);
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
    p.packet(T0, &eth4(1), 60).packet(T0, &tagged, 64);
    let mut c = match Capture::from_bytes("views.pcap", p.bytes) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let Ok(Some(f)) = c.next_frame() else {
        panic!("first frame")
    };
    assert_eq!(f.l3(), Some(&eth4(1)[14..]));
    assert!(!f.synthetic_l2());
    let Ok(Some(f)) = c.next_frame() else {
        panic!("second frame")
    };
    assert_eq!(f.l3(), None, "a tagged frame is the parser's to unwrap");
    assert_eq!(f.ethernet, tagged.as_slice());
    assert!(matches!(c.next_frame(), Ok(None)));
    assert!(matches!(c.next_frame(), Ok(None)), "stays at the end");
}

#[test]
fn cooked_raw_and_loopback_become_ethernet() {
    let l3 = &eth4(7)[14..];
    let mut sll = vec![0, 4, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0, 0x08, 0x00];
    sll.extend_from_slice(l3);
    let mut sll2 = vec![
        0x08, 0x00, 0, 0, 0, 0, 0, 3, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0,
    ];
    sll2.extend_from_slice(l3);
    let mut null = 2u32.to_le_bytes().to_vec();
    null.extend_from_slice(l3);
    let mut lo6 = 30u32.to_be_bytes().to_vec();
    lo6.extend_from_slice(&ip6(1));

    for (linktype, packet, want_l3, cooked) in [
        (
            113,
            sll,
            l3.to_vec(),
            Some(Cooked {
                packet_type: 4,
                ifindex: None,
            }),
        ),
        (
            276,
            sll2,
            l3.to_vec(),
            Some(Cooked {
                packet_type: 0,
                ifindex: Some(3),
            }),
        ),
        (101, l3.to_vec(), l3.to_vec(), None),
        (12, ip6(2), ip6(2), None),
        (228, l3.to_vec(), l3.to_vec(), None),
        (229, ip6(3), ip6(3), None),
        (0, null, l3.to_vec(), None),
        (108, lo6, ip6(1), None),
    ] {
        let mut p = write::Pcap::new(linktype, 65535, false, false);
        p.packet(T0, &packet, packet.len() as u32);
        let got = frames(p.bytes);
        assert_eq!(got.len(), 1, "link type {linktype}");
        let f = &got[0];
        assert_eq!(&f.ethernet[..12], &[0; 12], "link type {linktype}");
        let v4 = want_l3[0] >> 4 == 4;
        assert_eq!(
            &f.ethernet[12..14],
            if v4 { &[0x08, 0x00] } else { &[0x86, 0xdd] },
            "link type {linktype}"
        );
        assert_eq!(
            &f.ethernet[14..],
            want_l3.as_slice(),
            "link type {linktype}"
        );
        assert_eq!(f.cooked, cooked, "link type {linktype}");
        assert_eq!(f.captured_len as usize, packet.len());
    }
}

#[test]
fn pcapng_interfaces_resolutions_sections_both_byte_orders() {
    for big_endian in [false, true] {
        let mut sll2 = vec![
            0x86, 0xdd, 0, 0, 0, 0, 0, 9, 0, 1, 4, 6, 1, 2, 3, 4, 5, 6, 0, 0,
        ];
        sll2.extend_from_slice(&ip6(5));
        let mut p = write::PcapNg::new(big_endian);
        // eth0: nanoseconds; any: default microseconds; raw: 2^-20 s units.
        p.interface(1, 262_144, Some("eth0"), Some(9))
            .interface(276, 262_144, Some("any"), None)
            .interface(101, 0, None, Some(0x80 | 20))
            .packet(0, T0, &eth4(1), 60)
            .statistics(0)
            .packet(1, T0 / 1000 + 5, &sll2, sll2.len() as u32)
            .packet(2, 3 << 20, &ip6(6), 60)
            // A new section: interface 0 is a new interface.
            .section()
            .interface(1, 1500, Some("veth1"), Some(6))
            .packet(0, 2_000_000, &eth4(2), 60)
            .simple_packet(&eth4(3));
        let (got, ifaces) = match read_all(p.bytes) {
            Ok(x) => x,
            Err(e) => panic!("big endian {big_endian}: {e}"),
        };
        assert_eq!(ifaces.len(), 4);
        let names: Vec<String> = ifaces.iter().enumerate().map(|(i, f)| f.label(i)).collect();
        assert_eq!(names, ["eth0", "any", "if2", "veth1"]);
        assert_eq!(ifaces[2].ts_per_second, 1 << 20);
        assert_eq!(got.len(), 5, "big endian {big_endian}");
        assert_eq!((got[0].iface, got[0].ts_ns), (0, T0));
        assert_eq!(got[0].ethernet, eth4(1));
        assert_eq!((got[1].iface, got[1].ts_ns), (1, T0 / 1000 * 1000 + 5000));
        assert_eq!(got[1].link, Link::LinuxSll2);
        assert_eq!(got[1].cooked.and_then(|c| c.ifindex), Some(9));
        assert_eq!(got[1].ethernet[14..], ip6(5));
        assert_eq!((got[2].iface, got[2].ts_ns), (2, 3_000_000_000));
        assert_eq!(got[2].ethernet[14..], ip6(6));
        assert_eq!((got[3].iface, got[3].ts_ns), (3, 2_000_000_000));
        assert_eq!((got[4].iface, got[4].ethernet.clone()), (3, eth4(3)));
    }
}

#[test]
fn gzip_reads_the_same() {
    let mut p = write::Pcap::new(1, 65535, true, false);
    for i in 0..200u8 {
        p.packet(T0 + u64::from(i), &eth4(i), 60);
    }
    let plain = frames(p.bytes.clone());
    let gz = match write::gzip(&p.bytes) {
        Ok(g) => g,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(&gz[..2], &[0x1f, 0x8b]);
    let mut c = match Capture::from_bytes("t.pcap.gz", gz.clone()) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert!(c.is_gzip());
    let mut unzipped = Vec::new();
    while let Ok(Some(f)) = c.next_frame() {
        unzipped.push(f.to_owned());
    }
    assert_eq!(unzipped, plain);
    assert_eq!(plain.len(), 200);

    // A gzip file cut short.
    let e = error(gz[..gz.len() / 2].to_vec());
    assert!(
        matches!(
            e,
            CaptureError::TruncatedGzip { .. } | CaptureError::Read { .. }
        ),
        "{e}"
    );
}

/// Hands out at most `chunk` bytes a read, and remembers how far it got.
struct Trickle {
    data: Vec<u8>,
    at: usize,
    chunk: usize,
    high: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.chunk).min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        self.high
            .store(self.at, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

#[test]
fn streams_large_files_in_small_reads() {
    // 12 MiB of packets, a record larger than the initial buffer, read 7 bytes at a time.
    let mut p = write::PcapNg::new(false);
    p.interface(1, 0, Some("eth0"), Some(9));
    let big = {
        let mut f = eth4(9);
        f.resize(3 << 20, 0xab);
        f
    };
    let n = 8000u64;
    for i in 0..n {
        p.packet(0, T0 + i, &eth4(i as u8), 60);
        if i == n / 2 {
            p.packet(0, T0 + i, &big, big.len() as u32);
        }
        if i % 1000 == 0 {
            // Filler to make the file large without many packets.
            p.packet(0, T0 + i, &vec![0u8; 1 << 20], 1 << 20);
        }
    }
    let total = p.bytes.len();
    assert!(total > 10 << 20);
    let high = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let trickle = Trickle {
        data: p.bytes,
        at: 0,
        chunk: 7,
        high: std::sync::Arc::clone(&high),
    };
    let mut c = match Capture::from_reader("big.pcapng", Box::new(trickle), Some(total as u64)) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let mut count = 0u64;
    let mut first_high = 0;
    let mut saw_big = false;
    loop {
        match c.next_frame() {
            Ok(Some(f)) => {
                if count == 0 {
                    first_high = high.load(std::sync::atomic::Ordering::Relaxed);
                }
                saw_big |= f.ethernet.len() == big.len() && f.ethernet == big.as_slice();
                count += 1;
            }
            Ok(None) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(count, n + 1 + n / 1000);
    assert!(saw_big, "the 3 MiB record came through whole");
    assert!(
        first_high <= 2 << 20,
        "read {first_high} bytes of {total} before the first frame: not streamed"
    );
    assert_eq!(c.bytes_read().0, total as u64);
}

#[test]
fn truncated_files_say_where() {
    let mut p = write::Pcap::new(1, 65535, false, false);
    p.packet(T0, &eth4(1), 60).packet(T0, &eth4(2), 60);
    let whole = p.bytes.clone();
    p.packet(T0, &eth4(3), 60);
    let third_at = whole.len() as u64;
    // Cut in the third record's data, then in its header.
    for cut in [p.bytes.len() - 10, whole.len() + 5] {
        match error(p.bytes[..cut].to_vec()) {
            CaptureError::Truncated {
                offset,
                packets,
                present,
                ..
            } => {
                assert_eq!(offset, third_at);
                assert_eq!(packets, 2);
                assert_eq!(present as u64, cut as u64 - third_at);
            }
            e => panic!("want truncated, got {e}"),
        }
    }
    let e = error(p.bytes[..p.bytes.len() - 10].to_vec()).to_string();
    assert!(
        e.contains("truncated") && e.contains(&format!("byte {third_at}")),
        "{e}"
    );
    // Cut at a record boundary: a whole capture.
    assert_eq!(frames(whole).len(), 2);
    // Cut inside the file header.
    assert!(matches!(
        error(p.bytes[..10].to_vec()),
        CaptureError::Truncated { .. } | CaptureError::Malformed { .. }
    ));

    let mut ng = write::PcapNg::new(false);
    ng.interface(1, 0, None, None).packet(0, 1, &eth4(1), 60);
    let len = ng.bytes.len();
    ng.packet(0, 2, &eth4(2), 60);
    match error(ng.bytes[..ng.bytes.len() - 3].to_vec()) {
        CaptureError::Truncated {
            offset, packets, ..
        } => assert_eq!((offset, packets), (len as u64, 1)),
        e => panic!("want truncated, got {e}"),
    }
}

#[test]
fn unknown_link_types_are_named() {
    let mut p = write::Pcap::new(127, 65535, false, false);
    p.packet(T0, &eth4(1), 60);
    match error(p.bytes) {
        CaptureError::UnknownLinkType { linktype, name, .. } => {
            assert_eq!((linktype, name), (127, "IEEE802_11_RADIOTAP"));
        }
        e => panic!("{e}"),
    }
    // In pcapng, only once a packet comes on such an interface.
    let mut ng = write::PcapNg::new(false);
    ng.interface(1, 0, Some("eth0"), None)
        .interface(189, 0, Some("usbmon1"), None)
        .packet(0, 1, &eth4(1), 60);
    assert_eq!(frames(ng.bytes.clone()).len(), 1);
    ng.packet(1, 2, &[0; 48], 48);
    let e = error(ng.bytes);
    assert!(
        matches!(e, CaptureError::UnknownLinkType { linktype: 189, ref iface, .. } if iface == "usbmon1"),
        "{e}"
    );
    assert!(e.to_string().contains("189"), "{e}");
}

#[test]
fn snap_lengths_too_short_are_refused() {
    let p = write::Pcap::new(1, 40, false, false);
    match error(p.bytes) {
        CaptureError::SnaplenTooShort {
            snaplen,
            needed,
            needed_v6,
            ..
        } => assert_eq!((snaplen, needed, needed_v6), (40, 54, 74)),
        e => panic!("{e}"),
    }
    let mut ng = write::PcapNg::new(false);
    ng.interface(276, 50, Some("any"), None);
    let e = error(ng.bytes);
    assert!(e.to_string().contains("snap length 50"), "{e}");
    assert!(e.to_string().contains("60 bytes"), "{e}");
    // Enough for IPv4 and TCP: accepted (the parser counts what it cannot read).
    let mut p = write::Pcap::new(1, 64, false, false);
    p.packet(T0, &eth4(1), 60);
    assert_eq!(frames(p.bytes).len(), 1);
}

#[test]
fn damaged_and_foreign_files() {
    // A record claiming 1 GiB.
    let mut p = write::Pcap::new(1, 65535, false, false);
    p.packet(T0, &eth4(1), 60);
    let mut bad = p.bytes.clone();
    bad.extend_from_slice(&[0; 8]);
    bad.extend_from_slice(&(1u32 << 30).to_le_bytes());
    bad.extend_from_slice(&60u32.to_le_bytes());
    bad.extend_from_slice(&[0; 100]);
    match error(bad) {
        CaptureError::Malformed {
            offset, packets, ..
        } => assert_eq!((offset, packets), (24 + 16 + 60, 1)),
        e => panic!("{e}"),
    }
    // A packet on an interface never described.
    let mut ng = write::PcapNg::new(false);
    ng.interface(1, 0, None, None).packet(3, 1, &eth4(1), 60);
    let e = error(ng.bytes);
    assert!(e.to_string().contains("interface 3"), "{e}");
    // A packet block whose captured length overruns the block.
    let mut ng = write::PcapNg::new(false);
    ng.interface(1, 0, None, None);
    let at = ng.bytes.len();
    ng.packet(0, 1, &eth4(1), 60);
    ng.packet(0, 1, &eth4(2), 60);
    ng.bytes[at + 20..at + 24].copy_from_slice(&4000u32.to_le_bytes());
    assert!(matches!(error(ng.bytes), CaptureError::Malformed { .. }));
    // Not captures at all.
    assert!(matches!(error(Vec::new()), CaptureError::Empty { .. }));
    let e = error(b"GET / HTTP/1.1\r\n".to_vec());
    assert!(
        matches!(e, CaptureError::NotACapture { ref magic, .. } if magic == "47 45 54 20"),
        "{e}"
    );
    let e = error(vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0]);
    assert!(e.to_string().contains("zstd -d"), "{e}");
    // An impossible timestamp resolution.
    let mut ng = write::PcapNg::new(false);
    ng.interface(1, 0, None, Some(30));
    assert!(error(ng.bytes).to_string().contains("timestamp resolution"));
}

#[test]
fn open_files_from_disk() {
    let dir = std::env::temp_dir().join(format!("netrace-capture-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("{e}");
    }
    let mut p = write::Pcap::new(1, 65535, false, false);
    p.packet(T0, &eth4(1), 60);
    let path = dir.join("one.pcap");
    if let Err(e) = std::fs::write(&path, &p.bytes) {
        panic!("{e}");
    }
    let mut c = match Capture::open(&path) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert!(matches!(c.next_frame(), Ok(Some(_))));
    assert!(matches!(c.next_frame(), Ok(None)));
    assert_eq!(
        c.bytes_read(),
        (p.bytes.len() as u64, Some(p.bytes.len() as u64))
    );
    match Capture::open(&dir.join("missing.pcap")) {
        Err(CaptureError::Open { path, .. }) => assert!(path.ends_with("missing.pcap")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        Capture::open(&dir),
        Err(CaptureError::Open { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pcapng_direction_flags() {
    for big_endian in [false, true] {
        let mut ng = write::PcapNg::new(big_endian);
        ng.interface(1, 0, Some("eth0"), None)
            .packet_with_flags(0, 1, &eth4(1), 2)
            .packet_with_flags(0, 2, &eth4(2), 1)
            .packet_with_flags(0, 3, &eth4(3), 0)
            .packet(0, 4, &eth4(4), 60);
        let got = frames(ng.bytes);
        let dirs: Vec<Option<bool>> = got.iter().map(|f| f.outbound).collect();
        assert_eq!(
            dirs,
            [Some(true), Some(false), None, None],
            "be {big_endian}"
        );
        assert_eq!(got[0].ethernet, eth4(1));
    }
    // Cooked captures say it in their packet type.
    let mut sll = vec![0, 4, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0, 0x08, 0x00];
    sll.extend_from_slice(&eth4(1)[14..]);
    let mut p = write::Pcap::new(113, 0, false, false);
    p.packet(T0, &sll, sll.len() as u32);
    assert_eq!(frames(p.bytes)[0].outbound, Some(true));
}
