//! Config files with environment overrides: every key of a component's TOML
//! config can also be set from the environment, as
//! `EDGELOOP_{COMPONENT}__{KEY}[__{SUBKEY}…]`, e.g.
//! `EDGELOOP_PROCESSOR__SINK__MAX_AGE=10s` for `[sink] max_age` of the
//! processor. The variable's value is read as a TOML value when it is one
//! (`42`, `true`, `["a", "b"]`, `"quoted"`), else as a string (`10s`,
//! `0.0.0.0:9464`). The environment wins over the file; flags win over both.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// The variables that set config keys of `component`: their names start
/// with this.
pub fn prefix(component: &str) -> String {
    format!("EDGELOOP_{}__", component.to_ascii_uppercase())
}

/// A variable's value as TOML: a TOML value if it parses as one, else a
/// string.
fn value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// Sets `path` (keys, outermost first) in `table` to `v`.
fn set(table: &mut toml::Table, path: &[String], v: toml::Value, var: &str) -> Result<()> {
    let Some((last, parents)) = path.split_last() else {
        bail!("{var}: names no config key");
    };
    let mut at = table;
    for key in parents {
        let entry = at
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("{var}: config key {key:?} is not a table"),
        };
    }
    at.insert(last.clone(), v);
    Ok(())
}

/// The config of `component`: the file (if any), then the `vars` that
/// override its keys, checked against `T` (unknown keys and bad values are
/// refused, naming the key and where it came from).
pub fn load<T: serde::de::DeserializeOwned>(
    component: &str,
    file: Option<&Path>,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<T> {
    let mut table = match file {
        None => toml::Table::new(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("in config file {}", path.display()))?
        }
    };
    let prefix = prefix(component);
    let mut overridden: Vec<String> = Vec::new();
    for (name, raw) in vars {
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) {
            bail!("{name}: an empty key (two `__` in a row, or a trailing one)");
        }
        set(&mut table, &path, value(&raw), &name)?;
        overridden.push(name);
    }
    let from = match (file, overridden.is_empty()) {
        (Some(path), true) => format!("config file {}", path.display()),
        (Some(path), false) => format!(
            "config file {} with {}",
            path.display(),
            overridden.join(", ")
        ),
        (None, false) => overridden.join(", "),
        (None, true) => "the default config".to_string(),
    };
    T::deserialize(toml::Value::Table(table)).with_context(|| format!("in {from}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_environment_sets_any_key_over_the_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("processor.toml");
        std::fs::write(&file, "group_id = \"from-file\"\n[sink]\nmax_rows = 5\n")?;
        let config: edgeloop_processor::ProcessorConfig = load(
            "processor",
            Some(&file),
            vars(&[
                ("EDGELOOP_PROCESSOR__SINK__MAX_AGE", "7s"),
                ("EDGELOOP_PROCESSOR__SINK__ZSTD_LEVEL", "9"),
                ("EDGELOOP_PROCESSOR__CHANNELS", "[\"a\", \"b\"]"),
                ("EDGELOOP_PROCESSOR__KAFKA__BOOTSTRAP_SERVERS", "k:9092"),
                ("EDGELOOP_BROKER__SHUTDOWN_GRACE", "1s"),
                ("PATH", "/bin"),
            ]),
        )?;
        assert_eq!(config.group_id, "from-file");
        assert_eq!(config.sink.max_rows, 5);
        assert_eq!(config.sink.max_age, Duration::from_secs(7));
        assert_eq!(config.sink.zstd_level, 9);
        assert_eq!(config.channels, ["a", "b"]);
        assert_eq!(config.kafka.bootstrap_servers, "k:9092");
        let broker: edgeloop_broker::BrokerConfig = load(
            "broker",
            None,
            vars(&[("EDGELOOP_BROKER__SHUTDOWN_GRACE", "1s")]),
        )?;
        assert_eq!(broker.shutdown_grace, Duration::from_secs(1));
        let agent: edgeloop_agent::AgentConfig = load("agent", None, vars(&[]))?;
        assert_eq!(agent, edgeloop_agent::AgentConfig::default());
        Ok(())
    }

    #[test]
    fn the_environment_sets_the_agents_model_keys() -> Result<()> {
        let agent: edgeloop_agent::AgentConfig = load(
            "agent",
            None,
            vars(&[
                (
                    "EDGELOOP_AGENT__MODELS__VERIFY_KEY_FILE",
                    "/etc/edgeloop/signing.pub",
                ),
                ("EDGELOOP_AGENT__MODELS__DIR", "/var/lib/edgeloop/models"),
            ]),
        )?;
        assert_eq!(
            agent.models.verify_key_file.as_deref(),
            Some(Path::new("/etc/edgeloop/signing.pub"))
        );
        assert_eq!(
            agent.models.dir.as_deref(),
            Some(Path::new("/var/lib/edgeloop/models"))
        );
        Ok(())
    }

    #[test]
    fn a_bad_override_is_refused_naming_the_key_and_the_variable() {
        let err = load::<edgeloop_processor::ProcessorConfig>(
            "processor",
            None,
            vars(&[("EDGELOOP_PROCESSOR__SINK__MAX_ROWZ", "5")]),
        )
        .expect_err("unknown key");
        let text = format!("{err:#}");
        assert!(
            text.contains("max_rowz") && text.contains("EDGELOOP_PROCESSOR__SINK__MAX_ROWZ"),
            "{text}"
        );
        let err = load::<edgeloop_processor::ProcessorConfig>(
            "processor",
            None,
            vars(&[("EDGELOOP_PROCESSOR__SINK__MAX_ROWS", "many")]),
        )
        .expect_err("bad value");
        let text = format!("{err:#}");
        assert!(
            text.contains("max_rows") && text.contains("EDGELOOP_PROCESSOR__SINK__MAX_ROWS"),
            "{text}"
        );
        let err = load::<edgeloop_processor::ProcessorConfig>(
            "processor",
            None,
            vars(&[("EDGELOOP_PROCESSOR__GROUP_ID__X", "5")]),
        )
        .expect_err("not a table");
        assert!(format!("{err:#}").contains("group_id"), "{err:#}");
    }
}
