//! `fanout regulations add|list|remove`: privacy regulations, made and read through a
//! running fanout's `/admin/regulations` (its store is the server's: SQLite it holds
//! open, or the KV bucket every instance watches).

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::admin::{escape, Server};
use super::output::line;
use crate::config::Config;

#[derive(Subcommand)]
pub enum Action {
    /// Make a regulation and print it as JSON: `suppress` drops the subject's new
    /// messages (answered 200), `suppress_with_delete` also asks every destination to
    /// delete what it holds or sent of it, `unsuppress` lifts a suppression.
    Add {
        /// suppress, suppress_with_delete or unsuppress.
        #[arg(long = "type", value_name = "TYPE")]
        kind: String,
        #[command(flatten)]
        subject: SubjectArgs,
        /// The server, e.g. `http://10.0.0.5:8088` (default: from the config).
        #[arg(long)]
        url: Option<String>,
    },
    /// Print every regulation as a JSON line, oldest first, with each destination's
    /// deletion report.
    List {
        #[arg(long)]
        url: Option<String>,
    },
    /// Take a regulation back by its id (a suppression removed no longer holds).
    Remove {
        id: String,
        #[arg(long)]
        url: Option<String>,
    },
}

/// Exactly one subject.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct SubjectArgs {
    #[arg(long)]
    user_id: Option<String>,
    #[arg(long)]
    anonymous_id: Option<String>,
    #[arg(long)]
    email: Option<String>,
}

/// Runs `action` against the running fanout.
pub async fn run(config: &Config, action: &Action) -> anyhow::Result<()> {
    match action {
        Action::Add { kind, subject, url } => {
            let mut body = json!({ "type": kind });
            for (field, value) in [
                ("userId", &subject.user_id),
                ("anonymousId", &subject.anonymous_id),
                ("email", &subject.email),
            ] {
                if let Some(value) = value {
                    body[field] = json!(value);
                }
            }
            let server = Server::new(config, url.as_deref())?;
            let response = server
                .send_body(reqwest::Method::POST, "/admin/regulations", Some(&body))
                .await?;
            line(response.text().await?)
        }
        Action::List { url } => {
            let server = Server::new(config, url.as_deref())?;
            let response = server
                .send(reqwest::Method::GET, "/admin/regulations")
                .await?;
            let answer: Value = serde_json::from_str(&response.text().await?)?;
            for regulation in answer["regulations"].as_array().into_iter().flatten() {
                line(regulation)?;
            }
            Ok(())
        }
        Action::Remove { id, url } => {
            let server = Server::new(config, url.as_deref())?;
            let path = format!("/admin/regulations/{}", escape(id));
            let response = server.send(reqwest::Method::DELETE, &path).await?;
            line(response.text().await?)
        }
    }
}
