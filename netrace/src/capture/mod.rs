//! Reading packet captures for `netrace analyze`: pcap (both byte orders, micro- and
//! nanosecond timestamps) and pcapng (several sections and interfaces, each with its own link
//! type and timestamp resolution), plain or gzip-compressed, streamed in chunks so that files
//! larger than memory read in constant memory.
//!
//! Each packet comes out as a [`Frame`]: its capture timestamp in nanoseconds since the Unix
//! epoch, the interface it was captured on, and its bytes as an Ethernet frame (the captured
//! one, or, for cooked, raw-IP and loopback captures, one made up in front of the network
//! layer), which is what the packet parser reads. Problems are [`CaptureError`]s, one line each.

mod error;
pub mod link;
mod progress;
mod source;
pub mod write;

#[cfg(test)]
mod tests;

use std::{
    io,
    path::Path,
    sync::{atomic::Ordering, Arc, Mutex},
};

use pcap_parser::{
    pcapng::Block, traits::PcapReaderIterator, LegacyPcapReader, PcapBlockOwned, PcapError,
    PcapNGReader,
};

pub use error::CaptureError;
pub use link::{Cooked, Link};
pub use progress::Progress;
use source::{Format, Input};

/// Initial size of the read buffer: whole records must fit, and the largest snap length
/// tcpdump writes is 262144.
const BUFFER: usize = 1 << 20;
/// The buffer grows for a larger record up to this, then the record is taken for damage.
const MAX_RECORD: usize = 16 << 20;
/// Check the progress counter every this many packets.
const PROGRESS_EVERY: u64 = 4096;

/// One captured interface: a pcap file has one, a pcapng file one per interface description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    /// `if_name` from the pcapng interface description (e.g. `eth0`), if given.
    pub name: Option<String>,
    /// The pcap link-type number.
    pub linktype: i32,
    /// The link layer, `None` for one netrace does not read.
    pub link: Option<Link>,
    /// Bytes kept per packet (0: no limit).
    pub snaplen: u32,
    /// Timestamp units per second.
    pub ts_per_second: u64,
    /// Seconds added to every timestamp (pcapng `if_tsoffset`).
    pub ts_offset_s: i64,
}

impl Interface {
    /// The interface's name, or `ifN` (N its index in the file) when the capture has none.
    pub fn label(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("if{index}"))
    }
}

/// One packet of a capture.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    /// Capture time, nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    /// Index of its interface in [`Capture::interfaces`].
    pub iface: usize,
    /// The interface's link layer.
    pub link: Link,
    /// Length of the packet on the wire.
    pub orig_len: u32,
    /// Bytes captured (at most the snap length).
    pub captured_len: u32,
    /// Packet type and interface index, for cooked (`-i any`) captures.
    pub cooked: Option<Cooked>,
    /// Whether the capturing host sent the packet (`true`) or received it (`false`), when the
    /// capture says: the packet type of a cooked capture, or a pcapng packet's `epb_flags`.
    pub outbound: Option<bool>,
    /// The packet as an Ethernet frame: the captured bytes for Ethernet links, else the
    /// network-layer bytes behind a made-up header (zero addresses, the EtherType the link
    /// layer gave, or the one the IP version implies, or 0 when neither).
    pub ethernet: &'a [u8],
}

impl Frame<'_> {
    /// Whether the Ethernet header was made up (not captured).
    pub fn synthetic_l2(&self) -> bool {
        self.link != Link::Ethernet
    }

    /// The network-layer bytes when the frame is untagged IPv4 or IPv6.
    pub fn l3(&self) -> Option<&[u8]> {
        match self.ethernet {
            [_, _, _, _, _, _, _, _, _, _, _, _, 0x08, 0x00, rest @ ..]
            | [_, _, _, _, _, _, _, _, _, _, _, _, 0x86, 0xdd, rest @ ..] => Some(rest),
            _ => None,
        }
    }

    pub fn to_owned(&self) -> OwnedFrame {
        OwnedFrame {
            ts_ns: self.ts_ns,
            iface: self.iface,
            link: self.link,
            orig_len: self.orig_len,
            captured_len: self.captured_len,
            cooked: self.cooked,
            outbound: self.outbound,
            ethernet: self.ethernet.to_vec(),
        }
    }
}

