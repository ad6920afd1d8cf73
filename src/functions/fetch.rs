//! `fetch` for functions: the request itself, run to completion on the function's thread,
//! under the host policy of `hosts.rs`.

use super::hosts::HostPolicy;
use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

/// The largest answer body a function is handed.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// A request as the script made it.
pub struct Request {
    pub url: String,
    pub method: String,
    pub headers: BTreeMap<String, String>,
    pub body: Option<String>,
}

/// Runs `request` within `time_left`; the answer is the JSON the prelude's `fetch` reads:
/// `{status, headers, body}`, `{error}` (network: worth a retry) or `{refused}`, with
/// `sent_to` (the URL requested instead) when `fetch_hosts` remapped the host.
pub async fn run(
    client: &reqwest::Client,
    policy: &HostPolicy,
    request: Request,
    time_left: Duration,
) -> serde_json::Value {
    let url = match reqwest::Url::parse(&request.url) {
        Ok(url) => url,
        Err(e) => return json!({ "refused": format!("fetch: bad URL: {e}") }),
    };
    let target = match policy.target(&url).await {
        Ok(target) => target,
        Err(refused) => return json!({ "refused": refused }),
    };
    let sent_to = (target != url).then(|| target.to_string());
    let mut answer = send(client, request, target, &url, time_left).await;
    if let (Some(sent_to), Some(fields)) = (sent_to, answer.as_object_mut()) {
        fields.insert("sent_to".into(), sent_to.into());
    }
    answer
}

async fn send(
    client: &reqwest::Client,
    request: Request,
    target: reqwest::Url,
    url: &reqwest::Url,
    time_left: Duration,
) -> serde_json::Value {
    let method = match reqwest::Method::from_bytes(request.method.to_ascii_uppercase().as_bytes()) {
        Ok(method) => method,
        Err(_) => return json!({ "refused": format!("fetch: bad method `{}`", request.method) }),
    };
    let mut builder = client.request(method, target).timeout(time_left);
    for (name, value) in &request.headers {
        builder = builder.header(name, value);
    }
    if let Some(body) = request.body {
        builder = builder.body(body);
    }
    let answer = async {
        let mut response = builder.send().await?;
        let status = response.status().as_u16();
        let headers: serde_json::Map<String, serde_json::Value> = response
            .headers()
            .iter()
            .map(|(k, v)| {
                let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (k.as_str().to_string(), serde_json::Value::String(value))
            })
            .collect();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > MAX_BODY {
                break;
            }
            body.extend_from_slice(&chunk);
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        Ok::<_, reqwest::Error>(json!({ "status": status, "headers": headers, "body": body }))
    };
    match tokio::time::timeout(time_left, answer).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) if super::resolver::refusal(&e).is_some() => {
            json!({ "refused": super::resolver::refusal(&e).map(|r| r.to_string()) })
        }
        // Without the URL: it may carry a token.
        Ok(Err(e)) => json!({ "error": format!("fetch to `{url_host}` failed: {kind}",
            url_host = url.host_str().unwrap_or(""), kind = error_kind(&e)) }),
        Err(_) => json!({ "error": "fetch: the call's time limit passed" }),
    }
}

fn error_kind(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_body() || e.is_decode() {
        "the answer broke off"
    } else {
        "request error"
    }
}
