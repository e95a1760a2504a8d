//! PHPUnit's XML coverage report in (`phpunit --coverage-xml DIR`, php-code-coverage's XML
//! writer): a directory with `index.xml` (the project's source directory, the tests, the
//! files) and one `NAME.xml` per source file whose `<coverage>` lists, for each line that
//! ran, the tests that ran it.
//!
//! The report never lists a line that did not run, only how many lines are executable, so it
//! cannot say what is not covered. covd reads it for the tests of each line and takes lines
//! and counts from the same run's Clover report: [`attach`] puts a file's tests on that
//! report's record, after checking that both describe the same run (the same number of
//! executable lines, the same lines covered).

use std::collections::HashMap;
use std::io::BufRead;
use std::sync::Arc;

use quick_xml::events::Event;
use roaring::RoaringBitmap;

use super::{ParseError, xml_attr, xml_line};
use crate::model::FileCoverage;

/// The namespace of the report's elements.
const NAMESPACE: &str = "https://schema.phpunit.de/coverage/1.0";

/// Whether a file starts like a part of a PHPUnit XML report (`index.xml` or a file's).
pub fn detect(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    text.contains("<phpunit") && text.contains(NAMESPACE)
}

/// What `index.xml` says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Index {
    /// The project's source directory, as the run saw it (`<project source>`).
    pub source: String,
    /// Per source file: its path as the run saw it (the source directory joined with the
    /// `<directory>`s and the file's `name`), and its report, relative to the report's
    /// directory (`href`).
    pub files: Vec<(String, String)>,
    /// The tests the run recorded (`<tests>`); a skipped test is not among them.
    pub tests: Vec<String>,
    /// The tools of the run and their versions (`<build>`): `phpunit`, `php-code-coverage`,
    /// the runtime (`php`) and the coverage driver (`pcov`, `xdebug`).
    pub tools: Vec<(String, String)>,
}

/// Reads `index.xml`.
pub fn read_index(input: impl BufRead) -> Result<Index, ParseError> {
    let mut index = Index::default();
    let mut saw_project = false;
    // The `<directory>`s the reader is in: the outermost is the source directory itself.
    let mut dirs: Vec<String> = Vec::new();
    read_elements(input, "index.xml", |name, e| {
        let Some(e) = e else {
            if name == "directory" {
                dirs.pop();
            }
            return Ok(());
        };
        match name {
            "project" => {
                saw_project = true;
                index.source = xml_attr(e, "source")?.ok_or("<project> without `source`")?;
            }
            "test" => index
                .tests
                .push(xml_attr(e, "name")?.ok_or("<test> without `name`")?),
            "build" => {
                for (attr, tool) in [("phpunit", "phpunit"), ("coverage", "php-code-coverage")] {
                    if let Some(version) = xml_attr(e, attr)? {
                        index.tools.push((tool.to_owned(), version));
                    }
                }
            }
            "runtime" | "driver" => {
                if let (Some(name), Some(version)) = (xml_attr(e, "name")?, xml_attr(e, "version")?)
                {
                    index.tools.push((name.to_ascii_lowercase(), version));
                }
            }
            "directory" => dirs.push(xml_attr(e, "name")?.unwrap_or_default()),
            "file" => {
                let file = xml_attr(e, "name")?.ok_or("<file> without `name`")?;
                let href = xml_attr(e, "href")?.ok_or("<file> without `href`")?;
                let dir = dirs.get(1..).unwrap_or_default().join("/");
                index.files.push((join(&index.source, &dir, &file), href));
            }
            _ => {}
        }
        Ok(())
    })?;
    if !saw_project {
        return Err(ParseError::at_byte(
            0,
            "PHPUnit XML index.xml: no <project> element",
        ));
    }
    Ok(index)
}

