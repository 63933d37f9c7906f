//! [`DirLock`]: one job per folder (a cache, a run), by an OS lock on `<dir>/.crossdiff.lock`.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Result;

/// A folder held by one job at a time: `<dir>/.crossdiff.lock`, OS-locked (flock) while the job
/// runs and holding its pid for the message, removed when the lock is dropped. The OS lock ends with
/// its process, so a killed job's file is simply taken over; two live jobs on one folder get an
/// error naming the other.
pub struct DirLock {
    path: PathBuf,
    /// The canonical lock path, this process's record of holding it.
    key: PathBuf,
    /// The open lock file: its OS lock lasts as long as it is open.
    _file: File,
}

impl DirLock {
    pub const FILE: &'static str = ".crossdiff.lock";

    /// Takes `dir`'s lock (creating `dir`); `flag` names the setting that chose the folder.
    pub fn acquire(dir: &Path, flag: &'static str) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", dir.display()))?;
        let path = dir.join(Self::FILE);
        // Two jobs of one process (the app's views) share a pid: the process also keeps a list.
        let key = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()).join(Self::FILE);
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if held.contains(&key) {
            return Err(crate::bad_value::bad(
                flag,
                format!(
                    "{} is in use by another job of this window; wait for it to finish, or choose another folder",
                    dir.display()
                ),
            ));
        }
        let lock = Self::take(dir, &path, key.clone(), flag)?;
        held.insert(key);
        Ok(lock)
    }

    fn take(dir: &Path, path: &Path, key: PathBuf, flag: &'static str) -> Result<Self> {
        use std::io::{Read as _, Seek as _, Write as _};
        let busy = |pid: String| {
            crate::bad_value::bad(
                flag,
                format!(
                    "{} is in use by another crossdiff job (process {pid}); wait for it to finish, or choose \
                     another folder (if no crossdiff job runs, delete {})",
                    dir.display(),
                    path.display()
                ),
            )
        };
        let cannot = |e: std::io::Error| anyhow::anyhow!("{}: cannot write: {e}", path.display());
        for _ in 0..3 {
            // An OS lock on the open file (flock): atomic, and released when its process dies.
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(cannot)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(busy(std::fs::read_to_string(path).unwrap_or_default().trim().to_string()));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(cannot(e)),
            }
            // The holder we just replaced may have removed the file before we locked it: then this
            // lock is on a file no one else sees; start again on the path.
            if !same_file(&file, path) {
                continue;
            }
            // A live process named in the file without holding the OS lock (a job of an older
            // crossdiff) still holds the folder; a dead one's pid is a killed job's, taken over.
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            if let Ok(pid) = text.trim().parse::<u32>() {
                if pid != std::process::id() && process_alive(pid) {
                    return Err(busy(pid.to_string()));
                }
            }
            file.set_len(0).map_err(cannot)?;
            file.rewind().map_err(cannot)?;
            write!(file, "{}", std::process::id()).map_err(cannot)?;
            return Ok(Self { path: path.to_path_buf(), key, _file: file });
        }
        Err(anyhow::anyhow!("{}: cannot take the folder's lock", path.display()))
    }
}

/// Whether `file` is the file at `path` now (not one unlinked since it was opened).
fn same_file(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

/// The lock files this process holds.
static HELD: std::sync::Mutex<std::collections::BTreeSet<PathBuf>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

impl Drop for DirLock {
    fn drop(&mut self) {
        HELD.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
        // Removed while still locked (the file closes after this): a job that opened it meanwhile
        // finds it unlinked and starts again on the path.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether a process with this pid runs (Linux: /proc; elsewhere assumed alive, so a stale lock
/// there needs removing by hand — the error names the file).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") { Path::new(&format!("/proc/{pid}")).exists() } else { true }
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    #[test]
    fn a_folder_is_held_by_one_live_job_and_a_dead_ones_lock_is_taken_over() {
        let dir = std::env::temp_dir().join(format!("crossdiff-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let lock = DirLock::acquire(&dir, "out").unwrap();
        assert!(dir.join(DirLock::FILE).exists());
        let e = DirLock::acquire(&dir, "out").err().expect("a second job of this process is refused");
        assert!(e.to_string().contains("another job of this window"), "{e}");
        drop(lock);
        assert!(!dir.join(DirLock::FILE).exists(), "released on drop");
        // A live process (pid 1 always runs on Linux) holds it: refused, naming the flag.
        std::fs::write(dir.join(DirLock::FILE), "1").unwrap();
        if cfg!(target_os = "linux") {
            let e = DirLock::acquire(&dir, "out").err().expect("held by pid 1");
            assert!(e.to_string().starts_with("--out ") && e.to_string().contains("process 1"), "{e}");
        }
        // Another job holding the OS lock (here another open of the file): refused whatever pid the
        // file names.
        std::fs::write(dir.join(DirLock::FILE), "4294966").unwrap();
        let other = File::open(dir.join(DirLock::FILE)).unwrap();
        other.lock().unwrap();
        let e = DirLock::acquire(&dir, "out").err().expect("held by an OS lock");
        assert!(e.to_string().contains("process 4294966"), "{e}");
        drop(other);
        // A pid that does not run: a killed job's lock, taken over.
        std::fs::write(dir.join(DirLock::FILE), "4294967").unwrap();
        let lock = DirLock::acquire(&dir, "out").unwrap();
        assert_eq!(std::fs::read_to_string(dir.join(DirLock::FILE)).unwrap(), std::process::id().to_string());
        drop(lock);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
