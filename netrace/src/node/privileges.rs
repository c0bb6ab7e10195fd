//! The capabilities `netrace watch` needs, checked before anything is loaded.

use crate::error::UsageError;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_NET_ADMIN: u32 = 12;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn effective() -> Option<u64> {
    Some(
        procfs::process::Process::myself()
            .ok()?
            .status()
            .ok()?
            .capeff,
    )
}

/// Names of the missing capabilities, given an effective set.
pub fn missing_from(eff: u64) -> Vec<&'static str> {
    let has = |c: u32| eff & (1u64 << c) != 0;
    let admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !(has(CAP_BPF) || admin) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !(has(CAP_PERFMON) || admin) {
        missing.push("CAP_PERFMON");
    }
    missing
}

/// Raises the soft limit on open files to the hard limit: maps, programs, links and the
/// metrics server's connections all need descriptors, and running out must not stop tracing.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for the kernel to fill in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur >= lim.rlim_max
    {
        return;
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit; raising the soft limit up to the hard one is allowed.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        log::debug!(
            "raising the open-file limit: {}",
            std::io::Error::last_os_error()
        );
    }
}

pub fn check() -> Result<(), UsageError> {
    let Some(eff) = effective() else {
        return Ok(()); // No procfs: let the kernel be the judge.
    };
    let missing = missing_from(eff);
    if missing.is_empty() {
        return Ok(());
    }
    Err(UsageError(format!(
        "missing privileges: netrace watch needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON \
         (missing {}); run it as root (sudo) or grant those capabilities",
        missing.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_sets() {
        assert_eq!(
            missing_from(0),
            vec!["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]
        );
        let least = (1 << CAP_BPF) | (1 << CAP_NET_ADMIN) | (1 << CAP_PERFMON);
        assert!(missing_from(least).is_empty());
        let old_style = (1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN);
        assert!(missing_from(old_style).is_empty());
        assert_eq!(
            missing_from(1 << CAP_NET_ADMIN),
            vec!["CAP_BPF", "CAP_PERFMON"]
        );
    }
}
