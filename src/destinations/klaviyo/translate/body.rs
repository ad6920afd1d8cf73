//! Request bodies for Klaviyo, written straight from the typed event into the output buffer.
//!
//! - `POST /api/events`, revision 2023-01-24 (seed 002): flat attributes, the profile as
//!   `$`-keys (`$email`, `$phone_number`, `$id` for the external id, `$first_name`,
//!   `$last_name`, `$organization`, `$title`, `$image`, `$address1`, `$city`, `$region`,
//!   `$zip`, `$country`) with custom properties beside them, `metric: {"name"}`. That
//!   revision has no anonymous id nor `value_currency`: the anonymous id goes in as the
//!   custom property `anonymous_id`, and the currency is still in `properties.currency`.
//!   A custom property whose key equals a key written before it is left out (a trait
//!   literally named `$email` cannot shadow the real one).
//! - `POST /api/events`, current revisions: JSON:API, profile and metric nested as
//!   `{"data":{"type":…,"attributes":…}}` (`target-format.md`, Klaviyo's
//!   `EventCreateQueryV2`).
//! - `POST /api/profile-import` (`ProfileUpsertQuery`): the profile's attributes; that
//!   model has no `anonymous_id`, so it is not written.
//! - `POST /api/profile-bulk-import-jobs` (`ProfileImportJobCreateQuery`): the same profile
//!   resources, between `PROFILE_JOB_HEAD` and `PROFILE_JOB_TAIL`.
//! - `POST /api/event-bulk-create-jobs` (`EventsBulkCreateJob`, current revisions only): one
//!   `event-bulk-create` item per event (its profile and a one-event list), between
//!   `BULK_JOB_HEAD` and `BULK_JOB_TAIL`, comma-separated.
//!
//! `metric.service` is left out: it defaults to `api`, which is what it should be.
//! Times are RFC 3339 with `+00:00`, as in the docs' examples.

use chrono::{DateTime, Utc};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{Map, Value};

use super::{KlaviyoEvent, Location, Profile, ProfileUpsert, Revision};

/// Everything of a bulk job body before its items.
pub const BULK_JOB_HEAD: &str =
    r#"{"data":{"type":"event-bulk-create-job","attributes":{"events-bulk-create":{"data":["#;
/// Everything of a bulk job body after its items.
pub const BULK_JOB_TAIL: &str = "]}}}}";

/// Everything of a profile bulk import job body before its profiles.
pub const PROFILE_JOB_HEAD: &str =
    r#"{"data":{"type":"profile-bulk-import-job","attributes":{"profiles":{"data":["#;
/// Everything of a profile bulk import job body after its profiles.
pub const PROFILE_JOB_TAIL: &str = "]}}}}";

/// Appends one profile of `POST /api/profile-bulk-import-jobs`
/// (`ProfileImportJobCreateQuery`): the same resource `/api/profile-import` takes.
pub fn write_profile_item(out: &mut Vec<u8>, upsert: &ProfileUpsert) {
    write(
        out,
        &Resource {
            kind: "profile",
            attributes: ProfileAttributes::of(&upsert.profile, false),
        },
    );
}

/// Appends the `POST /api/events` body of `event` in `revision`'s shape.
pub fn write_event(out: &mut Vec<u8>, event: &KlaviyoEvent, revision: Revision) {
    match revision {
        Revision::V2023_01_24 => write(out, &data("event", FlatEvent(event))),
        Revision::Current => write(
            out,
            &data(
                "event",
                EventAttributes {
                    properties: &event.properties,
                    metric: metric(event),
                    profile: Some(data("profile", ProfileAttributes::of(&event.profile, true))),
                    time: Time(event.time),
                    value: event.value,
                    value_currency: event.value_currency.as_deref(),
                    unique_id: &event.unique_id,
                },
            ),
        ),
    }
}

/// Appends the `POST /api/profile-import` body of `upsert` (the same in every revision).
pub fn write_profile_import(out: &mut Vec<u8>, upsert: &ProfileUpsert) {
    write(
        out,
        &data("profile", ProfileAttributes::of(&upsert.profile, false)),
    );
}

/// Appends one item of a bulk job's `events-bulk-create.data` (current revisions).
pub fn write_bulk_item(out: &mut Vec<u8>, event: &KlaviyoEvent) {
    let item = Resource {
        kind: "event-bulk-create",
        attributes: BulkItem {
            profile: data("profile", ProfileAttributes::of(&event.profile, true)),
            events: Data {
                data: [Resource {
                    kind: "event",
                    attributes: EventAttributes {
                        properties: &event.properties,
                        metric: metric(event),
                        profile: None,
                        time: Time(event.time),
                        value: event.value,
                        value_currency: event.value_currency.as_deref(),
                        unique_id: &event.unique_id,
                    },
                }],
            },
        },
    };
    write(out, &item);
}

/// Appends a whole bulk job body. Klaviyo fails the whole job when two of its events share
/// (profile, metric, unique_id), and takes at most 1 000 events and 5 MB.
pub fn write_bulk_job<'a>(out: &mut Vec<u8>, events: impl IntoIterator<Item = &'a KlaviyoEvent>) {
    out.extend_from_slice(BULK_JOB_HEAD.as_bytes());
    for (i, event) in events.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_bulk_item(out, event);
    }
    out.extend_from_slice(BULK_JOB_TAIL.as_bytes());
}

