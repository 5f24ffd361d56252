//! skv-lazyfs: a FUSE filesystem for power-loss tests, after Jepsen's lazyfs (ADR 0030).
//!
//! It serves a *backing directory*. Reads see everything written; the backing directory
//! receives only what was made durable. Pulling the plug ([`PowerSwitch::power_loss`], or
//! SIGUSR1 / the end of the `skv-lazyfs` process) drops the rest, so afterwards the backing
//! directory holds exactly what a machine that lost power would find on its disk. Mount it
//! again over the same backing directory to "reboot".
//!
//! # The model
//!
//! - **File data.** `write` and `truncate` change an in-memory copy (4 KiB pages, read-
//!   modify-write, like a page cache). `fsync` and `fdatasync` of the file write its pages
//!   and its length to the backing file. `close` makes nothing durable.
//! - **Names.** `create`, `mkdir`, `rename`, `unlink` and `rmdir` change an in-memory
//!   namespace (`tree.rs`). A name becomes durable when the directory that holds it (or
//!   held it, for a rename or an unlink) is fsynced, or when the file itself is fsynced.
//!   A durable name needs durable ancestors: an fsync makes the entries of the node's
//!   ancestors durable too, as a journaling filesystem commits the `mkdir` with the file
//!   (fjall and the storenode create their directories with `create_dir_all` and fsync only
//!   the innermost one). A rename is one step: when it becomes durable in one directory it
//!   does in the other, and a name taken over by a durable rename becomes durable where it
//!   moved (journal order).
//! - **A new name with no synced data** is durable as an empty file.
//!
//! # Not simulated
//!
//! Torn writes (a sector or page half written), reordering of unsynced writes (the loss is
//! all-or-nothing per fsync: nothing unsynced survives; a real disk may keep some of it),
//! corruption of synced data, failing fsyncs (EIO) and lost writes after a successful
//! fsync. So the test shows that skv never relies on unsynced data; it does not show that
//! it survives every state a real crash can leave. Hard links, symlinks, special files,
//! xattrs and POSIX locks are not supported (`flock` is handled by the kernel, locally).
//! File data not yet synced is held in memory: enough for tests, not for large data.

pub mod fs;
pub mod tree;

pub use fs::{LazyFs, LazyFsError, PowerSwitch, Stats};

use std::path::Path;

/// A mounted [`LazyFs`] served on a background thread.
pub struct Mounted {
    session: fuser::BackgroundSession,
    switch: PowerSwitch,
}

/// Mounts a [`LazyFs`] over `backing` at `mountpoint` (an existing directory).
pub fn mount(backing: &Path, mountpoint: &Path) -> Result<Mounted, MountError> {
    let (fs, switch) = LazyFs::new(backing)?;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("skv-lazyfs".into()),
        fuser::MountOption::Subtype("lazyfs".into()),
        fuser::MountOption::RW,
    ];
    let session = fuser::spawn_mount(fs, mountpoint, &config).map_err(|source| MountError::Mount {
        mountpoint: mountpoint.to_path_buf(),
        source,
    })?;
    Ok(Mounted { session, switch })
}

/// Why a mount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Backing(#[from] LazyFsError),
    #[error("mount at {mountpoint}: {source}")]
    Mount {
        mountpoint: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl Mounted {
    /// The switch that pulls the plug.
    pub fn switch(&self) -> &PowerSwitch {
        &self.switch
    }

    /// Pulls the plug, then unmounts (open files must be closed first).
    pub fn power_loss(self) -> std::io::Result<Stats> {
        let stats = self.switch.power_loss();
        self.session.umount_and_join()?;
        Ok(stats)
    }

    /// Unmounts. Unsynced writes are lost, as in a power loss: unmounting syncs nothing.
    pub fn unmount(self) -> std::io::Result<()> {
        self.switch.power_loss();
        self.session.umount_and_join()
    }
}
