//! `edgeloop ctl`: the control API (docs/control-api.md) from the command
//! line, readable tables by default and `--json` for scripts; and `edgeloop
//! keys generate`, the Ed25519 key pair that signs model updates.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use edgeloop_processor::control::{pb, Bearer};
use edgeloop_proto::signing;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// The processor's control API (its `control.listen`), `http://HOST:PORT`
    /// or `HOST:PORT`.
    #[arg(
        long,
        global = true,
        env = "EDGELOOP_CONTROL_ADDR",
        default_value = "http://127.0.0.1:9470"
    )]
    addr: String,
    /// The bearer token (the processor's `control.token`).
    #[arg(
        long,
        global = true,
        env = "EDGELOOP_CONTROL_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// A file holding the bearer token (surrounding whitespace ignored);
    /// `edgeloop up` writes DIR/control.token.
    #[arg(
        long,
        global = true,
        env = "EDGELOOP_CONTROL_TOKEN_FILE",
        conflicts_with = "token"
    )]
    token_file: Option<PathBuf>,
    /// Print the response as JSON (one document) instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(clap::Subcommand, Debug)]
enum CtlCommand {
    /// Devices: last seen, profile, spool backlog, applied model versions, losses.
    Devices {
        /// Only devices of this profile.
        #[arg(long, default_value = "")]
        profile: String,
    },
    /// One device, every field.
    Device { id: String },
    /// The labelling rules in force and per-rule statistics.
    Rules,
    /// Health and readiness of the processor's parts (exit status 1 if not ready).
    Health,
    /// The model registry (edgeloop.models).
    #[command(subcommand)]
    Models(ModelsCommand),
}

#[derive(clap::Subcommand, Debug)]
enum ModelsCommand {
    /// Every version in the registry.
    List {
        #[arg(long, default_value = "")]
        task: String,
        #[arg(long, default_value = "")]
        profile: String,
    },
    /// One version (default: the live one), with its lineage.
    Show {
        task: String,
        profile: String,
        /// The version (0: the live one).
        #[arg(default_value_t = 0)]
        version: u64,
        /// Write the artifact's bytes to this file.
        #[arg(long)]
        artifact_out: Option<PathBuf>,
    },
    /// Publish an earlier version's artifact again as a new, higher version
    /// (devices refuse lower versions), signed with the processor's key.
    Rollback {
        task: String,
        profile: String,
        /// The earlier version to go back to.
        to_version: u64,
    },
    /// Pin a version: the model publisher publishes no new version of the
    /// task and profile while the pin stands. A version below the live one
    /// is first republished as a new version (as rollback does).
    Pin {
        task: String,
        profile: String,
        /// The version (0: the live one).
        #[arg(default_value_t = 0)]
        version: u64,
    },
    /// Remove the pin of a task and profile.
    Unpin { task: String, profile: String },
}

