//! The users file of `[auth] users_file`: who may log in, with which
//! password hash, and which sender addresses each user owns.
//!
//! One user per line, `username:ARGON2_PHC_HASH[:owned1,owned2,...]`; `#`
//! comments and blank lines are skipped. Owned entries are addresses
//! (`alice@example.com`) or whole domains (`@example.com`); a user name that
//! is an address owns that address. User names are matched without regard
//! to ASCII case. The file is re-read when its modification time changes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;

/// A line of the users file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct LineError {
    /// 1-based.
    pub line: usize,
    pub problem: LineProblem,
}

/// What is wrong with a line of the users file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LineProblem {
    #[error("expected username:hash[:addresses], with a user name")]
    NoUserName,
    #[error("bad password hash: {0}")]
    BadHash(argon2::password_hash::Error),
    /// A PHC string of another algorithm (bcrypt, scrypt...).
    #[error("{0} hashes are not supported; make one with `ternd hash-password`")]
    UnsupportedHash(String),
    #[error(transparent)]
    NotOwnable(#[from] tern_config::owned::NotOwnable),
    #[error("user {0} is listed twice")]
    Duplicate(String),
}

/// The users file could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UsersFileError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    Invalid { path: PathBuf, source: LineError },
}

/// How often, at most, the file's modification time is looked at.
const RECHECK: Duration = Duration::from_secs(1);

/// An argon2id hash (the crate's default parameters) of a random password,
/// verified against for unknown users so that they take as long as known
/// ones. `dummy_hash_uses_default_params` keeps it in step with the crate.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$4Mqyj09Zgz1dBFQP/ZhD5Q$lI3h6PJ1PNh9RHNz92pcgSWPDHK5BXSD8E7kBOYspIg";

pub use tern_config::{hash_password, Owned};

/// The sender addresses a user owns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ownership(Vec<Owned>);

impl Ownership {
    pub fn new(owned: Vec<Owned>) -> Self {
        Ownership(owned)
    }

    /// True if `address` (a reverse-path without brackets) is one of the
    /// user's addresses or in one of the user's domains. The domain is
    /// compared without regard to case, the local part exactly.
    pub fn owns(&self, address: &str) -> bool {
        let Some((local, domain)) = address.rsplit_once('@') else {
            return false;
        };
        let domain = domain.trim_end_matches('.');
        self.0.iter().any(|o| o.matches(local, domain))
    }
}

/// A user who has authenticated, as the SMTP session keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthUser {
    /// The name as written in the users file (recorded in the envelope).
    pub name: String,
    pub senders: Arc<Ownership>,
}

struct Entry {
    name: String,
    /// PHC string, checked to parse when the file was read.
    hash: String,
    senders: Arc<Ownership>,
}

/// The parsed users file.
#[derive(Default)]
pub struct Users {
    /// Keyed by the lower-cased user name.
    by_name: HashMap<String, Entry>,
}

impl Users {
    /// Parses the file's text; `senders` (`[auth] senders`, keyed by
    /// lower-cased user name) adds owned addresses. Errors name the line.
    pub fn parse(text: &str, senders: &BTreeMap<String, Vec<Owned>>) -> Result<Users, LineError> {
        let mut by_name = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let at = |problem| LineError { line: n, problem };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.splitn(3, ':');
            let name = fields.next().unwrap_or_default().trim();
            let hash = fields.next().unwrap_or_default().trim();
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(at(LineProblem::NoUserName));
            }
            let parsed = PasswordHash::new(hash).map_err(|e| at(LineProblem::BadHash(e)))?;
            if !["argon2id", "argon2i", "argon2d"].contains(&parsed.algorithm.as_str()) {
                return Err(at(LineProblem::UnsupportedHash(parsed.algorithm.to_string())));
            }
            let mut owned = Vec::new();
            if name.contains('@') {
                owned.extend(Owned::parse(name).ok());
            }
            for item in fields.next().unwrap_or_default().split(',').map(str::trim) {
                if !item.is_empty() {
                    owned.push(Owned::parse(item).map_err(|e| at(e.into()))?);
                }
            }
            let key = name.to_ascii_lowercase();
            owned.extend(senders.get(&key).into_iter().flatten().cloned());
            let entry = Entry {
                name: name.to_string(),
                hash: hash.to_string(),
                senders: Arc::new(Ownership(owned)),
            };
            if by_name.insert(key, entry).is_some() {
                return Err(at(LineProblem::Duplicate(name.to_string())));
            }
        }
        Ok(Users { by_name })
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Checks a password: the user on success. Unknown users are checked
    /// against a dummy hash, so the answer takes as long. CPU-bound for tens
    /// of milliseconds: run it on a blocking thread.
    pub fn verify(&self, username: &str, password: &[u8]) -> Option<AuthUser> {
        let entry = self.by_name.get(&username.to_ascii_lowercase());
        let hash = entry.map_or(DUMMY_HASH, |e| e.hash.as_str());
        let ok = PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password, &h).is_ok());
        match entry {
            Some(e) if ok => Some(AuthUser {
                name: e.name.clone(),
                senders: Arc::clone(&e.senders),
            }),
            _ => None,
        }
    }
}

