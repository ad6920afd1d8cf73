//! Stage 4: tracking plans — per source, the track events (and identify / group traits) a team agreed
//! to send, each a JSON Schema, in a plain file beside the config.
//!
//! A plan runs at ingest, after dedupe and before the log, so every destination sees the
//! same verdict: a blocked message is stored as a dead letter of the source instead of in
//! the log, an omitted property never reaches the log. The client's answer does not change
//! (as with Segment Protocols, a plan is not the client's problem).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use jsonschema::error::ValidationErrorKind;
use jsonschema::{PatternOptions, Validator};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use chrono::{DateTime, Utc};

use crate::delivery::DeadLetters;
use crate::message::{MessageType, Stamp, Tag};
use crate::queue::record::{read_record, ReadOutcome};
use crate::queue::{Queue, QueueError, RecordBatch};

/// The dead letters of blocked messages are filed under this name (a destination may not
/// take it), with the message's source.
pub const DEAD_LETTER_NAME: &str = "tracking_plan";

/// Most schema errors kept per message: a message of a thousand bad properties should not
/// make a dead letter of a megabyte.
const MAX_VIOLATIONS: usize = 20;

/// Largest compiled form of one `pattern` (or `patternProperties` key), in bytes: the
/// regex crate's matching time per character grows with it (its default is 10 MiB).
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// Per pattern (and thread), the most memory its lazy DFA caches; past it the engine falls
/// back to a slower, still linear, simulation.
const PATTERN_DFA_SIZE_LIMIT: usize = 2 << 20;

/// A compiled plan.
pub struct TrackingPlan {
    /// The file, as the config names it (for messages).
    file: String,
    events: HashMap<String, Schema>,
    identify: Option<Schema>,
    group: Option<Schema>,
    unplanned_events: Policy,
    violations: Policy,
    unplanned_properties: PropertyPolicy,
}

impl fmt::Debug for TrackingPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackingPlan")
            .field("file", &self.file)
            .field("events", &self.events.len())
            .finish_non_exhaustive()
    }
}

/// One schema and the properties it plans (the keys of its `properties`).
struct Schema {
    validator: Validator,
    planned: HashSet<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Policy {
    Block,
    #[default]
    Allow,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum PropertyPolicy {
    Omit,
    #[default]
    Allow,
}

/// The file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    #[serde(default)]
    events: Map<String, Value>,
    identify: Option<Value>,
    group: Option<Value>,
    #[serde(default)]
    unplanned_events: Policy,
    #[serde(default)]
    violations: Policy,
    #[serde(default)]
    unplanned_properties: PropertyPolicy,
}

/// Why a message does not match its plan: where in the message, and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// JSON pointer into the message, e.g. `/properties/revenue`.
    pub path: String,
    pub message: String,
}

/// What the plan decided for one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Goes on; `omitted` properties were removed, `violations` (allowed) were written
    /// into the message's `context.violations`.
    Deliver {
        #[serde(skip_serializing_if = "Vec::is_empty")]
        omitted: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        violations: Vec<Violation>,
    },
    /// Goes to no destination: kept as a dead letter of the source.
    Blocked { violations: Vec<Violation> },
}

impl Verdict {
    fn deliver() -> Verdict {
        Verdict::Deliver {
            omitted: Vec::new(),
            violations: Vec::new(),
        }
    }

    /// Whether the message was changed (and must be written again).
    pub fn changed(&self) -> bool {
        matches!(self, Verdict::Deliver { omitted, violations } if !omitted.is_empty() || !violations.is_empty())
    }
}

impl TrackingPlan {
    /// Reads and compiles the plan file `file`, named as the config names it (relative to
    /// `dir`, the config file's directory); an error names the file and what is wrong in it.
    pub fn load(dir: &Path, file: &Path) -> Result<TrackingPlan, String> {
        let shown = file.display().to_string();
        let text = files::read_regular(&dir.join(file), files::MAX_PLAN_BYTES)
            .map_err(|why| format!("{shown}: {why}"))?;
        TrackingPlan::parse(&text, &shown)
    }

