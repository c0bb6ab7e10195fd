//! What can be wrong with a capture file. Every message is one line that names the file, says
//! where, and (where there is one) what to do.

use std::io;

/// A capture that cannot be read to the end. `analyze` exits with status 2 on any of these.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot open {path}: {error}")]
    Open { path: String, error: io::Error },

    #[error("{path} is empty: no capture header")]
    Empty { path: String },

    #[error(
        "{path} is not a pcap or pcapng capture (it starts with {magic}); \
         write one with tcpdump -w FILE or tshark -w FILE"
    )]
    NotACapture { path: String, magic: String },

    #[error("{path} is compressed with {kind}, which netrace does not read; decompress it first ({hint}), or use gzip")]
    UnsupportedCompression {
        path: String,
        kind: &'static str,
        hint: String,
    },

    #[error("reading {path}: {error} (at byte {offset} of the capture)")]
    Read {
        path: String,
        offset: u64,
        error: io::Error,
    },

    /// The file ends inside a record: a capture copied while still being written, or cut.
    #[error(
        "{path} is truncated: it ends inside the record at byte {offset}, after {packets} \
         packets ({present} of the record's bytes are there{needed}); was it copied while \
         tcpdump was still writing? Stop the capture first (tcpdump writes whole records on \
         exit) or cut it at a record boundary (editcap -r)"
    )]
    Truncated {
        path: String,
        offset: u64,
        packets: u64,
        present: usize,
        /// ", N expected" when the record says how long it is, else empty.
        needed: String,
    },

    /// The gzip stream ends before its end marker.
    #[error(
        "{path} is truncated: the gzip stream ends early, after {packets} packets; \
         was the file copied before gzip finished?"
    )]
    TruncatedGzip { path: String, packets: u64 },

    #[error(
        "{path}: interface {iface} has link type {linktype} ({name}), which netrace does not \
         read; it reads Ethernet (1), Linux cooked v1 and v2 (113, 276; tcpdump -i any), raw \
         IP (101, 12, 14, 228, 229) and loopback (0, 108): capture on an Ethernet interface or \
         with -i any"
    )]
    UnknownLinkType {
        path: String,
        iface: String,
        linktype: i32,
        name: &'static str,
    },

    #[error(
        "{path}: snap length {snaplen} on interface {iface} is too short for TCP headers: \
         {link} needs at least {needed} bytes per packet for IPv4 and TCP ({needed_v6} for \
         IPv6); capture again with -s 0 (the whole packet) or -s 128"
    )]
    SnaplenTooShort {
        path: String,
        iface: String,
        snaplen: u32,
        link: &'static str,
        needed: u32,
        needed_v6: u32,
    },

    #[error("{path} is damaged at byte {offset} (after {packets} packets): {what}")]
    Malformed {
        path: String,
        offset: u64,
        packets: u64,
        what: String,
    },
}
