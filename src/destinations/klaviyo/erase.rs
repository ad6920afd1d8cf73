//! Privacy deletions in Klaviyo (`Destination::erase`): one
//! `POST /api/data-privacy-deletion-jobs` per profile to delete, by exactly one identifier,
//! as Klaviyo requires: the email if fanout knows it, else the phone number, else the id
//! of each profile whose `external_id` is the userId (`GET /api/profiles` with a filter:
//! Klaviyo deletes by email, phone number or profile id, never by external_id). Each
//! endpoint is paced by its own bucket at Klaviyo's documented limits.

use serde_json::{json, Value};

use super::KlaviyoDestination;
use crate::destinations::{EraseError, Erasure, Subject};
use crate::pace::RateLimiter;

const DELETION_JOBS: &str = "/api/data-privacy-deletion-jobs";
const PROFILES: &str = "/api/profiles";

/// The buckets of the two endpoints a deletion uses, at Klaviyo's documented limits:
/// deletion jobs 3/s burst, 60/min steady; profile reads 75/s, 750/min.
pub(super) struct EraseLimits {
    deletion_jobs: RateLimiter,
    profile_reads: RateLimiter,
}

impl EraseLimits {
    /// The limits of the Klaviyo account `account` (shared by the cluster's instances).
    pub(super) fn new(account: &str) -> EraseLimits {
        EraseLimits {
            // 60 a minute is one a second.
            deletion_jobs: RateLimiter::named(&format!("{account}.deletion_jobs"), 1.0, 3),
            profile_reads: RateLimiter::named(
                &format!("{account}.profile_reads"),
                750.0 / 60.0,
                75,
            ),
        }
    }
}

/// The one identifier a deletion job names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum DeleteBy {
    Email(String),
    Phone(String),
    /// Klaviyo's own profile id, found by the userId.
    ProfileId(String),
}

/// What the deletion can go by without asking Klaviyo: the email, else the phone number.
pub(super) fn known_identifier(subject: &Subject) -> Option<DeleteBy> {
    fn given(v: &Option<String>) -> Option<&str> {
        v.as_deref().map(str::trim).filter(|v| !v.is_empty())
    }
    given(&subject.email)
        .map(|e| DeleteBy::Email(e.to_string()))
        .or_else(|| given(&subject.phone).map(|p| DeleteBy::Phone(p.to_string())))
}

/// The body of `POST /api/data-privacy-deletion-jobs` (SDK model
/// `DataPrivacyCreateDeletionJobQuery`).
pub(super) fn deletion_body(by: &DeleteBy) -> Vec<u8> {
    let profile = match by {
        DeleteBy::Email(email) => json!({"type": "profile", "attributes": {"email": email}}),
        DeleteBy::Phone(phone) => {
            json!({"type": "profile", "attributes": {"phone_number": phone}})
        }
        DeleteBy::ProfileId(id) => json!({"type": "profile", "id": id, "attributes": {}}),
    };
    json!({"data": {
        "type": "data-privacy-deletion-job",
        "attributes": {"profile": {"data": profile}},
    }})
    .to_string()
    .into_bytes()
}

/// `GET /api/profiles/?filter=equals(external_id,"<userId>")`, asking only for the
/// external_id (the ids come with every profile). A `"` or `\` in the userId is escaped
/// with `\`, as in Klaviyo's filter strings.
pub(super) fn profiles_by_external_id(user_id: &str) -> String {
    let quoted = user_id.replace('\\', "\\\\").replace('"', "\\\"");
    let filter = format!("equals(external_id,\"{quoted}\")");
    let encoded: String = url::form_urlencoded::byte_serialize(filter.as_bytes()).collect();
    format!("{PROFILES}/?filter={encoded}&fields%5Bprofile%5D=external_id")
}

