//! The dashboard in a real headless Chromium (Debian's `chromium` and `chromium-driver`, which
//! `.ci/run` installs; without them this test fails, it is not skipped): it opens the runs page
//! while a run streams, sees shards finish and the run become complete without a reload, clicks
//! into a directory and a file and checks what they show, and opens the trends and flaky pages.
//! Screenshots go to `target/dashboard/`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fantoccini::{Client, Locator};

#[path = "../../examples/common/browser.rs"]
mod browser;
use browser::Driver;

use crate::cli::Served;
use crate::support::fixture;

/// How long the page may take to show what the daemon already has.
const PATIENCE: Duration = Duration::from_secs(20);

/// The text of the first element `css` selects, once it satisfies `ok` (polling the page:
/// what is awaited is the page's own update, not a port).
async fn text_when(c: &Client, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < PATIENCE {
        if let Ok(e) = c.find(Locator::Css(css)).await
            && let Ok(text) = e.text().await
        {
            if ok(&text) {
                return text;
            }
            last = text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: `{css}` never showed it; last text `{last}`");
}

async fn screenshot(c: &Client, name: &str) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    let png = c.screenshot().await.unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_a_run_live_and_navigates_to_a_file() {
    let served = tokio::task::block_in_place(Served::start);
    let base = served.metrics.trim_end_matches("/metrics").to_owned();
    crate::consumers::tools(); // installs Chromium when it is missing, or fails saying how
    let driver = tokio::task::block_in_place(Driver::start);
    let profile = tempfile::tempdir().unwrap();
    let c = driver.browser(profile.path()).await;

    let meta = [
        "--project",
        "acme/shop",
        "--branch",
        "main",
        "--commit",
        "0123456789abcdef",
    ];
    let push = |shard: &str, files: &[PathBuf]| {
        let mut args = vec![
            "push",
            "--fail-on-error",
            "--run",
            "live-1",
            "--shard",
            shard,
        ];
        args.extend(meta);
        let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        args.extend(files.iter().map(String::as_str));
        tokio::task::block_in_place(|| served.ok(&args));
    };
    tokio::task::block_in_place(|| {
        served.ok(&[&["open", "--run", "live-1", "--shards", "3"], &meta[..]].concat())
    });
    push(
        "0",
        &[
            fixture("gcc-lcov/shard1.info"),
            fixture("junit/pytest-junit.xml"),
        ],
    );

    // The runs page, opened while the run waits for two shards.
    c.goto(&format!("{base}/#/")).await.unwrap();
    let row = "#runs tr[data-run='live-1']";
    text_when(&c, &format!("{row} .badge"), "the waiting run", |t| {
        t == "waiting"
    })
    .await;
    text_when(&c, &format!("{row} .shards"), "one shard of three", |t| {
        t.starts_with("1 of 3 finished")
    })
    .await;
    text_when(&c, "#live", "the live indicator", |t| t == "live").await;
    screenshot(&c, "1-runs-waiting").await;

    // Two more shards finish; the page follows without a reload.
    // The keyboard's place is on the run's link; live updates keep it there.
    let marker = c
        .execute(
            "window.__not_reloaded = true; \
             document.querySelector(\"#runs tr[data-run='live-1'] a\").focus(); return 1;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(marker, serde_json::json!(1));
    push("1", &[fixture("gcc-lcov/shard2.info")]);
    text_when(&c, &format!("{row} .shards"), "two shards of three", |t| {
        t.starts_with("2 of 3 finished")
    })
    .await;
    let focused = c
        .execute(
            "return document.activeElement && document.activeElement.getAttribute('href');",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(focused, serde_json::json!("#/run/live-1"), "focus lost");
    push("2", &[fixture("gcc-lcov/shard3.info")]);
    text_when(&c, &format!("{row} .badge"), "the complete run", |t| {
        t == "complete"
    })
    .await;
    let same_page = c
        .execute("return window.__not_reloaded === true;", vec![])
        .await
        .unwrap();
    assert_eq!(same_page, serde_json::json!(true), "the page was reloaded");
    screenshot(&c, "2-runs-complete").await;

    // Into the run: its shards with their tests, then down the tree to a file.
    c.find(Locator::Css(&format!("{row} a")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_when(&c, "#run-state", "the run page", |t| t == "complete").await;
    text_when(
        &c,
        "#shards tr[data-shard='0'] td:nth-child(5)",
        "shard 0's tests",
        |t| t == "6 passed, 2 failed, 3 skipped, 2 errored",
    )
    .await;
    screenshot(&c, "3-run").await;
    let mut dir_clicks = 0;
    loop {
        // The first entry of the directory shown; directories come first.
        let link = c
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css("#tree tbody tr:first-child a"))
            .await
            .unwrap();
        let href = link.attr("href").await.unwrap().unwrap_or_default();
        link.click().await.unwrap();
        if href.contains("/file/") {
            break;
        }
        dir_clicks += 1;
        assert!(dir_clicks < 10, "no file below ten directories");
        // The crumbs name the directory clicked into.
        let dir = href.rsplit('/').next().unwrap().replace("%2F", "/");
        let last = dir
            .rsplit('/')
            .find(|s| !s.is_empty())
            .unwrap_or("/")
            .to_owned();
        text_when(&c, ".crumbs [aria-current]", "the directory", |t| t == last).await;
    }
    assert!(dir_clicks >= 1);
    let lines = c
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css("#lines"))
        .await
        .unwrap();
    let covered = lines
        .find_all(Locator::Css(".line.covered"))
        .await
        .unwrap()
        .len();
    let missed = lines
        .find_all(Locator::Css(".line.missed"))
        .await
        .unwrap()
        .len();
    assert!(
        covered > 0 && missed > 0,
        "{covered} covered, {missed} missed"
    );
    let first = lines
        .find(Locator::Css(".line"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        first.contains("covered") || first.contains("not covered"),
        "{first}"
    );
    screenshot(&c, "4-file").await;

    // Trends of the project's branch: the complete run is in them.
    c.goto(&format!(
        "{base}/#/trends?project=acme%2Fshop&branch=main&by=day"
    ))
    .await
    .unwrap();
    c.wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css("#charts svg"))
        .await
        .unwrap();
    let charts = c.find_all(Locator::Css("#charts figure")).await.unwrap();
    assert_eq!(charts.len(), 4);
    let summary = text_when(&c, "main p.muted", "the trend", |t| {
        t.contains("complete runs")
    })
    .await;
    assert!(summary.starts_with("1 complete runs"), "{summary}");
    screenshot(&c, "5-trends").await;

    // The flaky page of the branch: the fixture's tests failed once, on one commit.
    c.goto(&format!("{base}/#/flaky?project=acme%2Fshop&branch=main"))
        .await
        .unwrap();
    text_when(&c, "#flaky tbody tr .badge", "a broken test", |t| {
        t == "broken"
    })
    .await;
    screenshot(&c, "6-flaky").await;

    // A run pushed with its sources: the file page shows every line of the file, the
    // measured ones with their state.
    tokio::task::block_in_place(|| {
        let out = served
            .covd(&[
                "push",
                "--fail-on-error",
                "--run",
                "with-sources",
                "--shard",
                "0",
                "--strip-prefix",
                "/builds/shard-1/",
                "--sources",
                "--source-root",
            ])
            .arg(fixture("gcc-lcov"))
            .arg(fixture("gcc-lcov/shard1.info"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    c.goto(&format!("{base}/#/run/with-sources/file/src/calc.c"))
        .await
        .unwrap();
    let calc = std::fs::read_to_string(fixture("gcc-lcov/src/calc.c")).unwrap();
    let shown = c
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css("#lines .line.src"))
        .await
        .unwrap();
    assert!(
        shown
            .text()
            .await
            .unwrap()
            .contains(calc.lines().next().unwrap())
    );
    let rows = c.find_all(Locator::Css("#lines .line")).await.unwrap();
    assert_eq!(
        rows.len(),
        calc.lines().count(),
        "a row per line of the file"
    );
    let measured = c
        .find_all(Locator::Css(
            "#lines .line.covered, #lines .line.missed, #lines .line.partial",
        ))
        .await
        .unwrap()
        .len();
    assert!(
        measured > 0 && measured < rows.len(),
        "{measured} of {}",
        rows.len()
    );
    screenshot(&c, "7-file-with-source").await;
    c.close().await.unwrap();
}

/// A daemon with tokens: the dashboard's page asks for one; a token of one project is refused
/// saying why, one of every project signs the browser in (a cookie no script can read), and
/// the runs follow live as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_the_dashboard_asks_for_one() {
    let served = tokio::task::block_in_place(Served::start);
    let base = served.metrics.trim_end_matches("/metrics").to_owned();
    let create = |project: &str| {
        let out = std::process::Command::new(crate::cli::COVD)
            .args([
                "token",
                "create",
                "--scope",
                "read",
                "--project",
                project,
                "--data-dir",
            ])
            .arg(served.data.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let (one, every) = tokio::task::block_in_place(|| (create("acme/shop"), create("*")));
    crate::consumers::tools();
    let driver = tokio::task::block_in_place(Driver::start);
    let profile = tempfile::tempdir().unwrap();
    let c = driver.browser(profile.path()).await;
    c.goto(&format!("{base}/#/")).await.unwrap();
    text_when(&c, "main h1", "the sign-in page", |t| t == "Sign in").await;
    let field = c.find(Locator::Css("#token")).await.unwrap();
    field.send_keys(&one).await.unwrap();
    c.find(Locator::Css("main form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_when(&c, "#said", "the refusal", |t| {
        t.contains("some projects only")
    })
    .await;
    screenshot(&c, "8-sign-in-refused").await;
    let field = c.find(Locator::Css("#token")).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(&every).await.unwrap();
    c.find(Locator::Css("main form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    text_when(&c, "main h1", "the runs page", |t| t == "Runs").await;
    let cookies = c.execute("return document.cookie;", vec![]).await.unwrap();
    assert_eq!(cookies, serde_json::json!(""), "the session is HttpOnly");
    // Live again: a run pushed now appears without a reload.
    tokio::task::block_in_place(|| {
        let out = served
            .covd(&["push", "--run", "after-sign-in", "--shard", "0"])
            .env("COVD_TOKEN", {
                let out = std::process::Command::new(crate::cli::COVD)
                    .args([
                        "token",
                        "create",
                        "--scope",
                        "push",
                        "--project",
                        "*",
                        "--data-dir",
                    ])
                    .arg(served.data.path())
                    .output()
                    .unwrap();
                String::from_utf8(out.stdout).unwrap().trim().to_owned()
            })
            .arg(fixture("gcc-lcov/shard1.info"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    text_when(
        &c,
        "#runs tr[data-run='after-sign-in']",
        "the new run",
        |t| !t.is_empty(),
    )
    .await;
    screenshot(&c, "9-signed-in").await;
    c.close().await.unwrap();
}
