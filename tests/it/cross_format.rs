//! Readers against what the real tool wrote in another format. The shards go through covd's
//! reader for their format and covd's merge; the oracle is the tool's own merge in a second
//! format, read here by a few lines of parsing that share nothing with covd's readers, so that
//! a reader bug cannot cancel out. covd's side is read back from its LCOV export by the same
//! few lines.

use std::collections::BTreeMap;

use covd::formats::Format;
use covd::model::path::PathRules;

use crate::support::*;

/// One file of a tracefile, as written: line → count, function → count, line → the counts of
/// its branches in order (`-` is `None`).
#[derive(Debug, Default, PartialEq, Eq)]
struct Traced {
    lines: BTreeMap<u32, u64>,
    functions: BTreeMap<String, u64>,
    branches: BTreeMap<u32, Vec<Option<u64>>>,
}

/// `SF`, `DA`, `FNDA` and `BRDA` of an LCOV tracefile, and nothing of covd's.
fn traced(text: &str) -> BTreeMap<String, Traced> {
    let mut files = BTreeMap::new();
    let mut current: Option<(String, Traced)> = None;
    for line in text.lines() {
        let (key, value) = line.split_once(':').unwrap_or((line, ""));
        match key {
            "SF" => current = Some((value.to_owned(), Traced::default())),
            "end_of_record" => {
                let (path, file) = current.take().unwrap();
                files.insert(path, file);
            }
            "DA" => {
                let mut f = value.split(',');
                let n = f.next().unwrap().parse().unwrap();
                let hits = f.next().unwrap().parse().unwrap();
                current.as_mut().unwrap().1.lines.insert(n, hits);
            }
            "FNDA" => {
                let (hits, name) = value.split_once(',').unwrap();
                let file = &mut current.as_mut().unwrap().1;
                *file.functions.entry(name.to_owned()).or_default() += hits.parse::<u64>().unwrap();
            }
            "BRDA" => {
                let n = value.split(',').next().unwrap().parse().unwrap();
                let taken = value.rsplit(',').next().unwrap();
                let file = &mut current.as_mut().unwrap().1;
                file.branches.entry(n).or_default().push(taken.parse().ok());
            }
            _ => {}
        }
    }
    files
}

