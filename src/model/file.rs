//! One source file's coverage and the merge that combines two of them.
//!
//! The same type serves as a delta (what one shard saw) and as the aggregate (the union of all
//! shards), because merging is the same operation either way: union the line sets, sum the hits.

use std::cmp::Ordering;
use std::sync::Arc;

use roaring::RoaringBitmap;

use super::{BranchArm, BranchKey, COUNTED_BLOCK, Totals};

/// A branch outcome: `None` when the block never ran (LCOV's `-`), otherwise times taken.
pub type Taken = Option<u64>;

/// One function, keyed by `(name, start_line)`. `start_line` 0 means the tool did not say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    pub name: Box<str>,
    pub start_line: u32,
    /// 0 when unknown.
    pub end_line: u32,
    pub hits: u64,
}

impl Function {
    fn key_cmp(&self, other: &Function) -> Ordering {
        (self.start_line, &self.name).cmp(&(other.start_line, &other.name))
    }
}

/// Coverage of one source file.
///
/// Invariants: `hits[i]` is the count of the i-th line of `lines` in ascending order;
/// `covered` is exactly the lines whose count is non-zero; `branches` and `functions` are sorted
/// by key without duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileCoverage {
    lines: RoaringBitmap,
    covered: RoaringBitmap,
    hits: Vec<u64>,
    branches: Vec<(BranchKey, Taken)>,
    functions: Vec<Function>,
    /// Per-test attribution: which lines each test covered, sorted by test name. Names are
    /// shared (`Arc`) because a test touches many files.
    tests: Vec<(Arc<str>, RoaringBitmap)>,
}

/// Sums two branch outcomes: `-` + n = n, `-` + `-` = `-`.
pub fn add_taken(a: Taken, b: Taken) -> Taken {
    match (a, b) {
        (None, None) => None,
        (Some(x), None) | (None, Some(x)) => Some(x),
        (Some(x), Some(y)) => Some(x.saturating_add(y)),
    }
}

impl FileCoverage {
    /// Builds a file from ascending, distinct lines and their hits. Returns `None` when the
    /// input breaks that contract (callers validate untrusted input first and name the field).
    pub fn from_sorted_lines(lines: &[u32], hits: &[u64]) -> Option<FileCoverage> {
        if lines.len() != hits.len() || lines.windows(2).any(|w| w[0] >= w[1]) {
            return None;
        }
        let mut bitmap = RoaringBitmap::new();
        // Ascending input lets roaring append without searching.
        bitmap.append(lines.iter().copied()).ok()?;
        let covered = RoaringBitmap::from_sorted_iter(
            lines
                .iter()
                .zip(hits)
                .filter(|(_, h)| **h > 0)
                .map(|(l, _)| *l),
        )
        .ok()?;
        Some(FileCoverage {
            lines: bitmap,
            covered,
            hits: hits.to_vec(),
            branches: Vec::new(),
            functions: Vec::new(),
            tests: Vec::new(),
        })
    }

    /// Executable lines.
    pub fn lines(&self) -> &RoaringBitmap {
        &self.lines
    }

    /// Lines with a non-zero count.
    pub fn covered(&self) -> &RoaringBitmap {
        &self.covered
    }

