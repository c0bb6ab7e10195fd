//! The bpf(2) map commands aya 0.14 does not wrap: a batched walk of a hash map
//! (`BPF_MAP_LOOKUP_BATCH`, one system call per thousands of entries instead of two per entry)
//! and take-an-entry (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, atomic against the kernel programs:
//! whoever removes an entry reports it).

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;

const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

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

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
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
        Ok(())
    }
}

/// Calls `f` on every entry of the hash map behind `fd`, in batches.
pub fn walk<K: Pod + Default, V: Pod + Default>(
    fd: BorrowedFd<'_>,
    mut f: impl FnMut(&K, &V),
) -> io::Result<()> {
    let mut chunk = CHUNK;
    let mut keys = vec![K::default(); chunk];
    let mut values = vec![V::default(); chunk];
    // Hash maps take a u32 bucket index as the position.
    let mut in_pos: u32 = 0;
    let mut out_pos: u32 = 0;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &mut in_pos as *mut u32 as u64
            },
            out_batch: &mut out_pos as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(chunk);
        let done = match r {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                // One bucket holds more entries than the buffer: a bigger buffer.
                chunk *= 2;
                keys.resize(chunk, K::default());
                values.resize(chunk, V::default());
                continue;
            }
            Err(e) => return Err(e),
        };
        for (k, v) in keys.iter().zip(values.iter()).take(n) {
            f(k, v);
        }
        if done {
            return Ok(());
        }
        in_pos = out_pos;
        first = false;
    }
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
