//! One source file's coverage and the merge that combines two of them.
//!
//! The same type serves as a delta (what one shard saw) and as the aggregate (the union of all
//! shards), because merging is the same operation either way: union the line sets, sum the hits.

use std::cmp::Ordering;
use std::sync::Arc;

use roaring::RoaringBitmap;

use super::batch::{ArmRef, FilePart, FunctionRef};
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
    hits: Counts,
    branches: Vec<(BranchKey, Taken)>,
    functions: Vec<Function>,
    /// Per-test attribution: which lines each test covered, sorted by test name. Names are
    /// shared (`Arc`) because a test touches many files.
    tests: Vec<(Arc<str>, RoaringBitmap)>,
}

/// A bitmap of ascending, distinct values, or `None` when they are not.
///
/// roaring's own constructors insert one value at a time, about 55 instructions each: building
/// the bitmaps of every delta that way was 14% of the daemon's instructions on the ingest
/// benchmark (callgrind, 16 shards × 500 files). Reading the same values in roaring's portable
/// serialization (its documented format: cookie, container keys and sizes, offsets, then each
/// container) copies each container whole, and roaring checks what it reads.
pub(super) fn bitmap_of_sorted(values: &[u32]) -> Option<RoaringBitmap> {
    let mut buf = Vec::new();
    if !portable_of_sorted(values, &mut buf) {
        return None;
    }
    RoaringBitmap::deserialize_from(&buf[..]).ok()
}

/// The lines of ascending, distinct `lines` whose count in `hits` is not zero; `None` when
/// the lines are not ascending and distinct.
pub(super) fn covered_of(lines: &[u32], hits: &[u64]) -> Option<RoaringBitmap> {
    if hits.iter().all(|h| *h == 0) {
        return Some(RoaringBitmap::new());
    }
    if hits.iter().all(|h| *h > 0) {
        return bitmap_of_sorted(lines);
    }
    let covered: Vec<u32> = lines
        .iter()
        .zip(hits)
        .filter(|(_, h)| **h > 0)
        .map(|(l, _)| *l)
        .collect();
    bitmap_of_sorted(&covered)
}

/// Writes ascending, distinct `values` into `buf` in roaring's portable format (as roaring's
/// own `serialize_into` writes a bitmap without run containers); false when they are not
/// ascending and distinct.
fn portable_of_sorted(values: &[u32], buf: &mut Vec<u8>) -> bool {
    const NO_RUN_COOKIE: u32 = 12346;
    const ARRAY_LIMIT: usize = 4096;
    if values.windows(2).any(|w| w[0] >= w[1]) {
        return false;
    }
    // Containers: runs of values sharing their high 16 bits.
    let containers = || {
        let mut rest = values;
        std::iter::from_fn(move || {
            let first = rest.first()?;
            let n = rest.partition_point(|v| v >> 16 == first >> 16);
            let (container, tail) = rest.split_at(n);
            rest = tail;
            Some(container)
        })
    };
    let size = |c: &[u32]| {
        if c.len() <= ARRAY_LIMIT {
            2 * c.len()
        } else {
            8 * 1024
        }
    };
    let count = containers().count();
    let header = 8 + 8 * count;
    buf.reserve(header + containers().map(size).sum::<usize>());
    buf.extend_from_slice(&NO_RUN_COOKIE.to_le_bytes());
    buf.extend_from_slice(&(count as u32).to_le_bytes());
    for c in containers() {
        buf.extend_from_slice(&((c[0] >> 16) as u16).to_le_bytes());
        buf.extend_from_slice(&((c.len() - 1) as u16).to_le_bytes());
    }
    let mut offset = header;
    for c in containers() {
        buf.extend_from_slice(&(offset as u32).to_le_bytes());
        offset += size(c);
    }
    for c in containers() {
        if c.len() <= ARRAY_LIMIT {
            for v in c {
                buf.extend_from_slice(&(*v as u16).to_le_bytes());
            }
        } else {
            let mut words = [0u64; 1024];
            for v in c {
                let low = (*v & 0xffff) as usize;
                words[low / 64] |= 1 << (low % 64);
            }
            for w in words {
                buf.extend_from_slice(&w.to_le_bytes());
            }
        }
    }
    true
}

