//! Patch coverage: of the lines a diff adds, those the run measured (executable), and of these
//! the covered ones. The run is the coverage of the diff's new side (the head commit).

use std::sync::Arc;

use roaring::RoaringBitmap;

use super::impact::{code_extensions, is_code};
use super::{CoverageService, Result};
use crate::diff::FileChange;
use crate::model::path::Found;

/// One changed file's patch coverage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchFile {
    /// The path in the run.
    pub path: Arc<str>,
    /// Added lines the run measured.
    pub changed: RoaringBitmap,
    /// Of those, the covered ones.
    pub covered: RoaringBitmap,
}

/// The patch coverage of a diff against a run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PatchCoverage {
    /// Changed files with added lines the run measured, sorted by path.
    pub files: Vec<PatchFile>,
    /// Changed files with added lines that look like code the run measures (by extension) but
    /// that the run does not hold: left out of the figure, and named.
    pub unmeasured: Vec<String>,
    /// Changed files whose path ends several of the run's paths (a few of them named): left out
    /// of the figure, and named.
    pub ambiguous: Vec<(String, Vec<String>)>,
    /// Whether the run is complete: otherwise the figure may still rise.
    pub complete: bool,
}

impl PatchCoverage {
    /// `(covered, changed)` lines over every file.
    pub fn totals(&self) -> (u64, u64) {
        self.files.iter().fold((0, 0), |(c, n), f| {
            (c + f.covered.len(), n + f.changed.len())
        })
    }
}

impl CoverageService {
    /// The patch coverage of `diff` (from the base commit to the run's) in run `run_id`.
    pub async fn patch_coverage(
        &self,
        run_id: &str,
        diff: Vec<FileChange>,
    ) -> Result<PatchCoverage> {
        let complete = self.run_status(run_id)?.complete;
        self.read(run_id, "patch coverage", move |aggregate| {
            let code = std::cell::OnceCell::new();
            let mut answer = PatchCoverage {
                complete,
                ..PatchCoverage::default()
            };
            for change in diff.iter().filter(|c| !c.added.is_empty()) {
                let Some(new_path) = change.new_path.as_deref() else {
                    continue;
                };
                let path = match aggregate.find_path(new_path) {
                    Found::One(path) => path,
                    Found::Several(candidates) => {
                        let candidates = candidates.iter().map(|c| c.to_string()).collect();
                        answer.ambiguous.push((new_path.to_owned(), candidates));
                        continue;
                    }
                    Found::None => {
                        if is_code(new_path, code.get_or_init(|| code_extensions(aggregate))) {
                            answer.unmeasured.push(new_path.to_owned());
                        }
                        continue;
                    }
                };
                let Some(file) = aggregate.file_lines(&path) else {
                    continue;
                };
                let changed = &change.added & &file.0;
                if changed.is_empty() {
                    continue;
                }
                answer.files.push(PatchFile {
                    covered: &changed & &file.1,
                    changed,
                    path,
                });
            }
            answer.files.sort_unstable_by(|a, b| a.path.cmp(&b.path));
            answer
        })
        .await
    }
}
