//! `[audit]`: checkpoint cadence and group commit.

use serde::Deserialize;

use crate::config::ConfigError;

/// `[audit]` in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Sign a checkpoint once this many events follow the previous one.
    #[serde(default = "default_every_events")]
    pub checkpoint_every_events: u64,
    /// ... or once this many seconds passed and at least one event is new.
    #[serde(default = "default_every_seconds")]
    pub checkpoint_every_seconds: u64,
    /// Most events written in one transaction (group commit); 1 commits
    /// every event on its own.
    #[serde(default = "default_batch")]
    pub group_commit_max_batch: usize,
    /// How long a group waits for the events of requests still in flight
    /// before it commits, in microseconds (0: never waits). A group waits
    /// only while more requests are in flight than it holds events, so a
    /// lone request is never held back.
    #[serde(default = "default_wait")]
    pub group_commit_wait_micros: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            checkpoint_every_events: default_every_events(),
            checkpoint_every_seconds: default_every_seconds(),
            group_commit_max_batch: default_batch(),
            group_commit_wait_micros: default_wait(),
        }
    }
}

fn default_every_events() -> u64 {
    1000
}
fn default_every_seconds() -> u64 {
    60
}
fn default_batch() -> usize {
    256
}
fn default_wait() -> u64 {
    2_000
}

impl AuditConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_string(),
            })
        };
        if self.checkpoint_every_events == 0 {
            return invalid("audit.checkpoint_every_events", "must be at least 1");
        }
        if self.checkpoint_every_seconds == 0 {
            return invalid("audit.checkpoint_every_seconds", "must be at least 1");
        }
        if !(1..=10_000).contains(&self.group_commit_max_batch) {
            return invalid("audit.group_commit_max_batch", "must be 1..=10000");
        }
        if self.group_commit_wait_micros > 100_000 {
            return invalid("audit.group_commit_wait_micros", "must be at most 100000 (0.1 s)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_validates_and_refuses_unknown_keys() {
        let c: AuditConfig = toml::from_str("checkpoint_every_events = 10").expect("parses");
        assert_eq!((c.checkpoint_every_events, c.checkpoint_every_seconds), (10, 60));
        assert!(c.validate().is_ok());
        assert!(toml::from_str::<AuditConfig>("checkpoint_every = 10").is_err());
        for bad in [
            "checkpoint_every_events = 0",
            "checkpoint_every_seconds = 0",
            "group_commit_max_batch = 0",
            "group_commit_max_batch = 10001",
            "group_commit_wait_micros = 100001",
        ] {
            let c: AuditConfig = toml::from_str(bad).expect("parses");
            assert!(
                matches!(c.validate(), Err(ConfigError::Invalid { key, .. }) if bad.starts_with(key.trim_start_matches("audit."))),
                "{bad}"
            );
        }
    }
}
