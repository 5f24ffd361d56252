//! The FUSE filesystem: the namespace of [`crate::tree`], file data held in memory until
//! fsync, and the backing directory that holds only what was made durable.

use crate::tree::{Ino, Kind, Plan, ROOT, Tree, TreeError};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Unsynced data is kept in pages of this size.
pub const PAGE: u64 = 4096;
/// Where a plan moves nodes aside while it runs (inside the backing directory, so renames
/// stay on one filesystem); removed and ignored at mount.
pub const STAGING: &str = ".lazyfs-staging";
const TTL: Duration = Duration::from_secs(1);

/// Errors of opening a backing directory.
#[derive(Debug, thiserror::Error)]
pub enum LazyFsError {
    #[error("backing directory {path}: {source}")]
    Backing { path: PathBuf, source: io::Error },
    #[error("backing directory {path}: {what} is neither a regular file nor a directory")]
    Unsupported { path: PathBuf, what: PathBuf },
}

/// One file's content: the durable part in the backing file (`base`, possibly unlinked),
/// the unsynced part in `pages`.
#[derive(Debug, Default)]
struct FileData {
    base: Option<File>,
    /// Length of `base` (= the durable length).
    base_len: u64,
    /// Bytes of `base` at or past this offset were truncated away since the last sync.
    floor: u64,
    /// The file's current length.
    size: u64,
    /// Pages written since the last sync (full pages, read-modify-write).
    pages: BTreeMap<u64, Box<[u8]>>,
}

#[derive(Debug)]
struct Meta {
    mode: u16,
    mtime: SystemTime,
    opens: u32,
    data: FileData,
}

/// Counters for the summary line and the tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub fsyncs: u64,
    pub fsyncdirs: u64,
    pub bytes_synced: u64,
    /// Unsynced bytes held now (pages × page size).
    pub unsynced_bytes: u64,
}

struct State {
    backing: PathBuf,
    tree: Tree,
    meta: HashMap<Ino, Meta>,
    stats: Stats,
}

/// The filesystem, shared with the handle that can pull the plug.
pub struct LazyFs {
    state: Arc<Mutex<State>>,
    dead: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
}

/// Pulls the plug on a [`LazyFs`] from outside: afterwards every request fails with EIO and
/// nothing more reaches the backing directory.
#[derive(Clone)]
pub struct PowerSwitch {
    state: Arc<Mutex<State>>,
    dead: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
}

impl PowerSwitch {
    /// Drops every unsynced write and name at once (taking the lock no request holds
    /// midway) and refuses every later request.
    pub fn power_loss(&self) -> Stats {
        let mut st = self.state.lock();
        self.dead.store(true, Ordering::SeqCst);
        let stats = st.stats_now();
        st.meta.clear();
        st.tree = Tree::new();
        stats
    }

    /// The counters now.
    pub fn stats(&self) -> Stats {
        self.state.lock().stats_now()
    }

    /// A slow disk (ADR 0030): every later `write`, `fsync` and `fsyncdir` waits `delay`
    /// before it runs (zero: full speed again). Takes effect at once, mounted or not.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// The delay set by [`Self::set_delay`].
    pub fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(Ordering::SeqCst))
    }
}

impl LazyFs {
    /// A filesystem over `backing`, whose content is taken as durable.
    pub fn new(backing: &Path) -> Result<(LazyFs, PowerSwitch), LazyFsError> {
        let be = |source| LazyFsError::Backing {
            path: backing.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(backing).map_err(be)?;
        let staging = backing.join(STAGING);
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(be)?;
        }
        let mut st = State {
            backing: backing.to_path_buf(),
            tree: Tree::new(),
            meta: HashMap::new(),
            stats: Stats::default(),
        };
        st.meta.insert(ROOT, Meta::new(0o755, 0));
        st.load(backing, ROOT)?;
        let state = Arc::new(Mutex::new(st));
        let dead = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        Ok((
            LazyFs {
                state: state.clone(),
                dead: dead.clone(),
                delay_ms: delay_ms.clone(),
            },
            PowerSwitch { state, dead, delay_ms },
        ))
    }

    /// The slow-disk delay, taken before the lock (other requests go on meanwhile, as
    /// on a disk with a deep queue).
    fn slow(&self) {
        let ms = self.delay_ms.load(Ordering::Relaxed);
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }

    fn live(&self) -> Option<parking_lot::MutexGuard<'_, State>> {
        let g = self.state.lock();
        if self.dead.load(Ordering::SeqCst) {
            None
        } else {
            Some(g)
        }
    }
}

impl Meta {
    fn new(mode: u16, len: u64) -> Self {
        Meta {
            mode,
            mtime: SystemTime::now(),
            opens: 0,
            data: FileData {
                base: None,
                base_len: len,
                floor: len,
                size: len,
                pages: BTreeMap::new(),
            },
        }
    }
}

fn errno(e: TreeError) -> Errno {
    Errno::from_i32(e.errno())
}

impl State {
    fn load(&mut self, dir: &Path, ino: Ino) -> Result<(), LazyFsError> {
        let be = |source| LazyFsError::Backing {
            path: dir.to_path_buf(),
            source,
        };
        for entry in std::fs::read_dir(dir).map_err(be)? {
            let entry = entry.map_err(be)?;
            let name = entry.file_name();
            if ino == ROOT && name == STAGING {
                continue;
            }
            let md = entry.metadata().map_err(be)?;
            let kind = if md.is_dir() {
                Kind::Dir
            } else if md.is_file() {
                Kind::File
            } else {
                return Err(LazyFsError::Unsupported {
                    path: self.backing.clone(),
                    what: entry.path(),
                });
            };
            let child = self
                .tree
                .add_durable(ino, &name, kind)
                .map_err(|e| be(io::Error::other(e.to_string())))?;
            use std::os::unix::fs::PermissionsExt;
            let len = if kind == Kind::File { md.len() } else { 0 };
            self.meta
                .insert(child, Meta::new((md.permissions().mode() & 0o7777) as u16, len));
            if kind == Kind::Dir {
                self.load(&entry.path(), child)?;
            }
        }
        Ok(())
    }

    fn stats_now(&self) -> Stats {
        let pages: usize = self.meta.values().map(|m| m.data.pages.len()).sum();
        Stats {
            unsynced_bytes: pages as u64 * PAGE,
            ..self.stats
        }
    }