/// The shards merged by a daemon (shard `i` read with `rules(i)`), as its LCOV export.
async fn merged_lcov(
    format: Format,
    shards: &[&str],
    rules: impl Fn(usize) -> PathRules,
) -> String {
    let daemon = Daemon::start().await;
    let mut client = daemon.client();
    for (i, shard) in shards.iter().enumerate() {
        let mut coverage = covd::model::Coverage::default();
        let input = std::io::BufReader::new(std::fs::File::open(fixture(shard)).unwrap());
        let rules = rules(i);
        covd::formats::read(format, input, |r| {
            coverage.add(&rules.apply(&r.path), &r.file);
            true
        })
        .unwrap();
        push(&mut client, "x", &i.to_string(), 1, coverage).await;
    }
    let mut out = Vec::new();
    client.export("x", None, &mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

/// (covered, total) of lines, functions and branches taken.
fn totals(files: &BTreeMap<String, Traced>) -> [(usize, usize); 3] {
    let mut t = [(0, 0); 3];
    for f in files.values() {
        t[0].0 += f.lines.values().filter(|h| **h > 0).count();
        t[0].1 += f.lines.len();
        t[1].0 += f.functions.values().filter(|h| **h > 0).count();
        t[1].1 += f.functions.len();
        for arms in f.branches.values() {
            t[2].0 += arms.iter().filter(|a| a.is_some_and(|n| n > 0)).count();
            t[2].1 += arms.len();
        }
    }
    t
}

/// gcovr's JSON shards against `gcovr --add-tracefile`'s LCOV: every count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcovr_json_merges_to_what_gcovrs_lcov_says() {
    let ours = traced(
        &merged_lcov(
            Format::GcovrJson,
            &["gcovr/shard1.json", "gcovr/shard2.json"],
            |_| PathRules::default(),
        )
        .await,
    );
    let mut theirs = traced(&std::fs::read_to_string(fixture("gcovr/merged.info")).unwrap());
    // gcovr's LCOV writes `-` for an arm not taken even where its line ran; covd keeps `-`
    // for a block that never ran and 0 for one that ran (as gcc's own LCOV does). Counted as
    // taken or not, they agree; and where covd says `-`, so does gcovr.
    for (path, file) in &mut theirs {
        for (line, arms) in &mut file.branches {
            for (i, arm) in arms.iter_mut().enumerate() {
                if arm.is_none() && ours[path].branches[line][i].is_some() {
                    *arm = Some(0);
                }
            }
        }
    }
    assert_eq!(ours, theirs);
    assert_eq!(totals(&ours), [(62, 73), (7, 8), (37, 44)]);
    assert_eq!(ours["src/calc.c"].functions["apply"], 9);
}

/// A Go block: file, start and end line, start and end column.
type Block = (String, u32, u32, u32, u32);

/// A Go profile's blocks, each with its statements and count (summed if given twice).
fn blocks(text: &str) -> BTreeMap<Block, (u64, u64)> {
    let mut out = BTreeMap::new();
    for line in text.lines().skip(1) {
        let (file, rest) = line.split_once(':').unwrap();
        let mut f = rest.split([',', ' ']);
        let (l1, c1) = f.next().unwrap().split_once('.').unwrap();
        let (l2, c2) = f.next().unwrap().split_once('.').unwrap();
        let stmts: u64 = f.next().unwrap().parse().unwrap();
        let count: u64 = f.next().unwrap().parse().unwrap();
        let key = (
            file.trim_start_matches("covd.example/gofx/").to_owned(),
            l1.parse().unwrap(),
            l2.parse().unwrap(),
            c1.parse().unwrap(),
            c2.parse().unwrap(),
        );
        let e = out.entry(key).or_insert((stmts, 0));
        e.1 += count;
    }
    out
}

/// Two shards' count-mode profiles against one `go test` of all the tests, and against
/// `go tool cover -func`'s per-function statement figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_shards_merge_to_what_one_run_of_all_tests_counts() {
    let read = |f: &str| std::fs::read_to_string(fixture(f)).unwrap();
    // The profiles by hand: the shards' blocks summed are the full run's.
    let mut summed = blocks(&read("go/shard1.out"));
    for (key, (_, count)) in blocks(&read("go/shard2.out")) {
        summed.get_mut(&key).unwrap().1 += count;
    }
    assert_eq!(summed, blocks(&read("go/full.out")));
    // ... and give `go tool cover -func`'s figures: statements covered per function, a
    // function running from its line to the next one's.
    let starts = [
        ("calc.go", [9, 28, u32::MAX].as_slice()),
        ("grade.go", &[5, 20, 32, u32::MAX]),
    ];
    let mut percents = Vec::new();
    for (file, starts) in starts {
        for w in starts.windows(2) {
            let (mut covered, mut all) = (0, 0);
            for ((f, l1, ..), (stmts, count)) in &summed {
                if f == file && *l1 >= w[0] && *l1 < w[1] {
                    all += stmts;
                    covered += if *count > 0 { *stmts } else { 0 };
                }
            }
            percents.push(format!("{:.1}%", 100.0 * covered as f64 / all as f64));
        }
    }
    let func: Vec<String> = read("go/full.func.txt")
        .lines()
        .filter(|l| !l.starts_with("total"))
        .map(|l| l.split_whitespace().last().unwrap().to_owned())
        .collect();
    assert_eq!(percents, func);

    // A line's count is the largest of its blocks' (a line may hold several).
    let mut lines: BTreeMap<String, Traced> = BTreeMap::new();
    for ((file, l1, l2, ..), (_, count)) in &summed {
        let f = lines.entry(file.clone()).or_default();
        for line in *l1..=*l2 {
            let hits = f.lines.entry(line).or_default();
            *hits = (*hits).max(*count);
        }
    }
    let rules = PathRules {
        map: vec![("covd.example/gofx/".into(), "".into())],
        ..PathRules::default()
    };
    let ours = traced(
        &merged_lcov(Format::GoCover, &["go/shard1.out", "go/shard2.out"], |_| {
            rules.clone()
        })
        .await,
    );
    // covd sums the shards' line counts; on these profiles that equals the full run's
    // largest block per line, on every line.
    assert_eq!(ours, lines);
    assert_eq!(totals(&ours)[0], (39, 48));
}

