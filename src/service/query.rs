//! Reads of a run's aggregate: one file, one directory's rollup.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{CoverageService, DirectoryEntry, DirectorySummary, Error, Result};
use crate::model::path::PathFilter;
use crate::model::{FileCoverage, Totals};

impl CoverageService {
    /// One file's merged coverage.
    pub async fn file(&self, run_id: &str, path: &str) -> Result<FileCoverage> {
        let run = self.run(run_id)?;
        let key = path.to_owned();
        let service = self.clone();
        // The gate may be held exclusively by a rebuild or snapshot, and a run that left memory
        // is read back from storage: wait off the async threads.
        let file = tokio::task::spawn_blocking(move || {
            let aggregate = service.resident(&run)?;
            let _gate = run.gate_shared();
            Ok::<_, Error>(aggregate.file(&key))
        })
        .await
        .map_err(|e| Error::Unavailable(format!("reading the file failed: {e}")))??;
        file.ok_or_else(|| Error::FileNotFound {
            run: run_id.to_owned(),
            path: path.to_owned(),
        })
    }

    /// Totals of `dir` (empty for the root) and of each direct child.
    pub async fn directory(&self, run_id: &str, dir: &str) -> Result<DirectorySummary> {
        let run = self.run(run_id)?;
        let dir = dir.trim_end_matches('/');
        let service = self.clone();
        let files = tokio::task::spawn_blocking(move || {
            let aggregate = service.resident(&run)?;
            let _gate = run.gate_shared();
            Ok::<_, Error>(aggregate.file_totals(&PathFilter::default()))
        })
        .await
        .map_err(|e| Error::Unavailable(format!("reading the directory failed: {e}")))??;
        let mut total = Totals::default();
        // Keyed (is_file, path): directories sort before files.
        let mut children: BTreeMap<(bool, Arc<str>), Totals> = BTreeMap::new();
        for (path, totals) in files {
            let rest = if dir.is_empty() {
                &*path
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
            let full: Arc<str> = if dir.is_empty() {
                child.into()
            } else {
                format!("{dir}/{child}").into()
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
}
