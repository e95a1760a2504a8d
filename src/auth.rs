//! Access tokens: who may do what to which projects' runs.
//!
//! A token reads `covd_<id>_<secret>`: the id names it (in lists, logs and refusals), the
//! secret is 32 random bytes. The store keeps the id, the SHA-256 of the secret and a
//! [`TokenRecord`] (its projects, scope, run, expiry, revocation), never the token itself. It
//! is a database of its own, `tokens.sqlite3` in the data directory, so that `covd token`
//! changes it while the daemon runs (the daemon holds the data's `LOCK`); the daemon sees a
//! change at the next call (SQLite's `data_version`). Revoked tokens stay as records: a store
//! that ever held a token requires one on every call, even once they are all revoked.
//!
//! Scopes nest: `read` queries, watches and exports; `push` opens and writes runs, and reads
//! them; `admin` does everything, deleting runs included. A token reaches the runs of the
//! projects its pattern matches (a name, or a glob: `acme/*`), and only one run if it names
//! one.
//!
//! A token is checked when a call starts, and again while a long call lasts (an ingest stream,
//! a watch, a waiting export, the dashboard's events): [`Auth::lapsed`] ends them when their
//! token is revoked, deleted or expires, so revoking a token cuts off what it holds open too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::persist::codec;
use crate::persist::records::TokenRecord;

/// The token store's file, in the data directory.
pub const TOKENS_FILE: &str = "tokens.sqlite3";

/// What a token may do; each scope includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read = 1,
    Push = 2,
    Admin = 3,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Push => "push",
            Scope::Admin => "admin",
        }
    }

    fn of(n: u32) -> Option<Scope> {
        Some(match n {
            1 => Scope::Read,
            2 => Scope::Push,
            3 => Scope::Admin,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the token store {path}: {source}")]
    Store {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("a token record does not read: {0}")]
    Record(#[from] codec::CodecError),
    #[error("no token `{0}` in the store")]
    NoSuchToken(String),
    #[error("project pattern `{0}`: {1}")]
    Pattern(String, String),
    #[error("the system's random source failed: {0}")]
    Random(String),
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No token, or one the daemon does not accept (unknown, expired, revoked): UNAUTHENTICATED.
    Unauthenticated(String),
    /// A valid token without the right: PERMISSION_DENIED.
    PermissionDenied(String),
}

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn open(path: &Path) -> Result<Connection, AuthError> {
    let store = |source| AuthError::Store {
        path: path.to_owned(),
        source,
    };
    let conn = Connection::open(path).map_err(store)?;
    // Hashes of 256-bit secrets say nothing useful, but the list of tokens is nobody's else.
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    // WAL: the daemon's reads on every call never wait for `covd token`'s writes.
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(store)?;
    conn.busy_timeout(Duration::from_secs(1)).map_err(store)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS tokens (
             id TEXT PRIMARY KEY, secret_sha256 BLOB NOT NULL, record BLOB NOT NULL);",
    )
    .map_err(store)?;
    Ok(conn)
}

/// The token store as `covd token` changes it.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    conn: Connection,
}

/// What a new token may do.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub project: String,
    pub scope: Scope,
    pub run: Option<String>,
    pub expires_in: Option<Duration>,
}

