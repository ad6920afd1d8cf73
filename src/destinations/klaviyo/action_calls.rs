//! The calls a batch's Klaviyo actions become (`actions`): the items of every message
//! merged per (action, list, historical or not) and per profile, cut to each endpoint's
//! documented profiles per call, paced by each endpoint's own bucket. A call Klaviyo
//! answers 400 naming profile rows is sent again without them, and their messages are
//! refused with Klaviyo's detail.

use std::collections::HashMap;

use reqwest::header::CONTENT_TYPE;
use reqwest::Method;
use serde_json::{json, Value};

use super::actions::{ActionItem, KlaviyoActionKind};
use super::translate::body::write_profile_import;
use super::translate::{Profile, ProfileUpsert};
use super::{KlaviyoDestination, PROFILE_IMPORT};
use crate::destinations::{Refusal, RefusalKind, SendError};
use crate::pace::RateLimiter;

const SUBSCRIBE: &str = "/api/profile-subscription-bulk-create-jobs";
const UNSUBSCRIBE: &str = "/api/profile-subscription-bulk-delete-jobs";
const SUPPRESS: &str = "/api/profile-suppression-bulk-create-jobs";
const UNSUPPRESS: &str = "/api/profile-suppression-bulk-delete-jobs";

/// One bucket per endpoint, at Klaviyo's documented limits (burst per second, steady per
/// minute): subscription and suppression jobs 75/s, 700/min; list relationships 10/s,
/// 150/min.
pub(super) struct ActionLimits {
    subscribe: RateLimiter,
    unsubscribe: RateLimiter,
    suppress: RateLimiter,
    unsuppress: RateLimiter,
    list_add: RateLimiter,
    list_remove: RateLimiter,
}

impl ActionLimits {
    /// The buckets of `account` (`k.<hash of the API key>`).
    pub(super) fn new(account: &str) -> ActionLimits {
        let limit = |endpoint: &str, per_minute: f64, burst: u32| {
            RateLimiter::named(&format!("{account}.{endpoint}"), per_minute / 60.0, burst)
        };
        ActionLimits {
            subscribe: limit("subscribe", 700.0, 75),
            unsubscribe: limit("unsubscribe", 700.0, 75),
            suppress: limit("suppress", 700.0, 75),
            unsuppress: limit("unsuppress", 700.0, 75),
            list_add: limit("list_add", 150.0, 10),
            list_remove: limit("list_remove", 150.0, 10),
        }
    }
}

/// Klaviyo's documented most profiles per call of each action's endpoint.
pub(super) fn per_call(kind: KlaviyoActionKind) -> usize {
    match kind {
        KlaviyoActionKind::Subscribe
        | KlaviyoActionKind::AddToList
        | KlaviyoActionKind::RemoveFromList => 1000,
        KlaviyoActionKind::Unsubscribe
        | KlaviyoActionKind::Suppress
        | KlaviyoActionKind::Unsuppress => 100,
    }
}

/// One profile of a call, and the messages that asked for it.
#[derive(Debug)]
pub(super) struct Row {
    pub(super) item: ActionItem,
    pub(super) messages: Vec<usize>,
}

/// The profiles of one action over a batch, merged, in first-seen order.
#[derive(Debug)]
pub(super) struct Group {
    pub(super) kind: KlaviyoActionKind,
    pub(super) list_id: Option<String>,
    pub(super) historical: bool,
    pub(super) rows: Vec<Row>,
}

