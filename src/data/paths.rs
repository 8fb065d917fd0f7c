//! Every file a dataset names is resolved under the dataset root: an absolute path,
//! a `..` that climbs out, or (unless `data.follow_symlinks = true`) a symbolic link
//! anywhere on the way is refused; with `follow_symlinks` the link's target must
//! still lie under the root. Files are opened only when they are regular files (a
//! FIFO or a device would block or never end).

use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// The folder a dataset may read from.
#[derive(Debug, Clone)]
pub(crate) struct DataRoot {
    root: PathBuf,
    /// `root` made absolute (lexically).
    root_abs: PathBuf,
    /// The folder names are relative to (absolute; inside or equal to the root).
    base_abs: PathBuf,
    /// The canonical form of `root` (symlinks of the root itself resolved).
    canonical: PathBuf,
    follow: bool,
}

/// Lexical normalisation: drop `.`, apply `..` (None when it climbs above the start).
fn lexical(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    let mut depth = 0usize;
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if depth == 0 {
                    return None;
                }
                out.pop();
                depth -= 1;
            }
            Component::Normal(n) => {
                out.push(n);
                depth += 1;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// `p` made absolute and lexically normalised (`..` applied, never above `/`).
pub(crate) fn absolute(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

impl DataRoot {
    /// Names relative to `base`, which must lie inside `root`.
    pub(crate) fn with_base(root: &Path, base: &Path, follow: bool) -> DataRoot {
        let mut r = DataRoot::new(root, follow);
        r.base_abs = absolute(base);
        r
    }

    pub(crate) fn new(root: &Path, follow: bool) -> DataRoot {
        let root = if root.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            root.to_path_buf()
        };
        let canonical = std::fs::canonicalize(&root).unwrap_or_else(|_| root.clone());
        let root_abs = absolute(&root);
        DataRoot {
            base_abs: root_abs.clone(),
            root_abs,
            root,
            canonical,
            follow,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.root
    }

    /// Resolve `name` (as written in a manifest) under the root.
    pub(crate) fn resolve(&self, name: &str) -> Result<PathBuf, String> {
        let p = Path::new(name);
        if p.is_absolute() {
            return Err(format!(
                "{name:?} is an absolute path; dataset paths are relative to {}",
                self.root.display()
            ));
        }
        let full = absolute(&self.base_abs.join(p));
        let rel = full
            .strip_prefix(&self.root_abs)
            .map(Path::to_path_buf)
            .map_err(|_| {
                format!(
                    "{name:?} climbs out of the dataset folder {} (\"..\"; data.root sets a wider one)",
                    self.root.display()
                )
            })?;
        if rel.as_os_str().is_empty() {
            return Err(format!("{name:?} names the dataset folder itself"));
        }
        let full = self.root.join(&rel);
        self.check_links(&rel, name)?;
        Ok(full)
    }

    /// Check a path found under the root (a walk or a listing): it must not be a
    /// symlink (unless following) nor lead outside.
    pub(crate) fn check(&self, path: &Path) -> Result<(), String> {
        let rel = if self.root == Path::new(".") && path.is_relative() {
            Ok(path.strip_prefix(".").unwrap_or(path))
        } else {
            path.strip_prefix(&self.root)
        };
        let rel = rel.map_err(|_| {
            format!(
                "{} is outside the dataset folder {}",
                path.display(),
                self.root.display()
            )
        })?;
        let rel = lexical(rel)
            .ok_or_else(|| format!("{} climbs out of the dataset folder", path.display()))?;
        self.check_links(&rel, &path.display().to_string())
    }

    /// Each component of `rel` under the root: a symlink is refused unless
    /// following, and a followed one must end under the root.
    fn check_links(&self, rel: &Path, shown: &str) -> Result<(), String> {
        let mut cur = self.root.clone();
        for c in rel.components() {
            cur.push(c);
            let Ok(meta) = std::fs::symlink_metadata(&cur) else {
                // Missing: reported when the file is read.
                return Ok(());
            };
            if meta.file_type().is_symlink() {
                if !self.follow {
                    return Err(format!(
                        "{shown}: {} is a symbolic link (set data.follow_symlinks = true to follow links that stay inside the dataset folder)",
                        cur.display()
                    ));
                }
                match std::fs::canonicalize(&cur) {
                    Ok(target) if target.starts_with(&self.canonical) => {}
                    Ok(target) => {
                        return Err(format!(
                            "{shown}: the link {} leads to {}, outside the dataset folder {}",
                            cur.display(),
                            target.display(),
                            self.root.display()
                        ))
                    }
                    // A dangling link: reported as missing when read.
                    Err(_) => return Ok(()),
                }
            }
        }
        Ok(())
    }
}

/// Open `path` for reading only if it is a regular file (never blocks on a FIFO).
pub(crate) fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let f = opts.open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            if meta.is_dir() {
                "a folder, not a file"
            } else {
                "not a regular file (a FIFO, socket or device)"
            },
        ));
    }
    #[cfg(unix)]
    {
        // Back to blocking reads for the regular file.
        use std::os::unix::io::AsRawFd;
        let fd = f.as_raw_fd();
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
        }
    }
    Ok(f)
}

/// Read a whole regular file.
pub(crate) fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = open_regular(path)?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_paths() {
        assert_eq!(lexical(Path::new("a/./b/../c")), Some(PathBuf::from("a/c")));
        assert_eq!(lexical(Path::new("a/../../x")), None);
        assert_eq!(lexical(Path::new("/etc/passwd")), None);
    }
}
