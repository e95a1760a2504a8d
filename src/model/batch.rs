//! Many files' coverage in flat columns: a delta as it arrives, before it is merged.
//!
//! A [`FileCoverage`] per file of a delta cost about twenty allocations (bitmaps, vectors, a
//! `Box<str>` per function name) only to be merged and dropped: on the ingest benchmark
//! (16 shards × 35,000 files, every shard listing every file) malloc and free were 17% of the
//! daemon's CPU, and building the files another 15%. A batch keeps every file's lines, hits,
//! branch arms and functions in a handful of shared vectors and every string in one buffer, so
//! a delta of a hundred files costs a handful of allocations, and
//! [`FileCoverage::merge_part`] adds a file into an aggregate that already knows its keys
//! without building it at all.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use roaring::RoaringBitmap;

use super::file::covered_of;
use super::{BranchArm, BranchKey, FileCoverage, Function, Taken};

/// A string in [`FileBatch::text`]: start and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span(u32, u32);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    path: Span,
    lines: Range<u32>,
    arms: Range<u32>,
    functions: Range<u32>,
    tests: Range<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ArmSlot {
    line: u32,
    block: u32,
    index: u32,
    /// `None` when the arm is numbered.
    label: Option<Span>,
    taken: Taken,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FunctionSlot {
    name: Span,
    start_line: u32,
    end_line: u32,
    hits: u64,
}

/// Which arm of a block, borrowed from a batch (see [`BranchArm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArmName<'a> {
    Index(u32),
    Label(&'a str),
}

impl ArmName<'_> {
    /// The order of [`BranchArm`]: numbered arms first, then labels.
    fn cmp_arm(self, arm: &BranchArm) -> Ordering {
        match (self, arm) {
            (ArmName::Index(a), BranchArm::Index(b)) => a.cmp(b),
            (ArmName::Index(_), BranchArm::Label(_)) => Ordering::Less,
            (ArmName::Label(_), BranchArm::Index(_)) => Ordering::Greater,
            (ArmName::Label(a), BranchArm::Label(b)) => a.cmp(b),
        }
    }

    fn to_arm(self) -> BranchArm {
        match self {
            ArmName::Index(i) => BranchArm::Index(i),
            ArmName::Label(l) => BranchArm::Label(l.into()),
        }
    }
}

/// One branch arm of a file in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArmRef<'a> {
    pub line: u32,
    pub block: u32,
    pub arm: ArmName<'a>,
    pub taken: Taken,
}

impl ArmRef<'_> {
    /// Compares this arm's key with `key`, in [`BranchKey`]'s order.
    pub(super) fn cmp_key(&self, key: &BranchKey) -> Ordering {
        (self.line, self.block)
            .cmp(&(key.line, key.block))
            .then_with(|| self.arm.cmp_arm(&key.arm))
    }

    /// Compares the keys of two arms.
    pub(super) fn cmp_ref(&self, other: &ArmRef<'_>) -> Ordering {
        (self.line, self.block)
            .cmp(&(other.line, other.block))
            .then_with(|| match (self.arm, other.arm) {
                (ArmName::Index(a), ArmName::Index(b)) => a.cmp(&b),
                (ArmName::Index(_), ArmName::Label(_)) => Ordering::Less,
                (ArmName::Label(_), ArmName::Index(_)) => Ordering::Greater,
                (ArmName::Label(a), ArmName::Label(b)) => a.cmp(b),
            })
    }

    fn key(&self) -> BranchKey {
        BranchKey {
            line: self.line,
            block: self.block,
            arm: self.arm.to_arm(),
        }
    }
}

/// One function of a file in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionRef<'a> {
    pub name: &'a str,
    pub start_line: u32,
    pub end_line: u32,
    pub hits: u64,
}

impl FunctionRef<'_> {
    /// Compares this function's key with `f`'s, in [`Function`]'s order.
    pub(super) fn cmp_key(&self, f: &Function) -> Ordering {
        (self.start_line, self.name).cmp(&(f.start_line, &*f.name))
    }
}

