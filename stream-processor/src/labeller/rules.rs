//! The labelling rules file: what an expert writes, parsed and checked.
//!
//! ```toml
//! version = "v3"                 # optional; default: a hash of the file
//! combiner = "label_model"       # or "majority"
//!
//! [[rule]]
//! name = "temperature_spike"
//! label = "spike"
//! when = { kind = "zscore", channel = "temperature", window = 60, above = 4.0 }
//! ```
//!
//! A rule votes its `label` when its condition holds and abstains otherwise.
//! Errors name the rule and the field, and a refused file leaves the running
//! rules in force.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Combiner {
    /// Each rule weighted by its accuracy, estimated without ground truth.
    #[default]
    LabelModel,
    /// The label with the most votes.
    Majority,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub combiner: Combiner,
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    pub label: String,
    pub when: Condition,
}

/// A condition on the readings of one device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum Condition {
    /// The value is above `above` or below `below`.
    Threshold {
        channel: String,
        above: Option<f64>,
        below: Option<f64>,
    },
    /// The value is outside `min..=max` (or inside, with `inside = true`).
    Range {
        channel: String,
        min: f64,
        max: f64,
        #[serde(default)]
        inside: bool,
    },
    /// The value changes faster than `max_per_second` (either way).
    RateOfChange {
        channel: String,
        max_per_second: f64,
    },
    /// |z| of the value against the previous `window` values exceeds `above`.
    Zscore {
        channel: String,
        window: usize,
        above: f64,
    },
    /// The value has been above `above` (or below `below`) for at least
    /// `for_seconds`.
    Duration {
        channel: String,
        above: Option<f64>,
        below: Option<f64>,
        for_seconds: f64,
    },
    /// The value has not changed (within `tolerance`) over the last `window` readings.
    Flat {
        channel: String,
        window: usize,
        #[serde(default)]
        tolerance: f64,
    },
    /// All of these hold.
    All { of: Vec<Condition> },
    /// Any of these holds.
    Any { of: Vec<Condition> },
    /// This does not hold.
    Not { of: Box<Condition> },
}

/// A refused rules file: which rule, which field, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("the rules file is not valid TOML for rules: {0}")]
    Syntax(String),
    #[error("rule {rule:?}: {field}: {reason}")]
    Rule {
        rule: String,
        field: String,
        reason: String,
    },
}

/// Longest window accepted, in readings (windows are kept per device).
pub const MAX_WINDOW: usize = 10_000;

impl Condition {
    fn check(
        &self,
        rule: &str,
        path: &str,
        known: &dyn Fn(&str) -> bool,
    ) -> Result<(), RulesError> {
        let err = |field: &str, reason: String| RulesError::Rule {
            rule: rule.into(),
            field: format!("{path}{field}"),
            reason,
        };
        let channel_ok = |channel: &str| {
            if known(channel) {
                Ok(())
            } else {
                Err(err(
                    "channel",
                    format!("{channel:?} is not a channel of the data set"),
                ))
            }
        };
        let finite = |field: &str, v: f64| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(err(field, format!("{v} is not a finite number")))
            }
        };
        match self {
            Condition::Threshold {
                channel,
                above,
                below,
            }
            | Condition::Duration {
                channel,
                above,
                below,
                ..
            } => {
                channel_ok(channel)?;
                if above.is_none() && below.is_none() {
                    return Err(err("above", "give `above`, `below` or both".into()));
                }
                if let Some(a) = above {
                    finite("above", *a)?;
                }
                if let Some(b) = below {
                    finite("below", *b)?;
                }
                if let Condition::Duration { for_seconds, .. } = self {
                    if !(for_seconds.is_finite() && *for_seconds > 0.0) {
                        return Err(err(
                            "for_seconds",
                            format!("{for_seconds} must be a positive number of seconds"),
                        ));
                    }
                }
                Ok(())
            }
            Condition::Range {
                channel, min, max, ..
            } => {
                channel_ok(channel)?;
                finite("min", *min)?;
                finite("max", *max)?;
                if min > max {
                    return Err(err("min", format!("{min} is above max {max}")));
                }
                Ok(())
            }
            Condition::RateOfChange {
                channel,
                max_per_second,
            } => {
                channel_ok(channel)?;
                if !(max_per_second.is_finite() && *max_per_second > 0.0) {
                    return Err(err(
                        "max_per_second",
                        format!("{max_per_second} must be positive"),
                    ));
                }
                Ok(())
            }
            Condition::Zscore {
                channel,
                window,
                above,
            } => {
                channel_ok(channel)?;
                if !(2..=MAX_WINDOW).contains(window) {
                    return Err(err(
                        "window",
                        format!("{window} readings is not within 2..={MAX_WINDOW}"),
                    ));
                }
                if !(above.is_finite() && *above > 0.0) {
                    return Err(err("above", format!("{above} must be a positive z-score")));
                }
                Ok(())
            }
            Condition::Flat {
                channel,
                window,
                tolerance,
            } => {
                channel_ok(channel)?;
                if !(2..=MAX_WINDOW).contains(window) {
                    return Err(err(
                        "window",
                        format!("{window} readings is not within 2..={MAX_WINDOW}"),
                    ));
                }
                if !(tolerance.is_finite() && *tolerance >= 0.0) {
                    return Err(err(
                        "tolerance",
                        format!("{tolerance} must be zero or more"),
                    ));
                }
                Ok(())
            }
            Condition::All { of } | Condition::Any { of } => {
                if of.is_empty() {
                    return Err(err("of", "needs at least one condition".into()));
                }
                for (i, c) in of.iter().enumerate() {
                    c.check(rule, &format!("{path}of[{i}]."), known)?;
                }
                Ok(())
            }
            Condition::Not { of } => of.check(rule, &format!("{path}of."), known),
        }
    }
}

impl RulesFile {
    /// Parses and checks a rules file. `known` says whether a channel exists
    /// (`None`: any channel name is accepted).
    pub fn parse(
        text: &str,
        known: Option<&dyn Fn(&str) -> bool>,
    ) -> Result<RulesFile, RulesError> {
        let mut file: RulesFile =
            toml::from_str(text).map_err(|e| RulesError::Syntax(e.to_string()))?;
        let any = |_: &str| true;
        let known = known.unwrap_or(&any);
        let mut names = std::collections::HashSet::new();
        for (i, rule) in file.rules.iter().enumerate() {
            let label = if rule.name.is_empty() {
                format!("#{i}")
            } else {
                rule.name.clone()
            };
            if rule.name.is_empty()
                || !rule
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(RulesError::Rule {
                    rule: label,
                    field: "name".into(),
                    reason: "must be letters, digits or '_'".into(),
                });
            }
            if !names.insert(rule.name.clone()) {
                return Err(RulesError::Rule {
                    rule: label,
                    field: "name".into(),
                    reason: "another rule has this name".into(),
                });
            }
            if rule.label.is_empty() {
                return Err(RulesError::Rule {
                    rule: label,
                    field: "label".into(),
                    reason: "must not be empty".into(),
                });
            }
            rule.when.check(&label, "when.", known)?;
        }
        if file.version.as_deref().is_none_or(str::is_empty) {
            // FNV-1a of the text: stable across runs and machines.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in text.bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            file.version = Some(format!("{h:016x}"));
        }
        Ok(file)
    }

    pub fn version(&self) -> &str {
        self.version.as_deref().unwrap_or_default()
    }
}