/// A [`Frame`] that owns its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedFrame {
    pub ts_ns: u64,
    pub iface: usize,
    pub link: Link,
    pub orig_len: u32,
    pub captured_len: u32,
    pub cooked: Option<Cooked>,
    pub outbound: Option<bool>,
    pub ethernet: Vec<u8>,
}

/// Where the last frame's metadata lives while its bytes sit in `Capture::frame`.
#[derive(Clone, Copy)]
struct Meta {
    ts_ns: u64,
    iface: usize,
    link: Link,
    orig_len: u32,
    captured_len: u32,
    cooked: Option<Cooked>,
    outbound: Option<bool>,
}

/// A capture file being read, one frame at a time.
pub struct Capture {
    path: String,
    reader: Box<dyn PcapReaderIterator + Send>,
    format: Format,
    gzip: bool,
    interfaces: Vec<Interface>,
    /// Index in `interfaces` of the current pcapng section's interface 0.
    section_base: usize,
    /// Byte order of the current pcapng section.
    big_endian: bool,
    /// Legacy pcap: nanoseconds per fractional timestamp unit, and the record byte order.
    legacy_frac_ns: u64,
    legacy_big_endian: bool,
    legacy_modified: bool,
    /// Current size of the pcap reader's buffer.
    capacity: usize,
    packets: u64,
    frame: Vec<u8>,
    total: Option<u64>,
    read: Arc<std::sync::atomic::AtomicU64>,
    io_error: Arc<Mutex<Option<io::Error>>>,
    progress: Progress,
    done: bool,
    current: Option<Meta>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("path", &self.path)
            .field("interfaces", &self.interfaces)
            .field("packets", &self.packets)
            .finish_non_exhaustive()
    }
}

/// Nanoseconds for `units` timestamp units at `per_second` units a second, plus an offset in
/// seconds, saturating at the ends of `u64`.
fn units_to_ns(units: u64, per_second: u64, offset_s: i64) -> u64 {
    let per_second = u128::from(per_second.max(1));
    let ns = u128::from(units) / per_second * 1_000_000_000
        + u128::from(units) % per_second * 1_000_000_000 / per_second;
    let ns = i128::try_from(ns).unwrap_or(i128::MAX) + i128::from(offset_s) * 1_000_000_000;
    u64::try_from(ns.max(0)).unwrap_or(u64::MAX)
}

/// Timestamp units per second for a pcapng `if_tsresol`: a power of ten, or of two when the
/// top bit is set; `None` beyond what fits in a `u64`.
fn ts_resolution(tsresol: u8) -> Option<u64> {
    let exp = u32::from(tsresol & 0x7f);
    if tsresol & 0x80 == 0 {
        10u64.checked_pow(exp)
    } else {
        1u64.checked_shl(exp)
    }
}

impl Capture {
    /// Opens a capture file (`-`: standard input), with a progress line on a terminal for
    /// large files.
    pub fn open(path: &Path) -> Result<Self, CaptureError> {
        let input = source::open(path)?;
        let name = path.display().to_string();
        let progress = Progress::new(&name, input.total);
        Self::start(name, input, progress)
    }

