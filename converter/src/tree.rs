//! The merged image tree: layers applied in order with OCI whiteout semantics.
//!
//! [`TreeBuilder`] owns a [`skiff_format::ImageTree`] and applies one tar entry
//! at a time. It implements what the OCI image spec says about layer changesets
//! and what real tools write:
//!
//! - `.wh.NAME` removes `NAME` from the directory (as seen in lower layers);
//!   `.wh..wh..opq` hides every entry of the directory that lower layers put
//!   there, while entries of the same layer stay, whatever their order in the tar.
//!   A whiteout applies to lower layers only (OCI image spec), at any depth:
//!   what the same layer wrote below a hidden name (also below a directory it
//!   only walked through, or one it redeclared) stays, and what lower layers
//!   put there goes.
//! - An entry replaces whatever was at its path, except that a directory over a
//!   directory only updates the attributes and keeps the children.
//! - Parent directories that a layer leaves out (umoci does) are created with
//!   mode 0755, owner 0:0 and mtime 0, so that the result does not depend on
//!   the time of conversion.
//! - A hard link names the node that its target path names when the link entry
//!   is read, so links to files of earlier layers work, and later changes to
//!   either name (a whiteout, a replacement) leave the other name intact.
//!
//! Removed nodes are left in the node vector: the bootstrap writer only writes
//! nodes reachable from the root, which is cheaper than collecting them here.

use std::collections::{BTreeMap, HashSet};

use skiff_format::{Attrs, ImageTree, Node, NodeData, NodeId};

use crate::error::ConvertError;

/// Prefix of an OCI whiteout file name.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Name of the OCI opaque-directory marker.
pub const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";

/// The root directory's node.
pub const ROOT: NodeId = 0;

/// Splits a tar path into its normal components.
///
/// Leading `/` and `./`, repeated slashes and `.` components are dropped. A
/// `..` component is an error: no layer entry may reach outside the root.
/// An empty result names the root itself.
pub fn split_path(path: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut parts = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("path has a '..' component that escapes the root".into()),
            p if p.contains(&0) => return Err("path contains a NUL byte".into()),
            p if p.len() > 255 => {
                return Err(format!(
                    "a path component is {} bytes long (at most 255)",
                    p.len()
                ))
            }
            p => parts.push(p),
        }
    }
    Ok(parts)
}

/// Applies layer entries to an image tree.
#[derive(Debug)]
pub struct TreeBuilder {
    tree: ImageTree,
    /// Names created or replaced by the current layer, as (directory, name):
    /// an opaque whiteout must keep them.
    layer_names: HashSet<(NodeId, Vec<u8>)>,
    /// Directories of lower layers that the current layer walked through or
    /// redeclared: a whiteout keeps them, hiding only their lower content.
    layer_dirs: HashSet<NodeId>,
    /// Nodes from this index on were created by the current layer.
    layer_start: NodeId,
}

impl Default for TreeBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl TreeBuilder {
    /// A tree holding an empty root directory (0755, 0:0, mtime 0).
    pub fn new() -> Self {
        let root = Node {
            attrs: default_dir_attrs(),
            data: NodeData::Directory {
                entries: BTreeMap::new(),
            },
            xattrs: BTreeMap::new(),
        };
        TreeBuilder {
            tree: ImageTree {
                nodes: vec![root],
                ..ImageTree::default()
            },
            layer_names: HashSet::new(),
            layer_dirs: HashSet::new(),
            layer_start: 0,
        }
    }

    /// Marks the start of a new layer (for opaque whiteouts).
    pub fn begin_layer(&mut self) {
        self.layer_names.clear();
        self.layer_dirs.clear();
        self.layer_start = self.tree.nodes.len();
    }

    /// The tree built so far.
    pub fn tree(&self) -> &ImageTree {
        &self.tree
    }

    /// Gives the tree up, for the bootstrap writer.
    pub fn into_tree(self) -> ImageTree {
        self.tree
    }

    /// Mutable access to chunk and blob tables (the nodes are managed here).
    pub fn tree_mut(&mut self) -> &mut ImageTree {
        &mut self.tree
    }

    /// Resolves a path to a node without following symlinks.
    pub fn resolve(&self, parts: &[&[u8]]) -> Option<NodeId> {
        let mut cur = ROOT;
        for part in parts {
            match &self.tree.nodes.get(cur)?.data {
                NodeData::Directory { entries } => cur = *entries.get(*part)?,
                _ => return None,
            }
        }
        Some(cur)
    }