#[derive(clap::Subcommand, Debug)]
pub enum KeysCommand {
    /// Create an Ed25519 key pair for signing model updates: DIR/signing.key
    /// (private, mode 0600; the processor's control.signing_key_file and
    /// trainer.signing_key_file) and
    /// DIR/signing.pub (the public key devices are provisioned with). Both
    /// hold 64 hex digits. Refuses to overwrite an existing key.
    Generate {
        /// Where to write the two files.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

type Authed = InterceptedService<Channel, Bearer>;

async fn connect(args: &CtlArgs) -> Result<(Channel, Bearer)> {
    let url = if args.addr.contains("://") {
        args.addr.clone()
    } else {
        format!("http://{}", args.addr)
    };
    let channel = Endpoint::from_shared(url.clone())
        .with_context(|| format!("--addr {:?} is not a URL", args.addr))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("connecting to the control API at {url}"))?;
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--token-file: reading {}", path.display()))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    let bearer = Bearer::new(token.as_deref()).map_err(|e| anyhow::anyhow!("--token: {e}"))?;
    Ok((channel, bearer))
}

fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Micros since the epoch as RFC 3339 UTC to the second ("-" for 0 or
/// less: never). Total over every i64: a time RFC 3339 cannot show (after
/// 9999, where humantime would panic) is shown as its number of µs. The
/// cloud accepts only 1970–2099 from devices (edgeloop_proto::validate),
/// but a table must not break on what an older processor let in.
fn time(micros: i64) -> String {
    // 9999-12-31T23:59:59Z, the last second RFC 3339 has.
    const LAST_RFC3339_MICROS: i64 = 253_402_300_799_999_999;
    if micros <= 0 {
        return "-".into();
    }
    if micros > LAST_RFC3339_MICROS {
        return format!("{micros}µs after the epoch");
    }
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_micros(micros.unsigned_abs()),
    )
    .to_string()
}

/// A left-aligned text table.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn versions(map: &std::collections::HashMap<String, u64>) -> String {
    let mut v: Vec<String> = map.iter().map(|(t, n)| format!("{t}={n}")).collect();
    v.sort();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

pub async fn run(args: CtlArgs) -> Result<()> {
    let (channel, bearer) = connect(&args).await?;
    match &args.command {
        CtlCommand::Devices { profile } => {
            let mut client: pb::fleet_client::FleetClient<Authed> =
                pb::fleet_client::FleetClient::with_interceptor(channel, bearer);
            let r = client
                .list_devices(pb::ListDevicesRequest {
                    profile: profile.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if args.json {
                return print_json(&r);
            }
            let rows: Vec<Vec<String>> = r
                .devices
                .iter()
                .map(|d| {
                    vec![
                        d.device_id.clone(),
                        if d.no_trainer_profile {
                            format!("{} (no trainer profile: no models)", d.profile)
                        } else {
                            d.profile.clone()
                        },
                        time(d.last_seen_micros),
                        match (d.has_status, d.online) {
                            (false, _) => "?".into(),
                            (true, true) => "yes".into(),
                            (true, false) => "no".into(),
                        },
                        d.backlog_records.to_string(),
                        d.oldest_unacked_ms.to_string(),
                        d.readings_seen.to_string(),
                        d.lost_readings.max(d.readings_reported_lost).to_string(),
                        versions(&d.applied_model_versions),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "DEVICE",
                        "PROFILE",
                        "LAST SEEN (UTC)",
                        "ONLINE",
                        "BACKLOG",
                        "OLDEST MS",
                        "READINGS",
                        "LOST",
                        "MODELS",
                    ],
                    &rows
                )
            );
            println!("{} device(s)", r.devices.len());
        }
        CtlCommand::Device { id } => {
            let mut client = pb::fleet_client::FleetClient::with_interceptor(channel, bearer);
            let d = client
                .get_device(pb::GetDeviceRequest {
                    device_id: id.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if args.json {
                return print_json(&d);
            }
            let rows = vec![
                vec!["device".into(), d.device_id.clone()],
                vec!["profile".into(), d.profile.clone()],
                vec!["last seen".into(), time(d.last_seen_micros)],
                vec!["status seen".into(), d.has_status.to_string()],
                vec!["online".into(), d.online.to_string()],
                vec!["agent version".into(), d.agent_version.clone()],
                vec!["status at".into(), time(d.status_ts_micros)],
                vec!["backlog records".into(), d.backlog_records.to_string()],
                vec!["backlog bytes".into(), d.backlog_bytes.to_string()],
                vec!["oldest unacked ms".into(), d.oldest_unacked_ms.to_string()],
                vec!["next seq".into(), d.next_seq.to_string()],
                vec!["applied models".into(), versions(&d.applied_model_versions)],
                vec!["last model error".into(), d.last_model_error.clone()],
                vec!["lost (device total)".into(), d.lost_readings.to_string()],
                vec!["readings consumed".into(), d.readings_seen.to_string()],
                vec!["newest reading".into(), time(d.last_reading_ts_micros)],
                vec!["loss reports".into(), d.loss_reports_seen.to_string()],
                vec![
                    "readings reported lost".into(),
                    d.readings_reported_lost.to_string(),
                ],
            ];
            print!("{}", table(&["FIELD", "VALUE"], &rows));
        }
        CtlCommand::Rules => {
            let mut client =
                pb::labelling_client::LabellingClient::with_interceptor(channel, bearer);
            let r = client
                .get_rules(pb::GetRulesRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if args.json {
                return print_json(&r);
            }
            println!(
                "rules version in force: {} ({} rules; file {}; {} reloads, {} refused)",
                if r.rules_version.is_empty() {
                    "none"
                } else {
                    &r.rules_version
                },
                r.rules.len(),
                if r.rules_file.is_empty() {
                    "none"
                } else {
                    &r.rules_file
                },
                r.reloads,
                r.refused
            );
            let rows: Vec<Vec<String>> = r
                .statistics
                .iter()
                .map(|s| {
                    let share = |a: u64| {
                        if s.votes == 0 {
                            "-".to_string()
                        } else {
                            format!("{:.3}", a as f64 / s.votes as f64)
                        }
                    };
                    vec![
                        s.rules_version.clone(),
                        s.rule.clone(),
                        s.readings.to_string(),
                        format!("{:.3}", s.coverage),
                        share(s.overlaps),
                        share(s.conflicts),
                        share(s.agreements),
                        s.estimated_accuracy
                            .map(|a| format!("{a:.3}"))
                            .unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "VERSION",
                        "RULE",
                        "READINGS",
                        "COVERAGE",
                        "OVERLAP",
                        "CONFLICT",
                        "AGREEMENT",
                        "EST.ACC",
                    ],
                    &rows
                )
            );
        }
        CtlCommand::Health => {
            let mut client = pb::health_client::HealthClient::with_interceptor(channel, bearer);
            let r = client
                .get_health(pb::GetHealthRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if args.json {
                print_json(&r)?;
            } else {
                let rows: Vec<Vec<String>> = r
                    .components
                    .iter()
                    .map(|c| {
                        vec![
                            c.name.clone(),
                            if c.ok { "ok" } else { "NOT OK" }.into(),
                            c.detail.clone(),
                        ]
                    })
                    .collect();
                print!("{}", table(&["COMPONENT", "STATE", "DETAIL"], &rows));
                println!("ready: {}", r.ready);
            }
            if !r.ready {
                std::process::exit(1);
            }
        }
        CtlCommand::Models(command) => {
            let mut client = pb::models_client::ModelsClient::with_interceptor(channel, bearer);
            match command {
                ModelsCommand::List { task, profile } => {
                    let r = client
                        .list_models(pb::ListModelsRequest {
                            task: task.clone(),
                            profile: profile.clone(),
                        })
                        .await
                        .map_err(status_error)?
                        .into_inner();
                    if args.json {
                        return print_json(&r);
                    }
                    print!("{}", models_table(&r.models));
                }
                ModelsCommand::Show {
                    task,
                    profile,
                    version,
                    artifact_out,
                } => {
                    let r = client
                        .get_model(pb::GetModelRequest {
                            task: task.clone(),
                            profile: profile.clone(),
                            version: *version,
                            include_artifact: artifact_out.is_some(),
                        })
                        .await
                        .map_err(status_error)?
                        .into_inner();
                    if let Some(path) = artifact_out {
                        std::fs::write(path, &r.artifact)
                            .with_context(|| format!("writing {}", path.display()))?;
                        eprintln!(
                            "artifact ({} bytes) written to {}",
                            r.artifact.len(),
                            path.display()
                        );
                    }
                    if args.json {
                        return print_json(&r.model);
                    }
                    if let Some(m) = &r.model {
                        print!("{}", models_table(std::slice::from_ref(m)));
                        println!("lineage: {}", m.lineage_json);
                    }
                }
                ModelsCommand::Rollback {
                    task,
                    profile,
                    to_version,
                } => {
                    let r = client
                        .rollback(pb::RollbackRequest {
                            task: task.clone(),
                            profile: profile.clone(),
                            to_version: *to_version,
                        })
                        .await
                        .map_err(status_error)?
                        .into_inner();
                    if args.json {
                        return print_json(&r);
                    }
                    if let Some(m) = &r.published {
                        println!(
                            "published version {} of {task}/{profile}: the artifact of version {to_version}",
                            m.version
                        );
                        print!("{}", models_table(std::slice::from_ref(m)));
                    }
                }
                ModelsCommand::Pin {
                    task,
                    profile,
                    version,
                } => {
                    let r = client
                        .pin(pb::PinRequest {
                            task: task.clone(),
                            profile: profile.clone(),
                            version: *version,
                        })
                        .await
                        .map_err(status_error)?
                        .into_inner();
                    if args.json {
                        return print_json(&r);
                    }
                    if let Some(m) = &r.pinned {
                        if r.republished {
                            println!(
                                "version {version} of {task}/{profile} republished as version {} and pinned",
                                m.version
                            );
                        } else {
                            println!("version {} of {task}/{profile} pinned", m.version);
                        }
                        print!("{}", models_table(std::slice::from_ref(m)));
                    }
                }
                ModelsCommand::Unpin { task, profile } => {
                    let r = client
                        .unpin(pb::UnpinRequest {
                            task: task.clone(),
                            profile: profile.clone(),
                        })
                        .await
                        .map_err(status_error)?
                        .into_inner();
                    if args.json {
                        return print_json(&r);
                    }
                    if r.was_pinned {
                        println!("{task}/{profile} unpinned");
                    } else {
                        println!(
                            "{task}/{profile} had no pin (a tombstone was written all the same)"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

fn models_table(models: &[pb::ModelVersion]) -> String {
    let rows: Vec<Vec<String>> = models
        .iter()
        .map(|m| {
            vec![
                m.task.clone(),
                m.profile.clone(),
                m.version.to_string(),
                match (m.live, m.pinned) {
                    (true, true) => "live,pinned",
                    (true, false) => "live",
                    (false, true) => "pinned",
                    (false, false) => "",
                }
                .into(),
                m.format.clone(),
                m.artifact_bytes.to_string(),
                format!(
                    "{}{}",
                    m.sha256.get(..12).unwrap_or(&m.sha256),
                    if m.sha256_ok { "" } else { " (MISMATCH)" }
                ),
                m.signature.clone(),
                time(m.published_at_micros),
            ]
        })
        .collect();
    table(
        &[
            "TASK",
            "PROFILE",
            "VERSION",
            "STATE",
            "FORMAT",
            "BYTES",
            "SHA256",
            "SIGNATURE",
            "PUBLISHED (UTC)",
        ],
        &rows,
    )
}

/// `edgeloop keys generate`.
pub fn keys(command: KeysCommand) -> Result<()> {
    let KeysCommand::Generate { out } = command;
    let (private, public) = generate_key_files(&out)?;
    println!(
        "wrote {} (private: the processor's control.signing_key_file and trainer.signing_key_file) and {} (public: provision devices with it, agent models.verify_key_file)",
        private.display(),
        public.display()
    );
    Ok(())
}

/// Writes a new Ed25519 key pair as `out/signing.key` (the seed, mode 0600)
/// and `out/signing.pub`, in hex; refuses to overwrite either. Returns
/// (private, public).
pub fn generate_key_files(out: &Path) -> Result<(PathBuf, PathBuf)> {
    let private = out.join("signing.key");
    let public = out.join("signing.pub");
    for p in [&private, &public] {
        anyhow::ensure!(
            !p.exists(),
            "{} exists already; move it away first (a new key would orphan every device provisioned with the old one)",
            p.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
    let key = signing::SigningKey::from_bytes(&seed);
    write_private(&private, &format!("{}\n", signing::to_hex(&seed)))?;
    std::fs::write(
        &public,
        format!("{}\n", signing::to_hex(key.verifying_key().as_bytes())),
    )
    .with_context(|| format!("writing {}", public.display()))?;
    Ok((private, public))
}

/// Creates `path` (refusing an existing file) with mode 0600, writes
/// `text` and fsyncs it: for keys and tokens.
pub(crate) fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_times_are_utc() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
        assert_eq!(time(0), "-");
        assert_eq!(time(1_700_000_000_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn any_timestamp_formats_without_a_panic() {
        // Year 3000, the last and first i64, and the edges of RFC 3339.
        assert_eq!(time(32_503_680_000_000_000), "3000-01-01T00:00:00Z");
        assert_eq!(time(253_402_300_799_999_999), "9999-12-31T23:59:59Z");
        assert_eq!(
            time(253_402_300_800_000_000),
            "253402300800000000µs after the epoch"
        );
        assert_eq!(time(i64::MAX), "9223372036854775807µs after the epoch");
        assert_eq!(time(i64::MIN), "-");
        let t = table(&["T"], &[vec![time(i64::MAX)], vec![time(i64::MIN)]]);
        assert_eq!(t.lines().count(), 3);
    }

    #[test]
    fn generated_keys_sign_and_verify_and_are_not_overwritten() -> Result<()> {
        let dir = tempfile::tempdir()?;
        keys(KeysCommand::Generate {
            out: dir.path().to_path_buf(),
        })?;
        let private =
            signing::parse_signing_key(&std::fs::read_to_string(dir.path().join("signing.key"))?)?;
        let public = signing::parse_verifying_key(&std::fs::read_to_string(
            dir.path().join("signing.pub"),
        )?)?;
        assert_eq!(private.verifying_key(), public);
        assert!(keys(KeysCommand::Generate {
            out: dir.path().to_path_buf(),
        })
        .is_err());
        Ok(())
    }
}
