//! Profiles within a batch: upserts of one profile merged (later traits winning), and
//! the cache of what was last sent per profile, so an identify that changes nothing
//! makes no request.

use std::collections::HashMap;

use super::translate::body::write_profile_import;
use super::translate::{Profile, ProfileUpsert};
use super::{KlaviyoDestination, ProfileCacheConfig};

/// One profile as the batch sends it: the upserts of the messages in `messages` merged,
/// later traits winning, and each message's own (identity, body) hashes for the cache.
pub(super) struct Merged {
    pub(super) upsert: ProfileUpsert,
    pub(super) messages: Vec<usize>,
    pub(super) hashes: Vec<(u64, u64)>,
}

/// Which profile an upsert is for: its identifiers.
fn identity(profile: &Profile) -> u64 {
    let mut key = Vec::new();
    for id in [
        &profile.external_id,
        &profile.email,
        &profile.phone_number,
        &profile.anonymous_id,
    ] {
        key.extend_from_slice(id.as_deref().unwrap_or_default().as_bytes());
        key.push(0);
    }
    xxhash_rust::xxh3::xxh3_64(&key)
}

/// (identity, body) hashes of an upsert, for the unchanged-profile cache.
pub(super) fn profile_hashes(upsert: &ProfileUpsert) -> (u64, u64) {
    let mut body = Vec::new();
    write_profile_import(&mut body, upsert);
    (identity(&upsert.profile), xxhash_rust::xxh3::xxh3_64(&body))
}

/// Merges the batch's upserts per profile (same identifiers), in order, later values
/// winning field by field; custom properties are merged key by key.
pub(super) fn merge_profiles(profiles: &[(usize, &ProfileUpsert)]) -> Vec<Merged> {
    let mut merged: Vec<Merged> = Vec::new();
    let mut by_identity: HashMap<u64, usize> = HashMap::new();
    for &(message, upsert) in profiles {
        let hashes = profile_hashes(upsert);
        match by_identity.get(&hashes.0) {
            Some(&at) => {
                let into = &mut merged[at];
                merge_profile(&mut into.upsert.profile, &upsert.profile);
                into.messages.push(message);
                into.hashes.push(hashes);
            }
            None => {
                by_identity.insert(hashes.0, merged.len());
                merged.push(Merged {
                    upsert: upsert.clone(),
                    messages: vec![message],
                    hashes: vec![hashes],
                });
            }
        }
    }
    merged
}

fn merge_profile(into: &mut Profile, later: &Profile) {
    let take = |into: &mut Option<String>, later: &Option<String>| {
        if later.is_some() {
            into.clone_from(later);
        }
    };
    take(&mut into.first_name, &later.first_name);
    take(&mut into.last_name, &later.last_name);
    take(&mut into.organization, &later.organization);
    take(&mut into.title, &later.title);
    take(&mut into.image, &later.image);
    match (&mut into.location, &later.location) {
        (Some(into), Some(later)) => {
            take(&mut into.address1, &later.address1);
            take(&mut into.city, &later.city);
            take(&mut into.region, &later.region);
            take(&mut into.zip, &later.zip);
            take(&mut into.country, &later.country);
        }
        (into @ None, Some(later)) => *into = Some(later.clone()),
        _ => {}
    }
    for (key, value) in &later.properties {
        into.properties.insert(key.clone(), value.clone());
    }
}

impl KlaviyoDestination {
    /// Whether this upsert's profile body is the one last sent for that profile.
    pub(super) fn unchanged(&self, upsert: &ProfileUpsert) -> bool {
        let Some(cache) = &self.profile_cache else {
            return false;
        };
        let (who, body) = profile_hashes(upsert);
        cache.get(&who) == Some(body)
    }

    /// A profile went: each of its messages' bodies is now what Klaviyo has (the last
    /// one last, later traits having won the merge).
    pub(super) fn remember(&self, profile: &Merged) {
        if let Some(cache) = &self.profile_cache {
            for &(who, body) in &profile.hashes {
                cache.insert(who, body);
            }
        }
    }
}

pub(super) fn profile_cache(config: &ProfileCacheConfig) -> Option<moka::sync::Cache<u64, u64>> {
    (!config.ttl.is_zero()).then(|| {
        moka::sync::Cache::builder()
            .max_capacity(config.max_entries)
            .time_to_live(config.ttl)
            .build()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upserts_of_one_profile_merge_later_traits_winning() {
        let upsert = |external: &str, plan: &str, first: Option<&str>| ProfileUpsert {
            profile: Profile {
                external_id: Some(external.to_string()),
                first_name: first.map(str::to_string),
                properties: serde_json::json!({"plan": plan})
                    .as_object()
                    .unwrap()
                    .clone(),
                ..Profile::default()
            },
        };
        let (a1, b1, a2) = (
            upsert("a", "free", Some("Ann")),
            upsert("b", "pro", None),
            upsert("a", "max", None),
        );
        let merged = merge_profiles(&[(0, &a1), (1, &b1), (2, &a2)]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].messages, vec![0, 2]);
        let a = &merged[0].upsert.profile;
        assert_eq!(a.properties["plan"], "max");
        assert_eq!(
            a.first_name.as_deref(),
            Some("Ann"),
            "a missing trait keeps the earlier"
        );
        assert_eq!(merged[1].messages, vec![1]);
    }
}
