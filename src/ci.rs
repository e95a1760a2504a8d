//! The CI provider a command runs under, read from the provider's own environment variables,
//! so that `covd push FILE` needs no flags in CI: the run (shared by every job of one pipeline
//! run, and by its retries), the shard, the attempt, the project, the commit and the branch.
//! Flags and `COVD_*` variables win over what is read here.
//!
//! Shards keep the provider's numbering (GitLab and Azure count parallel jobs from 1, CircleCI
//! and Buildkite from 0). Where a provider has no retry counter, the attempt comes from
//! something that grows with each retry of the job: GitLab before 19.3 gives the job's start
//! time, CircleCI the job's build number. The README's table lists every variable read.

/// The CI systems covd recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    GitHubActions,
    GitLab,
    Jenkins,
    CircleCi,
    Buildkite,
    AzurePipelines,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::GitHubActions => "github-actions",
            Provider::GitLab => "gitlab",
            Provider::Jenkins => "jenkins",
            Provider::CircleCi => "circleci",
            Provider::Buildkite => "buildkite",
            Provider::AzurePipelines => "azure-pipelines",
        }
    }
}

/// What the environment says of the CI job a command runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ci {
    pub provider: Provider,
    /// Shared by every job of one pipeline run and kept across retries: `<provider>/…`.
    pub run: String,
    pub shard: String,
    /// Grows with each retry of the job; `None` when the provider cannot tell.
    pub attempt: Option<u32>,
    pub project: Option<String>,
    pub commit: Option<String>,
    /// For a pull or merge request, its source branch.
    pub branch: Option<String>,
}

/// The CI job of this process's environment, if it runs in one covd recognises.
pub fn from_env() -> Option<Ci> {
    detect(|name| std::env::var(name).ok())
}

/// The CI job `var` describes (`var` reads an environment variable; an empty value counts as
/// unset).
pub fn detect(var: impl Fn(&str) -> Option<String>) -> Option<Ci> {
    let mut ci = provider(&var)?;
    ci.run = as_id(&ci.run);
    ci.shard = as_id(&ci.shard);
    Some(ci)
}

/// A name as a run or shard id: printable ASCII without spaces (`Unit tests` → `Unit_tests`).
fn as_id(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect()
}

fn provider(var: &impl Fn(&str) -> Option<String>) -> Option<Ci> {
    let get = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    let is = |name: &str, value: &str| get(name).is_some_and(|v| v.eq_ignore_ascii_case(value));
    if is("GITHUB_ACTIONS", "true") {
        github(&get)
    } else if is("GITLAB_CI", "true") {
        gitlab(&get)
    } else if is("BUILDKITE", "true") {
        buildkite(&get)
    } else if is("CIRCLECI", "true") {
        circleci(&get)
    } else if is("TF_BUILD", "true") {
        azure(&get)
    } else if get("JENKINS_URL").is_some()
        || get("BUILD_TAG").is_some_and(|t| t.starts_with("jenkins-"))
    {
        jenkins(&get)
    } else {
        None
    }
}

type Get<'a> = &'a dyn Fn(&str) -> Option<String>;

fn github(get: Get<'_>) -> Option<Ci> {
    let project = get("GITHUB_REPOSITORY");
    Some(Ci {
        provider: Provider::GitHubActions,
        // Run ids are unique within a repository.
        run: format!(
            "github/{}/{}",
            project.as_deref().unwrap_or("-"),
            get("GITHUB_RUN_ID")?
        ),
        // Every leg of a matrix has the same job id; GitHub exports nothing per leg.
        shard: get("GITHUB_JOB")?,
        attempt: number(get("GITHUB_RUN_ATTEMPT")),
        project,
        commit: get("GITHUB_SHA"),
        // A pull request's ref name is `<number>/merge`.
        branch: get("GITHUB_HEAD_REF").or_else(|| get("GITHUB_REF_NAME")),
    })
}

