//! The namespace: which names exist now (volatile) and which would survive a power loss
//! (durable), and the decisions that move names from one to the other. Pure: no I/O. The
//! filesystem (`fs.rs`) turns a [`Plan`] into renames, creations and removals in the backing
//! directory.
//!
//! Every node has at most one name (no hard links): its volatile location `vloc` (what
//! `lookup` sees) and its durable location `dloc` (where it is in the backing directory).
//! They differ after a create, rename or unlink that no fsync has made durable yet.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

/// An inode number of the mounted filesystem (never reused while mounted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ino(pub u64);

/// The root directory's inode number (FUSE's).
pub const ROOT: Ino = Ino(1);

/// Regular file or directory: nothing else can be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// A name: entry `name` of directory `parent`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Loc {
    pub parent: Ino,
    pub name: OsString,
}

/// What a namespace operation can refuse, as the errno FUSE answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument")]
    Invalid,
}

impl TreeError {
    /// The errno of this error.
    pub fn errno(self) -> i32 {
        match self {
            TreeError::NotFound => libc::ENOENT,
            TreeError::Exists => libc::EEXIST,
            TreeError::NotDir => libc::ENOTDIR,
            TreeError::IsDir => libc::EISDIR,
            TreeError::NotEmpty => libc::ENOTEMPTY,
            TreeError::Invalid => libc::EINVAL,
        }
    }
}

#[derive(Debug)]
struct Node {
    kind: Kind,
    vloc: Option<Loc>,
    dloc: Option<Loc>,
    /// Volatile entries (directories only).
    children: BTreeMap<OsString, Ino>,
}

/// One node whose durable location changes: `from` and `to` are paths relative to the
/// backing directory (`None`: not there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub ino: Ino,
    pub kind: Kind,
    pub from: Option<PathBuf>,
    pub to: Option<PathBuf>,
}

/// The backing-directory changes one fsync makes. Applied in three phases so that no step
/// overwrites or loses another's node: (1) every `from` is moved aside, deepest first;
/// (2) every `to` is placed (moved back, or created empty), shallowest first; (3) what has
/// no `to` is removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub moves: Vec<Move>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.moves.is_empty()
    }

    /// Phase 1 order: moves with a `from`, deepest first.
    pub fn stage_order(&self) -> Vec<&Move> {
        let mut v: Vec<&Move> = self.moves.iter().filter(|m| m.from.is_some()).collect();
        v.sort_by_key(|m| std::cmp::Reverse(m.from.as_ref().map_or(0, |p| p.components().count())));
        v
    }

    /// Phase 2 order: moves with a `to`, shallowest first.
    pub fn place_order(&self) -> Vec<&Move> {
        let mut v: Vec<&Move> = self.moves.iter().filter(|m| m.to.is_some()).collect();
        v.sort_by_key(|m| m.to.as_ref().map_or(0, |p| p.components().count()));
        v
    }
}

