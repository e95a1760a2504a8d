//! Cobertura XML out (what GitLab and Jenkins read), following the element and attribute set
//! of Cobertura's `coverage-04.dtd`: `<sources>` with one `.`, then one `<package>` per
//! directory and one `<class>` per file, with `filename` relative to that source.

use std::collections::BTreeMap;
use std::io::{self, Write};

use quick_xml::escape::escape;

use crate::model::{FileCoverage, Totals};

/// Writes a whole report. `files` must come in path order (so each directory's files are
/// consecutive); `directories` holds each directory's totals, for the package attributes that
/// precede the package's classes.
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
    directories: BTreeMap<String, Totals>,
    open_package: Option<String>,
}

fn rate(part: u64, whole: u64) -> String {
    if whole == 0 {
        // Cobertura's convention for "nothing to measure".
        return "1".into();
    }
    format!("{:.4}", part as f64 / whole as f64)
}

/// The directory of a path, as a package name: `src/a/b.c` → `src.a`; `b.c` → `.`.
fn package_of(path: &str) -> String {
    match path.rsplit_once('/') {
        Some((dir, _)) if !dir.is_empty() => dir.trim_start_matches('/').replace('/', "."),
        _ => ".".into(),
    }
}

/// Per-package totals from per-file totals.
pub fn package_totals<'a>(
    files: impl IntoIterator<Item = (&'a str, Totals)>,
) -> BTreeMap<String, Totals> {
    let mut out: BTreeMap<String, Totals> = BTreeMap::new();
    for (path, t) in files {
        *out.entry(package_of(path)).or_default() += t;
    }
    out
}