/// The users file, re-read when it changes.
pub struct UserStore {
    /// `None` for users given as text (tests): never re-read.
    path: Option<PathBuf>,
    senders: BTreeMap<String, Vec<Owned>>,
    state: Mutex<State>,
}

struct State {
    users: Arc<Users>,
    /// Modification time and length of the file last read (valid or not).
    stamp: Option<(SystemTime, u64)>,
    checked: Instant,
}

impl std::fmt::Debug for UserStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn stamp(path: &Path) -> std::io::Result<(SystemTime, u64)> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.modified()?, meta.len()))
}

impl UserStore {
    /// Reads the file; an unreadable or invalid file is an error.
    pub fn load(path: &Path, senders: BTreeMap<String, Vec<Owned>>) -> Result<UserStore, UsersFileError> {
        let read = |path: &Path| -> std::io::Result<_> { Ok((stamp(path)?, std::fs::read_to_string(path)?)) };
        let (stamp, text) = read(path).map_err(|source| UsersFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        let users = Users::parse(&text, &senders).map_err(|source| UsersFileError::Invalid {
            path: path.to_owned(),
            source,
        })?;
        Ok(UserStore {
            path: Some(path.to_owned()),
            senders,
            state: Mutex::new(State {
                users: Arc::new(users),
                stamp: Some(stamp),
                checked: Instant::now(),
            }),
        })
    }

    /// Users from text, never re-read (tests).
    pub fn from_text(text: &str) -> Result<UserStore, LineError> {
        Ok(UserStore {
            path: None,
            senders: BTreeMap::new(),
            state: Mutex::new(State {
                users: Arc::new(Users::parse(text, &BTreeMap::new())?),
                stamp: None,
                checked: Instant::now(),
            }),
        })
    }

    /// The current users, after re-reading the file if its modification
    /// time changed (looked at most once a second). A new file that cannot
    /// be read or parsed is logged and the previous users are kept. Does
    /// file I/O: call it on a blocking thread.
    pub fn current(&self) -> Arc<Users> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(path) = &self.path else {
            return Arc::clone(&state.users);
        };
        if state.checked.elapsed() < RECHECK {
            return Arc::clone(&state.users);
        }
        state.checked = Instant::now();
        let now = match stamp(path) {
            Ok(s) => s,
            Err(e) => {
                if state.stamp.take().is_some() {
                    tracing::warn!(path = %path.display(), error = %e, "users file unreadable; keeping the previous users");
                }
                return Arc::clone(&state.users);
            }
        };
        if state.stamp == Some(now) {
            return Arc::clone(&state.users);
        }
        state.stamp = Some(now);
        let parsed = std::fs::read_to_string(path)
            .map_err(|e| -> Box<dyn std::error::Error> { e.into() })
            .and_then(|text| Ok(Users::parse(&text, &self.senders)?));
        match parsed {
            Ok(users) => {
                tracing::info!(path = %path.display(), users = users.len(), "users file reloaded");
                state.users = Arc::new(users);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "users file invalid; keeping the previous users")
            }
        }
        Arc::clone(&state.users)
    }

    /// Forget when the file was last looked at (tests).
    #[cfg(test)]
    fn expire_check(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.checked = Instant::now() - RECHECK;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dummy_hash_uses_default_params() {
        let h = PasswordHash::new(DUMMY_HASH).unwrap();
        let params = argon2::Params::try_from(&h).unwrap();
        assert_eq!(h.algorithm.as_str(), "argon2id");
        let d = argon2::Params::default();
        assert_eq!(
            (params.m_cost(), params.t_cost(), params.p_cost()),
            (d.m_cost(), d.t_cost(), d.p_cost())
        );
    }

    #[test]
    fn ownership() {
        let o = Ownership::new(vec![
            Owned::parse("alice@Example.COM").unwrap(),
            Owned::parse("@team.example").unwrap(),
        ]);
        assert!(o.owns("alice@example.com"));
        assert!(o.owns("alice@EXAMPLE.com"));
        assert!(!o.owns("Alice@example.com"));
        assert!(!o.owns("bob@example.com"));
        assert!(o.owns("anyone@Team.Example"));
        assert!(!o.owns("anyone@sub.team.example"));
        assert!(!o.owns("postmaster"));
        assert!(Owned::parse("example.com").is_err());
        assert!(Owned::parse("a@").is_err());
        assert!(Owned::parse("a b@c").is_err());
    }

    #[test]
    fn users_file_format() {
        let h = hash_password(b"pw").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        let senders = BTreeMap::from([("bob".to_string(), vec![Owned::parse("@bob.example").unwrap()])]);
        let text =
            format!("# comment\n\nalice@example.com:{h}\nBob:{h}:bob@example.com, @shared.example\ncarol:{h}:\n");
        let users = Users::parse(&text, &senders).unwrap();
        assert_eq!(users.len(), 3);
        let alice = users.verify("Alice@Example.com", b"pw").unwrap();
        assert_eq!(alice.name, "alice@example.com");
        assert!(alice.senders.owns("alice@example.com"));
        assert!(!alice.senders.owns("bob@example.com"));
        let bob = users.verify("bob", b"pw").unwrap();
        assert_eq!(bob.name, "Bob");
        assert!(bob.senders.owns("bob@example.com") && bob.senders.owns("x@shared.example"));
        assert!(bob.senders.owns("x@bob.example"));
        assert!(!users.verify("carol", b"pw").unwrap().senders.owns("carol@example.com"));
        assert!(users.verify("carol", b"wrong").is_none());
        assert!(users.verify("nobody", b"pw").is_none());

        for (bad, why) in [
            ("alice\n", "line 1"),
            (":x\n", "user name"),
            ("a:notahash\n", "bad password hash"),
            (
                "a:$2b$12$abcdefghijklmnopqrstuuABCDEFGHIJKLMNOPQRSTUVWXYZ01234\n",
                "line 1",
            ),
        ] {
            let err = Users::parse(bad, &BTreeMap::new()).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        let err = Users::parse(&format!("# x\na:{h}:nodomain\n"), &BTreeMap::new())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("line 2:"), "{err}");
        let err = Users::parse(&format!("a:{h}\nA:{h}\n"), &BTreeMap::new())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("twice"), "{err}");
    }

    #[test]
    fn reloads_on_change_and_keeps_old_users_when_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        let h = hash_password(b"one").unwrap();
        std::fs::write(&path, format!("alice:{h}\n")).unwrap();
        let store = UserStore::load(&path, BTreeMap::new()).unwrap();
        assert!(store.current().verify("alice", b"one").is_some());

        // A new user; a longer file, so the change is seen even within one mtime tick.
        std::fs::write(&path, format!("alice:{h}\nbob:{h}\n")).unwrap();
        // Not looked at again within a second.
        assert!(store.current().verify("bob", b"one").is_none());
        store.expire_check();
        assert!(store.current().verify("bob", b"one").is_some());

        std::fs::write(&path, "garbage without a hash, and longer than before......\n").unwrap();
        store.expire_check();
        let users = store.current();
        assert_eq!(users.len(), 2);
        assert!(users.verify("alice", b"one").is_some());

        std::fs::remove_file(&path).unwrap();
        store.expire_check();
        assert_eq!(store.current().len(), 2);
        assert!(UserStore::load(&path, BTreeMap::new()).is_err());
    }
}