/// The volatile and durable namespace of one mount.
#[derive(Debug)]
pub struct Tree {
    nodes: HashMap<Ino, Node>,
    next: u64,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    /// An empty tree: only the root, durable.
    pub fn new() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                kind: Kind::Dir,
                vloc: None,
                dloc: None,
                children: BTreeMap::new(),
            },
        );
        Tree {
            nodes,
            next: ROOT.0 + 1,
        }
    }

    /// Adds a node that already exists durably (loading the backing directory at mount).
    pub fn add_durable(&mut self, parent: Ino, name: &OsStr, kind: Kind) -> Result<Ino, TreeError> {
        let ino = self.create(parent, name, kind)?;
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.dloc = n.vloc.clone();
        }
        Ok(ino)
    }

    pub fn kind(&self, ino: Ino) -> Option<Kind> {
        self.nodes.get(&ino).map(|n| n.kind)
    }

    pub fn exists(&self, ino: Ino) -> bool {
        self.nodes.contains_key(&ino)
    }

    /// Whether `ino` still has a name (volatile).
    pub fn is_linked(&self, ino: Ino) -> bool {
        ino == ROOT || self.nodes.get(&ino).is_some_and(|n| n.vloc.is_some())
    }

    /// Whether `ino` has a durable name.
    pub fn is_durable(&self, ino: Ino) -> bool {
        ino == ROOT || self.nodes.get(&ino).is_some_and(|n| n.dloc.is_some())
    }

    /// Forgets a node with neither a volatile nor a durable name (its last handle closed).
    pub fn remove_if_gone(&mut self, ino: Ino) -> bool {
        if ino != ROOT
            && let Some(n) = self.nodes.get(&ino)
            && n.vloc.is_none()
            && n.dloc.is_none()
        {
            self.nodes.remove(&ino);
            return true;
        }
        false
    }

    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Ino, TreeError> {
        let p = self.nodes.get(&parent).ok_or(TreeError::NotFound)?;
        if p.kind != Kind::Dir {
            return Err(TreeError::NotDir);
        }
        p.children.get(name).copied().ok_or(TreeError::NotFound)
    }

    /// The volatile entries of a directory, in name order.
    pub fn children(&self, dir: Ino) -> Result<Vec<(OsString, Ino, Kind)>, TreeError> {
        let d = self.nodes.get(&dir).ok_or(TreeError::NotFound)?;
        if d.kind != Kind::Dir {
            return Err(TreeError::NotDir);
        }
        Ok(d.children
            .iter()
            .filter_map(|(name, ino)| self.nodes.get(ino).map(|n| (name.clone(), *ino, n.kind)))
            .collect())
    }

    /// The volatile parent (for `..`).
    pub fn parent(&self, ino: Ino) -> Ino {
        self.nodes
            .get(&ino)
            .and_then(|n| n.vloc.as_ref())
            .map_or(ROOT, |l| l.parent)
    }

    /// Creates a volatile name (not durable until an fsync of it or of its directory).
    pub fn create(&mut self, parent: Ino, name: &OsStr, kind: Kind) -> Result<Ino, TreeError> {
        check_name(name)?;
        let p = self.nodes.get(&parent).ok_or(TreeError::NotFound)?;
        if p.kind != Kind::Dir {
            return Err(TreeError::NotDir);
        }
        if p.children.contains_key(name) {
            return Err(TreeError::Exists);
        }
        let ino = Ino(self.next);
        self.next += 1;
        self.nodes.insert(
            ino,
            Node {
                kind,
                vloc: Some(Loc {
                    parent,
                    name: name.to_owned(),
                }),
                dloc: None,
                children: BTreeMap::new(),
            },
        );
        if let Some(p) = self.nodes.get_mut(&parent) {
            p.children.insert(name.to_owned(), ino);
        }
        Ok(ino)
    }

    /// Removes a volatile name (`dir`: rmdir, which needs an empty directory).
    pub fn unlink(&mut self, parent: Ino, name: &OsStr, dir: bool) -> Result<Ino, TreeError> {
        let ino = self.lookup(parent, name)?;
        let n = self.nodes.get(&ino).ok_or(TreeError::NotFound)?;
        match (n.kind, dir) {
            (Kind::Dir, false) => return Err(TreeError::IsDir),
            (Kind::File, true) => return Err(TreeError::NotDir),
            (Kind::Dir, true) if !n.children.is_empty() => return Err(TreeError::NotEmpty),
            _ => {}
        }
        self.detach(ino);
        Ok(ino)
    }

    /// rename(2) on volatile names; `noreplace`: RENAME_NOREPLACE. Returns the node the
    /// rename replaced, if any (it loses its volatile name).
    pub fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        newparent: Ino,
        newname: &OsStr,
        noreplace: bool,
    ) -> Result<Option<Ino>, TreeError> {
        check_name(newname)?;
        let ino = self.lookup(parent, name)?;
        let np = self.nodes.get(&newparent).ok_or(TreeError::NotFound)?;
        if np.kind != Kind::Dir {
            return Err(TreeError::NotDir);
        }
        // A directory may not move under itself.
        let mut a = newparent;
        while a != ROOT {
            if a == ino {
                return Err(TreeError::Invalid);
            }
            a = self.parent(a);
        }
        let kind = self.kind(ino).ok_or(TreeError::NotFound)?;
        let replaced = match np.children.get(newname).copied() {
            Some(t) if t == ino => return Ok(None),
            Some(t) => {
                if noreplace {
                    return Err(TreeError::Exists);
                }
                let tn = self.nodes.get(&t).ok_or(TreeError::NotFound)?;
                match (kind, tn.kind) {
                    (Kind::File, Kind::Dir) => return Err(TreeError::IsDir),
                    (Kind::Dir, Kind::File) => return Err(TreeError::NotDir),
                    (Kind::Dir, Kind::Dir) if !tn.children.is_empty() => return Err(TreeError::NotEmpty),
                    _ => {}
                }
                self.detach(t);
                Some(t)
            }
            None => None,
        };
        self.detach(ino);
        if let Some(p) = self.nodes.get_mut(&newparent) {
            p.children.insert(newname.to_owned(), ino);
        }
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.vloc = Some(Loc {
                parent: newparent,
                name: newname.to_owned(),
            });
        }
        Ok(replaced)
    }

    fn detach(&mut self, ino: Ino) {
        let Some(loc) = self.nodes.get_mut(&ino).and_then(|n| n.vloc.take()) else {
            return;
        };
        if let Some(p) = self.nodes.get_mut(&loc.parent) {
            p.children.remove(&loc.name);
        }
    }

    /// The backing-directory path of `ino` (relative), if it is durable.
    pub fn durable_path(&self, ino: Ino) -> Option<PathBuf> {
        path_in(&self.dlocs(), ino)
    }

    /// fsync(2) or fdatasync(2) of a file, or fsync of a directory as a node: its name, and
    /// every ancestor's, becomes durable (as a journaling filesystem commits the creation
    /// with the inode). The file's data is the caller's business.
    pub fn fsync(&mut self, ino: Ino) -> Plan {
        if self.settled(ino) {
            return Plan::default();
        }
        self.change(|t, d| t.make_durable(d, ino))
    }

    /// fsync(2) of a directory: every entry added to, renamed into, removed from or renamed
    /// out of it becomes durable, and so does its own name.
    pub fn fsync_dir(&mut self, dir: Ino) -> Plan {
        let members: Vec<Ino> = self
            .nodes
            .iter()
            .filter(|(_, n)| {
                n.vloc.as_ref().is_some_and(|l| l.parent == dir) || n.dloc.as_ref().is_some_and(|l| l.parent == dir)
            })
            .map(|(i, _)| *i)
            .collect();
        if members.iter().all(|i| self.settled(*i)) && self.settled(dir) {
            return Plan::default();
        }
        self.change(|t, d| {
            t.make_durable(d, dir);
            for i in &members {
                t.make_durable(d, *i);
            }
        })
    }

    /// Whether `ino` and its ancestors are durable where they volatile are.
    fn settled(&self, mut ino: Ino) -> bool {
        while ino != ROOT {
            let Some(n) = self.nodes.get(&ino) else { return true };
            if n.vloc != n.dloc {
                return false;
            }
            match &n.vloc {
                Some(l) => ino = l.parent,
                None => return true,
            }
        }
        true
    }

    fn dlocs(&self) -> HashMap<Ino, Option<Loc>> {
        self.nodes.iter().map(|(i, n)| (*i, n.dloc.clone())).collect()
    }

    /// Runs `f` on a copy of the durable locations, then diffs and commits them.
    fn change(&mut self, f: impl FnOnce(&Tree, &mut HashMap<Ino, Option<Loc>>)) -> Plan {
        let before = self.dlocs();
        let mut after = before.clone();
        f(self, &mut after);
        let mut moves = Vec::new();
        for (ino, new) in &after {
            let old = before.get(ino).cloned().flatten();
            if old != *new {
                moves.push(Move {
                    ino: *ino,
                    kind: self.kind(*ino).unwrap_or(Kind::File),
                    from: path_in(&before, *ino),
                    to: path_in(&after, *ino),
                });
            }
        }
        for (ino, new) in after {
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.dloc = new;
            }
        }
        moves.sort_by_key(|m| m.ino);
        Plan { moves }
    }

    /// Sets `ino`'s durable location to its volatile one (in `d`), first its parent's, and
    /// moves aside what held that name before.
    fn make_durable(&self, d: &mut HashMap<Ino, Option<Loc>>, ino: Ino) {
        if ino == ROOT {
            return;
        }
        let Some(n) = self.nodes.get(&ino) else { return };
        let want = n.vloc.clone();
        if d.get(&ino).cloned().flatten() == want && self.settled_in(d, ino) {
            return;
        }
        match want {
            Some(loc) => {
                self.make_durable(d, loc.parent);
                let holder = d
                    .iter()
                    .find(|(i, l)| **i != ino && l.as_ref() == Some(&loc))
                    .map(|(i, _)| *i);
                d.insert(ino, Some(loc));
                if let Some(h) = holder {
                    self.evict(d, h);
                }
            }
            None => {
                d.insert(ino, None);
                self.orphan_children(d, ino);
            }
        }
    }

    /// `h` lost its durable name to another node: if it still has a volatile name, that
    /// (earlier) rename becomes durable too, in journal order; otherwise it is gone.
    fn evict(&self, d: &mut HashMap<Ino, Option<Loc>>, h: Ino) {
        let still_named = self.nodes.get(&h).is_some_and(|n| n.vloc.is_some());
        if still_named {
            d.insert(h, None);
            self.make_durable(d, h);
        } else {
            d.insert(h, None);
            self.orphan_children(d, h);
        }
    }

    /// A directory lost its durable name: its durable children follow their volatile names,
    /// or go.
    fn orphan_children(&self, d: &mut HashMap<Ino, Option<Loc>>, dir: Ino) {
        let kids: Vec<Ino> = d
            .iter()
            .filter(|(_, l)| l.as_ref().is_some_and(|l| l.parent == dir))
            .map(|(i, _)| *i)
            .collect();
        for k in kids {
            self.evict(d, k);
        }
    }

    fn settled_in(&self, d: &HashMap<Ino, Option<Loc>>, mut ino: Ino) -> bool {
        while ino != ROOT {
            let Some(n) = self.nodes.get(&ino) else { return true };
            let dl = d.get(&ino).cloned().flatten();
            if n.vloc != dl {
                return false;
            }
            match &n.vloc {
                Some(l) => ino = l.parent,
                None => return true,
            }
        }
        true
    }

    /// Every durable path (relative), sorted: what a power loss would leave.
    pub fn durable_listing(&self) -> Vec<PathBuf> {
        let d = self.dlocs();
        let mut v: Vec<PathBuf> = self.nodes.keys().filter_map(|i| path_in(&d, *i)).collect();
        v.retain(|p| p.as_os_str() != "");
        v.sort();
        v
    }

    /// Every volatile path (relative), sorted: what `ls -R` shows now.
    pub fn volatile_listing(&self) -> Vec<PathBuf> {
        let d: HashMap<Ino, Option<Loc>> = self.nodes.iter().map(|(i, n)| (*i, n.vloc.clone())).collect();
        let mut v: Vec<PathBuf> = self.nodes.keys().filter_map(|i| path_in(&d, *i)).collect();
        v.retain(|p| p.as_os_str() != "");
        v.sort();
        v
    }
}

