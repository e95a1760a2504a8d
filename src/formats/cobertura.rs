//! Cobertura XML (what GitLab and Jenkins read), in and out.
//!
//! Out: the element and attribute set of Cobertura's `coverage-04.dtd`: `<sources>` with one
//! `.`, then one `<package>` per directory and one `<class>` per file, with `filename` relative
//! to that source.
//!
//! In (coverage.py, gcovr, istanbul, PHPUnit, …), streamed with quick-xml: each `<class>`
//! becomes a record for its `filename`, joined to the first `<source>` when it is relative.
//! Lines and hits are exact. Branches are exact when the report names the arms not taken
//! (coverage.py's `missing-branches`): the line's arms are then counted arms
//! ([`crate::model::COUNTED_BLOCK`]), merged by "missing iff every shard missed it". Other
//! producers give only `condition-coverage="50% (1/2)"`, so a line's arms are keyed by
//! position, the first `taken` of them counted as taken: two shards that each took one arm of
//! two merge to 1/2, a lower bound where the truth may be 2/2. `<method>`s become functions at
//! their first line.

use std::collections::BTreeMap;
use std::io::{self, BufRead, Write};

use quick_xml::escape::escape;
use quick_xml::events::Event;

use super::{ParseError, Record};
use crate::model::{FileBuilder, FileCoverage, Taken, Totals, counted_arms};

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

