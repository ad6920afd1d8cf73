//! `/admin/regulations`: privacy regulations, behind the admin token. `POST` makes one
//! from `{"type": "suppress" | "suppress_with_delete" | "unsuppress", "userId" |
//! "anonymousId" | "email": …}` (201 new, 200 when the subject's newest regulation is
//! already of that type), `GET` lists them with their deletion reports, `DELETE
//! /admin/regulations/{id}` takes one back.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;
use serde_json::{json, Map, Value};

use super::admin::authorize;
use super::handlers::read_body;
use super::{ApiError, App};
use crate::ingest::Rejection;
use crate::regulations::{Kind, SubjectId, Suppressed};

fn invalid(code: &'static str, field: &str, message: impl Into<String>) -> ApiError {
    ApiError::Invalid(Rejection::field(code, field, message))
}

/// Reads a regulation request; a 400 names the field at fault.
pub fn parse_request(body: &[u8]) -> Result<(Kind, SubjectId), ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::Invalid(Rejection::new(
            "invalid_json",
            format!("body is not valid JSON: {e}"),
        ))
    })?;
    let Value::Object(fields) = value else {
        return Err(ApiError::Invalid(Rejection::new(
            "invalid_body",
            "body must be a JSON object: {\"type\": …, \"userId\" | \"anonymousId\" | \"email\": …}",
        )));
    };
    if let Some(unknown) = fields
        .keys()
        .find(|k| *k != "type" && !SubjectId::FIELDS.contains(&k.as_str()))
    {
        return Err(invalid(
            "unknown_field",
            unknown,
            format!("`{unknown}` is not a regulation field (type, userId, anonymousId, email)"),
        ));
    }
    let kind = match fields.get("type") {
        None => {
            return Err(invalid(
                "missing_field",
                "type",
                format!("type is required: {}", Kind::NAMES),
            ))
        }
        Some(Value::String(name)) => Kind::parse(name),
        Some(_) => None,
    }
    .ok_or_else(|| {
        invalid(
            "invalid_field",
            "type",
            format!("type must be {}", Kind::NAMES),
        )
    })?;
    Ok((kind, subject(&fields)?))
}

/// Exactly one of userId, anonymousId or email, a non-empty string (ids may be numbers).
fn subject(fields: &Map<String, Value>) -> Result<SubjectId, ApiError> {
    let mut given = SubjectId::FIELDS
        .iter()
        .filter_map(|&name| Some((name, fields.get(name)?)));
    let one = "exactly one of userId, anonymousId or email";
    let Some((name, value)) = given.next() else {
        return Err(invalid(
            "missing_field",
            "userId",
            format!("{one} is required"),
        ));
    };
    if let Some((second, _)) = given.next() {
        return Err(invalid(
            "invalid_field",
            second,
            format!("{one}: `{name}` and `{second}` were both given"),
        ));
    }
    let text = match value {
        Value::String(s) if !s.trim().is_empty() => s.clone(),
        Value::Number(n) if name != "email" => n.to_string(),
        _ => {
            return Err(invalid(
                "invalid_field",
                name,
                format!("{name} must be a non-empty string"),
            ))
        }
    };
    if name == "email" && !text.contains('@') {
        return Err(invalid(
            "invalid_field",
            name,
            format!("`{text}` is not an email address"),
        ));
    }
    Ok(SubjectId::new(name, &text).expect("one of the subject fields"))
}

/// `POST /admin/regulations`. A suppression also purges the subject's dead letters (the
/// answer says how many, `dead_letters_purged`).
pub async fn add(State(app): State<Arc<App>>, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    authorize(&app, &parts.headers)?;
    let body = read_body(body, app.limits.max_request_bytes).await?;
    let (kind, subject) = parse_request(&body)?;
    let (regulation, created) = app
        .regulations
        .add(kind, subject.clone())
        .await
        .map_err(|e| ApiError::Internal(format!("regulations store: {e:#}")))?;
    let mut answer = serde_json::to_value(&regulation).expect("regulations serialize");
    if kind != Kind::Unsuppress {
        let alone = suppressing(&subject);
        let purged = app
            .dead_letters
            .purge(|json| alone.matches(json))
            .await
            .map_err(|e| {
                ApiError::Internal(format!(
                    "regulation {} is stored, but the subject's dead letters were not purged \
                     ({e:#}); POST it again to purge them",
                    regulation.id
                ))
            })?;
        if purged > 0 {
            tracing::info!(
                id = regulation.id,
                letters = purged,
                "dead letters of a suppressed subject purged"
            );
        }
        answer["dead_letters_purged"] = json!(purged);
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(answer)).into_response())
}