/// Whether `set` holds exactly the ascending `values`, compared in roaring's portable format
/// in buffers kept per thread: no allocation, and no walk of roaring's iterator (which was
/// 12% of the daemon's instructions on the ingest benchmark). A set kept in another form
/// (run containers) compares unequal; callers then walk it.
fn same_values(set: &RoaringBitmap, values: &[u32]) -> bool {
    thread_local! {
        static BUFFERS: std::cell::RefCell<(Vec<u8>, Vec<u8>)> = const {
            std::cell::RefCell::new((Vec::new(), Vec::new()))
        };
    }
    if set.len() != values.len() as u64 {
        return false;
    }
    BUFFERS.with(|b| {
        let (ours, theirs) = &mut *b.borrow_mut();
        ours.clear();
        theirs.clear();
        portable_of_sorted(values, ours)
            && set.serialize_into(&mut *theirs).is_ok()
            && ours == theirs
    })
}

/// Hit counts, one per executable line. They are kept in 32 bits until a count needs more
/// (then the file's counts widen): they are a large part of an aggregate, and halving them
/// took the daemon's peak at 16 shards × 35,000 files from 176 MB to 162 MB.
#[derive(Debug, Clone)]
enum Counts {
    Narrow(Vec<u32>),
    Wide(Vec<u64>),
}

impl Default for Counts {
    fn default() -> Counts {
        Counts::Narrow(Vec::new())
    }
}

impl PartialEq for Counts {
    fn eq(&self, other: &Counts) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Counts {}

impl Counts {
    fn of(hits: &[u64]) -> Counts {
        if hits.iter().all(|h| *h <= u64::from(u32::MAX)) {
            Counts::Narrow(hits.iter().map(|h| *h as u32).collect())
        } else {
            Counts::Wide(hits.to_vec())
        }
    }

    fn get(&self, index: usize) -> Option<u64> {
        match self {
            Counts::Narrow(v) => v.get(index).map(|h| u64::from(*h)),
            Counts::Wide(v) => v.get(index).copied(),
        }
    }

    /// Adds `hits` to the count at `index` (saturating), widening when it no longer fits.
    fn add(&mut self, index: usize, hits: u64) {
        match self {
            Counts::Narrow(v) => {
                let sum = u64::from(v[index]).saturating_add(hits);
                match u32::try_from(sum) {
                    Ok(narrow) => v[index] = narrow,
                    Err(_) => {
                        let mut wide: Vec<u64> = v.iter().map(|h| u64::from(*h)).collect();
                        wide[index] = sum;
                        *self = Counts::Wide(wide);
                    }
                }
            }
            Counts::Wide(v) => v[index] = v[index].saturating_add(hits),
        }
    }

    fn iter(&self) -> CountsIter<'_> {
        match self {
            Counts::Narrow(v) => CountsIter::Narrow(v.iter()),
            Counts::Wide(v) => CountsIter::Wide(v.iter()),
        }
    }
}