/// One source file's report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileTests {
    /// The file's path as the run saw it: the project's source directory joined with the
    /// file's `path` and `name`, as the Clover report of the same run names it.
    pub path: String,
    /// How many lines are executable (`<totals><lines executable>`).
    pub executable: u64,
    /// The lines that ran.
    pub covered: RoaringBitmap,
    /// Per test, the lines it ran.
    pub tests: Vec<(Arc<str>, RoaringBitmap)>,
}

/// Reads a file's report (`NAME.xml`); `source` is the index's source directory.
pub fn read_file(input: impl BufRead, source: &str) -> Result<FileTests, ParseError> {
    let mut file = FileTests::default();
    let mut saw_file = false;
    let mut saw_lines = false;
    let mut line = None;
    let mut in_totals = false;
    // `<coverage>` holds the lines that ran; `<source>`, after it, the tokens of every line.
    let mut in_coverage = false;
    let mut tests: HashMap<String, RoaringBitmap> = HashMap::new();
    read_elements(input, "file report", |name, e| {
        let Some(e) = e else {
            match name {
                "totals" => in_totals = false,
                "coverage" => in_coverage = false,
                "line" => line = None,
                _ => {}
            }
            return Ok(());
        };
        match name {
            "file" => {
                let base = xml_attr(e, "name")?.ok_or("<file> without `name`")?;
                let dir = xml_attr(e, "path")?.unwrap_or_default();
                file.path = join(source, &dir, &base);
                saw_file = true;
            }
            "totals" => in_totals = true,
            "coverage" => in_coverage = true,
            // `<totals><lines>` counts the file's lines; a `<line>` in `<coverage>` is one.
            "lines" if in_totals => {
                let v = xml_attr(e, "executable")?.ok_or("<lines> without `executable`")?;
                file.executable = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("executable line count `{v}` is not a count"))?;
                saw_lines = true;
            }
            "line" if in_coverage => {
                let nr = xml_line(e, "nr")?;
                file.covered.insert(nr);
                line = Some(nr);
            }
            "covered" => {
                let nr = line.ok_or("<covered> outside a <line>")?;
                let by = xml_attr(e, "by")?.ok_or("<covered> without `by`")?;
                tests.entry(by).or_default().insert(nr);
            }
            _ => {}
        }
        Ok(())
    })?;
    if !saw_file {
        return Err(ParseError::at_byte(
            0,
            "PHPUnit XML file report: no <file> element",
        ));
    }
    if !saw_lines {
        return Err(ParseError::at_byte(
            0,
            "PHPUnit XML file report: no <totals><lines executable=…> (how many lines are executable)",
        ));
    }
    let mut tests: Vec<(Arc<str>, RoaringBitmap)> = tests
        .into_iter()
        .map(|(name, lines)| (Arc::from(name), lines))
        .collect();
    tests.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    file.tests = tests;
    Ok(file)
}

/// `source/dir/name`, with one `/` between the parts.
fn join(source: &str, dir: &str, name: &str) -> String {
    let mut path = source.trim_end_matches('/').to_owned();
    for part in [dir.trim_matches('/'), name.trim_start_matches('/')] {
        if !part.is_empty() {
            path.push('/');
            path.push_str(part);
        }
    }
    path
}

