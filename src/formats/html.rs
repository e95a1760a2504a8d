//! A static HTML report: an index with directory rollups, a page per directory and per file;
//! given the sources, a file's page shows them with covered, uncovered and partly covered
//! lines marked (like genhtml).
//!
//! Compared with a base run (`covd fetch --format html --base B`), a file's page has a column
//! with each line's category in lcov 2's terms (GNC, UNC, CBC, GBC, LBC, …) and the counts
//! above it, and the index's file rows say how many new lines went uncovered and how many
//! lost coverage.
//!
//! Pages are named by this module alone (`index.html`, `d/<n>.html`, `f/<n>.html`,
//! `style.css`) and handed to a [`Pages`] sink, so whatever the paths in the data — `..`,
//! absolute, odd characters — no page can land outside the sink's directory.

use std::collections::BTreeMap;
use std::io::{self, Write};

use crate::model::{Coverage, FileCoverage, Totals};

/// Where pages go. Names are relative, made of `[a-z0-9./]` only, without `..`.
pub trait Pages {
    fn create(&mut self, name: &str) -> io::Result<Box<dyn Write + '_>>;
}

/// What the report says about completeness.
#[derive(Debug, Clone, Default)]
pub struct Header {
    pub title: String,
    pub complete: bool,
    pub declared: bool,
    pub missing: Vec<String>,
    /// The base run the report is compared with, if any.
    pub base: Option<String>,
}