/// Merges a batch's items: one group per (action kind, list, historical), one row per
/// profile within it. A profile asked for by several messages keeps the earliest consent
/// time (when it was first gathered).
pub(super) fn group(
    items: Vec<(usize, ActionItem)>,
    kinds: impl Fn(usize) -> (KlaviyoActionKind, Option<String>),
) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut rows: HashMap<(usize, [Option<String>; 3]), usize> = HashMap::new();
    for (message, item) in items {
        let (kind, list_id) = kinds(item.action);
        let historical = item.consented_at.is_some();
        let g = match groups
            .iter()
            .position(|g| g.kind == kind && g.list_id == list_id && g.historical == historical)
        {
            Some(g) => g,
            None => {
                groups.push(Group {
                    kind,
                    list_id,
                    historical,
                    rows: Vec::new(),
                });
                groups.len() - 1
            }
        };
        let who = [
            item.email.clone(),
            item.phone_number.clone(),
            item.external_id.clone(),
        ];
        let rows_here = &mut groups[g].rows;
        match rows.get(&(g, who.clone())) {
            Some(&r) => {
                let row = &mut rows_here[r];
                row.messages.push(message);
                row.item.consented_at = match (row.item.consented_at, item.consented_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            None => {
                rows.insert((g, who), rows_here.len());
                rows_here.push(Row {
                    item,
                    messages: vec![message],
                });
            }
        }
    }
    groups
}

/// The body of a subscription or suppression job for `rows`.
pub(super) fn job_body(group: &Group, rows: &[&Row]) -> Value {
    let consent = |c: &str, row: &Row| {
        let mut marketing = json!({ "consent": c });
        if let Some(at) = row.item.consented_at {
            marketing["consented_at"] = json!(at.to_rfc3339());
        }
        json!({ "marketing": marketing })
    };
    let (kind, consent_word) = match group.kind {
        KlaviyoActionKind::Subscribe => ("profile-subscription-bulk-create-job", "SUBSCRIBED"),
        KlaviyoActionKind::Unsubscribe => ("profile-subscription-bulk-delete-job", "UNSUBSCRIBED"),
        KlaviyoActionKind::Suppress => ("profile-suppression-bulk-create-job", ""),
        _ => ("profile-suppression-bulk-delete-job", ""),
    };
    let profiles: Vec<Value> = rows
        .iter()
        .map(|row| {
            let mut attributes = json!({});
            if consent_word.is_empty() {
                attributes["email"] = json!(row.item.email);
                return json!({ "type": "profile", "attributes": attributes });
            }
            let mut subscriptions = json!({});
            if let Some(email) = &row.item.email {
                attributes["email"] = json!(email);
                subscriptions["email"] = consent(consent_word, row);
            }
            if let Some(phone) = &row.item.phone_number {
                attributes["phone_number"] = json!(phone);
                subscriptions["sms"] = consent(consent_word, row);
            }
            attributes["subscriptions"] = subscriptions;
            json!({ "type": "profile", "attributes": attributes })
        })
        .collect();
    let mut attributes = json!({ "profiles": { "data": profiles } });
    if group.historical {
        attributes["historical_import"] = json!(true);
    }
    let mut data = json!({ "type": kind, "attributes": attributes });
    if let Some(list) = &group.list_id {
        data["relationships"] = json!({ "list": { "data": { "type": "list", "id": list } } });
    }
    json!({ "data": data })
}

/// The row an error's `source.pointer` names: `/data/attributes/profiles/data/<row>/…`
/// for jobs, `/data/<row>/…` for list relationships.
fn row_of_pointer(pointer: &str) -> Option<usize> {
    let rest = pointer
        .strip_prefix("/data/attributes/profiles/data/")
        .or_else(|| pointer.strip_prefix("/data/"))?;
    rest.split('/').next()?.parse().ok()
}

/// The rows a 400's errors name, each with Klaviyo's `code: detail`.
fn refused_rows(answer: Option<&str>, rows: usize) -> Vec<(usize, String, String)> {
    let errors: Value = answer
        .and_then(|a| serde_json::from_str(a).ok())
        .unwrap_or_default();
    errors["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let row = e["source"]["pointer"]
                .as_str()
                .and_then(row_of_pointer)
                .filter(|&r| r < rows)?;
            let detail = format!(
                "{}: {}",
                e["code"].as_str().unwrap_or("invalid"),
                e["detail"].as_str().unwrap_or_default()
            );
            Some((row, detail, e.to_string()))
        })
        .collect()
}

impl KlaviyoDestination {
    /// Sends the batch's action items; returns the messages Klaviyo refused.
    pub(super) async fn send_actions(
        &self,
        items: Vec<(usize, ActionItem)>,
    ) -> Result<Vec<Refusal>, SendError> {
        let groups = group(items, |a| {
            let action = &self.actions[a];
            (action.kind, action.list_id.clone())
        });
        let mut refused = Vec::new();
        for group in &groups {
            for chunk in group.rows.chunks(per_call(group.kind)) {
                let mut rows: Vec<&Row> = chunk.iter().collect();
                if group.kind.is_list() {
                    // `fanout check` requires a list_id for list actions.
                    let list = group.list_id.as_deref().unwrap_or_default();
                    let mut found = Vec::new();
                    for row in rows {
                        match self.profile_id(&row.item).await? {
                            Ok(id) => found.push((row, id)),
                            Err((status, detail, answer)) => {
                                refuse(&mut refused, row, status, detail, answer)
                            }
                        }
                    }
                    self.list_call(group.kind, list, &mut found, &mut refused)
                        .await?;
                } else {
                    self.job_call(group, &mut rows, &mut refused).await?;
                }
            }
        }
        Ok(refused)
    }

    /// One subscription or suppression job; rows Klaviyo names in a 400 are refused and
    /// the rest sent again.
    async fn job_call(
        &self,
        group: &Group,
        rows: &mut Vec<&Row>,
        refused: &mut Vec<Refusal>,
    ) -> Result<(), SendError> {
        let (path, limiter) = match group.kind {
            KlaviyoActionKind::Subscribe => (SUBSCRIBE, &self.action_limits.subscribe),
            KlaviyoActionKind::Unsubscribe => (UNSUBSCRIBE, &self.action_limits.unsubscribe),
            KlaviyoActionKind::Suppress => (SUPPRESS, &self.action_limits.suppress),
            _ => (UNSUPPRESS, &self.action_limits.unsuppress),
        };
        while !rows.is_empty() {
            let body = job_body(group, rows).to_string().into_bytes();
            let request = self.client.post(format!("{}{path}", self.base)).body(body);
            match self.call_with_body(request, limiter).await {
                Ok(_) => return Ok(()),
                Err(e) => take_refused(e, rows, |r| r, refused)?,
            }
        }
        Ok(())
    }