/// The coverage of many files in flat columns. Built file by file ([`FileBatch::begin_file`],
/// the arms and functions, then [`FileBatch::end_file`]); read with [`FileBatch::files`].
/// Branches and functions may come in any order and repeat a key, as on the wire; they are
/// summed when merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileBatch {
    text: String,
    files: Vec<Slot>,
    lines: Vec<u32>,
    hits: Vec<u64>,
    arms: Vec<ArmSlot>,
    functions: Vec<FunctionSlot>,
    tests: Vec<(Arc<str>, RoaringBitmap)>,
    /// Where the file being built started (arms, functions, tests).
    open: Option<(u32, u32, u32)>,
    /// A test every covered line of every file is attributed to (a whole delta's test).
    test: Option<Arc<str>>,
}

/// Batches kept for reuse, and the most a kept batch may hold (bytes of its vectors).
///
/// A delta's batch grows its vectors to a few hundred KB and is dropped right after the merge;
/// glibc hands memory of that size back to the kernel, so the next delta's vectors came back
/// as fresh pages, zeroed by a page fault each: 9% of the daemon's CPU on the ingest benchmark
/// (16 × 35,000 files), gone with this pool.
static SPARE: Mutex<Vec<FileBatch>> = Mutex::new(Vec::new());
const SPARE_BATCHES: usize = 8;
const SPARE_BYTES: usize = 4 << 20;

/// A batch's columns are indexed by `u32`: past this, a batch refuses more (callers bound a
/// delta's size far below it).
const MAX_ITEMS: usize = u32::MAX as usize;

/// Why [`FileBatch::end_file`] refused a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("there must be one count per line")]
    Counts,
    #[error("lines are not ascending")]
    Unsorted,
    #[error("the batch is full")]
    Full,
}

impl FileBatch {
    pub fn new() -> FileBatch {
        FileBatch::default()
    }

    /// An empty batch, with the vectors of a recycled one when there is one.
    pub fn recycled() -> FileBatch {
        let spare = SPARE.lock().unwrap_or_else(|e| e.into_inner()).pop();
        spare.unwrap_or_default()
    }

    /// Empties the batch and keeps its vectors for [`FileBatch::recycled`] (unless the pool is
    /// full or the batch is unusually large).
    pub fn recycle(mut self) {
        if self.capacity_bytes() > SPARE_BYTES {
            return;
        }
        self.text.clear();
        self.files.clear();
        self.lines.clear();
        self.hits.clear();
        self.arms.clear();
        self.functions.clear();
        self.tests.clear();
        self.open = None;
        self.test = None;
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < SPARE_BATCHES {
            spare.push(self);
        }
    }

    fn capacity_bytes(&self) -> usize {
        use std::mem::size_of;
        self.text.capacity()
            + self.files.capacity() * size_of::<Slot>()
            + self.lines.capacity() * size_of::<u32>()
            + self.hits.capacity() * size_of::<u64>()
            + self.arms.capacity() * size_of::<ArmSlot>()
            + self.functions.capacity() * size_of::<FunctionSlot>()
            + self.tests.capacity() * size_of::<(Arc<str>, RoaringBitmap)>()
    }

    /// A batch of whole files (several entries for one path are summed when merged).
    pub fn of_files<'a, P: AsRef<str> + 'a>(
        files: impl IntoIterator<Item = &'a (P, FileCoverage)>,
    ) -> FileBatch {
        let mut batch = FileBatch::new();
        for (path, file) in files {
            batch.push_file(path.as_ref(), file);
        }
        batch
    }

    /// Appends a whole file.
    pub fn push_file(&mut self, path: &str, file: &FileCoverage) {
        self.begin_file();
        for (key, taken) in file.branches() {
            let arm = match &key.arm {
                BranchArm::Index(i) => ArmName::Index(*i),
                BranchArm::Label(l) => ArmName::Label(l),
            };
            self.push_arm(key.line, key.block, arm, *taken);
        }
        for f in file.functions() {
            self.push_function(&f.name, f.start_line, f.end_line, f.hits);
        }
        for (name, lines) in file.tests() {
            self.push_test(name.clone(), lines.clone());
        }
        let (lines, hits): (Vec<u32>, Vec<u64>) = file.line_hits().unzip();
        self.end_file(path, &lines, &hits)
            .expect("a file's own lines are ascending, one count each");
    }