    /// Sets the attributes and xattrs of the root directory (a `./` or `/` entry).
    pub fn set_root(&mut self, attrs: Attrs, xattrs: BTreeMap<Vec<u8>, Vec<u8>>) {
        if let Some(root) = self.tree.nodes.get_mut(ROOT) {
            root.attrs = attrs;
            root.xattrs = xattrs;
        }
    }

    /// Walks to the parent directory of `parts`, creating missing directories
    /// and replacing non-directories on the way (a later layer's directory
    /// wins over an earlier file at the same path).
    fn parent_dir(&mut self, parts: &[&[u8]]) -> Result<NodeId, String> {
        let mut cur = ROOT;
        let Some((_, dirs)) = parts.split_last() else {
            return Ok(ROOT);
        };
        for part in dirs {
            let existing = match &self.tree.nodes[cur].data {
                NodeData::Directory { entries } => entries.get(*part).copied(),
                _ => return Err("internal error: parent is not a directory".into()),
            };
            cur = match existing {
                Some(id) if matches!(self.tree.nodes[id].data, NodeData::Directory { .. }) => {
                    if id < self.layer_start {
                        self.layer_dirs.insert(id);
                    }
                    id
                }
                _ => {
                    let id = self.push(Node {
                        attrs: default_dir_attrs(),
                        data: NodeData::Directory {
                            entries: BTreeMap::new(),
                        },
                        xattrs: BTreeMap::new(),
                    });
                    self.link(cur, part, id);
                    id
                }
            };
        }
        Ok(cur)
    }

    fn push(&mut self, node: Node) -> NodeId {
        self.tree.nodes.push(node);
        self.tree.nodes.len() - 1
    }

    fn link(&mut self, dir: NodeId, name: &[u8], id: NodeId) {
        if let NodeData::Directory { entries } = &mut self.tree.nodes[dir].data {
            entries.insert(name.to_vec(), id);
        }
        self.layer_names.insert((dir, name.to_vec()));
    }

    /// Applies one entry (not a whiteout, not a hard link) at `parts`.
    pub fn insert(&mut self, parts: &[&[u8]], node: Node) -> Result<NodeId, String> {
        let Some(name) = parts.last() else {
            // The root entry: only a directory may stand there.
            if !matches!(node.data, NodeData::Directory { .. }) {
                return Err("the root entry is not a directory".into());
            }
            self.set_root(node.attrs, node.xattrs);
            return Ok(ROOT);
        };
        let dir = self.parent_dir(parts)?;
        let existing = match &self.tree.nodes[dir].data {
            NodeData::Directory { entries } => entries.get(*name).copied(),
            _ => None,
        };
        if let Some(id) = existing {
            let both_dirs = matches!(self.tree.nodes[id].data, NodeData::Directory { .. })
                && matches!(node.data, NodeData::Directory { .. });
            if both_dirs {
                // A directory over a directory merges: new attributes, old children.
                let old = &mut self.tree.nodes[id];
                old.attrs = node.attrs;
                old.xattrs = node.xattrs;
                self.layer_names.insert((dir, name.to_vec()));
                self.layer_dirs.insert(id);
                return Ok(id);
            }
        }
        let id = self.push(node);
        self.link(dir, name, id);
        Ok(id)
    }

    /// Adds a hard link at `parts` to the node named by `target`.
    pub fn hard_link(&mut self, parts: &[&[u8]], target: &[&[u8]]) -> Result<NodeId, String> {
        let Some(id) = self.resolve(target) else {
            return Err("hard link to a missing target".into());
        };
        if matches!(self.tree.nodes[id].data, NodeData::Directory { .. }) {
            return Err("hard link to a directory".into());
        }
        let Some(name) = parts.last() else {
            return Err("hard link at the root path".into());
        };
        let dir = self.parent_dir(parts)?;
        self.link(dir, name, id);
        Ok(id)
    }