impl TokenStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<TokenStore, AuthError> {
        Ok(TokenStore {
            path: path.to_owned(),
            conn: open(path)?,
        })
    }

    fn failed(&self, source: rusqlite::Error) -> AuthError {
        AuthError::Store {
            path: self.path.clone(),
            source,
        }
    }

    /// Makes a token: returns it (the only time it exists in full) and its record.
    pub fn create(&self, new: &NewToken) -> Result<(String, TokenRecord), AuthError> {
        if new.project.trim().is_empty() {
            return Err(AuthError::Pattern(
                new.project.clone(),
                "empty: name a project, a glob (`acme/*`), or `*` for every one".into(),
            ));
        }
        glob(&new.project).map_err(|e| AuthError::Pattern(new.project.clone(), e))?;
        let mut id = [0u8; 6];
        let mut secret = [0u8; 32];
        getrandom::fill(&mut id)
            .and_then(|()| getrandom::fill(&mut secret))
            .map_err(|e| AuthError::Random(e.to_string()))?;
        let id = hex(&id);
        let secret = hex(&secret);
        let created = now_ms();
        let record = TokenRecord {
            id: id.clone(),
            project: new.project.clone(),
            scope: new.scope as u32,
            run: new.run.clone().unwrap_or_default(),
            created_at_ms: created,
            expires_at_ms: new
                .expires_in
                .map(|d| created.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))),
            revoked_at_ms: None,
        };
        self.conn
            .execute(
                "INSERT INTO tokens (id, secret_sha256, record) VALUES (?1, ?2, ?3)",
                params![id, &hash(&secret)[..], codec::encode(&record)],
            )
            .map_err(|e| self.failed(e))?;
        Ok((format!("covd_{id}_{secret}"), record))
    }

    /// Every token's record, revoked and expired ones included, oldest first.
    pub fn list(&self) -> Result<Vec<TokenRecord>, AuthError> {
        let rows: Vec<Vec<u8>> = self
            .conn
            .prepare("SELECT record FROM tokens")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(|e| self.failed(e))?;
        let mut records = rows
            .iter()
            .map(|b| codec::decode_later::<TokenRecord>(b))
            .collect::<Result<Vec<_>, _>>()?;
        records.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(records)
    }

    /// Revokes token `id` (by its id, or the whole token): the daemon refuses it from its next
    /// call on. Returns its record.
    pub fn revoke(&self, id: &str) -> Result<TokenRecord, AuthError> {
        let id = parse(id).map_or(id, |(id, _)| id);
        let found: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT record FROM tokens WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.failed(e))?;
        let Some(bytes) = found else {
            return Err(AuthError::NoSuchToken(id.to_owned()));
        };
        let mut record: TokenRecord = codec::decode_later(&bytes)?;
        record.revoked_at_ms.get_or_insert(now_ms());
        self.conn
            .execute(
                "UPDATE tokens SET record = ?2 WHERE id = ?1",
                params![id, codec::encode(&record)],
            )
            .map_err(|e| self.failed(e))?;
        Ok(record)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `covd_<id>_<secret>` as its id and secret.
fn parse(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("covd_")?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// The projects a token of some projects reaches.
#[derive(Debug, Clone)]
enum Reach {
    Glob(globset::GlobMatcher),
    Nothing,
}

/// Who made a call, as far as the daemon may tell.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The token's id; `None` when the daemon requires none.
    pub id: Option<String>,
    pub scope: Scope,
    /// The projects it reaches, as stored (see [`Auth::authenticate`]); `None`: every one.
    projects: Option<Reach>,
    /// The pattern as the token names it, for messages.
    pattern: String,
    /// An exact project name, when the pattern is one (as stored).
    exact: Option<String>,
    run: Option<String>,
}

impl Principal {
    /// A daemon without tokens: anybody may do anything.
    pub fn anyone() -> Principal {
        Principal {
            id: None,
            scope: Scope::Admin,
            projects: None,
            pattern: "*".into(),
            exact: None,
            run: None,
        }
    }

    fn named(&self) -> String {
        match &self.id {
            Some(id) => format!("token {id} ({} of {})", self.scope.name(), self.pattern),
            None => "this client".into(),
        }
    }

    /// Refused unless the token's scope includes `need`.
    pub fn needs(&self, need: Scope, to: &str) -> Result<(), Denied> {
        if self.scope >= need {
            return Ok(());
        }
        Err(Denied::PermissionDenied(format!(
            "{} may not {to}: that needs {} token",
            self.named(),
            match need {
                Scope::Read => "a read",
                Scope::Push => "a push",
                Scope::Admin => "an admin",
            }
        )))
    }

    /// Whether the token reaches the runs of `project` (as stored).
    pub fn reaches_project(&self, project: &str) -> bool {
        match &self.projects {
            None => true,
            Some(Reach::Glob(m)) => m.is_match(project),
            Some(Reach::Nothing) => false,
        }
    }

    /// Whether the token names one run (so may not read across its project).
    pub fn reaches_one_run(&self) -> bool {
        self.run.is_some()
    }