    /// `POST` / `DELETE /api/lists/{list}/relationships/profiles` with profile ids.
    async fn list_call(
        &self,
        kind: KlaviyoActionKind,
        list: &str,
        rows: &mut Vec<(&Row, String)>,
        refused: &mut Vec<Refusal>,
    ) -> Result<(), SendError> {
        let (method, limiter) = match kind {
            KlaviyoActionKind::AddToList => (Method::POST, &self.action_limits.list_add),
            _ => (Method::DELETE, &self.action_limits.list_remove),
        };
        let path = format!("/api/lists/{list}/relationships/profiles");
        while !rows.is_empty() {
            let data: Vec<Value> = rows
                .iter()
                .map(|(_, id)| json!({ "type": "profile", "id": id }))
                .collect();
            let body = json!({ "data": data }).to_string().into_bytes();
            let request = self
                .client
                .request(method.clone(), format!("{}{path}", self.base))
                .body(body);
            match self.call_with_body(request, limiter).await {
                Ok(_) => return Ok(()),
                Err(e) => take_refused(no_such_list(e), rows, |(r, _)| r, refused)?,
            }
        }
        Ok(())
    }

    /// The Klaviyo id of the item's profile, from a `POST /api/profile-import` of its
    /// identifiers (which changes nothing else on the profile); `Err` when refused.
    async fn profile_id(
        &self,
        item: &ActionItem,
    ) -> Result<Result<String, (u16, String, Option<String>)>, SendError> {
        let upsert = ProfileUpsert {
            profile: Profile {
                email: item.email.clone(),
                phone_number: item.phone_number.clone(),
                external_id: item.external_id.clone(),
                ..Profile::default()
            },
        };
        let mut body = Vec::new();
        write_profile_import(&mut body, &upsert);
        match self.post(PROFILE_IMPORT, body, &self.profiles_limit).await {
            Ok(answer) => serde_json::from_str::<Value>(&answer.body)
                .ok()
                .and_then(|v| v.pointer("/data/id")?.as_str().map(str::to_string))
                .map(Ok)
                .ok_or_else(|| SendError::Retryable {
                    status: None,
                    retry_after: None,
                    detail: "a profile import answered without the profile's id".into(),
                    answer: None,
                }),
            Err(SendError::Rejected {
                status,
                detail,
                answer,
            }) => Ok(Err((status, detail, answer))),
            Err(e) => Err(e),
        }
    }

    async fn call_with_body(
        &self,
        request: reqwest::RequestBuilder,
        limiter: &RateLimiter,
    ) -> Result<crate::destinations::http::Answer, SendError> {
        self.call(request.header(CONTENT_TYPE, self.content_type()), limiter)
            .await
    }
}

/// A list call answered 404: the list does not exist (a wrong `list_id`), which no retry
/// mends, though a 404 is retried elsewhere (a resource not there yet). Dead-lettered.
fn no_such_list(error: SendError) -> SendError {
    match error {
        SendError::Retryable {
            status: Some(404),
            detail,
            answer,
            ..
        } => SendError::Rejected {
            status: 404,
            detail: format!("no such list: {detail}"),
            answer,
        },
        other => other,
    }
}

fn refuse(
    refused: &mut Vec<Refusal>,
    row: &Row,
    status: u16,
    detail: String,
    answer: Option<String>,
) {
    refused.extend(row.messages.iter().map(|&index| Refusal {
        index,
        kind: RefusalKind::Refused,
        status: Some(status),
        detail: detail.clone(),
        answer: answer.clone(),
    }));
}

/// After a rejected call: refuses the rows Klaviyo named (all of them when it named none)
/// and leaves the others in `rows` to be sent again; other errors are returned.
fn take_refused<'r, T>(
    error: SendError,
    rows: &mut Vec<T>,
    row_of: impl Fn(&T) -> &'r Row,
    refused: &mut Vec<Refusal>,
) -> Result<(), SendError> {
    let SendError::Rejected {
        status,
        detail,
        answer,
    } = error
    else {
        return Err(error);
    };
    let named = refused_rows(answer.as_deref(), rows.len());
    if named.is_empty() {
        for row in rows.drain(..) {
            refuse(
                refused,
                row_of(&row),
                status,
                detail.clone(),
                answer.clone(),
            );
        }
        return Ok(());
    }
    let mut drop = vec![false; rows.len()];
    for (row, detail, error) in named {
        if !drop[row] {
            refuse(refused, row_of(&rows[row]), status, detail, Some(error));
        }
        drop[row] = true;
    }
    let mut at = 0;
    rows.retain(|_| {
        at += 1;
        !drop[at - 1]
    });
    Ok(())
}
