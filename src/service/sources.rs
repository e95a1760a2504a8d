//! Source texts pushed with a run (`covd push --sources`), for the dashboard's file page.
//!
//! A text is stored once, under its SHA-256, whatever number of runs name it: a push asks
//! which texts the daemon lacks and sends only those, then names each of its files' text for
//! the run. A text goes when the last run naming it is deleted or expires.

use sha2::{Digest as _, Sha256};

use crate::persist::{Digest, Write, codec};

use super::{CoverageService, Error, Result};

/// One file's source as a push names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// The file's path in the run.
    pub path: String,
    /// SHA-256 of the text (32 bytes, checked).
    pub digest: Vec<u8>,
    /// The text, when the daemon lacks it.
    pub text: Option<Vec<u8>>,
}

/// SHA-256 of a source text.
pub fn digest_of(text: &[u8]) -> Digest {
    Sha256::digest(text).into()
}

fn digest(field: &str, bytes: &[u8]) -> Result<Digest> {
    Digest::try_from(bytes).map_err(|_| {
        Error::invalid(
            field,
            format!("is {} bytes long; a SHA-256 digest is 32", bytes.len()),
        )
    })
}

impl CoverageService {
    /// The indexes of the digests whose texts the daemon lacks.
    pub async fn missing_sources(&self, digests: Vec<Vec<u8>>) -> Result<Vec<u32>> {
        let limits = self.limits();
        if digests.len() > limits.max_files_per_delta {
            return Err(limits.exceeded(
                format!("{} digests in one request", digests.len()),
                "max-files-per-delta",
                limits.max_files_per_delta,
            ));
        }
        let digests = digests
            .iter()
            .enumerate()
            .map(|(i, d)| digest(&format!("sha256[{i}]"), d))
            .collect::<Result<Vec<_>>>()?;
        let storage = self.shared.storage.clone();
        let missing = tokio::task::spawn_blocking(move || storage.missing_sources(&digests))
            .await
            .map_err(|e| Error::Unavailable(format!("reading sources failed: {e}")))??;
        Ok(missing
            .iter()
            .enumerate()
            .filter(|(_, m)| **m)
            .map(|(i, _)| i as u32)
            .collect())
    }

    /// Names the source text of some of `run_id`'s files, storing the texts given. Whole or
    /// not at all. Returns how many texts the daemon did not have.
    pub async fn put_sources(&self, run_id: &str, files: Vec<SourceFile>) -> Result<u32> {
        let run = self.run(run_id)?;
        run.state().check_live(run_id)?;
        let limits = self.limits();
        if files.len() > limits.max_files_per_delta {
            return Err(limits.exceeded(
                format!("{} source files in one request", files.len()),
                "max-files-per-delta",
                limits.max_files_per_delta,
            ));
        }
        let mut names = Vec::with_capacity(files.len());
        let mut texts = Vec::new();
        let mut seen = std::collections::HashSet::with_capacity(files.len());
        for (i, f) in files.into_iter().enumerate() {
            let field = |what: &str| format!("files[{i}].{what}");
            crate::model::path::check(&f.path)
                .map_err(|e| Error::invalid(field("path"), e.to_string()))?;
            if !seen.insert(f.path.clone()) {
                return Err(Error::invalid(
                    field("path"),
                    format!("{} comes twice in one request", f.path),
                ));
            }
            let d = digest(&field("sha256"), &f.digest)?;
            if let Some(text) = f.text {
                if text.len() > limits.max_source_bytes {
                    return Err(limits.exceeded(
                        format!("the source of {} is {} bytes", f.path, text.len()),
                        "max-source-bytes",
                        limits.max_source_bytes,
                    ));
                }
                if digest_of(&text) != d {
                    return Err(Error::invalid(
                        field("text"),
                        format!("of {} does not hash to its sha256", f.path),
                    ));
                }
                texts.push((d, text));
            }
            names.push((f.path, d));
        }
        let (service, run_id) = (self.clone(), run_id.to_owned());
        tokio::task::spawn_blocking(move || service.store_sources(&run_id, texts, names))
            .await
            .map_err(|e| Error::Unavailable(format!("storing sources failed: {e}")))?
    }

    /// Checks `names` against what the store holds, then stores them with the texts it
    /// lacks. Blocking.
    fn store_sources(
        &self,
        run_id: &str,
        texts: Vec<(Digest, Vec<u8>)>,
        names: Vec<(String, Digest)>,
    ) -> Result<u32> {
        let storage = &*self.shared.storage;
        let paths: Vec<String> = names.iter().map(|(p, _)| p.clone()).collect();
        for ((path, d), had) in names.iter().zip(storage.source_digests(run_id, &paths)?) {
            if had.is_some_and(|had| had != *d) {
                return Err(Error::FailedPrecondition(format!(
                    "run `{run_id}` already has another source text for {path}: its shards \
                     pushed different versions of the file"
                )));
            }
        }
        let given: Vec<Digest> = texts.iter().map(|(d, _)| *d).collect();
        let wanted: Vec<Digest> = names.iter().map(|(_, d)| *d).collect();
        let missing = storage.missing_sources(&wanted)?;
        if let Some(((path, _), _)) = names
            .iter()
            .zip(&missing)
            .find(|((_, d), m)| **m && !given.contains(d))
        {
            return Err(Error::FailedPrecondition(format!(
                "the daemon has no source text for {path} under that digest: send the text"
            )));
        }
        let lacking = storage.missing_sources(&given)?;
        let texts: Vec<(Digest, Vec<u8>)> = texts
            .into_iter()
            .zip(lacking)
            .filter(|(_, lacked)| *lacked)
            .map(|((d, text), _)| (d, codec::encode_source(&text)))
            .collect();
        let new_texts = texts.len() as u32;
        storage.write_blocking(vec![Write::PutSources {
            run_id: run_id.to_owned(),
            texts,
            names,
        }])?;
        Ok(new_texts)
    }

    /// The source text pushed for `path` of `run_id`, with its digest.
    pub async fn source(&self, run_id: &str, path: &str) -> Result<(Digest, Vec<u8>)> {
        self.run(run_id)?;
        let storage = self.shared.storage.clone();
        let (run, file) = (run_id.to_owned(), path.to_owned());
        tokio::task::spawn_blocking(move || storage.source(&run, &file))
            .await
            .map_err(|e| Error::Unavailable(format!("reading a source failed: {e}")))??
            .ok_or_else(|| Error::SourceNotFound {
                run: run_id.to_owned(),
                path: path.to_owned(),
            })
    }
}
