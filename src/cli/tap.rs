//! `fanout tap`: the live view (`GET /debugger/events`) of a running fanout as JSON lines
//! on standard output, like `vector tap`. The server's address comes from `--url`, else
//! the config (`[admin] listen`, else `server.listen`); the token from `admin.token_env`.

use std::io::Write;

use anyhow::Context as _;

use crate::config::Config;
use crate::live::Filter;

pub async fn tap(config: &Config, url: Option<&str>, filter: &Filter) -> anyhow::Result<()> {
    let var = config
        .admin
        .token_env
        .as_deref()
        .context("tap needs the admin token: set admin.token_env in the config")?;
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
    let query: Vec<String> = [
        ("source", &filter.source),
        ("destination", &filter.destination),
        ("type", &filter.message_type),
    ]
    .into_iter()
    .filter_map(|(key, value)| value.as_deref().map(|v| format!("{key}={}", escape(v))))
    .collect();
    let mut response = reqwest::Client::new()
        .get(format!("{address}/debugger/events?{}", query.join("&")))
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("cannot reach fanout at {address}"))?;
    if !response.status().is_success() {
        anyhow::bail!(
            "fanout at {address} answered {}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    let mut pending = String::new();
    let stdout = std::io::stdout();
    while let Some(chunk) = response.chunk().await? {
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                let mut out = stdout.lock();
                writeln!(out, "{data}")?;
                out.flush()?;
            }
        }
    }
    Ok(())
}

/// Percent-encodes a query value.
fn escape(value: &str) -> String {
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
