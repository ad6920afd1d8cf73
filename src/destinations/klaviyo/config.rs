//! `kind = "klaviyo"`: its own config keys and what the engine needs to know of it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::actions::{validate_actions, KlaviyoActionConfig};
use super::requests::KlaviyoBodies;
use super::translate::{Mapping, MetricName, Revision};
use super::{KlaviyoDestination, KLAVIYO_CONCURRENCY};
use crate::clock::Clock;
use crate::destinations::{
    check_url, AnyDestination, BatchShape, DestinationConfig, KeyError, Kind, Preview,
};
use crate::queue::Checkpoint;

/// `kind = "klaviyo"`'s own keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KlaviyoConfig {
    /// Environment variable with the private API key.
    pub api_key_env: String,
    /// API base URL (default `https://a.klaviyo.com`).
    pub base_url: Option<String>,
    /// The `revision` header; `2023-01-24` sends seed 002's flat bodies.
    pub revision: Option<String>,
    /// Events through bulk jobs (up to 1 000 per request); default true.
    pub bulk: Option<bool>,
    /// How Segment messages become events and profiles (`translate::Mapping`).
    pub mapping: Option<Mapping>,
    /// Segment ecommerce events under Klaviyo's standard metric names (`Order Completed`
    /// → `Placed Order`, …, `translate::names`); default true, false keeps names as sent.
    #[serde(default = "default_ecommerce_names")]
    pub ecommerce_names: bool,
    /// Segment event name → metric name, over the standard names (`{ "Old" = "New" }`);
    /// default empty.
    #[serde(default)]
    pub metric_names: BTreeMap<String, MetricName>,
    /// What was last sent for each profile, to skip identifies that change nothing.
    pub profile_cache: Option<ProfileCacheConfig>,
    /// `[[destinations.actions]]`: consent and list changes by rule (`actions`); none by
    /// default.
    #[serde(default)]
    pub actions: Vec<KlaviyoActionConfig>,
}

/// `profile_cache = { ttl = "1h", max_entries = 1000000 }`; `ttl = "0s"` turns it off.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileCacheConfig {
    #[serde(default = "default_profile_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    #[serde(default = "default_profile_entries")]
    pub max_entries: u64,
}

impl Default for ProfileCacheConfig {
    fn default() -> Self {
        ProfileCacheConfig {
            ttl: default_profile_ttl(),
            max_entries: default_profile_entries(),
        }
    }
}

fn default_ecommerce_names() -> bool {
    true
}

fn default_profile_ttl() -> Duration {
    Duration::from_secs(3600)
}

fn default_profile_entries() -> u64 {
    1_000_000
}

impl Kind for KlaviyoConfig {
    const NAME: &'static str = "klaviyo";
    const HTTP: bool = true;
    /// Klaviyo cannot merge an anonymous profile into a known one by itself.
    const ENRICH_IDENTITY: bool = true;

    fn validate(&self) -> Result<(), KeyError> {
        if let Some(url) = &self.base_url {
            check_url("base_url", url)?;
        }
        if let Some(revision) = &self.revision {
            let parsed = Revision::from_header(revision)
                .map_err(|e| KeyError::new("revision", e.to_string()))?;
            if parsed == Revision::V2023_01_24 && !self.actions.is_empty() {
                return Err(KeyError::new(
                    "actions",
                    "subscription, suppression and list calls need a current revision",
                ));
            }
        }
        // One rule per event: with two, which one wins would be a guess.
        let events = self.mapping.as_ref().map(|m| &m.events);
        if let Some(event) = self
            .metric_names
            .keys()
            .find(|event| events.is_some_and(|e| e.contains_key(*event)))
        {
            return Err(KeyError::new(
                format!("metric_names.{event:?}"),
                "also in mapping.events: give one rule for it, in one of the two",
            ));
        }
        validate_actions(&self.actions)
    }

    fn batch_shape(&self) -> BatchShape {
        // A bulk job takes up to 1 000 events and 5 MB. Four batches at once: while one
        // waits for its profile job to finish, other users' messages keep going.
        let shape = if self.bulk != Some(false) {
            BatchShape::new(1000, 4 * 1024 * 1024, 1000)
        } else {
            BatchShape::new(100, 4 * 1024 * 1024, 200)
        };
        shape.with_concurrency(KLAVIYO_CONCURRENCY)
    }

    fn build(
        &self,
        config: &DestinationConfig,
        _: Option<Checkpoint>,
        clock: Clock,
    ) -> anyhow::Result<AnyDestination> {
        Ok(Box::new(KlaviyoDestination::new(config, self, clock)?))
    }

    /// The requests it would send, from the real translation.
    fn preview(&self, message: &[u8], clock: Clock) -> anyhow::Result<Preview> {
        KlaviyoBodies::new(self)?.preview(message, clock.now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keys_read_with_their_defaults_and_a_rule_given_twice_is_refused() {
        let config: KlaviyoConfig = toml::from_str(r#"api_key_env = "K""#).unwrap();
        assert!(config.ecommerce_names);
        assert!(config.metric_names.is_empty());
        let config: KlaviyoConfig = toml::from_str(
            r#"
            api_key_env = "K"
            ecommerce_names = false
            metric_names = { "Signed Up" = "Registered" }
            "#,
        )
        .unwrap();
        assert!(!config.ecommerce_names);
        assert_eq!(config.metric_names["Signed Up"].as_str(), "Registered");
        assert!(config.validate().is_ok());
        assert!(
            toml::from_str::<KlaviyoConfig>(
                r#"api_key_env = "K"
                metric_names = { "Signed Up" = "" }"#
            )
            .is_err(),
            "an empty metric name"
        );

        let config: KlaviyoConfig = toml::from_str(
            r#"
            api_key_env = "K"
            metric_names = { "Signed Up" = "Registered" }
            mapping = { events = { "Signed Up" = false } }
            "#,
        )
        .unwrap();
        let error = config.validate().unwrap_err();
        assert_eq!(error.key, r#"metric_names."Signed Up""#);
        assert!(error.message.contains("mapping.events"), "{error}");
    }
}