    /// Compiles the plan in `text`; `shown` is how errors name the file. An error names
    /// the JSON pointer of what is wrong in the file.
    pub fn parse(text: &str, shown: &str) -> Result<TrackingPlan, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("{shown}: not JSON: {e}"))?;
        let file: PlanFile = serde_path_to_error::deserialize(&value).map_err(|e| {
            let at = pointer_of_path(&e.path().to_string());
            format!("{shown}: at {at}: {}", e.into_inner())
        })?;
        let compile = |pointer: String, schema: &Value| {
            compile(schema).map_err(|(at, why)| format!("{shown}: at {pointer}{at}: {why}"))
        };
        let mut events = HashMap::with_capacity(file.events.len());
        for (name, schema) in &file.events {
            let pointer = format!("/events/{}", escape_pointer(name));
            events.insert(name.clone(), compile(pointer, schema)?);
        }
        let identify = match &file.identify {
            Some(schema) => Some(compile("/identify".into(), schema)?),
            None => None,
        };
        let group = match &file.group {
            Some(schema) => Some(compile("/group".into(), schema)?),
            None => None,
        };
        Ok(TrackingPlan {
            file: shown.to_string(),
            events,
            identify,
            group,
            unplanned_events: file.unplanned_events,
            violations: file.violations,
            unplanned_properties: file.unplanned_properties,
        })
    }

    pub fn file(&self) -> &str {
        &self.file
    }

    /// Applies the plan to one message (an object with its `type`), changing it in place
    /// when properties are omitted or allowed violations flagged.
    pub fn apply(&self, message: &mut Value) -> Verdict {
        let kind = message.get("type").and_then(Value::as_str).unwrap_or("");
        let (schema, field) = match kind {
            "track" => {
                let event = message.get("event").and_then(Value::as_str).unwrap_or("");
                match self.events.get(event) {
                    Some(schema) => (schema, "properties"),
                    None if self.unplanned_events == Policy::Block => {
                        return Verdict::Blocked {
                            violations: vec![Violation {
                                path: "/event".into(),
                                message: format!("event `{event}` is not in the tracking plan"),
                            }],
                        };
                    }
                    None => return Verdict::deliver(),
                }
            }
            "identify" => match &self.identify {
                Some(schema) => (schema, "traits"),
                None => return Verdict::deliver(),
            },
            "group" => match &self.group {
                Some(schema) => (schema, "traits"),
                None => return Verdict::deliver(),
            },
            _ => return Verdict::deliver(),
        };
        let Some(object) = message.as_object_mut() else {
            return Verdict::deliver();
        };
        let mut omitted = Vec::new();
        if self.unplanned_properties == PropertyPolicy::Omit {
            if let Some(Value::Object(values)) = object.get_mut(field) {
                values.retain(|key, _| {
                    let planned = schema.planned.contains(key);
                    if !planned {
                        omitted.push(key.clone());
                    }
                    planned
                });
            }
        }
        // A missing properties object is checked as an empty one, so `required` holds.
        let empty = Value::Object(Map::new());
        let values = object.get(field).unwrap_or(&empty);
        let violations: Vec<Violation> = schema
            .validator
            .iter_errors(values)
            .take(MAX_VIOLATIONS)
            .map(|e| Violation {
                path: format!("/{field}{}", e.instance_path()),
                message: e.to_string(),
            })
            .collect();
        if !violations.is_empty() && self.violations == Policy::Block {
            return Verdict::Blocked { violations };
        }
        if !violations.is_empty() {
            flag(object, &violations);
        }
        Verdict::Deliver {
            omitted,
            violations,
        }
    }
}

/// A message the plan blocked: its type, JSON as received, and why.
pub struct Blocked {
    pub kind: MessageType,
    pub json: Vec<u8>,
    pub violations: Vec<Violation>,
}

/// Messages the plan stage cannot read: logged at most every 10 s.
static UNREADABLE_LOG: crate::throttle::LogThrottle =
    crate::throttle::LogThrottle::new(std::time::Duration::from_secs(10));

