//! Filesystems netrace reads (tracefs, cgroup2) may be missing from its view, e.g. inside
//! `ip netns exec`, which remounts /sys. netrace then mounts them in a private mount namespace
//! of its own, so nothing stays mounted after it exits.

use std::{ffi::CString, path::Path, sync::OnceLock};

use anyhow::{anyhow, bail};

/// The outcome of moving into a private mount namespace, decided once: a failure is
/// remembered and returned to every caller, never turned into success by a second call.
static PRIVATE: OnceLock<Result<(), String>> = OnceLock::new();

/// Moves this process into a private mount namespace (once).
fn go_private() -> anyhow::Result<()> {
    once(&PRIVATE, unshare_mounts)
}

/// Runs `init` the first time only; every call returns its outcome.
fn once(
    cell: &OnceLock<Result<(), String>>,
    init: impl FnOnce() -> Result<(), String>,
) -> anyhow::Result<()> {
    cell.get_or_init(init).clone().map_err(|e| anyhow!(e))
}

fn unshare_mounts() -> Result<(), String> {
    // SAFETY: unshare(CLONE_NEWNS) only changes this process's mount namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNS): {}",
            std::io::Error::last_os_error()
        ));
    }
    let root = c"/";
    // SAFETY: valid NUL-terminated path; MS_REC|MS_PRIVATE keeps our mounts from propagating
    // back to the namespace we came from.
    if unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(format!(
            "making mounts private: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Mounts `fstype` at `target` privately unless `probe` (a path below `target`) exists.
pub fn ensure(fstype: &str, target: &str, probe: &str) -> anyhow::Result<()> {
    if Path::new(target).join(probe).exists() {
        return Ok(());
    }
    go_private()?;
    let t = CString::new(target).map_err(|e| anyhow!("{e}"))?;
    let f = CString::new(fstype).map_err(|e| anyhow!("{e}"))?;
    // SAFETY: valid NUL-terminated strings that outlive the call.
    if unsafe { libc::mount(f.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) } != 0 {
        bail!(
            "mounting {fstype} at {target}: {}",
            std::io::Error::last_os_error()
        );
    }
    if !Path::new(target).join(probe).exists() {
        bail!("{target}/{probe} is missing even after mounting {fstype}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_returned_every_time() {
        let cell = OnceLock::new();
        let first = once(&cell, || Err("unshare(CLONE_NEWNS): not permitted".into()));
        assert!(first.is_err());
        // A second call must neither retry nor turn the failure into success.
        let second = once(&cell, || panic!("retried"));
        assert_eq!(
            second.map_err(|e| e.to_string()),
            Err("unshare(CLONE_NEWNS): not permitted".to_string())
        );
        let ok = OnceLock::new();
        assert!(once(&ok, || Ok(())).is_ok());
        assert!(once(&ok, || Err("retried".into())).is_ok());
    }
}