/// The profile ids of a page of `GET /api/profiles`, and the next page's URL.
fn profile_ids(page: &str) -> (Vec<String>, Option<String>) {
    let page: Value = serde_json::from_str(page).unwrap_or_default();
    let ids = page["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_str().map(str::to_string))
        .collect();
    (ids, page["links"]["next"].as_str().map(str::to_string))
}

impl KlaviyoDestination {
    pub(super) async fn erase_subject(&self, subject: &Subject) -> Result<Erasure, EraseError> {
        let by = match (known_identifier(subject), &subject.user_id) {
            (Some(by), _) => vec![by],
            (None, Some(user_id)) => {
                let ids = self.profiles_of(user_id).await?;
                if ids.is_empty() {
                    return Ok(Erasure::Done {
                        detail: "no profile in Klaviyo".into(),
                    });
                }
                ids.into_iter().map(DeleteBy::ProfileId).collect()
            }
            (None, None) => {
                return Err(EraseError::failed(
                    "Klaviyo finds a profile to delete by email, phone number or userId \
                     (external_id); this subject has only an anonymousId",
                ))
            }
        };
        for one in &by {
            self.post(
                DELETION_JOBS,
                deletion_body(one),
                &self.erase_limits.deletion_jobs,
            )
            .await
            .map_err(|e| EraseError::from_send("Klaviyo", e))?;
        }
        let detail = match by.as_slice() {
            [DeleteBy::Email(_)] => "deletion job accepted, by email".to_string(),
            [DeleteBy::Phone(_)] => "deletion job accepted, by phone number".to_string(),
            ids => {
                let ids: Vec<&str> = ids
                    .iter()
                    .filter_map(|by| match by {
                        DeleteBy::ProfileId(id) => Some(id.as_str()),
                        _ => None,
                    })
                    .collect();
                format!(
                    "deletion job accepted for profile {} (found by external_id)",
                    ids.join(", ")
                )
            }
        };
        Ok(Erasure::Done { detail })
    }

    /// The ids of the profiles whose external_id is `user_id`, every page of them.
    async fn profiles_of(&self, user_id: &str) -> Result<Vec<String>, EraseError> {
        let mut ids = Vec::new();
        let mut next = Some(profiles_by_external_id(user_id));
        while let Some(page) = next.take() {
            let answer = self
                .get(&page, &self.erase_limits.profile_reads)
                .await
                .map_err(|e| EraseError::from_send("Klaviyo", e))?;
            let (more, after) = profile_ids(&answer.body);
            ids.extend(more);
            next = after;
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(user: Option<&str>, email: Option<&str>, phone: Option<&str>) -> Subject {
        Subject {
            user_id: user.map(str::to_string),
            anonymous_id: None,
            email: email.map(str::to_string),
            phone: phone.map(str::to_string),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deletions_and_profile_reads_are_paced_at_klaviyos_limits() {
        use std::time::Duration;
        let limits = EraseLimits::new("k.test");
        let start = tokio::time::Instant::now();
        for _ in 0..3 {
            limits.deletion_jobs.acquire(1).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "a burst of 3 goes at once");
        // Then 60 a minute: 60 more take a minute (virtual time).
        for _ in 0..60 {
            limits.deletion_jobs.acquire(1).await;
        }
        assert!(
            start.elapsed() >= Duration::from_secs(59),
            "{:?}",
            start.elapsed()
        );
        let start = tokio::time::Instant::now();
        for _ in 0..75 {
            limits.profile_reads.acquire(1).await;
        }
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "a burst of 75 goes at once"
        );
        // Then 750 a minute: 125 more take 10 s.
        for _ in 0..125 {
            limits.profile_reads.acquire(1).await;
        }
        assert!(
            start.elapsed() >= Duration::from_millis(9900),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn email_goes_first_then_phone_else_a_lookup() {
        let all = subject(Some("u1"), Some("a@example.com"), Some("+15555550100"));
        assert_eq!(
            known_identifier(&all),
            Some(DeleteBy::Email("a@example.com".into()))
        );
        let phone = subject(Some("u1"), Some(" "), Some("+15555550100"));
        assert_eq!(
            known_identifier(&phone),
            Some(DeleteBy::Phone("+15555550100".into()))
        );
        assert_eq!(known_identifier(&subject(Some("u1"), None, None)), None);
    }

    #[test]
    fn a_deletion_names_exactly_one_identifier() {
        let body = |by| serde_json::from_slice::<Value>(&deletion_body(&by)).unwrap();
        assert_eq!(
            body(DeleteBy::Email("a@example.com".into())),
            json!({"data": {"type": "data-privacy-deletion-job", "attributes": {"profile":
                {"data": {"type": "profile", "attributes": {"email": "a@example.com"}}}}}})
        );
        assert_eq!(
            body(DeleteBy::Phone("+15555550100".into()))["data"]["attributes"]["profile"]["data"],
            json!({"type": "profile", "attributes": {"phone_number": "+15555550100"}})
        );
        assert_eq!(
            body(DeleteBy::ProfileId("01HX".into()))["data"]["attributes"]["profile"]["data"],
            json!({"type": "profile", "id": "01HX", "attributes": {}})
        );
    }

    #[test]
    fn the_lookup_filters_on_the_external_id_quoted_and_encoded() {
        assert_eq!(
            profiles_by_external_id("user-1"),
            "/api/profiles/?filter=equals%28external_id%2C%22user-1%22%29\
             &fields%5Bprofile%5D=external_id"
        );
        let odd = profiles_by_external_id("a\"b&c");
        let query = odd.split_once('?').unwrap().1;
        let filter: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        assert_eq!(
            filter[0],
            ("filter".into(), r#"equals(external_id,"a\"b&c")"#.into())
        );
    }

    #[test]
    fn profile_pages_give_ids_and_the_next_page() {
        let page = r#"{"data":[{"type":"profile","id":"01A","attributes":{"external_id":"u"}},
            {"type":"profile","id":"01B","attributes":{}}],
            "links":{"self":"x","next":"https://a.klaviyo.com/api/profiles/?page%5Bcursor%5D=c"}}"#;
        let (ids, next) = profile_ids(page);
        assert_eq!(ids, ["01A", "01B"]);
        assert!(next.unwrap().contains("cursor"));
        assert_eq!(
            profile_ids(r#"{"data":[],"links":{"next":null}}"#),
            (vec![], None)
        );
    }
}