/// The path of `ino` under the locations `d` (the root is ""); `None` when any ancestor has
/// no location.
fn path_in(d: &HashMap<Ino, Option<Loc>>, ino: Ino) -> Option<PathBuf> {
    let mut parts = Vec::new();
    let mut cur = ino;
    let mut guard = 0usize;
    while cur != ROOT {
        let loc = d.get(&cur)?.as_ref()?;
        parts.push(loc.name.clone());
        cur = loc.parent;
        guard += 1;
        if guard > 4096 {
            return None;
        }
    }
    let mut p = PathBuf::new();
    for part in parts.iter().rev() {
        p.push(part);
    }
    Some(p)
}

fn check_name(name: &OsStr) -> Result<(), TreeError> {
    let b = name.as_encoded_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.len() > 255 {
        return Err(TreeError::Invalid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    fn paths(v: &[&str]) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = v.iter().map(PathBuf::from).collect();
        v.sort();
        v
    }

    #[test]
    fn a_new_file_is_not_durable_until_it_or_its_directory_is_synced() {
        let mut t = Tree::new();
        let d = t.create(ROOT, os("db"), Kind::Dir).unwrap();
        let a = t.create(d, os("a"), Kind::File).unwrap();
        let b = t.create(d, os("b"), Kind::File).unwrap();
        assert!(t.durable_listing().is_empty());
        // fsync of the file: the file and its directory.
        let plan = t.fsync(a);
        assert_eq!(plan.moves.len(), 2);
        assert_eq!(t.durable_listing(), paths(&["db", "db/a"]));
        assert!(t.fsync(a).is_empty(), "a second fsync changes nothing");
        // fsync of the directory: b too.
        t.fsync_dir(d);
        assert_eq!(t.durable_listing(), paths(&["db", "db/a", "db/b"]));
        assert!(t.is_durable(b));
    }

    #[test]
    fn an_unsynced_rename_or_unlink_is_undone_by_a_power_loss() {
        let mut t = Tree::new();
        let a = t.create(ROOT, os("a"), Kind::File).unwrap();
        t.fsync_dir(ROOT);
        t.rename(ROOT, os("a"), ROOT, os("b"), false).unwrap();
        assert_eq!(t.volatile_listing(), paths(&["b"]));
        assert_eq!(t.durable_listing(), paths(&["a"]));
        let plan = t.fsync_dir(ROOT);
        assert_eq!(
            plan.moves,
            vec![Move {
                ino: a,
                kind: Kind::File,
                from: Some("a".into()),
                to: Some("b".into())
            }]
        );
        t.unlink(ROOT, os("b"), false).unwrap();
        assert_eq!(t.durable_listing(), paths(&["b"]));
        let plan = t.fsync_dir(ROOT);
        assert_eq!(plan.moves[0].to, None);
        assert!(t.durable_listing().is_empty());
        assert!(t.remove_if_gone(a));
    }

    /// lsm-tree's rewrite_atomic: temp file, write, fsync, rename over `current`, fsync
    /// `current`, fsync the directory.
    #[test]
    fn an_atomic_rewrite_replaces_the_old_file_only_when_the_rename_is_durable() {
        let mut t = Tree::new();
        let old = t.create(ROOT, os("current"), Kind::File).unwrap();
        t.fsync_dir(ROOT);
        let tmp = t.create(ROOT, os(".tmpXYZ"), Kind::File).unwrap();
        t.fsync(tmp);
        assert_eq!(t.durable_listing(), paths(&[".tmpXYZ", "current"]));
        assert_eq!(t.rename(ROOT, os(".tmpXYZ"), ROOT, os("current"), false), Ok(Some(old)));
        // Not yet durable: a power loss leaves the old `current` and the temp file.
        assert_eq!(t.durable_listing(), paths(&[".tmpXYZ", "current"]));
        assert_eq!(t.durable_path(old), Some("current".into()));
        // fsync of the renamed file makes its new name durable, replacing the old one.
        let plan = t.fsync(tmp);
        assert_eq!(t.durable_listing(), paths(&["current"]));
        assert_eq!(t.durable_path(tmp), Some("current".into()));
        assert!(!t.is_durable(old));
        let stage: Vec<Ino> = plan.stage_order().iter().map(|m| m.ino).collect();
        assert!(stage.contains(&old) && stage.contains(&tmp));
    }

    #[test]
    fn a_removed_directory_takes_its_durable_entries_along() {
        let mut t = Tree::new();
        let d = t.create(ROOT, os("d"), Kind::Dir).unwrap();
        let f = t.create(d, os("f"), Kind::File).unwrap();
        let g = t.create(d, os("g"), Kind::File).unwrap();
        t.fsync_dir(d);
        assert_eq!(t.durable_listing(), paths(&["d", "d/f", "d/g"]));
        t.unlink(d, os("f"), false).unwrap();
        t.rename(d, os("g"), ROOT, os("g"), false).unwrap();
        assert_eq!(t.unlink(ROOT, os("d"), true), Ok(d));
        // Only the root is synced: d goes; g was renamed out before, so its rename is
        // durable too (journal order); f goes with d.
        let plan = t.fsync_dir(ROOT);
        assert_eq!(t.durable_listing(), paths(&["g"]));
        let place: Vec<Ino> = plan.place_order().iter().map(|m| m.ino).collect();
        assert_eq!(place, vec![g]);
        assert!(!t.is_durable(f) && !t.is_durable(d));
    }

    #[test]
    fn namespace_errors() {
        let mut t = Tree::new();
        let d = t.create(ROOT, os("d"), Kind::Dir).unwrap();
        t.create(d, os("f"), Kind::File).unwrap();
        assert_eq!(t.create(d, os("f"), Kind::File), Err(TreeError::Exists));
        assert_eq!(t.create(d, os(".."), Kind::File), Err(TreeError::Invalid));
        assert_eq!(t.unlink(ROOT, os("d"), true), Err(TreeError::NotEmpty));
        assert_eq!(t.unlink(ROOT, os("d"), false), Err(TreeError::IsDir));
        assert_eq!(t.unlink(d, os("f"), true), Err(TreeError::NotDir));
        assert_eq!(t.unlink(d, os("nope"), false), Err(TreeError::NotFound));
        assert_eq!(t.rename(ROOT, os("d"), d, os("x"), false), Err(TreeError::Invalid));
        t.create(ROOT, os("e"), Kind::File).unwrap();
        assert_eq!(t.rename(ROOT, os("e"), d, os("f"), true), Err(TreeError::Exists));
        assert_eq!(TreeError::NotFound.errno(), libc::ENOENT);
    }

    #[test]
    fn a_cross_directory_rename_is_durable_once_either_side_is_synced() {
        let mut t = Tree::new();
        let a = t.create(ROOT, os("a"), Kind::Dir).unwrap();
        let b = t.create(ROOT, os("b"), Kind::Dir).unwrap();
        let f = t.create(a, os("f"), Kind::File).unwrap();
        t.fsync_dir(a);
        t.fsync_dir(b);
        t.rename(a, os("f"), b, os("f"), false).unwrap();
        t.fsync_dir(a);
        assert_eq!(t.durable_listing(), paths(&["a", "b", "b/f"]));
        assert_eq!(t.durable_path(f), Some("b/f".into()));
    }
}
