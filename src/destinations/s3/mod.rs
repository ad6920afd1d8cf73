//! `kind = "s3"`: an archive of every message in Segment's S3 layout, on any S3-compatible
//! service: `<prefix>/<source>/<received day ms>/<time>-<digest>.gz`, gzipped JSON lines
//! of the messages as stored (`layout`). A batch becomes one object per (source, day),
//! each written whole (`store`); its messages are settled only once S3 has it.

mod layout;
mod store;

use std::net::IpAddr;

use serde::Deserialize;

use super::{
    check_url, http, secret_from_env, AnyDestination, BatchShape, Destination, DestinationConfig,
    KeyError, Kind, Outgoing, Preview, Refusal, RefusalKind, SendError, Sending,
};
use crate::clock::Clock;
use crate::queue::Checkpoint;
use store::Store;

/// S3's part sizes: 5 MiB (but for the last) to 5 GiB, 10 000 parts at most; 16 MiB
/// parts cover objects up to 160 GiB, far past any batch (`batch.max_bytes` ≤ 256 MiB).
const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
const DEFAULT_PART_SIZE: usize = 16 * 1024 * 1024;
const MAX_PART_SIZE: usize = 5 * 1024 * 1024 * 1024;
/// Batches of at least this many bytes are compressed off the delivery threads.
const COMPRESS_APART: usize = 1024 * 1024;

/// `kind = "s3"`'s own keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The bucket written to.
    pub bucket: String,
    /// The service's URL, e.g. `https://s3.eu-west-1.amazonaws.com` or a MinIO's.
    pub endpoint: String,
    /// The region requests are signed for (SigV4), e.g. `eu-west-1`.
    pub region: String,
    /// Environment variable with the access key id.
    pub access_key_id_env: String,
    /// Environment variable with the secret access key.
    pub secret_access_key_env: String,
    /// Environment variable with a session token (temporary credentials), if any.
    pub session_token_env: Option<String>,
    /// Folder of the archive in the bucket (default `segment-logs`, Segment's).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// `https://endpoint/bucket/key` rather than `https://bucket.endpoint/key`; default
    /// true when the endpoint's host is an IP address or `localhost`.
    pub path_style: Option<bool>,
    /// Objects larger than this many bytes (compressed) are uploaded in parts of this
    /// size (default 16 MiB; S3 takes 5 MiB to 5 GiB).
    #[serde(default = "default_part_size")]
    pub part_size: usize,
}

fn default_prefix() -> String {
    "segment-logs".into()
}

fn default_part_size() -> usize {
    DEFAULT_PART_SIZE
}

impl S3Config {
    fn endpoint_url(&self) -> Result<url::Url, KeyError> {
        check_url("endpoint", &self.endpoint)?;
        let url = url::Url::parse(&self.endpoint)
            .map_err(|_| KeyError::new("endpoint", "is not an http(s) URL"))?;
        if url.host_str().is_none() {
            return Err(KeyError::new("endpoint", "has no host"));
        }
        Ok(url)
    }

    /// Path style unless set: virtual-hosted names (`bucket.host`) need a DNS name.
    fn path_style(&self, endpoint: &url::Url) -> bool {
        self.path_style.unwrap_or_else(|| {
            let host = endpoint.host_str().unwrap_or_default();
            host == "localhost" || host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok()
        })
    }

    fn bucket(&self) -> anyhow::Result<rusty_s3::Bucket> {
        let endpoint = self.endpoint_url().map_err(|e| anyhow::anyhow!("{e}"))?;
        let style = match self.path_style(&endpoint) {
            true => rusty_s3::UrlStyle::Path,
            false => rusty_s3::UrlStyle::VirtualHost,
        };
        rusty_s3::Bucket::new(endpoint, style, self.bucket.clone(), self.region.clone())
            .map_err(|e| anyhow::anyhow!("`bucket` with `endpoint`: {e}"))
    }

    /// The object `message` would be archived in were it a batch on its own.
    fn object_key(&self, source: &str, message: &[u8], clock: Clock) -> String {
        let one = [Outgoing {
            source,
            json: message,
            prepared: None,
        }];
        let group = &layout::group(&one, clock.now())[0];
        let lines = layout::lines(&one, group);
        layout::folder(&self.prefix, source, group.day_ms)
            + &layout::file_name(group.first_ms, &lines)
    }
}

impl Kind for S3Config {
    const NAME: &'static str = "s3";
    const HTTP: bool = true;

