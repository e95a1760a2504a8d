//! Output formats against the real tools' own merged reports.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use covd::model::path::PathRules;
use covd::service::{ExportFormat, RunParams};
use quick_xml::events::Event;

use crate::support::*;

/// Per file: (lines, covered lines, line → (branches taken, branches)), from Cobertura XML.
type CoberturaView = BTreeMap<String, (BTreeSet<u32>, BTreeSet<u32>, BTreeMap<u32, (u64, u64)>)>;

fn read_cobertura(xml: &str, prefix: &str) -> CoberturaView {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut view = CoberturaView::new();
    let mut current: Option<String> = None;
    let mut in_method = false;
    loop {
        match reader.read_event().unwrap() {
            Event::Eof => break,
            Event::Start(e) | Event::Empty(e) => {
                let attr = |name: &str| {
                    e.try_get_attribute(name).unwrap().map(|a| {
                        a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                            .unwrap()
                            .into_owned()
                    })
                };
                match e.name().as_ref() {
                    "class" => current = attr("filename").map(|f| format!("{prefix}{f}")),
                    "method" => in_method = true,
                    "line" if !in_method => {
                        let file = current.clone().unwrap();
                        let entry = view.entry(file).or_default();
                        let n: u32 = attr("number").unwrap().parse().unwrap();
                        let hits: u64 = attr("hits").unwrap().parse().unwrap();
                        entry.0.insert(n);
                        if hits > 0 {
                            entry.1.insert(n);
                        }
                        if let Some(cc) = attr("condition-coverage") {
                            // "50% (1/2)"
                            let inner = cc.split('(').nth(1).unwrap().trim_end_matches(')');
                            let (a, b) = inner.split_once('/').unwrap();
                            entry.2.insert(n, (a.parse().unwrap(), b.parse().unwrap()));
                        }
                    }
                    _ => {}
                }
            }
            Event::End(e) if e.name().as_ref() == "method" => in_method = false,
            Event::End(e) if e.name().as_ref() == "methods" => in_method = false,
            _ => {}
        }
    }
    view
}

fn gunzip(path: &std::path::Path) -> String {
    let mut s = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut s)
        .unwrap();
    s
}

async fn toolz_run(daemon: &Daemon) -> covd::client::Client {
    let mut client = daemon.client();
    client
        .open_run(
            "toolz",
            RunParams {
                expected_shards: (1..=4).map(|i| i.to_string()).collect(),
                ..RunParams::default()
            },
        )
        .await
        .unwrap();
    for i in 1..=4 {
        let c = read_lcov(
            &corpus(&format!("python-toolz/same-path/shard{i}.lcov")),
            &PathRules::default(),
        );
        push(&mut client, "toolz", &i.to_string(), 1, c).await;
    }
    client
}

