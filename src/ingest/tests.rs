//! Properties of what ingest stores, whichever API took the message.
#![allow(clippy::disallowed_methods)] // tests read the system clock freely

use chrono::Utc;
use proptest::prelude::*;
use serde_json::Value;

use super::LimitsConfig;
use crate::json::{breaks_lines, testgen};
use crate::message::MessageType;
use crate::queue::record::{read_record, ReadOutcome};
use crate::queue::RecordBatch;

fn stored(records: &RecordBatch) -> Vec<String> {
    let mut bytes = records.bytes();
    let mut out = Vec::new();
    while let ReadOutcome::Record { json, .. } = read_record(&mut bytes).unwrap() {
        out.push(String::from_utf8(json).expect("stored as UTF-8"));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Nested values with any whitespace between their tokens and any line separator in
    /// their strings are stored as exactly one line, and read back as the client's values.
    #[test]
    fn a_stored_message_is_one_line_of_the_clients_values(
        properties in testgen::object(false),
        context in testgen::object(false),
        space in prop::sample::select(vec!["\n", "\r", "\r\n", "\t", "\n\r\t "]),
        api in 0..3,
    ) {
        let message = format!(
            "{{{space}\"userId\":{space}\"u\u{2028}\",\"event\":\"E\u{85}\",{space}\
             \"properties\":{space}{properties}{space},\"type\":\"track\"{space}}}"
        );
        let limits = LimitsConfig::default();
        let mut records = RecordBatch::with_capacity(1024);
        match api {
            0 => {
                records = super::segment::parse_single(message.as_bytes(), MessageType::Track, Utc::now())
                    .unwrap()
                    .encode("s", &limits)
                    .unwrap();
            }
            1 => {
                let body = format!("{{\"batch\":[{space}{message}{space}],{space}\"context\":{context}}}");
                records = super::segment::parse_batch(body.as_bytes(), &limits, Utc::now())
                    .unwrap()
                    .encode("s", &limits)
                    .unwrap();
            }
            _ => {
                let body = format!("{{\"batch\":[{message}]}}");
                let items = super::seed::parse_event_batch(body.as_bytes(), &limits).unwrap();
                let report = super::seed::encode_event_batch(&items, "s", Utc::now(), &limits, &mut records);
                prop_assert!(report[0].success, "{:?}", report[0]);
            }
        }
        let stored = stored(&records);
        prop_assert_eq!(stored.len(), 1);
        prop_assert!(!breaks_lines(&stored[0]), "{:?}", stored[0]);
        let stored: Value = serde_json::from_str(&stored[0]).unwrap();
        let sent: Value = serde_json::from_str(&message).unwrap();
        prop_assert_eq!(&stored["properties"], &sent["properties"]);
        prop_assert_eq!(&stored["userId"], &sent["userId"]);
        prop_assert_eq!(&stored["event"], &sent["event"]);
        if api == 1 {
            let context: Value = serde_json::from_str(&context).unwrap();
            prop_assert_eq!(&stored["context"], &context);
        }
    }
}
