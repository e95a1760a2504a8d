//! Differential coverage: a run against a base run, line by line in the categories lcov 2's
//! genhtml defines, with the base's lines carried to the new commit through the diff between
//! the two commits, so that code that only moved is not reported as lost or gained.
//!
//! Without a diff the two runs are taken to be of the same source (a line is the same line in
//! both, and a file missing from one was left out of measurement, not deleted).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use roaring::RoaringBitmap;

use super::{CoverageService, Result};
use crate::diff::{ChangeKind, FileChange};
use crate::model::path::{Found, find_suffixed};

/// lcov 2's categories of a line, comparing a run with its base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    /// Gained New Coverage: a new line, covered.
    Gnc,
    /// Uncovered New Code: a new line, not covered.
    Unc,
    /// Covered Baseline Code: unchanged, covered before and now.
    Cbc,
    /// Gained Baseline Coverage: unchanged, covered now, not before.
    Gbc,
    /// Lost Baseline Coverage: unchanged, covered before, not now.
    Lbc,
    /// Uncovered Baseline Code: unchanged, covered neither before nor now.
    Ubc,
    /// Gained coverage Included Code: unchanged text the base did not measure, covered now.
    Gic,
    /// Uncovered Included Code: unchanged text the base did not measure, not covered now.
    Uic,
    /// Excluded Covered Baseline: unchanged text no longer measured, covered before.
    Ecb,
    /// Excluded Uncovered Baseline: unchanged text no longer measured, not covered before.
    Eub,
    /// Deleted Covered Baseline: a removed line, covered before.
    Dcb,
    /// Deleted Uncovered Baseline: a removed line, not covered before.
    Dub,
}

impl Category {
    pub const ALL: [Category; 12] = [
        Category::Gnc,
        Category::Unc,
        Category::Cbc,
        Category::Gbc,
        Category::Lbc,
        Category::Ubc,
        Category::Gic,
        Category::Uic,
        Category::Ecb,
        Category::Eub,
        Category::Dcb,
        Category::Dub,
    ];

    /// genhtml's three-letter name.
    pub fn code(self) -> &'static str {
        match self {
            Category::Gnc => "GNC",
            Category::Unc => "UNC",
            Category::Cbc => "CBC",
            Category::Gbc => "GBC",
            Category::Lbc => "LBC",
            Category::Ubc => "UBC",
            Category::Gic => "GIC",
            Category::Uic => "UIC",
            Category::Ecb => "ECB",
            Category::Eub => "EUB",
            Category::Dcb => "DCB",
            Category::Dub => "DUB",
        }
    }

    pub fn from_code(code: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.code() == code)
    }

    /// Whether the category's lines are numbered as in the base (lines that are gone from the
    /// run: excluded or deleted); the others are numbered as in the run.
    pub fn in_base(self) -> bool {
        matches!(
            self,
            Category::Ecb | Category::Eub | Category::Dcb | Category::Dub
        )
    }
}

/// One file's lines by category.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DifferentialFile {
    /// The path in the run; in the base for a file the run does not hold.
    pub path: Arc<str>,
    /// The path in the base, when it differs (a rename) or the run does not hold the file.
    pub base_path: Option<Arc<str>>,
    /// Each category with lines, in [`Category::ALL`] order.
    pub lines: Vec<(Category, RoaringBitmap)>,
}

impl DifferentialFile {
    pub fn count(&self, category: Category) -> u64 {
        self.lines
            .iter()
            .find(|(c, _)| *c == category)
            .map_or(0, |(_, l)| l.len())
    }
}

/// A run's coverage compared with its base's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Differential {
    /// Files with any categorised line, sorted by path.
    pub files: Vec<DifferentialFile>,
    pub complete: bool,
    pub base_complete: bool,
}

/// Per file: the measured lines and the covered ones.
type FileLines = HashMap<Arc<str>, (RoaringBitmap, RoaringBitmap)>;

impl CoverageService {
    /// Run `run_id` against `base_id`; `diff` goes from the base's commit to the run's.
    pub async fn differential(
        &self,
        run_id: &str,
        base_id: &str,
        diff: Option<Vec<FileChange>>,
    ) -> Result<Differential> {
        let complete = self.run_status(run_id)?.complete;
        let base_complete = self.run_status(base_id)?.complete;
        let base = self
            .read(base_id, "the base", |a| a.all_file_lines())
            .await?;
        let run = self.read(run_id, "the run", |a| a.all_file_lines()).await?;
        let mut files = compare(
            &run.into_iter().collect(),
            &base.into_iter().collect(),
            diff.as_deref(),
        );
        files.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        Ok(Differential {
            files,
            complete,
            base_complete,
        })
    }
}

/// Finds a diff path among a run's paths: itself, or the one path ending with `/path`. A path
/// that ends several is compared with none of them: each then reads as new or gone.
fn find(files: &FileLines, path: &str) -> Option<Arc<str>> {
    let exact = files.get_key_value(path).map(|(p, _)| p.clone());
    match find_suffixed(path, exact, files.keys().cloned()) {
        Found::One(p) => Some(p),
        Found::Several(_) | Found::None => None,
    }
}