/// What the comparison with the base says of one file.
#[derive(Debug, Clone, Default)]
pub struct Baseline {
    /// Each line's category (lines numbered as in this run).
    pub lines: BTreeMap<u32, &'static str>,
    /// How many lines fall in each category, lines gone from this run included.
    pub counts: Vec<(&'static str, u64)>,
}

impl Baseline {
    fn count(&self, code: &str) -> u64 {
        self.counts
            .iter()
            .find(|(c, _)| *c == code)
            .map_or(0, |(_, n)| *n)
    }
}

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}\
td,th{padding:2px 8px;text-align:right}td.name,th.name{text-align:left}\
.bar{display:inline-block;height:.8em;background:#c33}.bar>span{display:block;height:100%;background:#3a3}\
pre{margin:0}table.src td{text-align:left;font-family:monospace;white-space:pre;padding:0 6px}\
tr.hit td.code{background:#dfd}tr.miss td.code{background:#fdd}tr.partial td.code{background:#ffd}\
td.num{color:#888;text-align:right}.warn{background:#fdd;padding:.5em}\
td.cat{font-family:monospace;color:#555}";

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "–".into();
    }
    format!("{:.1}%", part as f64 * 100.0 / whole as f64)
}

fn bar(part: u64, whole: u64) -> String {
    let width = (part * 100).checked_div(whole).unwrap_or(100);
    format!(r#"<span class="bar" style="width:100px"><span style="width:{width}px"></span></span>"#)
}

/// A directory of the tree: its children (by name) and its totals.
#[derive(Default)]
struct Dir {
    totals: Totals,
    dirs: BTreeMap<String, Dir>,
    files: BTreeMap<String, (usize, Totals)>,
    id: usize,
}

/// Writes the whole report. `source` returns a file's text when it is available; `baseline`
/// holds the comparison with `header.base`, by path.
pub fn write(
    pages: &mut impl Pages,
    header: &Header,
    coverage: &Coverage,
    mut source: impl FnMut(&str) -> Option<String>,
    baseline: &BTreeMap<String, Baseline>,
) -> io::Result<()> {
    pages.create("style.css")?.write_all(STYLE.as_bytes())?;
    let mut root = Dir::default();
    let files: Vec<(&String, &FileCoverage)> = coverage.files.iter().collect();
    for (index, (path, file)) in files.iter().enumerate() {
        let t = file.totals();
        let mut dir = &mut root;
        dir.totals += t;
        let mut parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let name = parts.pop().unwrap_or(path.as_str());
        for part in parts {
            dir = dir.dirs.entry(part.to_owned()).or_default();
            dir.totals += t;
        }
        dir.files.insert(name.to_owned(), (index, t));
    }
    let mut next = 0;
    number(&mut root, &mut next);
    write_dir(pages, header, &root, "", baseline, &files)?;
    for (index, (path, file)) in files.iter().enumerate() {
        let text = source(path);
        let base = header
            .base
            .as_ref()
            .map(|_| baseline.get(*path).cloned().unwrap_or_default());
        write_file(
            pages,
            header,
            index,
            path,
            file,
            text.as_deref(),
            base.as_ref(),
        )?;
    }
    Ok(())
}

fn number(dir: &mut Dir, next: &mut usize) {
    dir.id = *next;
    *next += 1;
    for d in dir.dirs.values_mut() {
        number(d, next);
    }
}

fn dir_page(id: usize) -> String {
    if id == 0 {
        "index.html".into()
    } else {
        format!("d/{id}.html")
    }
}

/// From a page at `depth` (0 for index.html, 1 for d/ and f/) to the report's root.
fn up(depth: usize) -> &'static str {
    if depth == 0 { "" } else { "../" }
}

fn open(w: &mut dyn Write, header: &Header, title: &str, depth: usize) -> io::Result<()> {
    write!(
        w,
        r#"<!DOCTYPE html><html><head><meta charset="utf-8"><title>{}</title><link rel="stylesheet" href="{}style.css"></head><body><h1>{}</h1>"#,
        escape(title),
        up(depth),
        escape(title)
    )?;
    if header.complete {
        write!(w, "<p>Complete: every expected shard finished.</p>")?;
    } else if !header.declared {
        write!(
            w,
            r#"<p class="warn">Completeness unknown: the run declared no expected shards.</p>"#
        )?;
    } else {
        write!(
            w,
            r#"<p class="warn">Incomplete: missing shards {}.</p>"#,
            escape(&header.missing.join(", "))
        )?;
    }
    Ok(())
}

fn totals_table(w: &mut dyn Write, t: &Totals) -> io::Result<()> {
    write!(
        w,
        "<table><tr><th></th><th>covered</th><th>total</th><th>%</th></tr>"
    )?;
    for (name, part, whole) in [
        ("Lines", t.lines_covered, t.lines),
        ("Branches", t.branches_taken, t.branches),
        ("Functions", t.functions_hit, t.functions),
    ] {
        write!(
            w,
            "<tr><td class=\"name\">{name}</td><td>{part}</td><td>{whole}</td><td>{}</td></tr>",
            percent(part, whole)
        )?;
    }
    write!(w, "</table>")
}

/// A table row, left open for more cells.
fn row(w: &mut dyn Write, link: &str, name: &str, t: &Totals) -> io::Result<()> {
    write!(
        w,
        r#"<tr><td class="name"><a href="{link}">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"#,
        escape(name),
        bar(t.lines_covered, t.lines),
        percent(t.lines_covered, t.lines),
        percent(t.branches_taken, t.branches),
        percent(t.functions_hit, t.functions)
    )
}

fn write_dir(
    pages: &mut impl Pages,
    header: &Header,
    dir: &Dir,
    path: &str,
    baseline: &BTreeMap<String, Baseline>,
    files: &[(&String, &FileCoverage)],
) -> io::Result<()> {
    {
        let mut w = pages.create(&dir_page(dir.id))?;
        let page_depth = usize::from(dir.id != 0);
        let title = if path.is_empty() {
            header.title.clone()
        } else {
            format!("{} — {path}", header.title)
        };
        open(&mut w, header, &title, page_depth)?;
        if dir.id != 0 {
            write!(w, r#"<p><a href="../index.html">top</a></p>"#)?;
        }
        totals_table(&mut w, &dir.totals)?;
        write!(
            w,
            r#"<table><tr><th class="name">name</th><th></th><th>lines</th><th>branches</th><th>functions</th>{}</tr>"#,
            if header.base.is_some() {
                "<th>new uncovered (UNC)</th><th>lost (LBC)</th>"
            } else {
                ""
            }
        )?;
        let prefix = up(page_depth);
        for (name, d) in &dir.dirs {
            row(
                &mut w,
                &format!("{prefix}{}", dir_page(d.id)),
                &format!("{name}/"),
                &d.totals,
            )?;
            let cells = if header.base.is_some() {
                "<td></td><td></td>"
            } else {
                ""
            };
            write!(w, "{cells}</tr>")?;
        }
        for (name, (index, t)) in &dir.files {
            row(&mut w, &format!("{prefix}f/{index}.html"), name, t)?;
            if header.base.is_some() {
                let b = baseline.get(files[*index].0);
                let n = |code| b.map_or(0, |b| b.count(code));
                write!(w, "<td>{}</td><td>{}</td>", n("UNC"), n("LBC"))?;
            }
            write!(w, "</tr>")?;
        }
        write!(w, "</table></body></html>")?;
    }
    for (name, d) in &dir.dirs {
        let child = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}/{name}")
        };
        write_dir(pages, header, d, &child, baseline, files)?;
    }
    Ok(())
}

fn write_file(
    pages: &mut impl Pages,
    header: &Header,
    index: usize,
    path: &str,
    file: &FileCoverage,
    source: Option<&str>,
    base: Option<&Baseline>,
) -> io::Result<()> {
    let mut w = pages.create(&format!("f/{index}.html"))?;
    open(&mut w, header, &format!("{} — {path}", header.title), 1)?;
    write!(w, r#"<p><a href="../index.html">top</a></p>"#)?;
    totals_table(&mut w, &file.totals())?;
    if let (Some(base), Some(name)) = (base, &header.base) {
        let counts: Vec<String> = base
            .counts
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        write!(
            w,
            "<p>Against base {}: {}</p>",
            escape(name),
            if counts.is_empty() {
                "no line to compare".to_owned()
            } else {
                counts.join(" · ")
            }
        )?;
    }
    // The base column's cell of a line, and its header.
    let category = |line: u32| match base {
        Some(b) => format!(
            r#"<td class="cat">{}</td>"#,
            b.lines.get(&line).copied().unwrap_or("")
        ),
        None => String::new(),
    };
    let category_header = if base.is_some() {
        "<th>vs base</th>"
    } else {
        ""
    };
    if !file.functions().is_empty() {
        write!(
            w,
            r#"<h2>Functions</h2><table><tr><th class="name">function</th><th>line</th><th>hits</th></tr>"#
        )?;
        for f in file.functions() {
            write!(
                w,
                r#"<tr><td class="name">{}</td><td>{}</td><td>{}</td></tr>"#,
                escape(&f.name),
                f.start_line,
                f.hits
            )?;
        }
        write!(w, "</table>")?;
    }
    // line -> (branches, taken)
    let mut branches: BTreeMap<u32, (u32, u32)> = BTreeMap::new();
    for (k, taken) in file.branches() {
        let e = branches.entry(k.line).or_default();
        e.0 += 1;
        e.1 += u32::from(taken.is_some_and(|n| n > 0));
    }
    let class = |line: u32| -> (&'static str, String, String) {
        match file.hits_of(line) {
            None => ("", String::new(), String::new()),
            Some(hits) => {
                let b = branches.get(&line).copied();
                let partial = b.is_some_and(|(n, t)| t < n);
                let class = if hits == 0 {
                    "miss"
                } else if partial {
                    "partial"
                } else {
                    "hit"
                };
                let b = b.map(|(n, t)| format!("{t}/{n}")).unwrap_or_default();
                (class, hits.to_string(), b)
            }
        }
    };
    write!(
        w,
        r#"<h2>Lines</h2><table class="src"><tr><th>line</th><th>hits</th><th>branches</th>{category_header}<th></th></tr>"#
    )?;
    match source {
        Some(text) => {
            for (i, code) in text.lines().enumerate() {
                let line = i as u32 + 1;
                let (c, hits, b) = class(line);
                write!(
                    w,
                    r#"<tr class="{c}"><td class="num">{line}</td><td class="num">{hits}</td><td class="num">{b}</td>{}<td class="code">{}</td></tr>"#,
                    category(line),
                    escape(code)
                )?;
            }
        }
        None => {
            for (line, _) in file.line_hits() {
                let (c, hits, b) = class(line);
                write!(
                    w,
                    r#"<tr class="{c}"><td class="num">{line}</td><td class="num">{hits}</td><td class="num">{b}</td>{}<td class="code"></td></tr>"#,
                    category(line)
                )?;
            }
        }
    }
    write!(w, "</table></body></html>")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FileBuilder;

    struct Memory(BTreeMap<String, Vec<u8>>);

    impl Pages for Memory {
        fn create(&mut self, name: &str) -> io::Result<Box<dyn Write + '_>> {
            Ok(Box::new(self.0.entry(name.to_owned()).or_default()))
        }
    }

    #[test]
    fn page_names_never_come_from_the_data() {
        let mut c = Coverage::default();
        let mut b = FileBuilder::new();
        b.line(1, 1);
        let f = b.build();
        for p in [
            "../../etc/passwd",
            "/abs/x.c",
            "a/<script>.c",
            "a/b/../c.c",
            "",
        ] {
            c.add(p, &f);
        }
        let mut pages = Memory(BTreeMap::new());
        write(
            &mut pages,
            &Header::default(),
            &c,
            |_| None,
            &BTreeMap::new(),
        )
        .unwrap();
        for name in pages.0.keys() {
            let ok = name == "index.html"
                || name == "style.css"
                || (name.starts_with("d/") || name.starts_with("f/"))
                    && name[2..]
                        .trim_end_matches(".html")
                        .chars()
                        .all(|c| c.is_ascii_digit());
            assert!(ok, "page name {name}");
        }
        let index = String::from_utf8(pages.0["index.html"].clone()).unwrap();
        assert!(!index.contains("<script>"));
        assert!(
            index.contains("&lt;script&gt;")
                || pages
                    .0
                    .values()
                    .any(|p| String::from_utf8_lossy(p).contains("&lt;script&gt;.c"))
        );
    }
}
