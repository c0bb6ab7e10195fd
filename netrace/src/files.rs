//! Files netrace writes (`--svg`, `--ready-file`, man pages), possibly as root and possibly in
//! a directory others can write to (/tmp): never through a symlink, never truncating a file
//! netrace did not create. The content goes to a new file created with O_EXCL|O_NOFOLLOW next
//! to the target, which is then renamed over it: a symlink planted at the target is replaced,
//! not followed, and an existing file keeps its inode (other hard links to it are untouched).

use std::{
    fs::OpenOptions,
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Writes `contents` to `path` as described above (mode 0644).
pub fn write_new(path: &Path, contents: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let tmp_name = format!(
        ".{}.netrace-{}-{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = match dir {
        Some(d) => d.join(tmp_name),
        None => Path::new(&tmp_name).to_path_buf(),
    };
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_a_symlink_instead_of_following_it() {
        let dir = std::env::temp_dir().join(format!("netrace-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap_or_else(|e| panic!("{e}"));
        let target = dir.join("out.svg");
        std::os::unix::fs::symlink(&victim, &target).unwrap_or_else(|e| panic!("{e}"));
        write_new(&target, b"<svg/>").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            std::fs::read_to_string(&victim).ok().as_deref(),
            Some("precious")
        );
        assert_eq!(
            std::fs::read_to_string(&target).ok().as_deref(),
            Some("<svg/>")
        );
        assert!(!std::fs::symlink_metadata(&target)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(true));
        // A hard link to an existing file keeps its content.
        let linked = dir.join("linked");
        std::fs::hard_link(&victim, &linked).unwrap_or_else(|e| panic!("{e}"));
        write_new(&linked, b"new").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            std::fs::read_to_string(&victim).ok().as_deref(),
            Some("precious")
        );
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert_eq!(left.len(), 3, "no temporary files left: {left:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