/// A run file's base file, and the change between them.
type Pair<'a> = (Option<Arc<str>>, Option<&'a FileChange>);

fn compare(
    run: &FileLines,
    base: &FileLines,
    diff: Option<&[FileChange]>,
) -> Vec<DifferentialFile> {
    // Each run file's base file (if the base has it) and change; each base file whose change
    // leads to a file the run does not hold.
    let mut pairs: HashMap<Arc<str>, Pair<'_>> = HashMap::new();
    let mut gone: HashMap<Arc<str>, &FileChange> = HashMap::new();
    for change in diff.unwrap_or_default() {
        let old = match change.kind {
            ChangeKind::Added | ChangeKind::Copied => None,
            _ => change.old_path.as_deref().and_then(|p| find(base, p)),
        };
        match change.new_path.as_deref().and_then(|p| find(run, p)) {
            Some(new) => {
                pairs.insert(new, (old, Some(change)));
            }
            None => {
                if let Some(old) = old {
                    gone.insert(old, change);
                }
            }
        }
    }
    let mut paired_base: HashSet<Arc<str>> =
        pairs.values().filter_map(|(old, _)| old.clone()).collect();
    let mut out = Vec::new();
    for (path, (measured, covered)) in run {
        let (old, change) = match pairs.get(path) {
            Some((old, change)) => (old.clone(), *change),
            // Not in the diff: the same file, unchanged (if the base has it).
            None => {
                let old = base.contains_key(path).then(|| path.clone());
                if let Some(o) = &old {
                    paired_base.insert(o.clone());
                }
                (old, None)
            }
        };
        let base_lines = old.as_ref().and_then(|o| base.get(o));
        let mut by: HashMap<Category, RoaringBitmap> = HashMap::new();
        let mut put = |c: Category, line: u32| {
            by.entry(c).or_default().insert(line);
        };
        for line in measured {
            let hit = covered.contains(line);
            let new = change.is_some_and(|c| {
                c.added.contains(line) || matches!(c.kind, ChangeKind::Added | ChangeKind::Copied)
            });
            if new {
                put(if hit { Category::Gnc } else { Category::Unc }, line);
                continue;
            }
            let before = change.map_or(Some(line), |c| c.old_line(line));
            match (base_lines, before) {
                (Some((b_measured, b_covered)), Some(b)) if b_measured.contains(b) => {
                    let was = b_covered.contains(b);
                    put(
                        match (was, hit) {
                            (true, true) => Category::Cbc,
                            (false, true) => Category::Gbc,
                            (true, false) => Category::Lbc,
                            (false, false) => Category::Ubc,
                        },
                        line,
                    );
                }
                _ => put(if hit { Category::Gic } else { Category::Uic }, line),
            }
        }
        // Base lines with no measured counterpart now: removed by the change, or no longer
        // measured.
        if let Some((b_measured, b_covered)) = base_lines {
            for b in b_measured {
                let was = b_covered.contains(b);
                let now = match change {
                    Some(c) => c.new_line(b),
                    None => Some(b),
                };
                match now {
                    None => put(if was { Category::Dcb } else { Category::Dub }, b),
                    Some(n) if !measured.contains(n) => {
                        put(if was { Category::Ecb } else { Category::Eub }, b)
                    }
                    Some(_) => {}
                }
            }
        }
        let renamed = old.as_ref().filter(|o| **o != *path).cloned();
        out.extend(file(path.clone(), renamed, by));
    }
    // Base files the run does not hold: a line the diff removed (or the whole file, deleted)
    // is deleted code; a line that is still there, no longer measured.
    for (path, (measured, covered)) in base {
        if paired_base.contains(path) {
            continue;
        }
        let change = gone.get(path);
        let mut by: HashMap<Category, RoaringBitmap> = HashMap::new();
        for b in measured {
            let removed = change.is_some_and(|c| c.new_line(b).is_none());
            let category = match (removed, covered.contains(b)) {
                (true, true) => Category::Dcb,
                (true, false) => Category::Dub,
                (false, true) => Category::Ecb,
                (false, false) => Category::Eub,
            };
            by.entry(category).or_default().insert(b);
        }
        out.extend(file(path.clone(), Some(path.clone()), by));
    }
    out
}