    /// Reads a capture held in memory (tests, fuzzing), without a progress line.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self, CaptureError> {
        let len = bytes.len() as u64;
        let input = source::from_reader(name, Box::new(io::Cursor::new(bytes)), Some(len))?;
        Self::start(name.to_string(), input, Progress::hidden())
    }

    /// Reads a capture from any reader, without a progress line.
    pub fn from_reader(
        name: &str,
        reader: Box<dyn io::Read + Send>,
        total: Option<u64>,
    ) -> Result<Self, CaptureError> {
        let input = source::from_reader(name, reader, total)?;
        Self::start(name.to_string(), input, Progress::hidden())
    }

    fn start(path: String, input: Input, progress: Progress) -> Result<Self, CaptureError> {
        let Input {
            reader,
            format,
            total,
            read,
            gzip,
            error,
        } = input;
        let opened: Result<Box<dyn PcapReaderIterator + Send>, PcapError<&'static [u8]>> =
            match format {
                Format::Pcap => LegacyPcapReader::new(BUFFER, reader)
                    .map(|r| Box::new(r) as Box<dyn PcapReaderIterator + Send>),
                Format::PcapNg => PcapNGReader::new(BUFFER, reader)
                    .map(|r| Box::new(r) as Box<dyn PcapReaderIterator + Send>),
            };
        let mut capture = Self {
            path,
            reader: Box::new(EmptyReader),
            format,
            gzip,
            interfaces: Vec::new(),
            section_base: 0,
            big_endian: false,
            legacy_frac_ns: 1000,
            legacy_big_endian: false,
            legacy_modified: false,
            capacity: BUFFER,
            packets: 0,
            frame: Vec::with_capacity(2048),
            total,
            read,
            io_error: error,
            progress,
            done: false,
            current: None,
        };
        match opened {
            Ok(r) => capture.reader = r,
            Err(e) => return Err(capture.error_from(&e, None)),
        }
        if format == Format::Pcap {
            // The first "block" is the file header: take it now, so that link-type and snap
            // length problems show before any packet.
            capture.step()?;
        }
        Ok(capture)
    }

    /// The file name as given.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Interfaces described so far (a pcapng file may describe more as it goes on).
    pub fn interfaces(&self) -> &[Interface] {
        &self.interfaces
    }

    /// Packets read so far.
    pub fn packets(&self) -> u64 {
        self.packets
    }

    /// Bytes read from the file so far (compressed bytes for a gzip file), and its size.
    pub fn bytes_read(&self) -> (u64, Option<u64>) {
        (self.read.load(Ordering::Relaxed), self.total)
    }

    /// Whether the file is gzip-compressed.
    pub fn is_gzip(&self) -> bool {
        self.gzip
    }

    /// Byte offset of the next record in the (decompressed) capture.
    fn offset(&self) -> u64 {
        self.reader.consumed() as u64
    }

    fn malformed(&self, what: String) -> CaptureError {
        CaptureError::Malformed {
            path: self.path.clone(),
            offset: self.offset(),
            packets: self.packets,
            what,
        }
    }

    fn take_io_error(&self) -> Option<io::Error> {
        self.io_error.lock().ok().and_then(|mut slot| slot.take())
    }

    fn error_from(&self, e: &PcapError<&[u8]>, needed: Option<usize>) -> CaptureError {
        match e {
            PcapError::ReadError => match self.take_io_error() {
                Some(source)
                    if self.gzip
                        && matches!(
                            source.kind(),
                            io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidInput
                        )
                        && source.to_string().contains("EOF") =>
                {
                    CaptureError::TruncatedGzip {
                        path: self.path.clone(),
                        packets: self.packets,
                    }
                }
                Some(error) => CaptureError::Read {
                    path: self.path.clone(),
                    offset: self.offset(),
                    error,
                },
                None => CaptureError::Read {
                    path: self.path.clone(),
                    offset: self.offset(),
                    error: io::Error::other("read error"),
                },
            },
            PcapError::UnexpectedEof | PcapError::Incomplete(_) | PcapError::Eof => {
                CaptureError::Truncated {
                    path: self.path.clone(),
                    offset: self.offset(),
                    packets: self.packets,
                    present: self.reader.data().len(),
                    needed: needed
                        .map(|n| format!(", {n} expected"))
                        .unwrap_or_default(),
                }
            }
            PcapError::BufferTooSmall => self.malformed(format!(
                "a record longer than {} MiB, larger than any packet",
                MAX_RECORD >> 20
            )),
            PcapError::HeaderNotRecognized => self.malformed("no pcap or pcapng header".into()),
            PcapError::NomError(_, kind) | PcapError::OwnedNomError(_, kind) => {
                self.malformed(match self.format {
                    Format::Pcap => format!("a packet record that cannot be read ({kind:?})"),
                    Format::PcapNg => format!(
                        "a pcapng block that cannot be read ({kind:?}): its lengths disagree"
                    ),
                })
            }
        }
    }

    /// The length the record at the start of the reader's data says it has, when its header is
    /// there.
    fn record_len(&self) -> Option<usize> {
        let data = self.reader.data();
        let word = |at: usize, be: bool| -> Option<u32> {
            let b: [u8; 4] = data.get(at..at + 4)?.try_into().ok()?;
            Some(if be {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            })
        };
        match self.format {
            Format::Pcap if self.reader.consumed() == 0 => Some(24),
            Format::Pcap => {
                let header = if self.legacy_modified { 24 } else { 16 };
                Some(word(8, self.legacy_big_endian)? as usize + header)
            }
            Format::PcapNg => {
                // A section header carries its own byte order.
                let be = if data.get(..4) == Some(&[0x0a, 0x0d, 0x0d, 0x0a]) {
                    data.get(8..12) == Some(&[0x1a, 0x2b, 0x3c, 0x4d])
                } else {
                    self.big_endian
                };
                Some(word(4, be)? as usize)
            }
        }
    }

    /// The next packet, `None` at the end of the capture.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, CaptureError> {
        if self.advance()? {
            Ok(self.current())
        } else {
            Ok(None)
        }
    }

    /// Reads the next packet into [`Capture::current`]; `false` at the end of the capture.
    /// (Several captures are merged in time order by looking at each one's current packet.)
    pub fn advance(&mut self) -> Result<bool, CaptureError> {
        self.current = None;
        loop {
            match self.step()? {
                None => return Ok(false),
                Some(None) => continue,
                Some(Some(m)) => {
                    self.packets += 1;
                    self.current = Some(m);
                    return Ok(true);
                }
            }
        }
    }

    /// The packet [`Capture::advance`] read last, until the next call.
    pub fn current(&self) -> Option<Frame<'_>> {
        self.current.map(|m| Frame {
            ts_ns: m.ts_ns,
            iface: m.iface,
            link: m.link,
            orig_len: m.orig_len,
            captured_len: m.captured_len,
            cooked: m.cooked,
            outbound: m.outbound,
            ethernet: &self.frame,
        })
    }

    /// Reads one block: `None` at the end, `Some(None)` for a block that is not a packet,
    /// `Some(Some(meta))` for a packet, its bytes in `self.frame`.
    fn step(&mut self) -> Result<Option<Option<Meta>>, CaptureError> {
        if self.done {
            return Ok(None);
        }
        loop {
            if self.packets.is_multiple_of(PROGRESS_EVERY) {
                self.progress.update(self.read.load(Ordering::Relaxed));
            }
            // Before the reader asks for more room: a record claiming more than any real one
            // is damage, not a reason to buffer the rest of the file.
            if let Some(len) = self.record_len() {
                if len > MAX_RECORD {
                    return Err(self.malformed(format!(
                        "a record claims {len} bytes, larger than any packet"
                    )));
                }
            }
            let next = match self.reader.next() {
                Ok((used, block)) => {
                    let meta = match block {
                        PcapBlockOwned::LegacyHeader(h) => {
                            self.legacy_frac_ns =
                                if h.is_nanosecond_precision() { 1 } else { 1000 };
                            self.legacy_big_endian = h.is_bigendian();
                            self.legacy_modified = h.is_modified_format();
                            let iface = Interface {
                                name: None,
                                linktype: h.network.0,
                                link: Link::from_linktype(h.network.0),
                                snaplen: h.snaplen,
                                ts_per_second: 1_000_000_000 / self.legacy_frac_ns,
                                ts_offset_s: 0,
                            };
                            self.interfaces.push(iface);
                            self.check_interface(0)?;
                            None
                        }
                        PcapBlockOwned::Legacy(b) => {
                            let link = self.interfaces.first().and_then(|i| i.link);
                            let Some(link) = link else {
                                return Err(self.unknown_link(0));
                            };
                            let ts_ns = (u64::from(b.ts_sec) * 1_000_000_000)
                                .saturating_add(u64::from(b.ts_usec) * self.legacy_frac_ns);
                            let cooked = link::to_ethernet(link, b.data, &mut self.frame);
                            Some(Meta {
                                outbound: cooked.map(|c| c.packet_type == link::PACKET_OUTGOING),
                                ts_ns,
                                iface: 0,
                                link,
                                orig_len: b.origlen,
                                captured_len: b.data.len() as u32,
                                cooked,
                            })
                        }
                        PcapBlockOwned::NG(Block::SectionHeader(shb)) => {
                            self.big_endian = shb.big_endian();
                            self.section_base = self.interfaces.len();
                            None
                        }
                        PcapBlockOwned::NG(Block::InterfaceDescription(idb)) => {
                            let name = idb
                                .if_name()
                                .and_then(Result::ok)
                                .map(|s| s.trim_end_matches('\0').to_string())
                                .filter(|s| !s.is_empty());
                            let tsresol = idb.if_tsresol;
                            let Some(ts_per_second) = ts_resolution(tsresol) else {
                                return Err(self.malformed(format!(
                                    "interface {} has an impossible timestamp resolution \
                                     (if_tsresol {tsresol})",
                                    self.interfaces.len() - self.section_base,
                                )));
                            };
                            let linktype = idb.linktype.0;
                            self.interfaces.push(Interface {
                                name,
                                linktype,
                                link: Link::from_linktype(linktype),
                                snaplen: idb.snaplen,
                                ts_per_second,
                                ts_offset_s: idb.if_tsoffset,
                            });
                            self.check_interface(self.interfaces.len() - 1)?;
                            None
                        }
                        PcapBlockOwned::NG(Block::EnhancedPacket(epb)) => {
                            let if_id = epb.if_id;
                            let index = self.section_base.saturating_add(if_id as usize);
                            let Some(iface) = self.interfaces.get(index) else {
                                return Err(self.malformed(format!(
                                    "a packet on interface {if_id}, which the file never described"
                                )));
                            };
                            let Some(link) = iface.link else {
                                return Err(self.unknown_link(index));
                            };
                            let units = (u64::from(epb.ts_high) << 32) | u64::from(epb.ts_low);
                            let ts_ns = units_to_ns(units, iface.ts_per_second, iface.ts_offset_s);
                            let data = epb.data.get(..epb.caplen as usize).unwrap_or(epb.data);
                            let cooked = link::to_ethernet(link, data, &mut self.frame);
                            let flags = epb_direction(&epb.options, self.big_endian);
                            Some(Meta {
                                outbound: cooked
                                    .map(|c| c.packet_type == link::PACKET_OUTGOING)
                                    .or(flags),
                                ts_ns,
                                iface: index,
                                link,
                                orig_len: epb.origlen,
                                captured_len: data.len() as u32,
                                cooked,
                            })
                        }
                        PcapBlockOwned::NG(Block::SimplePacket(spb)) => {
                            let index = self.section_base;
                            let Some(iface) = self.interfaces.get(index) else {
                                return Err(self.malformed(
                                    "a packet before any interface description".into(),
                                ));
                            };
                            let Some(link) = iface.link else {
                                return Err(self.unknown_link(index));
                            };
                            let mut len = (spb.origlen as usize).min(spb.data.len());
                            if iface.snaplen > 0 {
                                len = len.min(iface.snaplen as usize);
                            }
                            let data = &spb.data[..len];
                            let cooked = link::to_ethernet(link, data, &mut self.frame);
                            // A simple packet block has no timestamp.
                            Some(Meta {
                                outbound: cooked.map(|c| c.packet_type == link::PACKET_OUTGOING),
                                ts_ns: 0,
                                iface: index,
                                link,
                                orig_len: spb.origlen,
                                captured_len: len as u32,
                                cooked,
                            })
                        }
                        // Statistics, name resolution, secrets, custom blocks: nothing to do.
                        PcapBlockOwned::NG(_) => None,
                    };
                    self.reader.consume(used);
                    Ok(meta)
                }
                Err(e) => Err(e.to_owned_vec()),
            };
            let meta = match next {
                Ok(meta) => meta,
                Err(PcapError::Eof) => {
                    self.done = true;
                    self.progress.finish();
                    return Ok(None);
                }
                // The pcap reader takes a buffer emptied without a shift for a truncated file.
                Err(PcapError::UnexpectedEof) if self.reader.data().is_empty() => {
                    self.done = true;
                    self.progress.finish();
                    return Ok(None);
                }
                Err(PcapError::Incomplete(_)) => {
                    // A pcapng block whose contents claim more than its length: it is all
                    // there, and more data would not help.
                    if let Some(len) = self.record_len() {
                        if self.reader.data().len() >= len {
                            return Err(
                                self.malformed("a block whose contents overrun its length".into())
                            );
                        }
                    }
                    self.refill()?;
                    continue;
                }
                Err(PcapError::BufferTooSmall) => {
                    self.grow()?;
                    continue;
                }
                Err(e) => {
                    let needed = self.record_len();
                    return Err(self.error_from(&e, needed));
                }
            };
            return Ok(Some(meta));
        }
    }

    /// Reads more of the file; grows the buffer when it is full and the record still does not
    /// fit.
    fn refill(&mut self) -> Result<(), CaptureError> {
        let before = self.reader.data().len();
        if let Err(e) = self.reader.refill() {
            let e = e.to_owned_vec();
            return Err(self.error_from(&e, None));
        }
        if self.reader.data().len() == before && !self.reader.reader_exhausted() {
            self.grow()?;
        }
        Ok(())
    }

    fn grow(&mut self) -> Result<(), CaptureError> {
        let want = self
            .record_len()
            .unwrap_or(0)
            .saturating_add(1 << 16)
            .max(self.capacity.saturating_mul(2));
        if want > MAX_RECORD + BUFFER || !self.reader.grow(want) {
            return Err(self.malformed(format!(
                "a record longer than {} MiB, larger than any packet",
                MAX_RECORD >> 20
            )));
        }
        self.capacity = want;
        if let Err(e) = self.reader.refill() {
            let e = e.to_owned_vec();
            return Err(self.error_from(&e, None));
        }
        Ok(())
    }

    fn unknown_link(&self, index: usize) -> CaptureError {
        let (label, linktype) = self
            .interfaces
            .get(index)
            .map(|i| (i.label(index), i.linktype))
            .unwrap_or_else(|| (format!("if{index}"), -1));
        CaptureError::UnknownLinkType {
            path: self.path.clone(),
            iface: label,
            linktype,
            name: link::linktype_name(linktype),
        }
    }

    /// A pcap file's one interface must be readable at once; a pcapng interface of an unknown
    /// link type is refused at its first packet (other interfaces may be fine), but a snap
    /// length too short for TCP headers is refused at once.
    fn check_interface(&self, index: usize) -> Result<(), CaptureError> {
        let Some(iface) = self.interfaces.get(index) else {
            return Ok(());
        };
        let Some(link) = iface.link else {
            return match self.format {
                Format::Pcap => Err(self.unknown_link(index)),
                Format::PcapNg => Ok(()),
            };
        };
        if iface.snaplen != 0 && iface.snaplen < link.min_snaplen_v4() {
            return Err(CaptureError::SnaplenTooShort {
                path: self.path.clone(),
                iface: iface.label(index),
                snaplen: iface.snaplen,
                link: link.name(),
                needed: link.min_snaplen_v4(),
                needed_v6: link.min_snaplen_v6(),
            });
        }
        Ok(())
    }

    /// Every remaining frame, owned (tests, fuzzing, small files).
    pub fn frames(mut self) -> impl Iterator<Item = Result<OwnedFrame, CaptureError>> {
        let mut failed = false;
        std::iter::from_fn(move || {
            if failed {
                return None;
            }
            match self.next_frame() {
                Ok(Some(f)) => Some(Ok(f.to_owned())),
                Ok(None) => None,
                Err(e) => {
                    failed = true;
                    Some(Err(e))
                }
            }
        })
    }
}

