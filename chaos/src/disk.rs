//! Storenode disks on skv-lazyfs mounts for the `slow-disk` nemesis (issue 14, ADR 0030):
//! one `skv-lazyfs` process per storenode serves its data directory, and the nemesis writes
//! a delay (ms) into that mount's delay file to make every write and fsync of one storenode
//! slow for a while. Only a run that selects `slow-disk` mounts anything.
//!
//! [`Disks`] owns the processes and the mounts: dropping it (on every exit path, after the
//! storenodes are gone: `ChaosCluster` declares it last) stops each `skv-lazyfs` by PID
//! (SIGTERM, then kill -9), detaches any mount left behind, and removes its directory.

use crate::cluster::ClusterError;
use skv_testkit::ChildGuard;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Whether `p` is a mount point now (field 5 of /proc/self/mountinfo).
pub fn is_mounted(p: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = p.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&*want))
}

/// Unmounts `mnt` if it is still mounted (lazily: a process may still hold it).
fn detach(mnt: &Path) {
    if is_mounted(mnt) {
        let _ = Command::new("umount").arg("-l").arg(mnt).status();
    }
    if is_mounted(mnt) {
        let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(mnt).status();
    }
}

/// One mounted disk.
struct Disk {
    guard: Option<ChildGuard>,
    mnt: PathBuf,
    delay_file: PathBuf,
    log: PathBuf,
}

/// The storenodes' lazyfs disks.
pub struct Disks {
    disks: Vec<Disk>,
    // Dropped after the processes are stopped (field order): removes backing dirs and mounts.
    _root: tempfile::TempDir,
}

impl Disks {
    /// Mounts `n` disks (`store-<i>` under a fresh temporary directory), waiting up to
    /// 15 s for each mount.
    pub fn start(bin_dir: &Path, n: usize, log_dir: &Path) -> Result<Disks, ClusterError> {
        let bin = bin_dir.join("skv-lazyfs");
        if !bin.exists() {
            return Err(ClusterError::MissingBinary(bin));
        }
        let io = |what: String| move |source| ClusterError::Io { what, source };
        let root = tempfile::Builder::new()
            .prefix("skv-chaos-disks-")
            .tempdir()
            .map_err(io("temp dir for lazyfs disks".into()))?;
        let mut disks = Disks {
            disks: Vec::new(),
            _root: root,
        };
        for i in 0..n {
            let base = disks._root.path().to_path_buf();
            let (backing, mnt) = (base.join(format!("store-{i}.backing")), base.join(format!("store-{i}")));
            let delay_file = base.join(format!("store-{i}.delay"));
            std::fs::create_dir_all(&mnt).map_err(io(format!("mkdir {}", mnt.display())))?;
            let log_path = log_dir.join(format!("lazyfs-{i}.log"));
            let log = std::fs::File::create(&log_path).map_err(io(format!("create {}", log_path.display())))?;
            let mut cmd = Command::new(&bin);
            cmd.arg("--backing")
                .arg(&backing)
                .arg("--mount")
                .arg(&mnt)
                .arg("--delay-file")
                .arg(&delay_file)
                .stdout(Stdio::null())
                .stderr(Stdio::from(log));
            let guard = ChildGuard::spawn(format!("lazyfs-{i}"), &mut cmd).map_err(io(format!("start lazyfs-{i}")))?;
            disks.disks.push(Disk {
                guard: Some(guard),
                mnt: mnt.clone(),
                delay_file,
                log: log_path.clone(),
            });
            let deadline = Instant::now() + Duration::from_secs(15);
            while !is_mounted(&mnt) {
                let exited = disks.disks[i]
                    .guard
                    .as_mut()
                    .and_then(|g| g.wait_timeout(Duration::from_millis(50)));
                if exited.is_some() || Instant::now() > deadline {
                    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                    return Err(ClusterError::NotReady(format!(
                        "skv-lazyfs did not mount {} (needs /dev/fuse and root or fusermount3): {}",
                        mnt.display(),
                        text.trim()
                    )));
                }
            }
        }
        Ok(disks)
    }

    /// The data directory of storenode `i` (its mount point).
    pub fn data_dir(&self, i: usize) -> Option<&Path> {
        self.disks.get(i).map(|d| d.mnt.as_path())
    }

    /// Sets storenode `i`'s disk delay (zero: full speed). Takes effect within ~100 ms.
    pub fn set_delay(&self, i: usize, delay: Duration) -> Result<(), ClusterError> {
        let d = self
            .disks
            .get(i)
            .ok_or_else(|| ClusterError::NotReady(format!("no disk {i}")))?;
        std::fs::write(&d.delay_file, delay.as_millis().to_string()).map_err(|source| ClusterError::Io {
            what: format!("write {}", d.delay_file.display()),
            source,
        })
    }

    /// How many delay changes storenode `i`'s skv-lazyfs has applied (its log's
    /// `skv-lazyfs: delay N ms` lines): a change is confirmed when this grows.
    pub fn delays_applied(&self, i: usize) -> usize {
        self.disks
            .get(i)
            .and_then(|d| std::fs::read_to_string(&d.log).ok())
            .map(|log| log.lines().filter(|l| l.starts_with("skv-lazyfs: delay ")).count())
            .unwrap_or(0)
    }

    /// Every disk back to full speed; returns what it did.
    pub fn heal(&self) -> Vec<String> {
        let mut done = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            let slow = std::fs::read_to_string(&d.delay_file)
                .ok()
                .is_some_and(|s| !matches!(s.trim(), "" | "0"));
            if slow {
                match self.set_delay(i, Duration::ZERO) {
                    Ok(()) => done.push(format!("disk of store-{i} at full speed")),
                    Err(e) => done.push(format!("disk of store-{i}: {e}")),
                }
            }
        }
        done
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        for d in &mut self.disks {
            if let Some(mut g) = d.guard.take() {
                let _ = g.signal("TERM");
                if g.wait_timeout(Duration::from_secs(10)).is_none() {
                    g.kill();
                }
            }
            detach(&d.mnt);
        }
    }
}