/// JaCoCo's XML gives per line the branches missed and covered (`mb`, `cb`), which the merge
/// cannot add up (which arms were taken is not said): the merged line has as many branches as
/// JaCoCo's own merge, and takes as many as the shard that took most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jacoco_branches_per_line_against_jacocos_merge() {
    let ours = traced(
        &merged_lcov(
            Format::JaCoCo,
            &["jacoco/shard1.xml", "jacoco/shard2.xml"],
            |_| PathRules::default(),
        )
        .await,
    );
    // <sourcefile name="…"> and its <line nr mb cb>, by hand.
    let xml = std::fs::read_to_string(fixture("jacoco/merged.xml")).unwrap();
    let attr = |tag: &str, name: &str| -> u32 {
        let at = tag.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
        tag[at..].split('"').next().unwrap().parse().unwrap()
    };
    let mut theirs: BTreeMap<String, BTreeMap<u32, (u32, u32)>> = BTreeMap::new();
    for file in xml.split("<sourcefile name=\"").skip(1) {
        let name = file.split('"').next().unwrap();
        let lines = theirs
            .entry(format!("com/example/calc/{name}"))
            .or_default();
        for tag in file
            .split("<line ")
            .skip(1)
            .map(|t| format!(" {}", t.split("/>").next().unwrap()))
        {
            let tag = tag.as_str();
            let (mb, cb) = (attr(tag, "mb"), attr(tag, "cb"));
            if mb + cb > 0 {
                lines.insert(attr(tag, "nr"), (cb, mb + cb));
            }
        }
    }
    let mut differs = Vec::new();
    for (path, lines) in &theirs {
        let ours = &ours[path].branches;
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            lines.keys().collect::<Vec<_>>(),
            "{path}"
        );
        for (line, (covered, all)) in lines {
            let arms = &ours[line];
            assert_eq!(arms.len() as u32, *all, "{path}:{line}");
            let taken = arms.iter().filter(|a| a.is_some_and(|n| n > 0)).count() as u32;
            assert!(taken <= *covered, "{path}:{line}");
            if taken != *covered {
                differs.push((
                    path.rsplit('/').next().unwrap().to_owned(),
                    *line,
                    taken,
                    *covered,
                ));
            }
        }
    }
    // Where both shards took some arms of a line, JaCoCo knows (from its probes) that they
    // took different ones; covd cannot tell, and says the larger shard's count.
    assert_eq!(
        differs,
        [
            ("Calculator.java".to_owned(), 8, 3, 4),
            ("Grader.java".to_owned(), 16, 1, 2),
        ]
    );
    assert_eq!(totals(&ours)[2], (18, 27));
    // Lines never run have their arms never reached, not "not taken".
    assert_eq!(
        ours["com/example/calc/Calculator.java"].branches[&31],
        [None, None]
    );
}

/// Per file: lines and functions as written; per line, the branch counts in ascending order
/// (tools number a line's arms differently: nyc by branch id, covd by column).
fn sorted_arms(mut files: BTreeMap<String, Traced>) -> BTreeMap<String, Traced> {
    for f in files.values_mut() {
        for arms in f.branches.values_mut() {
            arms.sort();
        }
    }
    files
}

fn strip_shard(i: usize) -> PathRules {
    PathRules {
        strip: vec![format!("/builds/shard-{}/", i + 1)],
        ..PathRules::default()
    }
}

async fn merged_shards(format: Format, shards: &[&str]) -> BTreeMap<String, Traced> {
    sorted_arms(traced(&merged_lcov(format, shards, strip_shard).await))
}

fn lcov_fixture(rel: &str) -> BTreeMap<String, Traced> {
    sorted_arms(traced(&std::fs::read_to_string(fixture(rel)).unwrap()))
}