    /// Starts a file: the arms, functions and tests pushed next are its own.
    pub fn begin_file(&mut self) {
        self.open = Some((
            self.arms.len() as u32,
            self.functions.len() as u32,
            self.tests.len() as u32,
        ));
    }

    fn text_span(&mut self, s: &str) -> Span {
        let span = Span(self.text.len() as u32, s.len() as u32);
        self.text.push_str(s);
        span
    }

    fn span(&self, span: Span) -> &str {
        &self.text[span.0 as usize..(span.0 + span.1) as usize]
    }

    pub fn push_arm(&mut self, line: u32, block: u32, arm: ArmName<'_>, taken: Taken) {
        let (index, label) = match arm {
            ArmName::Index(i) => (i, None),
            ArmName::Label(l) => (0, Some(self.text_span(l))),
        };
        self.arms.push(ArmSlot {
            line,
            block,
            index,
            label,
            taken,
        });
    }

    pub fn push_function(&mut self, name: &str, start_line: u32, end_line: u32, hits: u64) {
        let name = self.text_span(name);
        self.functions.push(FunctionSlot {
            name,
            start_line,
            end_line,
            hits,
        });
    }

    /// Attributes `lines` of the open file to the test `name`.
    pub fn push_test(&mut self, name: Arc<str>, lines: RoaringBitmap) {
        self.tests.push((name, lines));
    }

    /// Ends the open file: its path, and its ascending, distinct lines with one count each.
    pub fn end_file(&mut self, path: &str, lines: &[u32], hits: &[u64]) -> Result<(), BatchError> {
        if lines.len() != hits.len() {
            return Err(BatchError::Counts);
        }
        if lines.windows(2).any(|w| w[0] >= w[1]) {
            return Err(BatchError::Unsorted);
        }
        if !self.fits(path, lines) {
            return Err(BatchError::Full);
        }
        let (arms, functions, tests) = self.open.take().unwrap_or((
            self.arms.len() as u32,
            self.functions.len() as u32,
            self.tests.len() as u32,
        ));
        let start = self.lines.len() as u32;
        self.lines.extend_from_slice(lines);
        self.hits.extend_from_slice(hits);
        let path = self.text_span(path);
        self.files.push(Slot {
            path,
            lines: start..self.lines.len() as u32,
            arms: arms..self.arms.len() as u32,
            functions: functions..self.functions.len() as u32,
            tests: tests..self.tests.len() as u32,
        });
        Ok(())
    }

    /// Whether the columns can take one more file, indexed by `u32`. Only past 4 G items,
    /// which no message reaches: cargo-mutants leaves it out (`.cargo/mutants.toml`).
    fn fits(&self, path: &str, lines: &[u32]) -> bool {
        self.text.len() + path.len() <= MAX_ITEMS
            && self.lines.len() + lines.len() <= MAX_ITEMS
            && self.arms.len() <= MAX_ITEMS
            && self.functions.len() <= MAX_ITEMS
    }

    /// Attributes every covered line of every file to `name`.
    pub fn set_test(&mut self, name: Arc<str>) {
        self.test = Some(name);
    }

    /// The test every covered line of every file is attributed to, if any.
    pub fn test(&self) -> Option<&Arc<str>> {
        self.test.as_ref()
    }

    /// The distinct test names the batch attributes lines to.
    pub fn test_names(&self) -> std::collections::HashSet<&str> {
        let mut names: std::collections::HashSet<&str> =
            self.tests.iter().map(|(name, _)| &**name).collect();
        names.extend(self.test.as_deref());
        names
    }

    /// Whether any line of the batch is attributed to a test.
    pub fn has_tests(&self) -> bool {
        !self.tests.is_empty() || self.test.is_some()
    }

    /// Entries of each kind: files, lines, branch arms, functions.
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        (
            self.files.len() as u64,
            self.lines.len() as u64,
            self.arms.len() as u64,
            self.functions.len() as u64,
        )
    }

    /// The number of files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Each file's path, in order.
    pub fn paths(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.files.iter().map(|s| self.span(s.path))
    }

    /// Each file, in order.
    pub fn files(&self) -> impl ExactSizeIterator<Item = FilePart<'_>> + '_ {
        self.files.iter().map(|slot| FilePart { batch: self, slot })
    }

    /// Each file built whole (for tests and the slow paths).
    pub fn to_files(&self) -> Vec<(String, FileCoverage)> {
        self.files()
            .map(|f| (f.path().to_owned(), f.to_file()))
            .collect()
    }
}

