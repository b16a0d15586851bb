//! `edgeloop check CONFIG`: a component's config file checked offline, as
//! the component would read it at start-up (the file, then the
//! `EDGELOOP_{COMPONENT}__*` overrides of `config_env`, then its
//! `validate()`), without connecting to anything. For the processor, the
//! rules file it names is checked too, against its `channels` (what
//! `edgeloop labels check` does), and so are the key and token files it
//! would load. A refusal names the field (or the rule) that is wrong.
//!
//! Which component a file belongs to comes from `--kind`, else from its
//! keys (the component whose config has most of the file's top-level keys;
//! `[[rule]]` makes a rules file), else from its file name.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;

use crate::config_env;

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The config file (TOML).
    pub file: PathBuf,
    /// Which component's config it is (default: told from its keys, else
    /// from its file name).
    #[arg(long, value_enum)]
    pub kind: Option<Kind>,
}

/// The kinds of file `check` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Processor,
    Broker,
    Agent,
    /// A labelling rules file (docs/labelling.md).
    Rules,
    /// An `edgeloop up --config` file (config/up.example.toml).
    Up,
}

impl Kind {
    const COMPONENTS: [Kind; 3] = [Kind::Processor, Kind::Broker, Kind::Agent];

    fn name(self) -> &'static str {
        match self {
            Kind::Processor => "processor",
            Kind::Broker => "broker",
            Kind::Agent => "agent",
            Kind::Rules => "rules",
            Kind::Up => "up",
        }
    }

    /// The top-level keys of the component's config (those its defaults
    /// have; optional keys unset by default are not among them).
    fn keys(self) -> Vec<String> {
        fn of<T: serde::Serialize + Default>() -> Vec<String> {
            toml::Table::try_from(T::default())
                .map(|t| t.keys().cloned().collect())
                .unwrap_or_default()
        }
        match self {
            Kind::Processor => of::<edgeloop_processor::ProcessorConfig>(),
            Kind::Broker => of::<edgeloop_broker::BrokerConfig>(),
            Kind::Agent => of::<edgeloop_agent::AgentConfig>(),
            Kind::Rules => vec!["rule".into()],
            Kind::Up => vec!["devices".into()],
        }
    }
}

/// Which kind of file `text` (at `path`) is.
fn detect(path: &Path, text: &str) -> Result<Kind> {
    let table: toml::Table =
        toml::from_str(text).with_context(|| format!("{} is not TOML", path.display()))?;
    if table.contains_key("rule") {
        return Ok(Kind::Rules);
    }
    // Only an `up` file has device groups or component sections.
    if ["devices", "broker", "processor", "agent"]
        .iter()
        .any(|k| table.contains_key(*k))
    {
        return Ok(Kind::Up);
    }
    let scores: Vec<(Kind, usize)> = Kind::COMPONENTS
        .iter()
        .map(|k| {
            let keys = k.keys();
            (*k, table.keys().filter(|key| keys.contains(key)).count())
        })
        .collect();
    let best = scores.iter().map(|(_, s)| *s).max().unwrap_or(0);
    let leaders: Vec<Kind> = scores
        .iter()
        .filter(|(_, s)| *s == best && best > 0)
        .map(|(k, _)| *k)
        .collect();
    if let [only] = leaders[..] {
        return Ok(only);
    }
    // A tie (say a file of [kafka] only), or no known key: the file name.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let candidates = if leaders.is_empty() {
        Kind::COMPONENTS.to_vec()
    } else {
        leaders
    };
    let named: Vec<Kind> = candidates
        .iter()
        .copied()
        .filter(|k| name.contains(k.name()))
        .collect();
    match named[..] {
        [only] => Ok(only),
        _ => bail!(
            "cannot tell which component's config this is (it could be {}); pass --kind processor|broker|agent|rules|up",
            candidates
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(" or ")
        ),
    }
}

