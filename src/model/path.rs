//! Source paths: the rules that make shards' paths agree, and the check that refuses hostile
//! ones before they reach the aggregate (or, later, an HTML report's output directory).

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path is empty")]
    Empty,
    #[error("the path is {len} bytes long; the limit is {max}")]
    TooLong { len: usize, max: usize },
    #[error("the path contains a `..` component")]
    ParentComponent,
    #[error("the path contains a control character (byte {0:#04x})")]
    ControlCharacter(u8),
    /// A C1 control, a bidirectional formatting character (which can make a report show a
    /// path other than the one stored) or a line or paragraph separator.
    #[error("the path contains the invisible character U+{:04X}", u32::from(*.0))]
    InvisibleCharacter(char),
}

/// The longest path accepted, in bytes (Linux's PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;

/// Characters that change what a reader sees without being seen: C1 controls, Unicode's
/// bidirectional marks, embeddings, overrides and isolates, and the line and paragraph
/// separators.
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{80}'..='\u{9f}'
        | '\u{61c}'
        | '\u{200e}'
        | '\u{200f}'
        | '\u{2028}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}')
}

/// Refuses paths that are empty, too long, carry control characters (NUL included) or
/// invisible ones, or climb out of their root with `..`. Absolute paths are accepted: without
/// path rules, that is what most tools write.
pub fn check(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong {
            len: path.len(),
            max: MAX_PATH_BYTES,
        });
    }
    if let Some(b) = path.bytes().find(|b| b.is_ascii_control()) {
        return Err(PathError::ControlCharacter(b));
    }
    if !path.is_ascii()
        && let Some(c) = path.chars().find(|c| invisible(*c))
    {
        return Err(PathError::InvisibleCharacter(c));
    }
    if path.split(['/', '\\']).any(|c| c == "..") {
        return Err(PathError::ParentComponent);
    }
    Ok(())
}

/// Rewrites the paths one shard reports so that all shards agree. Applied in order: the first
/// matching `map` rule, then the first matching `strip` prefix, then `root`; finally `./` and
/// repeated slashes are removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathRules {
    /// Literal prefixes removed from the start of a path (`/builds/shard-3/`).
    pub strip: Vec<String>,
    /// `(from, to)`: a path starting with `from` has it replaced by `to`.
    pub map: Vec<(String, String)>,
    /// Paths under this directory are made relative to it (component-wise: `/src` does not
    /// match `/srcx/a`).
    pub root: Option<String>,
}

impl PathRules {
    pub fn is_empty(&self) -> bool {
        self.strip.is_empty() && self.map.is_empty() && self.root.is_none()
    }

    pub fn apply(&self, path: &str) -> String {
        let mut p = path.to_owned();
        if let Some((from, to)) = self
            .map
            .iter()
            .find(|(from, _)| p.starts_with(from.as_str()))
        {
            p = format!("{to}{}", &p[from.len()..]);
        }
        if let Some(prefix) = self.strip.iter().find(|s| p.starts_with(s.as_str())) {
            p = p[prefix.len()..].to_owned();
        }
        if let Some(root) = &self.root {
            let root = root.trim_end_matches('/');
            if let Some(rest) = p.strip_prefix(root)
                && let Some(rest) = rest.strip_prefix('/')
            {
                p = rest.to_owned();
            }
        }
        normalize(&p).into_owned()
    }
}

/// Removes `.` components, repeated slashes and a trailing slash, keeping a leading `/`, so
/// that `./src//a.c` and `src/a.c` name one file. Borrows when there is nothing to remove.
pub fn normalize(path: &str) -> std::borrow::Cow<'_, str> {
    let absolute = path.starts_with('/');
    let body = if absolute { &path[1..] } else { path };
    if body.split('/').all(|c| !c.is_empty() && c != ".") {
        return std::borrow::Cow::Borrowed(path);
    }
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    let joined = parts.join("/");
    std::borrow::Cow::Owned(if absolute {
        format!("/{joined}")
    } else {
        joined
    })
}

/// Which paths to keep: those matching any `include` glob (all, when there is none) and no
/// `exclude` glob. Globs use `**` for any number of directories (`src/**/*.rs`).
#[derive(Debug, Clone, Default)]
pub struct PathFilter {
    include: Option<globset::GlobSet>,
    exclude: Option<globset::GlobSet>,
}

impl PathFilter {
    pub fn new(include: &[String], exclude: &[String]) -> Result<PathFilter, globset::Error> {
        let set = |globs: &[String]| -> Result<Option<globset::GlobSet>, globset::Error> {
            if globs.is_empty() {
                return Ok(None);
            }
            let mut b = globset::GlobSetBuilder::new();
            for g in globs {
                b.add(
                    globset::GlobBuilder::new(g)
                        .literal_separator(true)
                        .build()?,
                );
            }
            b.build().map(Some)
        };
        Ok(PathFilter {
            include: set(include)?,
            exclude: set(exclude)?,
        })
    }

