//! A stored message is one line whatever it carries: the file and stdout destinations,
//! `fanout tap`, the live view and dead-letter listings each frame a message as a line, so
//! a raw line break in a client's nested value would let the client write lines of its own.

/// Line breaks that JSON allows raw inside strings (Python's `str.splitlines()` and other
/// readers split on them), as UTF-8, with the escape that stands for each.
const SEPARATORS: [(&[u8], &[u8]); 3] = [
    (b"\xc2\x85", b"\\u0085"),
    (b"\xe2\x80\xa8", b"\\u2028"),
    (b"\xe2\x80\xa9", b"\\u2029"),
];

/// Rewrites the valid JSON document in `buf[from..]` as one line, the same JSON value.
/// Raw `\n`, `\r` and `\t` can only be whitespace between tokens there (JSON strings may
/// not hold them raw), so they become spaces; NEL, LS and PS can only be inside strings, so
/// they become their `\u` escapes. Without any of them, this is two `memchr` scans.
pub fn keep_on_one_line(buf: &mut Vec<u8>, from: usize) {
    let mut at = from;
    while let Some(i) = memchr::memchr3(b'\n', b'\r', b'\t', &buf[at..]) {
        buf[at + i] = b' ';
        at += i + 1;
    }
    let separator_at = |bytes: &[u8], i: usize| {
        SEPARATORS
            .iter()
            .find(|(raw, _)| bytes[i..].starts_with(raw))
    };
    let Some(first) = memchr::memchr2_iter(0xc2, 0xe2, &buf[from..])
        .map(|i| from + i)
        .find(|&i| separator_at(buf, i).is_some())
    else {
        return;
    };
    let tail = buf.split_off(first);
    let mut copied = 0;
    for i in memchr::memchr2_iter(0xc2, 0xe2, &tail) {
        if let Some((raw, escape)) = separator_at(&tail, i) {
            buf.extend_from_slice(&tail[copied..i]);
            buf.extend_from_slice(escape);
            copied = i + raw.len();
        }
    }
    buf.extend_from_slice(&tail[copied..]);
}

/// Whether some common reader would see more than one line in `text`: the line breaks of
/// Python's `str.splitlines()`, a superset of those of Rust's `lines()` and of JavaScript.
#[cfg(test)]
pub(crate) fn breaks_lines(text: &str) -> bool {
    text.contains([
        '\n', '\r', '\u{b}', '\u{c}', '\u{1c}', '\u{1d}', '\u{1e}', '\u{85}', '\u{2028}',
        '\u{2029}',
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::testgen;
    use proptest::prelude::*;
    use serde_json::Value;

    fn one_line(text: &str) -> String {
        let mut buf = b"kept\n".to_vec();
        buf.extend_from_slice(text.as_bytes());
        keep_on_one_line(&mut buf, 5);
        assert_eq!(&buf[..5], b"kept\n", "bytes before `from` are left alone");
        String::from_utf8(buf[5..].to_vec()).expect("still UTF-8")
    }

    #[test]
    fn the_forged_identify_stays_inside_its_message() {
        let forged = "{\"userId\":\"a\",\"properties\":{\"x\":\n{\"type\":\"identify\",\
                      \"userId\":\"victim-42\"}\r\n}\r}";
        let line = one_line(forged);
        assert!(!breaks_lines(&line), "{line:?}");
        assert_eq!(
            serde_json::from_str::<Value>(&line).unwrap(),
            serde_json::from_str::<Value>(forged).unwrap()
        );
    }

    #[test]
    fn escapes_separators_inside_strings_and_keeps_other_text() {
        let text = "{\"k\u{2028}\":\"a\u{85}b\u{2029}\u{2028}€“é\",\"t\":\t1}";
        let line = one_line(text);
        assert_eq!(
            line,
            "{\"k\\u2028\":\"a\\u0085b\\u2029\\u2028€“é\",\"t\": 1}"
        );
        assert_eq!(one_line("{\"a\":\"plain €\"}"), "{\"a\":\"plain €\"}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Any document, with any whitespace between its tokens and any line separator in
        /// its strings, comes out as one line of the same JSON value.
        #[test]
        fn any_document_becomes_one_line_of_the_same_value(text in testgen::value(false)) {
            let line = one_line(&text);
            prop_assert!(!breaks_lines(&line), "{:?}", line);
            let before: Value = serde_json::from_str(&text).unwrap();
            let after: Value = serde_json::from_str(&line).unwrap();
            prop_assert_eq!(before, after);
        }
    }
}
