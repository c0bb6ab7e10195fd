//! The bpf(2) commands aya 0.14 does not wrap: a batched walk of a hash map
//! (`BPF_MAP_LOOKUP_BATCH`, one system call per thousands of entries instead of two per entry),
//! take-an-entry (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, atomic against the kernel programs:
//! whoever removes an entry reports it), and a map-element iterator linked to a map and run
//! (`BPF_LINK_CREATE` with the map in its link info, `BPF_ITER_CREATE`), and a program run on
//! a packet user space hands it (`BPF_PROG_TEST_RUN`: the IPv4 table's control program).

use std::{
    io::{self, Read as _},
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd},
};

use aya::Pod;

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
/// `BPF_TRACE_ITER`, the attach type of iterator links.
const BPF_TRACE_ITER: u32 = 28;

/// Entries asked for per batch call; a bucket with more than this many entries makes the
/// kernel answer ENOSPC and the walk doubles it.
const CHUNK: usize = 4096;

/// `union bpf_attr` for the `BPF_MAP_*_BATCH` commands (the kernel accepts a prefix of the
/// union and takes the rest as zero).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr` for the element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_LINK_CREATE` of an iterator.
#[repr(C)]
#[derive(Default)]
struct IterLinkAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    iter_info: u64,
    iter_info_len: u32,
    _pad: u32,
}

/// `union bpf_iter_link_info`, its `map` member set.
#[repr(C)]
#[derive(Default)]
struct IterLinkInfo {
    map_fd: u32,
    _rest: [u32; 3],
}

/// `union bpf_attr` for `BPF_PROG_TEST_RUN`, up to the context fields (left zero).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
}

/// Runs the classifier `prog` once on `packet`, which it may rewrite: the packet as it left
/// the program is written back over it.
pub fn test_run(prog: BorrowedFd<'_>, packet: &mut [u8]) -> io::Result<()> {
    let len = u32::try_from(packet.len()).map_err(|_| io::Error::other("packet too long"))?;
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: len,
        data_size_out: len,
        data_in: packet.as_ptr() as u64,
        data_out: packet.as_mut_ptr() as u64,
        repeat: 1,
        ..TestRunAttr::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    if attr.data_size_out as usize != packet.len() {
        return Err(io::Error::other("the program changed the packet's length"));
    }
    Ok(())
}

/// `union bpf_attr` for `BPF_ITER_CREATE`.
#[repr(C)]
#[derive(Default)]
struct IterCreateAttr {
    link_fd: u32,
    flags: u32,
}

/// Links the iterator program `prog` (loaded for `bpf_map_elem`) to the map `map`.
pub fn link_map_iter(prog: BorrowedFd<'_>, map: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut info = IterLinkInfo {
        map_fd: map.as_raw_fd() as u32,
        ..IterLinkInfo::default()
    };
    let mut attr = IterLinkAttr {
        prog_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_TRACE_ITER,
        iter_info: &mut info as *mut IterLinkInfo as u64,
        iter_info_len: size_of::<IterLinkInfo>() as u32,
        ..IterLinkAttr::default()
    };
    let fd = bpf_fd(BPF_LINK_CREATE, &mut attr)?;
    Ok(fd)
}

/// Runs the iterator behind `link` once: its whole output, into `out` (cleared first).
pub fn run_iter(link: BorrowedFd<'_>, out: &mut Vec<u8>) -> io::Result<()> {
    let mut attr = IterCreateAttr {
        link_fd: link.as_raw_fd() as u32,
        ..IterCreateAttr::default()
    };
    let fd = bpf_fd(BPF_ITER_CREATE, &mut attr)?;
    out.clear();
    std::fs::File::from(fd).read_to_end(out)?;
    Ok(())
}

/// A bpf(2) command that returns a new file descriptor.
fn bpf_fd<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    let r = sys_bpf(cmd, attr)?;
    let raw = i32::try_from(r).map_err(|_| io::Error::other("bpf(2) returned no descriptor"))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    sys_bpf(cmd, attr).map(|_| ())
}

/// The system call itself: its non-negative result, or the error.
fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised `repr(C)` prefix of `union bpf_attr` whose
    // pointers (if any) point at buffers the caller keeps alive for the call; the size passed
    // is its own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A walk of a hash map in batches: its position and its buffers.
