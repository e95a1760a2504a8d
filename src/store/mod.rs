//! The in-memory aggregate: per run, every file's merged coverage, merged concurrently by many
//! shard streams. No I/O.
//!
//! - [`Aggregate`]: files by path in a `DashMap`, so streams merging different files do not
//!   contend, and two streams merging the same file lock only that file's shard of the map.
//! - [`PathInterner`]: one allocation per distinct path across all runs; successive runs of a
//!   project name the same files, and the daemon keeps many runs.

use std::sync::{Arc, Mutex};

use dashmap::DashMap;

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
        let (path, added) = match self.files.get_mut(path) {
            Some(mut existing) => {
                let added = existing.merge_counted(file);
                (existing.key().clone(), added)
            }
            None => {
                let mut entry = self.files.entry(interner.intern(path)).or_default();
                let added = entry.merge_counted(file);
                (entry.key().clone(), added)
            }
        };
        self.add_totals(added);
        path
    }

    /// Merges one file of a batch in (see [`FileCoverage::merge_part`]). Never holds more
    /// than this file's map shard.
    pub fn merge_part(&self, interner: &PathInterner, part: &FilePart<'_>) {
        let path = part.path();
        let added = match self.files.get_mut(path) {
            Some(mut existing) => existing.merge_part(part),
            None => self
                .files
                .entry(interner.intern(path))
                .or_default()
                .merge_part(part),
        };
        self.add_totals(added);
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
