//! The shared backend: one Redis hash per anonymousId (`u`, `e`, `p`), written with
//! `HSET` (so lessons merge) and given the TTL again each time it is taught. A batch's
//! lessons, or lookups, cost one pipelined round trip.

use std::time::Duration;

use super::message::{Known, Lesson};
use crate::dedupe::SharedConnection;

pub struct RedisIdentities {
    connection: SharedConnection,
    prefix: String,
    ttl_ms: u64,
}

impl RedisIdentities {
    pub fn new(url: &str, prefix: &str, ttl: Duration) -> anyhow::Result<RedisIdentities> {
        Ok(RedisIdentities {
            connection: SharedConnection::new(url, "identity.redis_url")?,
            prefix: prefix.to_string(),
            ttl_ms: ttl.as_millis().max(1) as u64,
        })
    }

    fn name(&self, anonymous_id: &str) -> String {
        format!("{}{anonymous_id}", self.prefix)
    }

    pub async fn learn(&self, lessons: &[Lesson]) -> redis::RedisResult<()> {
        if lessons.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for lesson in lessons {
            let key = self.name(&lesson.anonymous_id);
            let known = &lesson.known;
            let fields: Vec<(&str, &str)> = [
                ("u", known.user_id.as_deref()),
                ("e", known.email.as_deref()),
                ("p", known.phone.as_deref()),
            ]
            .into_iter()
            .filter_map(|(field, value)| value.map(|v| (field, v)))
            .collect();
            pipe.cmd("HSET").arg(&key).arg(&fields).ignore();
            pipe.cmd("PEXPIRE").arg(&key).arg(self.ttl_ms).ignore();
        }
        let mut connection = self.connection.get().await?;
        pipe.query_async::<()>(&mut connection).await
    }

    pub async fn lookup(&self, anonymous_ids: &[&str]) -> redis::RedisResult<Vec<Option<Known>>> {
        if anonymous_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in anonymous_ids {
            pipe.cmd("HMGET").arg(self.name(id)).arg(&["u", "e", "p"]);
        }
        let mut connection = self.connection.get().await?;
        type Fields = (Option<String>, Option<String>, Option<String>);
        let replies: Vec<Fields> = pipe.query_async(&mut connection).await?;
        Ok(replies
            .into_iter()
            .map(|(user_id, email, phone)| {
                let known = Known {
                    user_id,
                    email,
                    phone,
                };
                (!known.is_empty()).then_some(known)
            })
            .collect())
    }
}