pub struct Walk<K, V> {
    keys: Vec<K>,
    values: Vec<V>,
    /// The bucket to continue from; `None` before the first batch.
    pos: Option<u32>,
    done: bool,
}

impl<K: Pod + Default, V: Pod + Default> Default for Walk<K, V> {
    fn default() -> Self {
        Self::with_chunk(CHUNK)
    }
}

impl<K: Pod + Default, V: Pod + Default> Walk<K, V> {
    /// A walk of `chunk` entries per batch (it grows if one bucket holds more). Large values
    /// (the 1 KiB answer books) want a small chunk: the buffers are zeroed once, when made.
    pub fn with_chunk(chunk: usize) -> Self {
        Self {
            keys: vec![K::default(); chunk.max(1)],
            values: vec![V::default(); chunk.max(1)],
            pos: None,
            done: false,
        }
    }

    /// Starts over from the first bucket (the buffers are kept).
    pub fn restart(&mut self) {
        self.pos = None;
        self.done = false;
    }

    /// Whether the last batch reached the end of the map.
    pub fn done(&self) -> bool {
        self.done
    }

    /// The next batch of entries (empty at the end). Entries may be taken or put back between
    /// batches: the walk goes on from the next bucket.
    pub fn next_batch(&mut self, fd: BorrowedFd<'_>) -> io::Result<(&[K], &[V])> {
        if self.done {
            return Ok((&[], &[]));
        }
        loop {
            let chunk = self.keys.len();
            let mut in_pos = self.pos.unwrap_or(0);
            let mut out_pos: u32 = 0;
            let mut attr = BatchAttr {
                // Hash maps take a u32 bucket index as the position.
                in_batch: match self.pos {
                    None => 0,
                    Some(_) => &mut in_pos as *mut u32 as u64,
                },
                out_batch: &mut out_pos as *mut u32 as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: chunk as u32,
                map_fd: fd.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
            let n = (attr.count as usize).min(chunk);
            match r {
                Ok(()) => self.pos = Some(out_pos),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => self.done = true,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                    // One bucket holds more entries than the buffer: a bigger buffer.
                    self.keys.resize(chunk * 2, K::default());
                    self.values.resize(chunk * 2, V::default());
                    continue;
                }
                Err(e) => {
                    self.done = true;
                    return Err(e);
                }
            }
            return Ok((&self.keys[..n], &self.values[..n]));
        }
    }
}

/// The first `n` entries of the per-CPU array of u64 behind `fd`, each summed over the
/// `cpus` possible CPUs, in one system call (a lookup per entry was one call each, most of
/// an idle run's time).
pub fn per_cpu_sums(fd: BorrowedFd<'_>, n: usize, cpus: usize) -> io::Result<Vec<u64>> {
    let mut keys = vec![0u32; n];
    // Per key, one u64 per possible CPU (a u64 needs no padding to 8 bytes).
    let mut values = vec![0u64; n * cpus];
    let mut out_pos: u32 = 0;
    let mut attr = BatchAttr {
        out_batch: &mut out_pos as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: u32::try_from(n).map_err(|_| io::Error::other("too many entries"))?,
        map_fd: fd.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        Ok(()) => {}
        // The end of the array came first: `count` says how many were read.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(e),
    }
    let got = (attr.count as usize).min(n);
    let mut sums = vec![0u64; n];
    for (k, per_cpu) in keys[..got].iter().zip(values.chunks_exact(cpus.max(1))) {
        if let Some(s) = sums.get_mut(*k as usize) {
            *s = per_cpu.iter().fold(0u64, |a, v| a.wrapping_add(*v));
        }
    }
    Ok(sums)
}

/// Calls `f` on every entry of the hash map behind `fd`, in batches.
pub fn walk<K: Pod + Default, V: Pod + Default>(
    fd: BorrowedFd<'_>,
    mut f: impl FnMut(&K, &V),
) -> io::Result<()> {
    let mut w = Walk::<K, V>::default();
    while !w.done() {
        let (keys, values) = w.next_batch(fd)?;
        for (k, v) in keys.iter().zip(values) {
            f(k, v);
        }
    }
    Ok(())
}

/// Removes the entry for `key` and returns it; `None` when there was none (someone else
/// removed it first).
pub fn take<K: Pod, V: Pod + Default>(fd: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut value = V::default();
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        ..ElemAttr::default()
    };
    match bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        Ok(()) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}
