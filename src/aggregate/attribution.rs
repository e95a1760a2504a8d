//! Per-test attribution of one run: which lines each test covered, answered both ways ("which
//! tests ran these lines of file F", "which lines did test T run") without walking the run.
//!
//! - [`TestTable`]: the run's tests interned to dense ids, each with the files it touched, so
//!   that a test's lines are found by visiting only its own files.
//! - [`FileTests`]: one file's records (test id, lines), sorted by id: a merge adds a record
//!   by appending (ids grow as tests arrive) or by uniting lines. The index by line that
//!   answers "which tests ran line L" is built on the first such question and dropped by the
//!   next merge into the file.
//!
//! Attribution is kept apart from the coverage it came with, so that a delta with test names
//! merges its lines through the same fast path as one without, and a run that sends no names
//! pays one empty pointer per file.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock, RwLock};

use roaring::RoaringBitmap;

/// A test's number within its run.
pub type TestId = u32;

/// The tests of one run.
#[derive(Debug, Default)]
pub struct TestTable {
    inner: RwLock<Tests>,
}

#[derive(Debug, Default, Clone)]
struct Tests {
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, TestId>,
    /// The files each test touched, by id; a path is listed once per test.
    files: Vec<Vec<Arc<str>>>,
    /// Every part of a name before a `|` (`shard1` of `shard1|mod.test_x`): coverage.py's
    /// static context, which alone labels code that ran outside any test.
    prefixes: HashSet<Box<str>>,
    /// Bytes of the names, for the memory budget.
    name_bytes: usize,
}

impl Clone for TestTable {
    fn clone(&self) -> TestTable {
        TestTable {
            inner: RwLock::new(self.read().clone()),
        }
    }
}

impl TestTable {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tests> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tests> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The id of `name`, given one if the run has not seen it. Returns `None` when the run
    /// holds as many tests as ids can number.
    pub fn intern(&self, name: &str) -> Option<TestId> {
        if let Some(id) = self.read().ids.get(name) {
            return Some(*id);
        }
        let mut tests = self.write();
        if let Some(id) = tests.ids.get(name) {
            return Some(*id);
        }
        let id = TestId::try_from(tests.names.len()).ok()?;
        let name: Arc<str> = Arc::from(name);
        tests.name_bytes += name.len();
        for (at, _) in name.match_indices('|') {
            if !tests.prefixes.contains(&name[..at]) {
                tests.name_bytes += at;
                tests.prefixes.insert(name[..at].into());
            }
        }
        tests.names.push(name.clone());
        tests.ids.insert(name, id);
        tests.files.push(Vec::new());
        Some(id)
    }

    /// The id of `name`, if the run has seen it.
    pub fn id(&self, name: &str) -> Option<TestId> {
        self.read().ids.get(name).copied()
    }

    /// The name of each id in `ids` that the run knows, in id order.
    pub fn names(&self, ids: &RoaringBitmap) -> Vec<Arc<str>> {
        let tests = self.read();
        ids.iter()
            .filter_map(|id| tests.names.get(id as usize).cloned())
            .collect()
    }

    /// `records` with each test's name for its id (under one lock; unknown ids are left out).
    pub fn named<T: Clone>(&self, records: &[(TestId, T)]) -> Vec<(Arc<str>, T)> {
        let tests = self.read();
        records
            .iter()
            .filter_map(|(id, x)| Some((tests.names.get(*id as usize)?.clone(), x.clone())))
            .collect()
    }

    /// Every test's name, in id order (the order the run first saw them).
    pub fn all(&self) -> Vec<Arc<str>> {
        self.read().names.clone()
    }

    /// Whether some test's name is `name` followed by `|` and more: `name` alone is then
    /// coverage.py's static context, not a test.
    pub fn is_prefix(&self, name: &str) -> bool {
        self.read().prefixes.contains(name)
    }

    /// How many tests the run has seen.
    pub fn len(&self) -> usize {
        self.read().names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().names.is_empty()
    }

    /// Records that each test touched its file for the first time.
    pub fn touched(&self, touches: impl IntoIterator<Item = (TestId, Arc<str>)>) {
        let mut tests = self.write();
        for (id, path) in touches {
            if let Some(files) = tests.files.get_mut(id as usize) {
                files.push(path);
            }
        }
    }

