//! The reference tools on the same shard files: `lcov -a`, `grcov` and `coverage combine`
//! (installed by `scripts/install-reference-tools.sh`), each timed as one process with its peak
//! RSS, and its merged output compared with covd's.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use covd::formats::lcov;
use covd::model::Coverage;

/// One reference tool's merge of all shards.
pub(crate) struct ToolRun {
    pub(crate) name: &'static str,
    pub(crate) wall: f64,
    pub(crate) cpu: f64,
    pub(crate) peak_kb: u64,
    /// How its result compares with covd's merge.
    pub(crate) verdict: String,
}

/// Runs `cmd` under `/usr/bin/time`: wall seconds, CPU seconds (user + system) and peak RSS
/// in KB, or `None` (with a message) when it cannot run or fails.
fn timed(name: &str, cmd: &mut Command) -> Option<(f64, f64, u64)> {
    let mut time = Command::new("/usr/bin/time");
    time.args(["-f", "%M %U %S"]).arg(cmd.get_program());
    time.args(cmd.get_args());
    if let Some(dir) = cmd.get_current_dir() {
        time.current_dir(dir);
    }
    let start = Instant::now();
    let out = time
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .ok()?;
    let wall = start.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        eprintln!("{name} failed: {}", stderr.trim());
        return None;
    }
    let last = stderr.lines().last().unwrap_or("");
    let mut fields = last
        .split_whitespace()
        .map(|f| f.parse::<f64>().unwrap_or(0.0));
    let (peak, user, sys) = (
        fields.next()?,
        fields.next().unwrap_or(0.0),
        fields.next().unwrap_or(0.0),
    );
    Some((wall, user + sys, peak as u64))
}

fn installed(program: &str, probe: &[&str]) -> bool {
    Command::new(program)
        .args(probe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub(crate) fn read_lcov(path: &Path) -> Coverage {
    let mut reader = lcov::Reader::new(BufReader::with_capacity(
        1 << 20,
        File::open(path).expect("merged LCOV"),
    ));
    let mut c = Coverage::default();
    while let Some(r) = reader.next_record().expect("a well-formed merged LCOV") {
        c.add(&r.path, &r.file);
    }
    c
}

/// Line sets and hit counts of every file, ours against theirs.
fn compare_lines(ours: &Coverage, theirs: &Coverage) -> String {
    let mut differ = Vec::new();
    for (path, f) in &ours.files {
        match theirs.files.get(path) {
            Some(t) if t.line_hits().eq(f.line_hits()) => {}
            Some(_) => differ.push(format!("{path} (lines or counts)")),
            None => differ.push(format!("{path} (missing)")),
        }
    }
    differ.extend(
        theirs
            .files
            .keys()
            .filter(|p| !ours.files.contains_key(*p))
            .map(|p| format!("{p} (extra)")),
    );
    if differ.is_empty() {
        format!("equal: {} files, line sets and counts", ours.files.len())
    } else {
        format!(
            "DIFFERENT in {} files, e.g. {}",
            differ.len(),
            differ[..differ.len().min(3)].join(", ")
        )
    }
}

pub(crate) fn grcov(shards: &[PathBuf], scratch: &Path, ours: &Coverage) -> Option<ToolRun> {
    let grcov = std::env::var("GRCOV").unwrap_or_else(|_| "grcov".into());
    if !installed(&grcov, &["--version"]) {
        println!("grcov: not installed (scripts/install-reference-tools.sh, or GRCOV=path)");
        return None;
    }
    let out = scratch.join("grcov.info");
    let mut cmd = Command::new(&grcov);
    cmd.args(shards).args(["-t", "lcov", "-o"]).arg(&out);
    merge_to_lcov("grcov", &mut cmd, &out, ours)
}

pub(crate) fn lcov_add(shards: &[PathBuf], scratch: &Path, ours: &Coverage) -> Option<ToolRun> {
    if !installed("lcov", &["--version"]) {
        println!("lcov: not installed (scripts/install-reference-tools.sh)");
        return None;
    }
    let out = scratch.join("lcov.info");
    let mut cmd = Command::new("lcov");
    cmd.arg("--quiet");
    for s in shards {
        cmd.arg("-a").arg(s);
    }
    cmd.arg("-o").arg(&out);
    merge_to_lcov("lcov -a", &mut cmd, &out, ours)
}

/// Times a tool that writes its merge as LCOV to `out`, and compares that with covd's.
fn merge_to_lcov(
    name: &'static str,
    cmd: &mut Command,
    out: &Path,
    ours: &Coverage,
) -> Option<ToolRun> {
    let (wall, cpu, peak_kb) = timed(name, cmd)?;
    let verdict = compare_lines(ours, &read_lcov(out));
    let _ = std::fs::remove_file(out);
    Some(ToolRun {
        name,
        wall,
        cpu,
        peak_kb,
        verdict,
    })
}

/// `coverage combine` on the shards converted to coverage.py data files (once, kept beside the
/// shards: the conversion is not timed). coverage.py stores executed lines only, so the check
/// is of covered line sets.
pub(crate) fn coverage_combine(
    shards: &[PathBuf],
    scratch: &Path,
    ours: &Coverage,
) -> Option<ToolRun> {
    if !installed("python3", &["-c", "import coverage"]) {
        println!("coverage.py: not installed (scripts/install-reference-tools.sh)");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/lcov-to-coveragepy.py");
    let mut data_files = Vec::new();
    for shard in shards {
        let data = shard.with_extension("coverage");
        if !data.exists() {
            let tmp = shard.with_extension("coverage.partial");
            let ok = Command::new("python3")
                .arg(&script)
                .arg("convert")
                .arg(shard)
                .arg(&tmp)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("converting {} for coverage.py failed", shard.display());
                return None;
            }
            std::fs::rename(&tmp, &data).ok()?;
        }
        data_files.push(data);
    }
    let combined = scratch.join("combined.coverage");
    let _ = std::fs::remove_file(&combined);
    let (wall, cpu, peak_kb) = timed(
        "coverage combine",
        Command::new("python3")
            .args(["-m", "coverage", "combine", "--keep", "--quiet"])
            .arg(format!("--data-file={}", combined.display()))
            .args(&data_files),
    )?;
    let dump = scratch.join("combined.json");
    Command::new("python3")
        .arg(&script)
        .arg("dump")
        .arg(&combined)
        .arg(&dump)
        .status()
        .ok()?;
    let theirs: BTreeMap<String, Vec<u32>> =
        serde_json::from_reader(BufReader::new(File::open(&dump).ok()?)).ok()?;
    let ours_covered: BTreeMap<&str, Vec<u32>> = ours
        .files
        .iter()
        .filter(|(_, f)| !f.covered().is_empty())
        .map(|(p, f)| (p.as_str(), f.covered().iter().collect()))
        .collect();
    let differ = ours_covered
        .iter()
        .filter(|(p, lines)| theirs.get(**p) != Some(*lines))
        .count()
        + theirs
            .keys()
            .filter(|p| !ours_covered.contains_key(p.as_str()))
            .count();
    let verdict = if differ == 0 {
        format!("equal: {} files, covered line sets", theirs.len())
    } else {
        format!("DIFFERENT in {differ} files")
    };
    let _ = std::fs::remove_file(&combined);
    let _ = std::fs::remove_file(&dump);
    Some(ToolRun {
        name: "coverage combine",
        wall,
        cpu,
        peak_kb,
        verdict,
    })
}
