//! Event time: parsing what clients send and correcting client clock skew.

use chrono::{DateTime, Datelike, NaiveDateTime, SecondsFormat, TimeDelta, Timelike, Utc};

/// Parses the date-times real clients send: RFC 3339 with `Z` or an offset and any
/// fraction length (Go sends nanoseconds); a missing offset is read as UTC. Years outside
/// 0000-9999 are refused: RFC 3339 cannot write them, so no consumer could read them back.
pub fn parse(s: &str) -> Option<DateTime<Utc>> {
    let t = match DateTime::parse_from_rfc3339(s) {
        Ok(t) => t.with_timezone(&Utc),
        Err(_) => ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
            .iter()
            .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())?
            .and_utc(),
    };
    (0..=9999).contains(&t.year()).then_some(t)
}

/// Segment's rule: `timestamp = receivedAt − (sentAt − originalTimestamp)`. The offset
/// between the client's send time and our receive time is the client's clock skew.
///
/// Clamped to [1970-01-01T00:00:00Z, `received_at`]: an event cannot have happened after
/// it arrived (a `sentAt` before the event's own time is a broken clock, not a delay),
/// and a correction reaching before the Unix epoch (year 0000 sent in year 9999, say)
/// is a broken clock too; unclamped it wrote years no consumer reads.
pub fn corrected(
    received_at: DateTime<Utc>,
    sent_at: DateTime<Utc>,
    original: DateTime<Utc>,
) -> DateTime<Utc> {
    let in_queue: TimeDelta = sent_at - original;
    if in_queue <= TimeDelta::zero() {
        return received_at;
    }
    received_at
        .checked_sub_signed(in_queue)
        .map_or(DateTime::UNIX_EPOCH, |t| t.max(DateTime::UNIX_EPOCH))
        .min(received_at)
}

/// The one format fanout writes: RFC 3339, UTC, milliseconds.
pub fn format(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Appends `format(t)` as a JSON string, without the intermediate `String`
/// (this runs for every message).
pub fn write_json(out: &mut Vec<u8>, t: DateTime<Utc>) {
    let year = t.year();
    if !(0..=9999).contains(&year) {
        out.push(b'"');
        out.extend_from_slice(format(t).as_bytes());
        out.push(b'"');
        return;
    }
    let millis = t.timestamp_subsec_millis().min(999);
    let fields = [
        (year as u32, 4, b'-'),
        (t.month(), 2, b'-'),
        (t.day(), 2, b'T'),
        (t.hour(), 2, b':'),
        (t.minute(), 2, b':'),
        (t.second(), 2, b'.'),
        (millis, 3, b'Z'),
    ];
    out.push(b'"');
    for (value, width, separator) in fields {
        let mut digits = [b'0'; 4];
        let mut v = value;
        for d in digits[..width].iter_mut().rev() {
            *d = b'0' + (v % 10) as u8;
            v /= 10;
        }
        out.extend_from_slice(&digits[..width]);
        out.push(separator);
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_client_variants() {
        let want = parse("2024-01-02T03:04:05.678Z").unwrap();
        assert_eq!(parse("2024-01-02T03:04:05.678+00:00"), Some(want));
        assert_eq!(parse("2024-01-02T05:04:05.678+02:00"), Some(want));
        assert_eq!(parse("2024-01-02T03:04:05.678000000Z"), Some(want));
        assert_eq!(parse("2024-01-02T03:04:05.678"), Some(want));
        assert_eq!(
            format(parse("2024-01-02T03:04:05.123456789Z").unwrap()),
            "2024-01-02T03:04:05.123Z"
        );
        assert_eq!(parse("yesterday"), None);
        assert_eq!(parse("2024-13-02T03:04:05Z"), None);
    }

    #[test]
    fn writes_json_like_format() {
        for s in [
            "2024-01-02T03:04:05.678Z",
            "0001-01-01T00:00:00.000Z",
            "9999-12-31T23:59:59.999Z",
            "2024-01-02T03:04:05.000000999Z",
        ] {
            let t = parse(s).unwrap();
            let mut out = Vec::new();
            write_json(&mut out, t);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("\"{}\"", format(t))
            );
        }
    }

    #[test]
    fn refuses_years_rfc_3339_cannot_write() {
        assert!(parse("0000-01-01T00:00:00Z").is_some());
        assert!(parse("9999-12-31T23:59:59.999Z").is_some());
        assert_eq!(parse("+10000-01-01T00:00:00"), None);
        assert_eq!(parse("-0001-01-01T00:00:00"), None);
        // An offset that carries the instant past the range.
        assert_eq!(parse("9999-12-31T23:00:00-02:00"), None);
    }

    #[test]
    fn clamps_the_correction() {
        let received = parse("2026-01-01T00:00:00Z").unwrap();
        let year_0 = parse("0000-01-01T00:00:00Z").unwrap();
        let year_9999 = parse("9999-12-31T00:00:00Z").unwrap();
        assert_eq!(
            format(corrected(received, year_9999, year_0)),
            "1970-01-01T00:00:00.000Z"
        );
        // Sent before it happened: it happened when it arrived, not in the future.
        assert_eq!(corrected(received, year_0, year_9999), received);
        let t = parse("2025-12-31T23:59:00Z").unwrap();
        assert_eq!(corrected(received, t, t), received);
    }

    #[test]
    fn corrects_skew() {
        // The client's clock is 10 minutes fast; the event happened 2 s before sending.
        let original = parse("2024-01-01T00:10:00Z").unwrap();
        let sent = parse("2024-01-01T00:10:02Z").unwrap();
        let received = parse("2024-01-01T00:00:03Z").unwrap();
        assert_eq!(
            format(corrected(received, sent, original)),
            "2024-01-01T00:00:01.000Z"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Milliseconds from 0000-01-01 to 9999-12-31T23:59:59.999Z.
        fn instant() -> impl Strategy<Value = DateTime<Utc>> {
            (-62_167_219_200_000i64..253_402_300_800_000)
                .prop_map(|ms| DateTime::from_timestamp_millis(ms).expect("in range"))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn what_is_written_reads_back(t in instant()) {
                let written = format(t);
                prop_assert_eq!(parse(&written), Some(t));
                let mut json = Vec::new();
                write_json(&mut json, t);
                prop_assert_eq!(String::from_utf8(json).unwrap(), format!("\"{written}\""));
            }

            #[test]
            fn any_text_parses_or_not_without_panic_and_in_range(text in "\\PC{0,40}") {
                if let Some(t) = parse(&text) {
                    prop_assert!((0..=9999).contains(&t.year()));
                }
            }

            #[test]
            fn near_misses_of_real_dates(
                t in instant(),
                cut in 0usize..30,
                junk in "[0-9:T+Z. -]{0,4}",
            ) {
                let mut text = format(t);
                text.truncate(text.len().saturating_sub(cut % text.len()));
                text.push_str(&junk);
                if let Some(parsed) = parse(&text) {
                    prop_assert!((0..=9999).contains(&parsed.year()));
                }
            }

            /// Whatever the client's clocks say, the corrected time lies between the Unix
            /// epoch and the receive time.
            #[test]
            fn the_correction_is_clamped(received in instant(), sent in instant(), original in instant()) {
                let received = received.max(DateTime::UNIX_EPOCH);
                let t = corrected(received, sent, original);
                prop_assert!(t <= received && t >= DateTime::UNIX_EPOCH);
            }
        }
    }
}