/// Applies `plan` to each record of a request: records it blocks are taken out (and
/// returned), records it changes are framed again with the same stamp.
pub fn apply_to_batch(
    plan: &TrackingPlan,
    source: &str,
    records: RecordBatch,
) -> (RecordBatch, Vec<Blocked>) {
    let mut kept = RecordBatch::with_capacity(records.bytes().len());
    let mut blocked = Vec::new();
    let bytes = records.bytes();
    for ((range, stamp), kind) in records.framed().zip(records.kinds()) {
        let json = match read_record(&mut &bytes[range]) {
            Ok(ReadOutcome::Record { json, .. }) => json,
            // Framed by ingest a moment ago: cannot happen.
            outcome => {
                if UNREADABLE_LOG.ready() {
                    tracing::error!(%source, ?outcome, "a message framed at ingest cannot be read back");
                }
                continue;
            }
        };
        let mut message = match serde_json::from_slice::<Value>(&json) {
            Ok(message) => message,
            // Ingest's depth limit keeps messages readable here; one that is not anyway is
            // kept as a dead letter saying why, never dropped.
            Err(e) => {
                if UNREADABLE_LOG.ready() {
                    tracing::warn!(%source, error = %e, "the tracking plan cannot read a message; it is kept as a dead letter");
                }
                blocked.push(Blocked {
                    kind,
                    json,
                    violations: vec![Violation {
                        path: String::new(),
                        message: format!("the tracking plan cannot read the message: {e}"),
                    }],
                });
                continue;
            }
        };
        let verdict = plan.apply(&mut message);
        let write = |out: &mut Vec<u8>, value: Option<&Value>| {
            match value {
                Some(value) => {
                    let start = out.len();
                    serde_json::to_writer(&mut *out, value).expect("a Value serializes");
                    // serde_json leaves the line separators JSON allows in strings raw.
                    crate::json::keep_on_one_line(out, start);
                }
                None => out.extend_from_slice(&json),
            }
            Ok::<_, std::convert::Infallible>(stamp)
        };
        match verdict {
            Verdict::Blocked { violations } => blocked.push(Blocked {
                kind,
                json: json.clone(),
                violations,
            }),
            verdict if verdict.changed() => {
                let _ = kept.push_with(source, kind, |out| write(out, Some(&message)));
            }
            _ => {
                let _ = kept.push_with(source, kind, |out| write(out, None));
            }
        }
    }
    (kept, blocked)
}

/// What taking blocked messages in again did.
pub struct Retaken {
    pub replayed: usize,
    pub still_blocked: usize,
}

/// Why taking blocked messages in again stopped (what was done before stays done).
pub enum RetakeError {
    /// The dead-letter store failed.
    Store(anyhow::Error),
    /// The queue did not take the messages.
    Queue(QueueError),
}

