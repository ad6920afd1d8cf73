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
}