enum CountsIter<'a> {
    Narrow(std::slice::Iter<'a, u32>),
    Wide(std::slice::Iter<'a, u64>),
}

impl Iterator for CountsIter<'_> {
    type Item = u64;

    #[inline]
    fn next(&mut self) -> Option<u64> {
        match self {
            CountsIter::Narrow(i) => i.next().map(|h| u64::from(*h)),
            CountsIter::Wide(i) => i.next().copied(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            CountsIter::Narrow(i) => i.size_hint(),
            CountsIter::Wide(i) => i.size_hint(),
        }
    }
}

impl ExactSizeIterator for CountsIter<'_> {}

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
        if lines.len() != hits.len() {
            return None;
        }
        let bitmap = bitmap_of_sorted(lines)?;
        let covered = if hits.iter().all(|h| *h > 0) {
            bitmap.clone()
        } else {
            covered_of(lines, hits)?
        };
        Some(FileCoverage {
            lines: bitmap,
            covered,
            hits: Counts::of(hits),
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
        self.lines.iter().zip(self.hits.iter())
    }

    /// The hits of one line, `None` when it is not executable.
    pub fn hits_of(&self, line: u32) -> Option<u64> {
        if !self.lines.contains(line) {
            return None;
        }
        let index = self.lines.rank(line) as usize - 1;
        self.hits.get(index)
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

    /// About how many bytes of heap the file holds: what a memory budget counts. Bitmaps are
    /// counted at their serialized size, which is close to their containers' size; shared
    /// test names are not counted.
    pub fn heap_bytes(&self) -> usize {
        let counts = match &self.hits {
            Counts::Narrow(v) => v.capacity() * 4,
            Counts::Wide(v) => v.capacity() * 8,
        };
        let labels: usize = self
            .branches
            .iter()
            .map(|(k, _)| match &k.arm {
                BranchArm::Label(l) => l.len(),
                BranchArm::Index(_) => 0,
            })
            .sum();
        let names: usize = self.functions.iter().map(|f| f.name.len()).sum();
        self.lines.serialized_size()
            + self.covered.serialized_size()
            + counts
            + self.branches.capacity() * std::mem::size_of::<(BranchKey, Taken)>()
            + labels
            + self.functions.capacity() * std::mem::size_of::<Function>()
            + names
            + self
                .tests
                .iter()
                .map(|(_, lines)| 16 + lines.serialized_size())
                .sum::<usize>()
    }

    /// The tests that covered `line`.
    pub fn tests_of(&self, line: u32) -> impl Iterator<Item = &Arc<str>> + '_ {
        self.tests
            .iter()
            .filter(move |(_, lines)| lines.contains(line))
            .map(|(name, _)| name)
    }

    /// Takes the attribution out of the file, leaving it without.
    pub fn take_tests(&mut self) -> Vec<(Arc<str>, RoaringBitmap)> {
        std::mem::take(&mut self.tests)
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
        shrink_if_roomy(&mut branches);
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
        shrink_if_roomy(&mut functions);
        self.functions = functions;
    }

    /// Whether this is a c8 placeholder record (see [`super::PLACEHOLDER_FUNCTION`]).
    pub fn is_placeholder(&self) -> bool {
        matches!(self.functions.as_slice(), [f] if f.start_line == 1 && &*f.name == super::PLACEHOLDER_FUNCTION)
    }

    /// Adds `other` into `self`: union of lines, sum of hits, branch and function outcomes. A
    /// c8 placeholder gives way to a real record of the file, and adds nothing to another
    /// placeholder, in either order.
    pub fn merge(&mut self, other: &FileCoverage) {
        if self.is_empty() {
            self.clone_from(other);
            return;
        }
        match (self.is_placeholder(), other.is_placeholder()) {
            (_, true) => return,
            (true, false) => {
                self.clone_from(other);
                return;
            }
            (false, false) => {}
        }
        self.merge_lines(other);
        if !other.branches.is_empty() {
            self.branches = merge_branches(std::mem::take(&mut self.branches), &other.branches);
        }
        if !other.functions.is_empty() {
            merge_sorted_into(
                &mut self.functions,
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

    /// Adds the coverage of one file of a batch into `self`, like [`FileCoverage::merge`] with
    /// the part built whole, but without building it when `self` already holds every line, arm
    /// and function the part names (every shard after the first, when shards list the same
    /// files). The part's tests are left out: an aggregate keeps attribution apart (see
    /// `aggregate::attribution`), so that attributed deltas take the same fast path.
    ///
    /// Returns what the merge added to the file's [`Totals`] (merging only ever adds), so that
    /// an aggregate keeps its totals without adding up every file.
    ///
    /// When either side is a c8 placeholder the merge may take lines away (the placeholder
    /// gives way): the caller compares the totals before and after instead.
    pub fn merge_part(&mut self, part: &FilePart<'_>) -> Totals {
        // A c8 placeholder part names a function no real file has, so the fast path leaves
        // it to the general merge, where it gives way.
        if !self.is_empty()
            && !self.is_placeholder()
            && let Some(added) = self.merge_known(part)
        {
            return added;
        }
        self.merge_counted(&part.to_coverage())
    }

    /// [`FileCoverage::merge`], returning what it added to the totals (see
    /// [`FileCoverage::merge_part`]; `files` stays 0: the file was there before).
    pub fn merge_counted(&mut self, other: &FileCoverage) -> Totals {
        let before = self.totals();
        self.merge(other);
        self.totals().minus(&before)
    }

    /// Adds `part` in place if every key of it is already in `self`, and returns what that
    /// added to the totals; otherwise changes nothing and returns `None`. Counted arms (see
    /// [`COUNTED_BLOCK`]) and arms or functions out of key order also return `None`: the
    /// general merge handles those.
    fn merge_known(&mut self, part: &FilePart<'_>) -> Option<Totals> {
        let (lines, hits) = (part.lines(), part.hits());
        // The checks first, so that a refusal leaves `self` untouched. Nearly always the part
        // has exactly the file's lines (shards list the same executable lines), and comparing
        // bitmaps is cheaper than walking one (roaring's iterator was 12% of the daemon's
        // instructions on the ingest benchmark).
        let same = same_values(&self.lines, lines);
        if !same && !is_subset_of(lines, &self.lines) {
            return None;
        }
        // Most records ran nothing: then the checks are all there is to do, and the walks
        // that add are skipped.
        let mut arms_add = false;
        let mut at = 0;
        let mut previous: Option<ArmRef<'_>> = None;
        for arm in part.arms() {
            if arm.block & COUNTED_BLOCK != 0
                || previous.is_some_and(|p| p.cmp_ref(&arm) != Ordering::Less)
            {
                return None;
            }
            previous = Some(arm);
            find_from(&self.branches, &mut at, |(k, _)| arm.cmp_key(k).reverse())?;
            arms_add |= arm.taken.is_some();
        }
        let mut functions_add = false;
        let mut at = 0;
        let mut previous: Option<FunctionRef<'_>> = None;
        for f in part.functions() {
            if previous.is_some_and(|p| (p.start_line, p.name) >= (f.start_line, f.name)) {
                return None;
            }
            previous = Some(f);
            let i = find_from(&self.functions, &mut at, |k| f.cmp_key(k).reverse())?;
            functions_add |= f.hits > 0 || f.end_line > self.functions[i].end_line;
        }

        let mut added = Totals::default();
        if hits.iter().any(|h| *h > 0) {
            let mut new_covered = Vec::new();
            // `covered` is exactly the lines with a count: a line is newly covered when its
            // count was 0.
            let mut add = |index: usize, line: u32, h: u64| {
                if h > 0 {
                    if self.hits.get(index) == Some(0) {
                        new_covered.push(line);
                    }
                    self.hits.add(index, h);
                }
            };
            if same {
                for (index, (line, h)) in lines.iter().zip(hits).enumerate() {
                    add(index, *line, *h);
                }
            } else {
                let mut mine = self.lines.iter().enumerate();
                for (line, h) in lines.iter().zip(hits) {
                    if let Some((index, _)) = mine.find(|(_, l)| l == line) {
                        add(index, *line, *h);
                    }
                }
            }
            added.lines_covered = new_covered.len() as u64;
            if !new_covered.is_empty()
                && let Some(more) = bitmap_of_sorted(&new_covered)
            {
                self.covered |= more;
            }
        }
        if arms_add {
            let mut at = 0;
            for arm in part.arms() {
                if let Some(i) =
                    find_from(&self.branches, &mut at, |(k, _)| arm.cmp_key(k).reverse())
                    && arm.taken.is_some()
                {
                    let kept = &mut self.branches[i].1;
                    let was_taken = kept.is_some_and(|n| n > 0);
                    *kept = add_taken(*kept, arm.taken);
                    added.branches_taken += u64::from(!was_taken && kept.is_some_and(|n| n > 0));
                }
            }
        }
        if functions_add {
            let mut at = 0;
            for f in part.functions() {
                if let Some(i) = find_from(&self.functions, &mut at, |k| f.cmp_key(k).reverse()) {
                    let kept = &mut self.functions[i];
                    added.functions_hit += u64::from(kept.hits == 0 && f.hits > 0);
                    kept.hits = kept.hits.saturating_add(f.hits);
                    kept.end_line = kept.end_line.max(f.end_line);
                }
            }
        }
        Some(added)
    }

    fn merge_lines(&mut self, other: &FileCoverage) {
        if other.lines.is_empty() {
            return;
        }
        if other.lines.is_subset(&self.lines) {
            // A shard that ran none of the file (most records, when every shard lists every
            // file) adds nothing to a file whose lines are known.
            if other.covered.is_empty() {
                return;
            }
            // The common case once the first shard has declared the file's executable lines:
            // walk both ascending sequences and add in place, no reallocation.
            let mut mine = self.lines.iter().enumerate();
            for (line, hits) in other.line_hits() {
                if hits == 0 {
                    continue;
                }
                if let Some((index, _)) = mine.find(|(_, l)| *l == line) {
                    self.hits.add(index, hits);
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
            self.hits = Counts::of(&hits);
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
        let mut mine = mine;
        merge_sorted_into(&mut mine, theirs, |a, b| a.0.cmp(&b.0), sum);
        return mine;
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

/// [`merge_sorted`] into `mine`, in place when every key of `theirs` is already there: the
/// common case once the first shard has given a file's branches and functions, and then no
/// element moves and nothing is allocated.
fn merge_sorted_into<T: Clone>(
    mine: &mut Vec<T>,
    theirs: &[T],
    cmp: impl Fn(&T, &T) -> Ordering,
    combine: impl Fn(&mut T, &T),
) {
    let mut at = 0;
    let contained = theirs.iter().all(|t| {
        while at < mine.len() && cmp(&mine[at], t) == Ordering::Less {
            at += 1;
        }
        let found = at < mine.len() && cmp(&mine[at], t) == Ordering::Equal;
        at += 1;
        found
    });
    if !contained {
        *mine = merge_sorted(std::mem::take(mine), theirs, cmp, combine);
        return;
    }
    let mut at = 0;
    for t in theirs {
        while cmp(&mine[at], t) == Ordering::Less {
            at += 1;
        }
        combine(&mut mine[at], t);
        at += 1;
    }
}

/// Merges two sorted, duplicate-free sequences, combining equal keys with `combine`.
fn merge_sorted<T: Clone>(
    mine: Vec<T>,
    theirs: &[T],
    cmp: impl Fn(&T, &T) -> Ordering,
    combine: impl Fn(&mut T, &T),
) -> Vec<T> {
    // Exact capacity: an aggregate keeps this vector for the run's life.
    let mut out = Vec::with_capacity(mine.len() + theirs.len());
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
    out.shrink_to_fit();
    out
}

/// Whether every value of the ascending `values` is in `set`: one walk of both.
fn is_subset_of(values: &[u32], set: &RoaringBitmap) -> bool {
    if values.len() as u64 > set.len() {
        return false;
    }
    let mut mine = set.iter();
    values.iter().all(|v| mine.any(|m| m == *v))
}

/// The index of the element of the sorted `items` at or after `*at` that `cmp` finds equal,
/// moving `*at` past it; `None` when there is none (`cmp` says how an element compares with
/// the one sought). Successive calls with ascending keys walk `items` once.
fn find_from<T>(items: &[T], at: &mut usize, cmp: impl Fn(&T) -> Ordering) -> Option<usize> {
    while *at < items.len() {
        match cmp(&items[*at]) {
            Ordering::Less => *at += 1,
            Ordering::Equal => {
                *at += 1;
                return Some(*at - 1);
            }
            Ordering::Greater => return None,
        }
    }
    None
}

/// Gives back the room of a vector more than twice as large as what it holds (plus 4): a
/// builder sized like a larger file (or a record with many repeated keys) must not leave it in
/// the file. A vector grown by pushes (doubling, from 4) never has that much room, so this
/// copies only in those cases.
fn shrink_if_roomy<T>(v: &mut Vec<T>) {
    if v.capacity() > 2 * v.len() + 4 {
        v.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{FileBatch, FileBuilder};
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_c8_placeholder_gives_way_to_a_real_record_in_either_order() {
        let placeholder = {
            let mut b = FileBuilder::new();
            for line in 1..=6 {
                b.line(line, 0);
            }
            b.function(crate::model::PLACEHOLDER_FUNCTION, 1, 0, 0);
            b.branch(
                BranchKey {
                    line: 1,
                    block: 0,
                    arm: BranchArm::Index(0),
                },
                Some(0),
            );
            b.build()
        };
        let real = {
            let mut b = FileBuilder::new();
            b.line(2, 3);
            b.line(4, 0);
            b.function("f", 2, 4, 3);
            b.build()
        };
        assert!(placeholder.is_placeholder() && !real.is_placeholder());
        for (first, second) in [(&placeholder, &real), (&real, &placeholder)] {
            let mut merged = first.clone();
            merged.merge(second);
            assert_eq!(merged, real);
        }
        let mut twice = placeholder.clone();
        twice.merge(&placeholder);
        assert_eq!(twice, placeholder);
        // Through a batch part, as the daemon merges.
        let batch = crate::model::FileBatch::of_files(&[("a.js".to_owned(), real.clone())]);
        let mut merged = placeholder.clone();
        merged.merge_part(&batch.files().next().unwrap());
        assert_eq!(merged, real);
    }

    #[test]
    fn a_roomy_vector_is_not_kept_in_the_file() {
        let mut file = FileCoverage::default();
        let mut arms = Vec::with_capacity(1000);
        arms.push((
            BranchKey {
                line: 1,
                block: 0,
                arm: BranchArm::Index(0),
            },
            Some(1),
        ));
        file.set_branches(arms);
        assert!(file.branches.capacity() < 8, "{}", file.branches.capacity());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn bitmaps_of_sorted_values_equal_roarings_own(
            values in prop::collection::btree_set(
                prop_oneof![0u32..70_000, 0u32..6_000, any::<u32>()],
                0..9_000,
            )
        ) {
            let values: Vec<u32> = values.into_iter().collect();
            let ours = bitmap_of_sorted(&values).unwrap();
            let theirs = RoaringBitmap::from_sorted_iter(values.iter().copied()).unwrap();
            prop_assert_eq!(ours, theirs);
        }
    }

    /// A file and a second whose keys are (mostly) among the first's, as when every shard
    /// lists the same files.
    fn file_pair() -> impl Strategy<Value = (FileCoverage, FileCoverage)> {
        let lines = prop::collection::btree_map(1u32..200, 0u64..5, 1..40);
        let arms = prop::collection::btree_map(
            (
                1u32..50,
                0u32..2,
                prop_oneof![3 => (0u32..3).prop_map(BranchArm::Index), 1 => "[a-c]{1,2}".prop_map(|l| BranchArm::Label(l.into()))],
            ),
            prop::option::of(0u64..4),
            0..12,
        );
        let fns = prop::collection::btree_map(("[f-h]{1,2}", 0u32..30), 0u64..3, 0..6);
        (lines, arms, fns, any::<bool>(), any::<u64>()).prop_map(
            |(lines, arms, fns, extra, seed)| {
                let build = |keep: &dyn Fn(usize) -> bool, shift: u64| {
                    let mut b = FileBuilder::new();
                    for (i, (l, h)) in lines.iter().enumerate() {
                        if keep(i) {
                            b.line(*l, (h + shift) % 5);
                        }
                    }
                    for (i, ((line, block, arm), t)) in arms.iter().enumerate() {
                        if keep(i) {
                            let key = BranchKey {
                                line: *line,
                                block: *block,
                                arm: arm.clone(),
                            };
                            // Odd shifts reach arms the first file never reached.
                            let reached = (shift % 2 == 1).then_some(0);
                            b.branch(key, t.map(|t| (t + shift) % 4).or(reached));
                        }
                    }
                    for (i, ((name, line), h)) in fns.iter().enumerate() {
                        if keep(i) {
                            b.function(name, *line, *line + (shift % 3) as u32, (h + shift) % 3);
                        }
                    }
                    b
                };
                let a = build(&|_| true, 1).build();
                let mut b = build(&|i| (seed >> (i % 64)) & 1 == 1, seed % 7);
                if extra {
                    b.line(500, 1);
                }
                (a, b.build())
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn merging_a_batch_part_equals_merging_the_file((a, b) in file_pair()) {
            part_merges_like_the_file(a, b);
        }
    }

    fn part_merges_like_the_file(a: FileCoverage, b: FileCoverage) {
        let mut whole = a.clone();
        whole.merge(&b);
        let batch = FileBatch::of_files(&[("f.c", b)]);
        let mut parts = a.clone();
        let mut added = Totals::default();
        for part in batch.files() {
            added += parts.merge_part(&part);
        }
        assert_eq!(parts, whole);
        assert_eq!(added, whole.totals().minus(&a.totals()));
    }

    /// The case proptest once found (proptest-regressions/model/file.txt), pinned: a part
    /// that covers a line the file held uncovered.
    #[test]
    fn a_part_covering_a_line_held_uncovered_merges_like_the_file() {
        let mut a = FileBuilder::new();
        for line in 1..=3 {
            a.line(line, 0);
        }
        let mut b = FileBuilder::new();
        b.line(1, 1);
        part_merges_like_the_file(a.build(), b.build());
    }

    #[test]
    fn a_part_that_only_reaches_arms_or_extends_functions_still_merges() {
        let key = BranchKey {
            line: 1,
            block: 0,
            arm: BranchArm::Index(0),
        };
        let build = |taken: Taken, end_line: u32| {
            let mut b = FileBuilder::new();
            b.line(1, 0);
            b.branch(key.clone(), taken);
            b.function("f", 1, end_line, 0);
            b.build()
        };
        let mut file = build(None, 0);
        let batch = FileBatch::of_files(&[("f.c", build(Some(0), 9))]);
        for part in batch.files() {
            file.merge_part(&part);
        }
        assert_eq!(file.branches(), &[(key, Some(0))]);
        assert_eq!(file.functions()[0].end_line, 9);
    }

    #[test]
    fn same_values_compares_sets_exactly() {
        let dense: Vec<u32> = (1..6_000).chain([70_000, 70_001]).collect();
        let set = bitmap_of_sorted(&dense).unwrap();
        assert!(same_values(&set, &dense));
        let mut other = dense.clone();
        *other.last_mut().unwrap() = 70_002;
        assert!(!same_values(&set, &other));
        assert!(!same_values(&set, &dense[1..]));
        let small = RoaringBitmap::from_iter([3u32, 9, 12]);
        assert!(same_values(&small, &[3, 9, 12]));
        assert!(!same_values(&small, &[3, 9, 13]));
        assert!(!same_values(&small, &[3, 12, 9]));
        // Array containers before others: each container's offset counts 2 bytes a value.
        let spread = [1, 2, 3, 70_000, 140_000, 140_001];
        assert!(same_values(&RoaringBitmap::from_iter(spread), &spread));
    }

    #[test]
    fn counts_widen_past_32_bits_and_saturate() {
        let big = u64::from(u32::MAX) - 1;
        let mut a = FileCoverage::from_sorted_lines(&[1, 2], &[big, 1]).unwrap();
        let b = FileCoverage::from_sorted_lines(&[1, 2], &[5, 1]).unwrap();
        a.merge(&b);
        assert_eq!(
            a.line_hits().collect::<Vec<_>>(),
            vec![(1, big + 5), (2, 2)]
        );
        let max = FileCoverage::from_sorted_lines(&[1, 2], &[u64::MAX, 0]).unwrap();
        a.merge(&max);
        assert_eq!(a.hits_of(1), Some(u64::MAX));
        // Narrow and wide counts of the same values are the same file.
        let narrow = FileCoverage::from_sorted_lines(&[1], &[7]).unwrap();
        let mut wide = FileCoverage::from_sorted_lines(&[1], &[u64::MAX]).unwrap();
        wide.hits = Counts::Wide(vec![7]);
        assert_eq!(narrow, wide);
        // Equal lines with other counts are another file.
        assert_ne!(narrow, FileCoverage::from_sorted_lines(&[1], &[8]).unwrap());
        wide.hits = Counts::Wide(vec![8]);
        assert_ne!(narrow, wide);
    }

    #[test]
    fn bitmaps_refuse_unsorted_values_and_take_dense_containers() {
        assert!(bitmap_of_sorted(&[3, 2]).is_none());
        assert!(bitmap_of_sorted(&[3, 3]).is_none());
        // Over 4,096 values in one container: roaring keeps those as a bitmap container.
        let dense: Vec<u32> = (65_536..65_536 + 5_000).chain([u32::MAX]).collect();
        let b = bitmap_of_sorted(&dense).unwrap();
        assert_eq!(b.len(), 5_001);
        assert!(b.contains(u32::MAX) && b.contains(65_536) && !b.contains(65_535));
        assert_eq!(bitmap_of_sorted(&[]).unwrap(), RoaringBitmap::new());
    }
}
