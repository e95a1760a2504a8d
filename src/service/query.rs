//! Reads of a run's aggregate: one file, one directory's rollup, and per-test attribution
//! (the tests of some lines, the lines of a test, the run's tests).

use std::collections::BTreeMap;
use std::sync::Arc;

use roaring::RoaringBitmap;

use super::run::Run;
use super::{CoverageService, DirectoryEntry, DirectorySummary, Error, Result, TestsForLines};
use crate::aggregate::Aggregate;
use crate::model::path::PathFilter;
use crate::model::{FileCoverage, Totals};

impl CoverageService {
    /// One file's merged coverage.
    pub async fn file(&self, run_id: &str, path: &str) -> Result<FileCoverage> {
        let key = path.to_owned();
        let file = self.read(run_id, "the file", move |a| a.file(&key)).await?;
        file.ok_or_else(|| Error::FileNotFound {
            run: run_id.to_owned(),
            path: path.to_owned(),
        })
    }

    /// Totals of `dir` (empty for the root; `/` for the root of absolute paths) and of each
    /// direct child.
    pub async fn directory(&self, run_id: &str, dir: &str) -> Result<DirectorySummary> {
        let dir = match dir.trim_end_matches('/') {
            "" if dir.starts_with('/') => "/",
            trimmed => trimmed,
        };
        let files = self
            .read(run_id, "the directory", |a| {
                a.file_totals(&PathFilter::default())
            })
            .await?;
        let mut total = Totals::default();
        // Keyed (is_file, path): directories sort before files.
        let mut children: BTreeMap<(bool, Arc<str>), Totals> = BTreeMap::new();
        for (path, totals) in files {
            let rest = if dir.is_empty() {
                &*path
            } else if dir == "/" {
                match path.strip_prefix('/') {
                    Some(rest) => rest,
                    None => continue,
                }
            } else {
                match path.strip_prefix(dir).and_then(|r| r.strip_prefix('/')) {
                    Some(rest) => rest,
                    None => continue,
                }
            };
            total += totals;
            let (child, is_dir) = match rest.find('/') {
                // An absolute path's first component is empty: show it as `/`.
                Some(0) => ("/", true),
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            let full: Arc<str> = match dir {
                "" => child.into(),
                "/" => format!("/{child}").into(),
                _ => format!("{dir}/{child}").into(),
            };
            *children.entry((!is_dir, full)).or_default() += totals;
        }
        if total.files == 0 && !dir.is_empty() {
            return Err(Error::FileNotFound {
                run: run_id.to_owned(),
                path: dir.to_owned(),
            });
        }
        Ok(DirectorySummary {
            path: dir.to_owned(),
            totals: total,
            entries: children
                .into_iter()
                .map(|((is_file, path), totals)| DirectoryEntry {
                    path,
                    is_directory: !is_file,
                    totals,
                })
                .collect(),
        })
    }

    /// The tests that covered any of the given lines (`None`: every line of the file), by
    /// name, sorted; and the paths the run does not hold.
    pub async fn tests_for_lines(
        &self,
        run_id: &str,
        files: Vec<(String, Option<RoaringBitmap>)>,
    ) -> Result<TestsForLines> {
        self.read(run_id, "tests", move |aggregate| {
            let mut ids = RoaringBitmap::new();
            let mut unknown_files = Vec::new();
            for (path, lines) in &files {
                match aggregate.tests_for(path, lines.as_ref()) {
                    Some(tests) => ids |= tests,
                    None => unknown_files.push(path.clone()),
                }
            }
            let mut tests = aggregate.names_of(&ids);
            tests.sort_unstable();
            TestsForLines {
                tests,
                unknown_files,
            }
        })
        .await
    }

    /// The lines test `test` covered, per file, sorted by path.
    pub async fn test_lines(
        &self,
        run_id: &str,
        test: &str,
    ) -> Result<Vec<(Arc<str>, RoaringBitmap)>> {
        let name = test.to_owned();
        let lines = self
            .read(run_id, "the test", move |a| a.lines_of_test(&name))
            .await?;
        lines.ok_or_else(|| Error::TestNotFound {
            run: run_id.to_owned(),
            test: test.to_owned(),
        })
    }

    /// Every test the run has named, sorted.
    pub async fn tests(&self, run_id: &str) -> Result<Vec<Arc<str>>> {
        self.read(run_id, "tests", |aggregate| {
            let mut names = aggregate.test_names();
            names.sort_unstable();
            names
        })
        .await
    }

    /// Calls `f` with the run's aggregate, off the async threads: the gate may be held
    /// exclusively by a rebuild or snapshot, and a run that left memory is read back from
    /// storage.
    pub(super) async fn read<T: Send + 'static>(
        &self,
        run_id: &str,
        what: &str,
        f: impl FnOnce(&Aggregate) -> T + Send + 'static,
    ) -> Result<T> {
        let run: Arc<Run> = self.run(run_id)?;
        let service = self.clone();
        tokio::task::spawn_blocking(move || {
            let aggregate = service.resident(&run)?;
            let _gate = run.gate_shared();
            Ok::<_, Error>(f(&aggregate))
        })
        .await
        .map_err(|e| Error::Unavailable(format!("reading {what} failed: {e}")))?
    }
}
