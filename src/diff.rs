//! Unified diffs (`git diff base...head`, `diff -u`), read with `diffy`, as covd needs them:
//! per file, which lines of the old version the change removed, which lines of the new version
//! it added, and where it added them.
//!
//! Paths lose git's one-letter prefixes (`a/`, `b/`, and the mnemonic `i/`, `w/`, `c/`, `o/`)
//! unless told how many leading components to strip (`patch -p`); rename and copy headers
//! carry none.

use std::borrow::Cow;

use diffy::patch_set::{FileOperation, ParseOptions, PatchKind, PatchSet};
use diffy::{Line, Patch};
use roaring::RoaringBitmap;

/// What a diff did to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Modified,
    Added,
    Deleted,
    Renamed,
    Copied,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Modified => "modified",
            ChangeKind::Added => "added",
            ChangeKind::Deleted => "deleted",
            ChangeKind::Renamed => "renamed",
            ChangeKind::Copied => "copied",
        }
    }
}

/// One file of a diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    pub kind: ChangeKind,
    /// The path before the change (`None`: the file is new).
    pub old_path: Option<String>,
    /// The path after the change (`None`: the file was deleted).
    pub new_path: Option<String>,
    /// A binary file: the diff says it changed, not which lines.
    pub binary: bool,
    /// Lines of the old version the change deleted or replaced.
    pub removed: RoaringBitmap,
    /// Lines of the new version the change inserted.
    pub added: RoaringBitmap,
    /// Where lines were inserted, on the old version's side: for each block of inserted lines
    /// (replacing old lines or not), the last old line before it (0: at the file's start). A
    /// test that ran the code around an insertion is the one the new code affects.
    pub insertions: Vec<u32>,
}

impl FileChange {
    /// The path to show: the new one, or the old one of a deleted file.
    pub fn path(&self) -> &str {
        self.new_path
            .as_deref()
            .or(self.old_path.as_deref())
            .unwrap_or_default()
    }

    /// Where old line `old` is in the new version; `None` when the change removed it (or the
    /// file). The lines a diff leaves are matched in order, so the k-th unchanged old line is
    /// the k-th unchanged new line.
    pub fn new_line(&self, old: u32) -> Option<u32> {
        if self.new_path.is_none() || old == 0 || self.removed.contains(old) {
            return None;
        }
        Some(nth_outside(
            &self.added,
            old - self.removed.rank(old) as u32,
        ))
    }

    /// Where new line `new` was in the old version; `None` when the change added it.
    pub fn old_line(&self, new: u32) -> Option<u32> {
        if self.old_path.is_none() || new == 0 || self.added.contains(new) {
            return None;
        }
        Some(nth_outside(
            &self.removed,
            new - self.added.rank(new) as u32,
        ))
    }
}

/// The `k`-th line (from 1) that is not in `lines`.
fn nth_outside(lines: &RoaringBitmap, k: u32) -> u32 {
    // n - rank(n) = k: start at k and step by the lines skipped until none is left.
    let mut n = k;
    loop {
        let next = k + lines.rank(n) as u32;
        if next == n {
            return n;
        }
        n = next;
    }
}

/// A diff that does not read.
#[derive(Debug, thiserror::Error)]
#[error("the diff does not read as a unified diff: {0}")]
pub struct DiffError(String);

