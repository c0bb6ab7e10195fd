//! Moving a thread into a named network namespace. The network namespace is per thread, so
//! one process can have its server in one namespace and its clients in another; sockets stay
//! in the namespace they were created in.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::thread::JoinHandle;

use anyhow::{Context as _, Result};

/// Moves the *calling thread* into the network namespace `/run/netns/NS` for good. Call it
/// only on a thread of your own that runs no commands afterwards (children inherit it).
pub fn enter(ns: &str) -> Result<()> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
    // SAFETY: the descriptor is a valid open namespace file for the duration of the call;
    // setns only changes this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns({path}, CLONE_NEWNET)"));
    }
    Ok(())
}

/// Spawns a thread named `name` that enters `ns` and then runs `f`.
pub fn spawn_in<T, F>(ns: &str, name: &str, f: F) -> Result<JoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let ns = ns.to_owned();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            enter(&ns)?;
            f()
        })
        .with_context(|| format!("cannot spawn thread {name}"))
}

/// Waits for `fd` to become readable, at most `timeout_ms`; true if it is.
pub(crate) fn poll_readable(fd: i32, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd array of length 1 that lives across the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    rc > 0 && (pfd.revents & libc::POLLIN) != 0
}
