//! Device ids appear in MQTT topics, Kafka keys and Parquet rows, so they are
//! restricted to characters that are safe in all three.

/// Longest device id accepted.
pub const MAX_LEN: usize = 128;

/// Checks a device id: 1 to 128 characters of `A-Z a-z 0-9 - _ .`.
/// The error is a sentence naming what is wrong.
pub fn validate(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("device id is empty".into());
    }
    if id.len() > MAX_LEN {
        return Err(format!(
            "device id is {} bytes long; at most {MAX_LEN} are allowed",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "device id {id:?} contains {c:?}; only letters, digits, '-', '_' and '.' are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn device_ids_with_topic_wildcards_are_refused() {
        assert!(super::validate("sensor-01.a_b").is_ok());
        assert!(super::validate("").is_err());
        assert!(super::validate("a/b").is_err());
        assert!(super::validate("a+").is_err());
        assert!(super::validate("#").is_err());
        assert!(super::validate(&"x".repeat(129)).is_err());
    }
}