    /// Whether the token reaches every project (so may read across them).
    pub fn reaches_all_projects(&self) -> bool {
        self.projects.is_none() && self.run.is_none()
    }

    /// Whether the token reaches run `run_id` of `project` (as stored).
    pub fn reaches_run(&self, run_id: &str, project: &str) -> bool {
        self.run.as_deref().is_none_or(|r| r == run_id) && self.reaches_project(project)
    }

    /// Refused unless the token reaches run `run_id` of `project`.
    pub fn check_run(&self, run_id: &str, project: &str) -> Result<(), Denied> {
        if self.reaches_run(run_id, project) {
            return Ok(());
        }
        Err(Denied::PermissionDenied(format!(
            "{} does not reach run `{run_id}` (of another project{})",
            self.named(),
            if self.run.is_some() {
                ", or not its run"
            } else {
                ""
            }
        )))
    }

    /// Refused if the token names a run other than `run_id`.
    pub fn check_run_id(&self, run_id: &str) -> Result<(), Denied> {
        match &self.run {
            Some(run) if run != run_id => Err(Denied::PermissionDenied(format!(
                "{} reaches run `{run}` only",
                self.named()
            ))),
            _ => Ok(()),
        }
    }

    /// Refused unless the token reaches `project` (as stored; `shown` as the call named it).
    pub fn check_project(&self, project: &str, shown: &str) -> Result<(), Denied> {
        if self.reaches_project(project) && self.run.is_none() {
            return Ok(());
        }
        Err(Denied::PermissionDenied(format!(
            "{} does not reach project `{shown}`",
            self.named()
        )))
    }

    /// The project a new run of this token belongs to when the call names none: the token's
    /// own, when it names exactly one.
    pub fn own_project(&self) -> Option<&str> {
        self.exact.as_deref()
    }
}

/// The daemon's side: the tokens it accepts, reloaded when `covd token` changes them.
#[derive(Debug)]
pub struct Auth {
    store: Option<Mutex<Loaded>>,
    /// Counts the times the store's tokens were read anew: long calls look at their token
    /// again when it moves.
    reloads: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug)]
struct Loaded {
    path: PathBuf,
    conn: Connection,
    /// `PRAGMA data_version` when `tokens` was read.
    version: Option<i64>,
    tokens: HashMap<String, ([u8; 32], TokenRecord)>,
    /// Once the store held a token, calls need one for the daemon's life, whatever becomes of
    /// the file (emptied, its rows damaged): a store in trouble fails closed.
    required: bool,
    /// The file opened (device, inode): a file put in its place is opened anew.
    file: Option<(u64, u64)>,
}

impl Loaded {
    fn refresh(&mut self) -> Result<(), AuthError> {
        use std::os::unix::fs::MetadataExt as _;
        let now = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if now.is_none() && self.required {
            return Err(AuthError::Store {
                path: self.path.clone(),
                source: rusqlite::Error::InvalidPath(self.path.clone()),
            });
        }
        if now != self.file {
            self.conn = open(&self.path)?;
            self.file = std::fs::metadata(&self.path)
                .ok()
                .map(|m| (m.dev(), m.ino()));
            self.version = None;
        }
        let failed = |source| AuthError::Store {
            path: self.path.clone(),
            source,
        };
        let version: i64 = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(failed)?;
        if self.version == Some(version) {
            return Ok(());
        }
        let rows: Vec<(String, Vec<u8>, Vec<u8>)> = self
            .conn
            .prepare("SELECT id, secret_sha256, record FROM tokens")
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .map_err(failed)?;
        let mut tokens = HashMap::with_capacity(rows.len());
        for (id, digest, record) in rows {
            let Ok(digest) = <[u8; 32]>::try_from(&digest[..]) else {
                tracing::warn!(token = %id, "a token's hash is not 32 bytes; it is refused");
                continue;
            };
            tokens.insert(id, (digest, codec::decode_later::<TokenRecord>(&record)?));
        }
        self.required |= !tokens.is_empty();
        self.tokens = tokens;
        self.version = Some(version);
        Ok(())
    }
}

