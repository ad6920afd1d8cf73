//! What routing reads of a message (`View`) and why it passes one over (`Skip`): apart
//! from `Route`, so that a compiled `filter` depends on nothing above it.

use serde_json::value::RawValue;

use crate::json::{scalar, Scalar};

/// Why a message was not for a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// From a source not in the destination's `sources`.
    Source,
    /// `filter.types`.
    Type,
    /// `filter.events`.
    Event,
    /// `filter.properties`.
    Property,
    /// The message's `integrations` turned this destination off.
    Integrations,
    /// The message's consent preferences deny one of `consent_categories`.
    Consent,
    /// Its user is not in the destination's `sample`.
    Sampled,
}

impl Skip {
    /// For logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Source => "source",
            Skip::Type => "type",
            Skip::Event => "event",
            Skip::Property => "property",
            Skip::Integrations => "integrations",
            Skip::Consent => "consent",
            Skip::Sampled => "sampled",
        }
    }
}

/// The top-level fields routing reads, unparsed.
pub(super) struct View<'a> {
    pub(super) kind: Option<&'a RawValue>,
    pub(super) event: Option<&'a RawValue>,
    pub(super) integrations: Option<&'a RawValue>,
    pub(super) properties: Option<&'a RawValue>,
    pub(super) traits: Option<&'a RawValue>,
    pub(super) context: Option<&'a RawValue>,
    pub(super) anonymous_id: Option<&'a RawValue>,
    pub(super) user_id: Option<&'a RawValue>,
}

impl<'a> View<'a> {
    pub(super) fn new(get: impl Fn(&str) -> Option<&'a RawValue>) -> View<'a> {
        View {
            kind: get("type"),
            event: get("event"),
            integrations: get("integrations"),
            properties: get("properties"),
            traits: get("traits"),
            context: get("context"),
            anonymous_id: get("anonymousId"),
            user_id: get("userId"),
        }
    }

    pub(super) fn user_key(&self) -> u64 {
        fn text(raw: Option<&RawValue>) -> Option<std::borrow::Cow<'_, str>> {
            match raw.map(scalar) {
                Some(Scalar::Str(id)) => Some(id),
                _ => None,
            }
        }
        crate::message::user_key(
            text(self.anonymous_id).as_deref(),
            text(self.user_id).as_deref(),
        )
    }

    /// Whether the message's user is in a sample kept below `below` (`sample_threshold`):
    /// by userId first, so a known user is whole across devices and server-side calls.
    /// A message with neither id is kept: there is no user to split.
    pub(super) fn sampled_in(&self, below: u64) -> bool {
        let id = [self.user_id, self.anonymous_id]
            .into_iter()
            .find_map(|raw| match raw.map(scalar) {
                Some(Scalar::Str(id)) if !id.is_empty() => Some(id),
                _ => None,
            });
        match id {
            // A fixed seed, not the partition hash's, so the sample cuts across partitions.
            Some(id) => xxhash_rust::xxh3::xxh3_64_with_seed(id.as_bytes(), SAMPLE_SEED) < below,
            None => true,
        }
    }
}

/// Seed of the sampling hash: fixed, so every instance and release keeps the same users.
const SAMPLE_SEED: u64 = 0x5a4d_504c_4530_0001;

/// The hash below which a user is in a sample of `share` (0 < share < 1): 2^64 × share.
pub(super) fn sample_threshold(share: f64) -> u64 {
    (share * 18_446_744_073_709_551_616.0) as u64
}
