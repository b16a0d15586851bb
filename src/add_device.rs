//! `edgeloop broker add-device`: a credential per device in the broker's
//! credentials file, and its password, which exists nowhere else (the file
//! keeps only a salted hash), given to the operator once: on stdout between
//! two lines of prose on stderr (the default), in a file of mode 0600
//! (`--password-file`), or as one JSON object on stdout (`--json`).
//!
//! A password file is claimed (created, empty, mode 0600) before the
//! credential is added, so an existing file is refused before anything
//! changes; if the password cannot be written once the credential is added,
//! the credential is removed again. A script never ends up with a
//! credential whose password nobody has.

use std::io::Write;
use std::path::{Path, PathBuf};

use edgeloop_broker::gate::acl::Role;
use edgeloop_broker::gate::credentials::{write_private, CredentialsError, CredentialsFile};

#[derive(clap::Args, Debug)]
pub struct AddDeviceArgs {
    /// The device ids (each its MQTT client id and user name); all are added
    /// or none is.
    #[arg(required = true, value_name = "ID")]
    ids: Vec<String>,
    /// The credentials file (the broker's auth.credentials_file).
    #[arg(
        long,
        env = "EDGELOOP_CREDENTIALS_FILE",
        default_value = "credentials.toml"
    )]
    credentials: PathBuf,
    /// `device` (topic ACLs of its own id) or `service` (operators'
    /// tools: any topic).
    #[arg(long, default_value = "device")]
    role: String,
    /// Other client ids this identity may connect as (exact, or a prefix
    /// ending in `*`), e.g. the children of a gateway.
    #[arg(long, value_delimiter = ',')]
    acts_for: Vec<String>,
    /// Write the password to this file instead of stdout: a new file of
    /// mode 0600 holding the password and a newline, as `edgeloop agent
    /// --password-file` reads it. One ID only. An existing file is refused
    /// (and nothing is added) unless --overwrite.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Replace an existing --password-file (by a new file of mode 0600).
    #[arg(long, requires = "password_file")]
    overwrite: bool,
    /// Print one JSON object on stdout and nothing else:
    /// {"credentials_file": …, "devices": [{"id": …, "role": …, "password":
    /// …}]}; with --password-file, "password_file" instead of "password".
    #[arg(long)]
    json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AddDeviceError {
    #[error("--role: {0:?} is not device or service")]
    Role(String),
    #[error(
        "--password-file holds one device's password, and {0} ids were given: add the devices one at a time, or use --json"
    )]
    PasswordFileForMany(usize),
    #[error(
        "password file {0} exists already; nothing was added (pass --overwrite to replace it)"
    )]
    PasswordFileExists(PathBuf),
    #[error("password file {path}: {source}; nothing was added")]
    PasswordFileUnusable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "writing the password to {path} failed ({source}); the credential was removed from {credentials} again"
    )]
    PasswordNotWritten {
        path: PathBuf,
        credentials: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "writing the password to {path} failed ({source}), and removing the credential of {ids} from {credentials} again failed too ({undo}): remove it by hand"
    )]
    PasswordNotWrittenNorUndone {
        path: PathBuf,
        credentials: PathBuf,
        ids: String,
        source: std::io::Error,
        /// Why the credential could not be removed, as a message (a
        /// `CredentialsError` here would make every result of this module
        /// large).
        undo: String,
    },
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("writing to stdout: {0}")]
    Stdout(#[source] std::io::Error),
}

/// What `--json` prints.
#[derive(Debug, serde::Serialize)]
struct Added<'a> {
    credentials_file: &'a Path,
    devices: Vec<AddedDevice<'a>>,
}

#[derive(Debug, serde::Serialize)]
struct AddedDevice<'a> {
    id: &'a str,
    role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    password: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password_file: Option<&'a Path>,
}