fn file(
    path: Arc<str>,
    base_path: Option<Arc<str>>,
    mut by: HashMap<Category, RoaringBitmap>,
) -> Option<DifferentialFile> {
    let lines: Vec<(Category, RoaringBitmap)> = Category::ALL
        .into_iter()
        .filter_map(|c| by.remove(&c).filter(|l| !l.is_empty()).map(|l| (c, l)))
        .collect();
    (!lines.is_empty()).then_some(DifferentialFile {
        path,
        base_path,
        lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(l: &[u32]) -> RoaringBitmap {
        l.iter().copied().collect()
    }

    fn files(list: &[(&str, &[u32], &[u32])]) -> FileLines {
        list.iter()
            .map(|(p, m, c)| (Arc::from(*p), (lines(m), lines(c))))
            .collect()
    }

    fn categories(out: &[DifferentialFile], path: &str) -> Vec<(&'static str, Vec<u32>)> {
        let f = out.iter().find(|f| &*f.path == path).unwrap();
        f.lines
            .iter()
            .map(|(c, l)| (c.code(), l.iter().collect()))
            .collect()
    }

    /// Line 2 inserted, old line 3 removed: the lines after them are matched to where they
    /// moved, and each line falls in its category.
    #[test]
    fn every_category_of_a_changed_file() {
        let diff = "--- a/a.py\n+++ b/a.py\n@@ -1,5 +1,5 @@\n l1\n+new\n l2\n-l3\n l4\n l5\n\
                    --- a/d.py\n+++ /dev/null\n@@ -1,2 +0,0 @@\n-x\n-y\n";
        let diff = crate::diff::parse(diff.as_bytes(), None).unwrap();
        let base = files(&[
            ("a.py", &[1, 2, 3, 4, 5, 6], &[1, 2, 4, 6]),
            ("b.py", &[1, 2], &[1]),
            ("d.py", &[1, 2], &[2]),
        ]);
        let run = files(&[
            ("a.py", &[1, 2, 3, 4, 5, 7], &[1, 2, 4, 5, 7]),
            ("c.py", &[1, 2], &[2]),
        ]);
        let out = compare(&run, &base, Some(&diff));
        assert_eq!(
            categories(&out, "a.py"),
            [
                ("GNC", vec![2]),
                ("CBC", vec![1, 4]),
                ("GBC", vec![5]),
                ("LBC", vec![3]),
                ("GIC", vec![7]),
                ("ECB", vec![6]),
                ("DUB", vec![3]),
            ]
        );
        // Not in the base: included code. Only in the base: excluded, or deleted by the diff.
        assert_eq!(
            categories(&out, "c.py"),
            [("GIC", vec![2]), ("UIC", vec![1])]
        );
        assert_eq!(
            categories(&out, "b.py"),
            [("ECB", vec![1]), ("EUB", vec![2])]
        );
        assert_eq!(
            categories(&out, "d.py"),
            [("DCB", vec![2]), ("DUB", vec![1])]
        );
    }

    /// Without a diff, the same line numbers are the same lines.
    #[test]
    fn without_a_diff_lines_are_compared_as_they_are() {
        let base = files(&[("a.py", &[1, 2, 3], &[1, 2])]);
        let run = files(&[("a.py", &[1, 2, 3], &[2, 3])]);
        let out = compare(&run, &base, None);
        assert_eq!(
            categories(&out, "a.py"),
            [("CBC", vec![2]), ("GBC", vec![3]), ("LBC", vec![1])]
        );
    }

    /// A renamed file is compared with its old self; a new one is all new code.
    #[test]
    fn renamed_and_new_files() {
        let diff = "diff --git a/old.py b/new.py\nsimilarity index 100%\nrename from old.py\n\
                    rename to new.py\ndiff --git a/n.py b/n.py\nnew file mode 100644\n\
                    --- /dev/null\n+++ b/n.py\n@@ -0,0 +1,2 @@\n+a\n+b\n";
        let diff = crate::diff::parse(diff.as_bytes(), None).unwrap();
        let base = files(&[("old.py", &[1, 2], &[1])]);
        let run = files(&[("new.py", &[1, 2], &[1, 2]), ("n.py", &[1, 2], &[1])]);
        let out = compare(&run, &base, Some(&diff));
        assert_eq!(
            categories(&out, "new.py"),
            [("CBC", vec![1]), ("GBC", vec![2])]
        );
        let renamed = out.iter().find(|f| &*f.path == "new.py").unwrap();
        assert_eq!(renamed.base_path.as_deref(), Some("old.py"));
        assert_eq!(
            categories(&out, "n.py"),
            [("GNC", vec![1]), ("UNC", vec![2])]
        );
        assert_eq!(
            out.len(),
            2,
            "old.py is the renamed file, not a deleted one"
        );
    }

    /// A changed file the run does not hold: its removed lines are deleted code, the others
    /// code no longer measured.
    #[test]
    fn a_changed_file_the_run_does_not_hold() {
        let diff = "--- a/m.py\n+++ b/m.py\n@@ -1,3 +1,2 @@\n a\n-b\n c\n";
        let diff = crate::diff::parse(diff.as_bytes(), None).unwrap();
        let base = files(&[("m.py", &[1, 2, 3], &[2])]);
        let out = compare(&files(&[]), &base, Some(&diff));
        assert_eq!(
            categories(&out, "m.py"),
            [("EUB", vec![1, 3]), ("DCB", vec![2])]
        );
    }
}
