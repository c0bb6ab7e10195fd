//! Filesystems netrace reads (tracefs, cgroup2) may be missing from its view, e.g. inside
//! `ip netns exec`, which remounts /sys. netrace then mounts them in a private mount namespace
//! of its own, so nothing stays mounted after it exits.

use std::{ffi::CString, path::Path, sync::Once};

use anyhow::{anyhow, bail};

static PRIVATE: Once = Once::new();

/// Moves this process into a private mount namespace (once).
fn go_private() -> anyhow::Result<()> {
    let mut result = Ok(());
    PRIVATE.call_once(|| {
        // SAFETY: unshare(CLONE_NEWNS) only changes this process's mount namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
            result = Err(anyhow!(
                "unshare(CLONE_NEWNS): {}",
                std::io::Error::last_os_error()
            ));
            return;
        }
        let root = c"/";
        // SAFETY: valid NUL-terminated path; MS_REC|MS_PRIVATE keeps our mounts from
        // propagating back to the namespace we came from.
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
            result = Err(anyhow!(
                "making mounts private: {}",
                std::io::Error::last_os_error()
            ));
        }
    });
    result
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