/// Adds the credentials and hands out their passwords as `args` asks:
/// machine-readable output goes to `stdout`, prose to stderr.
pub fn run(args: AddDeviceArgs, stdout: &mut impl Write) -> Result<(), AddDeviceError> {
    let role = match args.role.as_str() {
        "device" => Role::Device,
        "service" => Role::Service,
        other => return Err(AddDeviceError::Role(other.to_string())),
    };
    let claimed = match &args.password_file {
        Some(_) if args.ids.len() != 1 => {
            return Err(AddDeviceError::PasswordFileForMany(args.ids.len()))
        }
        Some(path) if !args.overwrite => Some(claim(path)?),
        _ => None,
    };
    let added = match CredentialsFile::add(&args.credentials, &args.ids, role, &args.acts_for) {
        Ok(added) => added,
        Err(e) => {
            if let (Some(_), Some(path)) = (&claimed, &args.password_file) {
                // Ours, empty: created just above.
                let _ = std::fs::remove_file(path);
            }
            return Err(e.into());
        }
    };
    if let Some(path) = &args.password_file {
        // One id (checked above), so one password.
        let text = added
            .iter()
            .map(|(_, password)| format!("{password}\n"))
            .collect::<String>();
        let written = match claimed {
            Some(mut file) => file
                .write_all(text.as_bytes())
                .and_then(|()| file.sync_all()),
            None => write_private(path, text.as_bytes()),
        };
        if let Err(source) = written {
            if !args.overwrite {
                let _ = std::fs::remove_file(path);
            }
            return Err(undo(&args.credentials, &args.ids, path, source));
        }
    }
    let password_file = args.password_file.as_deref();
    if args.json {
        let report = Added {
            credentials_file: &args.credentials,
            devices: added
                .iter()
                .map(|(id, password)| AddedDevice {
                    id,
                    role,
                    password: password_file.is_none().then_some(password.as_str()),
                    password_file,
                })
                .collect(),
        };
        let mut text = serde_json::to_string(&report)
            .map_err(|e| AddDeviceError::Stdout(std::io::Error::other(e)))?;
        text.push('\n');
        stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
            .map_err(AddDeviceError::Stdout)?;
        return Ok(());
    }
    for (id, password) in &added {
        match password_file {
            Some(path) => eprintln!(
                "added {id} to {}; its password is in {} (mode 0600)",
                args.credentials.display(),
                path.display()
            ),
            None => {
                eprintln!(
                    "added {id} to {}; its password (shown only now):",
                    args.credentials.display()
                );
                writeln!(stdout, "{password}").map_err(AddDeviceError::Stdout)?;
            }
        }
    }
    stdout.flush().map_err(AddDeviceError::Stdout)
}

/// Creates `path`, empty, mode 0600; refuses an existing file.
fn claim(path: &Path) -> Result<std::fs::File, AddDeviceError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            AddDeviceError::PasswordFileExists(path.into())
        } else {
            AddDeviceError::PasswordFileUnusable {
                path: path.into(),
                source,
            }
        }
    })
}