impl Auth {
    /// No tokens: every call is anybody's.
    pub fn none() -> Auth {
        Auth {
            store: None,
            reloads: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The token store at `path` (created if missing, so that tokens made later apply).
    pub fn open(path: &Path) -> Result<Auth, AuthError> {
        use std::os::unix::fs::MetadataExt as _;
        let conn = open(path)?;
        let mut loaded = Loaded {
            path: path.to_owned(),
            conn,
            version: None,
            tokens: HashMap::new(),
            required: false,
            file: std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino())),
        };
        loaded.refresh()?;
        Ok(Auth {
            store: Some(Mutex::new(loaded)),
            reloads: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Reads the store every `every` while `auth` lives, so that [`Auth::lapsed`] hears of a
    /// token revoked or deleted by `covd token` even when no call comes in. Spawned by the
    /// server; for a daemon without a store it ends at once.
    pub async fn keep_fresh(auth: Weak<Auth>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(auth) = auth.upgrade() else { return };
            if auth.store.is_none() {
                return;
            }
            // A failure is logged by `with`, and the long calls it concerns end.
            let _ = auth.with(|_| Ok(()));
        }
    }

    /// Whether calls need a token: the store holds (or held) one.
    pub fn required(&self) -> bool {
        self.store.is_some() && self.with(|l| Ok(l.required)).unwrap_or(true)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Loaded) -> Result<T, Denied>) -> Result<T, Denied> {
        let Some(store) = &self.store else {
            return Err(Denied::Unauthenticated("no token store".into()));
        };
        let mut loaded = store.lock().unwrap_or_else(|e| e.into_inner());
        let before = loaded.version;
        let refreshed = loaded.refresh();
        if refreshed.is_err() || loaded.version != before {
            self.reloads.send_modify(|n| *n += 1);
        }
        if let Err(e) = refreshed {
            // Refusing is the safe answer: a store that cannot be read accepts nobody.
            tracing::error!("reading the token store failed: {e}");
            return Err(Denied::Unauthenticated(
                "the daemon cannot read its token store (see its log)".into(),
            ));
        }
        f(&mut loaded)
    }

    /// Refused if the token `who` presented at the start of a call no longer admits it:
    /// revoked, deleted or expired since, or the store cannot be read; and a call made
    /// without a token once the daemon requires one. Otherwise the token's expiry as the
    /// store says it now.
    pub fn still_admits(&self, who: &Principal) -> Result<Option<u64>, Denied> {
        if self.store.is_none() {
            return Ok(None);
        }
        self.with(|loaded| {
            let Some(id) = &who.id else {
                return match loaded.required {
                    true => Err(Denied::Unauthenticated(
                        "this daemon now requires a token: give --token or COVD_TOKEN".into(),
                    )),
                    false => Ok(None),
                };
            };
            let Some((_, record)) = loaded.tokens.get(id) else {
                return Err(Denied::Unauthenticated(format!(
                    "token {id} was deleted from the store"
                )));
            };
            if record.revoked_at_ms.is_some() {
                return Err(Denied::Unauthenticated(format!("token {id} was revoked")));
            }
            if record.expires_at_ms.is_some_and(|at| at <= now_ms()) {
                return Err(Denied::Unauthenticated(format!("token {id} has expired")));
            }
            Ok(record.expires_at_ms)
        })
    }

    /// Waits until `who`'s token no longer admits it (see [`Auth::still_admits`]) and says
    /// why: a long call selects on it and ends with that refusal. Never, on a daemon without
    /// a token store. It wakes when the store is read anew or the token's expiry comes, not
    /// on a clock of its own, so a thousand open streams cost nothing while tokens stay put.
    pub fn lapsed(self: &Arc<Self>, who: &Principal) -> impl Future<Output = Denied> + use<> {
        let (auth, who) = (self.clone(), who.clone());
        let mut reloads = self.reloads.subscribe();
        async move {
            if auth.store.is_none() {
                return std::future::pending().await;
            }
            loop {
                // Seen before the check: a reload during or after it wakes the wait below.
                reloads.borrow_and_update();
                let expiry = match auth.still_admits(&who) {
                    Err(denied) => return denied,
                    Ok(expiry) => expiry,
                };
                let expiry = expiry.map(|at| {
                    tokio::time::Instant::now() + Duration::from_millis(at.saturating_sub(now_ms()))
                });
                tokio::select! {
                    changed = reloads.changed() => if changed.is_err() {
                        return std::future::pending().await;
                    },
                    () = async {
                        match expiry {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    } => {}
                }
            }
        }
    }

    /// Who presents `authorization` (an `authorization` header's value, if any). `stored`
    /// maps a project name to the form runs keep it in (see [`crate::privacy`]), so that a
    /// token of `acme/shop` reaches its runs under a pseudonym.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        stored: impl Fn(&str) -> String,
    ) -> Result<Principal, Denied> {
        if self.store.is_none() {
            return Ok(Principal::anyone());
        }
        self.with(|loaded| {
            if !loaded.required {
                return Ok(Principal::anyone());
            }
            let Some(value) = authorization else {
                return Err(Denied::Unauthenticated(
                    "this daemon requires a token: give --token or COVD_TOKEN \
                     (`authorization: Bearer covd_…`)"
                        .into(),
                ));
            };
            let token = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .map(str::trim)
                .and_then(parse);
            let Some((id, secret)) = token else {
                return Err(Denied::Unauthenticated(
                    "the authorization is not `Bearer covd_<id>_<secret>`".into(),
                ));
            };
            let unknown =
                || Denied::Unauthenticated("the token is not one this daemon knows".into());
            let Some((digest, record)) = loaded.tokens.get(id) else {
                // The same work as for a known id: no timing tells ids apart.
                let _ = hash(secret).ct_eq(&[0; 32]);
                return Err(unknown());
            };
            if !bool::from(hash(secret).ct_eq(digest)) {
                return Err(unknown());
            }
            if record.revoked_at_ms.is_some() {
                return Err(Denied::Unauthenticated(format!("token {id} was revoked")));
            }
            if record.expires_at_ms.is_some_and(|at| at <= now_ms()) {
                return Err(Denied::Unauthenticated(format!("token {id} has expired")));
            }
            let scope = Scope::of(record.scope).ok_or_else(|| {
                Denied::Unauthenticated(format!("token {id} has an unknown scope"))
            })?;
            let pattern = record.project.clone();
            let is_glob = pattern.contains(['*', '?', '[', '{']);
            let exact = (!is_glob).then(|| stored(&pattern));
            let bad = |e: String| Denied::Unauthenticated(format!("token {id}'s projects: {e}"));
            let projects = match (&exact, pattern.as_str()) {
                (_, "*" | "**") => None,
                // Kept anonymous, every run's project reads the same: a token of some projects
                // cannot tell its own apart, so it reaches none.
                (Some(name), _) if name.is_empty() => Some(Reach::Nothing),
                (Some(name), _) => Some(Reach::Glob(glob(&globset::escape(name)).map_err(bad)?)),
                // A glob keeps its vendor part plain (pseudonyms keep it too).
                (None, p) => Some(Reach::Glob(glob(p).map_err(bad)?)),
            };
            Ok(Principal {
                id: Some(id.to_owned()),
                scope,
                projects,
                pattern,
                exact,
                run: (!record.run.is_empty()).then(|| record.run.clone()),
            })
        })
    }
}

/// A project pattern: `*` stays within one path component (`acme/*` is not `acme/a/b`), `**`
/// crosses them.
fn glob(pattern: &str) -> Result<globset::GlobMatcher, String> {
    globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_by_hash_scope_project_run_expiry_and_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKENS_FILE);
        let auth = Auth::open(&path).unwrap();
        let plain = |p: &str| p.to_owned();
        assert!(!auth.required());
        assert_eq!(auth.authenticate(None, plain).unwrap().scope, Scope::Admin);

