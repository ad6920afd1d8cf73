//! Writing one object whole to S3: a single PUT, or for large objects a multipart upload
//! that is completed only when every part is in (S3 shows nothing of an upload that was
//! never completed) and aborted on failure. Requests are presigned with SigV4 by
//! rusty-s3 and sent by the reqwest client every HTTP destination shares.

use std::time::Duration;

use bytes::Bytes;
use rusty_s3::actions::{CompleteMultipartUploadResponse, CreateMultipartUpload};
use rusty_s3::{Bucket, Credentials, S3Action};

use super::super::http;
use super::super::SendError;
use crate::clock::Clock;
use crate::throttle::LogThrottle;

/// How long a signed request stays valid; each is sent as soon as it is signed.
const SIGNED_FOR: Duration = Duration::from_secs(15 * 60);

/// S3 error codes that no retry can fix: the credentials or the bucket are wrong. The
/// batch is dead-lettered with the code (and replayed once the config is fixed).
const REFUSED_CODES: &[&str] = &[
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "NoSuchBucket",
    "InvalidBucketName",
    "AccountProblem",
];

/// S3 error codes of a 400 that are about the transfer, not the content: sent again,
/// the same object goes through.
const RETRIED_CODES: &[&str] = &[
    "RequestTimeout",
    "IncompleteBody",
    "BadDigest",
    "InvalidPart",
    "InvalidPartOrder",
    "NoSuchUpload",
];

/// One failed abort a minute is logged: during an outage every attempt's abort fails.
static ABORT_FAILED: LogThrottle = LogThrottle::new(Duration::from_secs(60));

pub struct Store {
    pub client: reqwest::Client,
    pub bucket: Bucket,
    pub credentials: Credentials,
    /// Objects larger than this go in parts of this size.
    pub part_size: usize,
    pub clock: Clock,
}

impl Store {
    /// Writes `body` at `key`; Ok only once S3 has answered that the object is stored.
    pub async fn put(&self, key: &str, body: Vec<u8>) -> Result<(), SendError> {
        if body.len() <= self.part_size {
            let url = self.sign(&self.bucket.put_object(Some(&self.credentials), key));
            let request = self.client.put(url).body(body);
            return self.request(request).await.map(drop);
        }
        let url = self.sign(
            &self
                .bucket
                .create_multipart_upload(Some(&self.credentials), key),
        );
        let answer = self.request(self.client.post(url)).await?;
        let created = CreateMultipartUpload::parse_response(&answer.body)
            .map_err(|e| unreadable("CreateMultipartUpload", e))?;
        let upload_id = created.upload_id();
        let result = self.upload_parts(key, upload_id, Bytes::from(body)).await;
        if result.is_err() {
            // Parts are kept (and billed) until the upload is completed or aborted.
            let abort = self
                .bucket
                .abort_multipart_upload(Some(&self.credentials), key, upload_id);
            let url = self.sign(&abort);
            if let Err(e) = self.request(self.client.delete(url)).await {
                if ABORT_FAILED.ready() {
                    tracing::warn!(error = %e, "cannot abort a failed multipart upload; \
                        a bucket lifecycle rule for incomplete uploads removes its parts");
                }
            }
        }
        result
    }

    async fn upload_parts(&self, key: &str, upload_id: &str, body: Bytes) -> Result<(), SendError> {
        let mut etags = Vec::new();
        let mut start = 0;
        while start < body.len() {
            let end = (start + self.part_size).min(body.len());
            let number = u16::try_from(etags.len() + 1)
                .map_err(|_| unreadable("UploadPart", "more than 65535 parts"))?;
            let part = self
                .bucket
                .upload_part(Some(&self.credentials), key, number, upload_id);
            let url = self.sign(&part);
            let answer = self
                .request(self.client.put(url).body(body.slice(start..end)))
                .await?;
            let etag = answer
                .headers
                .get(reqwest::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| unreadable("UploadPart", "no ETag"))?;
            etags.push(etag.to_string());
            start = end;
        }
        let complete = self.bucket.complete_multipart_upload(
            Some(&self.credentials),
            key,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = self.sign(&complete);
        let answer = self
            .request(self.client.post(url).body(complete.body()))
            .await?;
        // S3 may answer 200 before it knows, and then put an error in the body.
        match CompleteMultipartUploadResponse::parse(&answer.body) {
            Ok(_) => Ok(()),
            Err(_) => Err(classify(200, Some(answer.body))),
        }
    }

    fn sign<'a>(&self, action: &impl S3Action<'a>) -> url::Url {
        let now = jiff::Timestamp::from_millisecond(self.clock.now().timestamp_millis())
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        action.sign_with_time(SIGNED_FOR, &now)
    }

