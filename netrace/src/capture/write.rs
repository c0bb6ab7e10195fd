//! Writing small captures byte by byte, for tests, fuzzing seeds and benchmarks: pcap in either
//! byte order with micro- or nanosecond timestamps, and pcapng with any number of interfaces,
//! link types and timestamp resolutions. Only what netrace's own tests need; not a general
//! writer.

/// A pcap file being built in memory.
#[derive(Clone, Debug)]
pub struct Pcap {
    pub bytes: Vec<u8>,
    big_endian: bool,
    nanos: bool,
}

impl Pcap {
    /// The file header: link type, snap length, timestamp precision and byte order.
    pub fn new(linktype: u32, snaplen: u32, nanos: bool, big_endian: bool) -> Self {
        let mut p = Self {
            bytes: Vec::new(),
            big_endian,
            nanos,
        };
        p.u32(if nanos { 0xa1b2_3c4d } else { 0xa1b2_c3d4 });
        p.u16(2);
        p.u16(4);
        p.u32(0);
        p.u32(0);
        p.u32(snaplen);
        p.u32(linktype);
        p
    }

    fn u16(&mut self, v: u16) {
        let b = if self.big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.bytes.extend_from_slice(&b);
    }

    fn u32(&mut self, v: u32) {
        let b = if self.big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.bytes.extend_from_slice(&b);
    }

    /// One packet record at `ts_ns` (nanoseconds since the epoch; cut to microseconds in a
    /// microsecond file), with its length on the wire.
    pub fn packet(&mut self, ts_ns: u64, data: &[u8], orig_len: u32) -> &mut Self {
        let sec = (ts_ns / 1_000_000_000) as u32;
        let frac = (ts_ns % 1_000_000_000) as u32;
        self.u32(sec);
        self.u32(if self.nanos { frac } else { frac / 1000 });
        self.u32(data.len() as u32);
        self.u32(orig_len);
        self.bytes.extend_from_slice(data);
        self
    }
}

/// A pcapng file being built in memory.
#[derive(Clone, Debug)]
pub struct PcapNg {
    pub bytes: Vec<u8>,
    big_endian: bool,
}

impl PcapNg {
    /// A file with its first section header.
    pub fn new(big_endian: bool) -> Self {
        let mut p = Self {
            bytes: Vec::new(),
            big_endian,
        };
        p.section();
        p
    }

    fn u16(v: u16, be: bool) -> [u8; 2] {
        if be {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    }

    fn u32(v: u32, be: bool) -> [u8; 4] {
        if be {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    }

    fn block(&mut self, kind: u32, body: &[u8]) {
        let be = self.big_endian;
        let padded = body.len().div_ceil(4) * 4;
        let len = (12 + padded) as u32;
        self.bytes.extend_from_slice(&Self::u32(kind, be));
        self.bytes.extend_from_slice(&Self::u32(len, be));
        self.bytes.extend_from_slice(body);
        self.bytes.resize(self.bytes.len() + padded - body.len(), 0);
        self.bytes.extend_from_slice(&Self::u32(len, be));
    }

    fn option(body: &mut Vec<u8>, code: u16, value: &[u8], be: bool) {
        body.extend_from_slice(&Self::u16(code, be));
        body.extend_from_slice(&Self::u16(value.len() as u16, be));
        body.extend_from_slice(value);
        body.resize(body.len().div_ceil(4) * 4, 0);
    }

    /// A new section (its interfaces start again at 0).
    pub fn section(&mut self) -> &mut Self {
        let be = self.big_endian;
        let mut body = Vec::new();
        body.extend_from_slice(&Self::u32(0x1a2b_3c4d, be));
        body.extend_from_slice(&Self::u16(1, be));
        body.extend_from_slice(&Self::u16(0, be));
        body.extend_from_slice(&u64::MAX.to_le_bytes());
        // The section header's type reads the same in both byte orders.
        self.block(0x0a0d_0d0a, &body);
        self
    }

    /// An interface description: link type, snap length, name, and `if_tsresol` (None: the
    /// default, microseconds).
    pub fn interface(
        &mut self,
        linktype: u16,
        snaplen: u32,
        name: Option<&str>,
        tsresol: Option<u8>,
    ) -> &mut Self {
        let be = self.big_endian;
        let mut body = Vec::new();
        body.extend_from_slice(&Self::u16(linktype, be));
        body.extend_from_slice(&Self::u16(0, be));
        body.extend_from_slice(&Self::u32(snaplen, be));
        if let Some(name) = name {
            Self::option(&mut body, 2, name.as_bytes(), be);
        }
        if let Some(r) = tsresol {
            Self::option(&mut body, 9, &[r], be);
        }
        if name.is_some() || tsresol.is_some() {
            Self::option(&mut body, 0, &[], be);
        }
        self.block(1, &body);
        self
    }

    /// An enhanced packet block on interface `iface` at `ts` units of that interface's
    /// resolution.
    pub fn packet(&mut self, iface: u32, ts: u64, data: &[u8], orig_len: u32) -> &mut Self {
        let be = self.big_endian;
        let mut body = Vec::new();
        body.extend_from_slice(&Self::u32(iface, be));
        body.extend_from_slice(&Self::u32((ts >> 32) as u32, be));
        body.extend_from_slice(&Self::u32(ts as u32, be));
        body.extend_from_slice(&Self::u32(data.len() as u32, be));
        body.extend_from_slice(&Self::u32(orig_len, be));
        body.extend_from_slice(data);
        self.block(6, &body);
        self
    }

    /// An enhanced packet block with an `epb_flags` option (direction: 1 inbound, 2 outbound).
    pub fn packet_with_flags(&mut self, iface: u32, ts: u64, data: &[u8], flags: u32) -> &mut Self {
        let be = self.big_endian;
        let mut body = Vec::new();
        body.extend_from_slice(&Self::u32(iface, be));
        body.extend_from_slice(&Self::u32((ts >> 32) as u32, be));
        body.extend_from_slice(&Self::u32(ts as u32, be));
        body.extend_from_slice(&Self::u32(data.len() as u32, be));
        body.extend_from_slice(&Self::u32(data.len() as u32, be));
        body.extend_from_slice(data);
        body.resize(body.len().div_ceil(4) * 4, 0);
        Self::option(&mut body, 2, &Self::u32(flags, be), be);
        Self::option(&mut body, 0, &[], be);
        self.block(6, &body);
        self
    }

    /// A simple packet block (interface 0, no timestamp).
    pub fn simple_packet(&mut self, data: &[u8]) -> &mut Self {
        let be = self.big_endian;
        let mut body = Vec::new();
        body.extend_from_slice(&Self::u32(data.len() as u32, be));
        body.extend_from_slice(data);
        self.block(3, &body);
        self
    }

    /// An interface statistics block (to be skipped by readers).
    pub fn statistics(&mut self, iface: u32) -> &mut Self {
        let be = self.big_endian;
        let mut body = Vec::new();
        body.extend_from_slice(&Self::u32(iface, be));
        body.extend_from_slice(&[0; 8]);
        self.block(5, &body);
        self
    }
}

/// Gzip-compresses `bytes`.
pub fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes)?;
    enc.finish()
}
