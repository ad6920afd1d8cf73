//! Event time: parsing what clients send and correcting client clock skew.

use chrono::{
    DateTime, Datelike, NaiveDate, NaiveDateTime, SecondsFormat, TimeDelta, Timelike, Utc,
};

/// Parses the date-times real clients send: RFC 3339 with `Z` or an offset and any
/// fraction length (Go sends nanoseconds); a missing offset is read as UTC. Years outside
/// 0000-9999 are refused: RFC 3339 cannot write them, so no consumer could read them back.
pub fn parse(s: &str) -> Option<DateTime<Utc>> {
    let t = match rfc3339(s) {
        Some(t) => t,
        None => ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
            .iter()
            .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())?
            .and_utc(),
    };
    (0..=9999).contains(&t.year()).then_some(t)
}

/// RFC 3339, read exactly as chrono's `DateTime::parse_from_rfc3339` reads it, in UTC.
/// The form fanout and the official libraries write (`2024-01-02T03:04:05.678Z`, any
/// fraction up to nanoseconds, `Z` or `+00:00`) is read here directly, without chrono's
/// general parser, which cost a warehouse load 4 % of its CPU (four or more date-times a
/// message); anything else is chrono's to read or refuse.
pub fn rfc3339(s: &str) -> Option<DateTime<Utc>> {
    utc_form(s.as_bytes()).or_else(|| {
        DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|+00:00)`, a valid date and a time without a leap
/// second; `None` for anything else, valid or not (chrono then decides).
fn utc_form(b: &[u8]) -> Option<DateTime<Utc>> {
    let digits = |range: std::ops::Range<usize>| -> Option<u32> {
        b.get(range)?.iter().try_fold(0u32, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if separators.iter().any(|&(i, c)| b.get(i) != Some(&c)) {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    let mut end = 19;
    let mut nanos = 0;
    if b.get(end) == Some(&b'.') {
        let count = b[end + 1..]
            .iter()
            .take_while(|d| d.is_ascii_digit())
            .count();
        if !(1..=9).contains(&count) {
            return None;
        }
        nanos = digits(end + 1..end + 1 + count)? * 10u32.pow(9 - count as u32);
        end += 1 + count;
    }
    if !matches!(&b[end..], b"Z" | b"+00:00") || second > 59 {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(year as i32, month, day)?;
    Some(
        date.and_hms_nano_opt(hour, minute, second, nanos)?
            .and_utc(),
    )
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
    fn the_common_form_and_the_rest_read_as_chrono_reads_them() {
        for s in [
            "2024-01-02T03:04:05Z",
            "2024-01-02T03:04:05.1+00:00",
            "2024-02-29T23:59:59.999999999Z",
            "2023-02-29T00:00:00Z",
            "2016-12-31T23:59:60.5Z",
            "2024-01-02T24:00:00Z",
            "2024-01-02T03:04:05.Z",
            "2024-01-02T03:04:05.1234567891Z",
            "2024-01-02t03:04:05-07:30",
            "2024-01-02T03:04:05+00:00 ",
        ] {
            let chrono = DateTime::parse_from_rfc3339(s).ok();
            assert_eq!(rfc3339(s), chrono.map(|t| t.with_timezone(&Utc)), "{s}");
        }
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

            /// The direct reading of the common form agrees with chrono's on that form,
            /// on its near misses (impossible dates, hours, fractions, offsets) and on
            /// every other text.
            #[test]
            fn rfc3339_reads_as_chrono_does(
                text in "[0-9]{4}-[0-1][0-9]-[0-3][0-9][Tt ][0-2][0-9]:[0-6][0-9]:[0-6][0-9]\
                         (\\.[0-9]{0,11})?(Z|z|[+-][0-2][0-9]:[0-5][0-9])?",
                t in instant(),
                nanos in 0u32..1_000_000_000,
                cut in 0usize..40,
            ) {
                let chrono = |s: &str| {
                    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
                };
                prop_assert_eq!(rfc3339(&text), chrono(&text), "{}", &text);
                let t = t.with_nanosecond(nanos).unwrap();
                for written in [
                    t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
                    t.to_rfc3339_opts(SecondsFormat::Nanos, false),
                ] {
                    prop_assert_eq!(rfc3339(&written), Some(t));
                    let cut = &written[..written.len().saturating_sub(cut)];
                    prop_assert_eq!(rfc3339(cut), chrono(cut), "{}", cut);
                }
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