/// Removes the credentials of `ids` just added, after their password could
/// not be written to `path`.
fn undo(credentials: &Path, ids: &[String], path: &Path, source: std::io::Error) -> AddDeviceError {
    let removed = CredentialsFile::read(credentials).and_then(|mut file| {
        file.credentials.retain(|c| !ids.contains(&c.id));
        file.write(credentials)
    });
    match removed {
        Ok(()) => AddDeviceError::PasswordNotWritten {
            path: path.into(),
            credentials: credentials.into(),
            source,
        },
        Err(undo) => AddDeviceError::PasswordNotWrittenNorUndone {
            path: path.into(),
            credentials: credentials.into(),
            ids: ids.join(", "),
            source,
            undo: undo.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AddDeviceArgs,
    }

    /// Runs `add-device ARGS…` (the credentials file in `dir` unless given);
    /// what it printed on stdout.
    fn add_device(dir: &Path, args: &[&str]) -> Result<String, AddDeviceError> {
        let credentials = dir.join("credentials.toml");
        let mut argv = vec!["add-device".to_string()];
        argv.extend(args.iter().map(|a| a.to_string()));
        if !args.contains(&"--credentials") {
            argv.extend(["--credentials".into(), credentials.display().to_string()]);
        }
        let cli = Cli::try_parse_from(argv).expect("valid arguments");
        let mut stdout = Vec::new();
        run(cli.args, &mut stdout)?;
        Ok(String::from_utf8(stdout).expect("UTF-8"))
    }

    fn credential(dir: &Path, id: &str) -> Option<edgeloop_broker::gate::credentials::Credential> {
        let file = CredentialsFile::read(&dir.join("credentials.toml")).expect("readable");
        file.credentials.into_iter().find(|c| c.id == id)
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path)
            .expect("exists")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn json_is_all_that_is_printed_and_its_passwords_verify_against_the_credentials_file(
    ) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let out = add_device(dir.path(), &["dev-1", "dev-2", "--json"])?;
        // One JSON document: serde_json refuses anything after it.
        let value: serde_json::Value = serde_json::from_str(&out)?;
        let devices = value["devices"].as_array().expect("a devices array");
        assert_eq!(devices.len(), 2);
        for (device, id) in devices.iter().zip(["dev-1", "dev-2"]) {
            assert_eq!(device["id"], id);
            assert_eq!(device["role"], "device");
            let password = device["password"].as_str().expect("a password");
            let c = credential(dir.path(), id).expect("a credential");
            assert!(c.verify(password.as_bytes()), "{id}'s password verifies");
        }
        assert_eq!(
            value["credentials_file"].as_str(),
            dir.path().join("credentials.toml").to_str()
        );
        Ok(())
    }

    #[cfg(unix)]
    #[test]
    fn a_password_file_is_created_owner_only_and_holds_a_password_that_verifies(
    ) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("dev-1.password");
        let out = add_device(
            dir.path(),
            &["dev-1", "--password-file", file.to_str().expect("UTF-8")],
        )?;
        assert_eq!(out, "", "the password is not printed");
        assert_eq!(mode(&file), 0o600, "mode {:o}", mode(&file));
        let text = std::fs::read_to_string(&file)?;
        assert!(text.ends_with('\n'));
        let c = credential(dir.path(), "dev-1").expect("a credential");
        assert!(c.verify(text.trim().as_bytes()));

        // With --json: where the password is, not the password.
        let file = dir.path().join("dev-2.password");
        let out = add_device(
            dir.path(),
            &[
                "dev-2",
                "--json",
                "--password-file",
                file.to_str().expect("UTF-8"),
            ],
        )?;
        let value: serde_json::Value = serde_json::from_str(&out)?;
        let device = &value["devices"][0];
        assert_eq!(device["password_file"].as_str(), file.to_str());
        assert!(device.get("password").is_none(), "{out}");
        assert_eq!(mode(&file), 0o600, "mode {:o}", mode(&file));
        let c = credential(dir.path(), "dev-2").expect("a credential");
        assert!(c.verify(std::fs::read_to_string(&file)?.trim().as_bytes()));
        Ok(())
    }

    #[cfg(unix)]
    #[test]
    fn an_existing_password_file_is_refused_by_name_and_nothing_is_added_unless_overwrite(
    ) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("dev-1.password");
        std::fs::write(&file, "an older password\n")?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
        let path = file.to_str().expect("UTF-8");
        let err = add_device(dir.path(), &["dev-1", "--password-file", path])
            .expect_err("an existing file is refused");
        assert!(matches!(err, AddDeviceError::PasswordFileExists(_)));
        assert!(err.to_string().contains(path), "{err}");
        assert_eq!(std::fs::read_to_string(&file)?, "an older password\n");
        assert!(credential(dir.path(), "dev-1").is_none(), "nothing added");

        add_device(
            dir.path(),
            &["dev-1", "--password-file", path, "--overwrite"],
        )?;
        assert_eq!(
            mode(&file),
            0o600,
            "a new file, whatever the old one's mode"
        );
        let c = credential(dir.path(), "dev-1").expect("a credential");
        assert!(c.verify(std::fs::read_to_string(&file)?.trim().as_bytes()));
        Ok(())
    }

    #[test]
    fn a_refused_credential_leaves_no_password_file_behind() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        add_device(dir.path(), &["dev-1"])?;
        let file = dir.path().join("dev-1.password");
        let err = add_device(
            dir.path(),
            &["dev-1", "--password-file", file.to_str().expect("UTF-8")],
        )
        .expect_err("dev-1 has a credential already");
        assert!(matches!(
            err,
            AddDeviceError::Credentials(CredentialsError::Exists { .. })
        ));
        assert!(!file.exists());
        Ok(())
    }

    #[test]
    fn a_password_file_takes_one_device_only() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("both.password");
        let err = add_device(
            dir.path(),
            &[
                "dev-1",
                "dev-2",
                "--password-file",
                file.to_str().expect("UTF-8"),
            ],
        )
        .expect_err("two ids, one file");
        assert!(matches!(err, AddDeviceError::PasswordFileForMany(2)));
        assert!(!file.exists());
        assert!(credential(dir.path(), "dev-1").is_none());
        Ok(())
    }

    #[test]
    fn the_default_output_is_the_password_alone_on_stdout() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let out = add_device(dir.path(), &["dev-1"])?;
        let c = credential(dir.path(), "dev-1").expect("a credential");
        assert_eq!(out.lines().count(), 1);
        assert!(c.verify(out.trim().as_bytes()));
        Ok(())
    }
}