/// Reads a report, calling `on_record` for each class; `false` stops early.
pub fn read(
    input: impl BufRead,
    mut on_record: impl FnMut(Record) -> bool,
) -> Result<(), ParseError> {
    let mut reader = quick_xml::Reader::from_reader(input);
    let mut buf = Vec::new();
    let mut sources: Vec<String> = Vec::new();
    // The text of the <source> being read: quick-xml gives it in pieces, split at each
    // entity reference (`/srv/a&amp;b`).
    let mut source: Option<String> = None;
    let mut class: Option<(String, FileBuilder)> = None;
    let mut method: Option<(String, Option<(u32, u64)>)> = None;
    let mut saw_coverage = false;
    loop {
        let at = reader.buffer_position();
        let event = reader
            .read_event_into(&mut buf)
            .map_err(|e| ParseError::at_byte(at, format!("Cobertura XML: {e}")))?;
        let fail = |m: String| ParseError::at_byte(at, format!("Cobertura XML: {m}"));
        match event {
            Event::Eof => break,
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(event, Event::Empty(_));
                match e.local_name().as_ref() {
                    "coverage" => saw_coverage = true,
                    "source" if !empty => source = Some(String::new()),
                    "class" => {
                        let filename = super::xml_attr(e, "filename")
                            .map_err(&fail)?
                            .ok_or_else(|| fail("<class> without a filename".into()))?;
                        let path = resolve(&sources, &filename);
                        if empty {
                            if !on_record(Record::built(path, FileBuilder::new())) {
                                return Ok(());
                            }
                        } else {
                            class = Some((path, FileBuilder::new()));
                        }
                    }
                    "method" if !empty => {
                        let name = super::xml_attr(e, "name")
                            .map_err(&fail)?
                            .unwrap_or_default();
                        method = Some((name, None));
                    }
                    "line" => {
                        let number = super::xml_line(e, "number").map_err(&fail)?;
                        let hits = super::xml_count(e, "hits").map_err(&fail)?;
                        if let Some((_, first)) = &mut method {
                            // A method's lines repeat the class's: only its first line is used.
                            first.get_or_insert((number, hits));
                        } else if let Some((_, builder)) = &mut class {
                            builder.line(number, hits);
                            if let Some(cc) =
                                super::xml_attr(e, "condition-coverage").map_err(&fail)?
                            {
                                let (taken, total) = conditions(&cc).ok_or_else(|| {
                                    fail(format!("condition-coverage `{cc}` is not `N% (t/n)`"))
                                })?;
                                let missing = super::xml_attr(e, "missing-branches")
                                    .map_err(&fail)?
                                    .map(|m| missing_arms(&m, hits > 0))
                                    .unwrap_or_default();
                                if total > 0 && missing.len() == (total - taken) as usize {
                                    let arms = counted_arms(number, 0, taken as usize, missing);
                                    for (key, taken) in arms {
                                        builder.branch(key, taken);
                                    }
                                } else {
                                    super::positional_branches(
                                        builder,
                                        number,
                                        u64::from(taken),
                                        u64::from(total),
                                        hits > 0,
                                    )
                                    .map_err(&fail)?;
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            Event::Text(t) if source.is_some() => {
                if let Some(text) = &mut source {
                    text.push_str(&t.xml10_content());
                }
            }
            Event::GeneralRef(r) if source.is_some() => {
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    Ok(None) => quick_xml::escape::resolve_predefined_entity(&r)
                        .ok_or_else(|| fail(format!("source: unrecognized entity `{}`", &*r)))?
                        .to_owned(),
                    Err(e) => return Err(fail(format!("source: {e}"))),
                };
                if let Some(text) = &mut source {
                    text.push_str(&resolved);
                }
            }
            Event::End(e) => match e.local_name().as_ref() {
                "source" => {
                    if let Some(text) = source.take() {
                        sources.push(text.trim().to_owned());
                    }
                }
                "method" => {
                    if let (Some((name, Some((line, hits)))), Some((_, builder))) =
                        (method.take(), &mut class)
                        && !name.is_empty()
                    {
                        builder.function(&name, line, 0, hits);
                    }
                }
                "class" => {
                    if let Some((path, builder)) = class.take()
                        && !on_record(Record::built(path, builder))
                    {
                        return Ok(());
                    }
                }
                _ => {}
            },
            _ => {}
        }
        buf.clear();
    }
    if !saw_coverage {
        return Err(ParseError::at_byte(
            0,
            "Cobertura XML: no <coverage> element",
        ));
    }
    if class.is_some() {
        return Err(ParseError::at_byte(
            reader.buffer_position(),
            "Cobertura XML: the input ends inside a <class> (truncated?)",
        ));
    }
    Ok(())
}

fn resolve(sources: &[String], filename: &str) -> String {
    match sources.first() {
        Some(source) if !filename.starts_with('/') && !source.is_empty() && source != "." => {
            format!("{}/{}", source.trim_end_matches('/'), filename)
        }
        _ => filename.to_owned(),
    }
}

/// coverage.py's `missing-branches="27,exit"`: the destinations of the arms not taken, as
/// labels like its LCOV's (`jump to line 27`). Several exits of one line are told apart by
/// their order (`exit`, `exit 2`), which is as far as the report identifies them.
fn missing_arms(list: &str, reached: bool) -> Vec<(Box<str>, Taken)> {
    let mut exits = 0;
    list.split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| {
            let label = match d.parse::<u32>() {
                Ok(line) => format!("jump to line {line}"),
                Err(_) => {
                    exits += 1;
                    match exits {
                        1 => "exit".to_owned(),
                        n => format!("exit {n}"),
                    }
                }
            };
            (label.into_boxed_str(), reached.then_some(0))
        })
        .collect()
}

/// `"50% (1/2)"` → (1, 2).
fn conditions(cc: &str) -> Option<(u32, u32)> {
    let inner = cc.split_once('(')?.1.split_once(')')?.0;
    let (taken, total) = inner.split_once('/')?;
    let (taken, total) = (taken.trim().parse().ok()?, total.trim().parse().ok()?);
    // More than a thousand arms on one line is not a real report.
    (taken <= total && total <= 1000).then_some((taken, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BranchArm, BranchKey};

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

    fn read_all(xml: &str) -> Result<Vec<Record>, ParseError> {
        let mut out = Vec::new();
        read(xml.as_bytes(), |r| {
            out.push(r);
            true
        })?;
        Ok(out)
    }

    #[test]
    fn reads_classes_lines_conditions_and_methods() {
        let recs = read_all(
            r#"<?xml version="1.0" ?><coverage><sources><source>/src/pkg</source></sources>
            <packages><package name="."><classes>
            <class name="a.py" filename="a.py"><methods><method name="f" signature="">
              <lines><line number="2" hits="3"/></lines></method></methods>
              <lines><line number="2" hits="3"/><line number="3" hits="1" branch="true" condition-coverage="50% (1/2)"/>
              <line number="5" hits="0" branch="true" condition-coverage="0% (0/2)"/></lines></class>
            <class name="b.c" filename="/abs/b.c"/>
            </classes></package></packages></coverage>"#,
        )
        .unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].path, "/src/pkg/a.py");
        assert_eq!(recs[1].path, "/abs/b.c");
        let f = &recs[0].file;
        assert_eq!(
            f.line_hits().collect::<Vec<_>>(),
            vec![(2, 3), (3, 1), (5, 0)]
        );
        let b: Vec<_> = f.branches().iter().map(|(k, t)| (k.line, *t)).collect();
        assert_eq!(b, vec![(3, Some(1)), (3, Some(0)), (5, None), (5, None)]);
        assert_eq!(
            (
                &*f.functions()[0].name,
                f.functions()[0].start_line,
                f.functions()[0].hits
            ),
            ("f", 2, 3)
        );
    }

    #[test]
    fn named_missing_arms_merge_by_coverage_py_rule() {
        // Two shards each took a different arm of line 3; a third never ran it.
        let shard = |cc: &str, missing: &str, hits: u32| {
            let xml = format!(
                r#"<coverage><packages><package><classes><class filename="a.py"><methods/><lines>
                <line number="3" hits="{hits}" branch="true" condition-coverage="{cc}" missing-branches="{missing}"/>
                </lines></class></classes></package></packages></coverage>"#
            );
            read_all(&xml).unwrap().remove(0).file
        };
        let mut merged = shard("50% (1/2)", "4", 1);
        merged.merge(&shard("50% (1/2)", "exit", 2));
        merged.merge(&shard("0% (0/2)", "4,exit", 0));
        let t = merged.totals();
        assert_eq!((t.branches_taken, t.branches), (2, 2));
        // Both missed the exit: it stays missing, and reached (0, not `-`).
        let mut merged = shard("50% (1/2)", "exit", 1);
        merged.merge(&shard("0% (0/2)", "4,exit", 0));
        merged.merge(&shard("50% (1/2)", "exit", 5));
        let t = merged.totals();
        assert_eq!((t.branches_taken, t.branches), (1, 2));
        let missing: Vec<_> = merged
            .branches()
            .iter()
            .filter(|(k, _)| matches!(k.arm, BranchArm::Label(_)))
            .map(|(k, t)| (k.arm.to_string(), *t))
            .collect();
        assert_eq!(missing, vec![("exit".to_owned(), Some(0))]);
    }

    #[test]
    fn malformed_reports_are_errors() {
        for (xml, needle) in [
            (
                "<coverage><class filename=\"a\"><lines><line number=\"0\" hits=\"1\"/>",
                "out of range",
            ),
            (
                "<coverage><class filename=\"a\"><lines><line number=\"1\" hits=\"x\"/>",
                "not a count",
            ),
            ("<coverage><class filename=\"a\"><lines>", "truncated"),
            (
                "<coverage><class><lines/></class></coverage>",
                "without a filename",
            ),
            ("<report/>", "no <coverage>"),
            (
                "<coverage><class filename=\"a\"><lines><line number=\"1\" hits=\"1\" condition-coverage=\"half\"/>",
                "condition-coverage",
            ),
            (
                "<coverage><class filename=\"a\"></lines></class></coverage>",
                "Cobertura XML",
            ),
        ] {
            let e = read_all(xml).expect_err(xml);
            assert!(e.to_string().contains(needle), "{xml}: {e}");
        }
    }
}