/// One file of a [`FileBatch`].
#[derive(Debug, Clone, Copy)]
pub struct FilePart<'a> {
    batch: &'a FileBatch,
    slot: &'a Slot,
}

impl<'a> FilePart<'a> {
    pub fn path(&self) -> &'a str {
        self.batch.span(self.slot.path)
    }

    /// Executable lines, ascending and distinct.
    pub fn lines(&self) -> &'a [u32] {
        within(&self.batch.lines, &self.slot.lines)
    }

    /// The count of each line of [`FilePart::lines`].
    pub fn hits(&self) -> &'a [u64] {
        within(&self.batch.hits, &self.slot.lines)
    }

    /// Branch arms, in the order given (keys may repeat).
    pub fn arms(&self) -> impl ExactSizeIterator<Item = ArmRef<'a>> + 'a {
        let batch = self.batch;
        within(&batch.arms, &self.slot.arms)
            .iter()
            .map(move |a| ArmRef {
                line: a.line,
                block: a.block,
                arm: match a.label {
                    None => ArmName::Index(a.index),
                    Some(label) => ArmName::Label(batch.span(label)),
                },
                taken: a.taken,
            })
    }

    /// The most arms any one line has (an arm given twice counts twice).
    pub fn most_arms_on_a_line(&self) -> usize {
        let mut lines: Vec<u32> = within(&self.batch.arms, &self.slot.arms)
            .iter()
            .map(|a| a.line)
            .collect();
        lines.sort_unstable();
        lines
            .chunk_by(|a, b| a == b)
            .map(<[u32]>::len)
            .max()
            .unwrap_or(0)
    }

    /// The number of branch arms (an arm given twice counts twice).
    pub fn arm_count(&self) -> usize {
        self.slot.arms.len()
    }

    /// Functions, in the order given (keys may repeat).
    pub fn functions(&self) -> impl ExactSizeIterator<Item = FunctionRef<'a>> + 'a {
        let batch = self.batch;
        within(&batch.functions, &self.slot.functions)
            .iter()
            .map(move |f| FunctionRef {
                name: batch.span(f.name),
                start_line: f.start_line,
                end_line: f.end_line,
                hits: f.hits,
            })
    }

    /// The tests of this file and the lines each covered: the file's own records, then the
    /// batch's test (if any) with every line the file covered.
    pub fn tests(&self) -> impl Iterator<Item = (&'a Arc<str>, Cow<'a, RoaringBitmap>)> + 'a {
        let own = self
            .own_tests()
            .iter()
            .map(|(name, lines)| (name, Cow::Borrowed(lines)));
        let part = *self;
        let whole = self
            .batch
            .test
            .as_ref()
            .map(move |name| (name, Cow::Owned(part.covered())));
        own.chain(whole)
    }

    /// The file's own test records (the batch's test aside).
    pub fn own_tests(&self) -> &'a [(Arc<str>, RoaringBitmap)] {
        within(&self.batch.tests, &self.slot.tests)
    }

    /// The lines with a non-zero count.
    pub fn covered(&self) -> RoaringBitmap {
        covered_of(self.lines(), self.hits()).expect("a batch holds ascending lines")
    }

    /// The file built whole: sorted, duplicates summed.
    pub fn to_file(&self) -> FileCoverage {
        let mut file = self.to_coverage();
        file.set_tests(
            self.tests()
                .map(|(name, lines)| (name.clone(), lines.into_owned()))
                .collect(),
        );
        file
    }

    /// The file built whole, without its tests.
    pub fn to_coverage(&self) -> FileCoverage {
        let mut file = FileCoverage::from_sorted_lines(self.lines(), self.hits())
            .expect("a batch holds ascending lines with one count each");
        if self.slot.arms.start != self.slot.arms.end {
            file.set_branches(self.arms().map(|a| (a.key(), a.taken)).collect());
        }
        if self.slot.functions.start != self.slot.functions.end {
            file.set_functions(
                self.functions()
                    .map(|f| Function {
                        name: f.name.into(),
                        start_line: f.start_line,
                        end_line: f.end_line,
                        hits: f.hits,
                    })
                    .collect(),
            );
        }
        file
    }
}

