//! `covd fetch --format html`: the merged coverage as a report directory, rendered here from
//! the daemon's LCOV so that sources are read from this machine's checkout.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use covd::formats::html::{self, Pages};
use covd::formats::lcov;
use covd::model::Coverage;
use covd::service::{Differential, ExportFormat};

use super::{Failure, FetchArgs, bad_input, client, conclude, read_diff};

/// Sources larger than this are not shown (the page would be useless anyway).
const MAX_SOURCE_BYTES: u64 = 8 << 20;

/// Writes pages under one directory, and only there.
struct Directory {
    root: PathBuf,
}

impl Pages for Directory {
    fn create(&mut self, name: &str) -> io::Result<Box<dyn Write + '_>> {
        // The report names its pages itself; refuse anything else rather than trust it.
        let relative = Path::new(name);
        if relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(io::Error::other(format!("refusing page name {name:?}")));
        }
        let path = self.root.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        Ok(Box::new(BufWriter::new(File::create(path)?)))
    }
}

/// A source file under `root`, when it is there, readable and not huge.
fn read_source(root: &Path, path: &str) -> Option<String> {
    let relative = Path::new(path.trim_start_matches('/'));
    if relative
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return None;
    }
    let full = root.join(relative);
    if std::fs::metadata(&full).ok()?.len() > MAX_SOURCE_BYTES {
        return None;
    }
    let bytes = std::fs::read(full).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

pub(super) async fn fetch(a: FetchArgs) -> Result<ExitCode, Failure> {
    let out = a.output.clone().ok_or_else(|| {
        bad_input(anyhow!(
            "--format html writes a directory: give --output DIR"
        ))
    })?;
    let mut lcov_text = Vec::new();
    let header = client(&a.run.server)?
        .export_filtered(
            &a.run.run,
            ExportFormat::Lcov,
            a.wait.then_some(a.timeout),
            &a.filter.include,
            &a.filter.exclude,
            &mut lcov_text,
        )
        .await?;
    let mut reader = lcov::Reader::new(&lcov_text[..]);
    let mut coverage = Coverage::default();
    while let Some(record) = reader
        .next_record()
        .context("the daemon's LCOV did not parse")?
    {
        coverage.add(&record.path, &record.file);
    }
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let report = html::Header {
        title: format!("Coverage of {}", a.run.run),
        complete: header.complete,
        declared: header.expectations_declared,
        missing: header.missing_shards.clone(),
        base: a.base.clone(),
    };
    let baseline = match &a.base {
        Some(base) => {
            let diff = match &a.diff {
                Some(path) => Some(read_diff(path)?),
                None => None,
            };
            let d = client(&a.run.server)?
                .differential(&a.run.run, base, diff, a.strip)
                .await?;
            baseline_of(&d)
        }
        None => BTreeMap::new(),
    };
    let root = a.source_root.clone();
    html::write(
        &mut Directory { root: out.clone() },
        &report,
        &coverage,
        |path| root.as_deref().and_then(|r| read_source(r, path)),
        &baseline,
    )
    .with_context(|| format!("cannot write the report into {}", out.display()))?;
    eprintln!("report written to {}", out.join("index.html").display());
    Ok(conclude(&a, &header))
}

/// The comparison with the base, per path, as the report shows it.
fn baseline_of(d: &Differential) -> BTreeMap<String, html::Baseline> {
    d.files
        .iter()
        .map(|f| {
            let mut b = html::Baseline::default();
            for (c, lines) in &f.lines {
                b.counts.push((c.code(), lines.len()));
                if !c.in_base() {
                    b.lines.extend(lines.iter().map(|l| (l, c.code())));
                }
            }
            (f.path.to_string(), b)
        })
        .collect()
}