    /// Applies a whiteout entry: `parts` is the path of the `.wh.` file itself.
    pub fn whiteout(&mut self, parts: &[&[u8]]) -> Result<(), String> {
        let Some((name, _)) = parts.split_last() else {
            return Err("whiteout at the root".into());
        };
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err("whiteout of an invalid name".into());
            }
        }
        let Some(dir) = self.resolve(&parts[..parts.len() - 1]) else {
            // Whiting out inside a directory that does not exist hides nothing.
            return Ok(());
        };
        let NodeData::Directory { entries } = &self.tree.nodes[dir].data else {
            return Ok(());
        };
        if *name == WHITEOUT_OPAQUE {
            let names = entries.keys().cloned().collect();
            self.hide_lower(dir, names);
        } else if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            self.hide_lower(dir, vec![hidden.to_vec()]);
        }
        Ok(())
    }

    /// Hides what lower layers put at each of `names` in `dir`, keeping what
    /// the current layer wrote: a name the layer wrote, or a directory it
    /// walked through, stays, and below a lower directory that stays the
    /// same rule applies again.
    fn hide_lower(&mut self, dir: NodeId, names: Vec<Vec<u8>>) {
        let mut work = vec![(dir, names)];
        while let Some((dir, names)) = work.pop() {
            for name in names {
                let NodeData::Directory { entries } = &mut self.tree.nodes[dir].data else {
                    break;
                };
                let Some(&id) = entries.get(&name) else {
                    continue;
                };
                // A node created by this layer holds only this layer's names.
                if id >= self.layer_start {
                    continue;
                }
                let ours = self.layer_dirs.contains(&id)
                    || self.layer_names.contains(&(dir, name.clone()));
                if !ours {
                    entries.remove(&name);
                } else if let NodeData::Directory { entries } = &self.tree.nodes[id].data {
                    work.push((id, entries.keys().cloned().collect()));
                }
            }
        }
    }
}

/// Attributes of a directory that no layer describes.
pub fn default_dir_attrs() -> Attrs {
    Attrs {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_sec: 0,
        mtime_nsec: 0,
    }
}

/// True when a file name is an OCI whiteout (`.wh.` prefix).
pub fn is_whiteout(name: &[u8]) -> bool {
    name.starts_with(WHITEOUT_PREFIX)
}

impl From<String> for ConvertError {
    fn from(message: String) -> Self {
        ConvertError::Invalid(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(mode: u32) -> Node {
        Node {
            attrs: Attrs {
                mode,
                ..default_dir_attrs()
            },
            data: NodeData::Regular {
                size: 0,
                chunks: vec![],
            },
            xattrs: BTreeMap::new(),
        }
    }

    fn dir() -> Node {
        Node {
            attrs: default_dir_attrs(),
            data: NodeData::Directory {
                entries: BTreeMap::new(),
            },
            xattrs: BTreeMap::new(),
        }
    }

    fn p(s: &str) -> Vec<&[u8]> {
        split_path(s.as_bytes()).unwrap()
    }

    #[test]
    fn split_rejects_dotdot_and_normalises() {
        assert!(split_path(b"a/../b").is_err());
        assert_eq!(p("./a//b/."), vec![&b"a"[..], &b"b"[..]]);
        assert!(p("/").is_empty());
        assert!(p("./").is_empty());
    }

    #[test]
    fn whiteout_and_opaque() {
        let mut t = TreeBuilder::new();
        t.begin_layer();
        t.insert(&p("d/a"), file(0o644)).unwrap();
        t.insert(&p("d/b"), file(0o644)).unwrap();
        t.insert(&p("e"), file(0o644)).unwrap();
        t.begin_layer();
        // The same layer adds c before its opaque marker: c must survive.
        t.insert(&p("d/c"), file(0o600)).unwrap();
        t.whiteout(&p("d/.wh..wh..opq")).unwrap();
        t.whiteout(&p(".wh.e")).unwrap();
        assert!(t.resolve(&p("d/a")).is_none());
        assert!(t.resolve(&p("d/b")).is_none());
        assert!(t.resolve(&p("d/c")).is_some());
        assert!(t.resolve(&p("e")).is_none());
    }

    #[test]
    fn hard_links_share_and_survive_whiteout() {
        let mut t = TreeBuilder::new();
        t.begin_layer();
        let id = t.insert(&p("a"), file(0o644)).unwrap();
        t.begin_layer();
        assert_eq!(t.hard_link(&p("x/b"), &p("a")).unwrap(), id);
        t.whiteout(&p(".wh.a")).unwrap();
        assert_eq!(t.resolve(&p("x/b")), Some(id));
        assert!(t.hard_link(&p("c"), &p("missing")).is_err());
        assert!(t.hard_link(&p("c"), &p("x")).is_err());
    }

    #[test]
    fn dir_over_dir_keeps_children_and_file_replaces_dir() {
        let mut t = TreeBuilder::new();
        t.begin_layer();
        t.insert(&p("d/a"), file(0o644)).unwrap();
        let mut d = dir();
        d.attrs.mode = 0o700;
        let id = t.insert(&p("d"), d).unwrap();
        assert_eq!(t.tree().nodes[id].attrs.mode, 0o700);
        assert!(t.resolve(&p("d/a")).is_some());
        t.insert(&p("d"), file(0o644)).unwrap();
        assert!(t.resolve(&p("d/a")).is_none());
        // and a directory path through a file replaces the file
        t.insert(&p("d/z"), file(0o644)).unwrap();
        assert!(t.resolve(&p("d/z")).is_some());
    }
}
