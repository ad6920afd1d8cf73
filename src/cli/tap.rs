//! `fanout tap`: the live view (`GET /debugger/events`) of a running fanout as JSON lines
//! on standard output, like `vector tap`. The server's address comes from `--url`, else
//! the config (`[admin] listen`, else `server.listen`); the token from `admin.token_env`.

use super::admin::{escape, Server};
use super::output;
use crate::config::Config;
use crate::live::Filter;

pub async fn tap(config: &Config, url: Option<&str>, filter: &Filter) -> anyhow::Result<()> {
    let server = Server::new(config, url)?;
    let query: Vec<String> = [
        ("source", &filter.source),
        ("destination", &filter.destination),
        ("type", &filter.message_type),
    ]
    .into_iter()
    .filter_map(|(key, value)| value.as_deref().map(|v| format!("{key}={}", escape(v))))
    .collect();
    let path = format!("/debugger/events?{}", query.join("&"));
    let mut response = server.send(reqwest::Method::GET, &path).await?;
    let mut pending = String::new();
    while let Some(chunk) = response.chunk().await? {
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                output::line(data)?;
            }
        }
    }
    Ok(())
}