async fn export(client: &mut covd::client::Client, format: ExportFormat) -> String {
    let mut out = Vec::new();
    client
        .export_as("toolz", format, None, &mut out)
        .await
        .unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cobertura_export_agrees_with_coverage_py_merged_cobertura() {
    let daemon = Daemon::start().await;
    let mut client = toolz_run(&daemon).await;
    let ours = read_cobertura(&export(&mut client, ExportFormat::Cobertura).await, "");
    // coverage.py's filenames are relative to its <source>, the toolz package directory.
    let oracle = read_cobertura(
        &gunzip(&corpus("python-toolz/same-path/merged.cobertura.xml.gz")),
        "toolz/",
    );
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        oracle.keys().collect::<Vec<_>>()
    );
    for (file, theirs) in &oracle {
        assert_eq!(&ours[file], theirs, "{file}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_markdown_exports_say_what_the_status_says() {
    let daemon = Daemon::start().await;
    let mut client = toolz_run(&daemon).await;
    let status = client.status("toolz").await.unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&export(&mut client, ExportFormat::Json).await).unwrap();
    assert_eq!(json["complete"], true);
    assert_eq!(json["totals"]["lines"], status.totals.lines);
    assert_eq!(
        json["totals"]["branches_taken"],
        status.totals.branches_taken
    );
    let files = json["files"].as_array().unwrap();
    assert_eq!(files.len() as u64, status.totals.files);
    let lcov = read_lcov(
        &corpus("python-toolz/same-path/merged.lcov"),
        &PathRules::default(),
    );
    let init = files
        .iter()
        .find(|f| f["path"] == "toolz/__init__.py")
        .unwrap();
    let lines: Vec<u32> = init["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l[0].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(
        lines,
        lcov.files["toolz/__init__.py"]
            .lines()
            .iter()
            .collect::<Vec<_>>()
    );

    let md = export(&mut client, ExportFormat::Markdown).await;
    assert!(
        md.contains("Complete: every expected shard finished."),
        "{md}"
    );
    let t = status.totals;
    assert!(
        md.contains(&format!("| Lines | {} | {} |", t.lines_covered, t.lines)),
        "{md}"
    );
    assert!(md.contains("**Most uncovered lines**"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cobertura_shards_merge_to_exactly_coverage_py_combine() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    for i in 1..=4 {
        let rules = PathRules {
            strip: vec!["/srv/ci/workspace/toolz-1.2.0/".into()],
            ..PathRules::default()
        };
        let xml = gunzip(&corpus(&format!(
            "python-toolz/same-path/shard{i}.cobertura.xml.gz"
        )));
        let mut c = covd::model::Coverage::default();
        covd::formats::read(covd::formats::Format::Cobertura, xml.as_bytes(), |r| {
            c.add(&rules.apply(&r.path), &r.file);
            true
        })
        .unwrap();
        push(&mut client, "cob", &i.to_string(), 1, c).await;
    }
    let mut out = Vec::new();
    client
        .export_as("cob", ExportFormat::Cobertura, None, &mut out)
        .await
        .unwrap();
    let ours = read_cobertura(&String::from_utf8(out).unwrap(), "");
    let oracle = read_cobertura(
        &gunzip(&corpus("python-toolz/same-path/merged.cobertura.xml.gz")),
        "toolz/",
    );
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        oracle.keys().collect::<Vec<_>>()
    );
    let mut branch_lines = 0;
    for (file, (lines, covered, branches)) in &oracle {
        let (our_lines, our_covered, our_branches) = &ours[file];
        assert_eq!(our_lines, lines, "{file}");
        assert_eq!(our_covered, covered, "{file}");
        // coverage.py names the arms not taken (`missing-branches`), so every line's
        // "taken of total" is exact, also where two shards took different arms.
        assert_eq!(our_branches, branches, "{file}");
        branch_lines += branches.len();
    }
    assert_eq!(branch_lines, 258);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_filter_files_by_glob_and_total_what_they_keep() {
    let daemon = Daemon::start().await;
    let mut client = toolz_run(&daemon).await;
    let mut out = Vec::new();
    let header = client
        .export_filtered(
            "toolz",
            ExportFormat::Lcov,
            None,
            &["toolz/**".into()],
            &["**/tests/**".into(), "toolz/sandbox/*".into()],
            &mut out,
        )
        .await
        .unwrap();
    let kept = parse_lcov_bytes(&out);
    assert!(!kept.files.is_empty());
    for path in kept.files.keys() {
        assert!(
            !path.contains("/tests/") && !path.starts_with("toolz/sandbox/"),
            "{path}"
        );
    }
    let all = read_lcov(
        &corpus("python-toolz/same-path/merged.lcov"),
        &PathRules::default(),
    );
    let expected = all
        .files
        .keys()
        .filter(|p| !p.contains("/tests/") && !p.starts_with("toolz/sandbox/"))
        .count();
    assert_eq!(kept.files.len(), expected);
    assert_eq!(
        header.totals,
        kept.totals(),
        "the header totals cover the exported files"
    );
    let bad = client
        .export_filtered(
            "toolz",
            ExportFormat::Lcov,
            None,
            &["[".into()],
            &[],
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("include/exclude"), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lcov_and_cobertura_exports_read_back_as_what_was_merged() {
    let daemon = Daemon::start().await;
    let mut client = toolz_run(&daemon).await;
    let (_, merged) = fetch(&mut client, "toolz").await;
    // LCOV out, LCOV in: everything, exactly.
    let lcov = export(&mut client, ExportFormat::Lcov).await;
    assert_eq!(parse_lcov_bytes(lcov.as_bytes()), merged);
    // Cobertura out, Cobertura in: lines and counts exactly, branch totals per line.
    let xml = export(&mut client, ExportFormat::Cobertura).await;
    let mut back = covd::model::Coverage::default();
    covd::formats::read(covd::formats::Format::Cobertura, xml.as_bytes(), |r| {
        back.add(&r.path, &r.file);
        true
    })
    .unwrap();
    assert_same_lines(&back, &merged);
    for (path, f) in &merged.files {
        let b = &back.files[path];
        assert_eq!(b.branches().len(), f.branches().len(), "{path}");
        assert_eq!(
            b.totals().branches_taken,
            f.totals().branches_taken,
            "{path}"
        );
    }
}
