//! The admin API's privacy regulations, as the tests call them.

use serde_json::Value;

use super::{client, status_json, Fanout};

/// `POST /admin/regulations` with `body`: the answer's status and JSON.
pub async fn post(f: &Fanout, token: &str, body: &Value) -> (u16, Value) {
    let response = client()
        .post(f.url("/admin/regulations"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    status_json(response).await
}

/// `GET /admin/regulations`: every regulation, oldest first (asserting a 200).
pub async fn list(f: &Fanout, token: &str) -> Vec<Value> {
    let response = client()
        .get(f.url("/admin/regulations"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(response).await;
    assert_eq!(status, 200, "{body}");
    body["regulations"].as_array().unwrap().clone()
}
