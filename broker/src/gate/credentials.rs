//! The credentials file: one salted argon2id hash per identity.
//!
//! ```toml
//! [[credential]]
//! id = "dev-0001"
//! role = "device"                      # or "service"
//! hash = "$argon2id$v=19$m=4096,t=1,p=1$..."
//! acts_for = []                        # e.g. ["child-*"] for a gateway
//! ```
//!
//! `edgeloop broker add-device ID` appends a credential and prints its
//! password once; the file keeps only the hash. The broker re-reads the file
//! when it changes, so a device added while the broker runs can connect at
//! once.
//!
//! The passwords are 24 random bytes, not words a person chose, so the
//! argon2 cost is set low (4 MiB, one pass): guessing 192 bits is hopeless at
//! any cost, and a fleet reconnecting after an outage must not wait on
//! hashing. The PHC string records the parameters, so raising them later
//! only affects new credentials.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use serde::{Deserialize, Serialize};

use super::acl::{valid_device_id, Role};

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("credentials file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("credentials file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0:?} is not a valid device id (1 to 128 bytes, no '/', '+', '#', NUL or spaces)")]
    BadId(String),
    #[error("{id} already has a credential in {path}")]
    Exists { id: String, path: PathBuf },
    #[error("hashing the password: {0}")]
    Hash(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CredentialsFile {
    #[serde(default, rename = "credential")]
    pub credentials: Vec<Credential>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub id: String,
    pub role: Role,
    /// argon2 PHC string.
    pub hash: String,
    /// Client ids (besides `id`) this identity may connect as, each exact or
    /// a prefix ending in `*`: a gateway uplinking for its children.
    #[serde(default)]
    pub acts_for: Vec<String>,
}

impl Credential {
    /// Whether a connection as `client_id` is allowed for this identity.
    pub fn may_be(&self, client_id: &str) -> bool {
        client_id == self.id
            || self.acts_for.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => client_id.starts_with(prefix),
                None => p == client_id,
            })
    }

    pub fn verify(&self, password: &[u8]) -> bool {
        PasswordHash::new(&self.hash)
            .map(|h| Argon2::default().verify_password(password, &h).is_ok())
            .unwrap_or(false)
    }
}

fn hasher() -> Argon2<'static> {
    // 4 MiB, 1 pass, 1 lane: see the module docs for why this is enough.
    let params = Params::new(4096, 1, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// A fresh random password (24 bytes, URL-safe base64) and its hash.
pub fn new_password() -> Result<(String, String), CredentialsError> {
    use base64::Engine;
    let mut raw = [0u8; 24];
    OsRng.fill_bytes(&mut raw);
    let password = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let salt = SaltString::generate(&mut OsRng);
    let hash = hasher()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| CredentialsError::Hash(e.to_string()))?
        .to_string();
    Ok((password, hash))
}

impl CredentialsFile {
    pub fn read(path: &Path) -> Result<CredentialsFile, CredentialsError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(CredentialsError::Io {
                    path: path.into(),
                    source,
                })
            }
        };
        let file: CredentialsFile =
            toml::from_str(&text).map_err(|e| CredentialsError::Invalid {
                path: path.into(),
                message: e.to_string(),
            })?;
        for (i, c) in file.credentials.iter().enumerate() {
            if !valid_device_id(&c.id) {
                return Err(CredentialsError::Invalid {
                    path: path.into(),
                    message: format!("credential[{i}].id: {:?} is not a valid device id", c.id),
                });
            }
            if PasswordHash::new(&c.hash).is_err() {
                return Err(CredentialsError::Invalid {
                    path: path.into(),
                    message: format!("credential[{i}].hash ({}): not a PHC hash string", c.id),
                });
            }
        }
        Ok(file)
    }

    /// Writes the file atomically, mode 0600 ([`write_private`]).
    pub fn write(&self, path: &Path) -> Result<(), CredentialsError> {
        let io = |source| CredentialsError::Io {
            path: path.into(),
            source,
        };
        let text = toml::to_string(self).map_err(|e| CredentialsError::Hash(e.to_string()))?;
        let text = format!(
            "# edgeloop broker credentials (argon2id hashes; `edgeloop broker add-device ID` adds one)\n{text}"
        );
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        write_private(path, text.as_bytes()).map_err(io)
    }

    /// Adds credentials for `ids` (all or none), returning their passwords.
    pub fn add(
        path: &Path,
        ids: &[String],
        role: Role,
        acts_for: &[String],
    ) -> Result<Vec<(String, String)>, CredentialsError> {
        let mut file = Self::read(path)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if !valid_device_id(id) {
                return Err(CredentialsError::BadId(id.clone()));
            }
            if file.credentials.iter().any(|c| &c.id == id) {
                return Err(CredentialsError::Exists {
                    id: id.clone(),
                    path: path.into(),
                });
            }
            let (password, hash) = new_password()?;
            file.credentials.push(Credential {
                id: id.clone(),
                role,
                hash,
                acts_for: acts_for.to_vec(),
            });
            out.push((id.clone(), password));
        }
        file.write(path)?;
        Ok(out)
    }
}

