//! The operator endpoints' query strings, read into typed parameters: one that does not
//! parse is a 400 in the JSON error contract naming the parameter, where axum's own
//! `Query` answers in plain text.

use axum::extract::FromRequestParts;
use http::request::Parts;
use serde::de::DeserializeOwned;

use super::ApiError;
use crate::ingest::Rejection;

/// The request's query string read as `T`; used as axum's `Query` is.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parse(parts.uri.query().unwrap_or_default()).map(Query)
    }
}

fn parse<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let params = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(params).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        // A parameter's own value fails at its path; a duplicate or missing one at the
        // top, with its name in backticks in serde's message.
        let field = match path.as_str() {
            "." => message.split('`').nth(1).map(str::to_string),
            _ => Some(path),
        };
        let rejection = Rejection::new(
            "invalid_query",
            match &field {
                Some(field) => format!("query parameter `{field}`: {message}"),
                None => format!("query string: {message}"),
            },
        );
        ApiError::Invalid(Rejection { field, ..rejection })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)] // read by serde only
    struct Params {
        destination: Option<String>,
        limit: Option<usize>,
        #[serde(default)]
        purge: bool,
    }

    fn refusal(query: &str) -> Rejection {
        match parse::<Params>(query) {
            Err(ApiError::Invalid(rejection)) => rejection,
            other => panic!("{query}: {other:?}"),
        }
    }

    #[test]
    fn a_parameter_that_does_not_parse_is_named() {
        assert!(parse::<Params>("destination=out&limit=10&purge=true").is_ok());
        for (query, field) in [
            ("limit=lots", "limit"),
            ("limit=-1", "limit"),
            ("purge=maybe", "purge"),
            ("destination=a&destination=b", "destination"),
        ] {
            let rejection = refusal(query);
            assert_eq!(rejection.code, "invalid_query", "{query}");
            assert_eq!(rejection.field.as_deref(), Some(field), "{query}");
            assert!(rejection.message.contains(field), "{}", rejection.message);
        }
    }
}
