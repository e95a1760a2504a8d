//! The Cobertura export against the structure of Cobertura's `coverage-04.dtd`: which children
//! each element may have, in which order, and which attributes it must and may carry. The
//! DTD itself is not available offline, so its rules are stated here as a table.

use quick_xml::events::{BytesStart, Event};

use crate::support::*;

/// How often a child may appear at its place in a content model.
#[derive(Clone, Copy)]
enum Times {
    One,
    Optional,
    Any,
}

struct Element {
    name: &'static str,
    /// The content model as a sequence; empty for EMPTY or text-only elements.
    children: &'static [(&'static str, Times)],
    required: &'static [&'static str],
    optional: &'static [&'static str],
}

const RATES: [&str; 2] = ["line-rate", "branch-rate"];

const DTD: &[Element] = &[
    Element {
        name: "coverage",
        children: &[("sources", Times::Optional), ("packages", Times::One)],
        required: &[
            RATES[0],
            RATES[1],
            "lines-covered",
            "lines-valid",
            "branches-covered",
            "branches-valid",
            "complexity",
            "version",
            "timestamp",
        ],
        optional: &[],
    },
    Element {
        name: "sources",
        children: &[("source", Times::Any)],
        required: &[],
        optional: &[],
    },
    Element {
        name: "source",
        children: &[],
        required: &[],
        optional: &[],
    },
    Element {
        name: "packages",
        children: &[("package", Times::Any)],
        required: &[],
        optional: &[],
    },
    Element {
        name: "package",
        children: &[("classes", Times::One)],
        required: &["name", RATES[0], RATES[1], "complexity"],
        optional: &[],
    },
    Element {
        name: "classes",
        children: &[("class", Times::Any)],
        required: &[],
        optional: &[],
    },
    Element {
        name: "class",
        children: &[("methods", Times::One), ("lines", Times::One)],
        required: &["name", "filename", RATES[0], RATES[1], "complexity"],
        optional: &[],
    },
    Element {
        name: "methods",
        children: &[("method", Times::Any)],
        required: &[],
        optional: &[],
    },
    Element {
        name: "method",
        children: &[("lines", Times::One)],
        // The published DTD requires `complexity` here too; copies of older revisions do not.
        required: &["name", "signature", RATES[0], RATES[1], "complexity"],
        optional: &[],
    },
    Element {
        name: "lines",
        children: &[("line", Times::Any)],
        required: &[],
        optional: &[],
    },
    Element {
        name: "line",
        children: &[("conditions", Times::Any)],
        required: &["number", "hits"],
        optional: &["branch", "condition-coverage"],
    },
    Element {
        name: "conditions",
        children: &[("condition", Times::Any)],
        required: &[],
        optional: &[],
    },
    Element {
        name: "condition",
        children: &[],
        required: &["number", "type", "coverage"],
        optional: &[],
    },
];

/// Does `children` follow the sequence `model`?
fn follows(children: &[String], model: &[(&str, Times)]) -> bool {
    let mut rest = children;
    for (name, times) in model {
        let n = rest.iter().take_while(|c| c == name).count();
        let ok = match times {
            Times::One => n == 1,
            Times::Optional => n <= 1,
            Times::Any => true,
        };
        if !ok {
            return false;
        }
        rest = &rest[n..];
    }
    rest.is_empty()
}

fn check_attributes(e: &BytesStart, rule: &Element, problems: &mut Vec<String>) {
    let name = rule.name;
    let mut seen = Vec::new();
    for a in e.attributes() {
        let a = a.unwrap();
        let key = a.key.as_ref().to_owned();
        if !rule.required.contains(&key.as_str()) && !rule.optional.contains(&key.as_str()) {
            problems.push(format!("<{name}> has undeclared attribute `{key}`"));
        }
        seen.push(key);
    }
    for r in rule.required {
        if !seen.iter().any(|s| s == r) {
            problems.push(format!("<{name}> lacks required attribute `{r}`"));
        }
    }
}