    fn validate(&self) -> Result<(), KeyError> {
        let endpoint = self.endpoint_url()?;
        let bucket_name = (3..=63).contains(&self.bucket.len())
            && self
                .bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
        if !bucket_name {
            return Err(KeyError::new(
                "bucket",
                "bucket names are 3-63 characters of a-z 0-9 - .",
            ));
        }
        if self.region.is_empty() {
            return Err(KeyError::new("region", "must not be empty"));
        }
        for (key, var) in [
            ("access_key_id_env", Some(&self.access_key_id_env)),
            ("secret_access_key_env", Some(&self.secret_access_key_env)),
            ("session_token_env", self.session_token_env.as_ref()),
        ] {
            if var.is_some_and(|v| v.is_empty()) {
                return Err(KeyError::new(key, "must name an environment variable"));
            }
        }
        let plain = self
            .prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.=/".contains(&b));
        if !plain
            || self
                .prefix
                .split('/')
                .any(|part| part == "." || part == "..")
        {
            return Err(KeyError::new(
                "prefix",
                "prefixes are / separated A-Z a-z 0-9 _ - . = without . or .. folders",
            ));
        }
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size) {
            return Err(KeyError::new(
                "part_size",
                "must be 5242880 to 5368709120 (S3's part sizes)",
            ));
        }
        if !self.path_style(&endpoint)
            && endpoint
                .host_str()
                .is_some_and(|h| h.parse::<IpAddr>().is_ok() || h.starts_with('['))
        {
            return Err(KeyError::new(
                "path_style",
                "must be true with an IP address endpoint (no bucket.host name)",
            ));
        }
        Ok(())
    }

    fn batch_shape(&self) -> BatchShape {
        // One object per batch and day: few large objects, as Segment writes them.
        BatchShape::new(100_000, 64 * 1024 * 1024, 60_000)
    }

    fn build(
        &self,
        config: &DestinationConfig,
        _: Option<Checkpoint>,
        clock: Clock,
    ) -> anyhow::Result<AnyDestination> {
        Ok(Box::new(S3Destination::new(config, self, clock)?))
    }

    /// The object it would be archived in (as a batch of one) and its line.
    fn preview_from(&self, source: &str, message: &[u8], clock: Clock) -> anyhow::Result<Preview> {
        Ok(Preview::Send(serde_json::json!({
            "bucket": self.bucket,
            "key": self.object_key(source, message, clock),
            "line": serde_json::from_slice::<serde_json::Value>(message)?,
        })))
    }
}

pub struct S3Destination {
    store: Store,
    prefix: String,
    clock: Clock,
}

impl S3Destination {
    pub fn new(config: &DestinationConfig, own: &S3Config, clock: Clock) -> anyhow::Result<Self> {
        let name = &config.name;
        let key = secret_from_env(name, "access_key_id_env", &own.access_key_id_env)?;
        let secret = secret_from_env(name, "secret_access_key_env", &own.secret_access_key_env)?;
        let credentials = match &own.session_token_env {
            Some(var) => rusty_s3::Credentials::new_with_token(
                key,
                secret,
                secret_from_env(name, "session_token_env", var)?,
            ),
            None => rusty_s3::Credentials::new(key, secret),
        };
        let bucket = own
            .bucket()
            .map_err(|e| anyhow::anyhow!("destination `{name}`: {e}"))?;
        Ok(S3Destination {
            store: Store {
                client: http::client(config.timeout())?,
                bucket,
                credentials,
                part_size: own.part_size,
                clock,
            },
            prefix: own.prefix.clone(),
            clock,
        })
    }
}

impl Destination for S3Destination {
    /// Uploads one object per (source, day) group. A group S3 refuses (credentials,
    /// bucket) is dead-lettered on its own, without splitting: its content is not at
    /// fault. Any retryable failure retries the batch; the groups already stored are
    /// written again under the same names, so no message is archived twice.
    fn send<'a>(&'a self, batch: &'a [Outgoing<'a>]) -> Sending<'a> {
        Box::pin(async move {
            let mut refused = Vec::new();
            for group in layout::group(batch, self.clock.now()) {
                let lines = layout::lines(batch, &group);
                let key = layout::folder(&self.prefix, group.source, group.day_ms)
                    + &layout::file_name(group.first_ms, &lines);
                let body = if lines.len() < COMPRESS_APART {
                    layout::gzip(&lines)
                } else {
                    tokio::task::spawn_blocking(move || layout::gzip(&lines))
                        .await
                        .map_err(|e| SendError::io(std::io::Error::other(e)))?
                };
                match self.store.put(&key, body).await {
                    Ok(()) => {}
                    Err(SendError::Rejected {
                        status,
                        detail,
                        answer,
                    }) => refused.extend(group.indices.iter().map(|&index| Refusal {
                        index,
                        kind: RefusalKind::Refused,
                        status: Some(status),
                        detail: detail.clone(),
                        answer: answer.clone(),
                    })),
                    Err(e) => return Err(e),
                }
            }
            if refused.is_empty() {
                Ok(0)
            } else {
                Err(SendError::PartlyRejected { refused })
            }
        })
    }
}

#[cfg(test)]
mod tests;