    /// `(line, hits)` for every executable line, ascending.
    pub fn line_hits(&self) -> impl ExactSizeIterator<Item = (u32, u64)> + '_ {
        self.lines.iter().zip(self.hits.iter().copied())
    }

    /// The hits of one line, `None` when it is not executable.
    pub fn hits_of(&self, line: u32) -> Option<u64> {
        if !self.lines.contains(line) {
            return None;
        }
        let index = self.lines.rank(line) as usize - 1;
        self.hits.get(index).copied()
    }

    pub fn branches(&self) -> &[(BranchKey, Taken)] {
        &self.branches
    }

    pub fn functions(&self) -> &[Function] {
        &self.functions
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
            && self.branches.is_empty()
            && self.functions.is_empty()
            && self.tests.is_empty()
    }

    /// Which lines each test covered (tests without lines are left out).
    pub fn tests(&self) -> &[(Arc<str>, RoaringBitmap)] {
        &self.tests
    }

    /// The tests that covered `line`.
    pub fn tests_of(&self, line: u32) -> impl Iterator<Item = &Arc<str>> + '_ {
        self.tests
            .iter()
            .filter(move |(_, lines)| lines.contains(line))
            .map(|(name, _)| name)
    }

    /// Swaps each test name for the one `intern` returns (so a run keeps one copy per name).
    pub fn intern_tests(&mut self, mut intern: impl FnMut(&str) -> Arc<str>) {
        for (name, _) in &mut self.tests {
            *name = intern(name);
        }
    }

    /// Replaces the attribution with `tests`, uniting the lines of duplicate names.
    pub fn set_tests(&mut self, mut tests: Vec<(Arc<str>, RoaringBitmap)>) {
        tests.retain(|(_, lines)| !lines.is_empty());
        tests.sort_by(|a, b| a.0.cmp(&b.0));
        tests.dedup_by(|later, kept| {
            if later.0 == kept.0 {
                kept.1 |= &later.1;
                true
            } else {
                false
            }
        });
        self.tests = tests;
    }

    /// Replaces the branches with `branches`, summing duplicate keys.
    pub fn set_branches(&mut self, mut branches: Vec<(BranchKey, Taken)>) {
        branches.sort_by(|a, b| a.0.cmp(&b.0));
        branches.dedup_by(|later, kept| {
            if later.0 == kept.0 {
                kept.1 = add_taken(kept.1, later.1);
                true
            } else {
                false
            }
        });
        self.branches = branches;
    }

    /// Replaces the functions with `functions`, summing duplicate keys.
    pub fn set_functions(&mut self, mut functions: Vec<Function>) {
        functions.sort_by(Function::key_cmp);
        functions.dedup_by(|later, kept| {
            if later.key_cmp(kept) == Ordering::Equal {
                merge_function(kept, later);
                true
            } else {
                false
            }
        });
        self.functions = functions;
    }

    /// Adds `other` into `self`: union of lines, sum of hits, branch and function outcomes.
    pub fn merge(&mut self, other: &FileCoverage) {
        if self.is_empty() {
            self.clone_from(other);
            return;
        }
        self.merge_lines(other);
        if !other.branches.is_empty() {
            self.branches = merge_branches(std::mem::take(&mut self.branches), &other.branches);
        }
        if !other.functions.is_empty() {
            self.functions = merge_sorted(
                std::mem::take(&mut self.functions),
                &other.functions,
                Function::key_cmp,
                merge_function,
            );
        }
        if !other.tests.is_empty() {
            self.tests = merge_sorted(
                std::mem::take(&mut self.tests),
                &other.tests,
                |a, b| a.0.cmp(&b.0),
                |kept, new| kept.1 |= &new.1,
            );
        }
    }

    fn merge_lines(&mut self, other: &FileCoverage) {
        if other.lines.is_empty() {
            return;
        }
        if other.lines.is_subset(&self.lines) {
            // The common case once the first shard has declared the file's executable lines:
            // walk both ascending sequences and add in place, no reallocation.
            let mut mine = self.lines.iter().enumerate();
            for (line, hits) in other.line_hits() {
                if hits == 0 {
                    continue;
                }
                if let Some((index, _)) = mine.find(|(_, l)| *l == line) {
                    self.hits[index] = self.hits[index].saturating_add(hits);
                }
            }
        } else {
            let union = &self.lines | &other.lines;
            let mut hits = Vec::with_capacity(union.len() as usize);
            {
                let mut mine = self.line_hits().peekable();
                let mut theirs = other.line_hits().peekable();
                for line in &union {
                    let mut sum = 0u64;
                    if let Some((_, h)) = mine.next_if(|(l, _)| *l == line) {
                        sum = h;
                    }
                    if let Some((_, h)) = theirs.next_if(|(l, _)| *l == line) {
                        sum = sum.saturating_add(h);
                    }
                    hits.push(sum);
                }
            }
            self.lines = union;
            self.hits = hits;
        }
        self.covered |= &other.covered;
    }

    /// Totals of this file; percentages are left to readers.
    pub fn totals(&self) -> Totals {
        Totals {
            files: 1,
            lines: self.lines.len(),
            lines_covered: self.covered.len(),
            branches: self.branches.len() as u64,
            branches_taken: self
                .branches
                .iter()
                .filter(|(_, t)| t.is_some_and(|n| n > 0))
                .count() as u64,
            functions: self.functions.len() as u64,
            functions_hit: self.functions.iter().filter(|f| f.hits > 0).count() as u64,
        }
    }
}

type Arm = (BranchKey, Taken);

fn is_counted(arm: &Arm) -> bool {
    arm.0.block & COUNTED_BLOCK != 0
}