    /// The files a test touched, in the order it first touched them.
    pub fn files_of(&self, id: TestId) -> Vec<Arc<str>> {
        self.read()
            .files
            .get(id as usize)
            .cloned()
            .unwrap_or_default()
    }

    pub fn clear(&self) {
        *self.write() = Tests::default();
    }

    /// About how many bytes of heap the table holds.
    pub fn heap_bytes(&self) -> usize {
        let tests = self.read();
        let per_test = std::mem::size_of::<Arc<str>>() * 2
            + std::mem::size_of::<TestId>()
            + std::mem::size_of::<Vec<Arc<str>>>();
        let touches: usize = tests.files.iter().map(Vec::capacity).sum();
        tests.name_bytes
            + tests.names.capacity() * per_test
            + touches * std::mem::size_of::<Arc<str>>()
    }
}

/// One file's attribution: the lines of the file each test covered.
#[derive(Debug, Default)]
pub struct FileTests {
    /// Sorted by id, no empty line sets.
    records: Vec<(TestId, RoaringBitmap)>,
    index: OnceLock<LineIndex>,
}

impl Clone for FileTests {
    fn clone(&self) -> FileTests {
        FileTests {
            records: self.records.clone(),
            index: OnceLock::new(),
        }
    }
}

impl FileTests {
    /// Adds `lines` to what test `id` covered; returns whether the test is new to the file.
    pub fn add(&mut self, id: TestId, lines: &RoaringBitmap) -> bool {
        if lines.is_empty() {
            return false;
        }
        self.index.take();
        // Tests get ids as the run first sees them, so a new record nearly always goes last.
        if self.records.last().is_none_or(|(last, _)| *last < id) {
            self.records.push((id, lines.clone()));
            return true;
        }
        match self.records.binary_search_by_key(&id, |(t, _)| *t) {
            Ok(i) => {
                self.records[i].1 |= lines;
                false
            }
            Err(i) => {
                self.records.insert(i, (id, lines.clone()));
                true
            }
        }
    }

    /// `(test, lines)`, by id.
    pub fn records(&self) -> &[(TestId, RoaringBitmap)] {
        &self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The lines test `id` covered in this file.
    pub fn lines_of(&self, id: TestId) -> Option<&RoaringBitmap> {
        self.records
            .binary_search_by_key(&id, |(t, _)| *t)
            .ok()
            .map(|i| &self.records[i].1)
    }

    /// The tests that covered any of `lines`.
    pub fn tests_for(&self, lines: &RoaringBitmap) -> RoaringBitmap {
        let index = self.index.get_or_init(|| LineIndex::build(&self.records));
        index.tests_for(lines)
    }

    /// About how many bytes of heap the file's attribution holds (the records; an index is
    /// transient).
    pub fn heap_bytes(&self) -> usize {
        self.records.capacity() * std::mem::size_of::<(TestId, RoaringBitmap)>()
            + self
                .records
                .iter()
                .map(|(_, lines)| lines.serialized_size())
                .sum::<usize>()
    }
}

/// For each line some test covered, the set of tests that covered it. Lines covered by the
/// same tests (a function's body, most often) share one set: a class.
#[derive(Debug)]
struct LineIndex {
    lines: RoaringBitmap,
    /// The class of each line of `lines`, by rank.
    class_of: Vec<u32>,
    classes: Vec<RoaringBitmap>,
}

impl LineIndex {
    fn build(records: &[(TestId, RoaringBitmap)]) -> LineIndex {
        let mut lines = RoaringBitmap::new();
        for (_, covered) in records {
            lines |= covered;
        }
        let (Some(min), Some(max)) = (lines.min(), lines.max()) else {
            return LineIndex {
                lines,
                class_of: Vec::new(),
                classes: Vec::new(),
            };
        };
        // Each line's position in `lines`: from a table over the file's span when the span is
        // not much larger than the lines (source files nearly always), else from roaring's
        // rank, a search per line.
        let span = (max - min) as usize + 1;
        let table: Option<Vec<u32>> = (span <= 8 * lines.len() as usize + 1024).then(|| {
            let mut table = vec![0; span];
            for (rank, line) in lines.iter().enumerate() {
                table[(line - min) as usize] = rank as u32;
            }
            table
        });
        let position = |line: u32| match &table {
            Some(t) => t[(line - min) as usize] as usize,
            None => lines.rank(line) as usize - 1,
        };
        // Records come by ascending id, so each line's list is ascending.
        let mut per_line: Vec<Vec<TestId>> = vec![Vec::new(); lines.len() as usize];
        for (id, covered) in records {
            for line in covered {
                per_line[position(line)].push(*id);
            }
        }
        let mut class_ids: HashMap<&[TestId], u32> = HashMap::new();
        let mut classes = Vec::new();
        let mut class_of = Vec::with_capacity(per_line.len());
        for ids in &per_line {
            let class = *class_ids.entry(ids.as_slice()).or_insert_with(|| {
                classes.push(
                    RoaringBitmap::from_sorted_iter(ids.iter().copied())
                        .expect("ids of records sorted by id are ascending"),
                );
                classes.len() as u32 - 1
            });
            class_of.push(class);
        }
        LineIndex {
            lines,
            class_of,
            classes,
        }
    }