/// Writes a secret file (credentials, passwords, anything a device or an
/// operator must keep to itself) atomically, readable and writable by its
/// owner only from the moment it exists: a temporary file beside `path`,
/// created with mode 0600 (a leftover temporary file is removed first, so
/// its mode is never inherited), fsynced, then renamed over `path`. The
/// file at `path` is therefore always a new one of mode 0600, whatever the
/// mode of the one it replaces.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// The credentials in force: re-read when the file's modification time
/// changes. A file that fails to parse is reported and the previous
/// credentials stay in force.
pub struct Credentials {
    path: PathBuf,
    state: Mutex<(Option<SystemTime>, std::sync::Arc<CredentialsFile>)>,
}

impl Credentials {
    pub fn open(path: &Path) -> Result<Credentials, CredentialsError> {
        let file = CredentialsFile::read(path)?;
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        tracing::info!(path = %path.display(), identities = file.credentials.len(), "credentials loaded");
        Ok(Credentials {
            path: path.into(),
            state: Mutex::new((modified, std::sync::Arc::new(file))),
        })
    }

    /// The current credentials (re-read if the file changed).
    pub fn current(&self) -> std::sync::Arc<CredentialsFile> {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if modified != state.0 {
            state.0 = modified;
            match CredentialsFile::read(&self.path) {
                Ok(file) => {
                    tracing::info!(path = %self.path.display(), identities = file.credentials.len(), "credentials reloaded");
                    state.1 = std::sync::Arc::new(file);
                }
                Err(e) => {
                    tracing::error!(error = %e, "credentials file refused; the previous credentials stay in force")
                }
            }
        }
        state.1.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_credentials_verify_their_password_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.toml");
        let added =
            CredentialsFile::add(&path, &["dev-1".into(), "dev-2".into()], Role::Device, &[])
                .unwrap();
        let file = CredentialsFile::read(&path).unwrap();
        assert_eq!(file.credentials.len(), 2);
        let c = &file.credentials[0];
        assert!(c.verify(added[0].1.as_bytes()));
        assert!(!c.verify(added[1].1.as_bytes()));
        assert!(!c.verify(b""));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&added[0].1), "the password is not stored");
        // Adding an existing id or a bad one changes nothing.
        assert!(matches!(
            CredentialsFile::add(&path, &["dev-3".into(), "dev-1".into()], Role::Device, &[]),
            Err(CredentialsError::Exists { .. })
        ));
        assert!(matches!(
            CredentialsFile::add(&path, &["a/b".into()], Role::Device, &[]),
            Err(CredentialsError::BadId(_))
        ));
        assert_eq!(CredentialsFile::read(&path).unwrap().credentials.len(), 2);
    }

    #[test]
    fn acts_for_allows_exact_ids_and_prefixes() {
        let c = Credential {
            id: "gw-1".into(),
            role: Role::Device,
            hash: String::new(),
            acts_for: vec!["child-*".into(), "other".into()],
        };
        assert!(c.may_be("gw-1"));
        assert!(c.may_be("child-7"));
        assert!(c.may_be("other"));
        assert!(!c.may_be("others"));
        assert!(!c.may_be("gw-2"));
    }

    #[test]
    fn a_broken_file_names_the_field_and_keeps_the_old_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.toml");
        CredentialsFile::add(&path, &["dev-1".into()], Role::Device, &[]).unwrap();
        let creds = Credentials::open(&path).unwrap();
        assert_eq!(creds.current().credentials.len(), 1);
        std::fs::write(
            &path,
            "[[credential]]\nid = \"dev-1\"\nrole = \"device\"\nhash = \"nope\"\n",
        )
        .unwrap();
        let err = CredentialsFile::read(&path).unwrap_err().to_string();
        assert!(err.contains("credential[0].hash"), "{err}");
        // Make sure the modification time differs from the first read.
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(creds.current().credentials.len(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn secret_files_are_created_owner_only_whatever_was_there_before() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.toml");
        // A world-readable file in its place, and a world-readable
        // temporary file left over from a crash.
        let tmp = dir.path().join("credentials.toml.tmp");
        for p in [&path, &tmp] {
            std::fs::write(p, "# old\n").unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        CredentialsFile::add(&path, &["dev-1".into()], Role::Device, &[]).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert!(!tmp.exists());
        let secret = dir.path().join("passwords.toml");
        write_private(&secret, b"dev-1 = \"x\"\n").unwrap();
        assert_eq!(mode(&secret), 0o600);
        assert_eq!(std::fs::read(&secret).unwrap(), b"dev-1 = \"x\"\n");
    }
}