fn write<T: Serialize>(out: &mut Vec<u8>, body: &T) {
    serde_json::to_writer(out, body).expect("serializing to a Vec cannot fail");
}

/// `{"data":{"type":kind,"attributes":attributes}}`, JSON:API's resource envelope.
fn data<T>(kind: &'static str, attributes: T) -> Data<Resource<T>> {
    Data {
        data: Resource { kind, attributes },
    }
}

fn metric(event: &KlaviyoEvent) -> Data<Resource<MetricAttributes<'_>>> {
    data(
        "metric",
        MetricAttributes {
            name: &event.metric,
        },
    )
}

#[derive(Serialize)]
struct Data<T> {
    data: T,
}

#[derive(Serialize)]
struct Resource<T> {
    #[serde(rename = "type")]
    kind: &'static str,
    attributes: T,
}

#[derive(Serialize)]
struct MetricAttributes<'a> {
    name: &'a str,
}

/// The current revisions' event attributes, in the order of the docs' example; without
/// `profile` inside a bulk item, where the profile sits beside the events.
#[derive(Serialize)]
struct EventAttributes<'a> {
    properties: &'a Map<String, Value>,
    metric: Data<Resource<MetricAttributes<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    profile: Option<Data<Resource<ProfileAttributes<'a>>>>,
    time: Time,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_currency: Option<&'a str>,
    unique_id: &'a str,
}

#[derive(Serialize)]
struct BulkItem<'a> {
    profile: Data<Resource<ProfileAttributes<'a>>>,
    events: Data<[Resource<EventAttributes<'a>>; 1]>,
}

/// The current revisions' profile attributes (events, bulk items and profile-import).
#[derive(Serialize)]
struct ProfileAttributes<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    phone_number: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    external_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    anonymous_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    organization: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    location: Option<LocationAttributes<'a>>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    properties: &'a Map<String, Value>,
}

impl<'a> ProfileAttributes<'a> {
    fn of(p: &'a Profile, with_anonymous_id: bool) -> ProfileAttributes<'a> {
        ProfileAttributes {
            email: p.email.as_deref(),
            phone_number: p.phone_number.as_deref(),
            external_id: p.external_id.as_deref(),
            anonymous_id: p.anonymous_id.as_deref().filter(|_| with_anonymous_id),
            first_name: p.first_name.as_deref(),
            last_name: p.last_name.as_deref(),
            organization: p.organization.as_deref(),
            title: p.title.as_deref(),
            image: p.image.as_deref(),
            location: p.location.as_ref().map(LocationAttributes),
            properties: &p.properties,
        }
    }
}

struct LocationAttributes<'a>(&'a Location);

impl Serialize for LocationAttributes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let l = self.0;
        let mut map = serializer.serialize_map(None)?;
        for (key, value) in [
            ("address1", &l.address1),
            ("city", &l.city),
            ("region", &l.region),
            ("zip", &l.zip),
            ("country", &l.country),
        ] {
            if let Some(value) = value {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

/// The 2023-01-24 event attributes, in seed 002's order.
struct FlatEvent<'a>(&'a KlaviyoEvent);

impl Serialize for FlatEvent<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let e = self.0;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("profile", &FlatProfile(&e.profile))?;
        map.serialize_entry("metric", &MetricAttributes { name: &e.metric })?;
        map.serialize_entry("properties", &e.properties)?;
        map.serialize_entry("time", &Time(e.time))?;
        if let Some(value) = e.value {
            map.serialize_entry("value", &value)?;
        }
        map.serialize_entry("unique_id", &e.unique_id)?;
        map.end()
    }
}

/// The 2023-01-24 profile: special `$`-keys, then the custom properties beside them.
struct FlatProfile<'a>(&'a Profile);

impl Serialize for FlatProfile<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let p = self.0;
        let location = p.location.as_ref();
        let fields = [
            ("$email", p.email.as_ref()),
            ("$phone_number", p.phone_number.as_ref()),
            ("$id", p.external_id.as_ref()),
            ("$first_name", p.first_name.as_ref()),
            ("$last_name", p.last_name.as_ref()),
            ("$organization", p.organization.as_ref()),
            ("$title", p.title.as_ref()),
            ("$image", p.image.as_ref()),
            ("$address1", location.and_then(|l| l.address1.as_ref())),
            ("$city", location.and_then(|l| l.city.as_ref())),
            ("$region", location.and_then(|l| l.region.as_ref())),
            ("$zip", location.and_then(|l| l.zip.as_ref())),
            ("$country", location.and_then(|l| l.country.as_ref())),
            ("anonymous_id", p.anonymous_id.as_ref()),
        ];
        let mut map = serializer.serialize_map(None)?;
        for (key, value) in &fields {
            if let Some(value) = value {
                map.serialize_entry(key, value)?;
            }
        }
        let written = |key: &str| fields.iter().any(|(k, v)| v.is_some() && *k == key);
        for (key, value) in &p.properties {
            if !written(key) {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

/// An event time as Klaviyo's examples write it: whole seconds, `+00:00`.
struct Time(DateTime<Utc>);

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0.format("%Y-%m-%dT%H:%M:%S+00:00"))
    }
}
