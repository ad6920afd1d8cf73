//! `[cors]` and `[browser]`: what the HTTP surface tells browsers.

use std::time::Duration;

use serde::Deserialize;

/// Cross-origin access for browser traffic.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Allowed origins; `["*"]` (the default) allows any, echoing the request's origin.
    #[serde(default = "default_allowed_origins")]
    pub allowed_origins: Vec<String>,
    /// How long a browser may cache a preflight answer, e.g. "24h" (whole seconds:
    /// `Access-Control-Max-Age` carries seconds).
    #[serde(default = "default_cors_max_age", with = "humantime_serde")]
    pub max_age: Duration,
}

/// `[browser]`: where `GET /v1/projects/{writeKey}/settings` sends the browser library.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrowserConfig {
    /// `host[:port]` the library sends to (`/v1` is added); default: the request's Host
    /// (`X-Forwarded-Host` from a trusted proxy), and then the answer is never cached.
    pub api_host: Option<String>,
    /// `http` or `https`; default: `X-Forwarded-Proto` from a trusted proxy, else `http`.
    pub protocol: Option<String>,
}

fn default_allowed_origins() -> Vec<String> {
    vec!["*".to_string()]
}
const fn default_cors_max_age() -> Duration {
    Duration::from_secs(24 * 3600)
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            allowed_origins: default_allowed_origins(),
            max_age: default_cors_max_age(),
        }
    }
}
