//! Klaviyo's API as the destination calls it: each request paced by its endpoint's
//! bucket, which learns from the `RateLimit-*` headers and a 429's `Retry-After`; profile
//! imports, and import jobs followed to their end with the rows Klaviyo refused.

use std::ops::Range;
use std::time::Duration;

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};

use super::profiles::Merged;
use super::requests::profile_requests;
use super::translate::{ProfileUpsert, Revision};
use super::{
    KlaviyoDestination, JOB_POLL_FIRST, JOB_POLL_MAX, PROFILE_IMPORT, PROFILE_JOBS,
    PROFILE_JOB_WAIT,
};
use crate::destinations::{http, SendError};
use crate::pace::RateLimiter;

/// A profile import job that Klaviyo took: its id, and which merged profiles it carries.
pub(super) struct ProfileJob {
    id: String,
    pub(super) profiles: Range<usize>,
}

impl KlaviyoDestination {
    pub(super) fn content_type(&self) -> &'static str {
        match self.bodies.revision {
            Revision::V2023_01_24 => "application/json",
            Revision::Current => "application/vnd.api+json",
        }
    }

    pub(super) async fn post(
        &self,
        path: &str,
        body: Vec<u8>,
        limiter: &RateLimiter,
    ) -> Result<http::Answer, SendError> {
        let request = self
            .client
            .post(format!("{}{path}", self.base))
            .header(CONTENT_TYPE, self.content_type())
            .body(body);
        self.call(request, limiter).await
    }

    pub(super) async fn get(
        &self,
        path: &str,
        limiter: &RateLimiter,
    ) -> Result<http::Answer, SendError> {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        self.call(self.client.get(url), limiter).await
    }

    /// One request, paced by `limiter`, which learns from the answer's `RateLimit-*`
    /// headers and from a 429's `Retry-After` how much of the endpoint's window is left.
    pub(super) async fn call(
        &self,
        request: reqwest::RequestBuilder,
        limiter: &RateLimiter,
    ) -> Result<http::Answer, SendError> {
        limiter.acquire(1).await;
        let request = request
            .header(AUTHORIZATION, self.authorization.clone())
            .header("revision", self.revision_header.clone())
            .header(ACCEPT, self.content_type());
        let result = http::send_for_answer(request, self.clock).await;
        match &result {
            Ok(answer) => {
                if let Some((remaining, reset)) = rate_limit_left(&answer.headers) {
                    limiter.observe(remaining, reset);
                }
            }
            Err(SendError::Retryable {
                status: Some(429),
                retry_after,
                ..
            }) => limiter.observe(0, retry_after.unwrap_or(Duration::from_secs(1))),
            Err(_) => {}
        }
        result
    }

    /// Sends the merged profiles: imports one by one, or jobs, which come back to be
    /// followed once the events went.
    pub(super) async fn send_profiles(
        &self,
        merged: &[Merged],
    ) -> Result<Vec<ProfileJob>, SendError> {
        let upserts: Vec<&ProfileUpsert> = merged.iter().map(|m| &m.upsert).collect();
        let mut jobs = Vec::new();
        for (request, profiles) in profile_requests(&upserts) {
            if request.path == PROFILE_IMPORT {
                self.post(request.path, request.body, &self.profiles_limit)
                    .await?;
                continue;
            }
            let answer = self
                .post(request.path, request.body, &self.profile_jobs_limit)
                .await?;
            let id = serde_json::from_str::<serde_json::Value>(&answer.body)
                .ok()
                .and_then(|v| v.pointer("/data/id")?.as_str().map(str::to_string))
                .ok_or_else(|| SendError::Retryable {
                    status: None,
                    retry_after: None,
                    detail: "a profile import job was taken without an id".into(),
                    answer: None,
                })?;
            jobs.push(ProfileJob { id, profiles });
        }
        Ok(jobs)
    }

    /// Waits for a profile job to finish; returns the rows (indices into the job's
    /// profiles) Klaviyo refused, with its reason and the error it gave.
    pub(super) async fn follow(
        &self,
        job: &ProfileJob,
    ) -> Result<Vec<(usize, String, String)>, SendError> {
        let path = format!("{PROFILE_JOBS}/{}", job.id);
        let started = tokio::time::Instant::now();
        let mut pause = JOB_POLL_FIRST;
        let failed = loop {
            let answer = self.get(&path, &self.job_reads_limit).await?;
            let status: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_default();
            let attributes = &status["data"]["attributes"];
            match attributes["status"].as_str().unwrap_or_default() {
                "complete" => break attributes["failed_count"].as_u64().unwrap_or(0),
                "cancelled" | "failed" => {
                    return Err(SendError::Retryable {
                        status: None,
                        retry_after: None,
                        detail: format!("profile import job ended {}", attributes["status"]),
                        answer: Some(answer.body),
                    })
                }
                _ => {}
            }
            if started.elapsed() > PROFILE_JOB_WAIT {
                return Err(SendError::Retryable {
                    status: None,
                    retry_after: None,
                    detail: format!("profile import job {} did not finish in time", job.id),
                    answer: None,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(JOB_POLL_MAX);
        };
        let mut refused = Vec::new();
        if failed == 0 {
            return Ok(refused);
        }
        let mut next = Some(format!("{path}/import-errors"));
        while let Some(page) = next.take() {
            let answer = self.get(&page, &self.job_reads_limit).await?;
            let errors: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_default();
            for error in errors["data"].as_array().into_iter().flatten() {
                let attributes = &error["attributes"];
                let row = attributes["source"]["pointer"]
                    .as_str()
                    .and_then(row_of_pointer)
                    .filter(|&row| row < job.profiles.len());
                if let Some(row) = row {
                    let reason = format!(
                        "{}: {}",
                        attributes["code"].as_str().unwrap_or("import_error"),
                        attributes["detail"].as_str().unwrap_or_default()
                    );
                    refused.push((row, reason, error.to_string()));
                }
            }
            next = errors["links"]["next"].as_str().map(str::to_string);
        }
        Ok(refused)
    }
}

/// The row of a job's profile in an import error's `source.pointer`
/// (`/data/attributes/profiles/data/<row>/…`).
fn row_of_pointer(pointer: &str) -> Option<usize> {
    let rest = pointer.strip_prefix("/data/attributes/profiles/data/")?;
    rest.split('/').next()?.parse().ok()
}

/// `RateLimit-Remaining` and `RateLimit-Reset` (the first, tightest window's figures).
fn rate_limit_left(headers: &reqwest::header::HeaderMap) -> Option<(u32, Duration)> {
    let first = |name: &str| -> Option<u64> {
        let value = headers.get(name)?.to_str().ok()?;
        value.split([',', ';']).next()?.trim().parse().ok()
    };
    let remaining = u32::try_from(first("ratelimit-remaining")?).ok()?;
    let reset = Duration::from_secs(first("ratelimit-reset").unwrap_or(1));
    Some((remaining, reset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_headers_are_read_for_the_tightest_window() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("RateLimit-Remaining", "7, 7;w=1, 140;w=60".parse().unwrap());
        headers.insert("RateLimit-Reset", "1".parse().unwrap());
        assert_eq!(rate_limit_left(&headers), Some((7, Duration::from_secs(1))));
        headers.insert("RateLimit-Remaining", "0".parse().unwrap());
        headers.insert("RateLimit-Reset", "42".parse().unwrap());
        assert_eq!(
            rate_limit_left(&headers),
            Some((0, Duration::from_secs(42)))
        );
        assert_eq!(rate_limit_left(&reqwest::header::HeaderMap::new()), None);
    }

    #[test]
    fn import_error_pointers_name_their_row() {
        assert_eq!(
            row_of_pointer("/data/attributes/profiles/data/12/attributes/email"),
            Some(12)
        );
        assert_eq!(row_of_pointer("/data/attributes/email"), None);
    }
}
