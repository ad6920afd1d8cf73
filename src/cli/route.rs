//! `fanout route`: which destinations a message would go to and what each would receive,
//! for debugging routes without sending anything.
//!
//! The input goes through the real ingest path (validation, enrichment, the queue's
//! framing and back), so each destination sees the message exactly as the server would
//! store it — with a fresh `receivedAt` and, when the client sent none, a fresh messageId.

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::clock::Clock;
use crate::config::Config;
use crate::destinations::{DestinationConfig, Preview};
use crate::ingest::segment::{parse_batch, parse_single};
use crate::ingest::Rejection;
use crate::json::{scalar, RawObject, Scalar};
use crate::message::MessageType;
use crate::queue::record::{read_record, ReadOutcome};
use crate::routing::{Decision, Route};
use crate::tracking_plan::{TrackingPlan, Verdict, DEAD_LETTER_NAME};

/// What `fanout route` prints.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The source the input was taken as coming from.
    pub source: String,
    pub messages: Vec<MessageReport>,
}

#[derive(Debug, Serialize)]
pub struct MessageReport {
    /// The message as it would be stored (enriched; unplanned properties omitted).
    pub stored: Value,
    /// The source's tracking plan's verdict, when it has a plan.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracking_plan: Option<Verdict>,
    /// One entry per configured destination, in config order.
    pub destinations: Vec<DestinationReport>,
}

#[derive(Debug, Serialize)]
pub struct DestinationReport {
    pub destination: String,
    pub kind: &'static str,
    pub send: bool,
    /// Why not: the source's tracking plan blocked it (`tracking_plan`), a routing rule
    /// (`source`, `type`, `event`, `property`, `integrations`, `consent`) or
    /// the destination's own choice (e.g. Klaviyo's `alias_not_supported`).
    pub skipped: Option<&'static str>,
    /// Why the destination would refuse it (it would be dead-lettered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// What the destination would receive: the message after `drop_fields` / `rename`
    /// (without `sentAt` for the Segment relay), or Klaviyo's requests
    /// (`[{"path", "body"}]`); `null` when nothing is sent.
    pub payload: Value,
}

/// Runs one Segment message (with its `type`) or batch (`{"batch":[…]}`) through ingest and
/// every destination's route, at `clock`'s now. `source` defaults to the first configured
/// source.
pub fn explain(
    config: &Config,
    source: Option<&str>,
    input: &[u8],
    clock: Clock,
) -> anyhow::Result<Report> {
    let source = match source {
        Some(name) => config
            .sources
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| anyhow!("no source named `{name}` in the config"))?,
        None => config
            .sources
            .first()
            .ok_or_else(|| anyhow!("the config has no [[sources]]"))?,
    };
    let plan = match &source.tracking_plan {
        Some(file) => Some(
            TrackingPlan::load(&config.dir, file)
                .map_err(|why| anyhow!("source `{}`: tracking_plan: {why}", source.name))?,
        ),
        None => None,
    };
    let plan = plan.as_ref();
    let source = source.name.as_str();
    let stored = ingest(config, source, input, clock.now())?;
    let routes: Vec<(&DestinationConfig, Route)> = config
        .destinations
        .iter()
        .map(|d| (d, Route::new(&d.name, d.kind(), &d.route)))
        .collect();
    let mut messages = Vec::with_capacity(stored.len());
    for json in stored {
        let (json, verdict) = match plan {
            Some(plan) => {
                let mut message: Value = serde_json::from_slice(&json)?;
                let verdict = plan.apply(&mut message);
                (serde_json::to_vec(&message)?, Some(verdict))
            }
            None => (json, None),
        };
        let blocked = matches!(verdict, Some(Verdict::Blocked { .. }));
        let mut destinations = Vec::with_capacity(routes.len());
        for (config, route) in &routes {
            if blocked {
                destinations.push(DestinationReport {
                    destination: config.name.clone(),
                    kind: config.kind(),
                    send: false,
                    skipped: Some(DEAD_LETTER_NAME),
                    refused: None,
                    payload: Value::Null,
                });
                continue;
            }
            destinations.push(match route.decide(source, &json) {
                Decision::Skip(skip) => DestinationReport {
                    destination: config.name.clone(),
                    kind: config.kind(),
                    send: false,
                    skipped: Some(skip.as_str()),
                    refused: None,
                    payload: Value::Null,
                },
                Decision::Send(message) => delivered(config, source, &message, clock)?,
            });
        }
        messages.push(MessageReport {
            stored: serde_json::from_slice(&json)?,
            tracking_plan: verdict,
            destinations,
        });
    }
    Ok(Report {
        source: source.to_string(),
        messages,
    })
}

/// The input validated, enriched and framed as the server would store it; then read back.
fn ingest(
    config: &Config,
    source: &str,
    input: &[u8],
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let object = std::str::from_utf8(input)
        .ok()
        .and_then(|text| serde_json::from_str(text).ok())
        .and_then(RawObject::parse)
        .ok_or_else(|| anyhow!("input is not a JSON object"))?;
    let request = if object.get("batch").is_some() {
        parse_batch(input, &config.limits, now)
    } else {
        let kind = match object.get("type").map(scalar) {
            Some(Scalar::Str(kind)) => MessageType::parse(&kind).ok_or_else(|| {
                anyhow!("type `{kind}` is not one of identify, track, page, screen, group, alias")
            })?,
            _ => bail!("the message needs a `type` (or send a batch: {{\"batch\":[…]}})"),
        };
        parse_single(input, kind, now)
    };
    let records = request
        .and_then(|r| r.encode(source, &config.limits))
        .map_err(rejected)?;
    let mut bytes = records.bytes();
    let mut stored = Vec::with_capacity(records.len());
    loop {
        match read_record(&mut bytes).context("reading back the framed messages")? {
            ReadOutcome::Record { json, .. } => stored.push(json),
            ReadOutcome::End => return Ok(stored),
            ReadOutcome::Invalid(why) => bail!("framed message unreadable: {why}"),
        }
    }
}

fn rejected(r: Rejection) -> anyhow::Error {
    let mut at = String::new();
    if let Some(index) = r.index {
        at.push_str(&format!("batch[{index}]"));
    }
    if let Some(field) = &r.field {
        at.push_str(&format!("{}{field}", if at.is_empty() { "" } else { "." }));
    }
    if at.is_empty() {
        anyhow!("refused ({}): {}", r.code, r.message)
    } else {
        anyhow!("refused ({}) at `{at}`: {}", r.code, r.message)
    }
}

/// What `config`'s destination would make of a message routing let through.
fn delivered(
    config: &DestinationConfig,
    source: &str,
    message: &[u8],
    clock: Clock,
) -> anyhow::Result<DestinationReport> {
    let mut report = DestinationReport {
        destination: config.name.clone(),
        kind: config.kind(),
        send: true,
        skipped: None,
        refused: None,
        payload: Value::Null,
    };
    match config.settings.preview(source, message, clock)? {
        Preview::Send(payload) => report.payload = payload,
        Preview::Skip(reason) => {
            report.send = false;
            report.skipped = Some(reason);
        }
        Preview::Refuse(reason) => {
            report.send = false;
            report.refused = Some(reason);
        }
    }
    Ok(report)
}