        let store = TokenStore::open(&path).unwrap();
        let new = |project: &str, scope, run: Option<&str>, expires_in| NewToken {
            project: project.into(),
            scope,
            run: run.map(str::to_owned),
            expires_in,
        };
        let (push, record) = store
            .create(&new("acme/*", Scope::Push, None, None))
            .unwrap();
        assert!(push.starts_with(&format!("covd_{}_", record.id)));
        // The store never holds the token.
        let bytes = std::fs::read(&path).unwrap();
        let secret = push.rsplit('_').next().unwrap();
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));

        // The daemon sees the new token at its next call: now one is required.
        assert!(auth.required());
        let bearer = |t: &str| format!("Bearer {t}");
        let e = auth.authenticate(None, plain).unwrap_err();
        assert!(matches!(e, Denied::Unauthenticated(m) if m.contains("requires a token")));
        let who = auth.authenticate(Some(&bearer(&push)), plain).unwrap();
        assert!(who.needs(Scope::Read, "read").is_ok());
        assert!(who.needs(Scope::Push, "push").is_ok());
        assert!(matches!(
            who.needs(Scope::Admin, "delete runs"),
            Err(Denied::PermissionDenied(m)) if m.contains("needs an admin token")
        ));
        assert!(who.reaches_project("acme/shop"));
        assert!(!who.reaches_project("globex/shop"));
        assert!(!who.reaches_all_projects());

        // A wrong secret, an unknown id, a malformed header.
        let wrong = format!("covd_{}_{}", record.id, "0".repeat(64));
        for bad in [wrong.as_str(), "covd_ffffffffffff_00", "Basic abc", "covd_"] {
            let e = auth.authenticate(Some(&bearer(bad)), plain).unwrap_err();
            assert!(matches!(e, Denied::Unauthenticated(_)), "{bad}");
        }

        // One run of one project, and expiry.
        let (one, _) = store
            .create(&new("acme/shop", Scope::Read, Some("r1"), None))
            .unwrap();
        let who = auth.authenticate(Some(&bearer(&one)), plain).unwrap();
        assert!(who.reaches_run("r1", "acme/shop"));
        assert!(!who.reaches_run("r2", "acme/shop"));
        assert_eq!(who.own_project(), Some("acme/shop"));
        let (gone, _) = store
            .create(&new("*", Scope::Admin, None, Some(Duration::ZERO)))
            .unwrap();
        let e = auth.authenticate(Some(&bearer(&gone)), plain).unwrap_err();
        assert!(matches!(e, Denied::Unauthenticated(m) if m.contains("expired")));

        // Revoked: refused from the next call on; the store still requires tokens.
        store.revoke(&push).unwrap();
        let e = auth.authenticate(Some(&bearer(&push)), plain).unwrap_err();
        assert!(matches!(e, Denied::Unauthenticated(m) if m.contains("revoked")));
        store.revoke(&one).unwrap();
        assert!(auth.required());
        assert_eq!(store.list().unwrap().len(), 3);
        assert!(matches!(
            store.revoke("nope"),
            Err(AuthError::NoSuchToken(_))
        ));

        // Under pseudonyms an exact project is compared in its stored form.
        let (named, _) = store
            .create(&new("acme/shop", Scope::Read, None, None))
            .unwrap();
        let pseudonym = |p: &str| format!("{p}#");
        let who = auth.authenticate(Some(&bearer(&named)), pseudonym).unwrap();
        assert!(who.reaches_project("acme/shop#"));
        assert!(!who.reaches_project("acme/shop"));
        // Kept anonymous, every run's project is empty: a token of one project reaches none.
        let who = auth
            .authenticate(Some(&bearer(&named)), |_| String::new())
            .unwrap();
        assert!(!who.reaches_project(""));
        // `*` stays within a component; an empty project is refused.
        let (deep, _) = store
            .create(&new("acme/*", Scope::Read, None, None))
            .unwrap();
        let who = auth.authenticate(Some(&bearer(&deep)), plain).unwrap();
        assert!(who.reaches_project("acme/shop") && !who.reaches_project("acme/a/b"));
        assert!(matches!(
            store.create(&new(" ", Scope::Read, None, None)),
            Err(AuthError::Pattern(..))
        ));
        // Emptied behind the daemon's back, the store still requires tokens (fails closed).
        store.conn.execute("DELETE FROM tokens", []).unwrap();
        assert!(auth.required());
        assert!(auth.authenticate(None, plain).is_err());
        assert!(!Auth::none().required());
    }
}