impl<W: Write> Writer<W> {
    pub fn begin(
        mut out: W,
        totals: Totals,
        directories: BTreeMap<String, Totals>,
        timestamp_ms: u64,
    ) -> io::Result<Writer<W>> {
        writeln!(out, r#"<?xml version="1.0" ?>"#)?;
        writeln!(
            out,
            r#"<!DOCTYPE coverage SYSTEM "http://cobertura.sourceforge.net/xml/coverage-04.dtd">"#
        )?;
        writeln!(
            out,
            r#"<coverage line-rate="{}" branch-rate="{}" lines-covered="{}" lines-valid="{}" branches-covered="{}" branches-valid="{}" complexity="0" version="covd {}" timestamp="{timestamp_ms}">"#,
            rate(totals.lines_covered, totals.lines),
            rate(totals.branches_taken, totals.branches),
            totals.lines_covered,
            totals.lines,
            totals.branches_taken,
            totals.branches,
            env!("CARGO_PKG_VERSION"),
        )?;
        writeln!(
            out,
            "  <sources>\n    <source>.</source>\n  </sources>\n  <packages>"
        )?;
        Ok(Writer {
            out,
            directories,
            open_package: None,
        })
    }

    pub fn file(&mut self, path: &str, file: &FileCoverage) -> io::Result<()> {
        let package = package_of(path);
        if self.open_package.as_deref() != Some(package.as_str()) {
            self.close_package()?;
            let t = self.directories.get(&package).copied().unwrap_or_default();
            writeln!(
                self.out,
                r#"    <package name="{}" line-rate="{}" branch-rate="{}" complexity="0">"#,
                escape(&package),
                rate(t.lines_covered, t.lines),
                rate(t.branches_taken, t.branches)
            )?;
            writeln!(self.out, "      <classes>")?;
            self.open_package = Some(package);
        }
        let t = file.totals();
        let name = path.rsplit('/').next().unwrap_or(path);
        let filename = path.trim_start_matches('/');
        writeln!(
            self.out,
            r#"        <class name="{}" filename="{}" line-rate="{}" branch-rate="{}" complexity="0">"#,
            escape(name),
            escape(filename),
            rate(t.lines_covered, t.lines),
            rate(t.branches_taken, t.branches)
        )?;
        self.methods(file)?;
        writeln!(self.out, "          <lines>")?;
        let mut branches = file.branches().iter().peekable();
        for (line, hits) in file.line_hits() {
            // Branches are sorted by line, like the lines.
            while branches.next_if(|(k, _)| k.line < line).is_some() {}
            let (mut total, mut taken) = (0u64, 0u64);
            while let Some((_, t)) = branches.next_if(|(k, _)| k.line == line) {
                total += 1;
                taken += u64::from(t.is_some_and(|n| n > 0));
            }
            match (taken * 100).checked_div(total) {
                None => writeln!(
                    self.out,
                    r#"            <line number="{line}" hits="{hits}" branch="false"/>"#
                )?,
                Some(percent) => writeln!(
                    self.out,
                    r#"            <line number="{line}" hits="{hits}" branch="true" condition-coverage="{percent}% ({taken}/{total})"/>"#
                )?,
            }
        }
        writeln!(self.out, "          </lines>\n        </class>")
    }

    fn methods(&mut self, file: &FileCoverage) -> io::Result<()> {
        let functions = file.functions();
        if functions.is_empty() {
            return writeln!(self.out, "          <methods/>");
        }
        writeln!(self.out, "          <methods>")?;
        for f in functions {
            let covered = u8::from(f.hits > 0);
            writeln!(
                self.out,
                r#"            <method name="{}" signature="" line-rate="{covered}" branch-rate="1" complexity="0">"#,
                escape(&*f.name)
            )?;
            if f.start_line > 0 {
                writeln!(
                    self.out,
                    r#"              <lines><line number="{}" hits="{}" branch="false"/></lines>"#,
                    f.start_line, f.hits
                )?;
            } else {
                writeln!(self.out, "              <lines/>")?;
            }
            writeln!(self.out, "            </method>")?;
        }
        writeln!(self.out, "          </methods>")
    }

    fn close_package(&mut self) -> io::Result<()> {
        if self.open_package.take().is_some() {
            writeln!(self.out, "      </classes>\n    </package>")?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.close_package()?;
        writeln!(self.out, "  </packages>\n</coverage>")?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BranchArm, BranchKey, FileBuilder};

    #[test]
    fn writes_packages_classes_lines_and_conditions() {
        let mut b = FileBuilder::new();
        b.line(1, 2);
        b.line(2, 0);
        for (i, t) in [Some(1), None].into_iter().enumerate() {
            b.branch(
                BranchKey {
                    line: 1,
                    block: 0,
                    arm: BranchArm::Index(i as u32),
                },
                t,
            );
        }
        b.function("a<b>", 1, 2, 2);
        let f = b.build();
        let files = [("src/x & y/a.c", f.clone()), ("top.c", f.clone())];
        let dirs = package_totals(files.iter().map(|(p, f)| (*p, f.totals())));
        let mut total = Totals::default();
        for (_, f) in &files {
            total += f.totals();
        }
        let mut w = Writer::begin(Vec::new(), total, dirs, 0).unwrap();
        for (p, f) in &files {
            w.file(p, f).unwrap();
        }
        let xml = String::from_utf8(w.finish().unwrap()).unwrap();
        assert!(
            xml.contains(r#"<package name="src.x &amp; y" line-rate="0.5000""#),
            "{xml}"
        );
        assert!(xml.contains(r#"filename="src/x &amp; y/a.c""#));
        assert!(xml.contains(
            r#"<line number="1" hits="2" branch="true" condition-coverage="50% (1/2)"/>"#
        ));
        assert!(xml.contains(r#"<method name="a&lt;b&gt;""#));
        assert!(xml.contains(r#"<package name="." "#));
        assert!(xml.contains(r#"lines-covered="2" lines-valid="4""#));
        // Well-formed: every element closes.
        let mut reader = quick_xml::Reader::from_str(&xml);
        while reader.read_event().unwrap() != quick_xml::events::Event::Eof {}
    }
}
