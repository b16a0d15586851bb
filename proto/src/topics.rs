//! Every topic name of the system, MQTT and Kafka, in one place.
//!
//! | MQTT topic | direction | QoS / retain | payload |
//! |---|---|---|---|
//! | `telemetry/{device}` | device → cloud | 1 | `ReadingBatch` |
//! | `status/{device}` | device → cloud | 1, retained, last will | `DeviceStatus` |
//! | `ack/{device}` | cloud → device | 1, retained | `Ack` |
//! | `models/{task}/{profile}` | cloud → device | 1, retained | `ModelUpdate` |
//!
//! | Kafka topic | written by | key | value | cleanup |
//! |---|---|---|---|---|
//! | `edgeloop.readings` | bridge | device id | `ReadingBatch` (headers `device_id`, `profile`, `schema`, `content-type`) | delete |
//! | `edgeloop.status` | bridge | device id | `DeviceStatus` | compact |
//! | `edgeloop.models` | model publisher | `task/profile` | `ModelUpdate` | compact |
//! | `edgeloop.pins` | control API (`edgeloop ctl models pin`) | `task/profile` | JSON `{"task","profile","version","pinned_at_micros"}`; no value: unpinned | compact |
//! | `edgeloop.acks` | bridge | device id | `Ack` (the watermark published on `ack/{device}`) | compact |
//! | `edgeloop.sessions` | broker (every replica, at each device CONNECT) | client id (the device id) | JSON `{"replica","session","connected_at_micros"}`: the newest session wins across replicas | compact |
//! | `edgeloop.deadletter` | processor (refused readings), bridge (refused statuses) | as received (the sending device) | original bytes, `reason` header | delete |

/// Kafka topic of reading batches, key = device id.
pub const KAFKA_READINGS: &str = "edgeloop.readings";
/// Kafka topic of device status (compacted).
pub const KAFKA_STATUS: &str = "edgeloop.status";
/// Kafka topic of published models (compacted by `task/profile`).
pub const KAFKA_MODELS: &str = "edgeloop.models";
/// Kafka topic of model pins (compacted by `task/profile`): while a
/// (task, profile) has a pin, the model publisher must not publish a new
/// version of it; a tombstone removes the pin.
pub const KAFKA_PINS: &str = "edgeloop.pins";
/// Kafka topic of the ack watermarks the bridge published (compacted by
/// device id): the bridge restores `ack/{device}` and its watermarks from it
/// after a restart.
pub const KAFKA_ACKS: &str = "edgeloop.acks";
/// Kafka topic of device sessions (compacted by client id): each broker
/// replica writes one record per device CONNECT, and every replica follows
/// the topic and closes its own connection of a client whose newer session
/// another replica wrote.
pub const KAFKA_SESSIONS: &str = "edgeloop.sessions";
/// Kafka topic of refused payloads (readings that do not decode or are not
/// valid, statuses naming another device…), with the reason in a header.
pub const KAFKA_DEADLETTER: &str = "edgeloop.deadletter";

/// Filter that matches every device's telemetry topic.
pub const TELEMETRY_FILTER: &str = "telemetry/+";
/// Filter that matches every device's status topic.
pub const STATUS_FILTER: &str = "status/+";
/// Filter that matches every device's ack topic.
pub const ACK_FILTER: &str = "ack/+";
/// Filter that matches every model topic.
pub const MODELS_FILTER: &str = "models/#";

pub fn telemetry(device_id: &str) -> String {
    format!("telemetry/{device_id}")
}

pub fn status(device_id: &str) -> String {
    format!("status/{device_id}")
}

pub fn ack(device_id: &str) -> String {
    format!("ack/{device_id}")
}

pub fn models(task: &str, profile: &str) -> String {
    format!("models/{task}/{profile}")
}

/// The Kafka key of a model in `edgeloop.models`: `task/profile`.
pub fn model_key(task: &str, profile: &str) -> String {
    format!("{task}/{profile}")
}

/// Whether `level` can be one level of a topic name: not empty, no `/`, and
/// no MQTT wildcard (`+`, `#`). Task and profile names of models must be.
pub fn is_topic_level(level: &str) -> bool {
    !level.is_empty() && !level.contains(['/', '+', '#', '\0'])
}

/// The device id of a `telemetry/{device}` topic, or `None` for any other topic.
pub fn device_of_telemetry(topic: &str) -> Option<&str> {
    topic
        .strip_prefix("telemetry/")
        .filter(|d| !d.is_empty() && !d.contains('/'))
}

/// The device id of a `status/{device}` topic, or `None` for any other topic.
pub fn device_of_status(topic: &str) -> Option<&str> {
    topic
        .strip_prefix("status/")
        .filter(|d| !d.is_empty() && !d.contains('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_topic_round_trips_to_its_device() {
        assert_eq!(device_of_telemetry(&telemetry("dev-7")), Some("dev-7"));
        assert_eq!(device_of_telemetry("telemetry/"), None);
        assert_eq!(device_of_telemetry("telemetry/a/b"), None);
        assert_eq!(device_of_telemetry("status/dev-7"), None);
        assert_eq!(device_of_status(&status("dev-7")), Some("dev-7"));
        assert_eq!(device_of_status("telemetry/dev-7"), None);
        assert_eq!(models("anomaly", "int8"), "models/anomaly/int8");
        assert_eq!(ack("d"), "ack/d");
        assert_eq!(status("d"), "status/d");
        assert_eq!(model_key("anomaly", "int8"), "anomaly/int8");
        assert!(is_topic_level("anomaly"));
        assert!(!is_topic_level(""));
        assert!(!is_topic_level("a/b"));
        assert!(!is_topic_level("a+"));
        assert!(!is_topic_level("#"));
    }
}
