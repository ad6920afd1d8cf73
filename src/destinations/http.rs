//! What every HTTP destination shares: a pooled client and one reading of answers
//! (`classify`; the policy and why: docs/delivery.md, "Answers"). Redirects
//! are not followed: a POST body would not survive one.

use std::time::{Duration, SystemTime};

use super::SendError;
use crate::clock::Clock;

/// Most bytes read of any answer's body: enough for a job's status or a page of import
/// errors, and a receiver cannot make fanout hold more.
const ERROR_BODY_BYTES: usize = 256 * 1024;
/// Kept of an error answer (it goes with the dead letter).
const ERROR_ANSWER_BYTES: usize = 4096;

pub fn client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .pool_idle_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("fanout/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// Sends `request` and reads the answer into a delivery outcome; a `Retry-After` date
/// is measured from `clock`.
pub async fn send(request: reqwest::RequestBuilder, clock: Clock) -> Result<(), SendError> {
    send_for_answer(request, clock).await.map(|_| ())
}

/// A 2xx answer: its body (up to a few KB) and headers.
pub struct Answer {
    pub body: String,
    pub headers: reqwest::header::HeaderMap,
}

/// Sends `request`; a 2xx answer comes back whole, anything else as a delivery outcome.
/// A `Retry-After` date is measured from `clock`.
pub async fn send_for_answer(
    request: reqwest::RequestBuilder,
    clock: Clock,
) -> Result<Answer, SendError> {
    let response = request.send().await.map_err(|e| SendError::Retryable {
        status: None,
        retry_after: None,
        detail: describe(e),
        answer: None,
    })?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let retry_after = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::from(clock.now())));
    // Read the body even on success, so the connection goes back to the pool.
    let body = read_limited(response).await;
    if (200..300).contains(&status) {
        return Ok(Answer { body, headers });
    }
    let mut cut = body.len().min(ERROR_ANSWER_BYTES);
    while !body.is_char_boundary(cut) {
        cut -= 1;
    }
    match classify(status, retry_after, body[..cut].to_string()) {
        None => Ok(Answer { body, headers }),
        Some(e) => Err(e),
    }
}

/// The outcome of an answer: `None` when delivered.
pub fn classify(status: u16, retry_after: Option<Duration>, body: String) -> Option<SendError> {
    let detail = match error_code(&body) {
        Some(code) => format!("HTTP {status} ({code})"),
        None => format!("HTTP {status}"),
    };
    let answer = (!body.is_empty()).then_some(body);
    match status {
        200..=299 => None,
        408 | 429 | 401 | 403 | 404 | 405 | 410 | 300..=399 | 500..=599 => {
            Some(SendError::Retryable {
                status: Some(status),
                retry_after,
                detail,
                answer,
            })
        }
        400..=499 => Some(SendError::Rejected {
            status,
            detail,
            answer,
        }),
        _ => Some(SendError::Retryable {
            status: Some(status),
            retry_after,
            detail,
            answer,
        }),
    }
}

/// The error code of a JSON error answer, in the shapes receivers use (Klaviyo's
/// `{"errors":[{"code"}]}`, `{"error":{"code"}}`, `{"code"}`, `{"error":"…"}`), when it
/// is a short identifier: an answer's free text can echo what was sent, a code cannot.
fn error_code(body: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    let code = [
        value.pointer("/errors/0/code"),
        value.pointer("/error/code"),
        value.get("code"),
        value.get("error"),
    ]
    .into_iter()
    .flatten()
    .find_map(serde_json::Value::as_str)?;
    let identifier = !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    identifier.then(|| code.to_string())
}

/// `Retry-After` as delay seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

async fn read_limited(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    // Keep reading past the limit (without keeping it) so the connection stays reusable.
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = ERROR_BODY_BYTES.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
    String::from_utf8_lossy(&body).into_owned()
}

fn describe(e: reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    // The source chain says why (refused, reset, DNS…). Without the URL: it may carry
    // credentials or a token, and this text is logged and kept with dead letters.
    let e = e.without_url();
    let mut detail = format!("{what}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        detail.push_str(&format!(": {s}"));
        source = s.source();
    }
    detail
}

/// Sends `request` with `body` (gzip-compressed when asked): the whole of a batch for
/// destinations that make one request per batch. No mark to save: 0.
pub async fn send_batch(
    request: reqwest::RequestBuilder,
    body: Vec<u8>,
    gzip: bool,
    clock: Clock,
) -> Result<u64, SendError> {
    send(with_body(request, body, gzip), clock)
        .await
        .map(|()| 0)
}

/// Sets the body, gzip-compressed (with `Content-Encoding: gzip`) when asked.
fn with_body(
    request: reqwest::RequestBuilder,
    body: Vec<u8>,
    gzip: bool,
) -> reqwest::RequestBuilder {
    if gzip {
        request
            .header(reqwest::header::CONTENT_ENCODING, "gzip")
            .body(compress(&body))
    } else {
        request.body(body)
    }
}

/// Gzip at the fast level: bodies are compressed once per attempt, on the delivery path.
fn compress(body: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    encoder
        .write_all(body)
        .expect("writing to a Vec cannot fail");
    encoder.finish().expect("writing to a Vec cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_answers() {
        assert!(classify(202, None, String::new()).is_none());
        for status in [408, 429, 500, 502, 503, 401, 403, 404, 410, 302] {
            assert!(
                matches!(
                    classify(status, None, String::new()),
                    Some(SendError::Retryable { .. })
                ),
                "{status}"
            );
        }
        for status in [400, 413, 422] {
            assert!(
                matches!(
                    classify(status, None, "no".into()),
                    Some(SendError::Rejected { .. })
                ),
                "{status}"
            );
        }
    }

    #[test]
    fn logs_see_a_code_never_the_answer() {
        let answers = [
            (
                r#"{"errors":[{"code":"invalid","detail":"jane@example.com is bad"}]}"#,
                "HTTP 400 (invalid)",
            ),
            (
                r#"{"success":false,"error":{"code":"invalid_field","message":"x"}}"#,
                "HTTP 400 (invalid_field)",
            ),
            (r#"{"error":"jane@example.com"}"#, "HTTP 400"),
            ("echo: jane@example.com", "HTTP 400"),
            ("", "HTTP 400"),
        ];
        for (body, logged) in answers {
            let Some(SendError::Rejected { detail, answer, .. }) =
                classify(400, None, body.to_string())
            else {
                panic!("{body}");
            };
            assert_eq!(detail, logged);
            assert_eq!(answer.as_deref(), (!body.is_empty()).then_some(body));
        }
    }

    #[test]
    fn reads_retry_after_as_seconds_or_date() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    /// A `Retry-After` date is measured from the destination's clock, not the system's.
    #[tokio::test]
    async fn a_retry_after_date_is_read_against_the_clock() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let answer = "HTTP/1.1 429 Too Many Requests\r\n\
                          Retry-After: Sun, 06 Nov 1994 09:49:37 GMT\r\n\
                          Content-Length: 0\r\nConnection: close\r\n\r\n";
            socket.write_all(answer.as_bytes()).await.unwrap();
        });
        let at = chrono::DateTime::parse_from_rfc2822("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let clock = Clock::following_tokio(at.to_utc());
        let client = client(Duration::from_secs(5)).unwrap();
        let Err(SendError::Retryable { retry_after, .. }) = send(client.post(url), clock).await
        else {
            panic!("a 429 is retried");
        };
        // An hour after the clock's now, less the time the request took; by the system
        // clock that date is long past (zero).
        let wait = retry_after.expect("the answer's Retry-After");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(3600),
            "{wait:?}"
        );
    }
}