/// Everything in `xml` that breaks the DTD's rules (empty when it conforms).
fn dtd_problems(xml: &str) -> Vec<String> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut problems = Vec::new();
    // Open elements with the names of their children so far.
    let mut open: Vec<(String, Vec<String>)> = Vec::new();
    let mut saw_doctype = false;
    let close = |open: &mut Vec<(String, Vec<String>)>, problems: &mut Vec<String>| {
        let (name, children) = open.pop().unwrap();
        let rule = DTD.iter().find(|r| r.name == name).unwrap();
        if !follows(&children, rule.children) {
            problems.push(format!("<{name}> has children {children:?}"));
        }
    };
    loop {
        let event = reader.read_event().unwrap();
        match event {
            Event::Eof => break,
            Event::DocType(d) => {
                saw_doctype = d.xml10_content().contains("coverage-04.dtd");
            }
            Event::Start(ref e) | Event::Empty(ref e) => {
                let name = e.name().as_ref().to_owned();
                match open.last_mut() {
                    Some((_, children)) => children.push(name.clone()),
                    None if name != "coverage" => problems.push(format!("root is <{name}>")),
                    None => {}
                }
                match DTD.iter().find(|r| r.name == name) {
                    Some(rule) => check_attributes(e, rule, &mut problems),
                    None => problems.push(format!("undeclared element <{name}>")),
                }
                open.push((name, Vec::new()));
                if matches!(event, Event::Empty(_)) {
                    close(&mut open, &mut problems);
                }
            }
            Event::End(_) => close(&mut open, &mut problems),
            Event::Text(t) => {
                let text = t.xml10_content();
                let inside = open.last().map(|(n, _)| n.as_str());
                if !text.trim().is_empty() && inside != Some("source") {
                    problems.push(format!("text inside <{}>", inside.unwrap_or("")));
                }
            }
            _ => {}
        }
    }
    if !saw_doctype {
        problems.push("no DOCTYPE naming coverage-04.dtd".into());
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cobertura_export_follows_the_coverage_04_dtd() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    // Branches, functions with and without start lines, and paths XML must escape.
    for (i, name) in ["shard-a.info", "shard-b.info"].iter().enumerate() {
        let c = read_lcov(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples/quickstart")
                .join(name),
            &Default::default(),
        );
        push(&mut client, "dtd", &i.to_string(), 1, c).await;
    }
    let mut odd = covd::model::FileBuilder::new();
    odd.line(3, 1);
    odd.function("only_fnda", 0, 0, 1);
    let mut c = covd::model::Coverage::default();
    let odd = odd.build();
    c.add("src/a & <b>/\"q\".c", &odd);
    c.add("top.c", &odd);
    push(&mut client, "dtd", "2", 1, c).await;
    let mut out = Vec::new();
    client
        .export_as(
            "dtd",
            covd::service::ExportFormat::Cobertura,
            None,
            &mut out,
        )
        .await
        .unwrap();
    let xml = String::from_utf8(out).unwrap();
    assert!(xml.contains("<class "), "{xml}");
    assert_eq!(dtd_problems(&xml), Vec::<String>::new(), "{xml}");
}

#[test]
fn the_dtd_check_finds_what_coverage_py_adds() {
    // coverage.py's reports carry `missing-branches`, which the DTD does not declare, and its
    // methods lack `complexity`: the check must see both, or it checks nothing.
    let xml = r#"<?xml version="1.0" ?>
<!DOCTYPE coverage SYSTEM "http://cobertura.sourceforge.net/xml/coverage-04.dtd">
<coverage version="7" timestamp="1" lines-valid="1" lines-covered="1" line-rate="1" branches-covered="1" branches-valid="2" branch-rate="0.5" complexity="0">
<sources><source>/src</source></sources>
<packages><package name="." line-rate="1" branch-rate="0.5" complexity="0"><classes>
<class name="a.py" filename="a.py" complexity="0" line-rate="1" branch-rate="0.5">
<methods><method name="f" signature="" line-rate="1" branch-rate="1"><lines/></method></methods>
<lines><line number="1" hits="1" branch="true" condition-coverage="50% (1/2)" missing-branches="3"/></lines>
</class></classes></package></packages></coverage>"#;
    assert_eq!(
        dtd_problems(xml),
        vec![
            "<method> lacks required attribute `complexity`".to_owned(),
            "<line> has undeclared attribute `missing-branches`".to_owned(),
        ]
    );
    let out_of_order = xml.replace(
        "<methods><method name=\"f\" signature=\"\" line-rate=\"1\" branch-rate=\"1\"><lines/></method></methods>",
        "",
    );
    assert!(
        dtd_problems(&out_of_order).contains(&"<class> has children [\"lines\"]".to_owned()),
        "{:?}",
        dtd_problems(&out_of_order)
    );
}
