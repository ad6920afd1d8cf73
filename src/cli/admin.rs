//! Talking to a running fanout's operator endpoints, for the commands that act on its
//! state (`tap`, `replay`, re-taking blocked messages): the address comes from `--url`,
//! else the config (`[admin] listen`, else `server.listen`); the token from
//! `admin.token_env`.

use anyhow::Context as _;

use crate::config::Config;

/// A running fanout's address and admin token.
pub struct Server {
    pub address: String,
    token: String,
}

impl Server {
    pub fn new(config: &Config, url: Option<&str>) -> anyhow::Result<Server> {
        let var = config.admin.token_env.as_deref().context(
            "this needs the admin token of the running fanout: set admin.token_env in the config",
        )?;
        let token =
            std::env::var(var).with_context(|| format!("{var} (admin.token_env) is not set"))?;
        let address = match url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => {
                let mut address = config.admin.listen.unwrap_or(config.server.listen);
                if address.ip().is_unspecified() {
                    address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                format!("http://{address}")
            }
        };
        Ok(Server { address, token })
    }

    /// Sends `method` to `path` (with its query) and returns the answer when it is a
    /// success; otherwise an error with the status and the answer's body.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> anyhow::Result<reqwest::Response> {
        self.send_body(method, path, None).await
    }

    /// `send`, with `body` as JSON when there is one.
    pub async fn send_body(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<reqwest::Response> {
        let mut request = reqwest::Client::new()
            .request(method, format!("{}{path}", self.address))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach fanout at {}", self.address))?;
        if !response.status().is_success() {
            anyhow::bail!(
                "fanout at {} answered {}: {}",
                self.address,
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        Ok(response)
    }

    /// POSTs to `path` and returns the JSON answer as text.
    pub async fn post(&self, path: &str) -> anyhow::Result<String> {
        let response = self.send(reqwest::Method::POST, path).await?;
        Ok(response.text().await?)
    }
}

/// Percent-encodes a query value.
pub fn escape(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
