//! What the live view is told of a destination's messages: delivered, retried, skipped,
//! dead-lettered, each with what was sent.

use serde_json::json;

use super::context::DeliveryContext;
use crate::queue::dead_letters::Failure;

/// Tells the live view what became of messages (each `(source, json)`) at this
/// destination, with what it was sent.
pub(super) fn tell<'a>(
    context: &DeliveryContext,
    kind: &'static str,
    messages: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    fields: serde_json::Value,
) {
    if !crate::live::watching() {
        return;
    }
    for (source, json) in messages {
        let mut fields = fields.clone();
        fields["source"] = json!(source);
        tell_message(context, kind, json, fields);
    }
}

/// A message the destination's routing passed over, for the live view (`why`: the rule).
pub(super) fn tell_skipped(context: &DeliveryContext, source: &str, json: &[u8], why: &str) {
    let (mut fields, message_type) = crate::live::summary(json);
    fields["reason"] = json!(why);
    crate::live::publish(
        "skipped",
        Some(source),
        Some(&context.name),
        message_type,
        fields,
        None,
    );
}

pub(super) fn tell_message(
    context: &DeliveryContext,
    kind: &'static str,
    json: &[u8],
    mut fields: serde_json::Value,
) {
    let (summary, message_type) = crate::live::summary(json);
    fields["messageId"] = summary["messageId"].clone();
    fields["event"] = summary["event"].clone();
    // What was sent: the message as it is, unless the destination translates it.
    let raw = match context.destination.live_payload(json) {
        Some(payload) => {
            fields["payload"] = payload;
            None
        }
        None => Some(("payload", json)),
    };
    let source = fields["source"].as_str().map(str::to_string);
    crate::live::publish(
        kind,
        source.as_deref(),
        Some(&context.name),
        message_type,
        fields,
        raw,
    );
}

/// A dead letter's reason for the live view.
pub(super) fn failure_fields(failure: &Failure) -> serde_json::Value {
    json!({"reason": failure.reason.as_str(), "status": failure.status, "response": failure.response})
}
