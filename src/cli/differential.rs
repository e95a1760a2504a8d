//! `covd diff`: a run against a base run in lcov 2's line categories, as text, Markdown for a
//! pull request, or JSON.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use covd::service::{Category, Differential, DifferentialFile};
use serde_json::json;

use super::attribution::ranges_of;
use super::{Failure, RunArg, client, read_diff};

#[derive(Debug, Args)]
pub(super) struct DiffArgs {
    /// The run.
    #[command(flatten)]
    run: RunArg,
    /// The base run it is compared with.
    #[arg(long)]
    base: String,
    /// The unified diff from the base's commit to the run's (`git diff BASE...HEAD`), or `-`;
    /// without it the two runs are taken to be of the same source.
    #[arg(long, value_name = "FILE|-")]
    diff: Option<PathBuf>,
    /// Leading path components to drop from the diff's paths (like `patch -p`); by default
    /// git's `a/` and `b/`.
    #[arg(long, short = 'p', value_name = "N")]
    strip: Option<u32>,
    /// `text`, `markdown` (a pull-request comment) or `json` (every line of every category).
    #[arg(long, value_enum, default_value_t = Output::Text)]
    format: Output,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Markdown,
    Json,
}

/// Categories that say something changed: a file with only CBC and UBC lines is the same as
/// in the base and is left out of the text and Markdown tables.
const CHANGED: [Category; 10] = [
    Category::Gnc,
    Category::Unc,
    Category::Gbc,
    Category::Lbc,
    Category::Gic,
    Category::Uic,
    Category::Ecb,
    Category::Eub,
    Category::Dcb,
    Category::Dub,
];

pub(super) async fn diff(a: DiffArgs) -> Result<ExitCode, Failure> {
    let diff = match &a.diff {
        Some(path) => Some(read_diff(path)?),
        None => None,
    };
    let mut c = client(&a.run.server)?;
    let d = c.differential(&a.run.run, &a.base, diff, a.strip).await?;
    let report = match a.format {
        Output::Text => text(&a.run.run, &a.base, &d),
        Output::Markdown => markdown(&a.run.run, &a.base, &d),
        Output::Json => to_json(&a.run.run, &a.base, &d).to_string() + "\n",
    };
    let _ = io::stdout().lock().write_all(report.as_bytes());
    Ok(ExitCode::SUCCESS)
}

fn totals(d: &Differential) -> BTreeMap<Category, u64> {
    let mut t = BTreeMap::new();
    for f in &d.files {
        for (c, l) in &f.lines {
            *t.entry(*c).or_default() += l.len();
        }
    }
    t
}

fn changed(f: &DifferentialFile) -> bool {
    f.lines.iter().any(|(c, _)| CHANGED.contains(c))
}

fn completeness(d: &Differential) -> &'static str {
    match (d.complete, d.base_complete) {
        (true, true) => "both complete",
        (false, true) => "the run is not complete",
        (true, false) => "the base is not complete",
        (false, false) => "neither is complete",
    }
}

fn text(run: &str, base: &str, d: &Differential) -> String {
    let mut s = format!("run {run} against base {base} ({})\n", completeness(d));
    let header: Vec<String> = Category::ALL
        .iter()
        .map(|c| format!("{:>6}", c.code()))
        .collect();
    s.push_str(&format!("{:<40}{}\n", "", header.concat()));
    let row = |label: &str, count: &dyn Fn(Category) -> u64| {
        let cells: Vec<String> = Category::ALL
            .iter()
            .map(|c| format!("{:>6}", count(*c)))
            .collect();
        format!("{label:<40}{}\n", cells.concat())
    };
    let t = totals(d);
    s.push_str(&row("total", &|c| t.get(&c).copied().unwrap_or(0)));
    for f in d.files.iter().filter(|f| changed(f)) {
        s.push_str(&row(&f.path, &|c| f.count(c)));
        for (c, label) in [
            (Category::Unc, "not covered, new"),
            (Category::Lbc, "coverage lost"),
        ] {
            if let Some((_, lines)) = f.lines.iter().find(|(k, _)| *k == c) {
                s.push_str(&format!(
                    "    {label} ({}): {}\n",
                    c.code(),
                    ranges_of(lines)
                ));
            }
        }
    }
    s
}

fn markdown(run: &str, base: &str, d: &Differential) -> String {
    let t = totals(d);
    let n = |c: Category| t.get(&c).copied().unwrap_or(0);
    let mut s = format!("### Differential coverage: `{run}` against `{base}`\n\n");
    if !(d.complete && d.base_complete) {
        s.push_str(&format!(
            "**{}**: the figures may still change.\n\n",
            completeness(d)
        ));
    }
    s.push_str(&format!(
        "New code: {} covered (GNC), {} not (UNC). Unchanged code: {} gained coverage (GBC), {} \
         lost it (LBC). Deleted code: {} was covered (DCB).\n",
        n(Category::Gnc),
        n(Category::Unc),
        n(Category::Gbc),
        n(Category::Lbc),
        n(Category::Dcb)
    ));
    let files: Vec<&DifferentialFile> = d.files.iter().filter(|f| changed(f)).collect();
    if !files.is_empty() {
        s.push_str("\n| File |");
        for c in CHANGED {
            s.push_str(&format!(" {} |", c.code()));
        }
        s.push_str(" Lost lines |\n|---|");
        s.push_str(&"---:|".repeat(CHANGED.len()));
        s.push_str("---|\n");
        for f in files {
            s.push_str(&format!("| `{}` |", f.path));
            for c in CHANGED {
                s.push_str(&format!(" {} |", f.count(c)));
            }
            let lost = f
                .lines
                .iter()
                .find(|(c, _)| *c == Category::Lbc)
                .map(|(_, l)| ranges_of(l))
                .unwrap_or_default();
            s.push_str(&format!(" {lost} |\n"));
        }
    }
    s
}

fn to_json(run: &str, base: &str, d: &Differential) -> serde_json::Value {
    let t = totals(d);
    json!({
        "run": run,
        "base": base,
        "complete": d.complete,
        "base_complete": d.base_complete,
        "totals": Category::ALL.iter().map(|c| (c.code(), t.get(c).copied().unwrap_or(0))).collect::<BTreeMap<_, _>>(),
        "files": d.files.iter().map(|f| {
            let mut o = serde_json::Map::new();
            o.insert("path".into(), json!(&*f.path));
            if let Some(b) = &f.base_path {
                o.insert("base_path".into(), json!(&**b));
            }
            for (c, l) in &f.lines {
                o.insert(c.code().into(), json!(l.iter().collect::<Vec<u32>>()));
            }
            serde_json::Value::Object(o)
        }).collect::<Vec<_>>(),
    })
}
