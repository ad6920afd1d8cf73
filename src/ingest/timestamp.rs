//! Event time: parsing what clients send and correcting client clock skew.

use chrono::{DateTime, Datelike, NaiveDateTime, SecondsFormat, TimeDelta, Timelike, Utc};

/// Parses the date-times real clients send: RFC 3339 with `Z` or an offset and any
/// fraction length (Go sends nanoseconds); a missing offset is read as UTC.
pub fn parse(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
        .map(|t| t.and_utc())
}

/// Segment's rule: `timestamp = receivedAt − (sentAt − originalTimestamp)`. The offset
/// between the client's send time and our receive time is the client's clock skew.
pub fn corrected(
    received_at: DateTime<Utc>,
    sent_at: DateTime<Utc>,
    original: DateTime<Utc>,
) -> DateTime<Utc> {
    let in_queue: TimeDelta = sent_at - original;
    received_at.checked_sub_signed(in_queue).unwrap_or(original)
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
}