fn gitlab(get: Get<'_>) -> Option<Ci> {
    let name = get("CI_JOB_NAME")?;
    let shard = match parallel(get("CI_NODE_INDEX"), get("CI_NODE_TOTAL")) {
        Some(index) => {
            // `parallel: N` names the copies `rspec 2/3`.
            let base = get("CI_JOB_GROUP_NAME").unwrap_or_else(|| match name.rsplit_once(' ') {
                Some((base, n)) if n.contains('/') => base.to_owned(),
                _ => name.clone(),
            });
            format!("{base}-{index}")
        }
        None => name,
    };
    let attempt = match number(get("CI_JOB_RETRY_COUNT")) {
        Some(retries) => Some(retries.saturating_add(1)),
        // Before GitLab 19.3: a retry starts later than the job it retries.
        None => get("CI_JOB_STARTED_AT").and_then(|t| epoch_seconds(&t)),
    };
    Some(Ci {
        provider: Provider::GitLab,
        // Pipeline ids are unique on an instance.
        run: format!(
            "gitlab/{}/{}",
            get("CI_SERVER_HOST").as_deref().unwrap_or("-"),
            get("CI_PIPELINE_ID")?
        ),
        shard,
        attempt,
        project: get("CI_PROJECT_PATH"),
        commit: get("CI_COMMIT_SHA"),
        branch: get("CI_MERGE_REQUEST_SOURCE_BRANCH_NAME")
            .or_else(|| get("CI_COMMIT_BRANCH"))
            .or_else(|| {
                get("CI_COMMIT_TAG")
                    .is_none()
                    .then(|| get("CI_COMMIT_REF_NAME"))?
            }),
    })
}

fn buildkite(get: Get<'_>) -> Option<Ci> {
    let step = get("BUILDKITE_STEP_KEY").or_else(|| get("BUILDKITE_LABEL"))?;
    let shard = match parallel(
        get("BUILDKITE_PARALLEL_JOB"),
        get("BUILDKITE_PARALLEL_JOB_COUNT"),
    ) {
        Some(index) => format!("{step}-{index}"),
        None => step,
    };
    let project = get("BUILDKITE_REPO")
        .and_then(|url| repository_of(&url))
        .or_else(|| {
            Some(format!(
                "{}/{}",
                get("BUILDKITE_ORGANIZATION_SLUG")?,
                get("BUILDKITE_PIPELINE_SLUG")?
            ))
        });
    Some(Ci {
        provider: Provider::Buildkite,
        // A retried job stays in its build; a rebuild is a new build.
        run: format!("buildkite/{}", get("BUILDKITE_BUILD_ID")?),
        shard,
        attempt: number(get("BUILDKITE_RETRY_COUNT")).map(|r| r.saturating_add(1)),
        project,
        // May be `HEAD` for a build started by hand.
        commit: get("BUILDKITE_COMMIT").filter(|c| is_sha(c)),
        branch: get("BUILDKITE_BRANCH"),
    })
}

fn circleci(get: Get<'_>) -> Option<Ci> {
    let job = get("CIRCLE_JOB")?;
    let shard = match parallel(get("CIRCLE_NODE_INDEX"), get("CIRCLE_NODE_TOTAL")) {
        Some(index) => format!("{job}-{index}"),
        None => job,
    };
    let project = match (
        get("CIRCLE_PROJECT_USERNAME"),
        get("CIRCLE_PROJECT_REPONAME"),
    ) {
        (Some(owner), Some(repo)) => Some(format!("{owner}/{repo}")),
        _ => get("CIRCLE_REPOSITORY_URL").and_then(|url| repository_of(&url)),
    };
    Some(Ci {
        provider: Provider::CircleCi,
        // A rerun gets a new workflow id but keeps its workspace id, so a rerun's jobs
        // replace what they sent before.
        run: format!(
            "circleci/{}",
            get("CIRCLE_WORKFLOW_WORKSPACE_ID").or_else(|| get("CIRCLE_WORKFLOW_ID"))?
        ),
        shard,
        // No retry counter: the build number grows with every job run, reruns included.
        attempt: number(get("CIRCLE_BUILD_NUM")),
        project,
        commit: get("CIRCLE_SHA1"),
        branch: get("CIRCLE_BRANCH"),
    })
}

fn azure(get: Get<'_>) -> Option<Ci> {
    let shard = get("SYSTEM_JOBIDENTIFIER")
        .or_else(|| {
            let phase = get("SYSTEM_PHASENAME")?;
            Some(
                match parallel(
                    get("SYSTEM_JOBPOSITIONINPHASE"),
                    get("SYSTEM_TOTALJOBSINPHASE"),
                ) {
                    Some(index) => format!("{phase}-{index}"),
                    None => phase,
                },
            )
        })
        .or_else(|| get("SYSTEM_JOBDISPLAYNAME"))?;
    let pull_request = get("BUILD_REASON").is_some_and(|r| r == "PullRequest");
    let branch = pull_request
        .then(|| get("SYSTEM_PULLREQUEST_SOURCEBRANCH"))
        .flatten()
        .or_else(|| get("BUILD_SOURCEBRANCH"))
        .map(|b| b.strip_prefix("refs/heads/").unwrap_or(&b).to_owned());
    Some(Ci {
        provider: Provider::AzurePipelines,
        // Build ids are unique within an organization.
        run: format!(
            "azure/{}/{}",
            get("SYSTEM_COLLECTIONID").as_deref().unwrap_or("-"),
            get("BUILD_BUILDID")?
        ),
        shard,
        attempt: number(get("SYSTEM_JOBATTEMPT")),
        project: get("BUILD_REPOSITORY_NAME"),
        commit: get("BUILD_SOURCEVERSION"),
        branch,
    })
}