    pub fn is_everything(&self) -> bool {
        self.include.is_none() && self.exclude.is_none()
    }

    pub fn keeps(&self, path: &str) -> bool {
        self.include.as_ref().is_none_or(|g| g.is_match(path))
            && !self.exclude.as_ref().is_some_and(|g| g.is_match(path))
    }
}

/// A repository's files (`git ls-files`), and the rule that puts a path a tool wrote somewhere
/// else back among them: Codecov's path fixing. A path that is not one of the files is the file
/// that shares its longest ending, component by component, when exactly one does, and the
/// ending is the whole file path or at least two components (a file name alone would put
/// `/usr/include/config.h` on the repository's `src/config.h`): coverage.py's Cobertura writes
/// `/srv/ci/workspace/toolz-1.2.0/toolz/dicttoolz.py` (its `<source>` joined with the file) for
/// `toolz/dicttoolz.py`. Two files that share the longest ending leave the path unresolved.
#[derive(Debug, Default)]
pub struct RepoFiles {
    files: std::collections::HashSet<Box<str>>,
    /// The files by their last component.
    by_name: std::collections::HashMap<Box<str>, Vec<Box<str>>>,
}

/// What a diff's path is among the paths a run holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found<K> {
    /// The path itself, or the one path that ends with `/path`.
    One(K),
    /// Several paths end with `/path` (at most [`MAX_CANDIDATES`] are named).
    Several(Vec<K>),
    None,
}

/// Candidates named of an ambiguous path.
pub const MAX_CANDIDATES: usize = 3;

/// Finds `path` among `keys`: a diff names files from the repository's root, and coverage may
/// name them under a prefix (`/builds/x/src/a.py` for `src/a.py`). `exact` looks the path up
/// first, without a scan.
pub fn find_suffixed<K: AsRef<str> + Clone>(
    path: &str,
    exact: Option<K>,
    keys: impl IntoIterator<Item = K>,
) -> Found<K> {
    if let Some(k) = exact {
        return Found::One(k);
    }
    let mut found: Vec<K> = Vec::new();
    for key in keys {
        let k = key.as_ref();
        if k.len() > path.len()
            && k.ends_with(path)
            && k.as_bytes()[k.len() - path.len() - 1] == b'/'
        {
            found.push(key);
        }
    }
    if found.len() == 1 {
        return Found::One(found.remove(0));
    }
    if found.is_empty() {
        return Found::None;
    }
    found.sort_unstable_by(|a, b| a.as_ref().cmp(b.as_ref()));
    found.truncate(MAX_CANDIDATES);
    Found::Several(found)
}

/// What a path is among a repository's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// One of the files.
    Known,
    /// Not one of them, but the one that shares its longest ending.
    Resolved(String),
    /// Not one of them, and several share its longest ending (at most a few are named).
    Ambiguous(Vec<String>),
    /// Not one of them, and none shares even its file name.
    Unknown,
}

impl RepoFiles {
    pub fn new(files: impl IntoIterator<Item = String>) -> RepoFiles {
        let mut repo = RepoFiles::default();
        for f in files {
            let name: Box<str> = f.rsplit('/').next().unwrap_or(&f).into();
            let f: Box<str> = f.into();
            if repo.files.insert(f.clone()) {
                repo.by_name.entry(name).or_default().push(f);
            }
        }
        repo
    }