    async fn request(&self, request: reqwest::RequestBuilder) -> Result<http::Answer, SendError> {
        http::send_for_answer(request, self.clock)
            .await
            .map_err(|e| match e {
                SendError::Retryable {
                    status: Some(status),
                    answer,
                    ..
                }
                | SendError::Rejected { status, answer, .. } => classify(status, answer),
                other => other,
            })
    }
}

fn unreadable(what: &str, e: impl std::fmt::Display) -> SendError {
    SendError::Retryable {
        status: None,
        retry_after: None,
        detail: format!("unreadable {what} answer: {e}"),
        answer: None,
    }
}

/// What an S3 error answer means for the batch: S3's own code decides (in the detail,
/// which is logged; the answer goes only with the dead letter), then the status.
pub fn classify(status: u16, answer: Option<String>) -> SendError {
    let code = answer.as_deref().and_then(error_code);
    let detail = match code {
        Some(code) => format!("HTTP {status} ({code})"),
        None => format!("HTTP {status}"),
    };
    let refused = code.is_some_and(|c| REFUSED_CODES.contains(&c));
    let retryable = matches!(status, 200..=399 | 401 | 403 | 404 | 408 | 429 | 500..=599)
        || code.is_some_and(|c| RETRIED_CODES.contains(&c));
    if refused || !retryable {
        SendError::Rejected {
            status,
            detail,
            answer,
        }
    } else {
        SendError::Retryable {
            status: Some(status),
            retry_after: None,
            detail,
            answer,
        }
    }
}

/// `<Error><Code>…</Code>` of an S3 error answer, when it is a plain identifier.
fn error_code(body: &str) -> Option<&str> {
    let error = &body[body.find("<Error>")?..];
    let start = error.find("<Code>")? + "<Code>".len();
    let code = &error[start..start + error[start..].find("</Code>")?];
    let identifier =
        !code.is_empty() && code.len() <= 64 && code.bytes().all(|b| b.is_ascii_alphanumeric());
    identifier.then_some(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(code: &str) -> Option<String> {
        Some(format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
             <Message>m</Message><Resource>/events/k</Resource></Error>"
        ))
    }

    #[test]
    fn wrong_credentials_and_missing_buckets_are_refused_with_the_code() {
        for (status, code) in [
            (403, "AccessDenied"),
            (403, "InvalidAccessKeyId"),
            (403, "SignatureDoesNotMatch"),
            (404, "NoSuchBucket"),
        ] {
            let SendError::Rejected { detail, answer, .. } = classify(status, error(code)) else {
                panic!("{code} is refused");
            };
            assert_eq!(detail, format!("HTTP {status} ({code})"));
            assert!(answer.unwrap().contains(code));
        }
    }

    #[test]
    fn outages_and_throttling_are_retried() {
        for (status, answer) in [
            (500, error("InternalError")),
            (503, error("SlowDown")),
            (403, error("RequestTimeTooSkewed")),
            (404, error("NoSuchUpload")),
            (400, error("RequestTimeout")),
            (400, error("InvalidPart")),
            (200, error("InternalError")),
            (502, Some("<html>bad gateway</html>".into())),
            (503, None),
        ] {
            assert!(
                matches!(
                    classify(status, answer.clone()),
                    SendError::Retryable { .. }
                ),
                "{status} {answer:?}"
            );
        }
        assert!(matches!(
            classify(400, error("EntityTooLarge")),
            SendError::Rejected { .. }
        ));
    }

    #[test]
    fn reads_only_identifier_codes() {
        assert_eq!(
            error_code(&error("NoSuchBucket").unwrap()),
            Some("NoSuchBucket")
        );
        assert_eq!(error_code("<Error><Code>a b</Code></Error>"), None);
        assert_eq!(error_code("<Code>X</Code>"), None);
        assert_eq!(error_code("<Error><Code>X"), None);
    }
}