/// Messages a tracking plan blocked, taken in again after the plan was fixed: each goes
/// through its source's plan as it is now (`plan_of` a source's name); those it lets through are appended to the log
/// (with their messageIds, no dedupe key) and their letters removed, the others stay.
pub async fn retake_blocked(
    queue: &Queue,
    dead_letters: &DeadLetters,
    plan_of: impl Fn(&str) -> Option<Arc<TrackingPlan>>,
    now: DateTime<Utc>,
) -> Result<Retaken, RetakeError> {
    /// Letters read, stored (and removed) per round.
    const ROUND: usize = 500;
    let (mut replayed, mut still_blocked) = (0, 0);
    let accepted_at = now.timestamp().clamp(0, i64::from(u32::MAX)) as u32;
    let mut after = 0;
    loop {
        let page = dead_letters
            .list(Some(DEAD_LETTER_NAME), after, ROUND)
            .await
            .map_err(RetakeError::Store)?;
        let round = &page.dead_letters;
        let mut by_source: Vec<(&str, RecordBatch)> = Vec::new();
        let mut done = Vec::new();
        for letter in round {
            let mut message = match serde_json::from_str::<Value>(letter.message.get()) {
                Ok(message) => message,
                // It keeps its letter, which says why.
                Err(e) => {
                    if UNREADABLE_LOG.ready() {
                        tracing::warn!(id = letter.id, error = %e, "a blocked message cannot be read; it stays a dead letter");
                    }
                    still_blocked += 1;
                    continue;
                }
            };
            if let Some(plan) = plan_of(&letter.source) {
                if let Verdict::Blocked { .. } = plan.apply(&mut message) {
                    // It keeps its letter, with the violations it was blocked for.
                    still_blocked += 1;
                    continue;
                }
            }
            let kind = message
                .get("type")
                .and_then(Value::as_str)
                .and_then(MessageType::parse)
                .unwrap_or(MessageType::Track);
            let mut json = serde_json::to_vec(&message).expect("a Value serializes");
            crate::json::keep_on_one_line(&mut json, 0);
            let stamp = Stamp {
                tag: Tag {
                    key: [0; 3],
                    accepted_at,
                },
                user: crate::routing::user_key(&json),
            };
            let at = match by_source.iter().position(|(s, _)| *s == letter.source) {
                Some(at) => at,
                None => {
                    by_source.push((&letter.source, RecordBatch::with_capacity(64 * 1024)));
                    by_source.len() - 1
                }
            };
            let _ = by_source[at].1.push_with(&letter.source, kind, |out| {
                out.extend_from_slice(&json);
                Ok::<_, std::convert::Infallible>(stamp)
            });
            done.push(letter.id);
        }
        for (_, records) in by_source {
            replayed += records.len();
            queue.append(records).await.map_err(RetakeError::Queue)?;
        }
        // Stored first: a failure here repeats these messages at the next replay rather
        // than losing them.
        dead_letters
            .remove(done)
            .await
            .map_err(RetakeError::Store)?;
        match page.next {
            Some(next) => after = next,
            None => break,
        }
    }
    tracing::info!(replayed, still_blocked, "blocked messages replayed");
    Ok(Retaken {
        replayed,
        still_blocked,
    })
}

/// Writes allowed violations into `context.violations`, where a destination (or whoever
/// reads the warehouse) can find them.
fn flag(message: &mut Map<String, Value>, violations: &[Violation]) {
    let context = message
        .entry("context")
        .or_insert_with(|| Value::Object(Map::new()));
    if !context.is_object() {
        *context = Value::Object(Map::new());
    }
    let list: Vec<Value> = violations
        .iter()
        .map(|v| serde_json::json!({ "type": "tracking_plan", "path": v.path, "message": v.message }))
        .collect();
    context
        .as_object_mut()
        .expect("made an object above")
        .insert("violations".into(), Value::Array(list));
}

/// Compiles one schema (checked against its meta-schema); an error is the pointer inside
/// the schema and why.
fn compile(schema: &Value) -> Result<Schema, (String, String)> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err((String::new(), "a schema is a JSON object".into()));
    }
    // The regex crate's engine matches in time linear in the string; fancy-regex (the
    // default) backtracks: `^(a|aa)+(?!b)$` cost ~30 ms of a worker per message.
    let validator = jsonschema::options()
        .with_pattern_options(
            PatternOptions::regex()
                .size_limit(PATTERN_SIZE_LIMIT)
                .dfa_size_limit(PATTERN_DFA_SIZE_LIMIT),
        )
        .build(schema)
        .map_err(|e| {
            let why = match e.kind() {
                ValidationErrorKind::Format { format } if format == "regex" => format!(
                    "{e}: a plan's patterns must run in linear time, so lookaround ((?=, (?!, \
                     (?<=, (?<!) and backreferences (\\1, \\k<name>) are refused, as is a \
                     pattern that compiles to more than {} MiB",
                    PATTERN_SIZE_LIMIT >> 20
                ),
                _ => e.to_string(),
            };
            (e.instance_path().to_string(), why)
        })?;
    let planned = schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    Ok(Schema { validator, planned })
}

/// `events.Order Completed` (serde's path) as a JSON pointer.
fn pointer_of_path(path: &str) -> String {
    if path == "." || path.is_empty() {
        return String::new();
    }
    path.split('.')
        .map(|part| format!("/{}", escape_pointer(part)))
        .collect()
}

fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

mod blocking;
mod files;
#[cfg(test)]
mod tests;

pub use blocking::apply_to_batch_off_workers;
