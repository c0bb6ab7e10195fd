//! Where a capture's bytes come from: a file (or standard input for `-`), gunzipped on the fly
//! when it starts with the gzip magic, read in chunks, never whole. Counts the bytes read from
//! the file for the progress indicator, and keeps the I/O error the pcap reader cannot carry.

use std::{
    fs::File,
    io::{self, BufReader, Cursor, Read},
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use flate2::read::MultiGzDecoder;

use super::error::CaptureError;

/// What the format sniffing found at the start of the (decompressed) stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Pcap,
    PcapNg,
}

/// An opened capture stream, positioned at its start.
pub(crate) struct Input {
    pub reader: FullRead,
    pub format: Format,
    /// Size of the file on disk (compressed size for gzip), when known.
    pub total: Option<u64>,
    /// Bytes read from the file so far (compressed bytes for gzip).
    pub read: Arc<AtomicU64>,
    pub gzip: bool,
    /// The last I/O error, which the pcap reader reports only as "read error".
    pub error: Arc<Mutex<Option<io::Error>>>,
}

/// Counts bytes as they are read from the file.
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Fills the whole buffer unless the stream ends (the pcap reader takes one short read for the
/// end of the stream, and gzip hands out short reads), and keeps the error it hit.
pub(crate) struct FullRead {
    inner: Box<dyn Read + Send>,
    error: Arc<Mutex<Option<io::Error>>>,
}

impl Read for FullRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if filled > 0 {
                        // Hand out what was read; the error comes back on the next call.
                        break;
                    }
                    let copy = io::Error::new(e.kind(), e.to_string());
                    if let Ok(mut slot) = self.error.lock() {
                        *slot = Some(e);
                    }
                    return Err(copy);
                }
            }
        }
        Ok(filled)
    }
}

/// Reads up to `n` bytes (fewer only at the end of the stream).
fn read_prefix(r: &mut dyn Read, n: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; n];
    let mut filled = 0;
    while filled < n {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(k) => filled += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Opens `path` (`-` for standard input).
pub(crate) fn open(path: &Path) -> Result<Input, CaptureError> {
    let name = path.display().to_string();
    if path.as_os_str() == "-" {
        return from_reader(&name, Box::new(io::stdin()), None);
    }
    let open_err = |error| CaptureError::Open {
        path: name.clone(),
        error,
    };
    let file = File::open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if meta.is_dir() {
        return Err(open_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "is a directory",
        )));
    }
    let total = meta.is_file().then_some(meta.len());
    from_reader(&name, Box::new(file), total)
}

/// Opens a capture stream from any reader; `total` is its length, when known.
pub(crate) fn from_reader(
    name: &str,
    raw: Box<dyn Read + Send>,
    total: Option<u64>,
) -> Result<Input, CaptureError> {
    let read = Arc::new(AtomicU64::new(0));
    let mut counted = Counting {
        inner: raw,
        read: Arc::clone(&read),
    };
    let read_err = |error| CaptureError::Read {
        path: name.to_string(),
        offset: 0,
        error,
    };
    let head = read_prefix(&mut counted, 4).map_err(read_err)?;
    if head.is_empty() {
        return Err(CaptureError::Empty {
            path: name.to_string(),
        });
    }
    let unsupported = |kind, hint: &str| CaptureError::UnsupportedCompression {
        path: name.to_string(),
        kind,
        hint: hint.replace("FILE", name),
    };
    match head.as_slice() {
        [0x28, 0xb5, 0x2f, 0xfd, ..] => return Err(unsupported("zstd", "zstd -d FILE")),
        [0xfd, 0x37, 0x7a, 0x58, ..] => return Err(unsupported("xz", "xz -d FILE")),
        [0x42, 0x5a, 0x68, ..] => return Err(unsupported("bzip2", "bzip2 -d FILE")),
        [0x04, 0x22, 0x4d, 0x18, ..] => return Err(unsupported("lz4", "lz4 -d FILE")),
        [0x50, 0x4b, 0x03, 0x04, ..] => return Err(unsupported("zip", "unzip FILE")),
        _ => {}
    }
    let gzip = head.starts_with(&[0x1f, 0x8b]);
    let rest = Cursor::new(head).chain(counted);
    let mut stream: Box<dyn Read + Send> = if gzip {
        Box::new(MultiGzDecoder::new(BufReader::with_capacity(1 << 16, rest)))
    } else {
        Box::new(rest)
    };
    let magic = read_prefix(&mut stream, 4).map_err(|e| {
        if gzip {
            CaptureError::Read {
                path: name.to_string(),
                offset: 0,
                error: io::Error::new(e.kind(), format!("not a readable gzip stream: {e}")),
            }
        } else {
            read_err(e)
        }
    })?;
    let format = match magic.as_slice() {
        [0x0a, 0x0d, 0x0d, 0x0a] => Format::PcapNg,
        [0xd4, 0xc3, 0xb2, 0xa1]
        | [0xa1, 0xb2, 0xc3, 0xd4]
        | [0x4d, 0x3c, 0xb2, 0xa1]
        | [0xa1, 0xb2, 0x3c, 0x4d]
        | [0x34, 0xcd, 0xb2, 0xa1] => Format::Pcap,
        [] => {
            return Err(CaptureError::Empty {
                path: name.to_string(),
            })
        }
        other => {
            return Err(CaptureError::NotACapture {
                path: name.to_string(),
                magic: hex(other),
            })
        }
    };
    let error = Arc::new(Mutex::new(None));
    Ok(Input {
        reader: FullRead {
            inner: Box::new(Cursor::new(magic).chain(stream)),
            error: Arc::clone(&error),
        },
        format,
        total,
        read,
        gzip,
        error,
    })
}