/// Checks `file` as the component of `kind` (detected when `None`) would
/// read it, with the overrides among `vars` (the process environment in
/// `edgeloop check`); returns the summary to print.
pub fn check(
    file: &Path,
    kind: Option<Kind>,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<String> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let kind = match kind {
        Some(k) => k,
        None => detect(file, &text)?,
    };
    let mut out = match kind {
        Kind::Rules => format!("{}: ok: rules file", file.display()),
        _ => format!("{}: ok: {} config", file.display(), kind.name()),
    };
    match kind {
        Kind::Processor => {
            let config: edgeloop_processor::ProcessorConfig =
                config_env::load("processor", Some(file), vars)?;
            config.validate().map_err(anyhow::Error::msg)?;
            config.trainer.signing_key().map_err(anyhow::Error::msg)?;
            if config.control.listen.is_some() {
                config.control.resolve_token()?;
            }
            let _ = write!(
                out,
                "; kafka {}, group {}, parquet_root {}, trainer {}",
                config.kafka.bootstrap_servers,
                config.group_id,
                config.parquet_root.display(),
                if config.trainer.enabled { "on" } else { "off" }
            );
            match &config.rules_file {
                Some(rules) => {
                    let line = rules_summary(rules, &config.channels)
                        .with_context(|| format!("rules_file {}", rules.display()))?;
                    let _ = write!(out, "\n  rules_file {}: {line}", rules.display());
                }
                None => out.push_str("; no rules_file: readings stay unlabelled"),
            }
        }
        Kind::Broker => {
            let config: edgeloop_broker::BrokerConfig =
                config_env::load("broker", Some(file), vars)?;
            config.validate().map_err(anyhow::Error::msg)?;
            let _ = write!(
                out,
                "; mqtt.listen {}, kafka {}",
                config.mqtt.listen, config.kafka.bootstrap_servers
            );
        }
        Kind::Agent => {
            let config: edgeloop_agent::AgentConfig = config_env::load("agent", Some(file), vars)?;
            config.validate().map_err(anyhow::Error::msg)?;
            let _ = write!(
                out,
                "; device {}, profile {}, broker {}:{}",
                config.device_id, config.profile, config.mqtt.host, config.mqtt.port
            );
        }
        Kind::Up => {
            let up = crate::up::config::UpFile::read(file, vars)?;
            let dir = file.parent().filter(|d| !d.as_os_str().is_empty());
            let plan = crate::up::config::plan(
                up,
                Some(dir.unwrap_or(Path::new("."))),
                &Default::default(),
            )?;
            for broker in &plan.brokers {
                broker.validate().map_err(anyhow::Error::msg)?;
            }
            // `up` makes the control API's token itself.
            let mut processor = plan.processor.clone();
            processor.control.token = Some("0123456789abcdef0123".into());
            processor.validate().map_err(anyhow::Error::msg)?;
            let _ = write!(
                out,
                "; {}; data_dir {}; trainer {}",
                plan.description.join(", "),
                plan.data_dir.display(),
                if processor.trainer.enabled {
                    format!("on ({})", processor.trainer.profile_names().join(", "))
                } else {
                    "off".into()
                }
            );
            match &processor.rules_file {
                Some(rules) if !plan.example_rules => {
                    let line = rules_summary(rules, &processor.channels)
                        .with_context(|| format!("processor.rules_file {}", rules.display()))?;
                    let _ = write!(out, "\n  rules_file {}: {line}", rules.display());
                }
                Some(_) => out.push_str("; the simulator's example rules"),
                None => out.push_str("; no rules: readings stay unlabelled"),
            }
        }
        Kind::Rules => {
            let line = rules_summary(file, &[])?;
            let _ = write!(
                out,
                "; {line} (any channel accepted: checking the processor's config checks them against its channels)"
            );
        }
    }
    Ok(out)
}