    pub fn contains(&self, path: &str) -> bool {
        self.files.contains(path)
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn resolve(&self, path: &str) -> Resolution {
        if self.files.contains(path) {
            return Resolution::Known;
        }
        let name = path.rsplit('/').next().unwrap_or(path);
        let Some(candidates) = self.by_name.get(name) else {
            return Resolution::Unknown;
        };
        let shared = |file: &str| {
            file.rsplit('/')
                .zip(path.rsplit('/'))
                .take_while(|(a, b)| a == b)
                .count()
        };
        let enough = |file: &str| {
            let n = shared(file);
            n >= 2 || n == file.split('/').count()
        };
        let longest = candidates
            .iter()
            .filter(|c| enough(c))
            .map(|c| shared(c))
            .max();
        let Some(longest) = longest else {
            return Resolution::Unknown;
        };
        let best: Vec<&Box<str>> = candidates
            .iter()
            .filter(|c| enough(c) && shared(c) == longest)
            .collect();
        match best.as_slice() {
            [one] => Resolution::Resolved(one.to_string()),
            many => Resolution::Ambiguous(many.iter().take(4).map(|c| c.to_string()).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diff_path_is_found_whole_or_as_the_one_ending() {
        let keys = ["/b/src/a.py", "/b/lib/a.py", "/b/src/ba.py", "/b/src/c.py"];
        let find = |p: &'static str| find_suffixed(p, keys.contains(&p).then_some(p), keys);
        assert_eq!(find("/b/src/a.py"), Found::One("/b/src/a.py"));
        assert_eq!(find("src/a.py"), Found::One("/b/src/a.py"));
        assert_eq!(find("c.py"), Found::One("/b/src/c.py"));
        // `ba.py` does not end with `/a.py`.
        assert_eq!(
            find("a.py"),
            Found::Several(vec!["/b/lib/a.py", "/b/src/a.py"])
        );
        assert_eq!(find("d.py"), Found::None);
        let many: Vec<String> = (0..9).map(|i| format!("d{i}/x.py")).collect();
        let Found::Several(named) = find_suffixed("x.py", None, many.iter()) else {
            panic!("several")
        };
        assert_eq!(named.len(), MAX_CANDIDATES);
    }

    #[test]
    fn a_path_written_elsewhere_resolves_to_the_one_file_with_its_longest_ending() {
        let repo = RepoFiles::new(
            [
                "toolz/curried/__init__.py",
                "toolz/__init__.py",
                "toolz/dicttoolz.py",
                "a/util.py",
                "b/util.py",
            ]
            .map(String::from),
        );
        let r = |p: &str| repo.resolve(p);
        assert_eq!(r("toolz/dicttoolz.py"), Resolution::Known);
        assert_eq!(
            r("/srv/ci/workspace/toolz-1.2.0/toolz/curried/__init__.py"),
            Resolution::Resolved("toolz/curried/__init__.py".into())
        );
        assert_eq!(
            r("/srv/ci/workspace/toolz-1.2.0/toolz/__init__.py"),
            Resolution::Resolved("toolz/__init__.py".into())
        );
        // A file name alone is not enough: it could be anybody's `dicttoolz.py`.
        assert_eq!(r("/x/dicttoolz.py"), Resolution::Unknown);
        assert_eq!(
            r("/build/a/util.py"),
            Resolution::Resolved("a/util.py".into())
        );
        assert_eq!(r("/build/nothing.py"), Resolution::Unknown);
        let repo = RepoFiles::new(["setup.py", "a/x/util.py", "b/x/util.py"].map(String::from));
        // A file at the top is its whole path.
        assert_eq!(
            repo.resolve("/srv/ci/setup.py"),
            Resolution::Resolved("setup.py".into())
        );
        assert_eq!(
            repo.resolve("/build/x/util.py"),
            Resolution::Ambiguous(vec!["a/x/util.py".into(), "b/x/util.py".into()])
        );
    }

    #[test]
    fn hostile_paths_are_refused() {
        assert_eq!(check(""), Err(PathError::Empty));
        assert_eq!(
            check("src/../../etc/passwd"),
            Err(PathError::ParentComponent)
        );
        assert_eq!(check("..\\x"), Err(PathError::ParentComponent));
        assert_eq!(check("a\0b"), Err(PathError::ControlCharacter(0)));
        assert!(matches!(
            check(&"a".repeat(5000)),
            Err(PathError::TooLong { len: 5000, .. })
        ));
        assert_eq!(check("src/a..b/c.rs"), Ok(()));
        assert_eq!(check("/abs/path.c"), Ok(()));
    }

    #[test]
    fn filters_keep_included_and_drop_excluded_paths() {
        let f = PathFilter::new(
            &["src/**".into()],
            &["**/tests/**".into(), "*.gen.c".into()],
        )
        .unwrap();
        assert!(f.keeps("src/a/b.c"));
        assert!(!f.keeps("lib/a.c"));
        assert!(!f.keeps("src/tests/t.c"));
        assert!(f.keeps("src/x.gen.c"), "`*` does not cross directories");
        assert!(PathFilter::new(&[], &[]).unwrap().keeps("anything"));
        assert!(PathFilter::new(&["[".into()], &[]).is_err());
    }

    #[test]
    fn rules_make_shard_paths_agree() {
        let rules = PathRules {
            strip: vec!["/srv/ci/shard2/toolz-1.2.0/".into()],
            ..PathRules::default()
        };
        assert_eq!(
            rules.apply("/srv/ci/shard2/toolz-1.2.0/toolz/a.py"),
            "toolz/a.py"
        );
        let rules = PathRules {
            map: vec![("/builds/shard-3/".into(), "repo/".into())],
            ..PathRules::default()
        };
        assert_eq!(rules.apply("/builds/shard-3/src/x.c"), "repo/src/x.c");
        let rules = PathRules {
            root: Some("/work/repo/".into()),
            ..PathRules::default()
        };
        assert_eq!(rules.apply("/work/repo/src/x.c"), "src/x.c");
        assert_eq!(rules.apply("/work/repox/src/x.c"), "/work/repox/src/x.c");
        assert_eq!(rules.apply("/usr/include/stdio.h"), "/usr/include/stdio.h");
        assert_eq!(PathRules::default().apply("./src//a.c"), "src/a.c");
    }
}