    fn tests_for(&self, lines: &RoaringBitmap) -> RoaringBitmap {
        let mut seen = RoaringBitmap::new();
        for line in &self.lines & lines {
            seen.insert(self.class_of[self.lines.rank(line) as usize - 1]);
        }
        let mut tests = RoaringBitmap::new();
        for class in seen {
            tests |= &self.classes[class as usize];
        }
        tests
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(lines: &[u32]) -> RoaringBitmap {
        lines.iter().copied().collect()
    }

    #[test]
    fn a_test_is_numbered_once() {
        let table = TestTable::default();
        assert_eq!(table.intern("a"), Some(0));
        assert_eq!(table.intern("b"), Some(1));
        assert_eq!(table.intern("a"), Some(0));
        assert_eq!(table.id("b"), Some(1));
        assert_eq!(table.id("c"), None);
        assert_eq!(table.len(), 2);
        assert_eq!(
            table.names(&set(&[1, 0, 7])),
            [Arc::from("a"), Arc::from("b")]
        );
    }

    #[test]
    fn records_stay_sorted_and_unite_lines() {
        let mut file = FileTests::default();
        assert!(file.add(5, &set(&[1, 2])));
        assert!(file.add(2, &set(&[3])));
        assert!(!file.add(5, &set(&[4])));
        assert!(!file.add(9, &RoaringBitmap::new()));
        let ids: Vec<TestId> = file.records().iter().map(|(t, _)| *t).collect();
        assert_eq!(ids, [2, 5]);
        assert_eq!(file.lines_of(5), Some(&set(&[1, 2, 4])));
        assert_eq!(file.lines_of(9), None);
    }

    /// The index answers what a walk of every record answers, and a merge after a question
    /// is seen by the next question.
    #[test]
    fn the_line_index_answers_as_the_records_do() {
        // Close lines take the table path; far-apart ones (the third record) roaring's rank.
        let spans: [&[u32]; 4] = [&[1, 2, 3, 10], &[2, 3], &[3, 1_000_000], &[10, 11]];
        for far in [false, true] {
            let mut file = FileTests::default();
            for (id, lines) in spans.iter().enumerate() {
                if far || id != 2 {
                    file.add(id as TestId, &set(lines));
                }
            }
            check_index(&mut file);
        }
    }

    fn check_index(file: &mut FileTests) {
        let walk = |file: &FileTests, lines: &RoaringBitmap| -> RoaringBitmap {
            file.records()
                .iter()
                .filter(|(_, l)| !l.is_disjoint(lines))
                .map(|(t, _)| *t)
                .collect()
        };
        for query in [&[3][..], &[2], &[11], &[4, 5], &[1_000_000], &[1, 11]] {
            let query = set(query);
            assert_eq!(file.tests_for(&query), walk(file, &query), "{query:?}");
        }
        file.add(7, &set(&[4]));
        assert_eq!(file.tests_for(&set(&[4])), set(&[7]));
    }
}