/// The items of one file in a column.
fn within<'a, T>(column: &'a [T], range: &Range<u32>) -> &'a [T] {
    &column[range.start as usize..range.end as usize]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FileBuilder;

    fn file(
        lines: &[(u32, u64)],
        arms: &[(u32, u32, &str, Taken)],
        fns: &[(&str, u32, u64)],
    ) -> FileCoverage {
        let mut b = FileBuilder::new();
        for (l, h) in lines {
            b.line(*l, *h);
        }
        for (line, index, label, taken) in arms {
            let arm = if label.is_empty() {
                BranchArm::Index(*index)
            } else {
                BranchArm::Label((*label).into())
            };
            b.branch(
                BranchKey {
                    line: *line,
                    block: 0,
                    arm,
                },
                *taken,
            );
        }
        for (name, line, hits) in fns {
            b.function(name, *line, 0, *hits);
        }
        b.build()
    }

    #[test]
    fn files_read_back_as_pushed() {
        let a = file(
            &[(1, 0), (4, 2)],
            &[
                (1, 0, "", None),
                (1, 1, "", Some(3)),
                (4, 0, "jump to line 9", Some(0)),
            ],
            &[("f", 1, 2)],
        );
        let b = file(&[(7, 1)], &[], &[("g", 0, 0), ("h", 7, 1)]);
        let files = vec![("a.c".to_owned(), a), ("dir/b.c".to_owned(), b)];
        let batch = FileBatch::of_files(&files);
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.paths().collect::<Vec<_>>(), vec!["a.c", "dir/b.c"]);
        assert_eq!(batch.to_files(), files);
    }

    #[test]
    fn a_recycled_batch_is_empty() {
        let files = vec![("a.c", file(&[(1, 1)], &[(1, 0, "x", None)], &[("f", 1, 1)]))];
        let batch = FileBatch::of_files(&files);
        batch.recycle();
        let again = FileBatch::recycled();
        assert!(again.is_empty());
        assert_eq!(again, FileBatch::new());
    }

    #[test]
    fn an_empty_label_stays_a_label() {
        let mut b = FileBuilder::new();
        b.line(1, 1);
        let arm = BranchArm::Label("".into());
        b.branch(
            BranchKey {
                line: 1,
                block: 0,
                arm,
            },
            Some(1),
        );
        let files = vec![("a.c", b.build())];
        assert_eq!(FileBatch::of_files(&files).to_files()[0].1, files[0].1);
    }

    #[test]
    fn end_file_refuses_what_breaks_the_invariants() {
        let mut batch = FileBatch::new();
        batch.begin_file();
        assert_eq!(
            batch.end_file("a", &[2, 1], &[0, 0]),
            Err(BatchError::Unsorted)
        );
        assert_eq!(
            batch.end_file("a", &[1, 1], &[0, 0]),
            Err(BatchError::Unsorted)
        );
        assert_eq!(batch.end_file("a", &[1], &[]), Err(BatchError::Counts));
        assert!(batch.is_empty());
        batch.begin_file();
        batch.end_file("a", &[1], &[1]).unwrap();
        assert!(!batch.is_empty());
    }

    /// The merge takes its fast path for a batch without tests: `has_tests` says which.
    #[test]
    fn a_batch_says_whether_it_names_tests() {
        let files = vec![("a.c", file(&[(1, 1)], &[], &[]))];
        let plain = FileBatch::of_files(&files);
        assert!(!plain.has_tests());
        let mut whole = FileBatch::of_files(&files);
        whole.set_test("t".into());
        assert!(whole.has_tests());
        let mut per_line = FileBatch::new();
        per_line.begin_file();
        per_line.push_test("t".into(), [1].into_iter().collect());
        per_line.end_file("a.c", &[1], &[1]).unwrap();
        assert!(per_line.has_tests());
    }
}
