//! Generated JSON documents for the property tests of the parsers that see client bytes:
//! text written the ways clients and attackers write it (any whitespace, escapes, repeated
//! keys, brackets inside strings, numbers in every form, including ones no float holds).

use proptest::prelude::*;

/// Whitespace between tokens (a bare `\r` among it: some readers break lines there).
fn space() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", "", " ", "\n", "\t ", "\r\n  ", "\r", "\n\n\t"])
}

/// A JSON string literal: characters that matter to a scanner (quotes, backslashes,
/// brackets, multi-byte UTF-8, control characters, the line separators JSON allows raw:
/// NEL, LS, PS), sometimes written as `\u` escapes.
pub fn string() -> impl Strategy<Value = String> {
    let chars = prop::sample::select(vec![
        'a', 'b', 'e', 'E', '1', '9', '-', '.', ' ', '"', '\\', '{', '}', '[', ']', ':', ',', 'é',
        '€', '😀', '\n', '\r', '\t', '\u{1}', '\u{85}', '\u{2028}', '\u{2029}',
    ]);
    (prop::collection::vec(chars, 0..12), any::<bool>()).prop_map(|(chars, unicode_escape)| {
        let text: String = chars.into_iter().collect();
        let mut literal = serde_json::to_string(&text).expect("strings serialize");
        if unicode_escape && text.starts_with('a') {
            // `\u0061` for the leading `a`: same string, different bytes.
            literal.replace_range(1..2, "\\u0061");
        }
        literal
    })
}

/// A JSON number literal; with `wild`, also ones beyond f64's range.
pub fn number(wild: bool) -> BoxedStrategy<String> {
    let tame = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u32>().prop_map(|n| format!("{n}.{n}")),
        (any::<i16>(), -300i32..300).prop_map(|(m, e)| format!("{m}e{e}")),
        (any::<i16>(), 0i32..300).prop_map(|(m, e)| format!("{m}.5E+{e}")),
        Just("1e-400".to_string()),
        Just("123456789012345678901234567890".to_string()),
        Just("1.7976931348623157e308".to_string()),
    ];
    if !wild {
        return tame.boxed();
    }
    prop_oneof![
        4 => tame,
        1 => (309i32..2000).prop_map(|e| format!("1e{e}")),
        1 => (310usize..500).prop_map(|n| format!("-9{}", "0".repeat(n))),
        1 => Just("2E+400".to_string()),
    ]
    .boxed()
}

fn scalar(wild: bool) -> BoxedStrategy<String> {
    prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        Just("false".to_string()),
        number(wild),
        string(),
    ]
    .boxed()
}

/// Keys from a small alphabet, so objects repeat keys now and then.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["a", "b", "type", "userId", "x\"y", "{", "é"])
            .prop_map(|k| serde_json::to_string(k).expect("keys serialize")),
        string(),
    ]
}

/// An object's text, from members already written.
fn object_of(members: Vec<(String, String, &str, &str)>) -> String {
    let mut text = String::from("{");
    for (i, (key, value, before, after)) in members.into_iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(before);
        text.push_str(&key);
        text.push_str(after);
        text.push(':');
        text.push_str(before);
        text.push_str(&value);
        text.push_str(after);
    }
    text.push('}');
    text
}

/// Any JSON value, nested up to a few levels.
pub fn value(wild: bool) -> impl Strategy<Value = String> {
    scalar(wild).prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec((inner.clone(), space()), 0..6).prop_map(|items| {
                let items: Vec<String> = items
                    .into_iter()
                    .map(|(v, s)| format!("{s}{v}{s}"))
                    .collect();
                format!("[{}]", items.join(","))
            }),
            prop::collection::vec((key(), inner, space(), space()), 0..6).prop_map(object_of),
        ]
    })
}

/// A JSON object (a message-like document).
pub fn object(wild: bool) -> impl Strategy<Value = String> {
    prop::collection::vec((key(), value(wild), space(), space()), 0..8).prop_map(object_of)
}
