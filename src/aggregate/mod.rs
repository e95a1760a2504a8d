//! The in-memory aggregate: per run, every file's merged coverage, merged concurrently by many
//! shard streams. No I/O.
//!
//! - [`Aggregate`]: files by path in a `DashMap`, so streams merging different files do not
//!   contend, and two streams merging the same file lock only that file's shard of the map.
//! - [`PathInterner`]: one allocation per distinct path across all runs; successive runs of a
//!   project name the same files, and the daemon keeps many runs.

use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::model::path::PathFilter;
use crate::model::{FileCoverage, FilePart, Totals};

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

/// One run's merged coverage.
#[derive(Debug, Default)]
pub struct Aggregate {
    files: DashMap<Arc<str>, FileCoverage>,
    /// The totals of every file, kept as merges add to them: a run's status is asked for at
    /// every finish and every change a watcher sees, and adding up 35,000 files each time was
    /// 3% of the daemon's CPU on the ingest benchmark. A std mutex: held for an addition.
    totals: Mutex<Totals>,
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

    /// How many of `paths` the aggregate does not hold yet (for the file-count limit).
    pub fn count_new<'a>(&self, paths: impl IntoIterator<Item = &'a str>) -> usize {
        paths
            .into_iter()
            .filter(|p| !self.files.contains_key(*p))
            .count()
    }

    /// Merges one file in, and returns its path as the aggregate holds it (interned). Never
    /// holds more than this file's map shard.
    pub fn merge_file(&self, interner: &PathInterner, path: &str, file: &FileCoverage) -> Arc<str> {
        self.merge_with(interner, path, file.is_placeholder(), |f| {
            f.merge_counted(file)
        })
    }

    /// Merges one file of a batch in (see [`FileCoverage::merge_part`]). Never holds more
    /// than this file's map shard.
    pub fn merge_part(&self, interner: &PathInterner, part: &FilePart<'_>) {
        self.merge_with(interner, part.path(), part.is_placeholder(), |f| {
            f.merge_part(part)
        });
    }

    /// Applies `merge` to the file at `path` (new and empty if there is none) and adds what it
    /// added to the totals. When a c8 placeholder is involved (`placeholder`: the incoming
    /// record is one), the merge may also take away, and the file's totals are compared.
    fn merge_with(
        &self,
        interner: &PathInterner,
        path: &str,
        placeholder: bool,
        merge: impl FnOnce(&mut FileCoverage) -> Totals,
    ) -> Arc<str> {
        if let Some(mut existing) = self.files.get_mut(path) {
            let path = existing.key().clone();
            if placeholder || existing.is_placeholder() {
                let before = existing.totals();
                merge(&mut existing);
                let after = existing.totals();
                drop(existing);
                let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
                *totals = totals.minus(&before);
                *totals += after;
                return path;
            }
            let added = merge(&mut existing);
            drop(existing);
            self.add_totals(added);
            return path;
        }
        let (path, added) = match self.files.entry(interner.intern(path)) {
            Entry::Occupied(mut o) => (o.key().clone(), merge(o.get_mut())),
            Entry::Vacant(v) => {
                let mut file = FileCoverage::default();
                let mut added = merge(&mut file);
                added.files += 1;
                (v.insert(file).key().clone(), added)
            }
        };
        self.add_totals(added);
        path
    }

    fn add_totals(&self, added: Totals) {
        if added != Totals::default() {
            *self.totals.lock().unwrap_or_else(|e| e.into_inner()) += added;
        }
    }

    pub fn clear(&self) {
        self.files.clear();
        *self.totals.lock().unwrap_or_else(|e| e.into_inner()) = Totals::default();
    }

    /// A copy of one file.
    pub fn file(&self, path: &str) -> Option<FileCoverage> {
        self.files.get(path).map(|f| f.clone())
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

    /// Calls `f` for each file `filter` keeps, in path order, holding one file's guard at a
    /// time.
    pub fn for_each_sorted<E>(
        &self,
        filter: &PathFilter,
        mut f: impl FnMut(&str, &FileCoverage) -> Result<(), E>,
    ) -> Result<(), E> {
        for path in self.paths(filter) {
            if let Some(file) = self.files.get(&*path) {
                f(&path, &file)?;
            }
        }
        Ok(())
    }

    /// Totals of every file.
    /// About how many bytes the aggregate holds (see [`FileCoverage::heap_bytes`]), with the
    /// map's own entries; paths are shared with other runs and not counted.
    pub fn heap_bytes(&self) -> usize {
        self.files
            .iter()
            .map(|e| std::mem::size_of::<(Arc<str>, FileCoverage)>() + 16 + e.value().heap_bytes())
            .sum()
    }

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
            t += e.value().totals();
        }
        t
    }

    /// `(path, totals)` of every file `filter` keeps, for rollups.
    pub fn file_totals(&self, filter: &PathFilter) -> Vec<(Arc<str>, Totals)> {
        self.files
            .iter()
            .filter(|e| filter.keeps(e.key()))
            .map(|e| (e.key().clone(), e.value().totals()))
            .collect()
    }

    /// A deep copy, for a consistent export while deltas keep arriving.
    pub fn snapshot(&self) -> Aggregate {
        Aggregate {
            files: self.files.clone(),
            totals: Mutex::new(self.totals()),
        }
    }
}

#[cfg(test)]
mod tests {
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
            for part in FileBatch::of_files(shard).files() {
                agg.merge_part(&interner, &part);
            }
            agg.merge_file(&interner, "empty.c", &file(&[]));
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
}