/// Reads a unified diff: git's form (with `diff --git` headers, renames, copies, binary files
/// and mode changes) when it has one, else the plain form of `diff -u`. `strip`: how many
/// leading path components to drop (`None`: git's one-letter prefixes). An empty diff is no
/// change at all.
pub fn parse(diff: &[u8], strip: Option<usize>) -> Result<Vec<FileChange>, DiffError> {
    if diff.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let git =
        diff.starts_with(b"diff --git ") || memchr::memmem::find(diff, b"\ndiff --git ").is_some();
    let options = if git {
        ParseOptions::gitdiff()
    } else {
        ParseOptions::unidiff()
    };
    let mut changes = Vec::new();
    for patch in PatchSet::parse_bytes(diff, options) {
        let patch = patch.map_err(|e| DiffError(e.to_string()))?;
        let (kind, old_path, new_path) = paths(patch.operation(), strip)?;
        let mut change = FileChange {
            kind,
            old_path,
            new_path,
            binary: false,
            removed: RoaringBitmap::new(),
            added: RoaringBitmap::new(),
            insertions: Vec::new(),
        };
        match patch.patch() {
            PatchKind::Text(text) => lines_of(text, &mut change)?,
            PatchKind::Binary(_) => change.binary = true,
        }
        changes.push(change);
    }
    Ok(changes)
}

/// The kind of change and its two paths, prefixes stripped.
fn paths(
    op: &FileOperation<'_, [u8]>,
    strip: Option<usize>,
) -> Result<(ChangeKind, Option<String>, Option<String>), DiffError> {
    // Rename and copy headers name paths without git's prefix: `-p N` takes N - 1 components
    // from them, as `git apply` does.
    let plain = |p: &Cow<'_, [u8]>| {
        let path = String::from_utf8_lossy(p);
        match strip {
            Some(n) => strip_path(&path, Some(n.saturating_sub(1))),
            None => Ok(path.into_owned()),
        }
    };
    let prefixed = |p: &Cow<'_, [u8]>| strip_path(&String::from_utf8_lossy(p), strip);
    Ok(match op {
        FileOperation::Create(p) => (ChangeKind::Added, None, Some(prefixed(p)?)),
        FileOperation::Delete(p) => (ChangeKind::Deleted, Some(prefixed(p)?), None),
        // Only git's headers say a file was renamed; `diff -u old new` names where the old
        // version was kept, and the file is the new one.
        FileOperation::Modify { modified, .. } => {
            let path = prefixed(modified)?;
            (ChangeKind::Modified, Some(path.clone()), Some(path))
        }
        FileOperation::Rename { from, to } => {
            (ChangeKind::Renamed, Some(plain(from)?), Some(plain(to)?))
        }
        FileOperation::Copy { from, to } => {
            (ChangeKind::Copied, Some(plain(from)?), Some(plain(to)?))
        }
    })
}

/// Drops `strip` leading components (a path with fewer is refused, as `patch` does), or git's
/// one-letter prefix (`a/`, `b/`, `i/`, `w/`…).
fn strip_path(path: &str, strip: Option<usize>) -> Result<String, DiffError> {
    let mut rest = path;
    match strip {
        Some(n) => {
            for _ in 0..n {
                match rest.split_once('/') {
                    Some((_, r)) => rest = r,
                    None => {
                        return Err(DiffError(format!(
                            "`{path}` has fewer than {n} leading components to strip"
                        )));
                    }
                }
            }
        }
        None => {
            let b = rest.as_bytes();
            if b.len() > 2 && b[0].is_ascii_lowercase() && b[1] == b'/' {
                rest = &rest[2..];
            }
        }
    }
    Ok(rest.to_owned())
}