    fn attr(&self, ino: Ino) -> Result<FileAttr, Errno> {
        let kind = self.tree.kind(ino).ok_or(Errno::ENOENT)?;
        let m = self.meta.get(&ino).ok_or(Errno::ENOENT)?;
        let size = if kind == Kind::File { m.data.size } else { 4096 };
        Ok(FileAttr {
            ino: INodeNo(ino.0),
            size,
            blocks: size.div_ceil(512),
            atime: m.mtime,
            mtime: m.mtime,
            ctime: m.mtime,
            crtime: m.mtime,
            kind: if kind == Kind::Dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: m.mode,
            nlink: if self.tree.is_linked(ino) { 1 } else { 0 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    /// The backing file of a durable node, opened once (the descriptor follows renames).
    fn base(&mut self, ino: Ino) -> io::Result<()> {
        let has = self.meta.get(&ino).is_some_and(|m| m.data.base.is_some());
        if has || self.tree.kind(ino) != Some(Kind::File) {
            return Ok(());
        }
        let Some(rel) = self.tree.durable_path(ino) else {
            return Ok(());
        };
        let f = OpenOptions::new().read(true).write(true).open(self.backing.join(rel))?;
        if let Some(m) = self.meta.get_mut(&ino) {
            m.data.base = Some(f);
        }
        Ok(())
    }

    fn read(&mut self, ino: Ino, off: u64, len: u64) -> io::Result<Vec<u8>> {
        self.base(ino)?;
        let m = self
            .meta
            .get(&ino)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let d = &m.data;
        let end = d.size.min(off.saturating_add(len));
        if off >= end {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - off) as usize];
        let mut pos = off;
        while pos < end {
            let pno = pos / PAGE;
            let pstart = pno * PAGE;
            let chunk_end = ((pno + 1) * PAGE).min(end);
            let dst = &mut out[(pos - off) as usize..(chunk_end - off) as usize];
            match d.pages.get(&pno) {
                Some(page) => dst.copy_from_slice(&page[(pos - pstart) as usize..(chunk_end - pstart) as usize]),
                None => read_base(d, pos, dst)?,
            }
            pos = chunk_end;
        }
        Ok(out)
    }

    fn write(&mut self, ino: Ino, off: u64, data: &[u8]) -> io::Result<()> {
        self.base(ino)?;
        let m = self
            .meta
            .get_mut(&ino)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let d = &mut m.data;
        let end = off
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        let mut pos = off;
        while pos < end {
            let pno = pos / PAGE;
            let pstart = pno * PAGE;
            let chunk_end = ((pno + 1) * PAGE).min(end);
            if !d.pages.contains_key(&pno) {
                let mut page = vec![0u8; PAGE as usize].into_boxed_slice();
                let visible = d.size.min(pstart + PAGE);
                if visible > pstart {
                    read_base(d, pstart, &mut page[..(visible - pstart) as usize])?;
                }
                d.pages.insert(pno, page);
            }
            if let Some(page) = d.pages.get_mut(&pno) {
                page[(pos - pstart) as usize..(chunk_end - pstart) as usize]
                    .copy_from_slice(&data[(pos - off) as usize..(chunk_end - off) as usize]);
            }
            pos = chunk_end;
        }
        d.size = d.size.max(end);
        m.mtime = SystemTime::now();
        Ok(())
    }

    fn truncate(&mut self, ino: Ino, size: u64) -> io::Result<()> {
        self.base(ino)?;
        let m = self
            .meta
            .get_mut(&ino)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        let d = &mut m.data;
        if size < d.size {
            let first_gone = size.div_ceil(PAGE);
            d.pages.retain(|p, _| *p < first_gone);
            if !size.is_multiple_of(PAGE) {
                let pno = size / PAGE;
                if let Some(page) = d.pages.get_mut(&pno) {
                    page[(size % PAGE) as usize..].fill(0);
                }
            }
            d.floor = d.floor.min(size);
        }
        d.size = size;
        m.mtime = SystemTime::now();
        Ok(())
    }

    /// Applies a namespace plan to the backing directory.
    fn apply(&mut self, plan: &Plan) -> io::Result<()> {
        if plan.is_empty() {
            return Ok(());
        }
        let staging = self.backing.join(STAGING);
        std::fs::create_dir_all(&staging)?;
        for m in plan.stage_order() {
            if let Some(from) = &m.from {
                std::fs::rename(self.backing.join(from), staging.join(m.ino.0.to_string()))?;
            }
        }
        for m in plan.place_order() {
            let Some(to) = &m.to else { continue };
            let dst = self.backing.join(to);
            if m.from.is_some() {
                std::fs::rename(staging.join(m.ino.0.to_string()), &dst)?;
            } else if m.kind == Kind::Dir {
                std::fs::create_dir(&dst)?;
            } else {
                // Durable for the first time, with no data synced yet: an empty file (a
                // node with a base always had a durable name, and one that lost it has no
                // volatile name either, see tree.rs's evict).
                let f = OpenOptions::new().read(true).write(true).create_new(true).open(&dst)?;
                if let Some(meta) = self.meta.get_mut(&m.ino) {
                    if meta.data.base.is_some() {
                        tracing::error!(ino = m.ino.0, "lazyfs: a node with a base got a new durable file");
                    }
                    meta.data.base = Some(f);
                    meta.data.base_len = 0;
                    meta.data.floor = 0;
                }
            }
        }
        for m in &plan.moves {
            if m.to.is_none() && m.from.is_some() {
                let p = staging.join(m.ino.0.to_string());
                if m.kind == Kind::Dir {
                    std::fs::remove_dir_all(&p)?;
                } else {
                    // The descriptor in `base` keeps the content readable for open handles.
                    std::fs::remove_file(&p)?;
                }
            }
        }
        std::fs::remove_dir(&staging)?;
        for m in &plan.moves {
            self.gc(m.ino);
        }
        Ok(())
    }

    /// fsync(2)/fdatasync(2) of a file: its name (and its ancestors') and its data.
    fn fsync_file(&mut self, ino: Ino) -> io::Result<()> {
        let plan = self.tree.fsync(ino);
        self.apply(&plan)?;
        self.stats.fsyncs += 1;
        if !self.tree.is_durable(ino) || self.tree.kind(ino) != Some(Kind::File) {
            return Ok(());
        }
        self.base(ino)?;
        let Some(m) = self.meta.get_mut(&ino) else {
            return Ok(());
        };
        let d = &mut m.data;
        let Some(f) = d.base.as_ref() else {
            return Err(io::Error::other("durable file without a backing file"));
        };
        if d.floor < d.base_len {
            f.set_len(d.floor)?;
        }
        let mut written = 0u64;
        for (pno, page) in &d.pages {
            let start = pno * PAGE;
            if start >= d.size {
                continue;
            }
            let n = (d.size - start).min(PAGE) as usize;
            f.write_all_at(&page[..n], start)?;
            written += n as u64;
        }
        f.set_len(d.size)?;
        d.pages.clear();
        d.base_len = d.size;
        d.floor = d.size;
        self.stats.bytes_synced += written;
        Ok(())
    }

    /// Forgets a node nobody can reach any more; drops the unsynced pages of a file with
    /// no volatile name and no open handle (nothing can read or sync them).
    fn gc(&mut self, ino: Ino) {
        if ino == ROOT || self.tree.is_linked(ino) {
            return;
        }
        let opens = self.meta.get(&ino).map_or(0, |m| m.opens);
        if opens > 0 {
            return;
        }
        if let Some(m) = self.meta.get_mut(&ino) {
            m.data.pages.clear();
        }
        if self.tree.remove_if_gone(ino) {
            self.meta.remove(&ino);
        }
    }
}

/// Reads the durable bytes visible at `pos..pos+dst.len()` (zeros past the floor or the
/// base's end).
fn read_base(d: &FileData, pos: u64, dst: &mut [u8]) -> io::Result<()> {
    dst.fill(0);
    let visible_end = d.floor.min(d.base_len);
    if pos >= visible_end {
        return Ok(());
    }
    let Some(f) = d.base.as_ref() else { return Ok(()) };
    let n = ((visible_end - pos) as usize).min(dst.len());
    let mut done = 0;
    while done < n {
        let r = f.read_at(&mut dst[done..n], pos + done as u64)?;
        if r == 0 {
            break;
        }
        done += r;
    }
    Ok(())
}

fn io_errno(e: io::Error) -> Errno {
    Errno::from(e)
}

impl Filesystem for LazyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(st) = self.live() else {
            return reply.error(Errno::EIO);
        };
        match st
            .tree
            .lookup(Ino(parent.0), name)
            .map_err(errno)
            .and_then(|i| st.attr(i))
        {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let Some(st) = self.live() else {
            return reply.error(Errno::EIO);
        };
        match st.attr(Ino(ino.0)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(mut st) = self.live() else {
            return reply.error(Errno::EIO);
        };
        let ino = Ino(ino.0);
        if let Some(size) = size {
            if st.tree.kind(ino) != Some(Kind::File) {
                return reply.error(Errno::EISDIR);
            }
            if let Err(e) = st.truncate(ino, size) {
                return reply.error(io_errno(e));
            }
        }
        if let Some(m) = st.meta.get_mut(&ino) {
            if let Some(mode) = mode {
                m.mode = (mode & 0o7777) as u16;
            }
            match mtime {
                Some(TimeOrNow::SpecificTime(t)) => m.mtime = t,
                Some(TimeOrNow::Now) => m.mtime = SystemTime::now(),
                None => {}
            }
        }
        match st.attr(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        let Some(mut st) = self.live() else {
            return reply.error(Errno::EIO);
        };
        match st.tree.create(Ino(parent.0), name, Kind::File) {
            Ok(ino) => {
                st.meta.insert(ino, Meta::new((mode & !umask & 0o7777) as u16, 0));
                match st.attr(ino) {
                    Ok(a) => reply.entry(&TTL, &a, Generation(0)),
                    Err(e) => reply.error(e),
                }
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let Some(mut st) = self.live() else {
            return reply.error(Errno::EIO);
        };
        match st.tree.create(Ino(parent.0), name, Kind::Dir) {
            Ok(ino) => {
                st.meta.insert(ino, Meta::new((mode & !umask & 0o7777) as u16, 0));
                match st.attr(ino) {
                    Ok(a) => reply.entry(&TTL, &a, Generation(0)),
                    Err(e) => reply.error(e),
                }
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(mut st) = self.live() else {
            return reply.error(Errno::EIO);
        };
        match st.tree.unlink(Ino(parent.0), name, false) {
            Ok(ino) => {
                st.gc(ino);
                reply.ok()
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Some(mut st) = self.live() else {
            return reply.error(Errno::EIO);
        };
        match st.tree.unlink(Ino(parent.0), name, true) {
            Ok(ino) => {
                st.gc(ino);
                reply.ok()
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let Some(mut st) = self.live() else {
            return reply.error(Errno::EIO);
        };
        match st
            .tree
            .rename(Ino(parent.0), name, Ino(newparent.0), newname, noreplace)
        {
            Ok(replaced) => {
                if let Some(r) = replaced {
                    st.gc(r);
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let Some(mut st) = self.live() else {
            return reply.error(Errno::EIO);
        };
        match st.meta.get_mut(&Ino(ino.0)) {
            Some(m) => {
                m.opens += 1;
                reply.opened(FileHandle(ino.0), FopenFlags::empty())
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG && mode & libc::S_IFMT != 0 {
            return reply.error(Errno::EPERM);
        }
        let Some(mut st) = self.live() else {
            return reply.error(Errno::EIO);
        };
        match st.tree.create(Ino(parent.0), name, Kind::File) {
            Ok(ino) => {
                let mut m = Meta::new((mode & !umask & 0o7777) as u16, 0);
                m.opens = 1;
                st.meta.insert(ino, m);
                match st.attr(ino) {
                    Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(ino.0), FopenFlags::empty()),
                    Err(e) => reply.error(e),
                }
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(mut st) = self.live() else {
            return reply.error(Errno::EIO);
        };
        match st.read(Ino(ino.0), offset, u64::from(size)) {
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(io_errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.slow();
        let Some(mut st) = self.live() else {
            return reply.error(Errno::EIO);
        };
        match st.write(Ino(ino.0), offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(io_errno(e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close(2) makes nothing durable.
        if self.dead.load(Ordering::SeqCst) {
            return reply.error(Errno::EIO);
        }
        reply.ok()
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let Some(mut st) = self.live() else { return reply.ok() };
        let ino = Ino(ino.0);
        if let Some(m) = st.meta.get_mut(&ino) {
            m.opens = m.opens.saturating_sub(1);
        }
        st.gc(ino);
        reply.ok()
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.slow();
        let Some(mut st) = self.live() else {
            return reply.error(Errno::EIO);
        };
        match st.fsync_file(Ino(ino.0)) {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing::error!(ino = ino.0, error = %e, "lazyfs: fsync failed");
                reply.error(io_errno(e))
            }
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let Some(st) = self.live() else {
            return reply.error(Errno::EIO);
        };
        match st.tree.kind(Ino(ino.0)) {
            Some(Kind::Dir) => reply.opened(FileHandle(ino.0), FopenFlags::empty()),
            Some(Kind::File) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(st) = self.live() else {
            return reply.error(Errno::EIO);
        };
        let dir = Ino(ino.0);
        let kids = match st.tree.children(dir) {
            Ok(k) => k,
            Err(e) => return reply.error(errno(e)),
        };
        let parent = st.tree.parent(dir);
        let mut entries: Vec<(Ino, FileType, std::ffi::OsString)> = vec![
            (dir, FileType::Directory, ".".into()),
            (parent, FileType::Directory, "..".into()),
        ];
        for (name, i, k) in kids {
            let t = if k == Kind::Dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            entries.push((i, t, name));
        }
        for (idx, (i, t, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i.0), (idx + 1) as u64, t, &name) {
                break;
            }
        }
        reply.ok()
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.slow();
        let Some(mut st) = self.live() else {
            return reply.error(Errno::EIO);
        };
        let plan = st.tree.fsync_dir(Ino(ino.0));
        st.stats.fsyncdirs += 1;
        match st.apply(&plan) {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing::error!(ino = ino.0, error = %e, "lazyfs: fsync of a directory failed");
                reply.error(io_errno(e))
            }
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let Some(st) = self.live() else {
            return reply.error(Errno::EIO);
        };
        match rustix::fs::statvfs(&st.backing) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e.raw_os_error())),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok()
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        let Some(mut st) = self.live() else {
            return reply.error(Errno::EIO);
        };
        let ino = Ino(ino.0);
        let end = offset.saturating_add(length);
        let size = st.meta.get(&ino).map_or(0, |m| m.data.size);
        if end > size
            && let Err(e) = st.truncate(ino, end)
        {
            return reply.error(io_errno(e));
        }
        reply.ok()
    }
}
