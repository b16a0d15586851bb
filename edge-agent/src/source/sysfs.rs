//! The real sensors of a Linux device, sampled at a configured rate:
//!
//! - `{root}/class/thermal/thermal_zone*/temp` (millidegrees Celsius), named
//!   `thermal_{type}` after the zone's `type` file;
//! - `{root}/class/hwmon/hwmon*/{temp,in,curr,power,fan}*_input`, named
//!   `{chip}_{label or sensor}` after the chip's `name` file and the sensor's
//!   `_label` file, scaled to °C, V, A, W and RPM.
//!
//! The sensors are found once at start (their names are the channels). A
//! sensor that cannot be read at a sample is stored as null and counted in
//! `bad_lines`.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use edgeloop_proto::v1::Reading;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::SourceError;
use crate::spool::SharedSpool;
use crate::stats::AgentStats;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SysfsConfig {
    /// Samples per second.
    pub rate_hz: f64,
    /// Where sysfs is mounted.
    pub root: PathBuf,
}

impl Default for SysfsConfig {
    fn default() -> Self {
        SysfsConfig {
            rate_hz: 1.0,
            root: PathBuf::from("/sys"),
        }
    }
}

/// One sensor file and how to scale its integer value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sensor {
    pub channel: String,
    pub path: PathBuf,
    pub scale: f64,
}

fn clean(name: &str) -> String {
    let s: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    s.trim_matches('_').chars().take(60).collect()
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn sorted_dir(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Finds the sensors under `root`; names are unique.
pub fn discover(root: &Path) -> Vec<Sensor> {
    let mut sensors = Vec::new();
    for zone in sorted_dir(&root.join("class/thermal"), "thermal_zone") {
        let temp = zone.join("temp");
        if temp.is_file() {
            let kind = read_trimmed(&zone.join("type")).unwrap_or_else(|| {
                zone.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
            sensors.push(Sensor {
                channel: format!("thermal_{}", clean(&kind)),
                path: temp,
                scale: 1e-3,
            });
        }
    }
    for chip in sorted_dir(&root.join("class/hwmon"), "hwmon") {
        let chip_name = read_trimmed(&chip.join("name")).unwrap_or_else(|| {
            chip.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        for input in sorted_dir(&chip, "") {
            let Some(file) = input
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            let Some(sensor) = file.strip_suffix("_input") else {
                continue;
            };
            let scale = match sensor.trim_end_matches(|c: char| c.is_ascii_digit()) {
                "temp" => 1e-3,
                "in" => 1e-3,
                "curr" => 1e-3,
                "power" => 1e-6,
                "fan" => 1.0,
                _ => continue,
            };
            let label = read_trimmed(&chip.join(format!("{sensor}_label")))
                .unwrap_or_else(|| sensor.to_string());
            sensors.push(Sensor {
                channel: format!("{}_{}", clean(&chip_name), clean(&label)),
                path: input,
                scale,
            });
        }
    }
    // Make names unique (two chips of the same name, say).
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for s in &mut sensors {
        let n = seen.entry(s.channel.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            s.channel = format!("{}_{}", s.channel, n);
        }
    }
    sensors
}

/// Samples `sensors` every `1/rate_hz` until `shutdown`.
pub async fn run(
    config: &SysfsConfig,
    sensors: Vec<Sensor>,
    spool: Arc<SharedSpool>,
    shutdown: CancellationToken,
    stats: Arc<AgentStats>,
) -> Result<(), SourceError> {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / config.rate_hz));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let values: Vec<f64> = sensors
            .iter()
            .map(
                |s| match read_trimmed(&s.path).and_then(|v| v.parse::<f64>().ok()) {
                    Some(v) => v * s.scale,
                    None => {
                        AgentStats::add(&stats.bad_lines, 1);
                        f64::NAN
                    }
                },
            )
            .collect();
        let reading = Reading {
            ts_micros: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as i64)
                .unwrap_or(0),
            values,
            true_label: String::new(),
            predictions: Vec::new(),
        };
        if !spool.append_waiting(vec![reading], &shutdown).await? {
            break;
        }
        AgentStats::add(&stats.readings_generated, 1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thermal_zones_and_hwmon_sensors_are_found_named_and_scaled(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let zone = root.path().join("class/thermal/thermal_zone0");
        fs::create_dir_all(&zone)?;
        fs::write(zone.join("type"), "x86_pkg_temp\n")?;
        fs::write(zone.join("temp"), "45000\n")?;
        let chip = root.path().join("class/hwmon/hwmon1");
        fs::create_dir_all(&chip)?;
        fs::write(chip.join("name"), "nct6775\n")?;
        fs::write(chip.join("in0_input"), "1200\n")?;
        fs::write(chip.join("fan1_input"), "900\n")?;
        fs::write(chip.join("fan1_label"), "CPU Fan\n")?;
        fs::write(chip.join("uevent"), "")?;
        let sensors = discover(root.path());
        let names: Vec<&str> = sensors.iter().map(|s| s.channel.as_str()).collect();
        assert_eq!(
            names,
            ["thermal_x86_pkg_temp", "nct6775_cpu_fan", "nct6775_in0"]
        );
        let volts = &sensors[2];
        let raw: f64 = fs::read_to_string(&volts.path)?.trim().parse()?;
        assert_eq!(raw * volts.scale, 1.2);
        Ok(())
    }
}