/// Walks the hunks: removed and added lines, and where each block of insertions went.
fn lines_of(patch: &Patch<'_, [u8]>, change: &mut FileChange) -> Result<(), DiffError> {
    let line = |n: usize| {
        u32::try_from(n).map_err(|_| DiffError(format!("line {n} is past any source file")))
    };
    for hunk in patch.hunks() {
        // An empty side's start names the line before it (`@@ -0,0 +1,3 @@`).
        let (old, new) = (hunk.old_range(), hunk.new_range());
        if (old.start() == 0 && !old.is_empty()) || (new.start() == 0 && !new.is_empty()) {
            return Err(DiffError("a hunk starts at line 0".into()));
        }
        let first = |r: diffy::HunkRange| match r.is_empty() {
            true => r.start().checked_add(1),
            false => Some(r.start()),
        };
        let (Some(mut old_line), Some(mut new_line)) = (first(old), first(new)) else {
            return Err(DiffError("a hunk starts past any source file".into()));
        };
        // The current block of deleted and inserted lines: how many old lines it removed, and
        // whether its insertion point is recorded.
        let mut block: Option<(usize, bool)> = None;
        for l in hunk.lines() {
            match l {
                Line::Context(_) => {
                    block = None;
                    old_line += 1;
                    new_line += 1;
                }
                Line::Delete(_) => {
                    block.get_or_insert((0, false)).0 += 1;
                    change.removed.insert(line(old_line)?);
                    old_line += 1;
                }
                Line::Insert(_) => {
                    let (removed, recorded) = block.get_or_insert((0, false));
                    if !*recorded {
                        // The old line before the block: the lines it replaced come after it.
                        change.insertions.push(line(old_line - 1 - *removed)?);
                        *recorded = true;
                    }
                    change.added.insert(line(new_line)?);
                    new_line += 1;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/diff/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(path).unwrap()
    }

    fn bitmap(lines: &[u32]) -> RoaringBitmap {
        lines.iter().copied().collect()
    }

    /// Every kind of file `git diff -M` writes: binary, no newline at the end, a quoted
    /// non-ASCII path, a new file, a deleted one, hunks at a file's start and end, a rename with
    /// an edit and a pure rename.
    #[test]
    fn git_diff_reads_per_file() {
        let changes = parse(&fixture("git.diff"), None).unwrap();
        let by_path = |p: &str| changes.iter().find(|c| c.path() == p).unwrap();
        assert_eq!(changes.len(), 8);

        let logo = by_path("logo.png");
        assert!(logo.binary);
        assert_eq!(logo.kind, ChangeKind::Modified);
        assert!(logo.removed.is_empty() && logo.added.is_empty());

        let noeol = by_path("noeol.py");
        assert_eq!(
            (noeol.removed.clone(), noeol.added.clone()),
            (bitmap(&[2]), bitmap(&[2]))
        );
        assert_eq!(noeol.insertions, [1]);

        let cafe = by_path("src/café.py");
        assert_eq!(cafe.old_path.as_deref(), Some("src/café.py"));
        assert_eq!(cafe.removed, bitmap(&[2]));

        let fresh = by_path("src/fresh.py");
        assert_eq!(fresh.kind, ChangeKind::Added);
        assert_eq!(fresh.old_path, None);
        assert_eq!(fresh.added, bitmap(&[1, 2, 3]));
        assert_eq!(fresh.insertions, [0]);

        let gone = by_path("src/gone.py");
        assert_eq!(gone.kind, ChangeKind::Deleted);
        assert_eq!(gone.new_path, None);
        assert_eq!(gone.removed, bitmap(&[1, 2, 3, 4, 5]));
        assert!(gone.added.is_empty() && gone.insertions.is_empty());

        // Inserted before line 1, line 5 replaced, inserted after line 10, line 20 replaced.
        let m = by_path("src/mod.py");
        assert_eq!(m.kind, ChangeKind::Modified);
        assert_eq!(m.removed, bitmap(&[5, 20]));
        assert_eq!(m.added, bitmap(&[1, 6, 12, 22]));
        assert_eq!(m.insertions, [0, 4, 10, 19]);

        let moved = by_path("src/new_name.py");
        assert_eq!(moved.kind, ChangeKind::Renamed);
        assert_eq!(moved.old_path.as_deref(), Some("src/old_name.py"));
        assert_eq!(
            (moved.removed.clone(), moved.added.clone()),
            (bitmap(&[15]), bitmap(&[15]))
        );

        let pure = by_path("src/pure2.py");
        assert_eq!(pure.kind, ChangeKind::Renamed);
        assert_eq!(pure.old_path.as_deref(), Some("src/pure.py"));
        assert!(pure.removed.is_empty() && pure.added.is_empty() && !pure.binary);
    }

    /// Unchanged lines keep their order across the change; removed and added ones have no
    /// counterpart. Checked against the fixture's own text: a line keeps its words.
    #[test]
    fn unchanged_lines_map_between_versions() {
        let changes = parse(&fixture("git.diff"), None).unwrap();
        let m = changes.iter().find(|c| c.path() == "src/mod.py").unwrap();
        // Old 1-4 moved down by the line inserted first; old 5 was replaced; old 6-10 follow
        // 1 inserted; 11-19 follow 2 inserted; 20 was replaced.
        let want: Vec<Option<u32>> = (1..=21)
            .map(|old| match old {
                5 | 20 => None,
                1..=10 => Some(old + 1),
                _ => Some(old + 2),
            })
            .collect();
        let got: Vec<Option<u32>> = (1..=21).map(|old| m.new_line(old)).collect();
        assert_eq!(got, want);
        for old in (1..=19).filter(|l| *l != 5) {
            assert_eq!(m.old_line(m.new_line(old).unwrap()), Some(old));
        }
        for new in [1, 6, 12, 22] {
            assert_eq!(m.old_line(new), None, "line {new} was added");
        }
        let gone = changes.iter().find(|c| c.path() == "src/gone.py").unwrap();
        assert_eq!(gone.new_line(3), None);
        let fresh = changes.iter().find(|c| c.path() == "src/fresh.py").unwrap();
        assert_eq!(fresh.old_line(2), None);
    }

    /// `git diff --no-prefix` and `diff -u` name the same change of the same file.
    #[test]
    fn other_forms_name_the_same_lines() {
        let git = parse(&fixture("git.diff"), None).unwrap();
        let want = git.iter().find(|c| c.path() == "src/mod.py").unwrap();
        let no_prefix = parse(&fixture("no-prefix.diff"), Some(0)).unwrap();
        assert_eq!(&no_prefix[..], std::slice::from_ref(want));
        let plain = parse(&fixture("plain.diff"), None).unwrap();
        assert_eq!(&plain[..], std::slice::from_ref(want));
        // `-p 1` on the prefix-less form would take `src/` away.
        let stripped = parse(&fixture("no-prefix.diff"), Some(1)).unwrap();
        assert_eq!(stripped[0].path(), "mod.py");
        let err = parse(&fixture("no-prefix.diff"), Some(3))
            .unwrap_err()
            .to_string();
        assert!(err.contains("fewer than 3 leading components"), "{err}");
        // Rename headers carry no prefix: `-p 1` leaves them whole, as `git apply` does.
        let git = parse(&fixture("git.diff"), Some(1)).unwrap();
        let moved = git
            .iter()
            .find(|c| c.kind == ChangeKind::Renamed && !c.added.is_empty());
        let moved = moved.unwrap();
        assert_eq!(
            (moved.old_path.as_deref(), moved.new_path.as_deref()),
            (Some("src/old_name.py"), Some("src/new_name.py"))
        );
    }

    #[test]
    fn nothing_reads_as_no_change_and_damage_is_refused() {
        assert!(parse(b"", None).unwrap().is_empty());
        let bad = b"--- a/x.py\n+++ b/x.py\n@@ -1,2 +1,2 @@\n-a\n+b\n";
        let err = parse(bad, None).unwrap_err().to_string();
        assert!(err.starts_with("the diff does not read"), "{err}");
        let zero = b"--- a/x.py\n+++ b/x.py\n@@ -0,1 +1,1 @@\n-a\n+b\n";
        let err = parse(zero, None).unwrap_err().to_string();
        assert!(err.contains("line 0"), "{err}");
        let far = b"--- a/x.py\n+++ b/x.py\n@@ -18446744073709551615,0 +1 @@\n+x\n";
        assert!(parse(far, None).is_err());
    }
}