/// The direction bits of a pcapng packet's `epb_flags` option (code 2): `Some(false)` inbound,
/// `Some(true)` outbound, `None` when not given.
fn epb_direction(
    options: &[pcap_parser::pcapng::PcapNGOption<'_>],
    big_endian: bool,
) -> Option<bool> {
    let opt = options.iter().find(|o| o.code.0 == 2)?;
    let bytes: [u8; 4] = opt.value.get(..4)?.try_into().ok()?;
    let flags = if big_endian {
        u32::from_be_bytes(bytes)
    } else {
        u32::from_le_bytes(bytes)
    };
    match flags & 0b11 {
        1 => Some(false),
        2 => Some(true),
        _ => None,
    }
}

/// Stands in for the pcap reader while `Capture` is built.
struct EmptyReader;

impl PcapReaderIterator for EmptyReader {
    fn next(&mut self) -> Result<(usize, PcapBlockOwned<'_>), PcapError<&[u8]>> {
        Err(PcapError::Eof)
    }
    fn consume(&mut self, _offset: usize) {}
    fn consume_noshift(&mut self, _offset: usize) {}
    fn consumed(&self) -> usize {
        0
    }
    fn refill(&mut self) -> Result<(), PcapError<&[u8]>> {
        Ok(())
    }
    fn position(&self) -> usize {
        0
    }
    fn grow(&mut self, _new_size: usize) -> bool {
        false
    }
    fn data(&self) -> &[u8] {
        &[]
    }
    fn reader_exhausted(&self) -> bool {
        true
    }
}