/// Calls `on_element` with the local name of each element where it starts (`Some`: its
/// attributes) and where it ends (`None`; an empty element gives both), in order, and checks that the document is PHPUnit's (its root is `<phpunit>` in the report namespace).
fn read_elements(
    input: impl BufRead,
    what: &str,
    mut on_element: impl FnMut(&str, Option<&quick_xml::events::BytesStart<'_>>) -> Result<(), String>,
) -> Result<(), ParseError> {
    let mut reader = quick_xml::Reader::from_reader(input);
    let mut buf = Vec::new();
    let mut root = false;
    let mut closed = false;
    loop {
        let at = reader.buffer_position();
        let event = reader
            .read_event_into(&mut buf)
            .map_err(|e| ParseError::at_byte(at, format!("PHPUnit XML {what}: {e}")))?;
        let fail = |m: String| ParseError::at_byte(at, format!("PHPUnit XML {what}: {m}"));
        match event {
            Event::Eof => break,
            Event::Start(ref e) | Event::Empty(ref e) => {
                let name = e.local_name().as_ref().to_owned();
                if !root {
                    let namespace = xml_attr(e, "xmlns").map_err(&fail)?;
                    if name != "phpunit" || namespace.as_deref() != Some(NAMESPACE) {
                        return Err(fail(format!(
                            "not a PHPUnit XML coverage report (the root is <{name}>, not \
                             <phpunit xmlns=\"{NAMESPACE}\">)"
                        )));
                    }
                    root = true;
                }
                on_element(&name, Some(e)).map_err(&fail)?;
                if matches!(event, Event::Empty(_)) {
                    on_element(&name, None).map_err(&fail)?;
                    closed = name == "phpunit";
                }
            }
            Event::End(ref e) => {
                let name = e.local_name().as_ref().to_owned();
                on_element(&name, None).map_err(&fail)?;
                closed = name == "phpunit";
            }
            _ => {}
        }
        buf.clear();
    }
    if !root {
        return Err(ParseError::at_byte(
            reader.buffer_position(),
            format!("PHPUnit XML {what}: the input holds no element (empty?)"),
        ));
    }
    if !closed {
        return Err(ParseError::at_byte(
            reader.buffer_position(),
            format!("PHPUnit XML {what}: the input ends before </phpunit> (truncated?)"),
        ));
    }
    Ok(())
}

/// Puts `tests`' attribution on `file`, the same source file's record from the Clover report
/// of the same run; refuses when the two disagree on which lines are executable or ran.
///
/// php-code-coverage's Clover writer gives a line that opens a method only as the method
/// (`type="method"`), even when the method's body is on that line (`function id(): int {
/// return $this->id; }`): such a line, when the XML report says it ran, is added with as many
/// hits as tests ran it. One that did not run cannot be told from a method's first line that
/// is not executable: the XML report may count up to that many executable lines more.
pub fn attach(file: &mut FileCoverage, tests: FileTests) -> Result<(), String> {
    let path = &tests.path;
    let starts: RoaringBitmap = file.functions().iter().map(|f| f.start_line).collect();
    let one_liners = &(&tests.covered - file.lines()) & &starts;
    if !one_liners.is_empty() {
        let mut b = crate::model::FileBuilder::new();
        for (line, hits) in file.line_hits() {
            b.line(line, hits);
        }
        for line in &one_liners {
            let ran = tests.tests.iter().filter(|(_, l)| l.contains(line)).count();
            b.line(line, ran as u64);
        }
        for (key, taken) in file.branches() {
            b.branch(key.clone(), *taken);
        }
        for f in file.functions() {
            b.function(&f.name, f.start_line, f.end_line, f.hits);
        }
        *file = b.build();
    }
    let lines = file.lines().len();
    let unknown = (&starts - file.lines()).len();
    if tests.executable < lines || tests.executable > lines + unknown {
        return Err(format!(
            "{path}: the coverage report has {lines} executable lines, PHPUnit's XML report \
             {}; are they reports of the same run?",
            tests.executable
        ));
    }
    if let Some(line) = (&tests.covered ^ file.covered()).min() {
        let (xml, report) = if tests.covered.contains(line) {
            ("ran", "did not")
        } else {
            ("did not run", "did")
        };
        return Err(format!(
            "{path}: line {line} {xml} in PHPUnit's XML report and {report} in the coverage \
             report; are they reports of the same run?"
        ));
    }
    file.set_tests(tests.tests);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FileBuilder;

    const FILE: &str = r#"<?xml version="1.0"?>
<phpunit xmlns="https://schema.phpunit.de/coverage/1.0">
  <file name="Cart.php" path="/shop">
    <totals>
      <lines total="20" comments="1" code="19" executable="3" executed="2" percent="66.67"/>
      <methods count="1" tested="0" percent="0"/>
    </totals>
    <class name="Cart" start="5" executable="3" executed="2" crap="3">
      <method name="add" signature="add()" start="6" end="9" crap="3" executable="3" executed="2" coverage="66"/>
    </class>
    <coverage>
      <line nr="8"><covered by="T::b with data set &quot;one&quot;"/></line>
      <line nr="7">
        <covered by="T::a"/>
        <covered by="T::b with data set &quot;one&quot;"/>
      </line>
    </coverage>
    <source><line no="7"><token name="T_STRING">x</token></line></source>
  </file>
</phpunit>"#;

    #[test]
    fn a_file_report_gives_each_tests_lines() {
        let file = read_file(FILE.as_bytes(), "/builds/src/").unwrap();
        assert_eq!(file.path, "/builds/src/shop/Cart.php");
        assert_eq!(file.executable, 3);
        assert_eq!(file.covered.iter().collect::<Vec<_>>(), [7, 8]);
        let tests: Vec<(&str, Vec<u32>)> = file
            .tests
            .iter()
            .map(|(t, l)| (&**t, l.iter().collect()))
            .collect();
        assert_eq!(
            tests,
            [
                ("T::a", vec![7]),
                ("T::b with data set \"one\"", vec![7, 8])
            ]
        );
    }

    #[test]
    fn the_index_gives_source_tests_and_files() {
        let index = read_index(
            r#"<phpunit xmlns="https://schema.phpunit.de/coverage/1.0">
            <build phpunit="9.6.7" coverage="9.2.26"><runtime name="PHP" version="8.2.31"/></build>
            <project source="/b/src"><tests><test name="T::a" status="PASSED"/></tests>
            <directory name="/"><file name="A.php" href="A.php.xml"/>
            <directory name="sub"><file name="B.php" href="sub/B.php.xml"/></directory>
            <directory name="empty"/></directory></project></phpunit>"#
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(index.source, "/b/src");
        let tools = [
            ("phpunit", "9.6.7"),
            ("php-code-coverage", "9.2.26"),
            ("php", "8.2.31"),
        ];
        assert_eq!(
            index.tools,
            tools.map(|(t, v)| (t.to_owned(), v.to_owned()))
        );
        assert_eq!(index.tests, ["T::a"]);
        let files = [
            ("/b/src/A.php", "A.php.xml"),
            ("/b/src/sub/B.php", "sub/B.php.xml"),
        ];
        assert_eq!(
            index.files,
            files.map(|(p, h)| (p.to_owned(), h.to_owned()))
        );
    }

    #[test]
    fn paths_join_with_one_slash() {
        assert_eq!(join("/b/src", "/", "A.php"), "/b/src/A.php");
        assert_eq!(join("/b/src/", "/x/y/", "A.php"), "/b/src/x/y/A.php");
        assert_eq!(join("src", "", "A.php"), "src/A.php");
    }

    fn clover(lines: &[(u32, u64)]) -> FileCoverage {
        let mut b = FileBuilder::new();
        for (l, h) in lines {
            b.line(*l, *h);
        }
        b.build()
    }

    #[test]
    fn attaching_checks_the_reports_agree() {
        let tests = read_file(FILE.as_bytes(), "/b").unwrap();
        let mut file = clover(&[(7, 2), (8, 1), (9, 0)]);
        attach(&mut file, tests.clone()).unwrap();
        assert_eq!(
            file.tests_of(8).map(|t| &**t).collect::<Vec<_>>(),
            ["T::b with data set \"one\""]
        );
        assert_eq!(file.tests_of(7).count(), 2);

        let mut other = clover(&[(7, 2), (8, 1)]);
        let e = attach(&mut other, tests.clone()).unwrap_err();
        assert!(
            e.contains("has 2 executable lines, PHPUnit's XML report 3"),
            "{e}"
        );
        let mut other = clover(&[(7, 2), (8, 0), (9, 0)]);
        let e = attach(&mut other, tests.clone()).unwrap_err();
        assert!(
            e.contains("line 8 ran in PHPUnit's XML report and did not"),
            "{e}"
        );
        let mut other = clover(&[(7, 2), (8, 1), (9, 1)]);
        let e = attach(&mut other, tests).unwrap_err();
        assert!(
            e.contains("line 9 did not run in PHPUnit's XML report and did"),
            "{e}"
        );
    }

    /// A method whose body is on its first line is only a method line in Clover; the XML
    /// report's tests of that line put it back, with a hit per test.
    #[test]
    fn one_line_methods_ran_come_from_the_xml_report() {
        let xml = r#"<phpunit xmlns="https://schema.phpunit.de/coverage/1.0">
          <file name="A.php" path="/"><totals><lines executable="3"/></totals>
          <coverage><line nr="4"><covered by="T::a"/><covered by="T::b"/></line>
          <line nr="7"><covered by="T::a"/></line></coverage></file></phpunit>"#;
        let tests = read_file(xml.as_bytes(), "/s").unwrap();
        let mut b = FileBuilder::new();
        // `id()` on line 4 is one line; `other()` on line 9 is one line that did not run;
        // `run()` opens on line 6, its body on line 7.
        b.function("id", 4, 0, 2);
        b.function("run", 6, 0, 1);
        b.function("other", 9, 0, 0);
        b.line(7, 1);
        let mut file = b.build();
        attach(&mut file, tests.clone()).unwrap();
        assert_eq!(file.line_hits().collect::<Vec<_>>(), [(4, 2), (7, 1)]);
        assert_eq!(file.tests_of(4).count(), 2);
        // One executable line more than the methods that could be one: not the same run.
        let xml = xml.replace(r#"executable="3""#, r#"executable="5""#);
        let tests = read_file(xml.as_bytes(), "/s").unwrap();
        let mut file = {
            let mut b = FileBuilder::new();
            b.function("id", 4, 0, 2);
            b.function("run", 6, 0, 1);
            b.function("other", 9, 0, 0);
            b.line(7, 1);
            b.build()
        };
        let e = attach(&mut file, tests).unwrap_err();
        assert!(e.contains("PHPUnit's XML report 5"), "{e}");
    }

    #[test]
    fn malformed_reports_are_errors() {
        let ns = r#"xmlns="https://schema.phpunit.de/coverage/1.0""#;
        for (xml, needle) in [
            (
                "<coverage/>".to_owned(),
                "not a PHPUnit XML coverage report",
            ),
            ("<phpunit/>".to_owned(), "not a PHPUnit XML coverage report"),
            (String::new(), "holds no element"),
            (
                format!("<phpunit {ns}><project/></phpunit>"),
                "without `source`",
            ),
            (format!("<phpunit {ns}></phpunit>"), "no <project>"),
            (format!("<phpunit {ns}><project source='/'>"), "truncated"),
        ] {
            let e = read_index(xml.as_bytes()).expect_err(&xml);
            assert!(e.to_string().contains(needle), "{xml}: {e}");
        }
        for (xml, needle) in [
            (format!("<phpunit {ns}></phpunit>"), "no <file>"),
            (format!("<phpunit {ns}><file/></phpunit>"), "without `name`"),
            (
                format!("<phpunit {ns}><file name='a'/></phpunit>"),
                "no <totals><lines",
            ),
            (
                format!("<phpunit {ns}><file name='a'><coverage><covered by='t'/>"),
                "outside a <line>",
            ),
            (
                format!("<phpunit {ns}><file name='a'><coverage><line nr='0'>"),
                "out of range",
            ),
            (
                format!("<phpunit {ns}><file name='a'><totals><lines executable='x'/>"),
                "not a count",
            ),
            (
                format!("<phpunit {ns}><file name='a'><coverage><line nr='1'><covered by='&x;'/>"),
                "by",
            ),
        ] {
            let e = read_file(xml.as_bytes(), "/").expect_err(&xml);
            assert!(e.to_string().contains(needle), "{xml}: {e}");
        }
    }
}