/// Parses and checks a rules file as the processor does, against
/// `channels` (empty: any channel): `N rules, version V, combiner C`, or
/// the refusal naming the rule and the field (`edgeloop labels check`).
pub fn rules_summary(file: &Path, channels: &[String]) -> Result<String> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let known = |c: &str| channels.is_empty() || channels.iter().any(|k| k == c);
    let rules = edgeloop_processor::labeller::RulesFile::parse(&text, Some(&known))?;
    Ok(format!(
        "{} rules, version {}, combiner {:?}",
        rules.rules.len(),
        rules.version(),
        rules.combiner
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name)
    }

    fn no_vars() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn every_shipped_example_config_passes_and_its_kind_is_told_from_its_keys() -> Result<()> {
        for (name, kind) in [
            ("processor.example.toml", "processor"),
            ("broker.example.toml", "broker"),
            ("agent.example.toml", "agent"),
            ("rules.example.toml", "rules"),
            ("up.example.toml", "up"),
        ] {
            let path = example(name);
            let text = std::fs::read_to_string(&path)?;
            assert_eq!(detect(Path::new("config.toml"), &text)?.name(), kind);
            let summary = check(&path, None, no_vars())?;
            assert!(summary.contains("ok"), "{summary}");
        }
        Ok(())
    }

    #[test]
    fn a_processor_config_is_checked_with_the_rules_file_it_names() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("processor.toml");
        let rules = example("rules.example.toml");
        std::fs::write(
            &config,
            format!(
                "rules_file = {:?}\nchannels = [\"temperature\", \"humidity\", \"vibration\"]\n",
                rules.display().to_string()
            ),
        )?;
        let summary = check(&config, None, no_vars())?;
        assert!(summary.contains("version sim-v1"), "{summary}");
        // The same rules against channels they do not name are refused.
        std::fs::write(
            &config,
            format!(
                "rules_file = {:?}\nchannels = [\"pressure\"]\n",
                rules.display().to_string()
            ),
        )?;
        let err = format!(
            "{:#}",
            check(&config, None, no_vars()).expect_err("refused")
        );
        assert!(
            err.contains("rules_file") && err.contains("when.channel"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn an_unknown_field_is_refused_naming_it() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("processor.toml");
        std::fs::write(&config, "group_id = \"g\"\n[sink]\nmax_rowz = 5\n")?;
        let err = format!(
            "{:#}",
            check(&config, None, no_vars()).expect_err("refused")
        );
        assert!(err.contains("max_rowz"), "{err}");
        let agent = dir.path().join("agent.toml");
        std::fs::write(&agent, "device_id = \"d\"\nprofil = \"f32\"\n")?;
        let err = format!("{:#}", check(&agent, None, no_vars()).expect_err("refused"));
        assert!(err.contains("profil"), "{err}");
        Ok(())
    }

    #[test]
    fn a_bad_value_is_refused_naming_the_field() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("p.toml");
        std::fs::write(&config, "[sink]\nzstd_level = 40\n")?;
        let err = format!(
            "{:#}",
            check(&config, Some(Kind::Processor), no_vars()).expect_err("refused")
        );
        assert!(err.contains("sink.zstd_level"), "{err}");
        // A bad value from the environment is refused too, naming it.
        std::fs::write(&config, "[sink]\nzstd_level = 3\n")?;
        let vars = vec![("EDGELOOP_PROCESSOR__SINK__MAX_AGE".into(), "0s".into())];
        let err = format!(
            "{:#}",
            check(&config, Some(Kind::Processor), vars).expect_err("refused")
        );
        assert!(err.contains("sink.max_age"), "{err}");
        let broker = dir.path().join("broker.toml");
        std::fs::write(
            &broker,
            "[kafka]\npartitions = 0\n[mqtt]\nmax_inflight = 1\n",
        )?;
        let err = format!(
            "{:#}",
            check(&broker, None, no_vars()).expect_err("refused")
        );
        assert!(err.contains("kafka.partitions"), "{err}");
        Ok(())
    }

    #[test]
    fn a_file_that_could_be_two_components_asks_for_its_kind() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("config.toml");
        std::fs::write(&config, "[kafka]\nbootstrap_servers = \"k:9092\"\n")?;
        let err = format!(
            "{:#}",
            check(&config, None, no_vars()).expect_err("ambiguous")
        );
        assert!(err.contains("--kind"), "{err}");
        assert!(check(&config, Some(Kind::Broker), no_vars())?.contains("ok: broker"));
        let named = dir.path().join("processor-0.toml");
        std::fs::copy(&config, &named)?;
        assert!(check(&named, None, no_vars())?.contains("ok: processor"));
        Ok(())
    }
}
