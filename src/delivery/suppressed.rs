//! Privacy suppressions at delivery: a suppressed subject's messages still in the log,
//! or sent again by a replay, are settled without a send (counted skipped, reason
//! `suppressed`). Checked after identity enrichment, so an anonymous message filled with
//! a suppressed userId is caught too.

use super::context::DeliveryContext;
use super::live_view::tell_skipped;
use crate::metrics::DeliveryMetrics;

/// Which of `messages` (source, JSON) may go on: false for a suppressed subject's.
pub(super) fn screen<'a>(
    context: &DeliveryContext,
    metrics: &DeliveryMetrics,
    messages: impl ExactSizeIterator<Item = (&'a str, &'a [u8])>,
) -> Vec<bool> {
    let suppressed = context.suppression.load();
    if suppressed.is_empty() {
        return vec![true; messages.len()];
    }
    messages
        .map(|(source, json)| {
            if !suppressed.matches(json) {
                return true;
            }
            metrics.skipped.increment(1);
            if crate::live::watching() {
                // As routing's skips: the summary, not the message.
                tell_skipped(context, source, json, "suppressed");
            }
            false
        })
        .collect()
}