/// Keyed arms sum; a line's counted arms (see [`COUNTED_BLOCK`]) present on both sides merge
/// by [`merge_counted_line`].
fn merge_branches(mine: Vec<Arm>, theirs: &[Arm]) -> Vec<Arm> {
    let sum = |kept: &mut Arm, new: &Arm| kept.1 = add_taken(kept.1, new.1);
    // Checked per merge so that the common case (no counted arms on one side) stays one
    // linear walk.
    if !theirs.iter().any(is_counted) || !mine.iter().any(is_counted) {
        return merge_sorted(mine, theirs, |a, b| a.0.cmp(&b.0), sum);
    }
    let (mine_counted, mine_keyed): (Vec<Arm>, Vec<Arm>) = mine.into_iter().partition(is_counted);
    let (theirs_counted, theirs_keyed): (Vec<Arm>, Vec<Arm>) =
        theirs.iter().cloned().partition(is_counted);
    let mut out = merge_sorted(mine_keyed, &theirs_keyed, |a, b| a.0.cmp(&b.0), sum);
    let by_line = |arms: Vec<Arm>| {
        let mut lines: std::collections::BTreeMap<(u32, u32), Vec<Arm>> = Default::default();
        for arm in arms {
            lines
                .entry((arm.0.line, arm.0.block))
                .or_default()
                .push(arm);
        }
        lines
    };
    let mut theirs_lines = by_line(theirs_counted);
    for (at, arms) in by_line(mine_counted) {
        match theirs_lines.remove(&at) {
            Some(other) => out.extend(merge_counted_line(at, &arms, &other)),
            None => out.extend(arms),
        }
    }
    out.extend(theirs_lines.into_values().flatten());
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// One line's counted arms from two sources: as many arms as the larger report, missing
/// those both missed, and every other arm taken. A taken arm carries no count (the tools
/// that report arms this way give none), so it shows 1.
fn merge_counted_line((line, block): (u32, u32), mine: &[Arm], theirs: &[Arm]) -> Vec<Arm> {
    let missing = |arms: &[Arm]| -> std::collections::BTreeMap<Box<str>, Taken> {
        arms.iter()
            .filter_map(|(k, t)| match &k.arm {
                BranchArm::Label(l) => Some((l.clone(), *t)),
                BranchArm::Index(_) => None,
            })
            .collect()
    };
    let theirs_missing = missing(theirs);
    let both: Vec<(Box<str>, Taken)> = missing(mine)
        .into_iter()
        .filter_map(|(label, t)| {
            let other = *theirs_missing.get(&label)?;
            Some((label, add_taken(t, other)))
        })
        .collect();
    let arms = mine.len().max(theirs.len());
    counted_arms(line, block, arms.saturating_sub(both.len()), both)
}

/// A line's counted arms (see [`COUNTED_BLOCK`]): `taken` arms by position, then each missing
/// arm keyed by its label (its destination), with `None` when the line never ran.
pub fn counted_arms(
    line: u32,
    block: u32,
    taken: usize,
    missing: impl IntoIterator<Item = (Box<str>, Taken)>,
) -> Vec<Arm> {
    let key = |arm| BranchKey {
        line,
        block: block | COUNTED_BLOCK,
        arm,
    };
    (0..taken)
        .map(|i| (key(BranchArm::Index(i as u32)), Some(1)))
        .chain(
            missing
                .into_iter()
                .map(|(label, t)| (key(BranchArm::Label(label)), t)),
        )
        .collect()
}

fn merge_function(kept: &mut Function, new: &Function) {
    kept.hits = kept.hits.saturating_add(new.hits);
    kept.end_line = kept.end_line.max(new.end_line);
}

/// Merges two sorted, duplicate-free sequences, combining equal keys with `combine`.
fn merge_sorted<T: Clone>(
    mine: Vec<T>,
    theirs: &[T],
    cmp: impl Fn(&T, &T) -> Ordering,
    combine: impl Fn(&mut T, &T),
) -> Vec<T> {
    let mut out = Vec::with_capacity(mine.len().max(theirs.len()));
    let mut theirs = theirs.iter().peekable();
    for mut item in mine {
        while let Some(t) = theirs.next_if(|t| cmp(t, &item) == Ordering::Less) {
            out.push(t.clone());
        }
        if let Some(t) = theirs.next_if(|t| cmp(t, &item) == Ordering::Equal) {
            combine(&mut item, t);
        }
        out.push(item);
    }
    out.extend(theirs.cloned());
    out
}
