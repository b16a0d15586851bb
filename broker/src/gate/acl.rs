//! Who may publish and subscribe to what.
//!
//! A device may publish only to `telemetry/{its id}` and `status/{its id}`,
//! and subscribe only to `ack/{its id}` and filters under `models/`. A
//! service identity (operators' tools) may do anything. The bridge and the
//! model publisher are not network clients at all: they are rumqttd local
//! links inside the broker process and never pass through the gate.

use std::fmt;

/// What an authenticated connection is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Device,
    Service,
}

/// An authenticated connection: the device id it acts as, and its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: String,
    pub role: Role,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.role {
            Role::Device => write!(f, "device {}", self.id),
            Role::Service => write!(f, "service {}", self.id),
        }
    }
}

/// A device id usable as one topic level: non-empty, at most 128 bytes, no
/// `/`, `+`, `#`, NUL or whitespace.
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#' | '\0') || c.is_whitespace())
}

impl Identity {
    pub fn can_publish(&self, topic: &str) -> bool {
        match self.role {
            Role::Service => true,
            Role::Device => topic
                .split_once('/')
                .is_some_and(|(kind, id)| matches!(kind, "telemetry" | "status") && id == self.id),
        }
    }

    pub fn can_subscribe(&self, filter: &str) -> bool {
        if !valid_filter(filter) {
            return false;
        }
        match self.role {
            Role::Service => true,
            Role::Device => {
                filter.strip_prefix("ack/") == Some(self.id.as_str())
                    || filter.starts_with("models/")
            }
        }
    }
}

/// A syntactically valid filter: `#` only as the whole last level, `+` only
/// as a whole level, no shared-subscription prefix.
fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.starts_with("$share/") || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| {
        (*level == "#" && i == levels.len() - 1) || *level == "+" || !level.contains(['+', '#'])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str) -> Identity {
        Identity {
            id: id.into(),
            role: Role::Device,
        }
    }

    #[test]
    fn a_device_publishes_only_its_own_telemetry_and_status() {
        let d = device("dev-1");
        assert!(d.can_publish("telemetry/dev-1"));
        assert!(d.can_publish("status/dev-1"));
        for refused in [
            "telemetry/dev-2",
            "telemetry/dev-1/x",
            "telemetry/dev-10",
            "ack/dev-1",
            "models/anomaly/int8",
            "status/",
            "dev-1",
        ] {
            assert!(!d.can_publish(refused), "{refused}");
        }
    }

    #[test]
    fn a_device_subscribes_only_to_its_ack_and_models() {
        let d = device("dev-1");
        for allowed in [
            "ack/dev-1",
            "models/#",
            "models/anomaly/int8",
            "models/+/f32",
        ] {
            assert!(d.can_subscribe(allowed), "{allowed}");
        }
        for refused in [
            "ack/dev-2",
            "ack/+",
            "ack/#",
            "#",
            "+/dev-1",
            "telemetry/dev-1",
            "models/#/x",
            "models/a+",
            "$share/g/models/#",
            "modelsx/#",
        ] {
            assert!(!d.can_subscribe(refused), "{refused}");
        }
    }

    #[test]
    fn a_service_may_do_anything_valid() {
        let s = Identity {
            id: "ops".into(),
            role: Role::Service,
        };
        assert!(s.can_publish("models/anomaly/int8"));
        assert!(s.can_subscribe("#"));
        assert!(!s.can_subscribe("a/#/b"));
    }

    #[test]
    fn device_ids_are_single_topic_levels() {
        assert!(valid_device_id("sim-0001"));
        for bad in ["", "a/b", "a+", "#", "a b", &"x".repeat(129)] {
            assert!(!valid_device_id(bad), "{bad}");
        }
    }
}
