//! Segment ids and traits → a Klaviyo profile.
//!
//! `userId` → `external_id`, `anonymousId` → `anonymous_id`; from the traits: `email`,
//! `phone` → `phone_number`, `firstName`/`first_name`, `lastName`/`last_name`, `title`,
//! `avatar` → `image`, `company.name` or `company` (a string) → `organization`,
//! `address.{street, city, state, postal_code/postalCode, country}` →
//! `location.{address1, city, region, zip, country}`; every other trait → custom properties.
//!
//! Rules beyond the table, each so that Klaviyo is never sent what it refuses and nothing
//! the client sent disappears:
//! - A field is taken only from a string. A trait of another type (a number `email`) stays
//!   a custom property; `null` and `""` set nothing (they are not cleared in Klaviyo).
//! - When both spellings are sent, Segment's camelCase one wins; both are consumed.
//! - `email` must look like an address (`local@domain.tld`, no spaces) and `phone` must be
//!   E.164 once spaces, `-`, `.`, `(`, `)` are removed; otherwise Klaviyo would refuse the
//!   whole request, so the value stays a custom property (`email` / `phone`) instead.
//! - What is left of `company` and `address` objects after the mapped keys stays as the
//!   custom property `company` / `address` (dropped when empty).

use serde_json::{Map, Value};

use super::{Location, Profile, Revision};

/// Builds the profile of a message from its ids and the traits that describe the user.
pub(in crate::destinations::klaviyo) fn build(
    user_id: Option<String>,
    anonymous_id: Option<String>,
    traits: Option<Map<String, Value>>,
) -> Profile {
    let mut traits = traits.unwrap_or_default();
    let mut profile = Profile {
        external_id: user_id,
        anonymous_id,
        ..Profile::default()
    };

    if let Some(email) = take_string(&mut traits, &["email"]) {
        let trimmed = email.trim();
        if is_plausible_email(trimmed) {
            profile.email = Some(trimmed.to_string());
        } else {
            traits.insert("email".to_string(), Value::String(email));
        }
    }
    if let Some(phone) = take_string(&mut traits, &["phone"]) {
        match e164(&phone) {
            Some(number) => profile.phone_number = Some(number),
            None => {
                traits.insert("phone".to_string(), Value::String(phone));
            }
        }
    }
    profile.first_name = take_string(&mut traits, &["firstName", "first_name"]);
    profile.last_name = take_string(&mut traits, &["lastName", "last_name"]);
    profile.title = take_string(&mut traits, &["title"]);
    profile.image = take_string(&mut traits, &["avatar"]);
    profile.organization = match traits.get_mut("company") {
        Some(Value::Object(company)) => {
            let name = take_string(company, &["name"]);
            if company.is_empty() {
                traits.remove("company");
            }
            name
        }
        _ => take_string(&mut traits, &["company"]),
    };
    if let Some(Value::Object(address)) = traits.get_mut("address") {
        let location = Location {
            address1: take_string(address, &["street"]),
            city: take_string(address, &["city"]),
            region: take_string(address, &["state"]),
            zip: take_string(address, &["postalCode", "postal_code"]),
            country: take_string(address, &["country"]),
        };
        if address.is_empty() {
            traits.remove("address");
        }
        if location != Location::default() {
            profile.location = Some(location);
        }
    }
    profile.properties = traits;
    profile
}

impl Profile {
    /// The event endpoint needs one of its identifiers. The 2023-01-24 flat profile has
    /// `$email`, `$phone_number` and `$id` (external id), but no anonymous id.
    pub fn identifies_event(&self, revision: Revision) -> bool {
        self.email.is_some()
            || self.phone_number.is_some()
            || self.external_id.is_some()
            || (revision == Revision::Current && self.anonymous_id.is_some())
    }

    /// `/api/profile-import` has no `anonymous_id` field: an anonymous id alone cannot
    /// create or find a profile there.
    pub fn identifies_upsert(&self) -> bool {
        self.email.is_some() || self.phone_number.is_some() || self.external_id.is_some()
    }
}

/// Removes the spellings in `keys` that hold a string or null and returns the first
/// non-empty string among them, in the order of `keys`. Other types are left in place.
fn take_string(traits: &mut Map<String, Value>, keys: &[&str]) -> Option<String> {
    let mut found = None;
    for key in keys {
        if !matches!(traits.get(*key), Some(Value::String(_) | Value::Null)) {
            continue;
        }
        if let Some(Value::String(s)) = traits.remove(*key) {
            if found.is_none() && !s.is_empty() {
                found = Some(s);
            }
        }
    }
    found
}

/// `local@domain.tld`, no whitespace: enough to keep obvious junk ("n/a", "test") from
/// failing a whole request. Klaviyo's own check is stricter.
fn is_plausible_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && !s.chars().any(char::is_whitespace)
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
}

/// `+` and 7 to 15 digits, the first not 0, after dropping the usual punctuation.
fn e164(phone: &str) -> Option<String> {
    let number: String = phone
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect();
    let digits = number.strip_prefix('+')?;
    let valid = (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0');
    valid.then_some(number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_phone_numbers() {
        assert_eq!(e164("+1 (555) 555-0100").as_deref(), Some("+15555550100"));
        assert_eq!(e164("+44.20.7946.0958").as_deref(), Some("+442079460958"));
        assert_eq!(e164("555-0100"), None);
        assert_eq!(e164("+0123456789"), None);
        assert_eq!(e164("+1234"), None);
        assert_eq!(e164("+1234567890123456"), None);
        assert_eq!(e164("+1555555010x"), None);
    }

    #[test]
    fn screens_emails() {
        assert!(is_plausible_email("a@b.co"));
        assert!(is_plausible_email("first.last+tag@mail.example.com"));
        for junk in [
            "", "n/a", "a@b", "@b.co", "a@@b.co", "a b@c.co", "a@.co", "a@b.", "a@b..co",
        ] {
            assert!(!is_plausible_email(junk), "{junk}");
        }
    }

    #[test]
    fn takes_strings_and_leaves_other_types() {
        let mut traits = serde_json::from_str::<Map<String, Value>>(
            r#"{"firstName":7,"first_name":"Ann","lastName":null,"last_name":"","title":""}"#,
        )
        .unwrap();
        assert_eq!(
            take_string(&mut traits, &["firstName", "first_name"]).as_deref(),
            Some("Ann")
        );
        assert_eq!(take_string(&mut traits, &["lastName", "last_name"]), None);
        assert_eq!(take_string(&mut traits, &["title"]), None);
        assert_eq!(Value::Object(traits), serde_json::json!({"firstName": 7}));
    }
}
