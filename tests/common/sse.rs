//! The live view's stream (`GET /debugger/events`), read by tests.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::Fanout;

/// A Server-Sent Events stream read a chunk at a time.
pub struct Sse {
    response: reqwest::Response,
    buffer: String,
}

impl Sse {
    /// `GET /debugger/events?{query}` with the admin `token`.
    pub async fn open(f: &Fanout, token: &str, query: &str) -> Sse {
        // Not `client()`: its 30 s limit on a whole request would cut a long test's
        // stream; each read here has its own deadline instead.
        let stream_client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let response = stream_client
            .get(f.url(&format!("/debugger/events?{query}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let mut sse = Sse {
            response,
            buffer: String::new(),
        };
        // The greeting comes first: the subscription exists from here on.
        sse.fill(Instant::now() + Duration::from_secs(5)).await;
        sse
    }

    async fn fill(&mut self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.response.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                self.buffer.push_str(&String::from_utf8_lossy(&chunk));
                true
            }
            _ => false,
        }
    }

    /// The next `data:` event, within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                for line in block.lines() {
                    if let Some(data) = line.strip_prefix("data: ") {
                        return Some(serde_json::from_str(data).expect("an event's JSON"));
                    }
                }
            }
            if !self.fill(deadline).await {
                return None;
            }
        }
    }

    /// Events until one matches `wanted` (all of them, that one last).
    pub async fn until(&mut self, wanted: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        while let Some(event) = self.next(Duration::from_secs(10)).await {
            let done = wanted(&event);
            seen.push(event);
            if done {
                return seen;
            }
        }
        panic!("the awaited event never came; saw {seen:#?}");
    }
}
