//! The in-memory aggregate: per run, every file's merged coverage, merged concurrently by many
//! shard streams. No I/O.
//!
//! - [`Aggregate`]: files by path in a `DashMap`, so streams merging different files do not
//!   contend, and two streams merging the same file lock only that file's shard of the map.
//! - [`PathInterner`]: one allocation per distinct path across all runs; successive runs of a
//!   project name the same files, and the daemon keeps many runs.
//! - [`attribution`]: which tests covered which lines, per run, when shards name tests.

pub mod attribution;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use roaring::RoaringBitmap;

use crate::model::path::{Found, PathFilter, find_suffixed};
use crate::model::{FileBatch, FileCoverage, Totals};
use attribution::{FileTests, TestId, TestTable};

/// Shares path strings between runs.
#[derive(Debug, Default)]
pub struct PathInterner {
    paths: DashMap<Arc<str>, ()>,
}

impl PathInterner {
    pub fn intern(&self, path: &str) -> Arc<str> {
        if let Some(entry) = self.paths.get(path) {
            return entry.key().clone();
        }
        let arc: Arc<str> = Arc::from(path);
        // Another thread may have inserted meanwhile; keep whichever is in the map.
        self.paths.entry(arc).or_default().key().clone()
    }

    /// Forgets paths no run refers to any more (call after dropping runs).
    pub fn prune(&self) {
        self.paths.retain(|k, _| Arc::strong_count(k) > 1);
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

/// About how many bytes an aggregate of `files`, `lines`, branch `arms` and `functions` holds:
/// each file's map entry and two bitmaps' headers, then per line a 4-byte count and two bitmap
/// entries (2 bytes each in the sparse containers most files use), per arm its key and count,
/// per function its record and a name of typical length. Labels and names longer than that,
/// and per-test attribution, are left out: an estimate in constant time, checked against
/// [`Aggregate::heap_bytes`] by a test.
pub fn estimated_bytes(files: u64, lines: u64, arms: u64, functions: u64) -> usize {
    const FILE: u64 = (std::mem::size_of::<(Arc<str>, FileEntry)>() + 16 + 2 * 48) as u64;
    const LINE: u64 = 8;
    const ARM: u64 = std::mem::size_of::<(crate::model::BranchKey, crate::model::Taken)>() as u64;
    const FUNCTION: u64 = std::mem::size_of::<crate::model::Function>() as u64 + 24;
    let bytes = files
        .saturating_mul(FILE)
        .saturating_add(lines.saturating_mul(LINE))
        .saturating_add(arms.saturating_mul(ARM))
        .saturating_add(functions.saturating_mul(FUNCTION));
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

/// One run's merged coverage.
#[derive(Debug, Default)]
pub struct Aggregate {
    files: DashMap<Arc<str>, FileEntry>,
    /// The totals of every file, kept as merges add to them: a run's status is asked for at
    /// every finish and every change a watcher sees, and adding up 35,000 files each time was
    /// 3% of the daemon's CPU on the ingest benchmark. A std mutex: held for an addition.
    totals: Mutex<Totals>,
    tests: TestTable,
}

/// One file of an aggregate: its coverage, and which tests covered which lines when the run
/// names tests.
#[derive(Debug, Clone, Default)]
struct FileEntry {
    coverage: FileCoverage,
    tests: Option<Box<FileTests>>,
}

impl FileEntry {
    /// Adds each `(test, lines)` record; returns the tests new to the file.
    fn attribute<'a>(
        &mut self,
        records: impl IntoIterator<Item = (TestId, &'a RoaringBitmap)>,
    ) -> Vec<TestId> {
        let tests = self.tests.get_or_insert_default();
        let new = records
            .into_iter()
            .filter(|(id, lines)| tests.add(*id, lines))
            .map(|(id, _)| id)
            .collect();
        if tests.is_empty() {
            self.tests = None;
        }
        new
    }
}

impl Aggregate {
    pub fn new() -> Aggregate {
        Aggregate::default()
    }

    /// The number of files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// About how many bytes the aggregate holds, from its totals alone (so in constant time,
    /// unlike [`Aggregate::heap_bytes`]): what the memory limits are checked against before
    /// each delta. See [`estimated_bytes`].
    pub fn estimated_bytes(&self) -> usize {
        let t = self.totals();
        estimated_bytes(t.files, t.lines, t.branches, t.functions)
    }

    /// How many of the lines of `batch`'s files the aggregate does not hold yet (for the
    /// line-count limit, near it).
    pub fn count_new_lines(&self, batch: &FileBatch) -> u64 {
        batch
            .files()
            .map(|part| match self.files.get(part.path()) {
                Some(entry) => {
                    let held = entry.coverage.lines();
                    part.lines().iter().filter(|l| !held.contains(**l)).count() as u64
                }
                None => part.lines().len() as u64,
            })
            .sum()
    }

    /// How many of `paths` the aggregate does not hold yet (for the file-count limit).
    pub fn count_new<'a>(&self, paths: impl IntoIterator<Item = &'a str>) -> usize {
        paths
            .into_iter()
            .filter(|p| !self.files.contains_key(*p))
            .count()
    }

    /// Merges one file in (its tests included).
    pub fn merge_file(&self, interner: &PathInterner, path: &str, mut file: FileCoverage) {
        let named = file.take_tests();
        let records = self.test_ids(named.iter().map(|(name, lines)| (&**name, lines)));
        self.merge_with(interner, path, |entry| {
            let added = entry.coverage.merge_counted(&file);
            let new = entry.attribute(records.iter().map(|(id, lines)| (*id, *lines)));
            (added, new)
        });
    }

    /// Merges every file of a delta in, one file at a time: never holds more than one file's
    /// map shard.
    pub fn merge_batch(&self, interner: &PathInterner, batch: &FileBatch) {
        if !batch.has_tests() {
            for part in batch.files() {
                self.merge_with(interner, part.path(), |entry| {
                    (entry.coverage.merge_part(&part), Vec::new())
                });
            }
            return;
        }
        // Names are interned once per batch: the whole delta's test, and each name the files'
        // own records give (a local map, so that streams do not meet on the run's table).
        let whole = batch.test().and_then(|name| self.tests.intern(name));
        let mut ids: HashMap<&str, Option<TestId>> = HashMap::new();
        for part in batch.files() {
            let covered = whole.map(|id| (id, part.covered()));
            let mut records: Vec<(TestId, &RoaringBitmap)> = part
                .own_tests()
                .iter()
                .filter_map(|(name, lines)| {
                    let id = *ids
                        .entry(&**name)
                        .or_insert_with(|| self.tests.intern(name));
                    Some((id?, lines))
                })
                .collect();
            records.extend(covered.as_ref().map(|(id, lines)| (*id, lines)));
            self.merge_with(interner, part.path(), |entry| {
                let added = entry.coverage.merge_part(&part);
                (added, entry.attribute(records))
            });
        }
    }

    /// The ids of named records (records of tests beyond the id space are dropped).
    fn test_ids<'a>(
        &self,
        named: impl Iterator<Item = (&'a str, &'a RoaringBitmap)>,
    ) -> Vec<(TestId, &'a RoaringBitmap)> {
        named
            .filter_map(|(name, lines)| Some((self.tests.intern(name)?, lines)))
            .collect()
    }

    /// Applies `merge` to the file at `path` (new and empty if there is none), adds what it
    /// added to the totals, and records the tests it reports new to the file. When the file
    /// is a c8 placeholder, a real record replaces it and may take lines away: the file's
    /// totals are compared. (An incoming placeholder gives way to what is there: it adds
    /// nothing, and the merge says so.)
    fn merge_with(
        &self,
        interner: &PathInterner,
        path: &str,
        merge: impl FnOnce(&mut FileEntry) -> (Totals, Vec<TestId>),
    ) {
        let (path, new_tests) = if let Some(mut existing) = self.files.get_mut(path) {
            let path = existing.key().clone();
            if existing.coverage.is_placeholder() {
                let before = existing.coverage.totals();
                let (_, new) = merge(&mut existing);
                let after = existing.coverage.totals();
                drop(existing);
                let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
                *totals = totals.minus(&before);
                *totals += after;
                (path, new)
            } else {
                let (added, new) = merge(&mut existing);
                drop(existing);
                self.add_totals(added);
                (path, new)
            }
        } else {
            let (path, added, new) = match self.files.entry(interner.intern(path)) {
                Entry::Occupied(mut o) => {
                    let (added, new) = merge(o.get_mut());
                    (o.key().clone(), added, new)
                }
                Entry::Vacant(v) => {
                    let mut entry = FileEntry::default();
                    let (mut added, new) = merge(&mut entry);
                    added.files += 1;
                    (v.insert(entry).key().clone(), added, new)
                }
            };
            self.add_totals(added);
            (path, new)
        };
        if !new_tests.is_empty() {
            self.tests
                .touched(new_tests.into_iter().map(|id| (id, path.clone())));
        }
    }

    fn add_totals(&self, added: Totals) {
        if added != Totals::default() {
            *self.totals.lock().unwrap_or_else(|e| e.into_inner()) += added;
        }
    }

    pub fn clear(&self) {
        self.files.clear();
        self.tests.clear();
        *self.totals.lock().unwrap_or_else(|e| e.into_inner()) = Totals::default();
    }

    /// A copy of one file, with its tests.
    pub fn file(&self, path: &str) -> Option<FileCoverage> {
        self.files
            .get(path)
            .map(|e| self.with_tests(&e).into_owned())
    }

    /// The file's coverage with its tests by name: borrowed when it has none.
    fn with_tests<'a>(&self, entry: &'a FileEntry) -> Cow<'a, FileCoverage> {
        match &entry.tests {
            None => Cow::Borrowed(&entry.coverage),
            Some(tests) => {
                let mut file = entry.coverage.clone();
                file.set_tests(self.tests.named(tests.records()));
                Cow::Owned(file)
            }
        }
    }

    /// Every path `filter` keeps, sorted.
    pub fn paths(&self, filter: &PathFilter) -> Vec<Arc<str>> {
        let mut paths: Vec<Arc<str>> = self
            .files
            .iter()
            .filter(|e| filter.keeps(e.key()))
            .map(|e| e.key().clone())
            .collect();
        paths.sort_unstable();
        paths
    }

    /// Calls `f` for each file `filter` keeps (with its tests), in path order, holding one
    /// file's guard at a time.
    pub fn for_each_sorted<E>(
        &self,
        filter: &PathFilter,
        mut f: impl FnMut(&str, &FileCoverage) -> Result<(), E>,
    ) -> Result<(), E> {
        for path in self.paths(filter) {
            if let Some(entry) = self.files.get(&*path) {
                f(&path, &self.with_tests(&entry))?;
            }
        }
        Ok(())
    }

    /// About how many bytes the aggregate holds (see [`FileCoverage::heap_bytes`]), with the
    /// map's own entries and the run's tests; paths are shared with other runs and not
    /// counted.
    pub fn heap_bytes(&self) -> usize {
        let files: usize = self
            .files
            .iter()
            .map(|e| {
                std::mem::size_of::<(Arc<str>, FileEntry)>()
                    + 16
                    + e.value().coverage.heap_bytes()
                    + e.value()
                        .tests
                        .as_ref()
                        .map_or(0, |t| std::mem::size_of::<FileTests>() + t.heap_bytes())
            })
            .sum();
        files + self.tests.heap_bytes()
    }

    /// Totals of every file.
    pub fn totals(&self) -> Totals {
        *self.totals.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Totals of the files `filter` keeps.
    pub fn totals_of(&self, filter: &PathFilter) -> Totals {
        if filter.is_everything() {
            return self.totals();
        }
        let mut t = Totals::default();
        for e in self.files.iter().filter(|e| filter.keeps(e.key())) {
            t += e.value().coverage.totals();
        }
        t
    }

    /// `(path, totals)` of every file `filter` keeps, for rollups.
    pub fn file_totals(&self, filter: &PathFilter) -> Vec<(Arc<str>, Totals)> {
        self.files
            .iter()
            .filter(|e| filter.keeps(e.key()))
            .map(|e| (e.key().clone(), e.value().coverage.totals()))
            .collect()
    }

    /// A deep copy, for a consistent export while deltas keep arriving.
    pub fn snapshot(&self) -> Aggregate {
        Aggregate {
            files: self.files.clone(),
            totals: Mutex::new(self.totals()),
            tests: self.tests.clone(),
        }
    }

    /// How many tests the run has named.
    pub fn test_count(&self) -> usize {
        self.tests.len()
    }

    /// How many of `names` the run has not named yet (for the test-count limit).
    pub fn count_new_tests<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> usize {
        names
            .into_iter()
            .filter(|n| self.tests.id(n).is_none())
            .count()
    }

    /// Whether the label `name` names no test: the empty label, or coverage.py's static context
    /// alone (`shard1` beside `shard1|mod.test_x`), which labels code that ran before or
    /// between tests.
    pub fn runs_outside_tests(&self, name: &str) -> bool {
        name.is_empty() || self.tests.is_prefix(name)
    }

    /// Every test the run has named, in the order it first saw them.
    pub fn test_names(&self) -> Vec<Arc<str>> {
        self.tests.all()
    }

    /// The tests that covered any of `lines` (`None`: any line) of the file at `path`;
    /// `None` when the aggregate does not hold the file.
    pub fn tests_for(&self, path: &str, lines: Option<&RoaringBitmap>) -> Option<RoaringBitmap> {
        let entry = self.files.get(path)?;
        let Some(tests) = &entry.tests else {
            return Some(RoaringBitmap::new());
        };
        Some(match lines {
            Some(lines) => tests.tests_for(lines),
            None => tests.records().iter().map(|(id, _)| *id).collect(),
        })
    }

    /// The path the aggregate holds for `path`: `path` itself, or else the one path that ends
    /// with `/path` (a diff names files from the repository's root; coverage may name them
    /// under a prefix).
    pub fn find_path(&self, path: &str) -> Found<Arc<str>> {
        let exact = self.files.get(path).map(|e| e.key().clone());
        if exact.is_some() {
            return find_suffixed(path, exact, std::iter::empty());
        }
        find_suffixed(path, None, self.files.iter().map(|e| e.key().clone()))
    }

    /// The lines the file's coverage measured (covered or not), and those covered; `None`
    /// when not held.
    pub fn file_lines(&self, path: &str) -> Option<(RoaringBitmap, RoaringBitmap)> {
        self.files
            .get(path)
            .map(|e| (e.coverage.lines().clone(), e.coverage.covered().clone()))
    }

    /// Every file's measured and covered lines (see [`Aggregate::file_lines`]).
    pub fn all_file_lines(&self) -> Vec<(Arc<str>, (RoaringBitmap, RoaringBitmap))> {
        self.files
            .iter()
            .map(|e| {
                let c = &e.value().coverage;
                (e.key().clone(), (c.lines().clone(), c.covered().clone()))
            })
            .collect()
    }

    /// Per file with named tests, the lines any test covered, or any test but `except`. The
    /// empty label (code run outside any test) is no test.
    pub fn tested_lines(&self, except: Option<&str>) -> Vec<(Arc<str>, RoaringBitmap)> {
        let except = except.and_then(|name| self.tests.id(name));
        let unnamed = self.tests.id("");
        self.files
            .iter()
            .filter_map(|e| {
                let tests = e.value().tests.as_ref()?;
                let mut lines = RoaringBitmap::new();
                for (id, l) in tests.records() {
                    if Some(*id) != except && Some(*id) != unnamed {
                        lines |= l;
                    }
                }
                (!lines.is_empty()).then(|| (e.key().clone(), lines))
            })
            .collect()
    }

    /// Each test that covered any of `lines` of the file at `path`, with those of `lines` it
    /// covered, in no particular order.
    pub fn attribution_of(
        &self,
        path: &str,
        lines: &RoaringBitmap,
    ) -> Vec<(Arc<str>, RoaringBitmap)> {
        let Some(entry) = self.files.get(path) else {
            return Vec::new();
        };
        let Some(tests) = &entry.tests else {
            return Vec::new();
        };
        let records: Vec<(TestId, RoaringBitmap)> = tests
            .tests_for(lines)
            .iter()
            .filter_map(|id| Some((id, tests.lines_of(id)? & lines)))
            .collect();
        drop(entry);
        self.tests.named(&records)
    }

    /// The names of `ids` (see [`Aggregate::tests_for`]).
    pub fn names_of(&self, ids: &RoaringBitmap) -> Vec<Arc<str>> {
        self.tests.names(ids)
    }

    /// The lines test `name` covered, per file, sorted by path; `None` when the run has not
    /// seen the test.
    pub fn lines_of_test(&self, name: &str) -> Option<Vec<(Arc<str>, RoaringBitmap)>> {
        let id = self.tests.id(name)?;
        let mut files: Vec<(Arc<str>, RoaringBitmap)> = self
            .tests
            .files_of(id)
            .into_iter()
            .filter_map(|path| {
                let entry = self.files.get(&*path)?;
                let lines = entry.tests.as_ref()?.lines_of(id)?.clone();
                drop(entry);
                Some((path, lines))
            })
            .collect();
        files.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Some(files)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;
    use crate::model::{FileBatch, FileBuilder};

    fn file(lines: &[(u32, u64)]) -> FileCoverage {
        let mut b = FileBuilder::new();
        for (l, h) in lines {
            b.line(*l, *h);
        }
        b.build()
    }

    /// The totals kept as merges go equal the totals added up file by file, empty files
    /// (a source with nothing executable) included.
    #[test]
    fn kept_totals_equal_the_sum_of_the_files() {
        let agg = Aggregate::new();
        let interner = PathInterner::default();
        let shards = [
            vec![("a.c", file(&[(1, 0), (2, 3)])), ("empty.c", file(&[]))],
            vec![("a.c", file(&[(1, 2), (2, 0)])), ("empty.c", file(&[]))],
            vec![("b.c", file(&[(5, 1)])), ("a.c", file(&[(3, 1)]))],
        ];
        for shard in &shards {
            agg.merge_batch(&interner, &FileBatch::of_files(shard));
            agg.merge_file(&interner, "empty.c", file(&[]));
            let mut sum = Totals::default();
            for (_, t) in agg.file_totals(&PathFilter::default()) {
                sum += t;
            }
            assert_eq!(agg.totals(), sum);
        }
        assert_eq!(
            (
                agg.totals().files,
                agg.totals().lines,
                agg.totals().lines_covered
            ),
            (3, 4, 4)
        );
        agg.clear();
        assert_eq!(agg.totals(), Totals::default());
    }

    /// A delta: files with lines and counts, each file's own test records, and maybe a test
    /// for the whole delta.
    type Delta = (Vec<(String, FileCoverage)>, Option<String>);

    fn deltas() -> impl Strategy<Value = Vec<Delta>> {
        let test = "t[0-4]";
        let file = (
            "[ab]\\.c",
            prop::collection::btree_map(1u32..40, 0u64..3, 0..12),
            prop::collection::vec((test, prop::collection::btree_set(1u32..40, 1..6)), 0..3),
        )
            .prop_map(|(path, lines, tests)| {
                let mut b = FileBuilder::new();
                for (l, h) in &lines {
                    b.line(*l, *h);
                }
                for (name, covered) in tests {
                    let name: Arc<str> = Arc::from(name.as_str());
                    for l in covered {
                        b.test_line(&name, l);
                    }
                }
                (path, b.build())
            });
        let delta = (
            prop::collection::vec(file, 1..4),
            prop::option::of(test.prop_map(String::from)),
        );
        prop::collection::vec(delta, 1..8)
    }

    fn batch_of((files, test): &Delta) -> FileBatch {
        let mut batch = FileBatch::of_files(files);
        if let Some(name) = test {
            batch.set_test(Arc::from(name.as_str()));
        }
        batch
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Attribution kept apart in the aggregate (and merged through the fast path) reads
        /// back as the model's own merge of whole files, tests included; the index by line
        /// and the files of each test answer what those files say.
        #[test]
        fn attribution_reads_back_as_the_models_merge(deltas in deltas()) {
            let agg = Aggregate::new();
            let interner = PathInterner::default();
            let mut model: BTreeMap<String, FileCoverage> = BTreeMap::new();
            for delta in &deltas {
                let batch = batch_of(delta);
                agg.merge_batch(&interner, &batch);
                for (path, file) in batch.to_files() {
                    model.entry(path).or_default().merge(&file);
                }
            }
            for (path, file) in &model {
                prop_assert_eq!(agg.file(path), Some(file.clone()));
                for line in 1..41 {
                    let ids = agg.tests_for(path, Some(&std::iter::once(line).collect())).unwrap();
                    let mut names = agg.names_of(&ids);
                    names.sort();
                    let want: Vec<Arc<str>> = file.tests_of(line).cloned().collect();
                    prop_assert_eq!(names, want, "{} line {}", path, line);
                }
            }
            let mut tests: Vec<Arc<str>> = agg.test_names();
            tests.sort();
            for name in &tests {
                let want: Vec<(Arc<str>, RoaringBitmap)> = model
                    .iter()
                    .filter_map(|(path, file)| {
                        let (_, lines) = file.tests().iter().find(|(t, _)| t == name)?;
                        Some((Arc::from(path.as_str()), lines.clone()))
                    })
                    .collect();
                prop_assert_eq!(agg.lines_of_test(name), Some(want));
            }
            // Every test with lines is known (a test that covered nothing is known too).
            let named: BTreeSet<Arc<str>> = model
                .values()
                .flat_map(|f| f.tests().iter().map(|(t, _)| t.clone()))
                .collect();
            prop_assert!(named.iter().all(|t| tests.contains(t)));
            prop_assert_eq!(agg.lines_of_test("nobody"), None);
        }
    }

    /// Only a static context alone (a name that another test's name continues with `|`) or
    /// the empty label is outside tests.
    #[test]
    fn only_a_static_context_alone_runs_outside_tests() {
        let agg = Aggregate::new();
        let interner = PathInterner::default();
        for name in [
            "",
            "shard1",
            "shard1|m.test_a",
            "shard2x",
            "test_b",
            "a|b|c",
        ] {
            let mut batch = FileBatch::of_files(&[("a.c", file(&[(1, 1)]))]);
            batch.set_test(Arc::from(name));
            agg.merge_batch(&interner, &batch);
        }
        for (name, outside) in [
            ("", true),
            ("shard1", true),
            ("shard2x", false),
            ("test_b", false),
            ("shard1|m.test_a", false),
            ("a", true),
            ("a|b", true),
            ("a|b|c", false),
            ("shard", false),
        ] {
            assert_eq!(agg.runs_outside_tests(name), outside, "{name}");
        }
    }

    /// A snapshot carries the attribution; clearing forgets it.
    #[test]
    fn a_snapshot_keeps_tests_and_clear_drops_them() {
        let agg = Aggregate::new();
        let interner = PathInterner::default();
        let mut batch = FileBatch::of_files(&[("a.c", file(&[(1, 1), (2, 0)]))]);
        batch.set_test(Arc::from("t"));
        agg.merge_batch(&interner, &batch);
        let copy = agg.snapshot();
        assert_eq!(copy.lines_of_test("t"), agg.lines_of_test("t"));
        assert_eq!(
            agg.lines_of_test("t"),
            Some(vec![(Arc::from("a.c"), std::iter::once(1).collect())])
        );
        agg.clear();
        assert!(agg.test_names().is_empty());
        assert_eq!(agg.lines_of_test("t"), None);
        assert_eq!(copy.test_names().len(), 1);
    }
}
