//! Differential coverage: a run against a base run in lcov 2's categories, the base's lines
//! carried through a diff written by real git. What ran comes from coverage.py's own reports
//! (the merged one and the shards'), read with serde.

use std::collections::{BTreeMap, BTreeSet};

use covd::service::{Category, RunParams};

use crate::attribution::{merged_executed, merged_measured};
use crate::impact::{covd_with_input, toolz_repo, toolz_run};
use crate::support::*;

/// Per file, the lines a shard's own coverage.py report says ran (read with serde).
pub(crate) fn shard_executed(i: u32) -> &'static BTreeMap<String, BTreeSet<u32>> {
    static SHARDS: [std::sync::OnceLock<BTreeMap<String, BTreeSet<u32>>>; 4] =
        [const { std::sync::OnceLock::new() }; 4];
    SHARDS[i as usize - 1].get_or_init(|| read_shard_executed(i))
}

fn read_shard_executed(i: u32) -> BTreeMap<String, BTreeSet<u32>> {
    #[derive(serde::Deserialize)]
    struct Report {
        files: BTreeMap<String, File>,
    }
    #[derive(serde::Deserialize)]
    struct File {
        executed_lines: Vec<u32>,
    }
    let path = corpus(&format!("python-toolz/same-path/shard{i}.json.gz"));
    let gz = std::io::BufReader::new(flate2::read::GzDecoder::new(
        std::fs::File::open(path).unwrap(),
    ));
    let report: Report = serde_json::from_reader(gz).unwrap();
    report
        .files
        .into_iter()
        .map(|(p, f)| (p, f.executed_lines.into_iter().collect()))
        .collect()
}

/// Differential coverage of the four shards against a base of the first two, whose
/// itertoolz.py had three more lines at the top: through the diff, every line of it is
/// compared with the line it was, and lines only the last two shards ran are the gained ones;
/// without the diff the shifted file reads as lost and gained coverage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_coverage_follows_moved_lines() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    toolz_run(&mut client, "head").await;
    let shifted = "toolz/itertoolz.py";
    let params = RunParams {
        expected_shards: vec!["1".into(), "2".into()],
        ..RunParams::default()
    };
    client.open_run("base", params).await.unwrap();
    for i in 1..=2u32 {
        let mut shard = crate::corpus::read_json(
            &format!("python-toolz/same-path/shard{i}.json.gz"),
            &Default::default(),
        );
        let file = shard.files.remove(shifted).unwrap();
        let mut moved = covd::model::FileBuilder::new();
        for (line, hits) in file.line_hits() {
            moved.line(line + 3, hits);
        }
        shard.files.insert(shifted.to_owned(), moved.build());
        push(&mut client, "base", &i.to_string(), 1, shard).await;
    }
    let repo = toolz_repo();
    for _ in 0..3 {
        repo.insert_after(shifted, 0, "# a comment the head removed");
    }
    repo.commit("base");
    let diff = repo.git(&["diff", "HEAD", "HEAD~1"]);

    let d = client
        .differential("head", "base", Some(diff.clone()), None)
        .await
        .unwrap();
    assert!(d.complete && d.base_complete);
    let base_ran: BTreeMap<String, BTreeSet<u32>> = {
        let (mut one, two) = (shard_executed(1).clone(), shard_executed(2));
        for (p, lines) in two {
            one.entry(p.clone()).or_default().extend(lines);
        }
        one
    };
    let mut gained_somewhere = false;
    for (path, measured) in merged_measured() {
        let ran = &merged_executed()[path];
        let before = &base_ran[path];
        let mut want: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for &l in measured {
            let code = match (before.contains(&l), ran.contains(&l)) {
                (true, true) => "CBC",
                (false, true) => "GBC",
                (true, false) => "LBC",
                (false, false) => "UBC",
            };
            want.entry(code).or_default().push(l);
        }
        gained_somewhere |= want.contains_key("GBC");
        let got: BTreeMap<&str, Vec<u32>> = d
            .files
            .iter()
            .find(|f| *f.path == **path)
            .map(|f| {
                f.lines
                    .iter()
                    .map(|(c, l)| (c.code(), l.iter().collect()))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(got, want, "{path}");
    }
    assert!(gained_somewhere);

    // Without the diff, the moved lines of itertoolz.py do not line up.
    let blind = client
        .differential("head", "base", None, None)
        .await
        .unwrap();
    let f = blind.files.iter().find(|f| &*f.path == shifted).unwrap();
    assert!(f.count(Category::Lbc) + f.count(Category::Ecb) > 0);

    // The command: JSON totals as the answer's, Markdown for a pull request.
    let args = [
        "diff", "--run", "head", "--base", "base", "--diff", "-", "--format", "json",
    ];
    let (code, out, err) = covd_with_input(&daemon.url, &args, diff.clone()).await;
    assert_eq!(code, Some(0), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let gbc: u64 = d.files.iter().map(|f| f.count(Category::Gbc)).sum();
    assert_eq!(json["totals"]["GBC"].as_u64(), Some(gbc));
    assert_eq!(json["totals"]["LBC"].as_u64(), Some(0));
    let args = [
        "diff", "--run", "head", "--base", "base", "--diff", "-", "--format", "markdown",
    ];
    let (code, out, _) = covd_with_input(&daemon.url, &args, diff.clone()).await;
    assert_eq!(code, Some(0));
    assert!(
        out.starts_with("### Differential coverage: `head` against `base`\n"),
        "{out}"
    );
    assert!(
        out.contains(&format!("{gbc} gained coverage (GBC), 0 lost it (LBC)")),
        "{out}"
    );

    // The HTML report's column: each line of a file's page in its category.
    let report = tempfile::tempdir().unwrap();
    let dir = report.path().to_str().unwrap();
    let args = [
        "fetch", "--run", "head", "--format", "html", "--output", dir, "--base", "base", "--diff",
        "-",
    ];
    let (code, _, err) = covd_with_input(&daemon.url, &args, diff).await;
    assert_eq!(code, Some(0), "{err}");
    let page = std::fs::read_dir(report.path().join("f"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .find(|p| p.contains(&format!("<title>Coverage of head — {shifted}</title>")))
        .unwrap();
    let f = d.files.iter().find(|f| &*f.path == shifted).unwrap();
    for c in [Category::Cbc, Category::Gbc, Category::Ubc] {
        let cells = page
            .matches(&format!(r#"<td class="cat">{}</td>"#, c.code()))
            .count();
        assert_eq!(cells as u64, f.count(c), "{}", c.code());
    }
    assert!(page.contains("<th>vs base</th>"));
    assert!(
        page.contains(&format!(
            "Against base base: CBC {}",
            f.count(Category::Cbc)
        )),
        "{page}"
    );
}
