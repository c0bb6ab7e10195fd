//! Array maps made with `BPF_F_MMAPABLE`, mapped into this process: the IPv4 pending table
//! and the per-CPU logs are read where they lie, with no system call per read.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use aya::maps::MapData;

/// An array map of `T` mapped into this process.
pub(crate) struct Mapped<T> {
    pub(crate) map: MapData,
    pub(crate) base: NonNull<T>,
    len: usize,
}

impl<T> Mapped<T> {
    /// Maps `map`, an array of `n` values of `T` made with `BPF_F_MMAPABLE`; read-only unless
    /// `writable`. `T`'s size must be a multiple of 8 (the array's element stride).
    pub(crate) fn new(map: MapData, n: usize, writable: bool) -> io::Result<Self> {
        if !size_of::<T>().is_multiple_of(8) {
            return Err(io::Error::other(
                "the element size is not the array's stride",
            ));
        }
        let len = n
            .checked_mul(size_of::<T>())
            .ok_or_else(|| io::Error::other("the map is too large to map"))?;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new shared mapping of the map's file descriptor, of the map's own size
        // (the kernel refuses more); nothing else is at the address it returns.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(p.cast::<T>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { map, base, len })
    }
}

impl<T> Drop for Mapped<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of this length, unmapped once; nothing borrows
        // it past `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