/// The one subject, as a snapshot of its own (to match the dead letters against).
fn suppressing(subject: &SubjectId) -> Suppressed {
    let mut alone = Suppressed::default();
    match subject {
        SubjectId::UserId(id) => alone.user_ids.insert(id.clone()),
        SubjectId::AnonymousId(id) => alone.anonymous_ids.insert(id.clone()),
        SubjectId::Email(email) => alone.emails.insert(email.clone()),
    };
    alone
}

/// `GET /admin/regulations`: every regulation, oldest first.
pub async fn list(State(app): State<Arc<App>>, request: Request) -> Result<Response, ApiError> {
    authorize(&app, request.headers())?;
    Ok(Json(json!({ "regulations": app.regulations.list() })).into_response())
}

/// `DELETE /admin/regulations/{id}`: answers the regulation removed, 404 if none.
pub async fn remove(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    authorize(&app, request.headers())?;
    let removed = app
        .regulations
        .remove(&id)
        .await
        .map_err(|e| ApiError::Internal(format!("regulations store: {e:#}")))?;
    match removed {
        Some(regulation) => Ok(Json(json!({ "removed": regulation })).into_response()),
        None => {
            let error = json!({"success": false, "error": {
                "code": "unknown_regulation",
                "message": format!("no regulation with id `{id}`"),
                "field": "id",
            }});
            Ok((StatusCode::NOT_FOUND, Json(error)).into_response())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(body: &str) -> (String, Option<String>) {
        match parse_request(body.as_bytes()) {
            Err(ApiError::Invalid(r)) => (r.code.to_string(), r.field),
            Err(e) => panic!("{e:?}"),
            Ok(parsed) => panic!("accepted {body}: {parsed:?}"),
        }
    }

    #[test]
    fn a_bad_body_is_refused_naming_the_field() {
        let cases = [
            ("[]", "invalid_body", None),
            ("{", "invalid_json", None),
            (r#"{"userId":"u"}"#, "missing_field", Some("type")),
            (
                r#"{"type":"erase","userId":"u"}"#,
                "invalid_field",
                Some("type"),
            ),
            (r#"{"type":7,"userId":"u"}"#, "invalid_field", Some("type")),
            (r#"{"type":"suppress"}"#, "missing_field", Some("userId")),
            (
                r#"{"type":"suppress","userId":"u","email":"a@b"}"#,
                "invalid_field",
                Some("email"),
            ),
            (
                r#"{"type":"suppress","userId":""}"#,
                "invalid_field",
                Some("userId"),
            ),
            (
                r#"{"type":"suppress","anonymousId":null}"#,
                "invalid_field",
                Some("anonymousId"),
            ),
            (
                r#"{"type":"suppress","email":"nobody"}"#,
                "invalid_field",
                Some("email"),
            ),
            (
                r#"{"type":"suppress","userId":"u","why":1}"#,
                "unknown_field",
                Some("why"),
            ),
        ];
        for (body, code, field) in cases {
            assert_eq!(
                field_of(body),
                (code.to_string(), field.map(str::to_string)),
                "{body}"
            );
        }
    }

    #[test]
    fn a_good_body_names_one_subject() {
        assert_eq!(
            parse_request(br#"{"type":"suppress_with_delete","email":" A@Example.com"}"#).unwrap(),
            (
                Kind::SuppressWithDelete,
                SubjectId::Email("a@example.com".into())
            )
        );
        assert_eq!(
            parse_request(br#"{"type":"unsuppress","userId":42}"#).unwrap(),
            (Kind::Unsuppress, SubjectId::UserId("42".into()))
        );
    }
}