/// Istanbul's JSON shards (nyc, c8) against `nyc report --reporter=lcov` of nyc's merge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istanbul_json_merges_to_what_nycs_lcov_says() {
    let shards = ["istanbul/nyc-shard1.json", "istanbul/nyc-shard2.json"];
    let ours = merged_shards(Format::Istanbul, &shards).await;
    let theirs = lcov_fixture("istanbul/nyc-merged.info");
    assert_eq!(ours, theirs);
    assert_eq!(totals(&ours), [(23, 28), (5, 6), (21, 26)]);

    // c8: V8 leaves out a range whose count equals its parent's, and istanbul's merge of the
    // raw ranges puts such a count back from the narrowest range around it. covd merges the
    // shards' JSON, where those ranges are already gone: on one line of this project the
    // counts it sums are lower. Everything else is exact.
    let shards = ["istanbul/c8-shard1.json", "istanbul/c8-shard2.json"];
    let mut ours = merged_shards(Format::Istanbul, &shards).await;
    let mut theirs = lcov_fixture("istanbul/c8-merged.info");
    let line_18 = |files: &mut BTreeMap<String, Traced>| {
        files
            .get_mut("src/shapes.js")
            .unwrap()
            .branches
            .remove(&18)
            .unwrap()
    };
    assert_eq!(line_18(&mut ours), [Some(0), Some(0), Some(1), Some(1)]);
    assert_eq!(line_18(&mut theirs), [Some(1), Some(1), Some(1), Some(2)]);
    assert_eq!(ours, theirs);
    assert_eq!(totals(&ours), [(49, 69), (5, 7), (21, 23)], "line 18 aside");
}

/// Clover XML from nyc's shards against nyc's merge of the same project in LCOV: Clover gives
/// per line only how many arms were taken and not, so where both shards took some of a line's
/// arms covd says the larger count (as for JaCoCo); lines and counts are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clover_merges_to_what_nycs_lcov_of_the_same_runs_says() {
    let shards = ["clover/nyc-shard1.xml", "clover/nyc-shard2.xml"];
    let ours = merged_shards(Format::Clover, &shards).await;
    let theirs = lcov_fixture("istanbul/nyc-merged.info");
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    let mut differs = Vec::new();
    for (path, t) in &theirs {
        let o = &ours[path];
        assert_eq!(o.lines, t.lines, "{path}");
        assert_eq!(
            o.branches.keys().collect::<Vec<_>>(),
            t.branches.keys().collect::<Vec<_>>(),
            "{path}"
        );
        let taken = |arms: &[Option<u64>]| arms.iter().filter(|a| a.is_some_and(|n| n > 0)).count();
        for (line, arms) in &t.branches {
            assert_eq!(o.branches[line].len(), arms.len(), "{path}:{line}");
            let (ours, theirs) = (taken(&o.branches[line]), taken(arms));
            assert!(ours <= theirs, "{path}:{line}");
            if ours != theirs {
                differs.push((path.clone(), *line, ours, theirs));
            }
        }
    }
    assert_eq!(
        differs,
        [
            ("src/shapes.js".to_owned(), 4, 3, 4),
            ("src/shapes.js".to_owned(), 18, 3, 4),
        ]
    );
}

/// c8 `--all` shards with placeholders for unloaded files (JSON and LCOV), against nyc's
/// merge in LCOV: every line, function and branch count, but on c.js's two lines with ranges
/// V8 left out (as for `istanbul_json_merges_to_what_nycs_lcov_says`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c8_placeholder_shards_merge_to_what_nycs_lcov_says() {
    let mut theirs = lcov_fixture("c8-placeholders/merged.info");
    let c = theirs.get_mut("src/c.js").unwrap();
    assert_eq!(c.branches.remove(&5).unwrap(), [Some(1)]);
    assert_eq!(c.branches.remove(&8).unwrap(), [Some(0), Some(2)]);
    for (format, ext) in [(Format::Istanbul, "json"), (Format::Lcov, "info")] {
        let shards = [1, 2].map(|i| format!("c8-placeholders/shard{i}.{ext}"));
        let shards = [shards[0].as_str(), shards[1].as_str()];
        let mut ours = merged_shards(format, &shards).await;
        let c = ours.get_mut("src/c.js").unwrap();
        assert_eq!(c.branches.remove(&5).unwrap(), [Some(0)], "{ext}");
        assert_eq!(c.branches.remove(&8).unwrap(), [Some(0), Some(0)], "{ext}");
        assert_eq!(ours, theirs, "{ext}");
        assert_eq!(
            totals(&ours),
            [(30, 52), (3, 6), (6, 9)],
            "{ext}, c.js 5 and 8 aside"
        );
    }
}