fn jenkins(get: Get<'_>) -> Option<Ci> {
    let job = get("JOB_NAME")?;
    let branch = get("CHANGE_BRANCH")
        .or_else(|| get("BRANCH_NAME"))
        .or_else(|| {
            let b = get("GIT_BRANCH")?;
            Some(b.strip_prefix("origin/").unwrap_or(&b).to_owned())
        });
    Some(Ci {
        provider: Provider::Jenkins,
        // Every rerun is a new build: a new run.
        run: format!("jenkins/{job}/{}", get("BUILD_NUMBER")?),
        // Parallel stages of one Pipeline build are its shards.
        shard: get("STAGE_NAME")
            .or_else(|| get("JOB_BASE_NAME"))
            .unwrap_or_else(|| "jenkins".to_owned()),
        attempt: None,
        project: get("GIT_URL")
            .and_then(|url| repository_of(&url))
            .or(Some(job)),
        commit: get("GIT_COMMIT"),
        branch,
    })
}

/// The index of a parallel job, when its job is split more than one way.
fn parallel(index: Option<String>, total: Option<String>) -> Option<u32> {
    let total = number(total)?;
    (total > 1).then(|| number(index)).flatten()
}

fn number(v: Option<String>) -> Option<u32> {
    v?.trim().parse().ok()
}

fn is_sha(c: &str) -> bool {
    c.len() >= 7 && c.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `owner/repo` of a clone URL: `https://github.com/acme/widgets.git`,
/// `git@github.com:acme/widgets.git`, `ssh://git@host:7999/project/widgets.git`.
fn repository_of(url: &str) -> Option<String> {
    let path = match url.split_once("://") {
        Some((_, rest)) => rest.split_once('/')?.1,
        None => url.split_once(':')?.1,
    };
    let path = path.trim_end_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    let mut parts = path.rsplit('/').filter(|p| !p.is_empty());
    let repo = parts.next()?;
    Some(match parts.next() {
        Some(owner) => format!("{owner}/{repo}"),
        None => repo.to_owned(),
    })
}

/// Seconds since the Unix epoch of an ISO 8601 time (`2026-11-30T09:31:44Z`, or with an
/// offset, `+01:00`); `None` when it is not one or does not fit a u32.
fn epoch_seconds(t: &str) -> Option<u32> {
    let t = t.trim();
    let (date, rest) = t.split_once('T')?;
    let mut ymd = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let time_end = rest.find(['Z', '+', '-']).unwrap_or(rest.len());
    let (time, zone) = rest.split_at(time_end);
    let mut hms = time
        .split(':')
        .map(|p| p.split('.').next()?.parse::<i64>().ok());
    let (h, mi, s) = (
        hms.next()??,
        hms.next()??,
        hms.next().flatten().unwrap_or(0),
    );
    let offset = match zone {
        "" | "Z" => 0,
        z => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let digits = &z[1..];
            let (oh, om) = match digits.split_once(':') {
                Some(parts) => parts,
                // `+0100`, `+01`
                None if digits.len() == 4 => digits.split_at(2),
                None => (digits, "0"),
            };
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60)
        }
    };
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u32::try_from(days * 86_400 + h * 3600 + mi * 60 + s - offset).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_become_epoch_seconds() {
        assert_eq!(epoch_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(epoch_seconds("2026-11-30T09:31:44Z"), Some(1_796_031_104));
        assert_eq!(
            epoch_seconds("2026-11-30T10:31:44+01:00"),
            Some(1_796_031_104)
        );
        assert_eq!(epoch_seconds("2000-02-29T12:00:00.123Z"), Some(951_825_600));
        assert_eq!(epoch_seconds("yesterday"), None);
        assert_eq!(epoch_seconds("1960-01-01T00:00:00Z"), None);
    }

    #[test]
    fn clone_urls_give_owner_and_repository() {
        for (url, want) in [
            ("https://github.com/acme/widgets.git", "acme/widgets"),
            ("git@github.com:acme/widgets.git", "acme/widgets"),
            (
                "ssh://git@gitserver:7999/project/widgets.git",
                "project/widgets",
            ),
            (
                "https://gitlab.example.com/group/sub/widgets/",
                "sub/widgets",
            ),
        ] {
            assert_eq!(repository_of(url).as_deref(), Some(want), "{url}");
        }
    }
}
