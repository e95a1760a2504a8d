//! Project names kept plain, as keyed pseudonyms, or not at all.
//!
//! A run's project is what history, trends and flaky tests are grouped by, and what the
//! dashboard shows. A company that sends its CI's coverage to a shared covd may not want its
//! repository names there. The client asks (`--project-as`), the daemon may insist
//! (`serve --project-names`): the stricter of the two applies, before anything is stored.
//!
//! A pseudonym keeps the vendor (`acme/shop` → `acme/3f9c…`, the part before the first `/`)
//! and replaces the rest with the first 80 bits of HMAC-SHA-256 under the daemon's key, in hex.
//! Without the key a pseudonym cannot be reversed by hashing guessed names; with it the same
//! name always gives the same pseudonym, so a project's history stays together. The key is a
//! file in the data directory, made at first start (or `--pseudonym-key-file`).

use std::io::Write as _;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How a project's name is kept, from the most to the least revealing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum ProjectNames {
    #[default]
    Plain,
    /// The vendor part plain, the rest a keyed pseudonym.
    Pseudonym,
    /// No project at all.
    Anonymous,
}

/// The daemon's policy and key.
#[derive(Clone)]
pub struct Privacy {
    policy: ProjectNames,
    key: Vec<u8>,
}

impl std::fmt::Debug for Privacy {
    // Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Privacy")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// Bytes of HMAC output a pseudonym keeps (80 bits).
const PSEUDONYM_BYTES: usize = 10;

/// Fewest bytes a key file must hold.
pub const MIN_KEY_BYTES: usize = 16;

impl Privacy {
    pub fn new(policy: ProjectNames, key: Vec<u8>) -> Privacy {
        Privacy { policy, key }
    }

    pub fn policy(&self) -> ProjectNames {
        self.policy
    }

    /// The name a run of `project` is kept under, the client having asked for `requested`.
    pub fn project(&self, requested: ProjectNames, project: &str) -> String {
        match requested.max(self.policy) {
            ProjectNames::Plain => project.to_owned(),
            ProjectNames::Pseudonym if project.is_empty() => String::new(),
            ProjectNames::Pseudonym => self.pseudonym(project),
            ProjectNames::Anonymous => String::new(),
        }
    }

    /// The name a query for `project` looks for: under the daemon's policy, what it keeps for
    /// that name (so queries may name projects plainly); a pseudonym is also taken as it is.
    pub fn query(&self, project: &str) -> String {
        if self.policy == ProjectNames::Pseudonym && self.is_pseudonym(project) {
            return project.to_owned();
        }
        self.project(ProjectNames::Plain, project)
    }

    fn pseudonym(&self, project: &str) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(project.as_bytes());
        let digest = mac.finalize().into_bytes();
        let hex: String = digest[..PSEUDONYM_BYTES]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        match project.split_once('/') {
            Some((vendor, _)) => format!("{vendor}/{hex}"),
            None => hex,
        }
    }

    fn is_pseudonym(&self, name: &str) -> bool {
        let tail = name.rsplit_once('/').map_or(name, |(_, t)| t);
        tail.len() == 2 * PSEUDONYM_BYTES && tail.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

/// A key of 32 random bytes (for a daemon without a data directory: its pseudonyms change
/// when it restarts, as everything else it holds is lost).
pub fn random_key() -> Vec<u8> {
    let mut key = vec![0; 32];
    getrandom::fill(&mut key).expect("the OS gives random bytes");
    key
}

/// Reads the key in `path`, or, when `create` and there is none, makes one (32 random bytes,
/// in hex, readable by the owner only).
pub fn load_key(path: &Path, create: bool) -> Result<Vec<u8>, String> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let key = bytes.trim_ascii().to_vec();
            if key.len() < MIN_KEY_BYTES {
                return Err(format!(
                    "the pseudonym key {} holds {} bytes; at least {MIN_KEY_BYTES} are needed",
                    path.display(),
                    key.len()
                ));
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            let hex: String = random_key().iter().map(|b| format!("{b:02x}")).collect();
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options
                .open(path)
                .map_err(|e| format!("cannot create the pseudonym key {}: {e}", path.display()))?;
            file.write_all(format!("{hex}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("cannot write the pseudonym key {}: {e}", path.display()))?;
            Ok(hex.into_bytes())
        }
        Err(e) => Err(format!(
            "cannot read the pseudonym key {}: {e}",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_keep_the_vendor_and_depend_on_the_key() {
        let a = Privacy::new(ProjectNames::Pseudonym, b"0123456789abcdef".to_vec());
        let b = Privacy::new(ProjectNames::Pseudonym, b"fedcba9876543210".to_vec());
        let p = a.project(ProjectNames::Plain, "acme/shop");
        assert!(p.starts_with("acme/") && p.len() == 5 + 20, "{p}");
        assert!(!p.contains("shop"));
        assert_eq!(a.project(ProjectNames::Plain, "acme/shop"), p);
        assert_ne!(b.project(ProjectNames::Plain, "acme/shop"), p);
        assert_ne!(a.project(ProjectNames::Plain, "acme/cart"), p);
        // Nested groups keep only the first part; a name without one is all pseudonym.
        assert!(
            a.project(ProjectNames::Plain, "acme/web/shop")
                .starts_with("acme/")
        );
        assert_eq!(a.project(ProjectNames::Plain, "shop").len(), 20);
        // Queries may name the project plainly, or by its pseudonym.
        assert_eq!(a.query("acme/shop"), p);
        assert_eq!(a.query(&p), p);
    }

    #[test]
    fn the_stricter_of_client_and_daemon_applies() {
        let plain = Privacy::new(ProjectNames::Plain, b"0123456789abcdef".to_vec());
        assert_eq!(plain.project(ProjectNames::Plain, "acme/shop"), "acme/shop");
        assert_ne!(
            plain.project(ProjectNames::Pseudonym, "acme/shop"),
            "acme/shop"
        );
        assert_eq!(plain.project(ProjectNames::Anonymous, "acme/shop"), "");
        assert_eq!(plain.query("acme/shop"), "acme/shop");
        let anonymous = Privacy::new(ProjectNames::Anonymous, b"0123456789abcdef".to_vec());
        assert_eq!(anonymous.project(ProjectNames::Plain, "acme/shop"), "");
        assert_eq!(anonymous.query("acme/shop"), "");
        assert!(!format!("{anonymous:?}").contains("0123"));
    }

    #[test]
    fn a_key_is_made_once_and_kept_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pseudonym.key");
        assert!(load_key(&path, false).is_err());
        let key = load_key(&path, true).unwrap();
        assert_eq!(key.len(), 64);
        assert_eq!(load_key(&path, true).unwrap(), key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "short\n").unwrap();
        let e = load_key(&path, true).unwrap_err();
        assert!(e.contains("at least 16"), "{e}");
    }
}
