//! `filter = { types, events, properties }`, compiled once per destination.

use std::borrow::Cow;

use serde_json::value::RawValue;
use serde_json::{Number, Value};

use super::config::{FilterConfig, PropertyCondition};
use super::view::{Skip, View};
use crate::json::{scalar, RawObject, Scalar};
use crate::message::MessageType;

pub(super) struct Filter {
    types: Option<Vec<MessageType>>,
    events: Option<Vec<Pattern>>,
    properties: Vec<(Vec<String>, Condition)>,
}

impl Filter {
    pub(super) fn new(config: &FilterConfig) -> Filter {
        Filter {
            types: config.types.clone(),
            events: config
                .events
                .as_ref()
                .map(|events| events.iter().map(|e| Pattern::new(e)).collect()),
            properties: config
                .properties
                .iter()
                .flatten()
                .map(|(path, condition)| {
                    let path = path.split('.').map(str::to_string).collect();
                    (path, Condition::new(condition))
                })
                .collect(),
        }
    }

    /// True when the type is all this filter looks at (it can then be read without parsing).
    pub(super) fn types_only(&self) -> bool {
        self.events.is_none() && self.properties.is_empty()
    }

    pub(super) fn type_allowed(&self, kind: Option<MessageType>) -> bool {
        match &self.types {
            None => true,
            Some(types) => kind.is_some_and(|k| types.contains(&k)),
        }
    }

    /// `types` and `events`: the first the message fails, if any. `event` is read only
    /// when an event pattern is to be matched.
    fn check_type_and_event<'e>(
        &self,
        kind: Option<MessageType>,
        event: impl FnOnce() -> Cow<'e, str>,
    ) -> Option<Skip> {
        if !self.type_allowed(kind) {
            return Some(Skip::Type);
        }
        if let (Some(patterns), Some(MessageType::Track)) = (&self.events, kind) {
            let event = event();
            if !patterns.iter().any(|p| p.matches(&event)) {
                return Some(Skip::Event);
            }
        }
        None
    }

    /// The first condition the message fails, if any.
    pub(super) fn check(&self, view: &View<'_>) -> Option<Skip> {
        let kind = view.kind.and_then(|raw| match scalar(raw) {
            Scalar::Str(s) => MessageType::parse(&s),
            _ => None,
        });
        let event = || match view.event.map(scalar) {
            Some(Scalar::Str(event)) => event,
            _ => Cow::Borrowed(""),
        };
        if let Some(skip) = self.check_type_and_event(kind, event) {
            return Some(skip);
        }
        if !self.properties.is_empty() {
            // identify and group carry their data in `traits`, the others in `properties`.
            let root = match kind {
                Some(MessageType::Identify | MessageType::Group) => view.traits,
                _ => view.properties,
            };
            for (path, condition) in &self.properties {
                let found = root.and_then(|root| lookup(root, path));
                if !condition.holds(found) {
                    return Some(Skip::Property);
                }
            }
        }
        None
    }
}

/// A `filter` table tested on whole messages on its own: the http kind's `when`.
pub struct MessageFilter(Filter);

impl MessageFilter {
    pub fn new(config: &FilterConfig) -> MessageFilter {
        MessageFilter(Filter::new(config))
    }

    /// Whether `message` (JSON as stored) meets every condition; a message that is not a
    /// JSON object meets none.
    pub fn matches(&self, message: &[u8]) -> bool {
        std::str::from_utf8(message)
            .ok()
            .and_then(|text| serde_json::from_str::<&RawValue>(text).ok())
            .and_then(RawObject::parse)
            .is_some_and(|object| self.0.check(&View::new(|key| object.get(key))).is_none())
    }
}

impl MessageFilter {
    /// What `matches` answers, from the message's `type` and `event` (strings, or `None`
    /// when absent or of another kind) already read; `None` when the filter also looks at
    /// properties and needs the message itself.
    pub fn decide(&self, kind: Option<&str>, event: Option<&str>) -> Option<bool> {
        if !self.0.properties.is_empty() {
            return None;
        }
        let kind = kind.and_then(MessageType::parse);
        let event = || Cow::Borrowed(event.unwrap_or(""));
        Some(self.0.check_type_and_event(kind, event).is_none())
    }
}

/// The value at `path` inside the object `root`, parsing only the objects on the way.
fn lookup<'a>(root: &'a RawValue, path: &[String]) -> Option<&'a RawValue> {
    path.iter()
        .try_fold(root, |node, key| RawObject::parse(node)?.get(key))
}

/// An event name to match: exact, or a glob.
#[derive(Debug)]
enum Pattern {
    Exact(String),
    Glob(Vec<Token>),
}

#[derive(Debug, PartialEq)]
enum Token {
    Literal(String),
    /// `?`: one character.
    One,
    /// `*`: any run of characters, the empty one included.
    Any,
}

impl Pattern {
    fn new(pattern: &str) -> Pattern {
        if !pattern.contains(['*', '?']) {
            return Pattern::Exact(pattern.to_string());
        }
        let mut tokens = Vec::new();
        let mut literal = String::new();
        for c in pattern.chars() {
            let token = match c {
                '*' => Token::Any,
                '?' => Token::One,
                c => {
                    literal.push(c);
                    continue;
                }
            };
            if !literal.is_empty() {
                tokens.push(Token::Literal(std::mem::take(&mut literal)));
            }
            // `**` means the same as `*`.
            if !(token == Token::Any && tokens.last() == Some(&Token::Any)) {
                tokens.push(token);
            }
        }
        if !literal.is_empty() {
            tokens.push(Token::Literal(literal));
        }
        Pattern::Glob(tokens)
    }

    fn matches(&self, text: &str) -> bool {
        match self {
            Pattern::Exact(name) => name == text,
            Pattern::Glob(tokens) => glob(tokens, text),
        }
    }
}

/// Iterative glob matching: on a mismatch, the last `*` takes one more character.
/// Linear in practice, never exponential.
fn glob(tokens: &[Token], text: &str) -> bool {
    let char_len = |at: usize| text[at..].chars().next().map_or(1, char::len_utf8);
    let (mut t, mut i) = (0, 0);
    // Where to resume after the last `*`: its next token and the text it has taken up to.
    let mut star: Option<(usize, usize)> = None;
    while i < text.len() {
        match tokens.get(t) {
            Some(Token::Any) => {
                t += 1;
                star = Some((t, i));
                continue;
            }
            Some(Token::One) => {
                i += char_len(i);
                t += 1;
                continue;
            }
            Some(Token::Literal(l)) if text[i..].starts_with(l.as_str()) => {
                i += l.len();
                t += 1;
                continue;
            }
            _ => {}
        }
        let Some((resume, taken)) = star else {
            return false;
        };
        let taken = taken + char_len(taken);
        star = Some((resume, taken));
        (t, i) = (resume, taken);
    }
    tokens[t..].iter().all(|token| *token == Token::Any)
}

/// A compiled `PropertyCondition`.
#[derive(Debug)]
enum Condition {
    Exists(bool),
    Equals(Expected),
}

#[derive(Debug)]
enum Expected {
    Number(Number),
    Str(String),
    Other(Value),
}

impl Condition {
    fn new(config: &PropertyCondition) -> Condition {
        match &config.equals {
            Some(Value::Number(n)) => Condition::Equals(Expected::Number(n.clone())),
            Some(Value::String(s)) => Condition::Equals(Expected::Str(s.clone())),
            Some(other) => Condition::Equals(Expected::Other(other.clone())),
            // Validation guarantees one of the two.
            None => Condition::Exists(config.exists.unwrap_or(true)),
        }
    }

    /// `found` is the value at the path; JSON `null` counts as absent.
    fn holds(&self, found: Option<&RawValue>) -> bool {
        let found = found.filter(|v| v.get() != "null");
        match self {
            Condition::Exists(wanted) => found.is_some() == *wanted,
            Condition::Equals(expected) => found.is_some_and(|v| expected.matches(v)),
        }
    }
}

impl Expected {
    fn matches(&self, raw: &RawValue) -> bool {
        match self {
            Expected::Number(n) => {
                serde_json::from_str::<Number>(raw.get()).is_ok_and(|found| same_number(n, &found))
            }
            Expected::Str(s) => matches!(scalar(raw), Scalar::Str(found) if found == s.as_str()),
            Expected::Other(value) => {
                serde_json::from_str::<Value>(raw.get()).is_ok_and(|found| found == *value)
            }
        }
    }
}

/// Numbers by value: `3` equals `3.0`; integers compare exactly, beyond f64's precision too.
fn same_number(a: &Number, b: &Number) -> bool {
    let int = |n: &Number| {
        n.as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
    };
    match (int(a), int(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a.as_f64() == b.as_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let cases = [
            ("Order *", "Order Completed", true),
            ("Order *", "Order ", true),
            ("Order *", "Order", false),
            ("Order *", "Big Order X", false),
            ("*Viewed", "Product Viewed", true),
            ("*Viewed", "Product Viewed Twice", false),
            ("a*b*c", "aXXbYYbc", true),
            ("a*b*c", "aXXbYYbd", false),
            ("Step ?", "Step 1", true),
            ("Step ?", "Step 12", false),
            ("Step ?", "Step ", false),
            ("Step ?", "Step é", true),
            ("??", "éa", true),
            ("*", "", true),
            ("**x", "abx", true),
            ("*?", "", false),
            ("*é*", "caféine", true),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(
                Pattern::new(pattern).matches(text),
                expected,
                "{pattern:?} on {text:?}"
            );
        }
        assert!(matches!(Pattern::new("Signed Up"), Pattern::Exact(_)));
    }

    #[test]
    fn numbers_compare_by_value() {
        let n = |s: &str| serde_json::from_str::<Number>(s).unwrap();
        assert!(same_number(&n("3"), &n("3.0")));
        assert!(same_number(&n("-2"), &n("-2")));
        assert!(!same_number(&n("3"), &n("3.5")));
        assert!(!same_number(&n("9007199254740993"), &n("9007199254740992")));
        assert!(same_number(
            &n("18446744073709551615"),
            &n("18446744073709551615")
        ));
    }

    mod properties {
        use super::*;
        use crate::json::doc::Doc;
        use proptest::prelude::*;

        /// A `type` or `event` value as written in a message.
        fn field() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec![
                r#""track""#,
                r#""identify""#,
                r#""tr\u0061ck""#,
                r#""Order Completed""#,
                r#""Order \u0043ompleted""#,
                r#""Signed Up""#,
                "null",
                "3",
                "[]",
            ])
        }

        /// The same glob as a regular expression: the reference to check against.
        fn reference(pattern: &str) -> regex::Regex {
            let mut re = String::from("^");
            for c in pattern.chars() {
                match c {
                    '*' => re.push_str(".*"),
                    '?' => re.push('.'),
                    c => re.push_str(&regex::escape(&c.to_string())),
                }
            }
            re.push('$');
            regex::RegexBuilder::new(&re)
                .dot_matches_new_line(true)
                .build()
                .unwrap()
        }

        proptest! {
            /// `decide` from the type and event read elsewhere answers what `matches`
            /// answers from the message, repeated keys and escapes included.
            #[test]
            fn deciding_from_type_and_event_is_matching(
                kind in field(),
                again in prop::option::of(field()),
                event in prop::option::of(field()),
                types in prop::option::of(prop::sample::subsequence(
                    vec![MessageType::Track, MessageType::Identify], 0..=2,
                )),
                events in prop::option::of(prop::sample::subsequence(
                    vec!["Order *".to_string(), "Signed Up".to_string()], 0..=2,
                )),
            ) {
                let mut text = format!(r#"{{"type":{kind},"userId":"u""#);
                if let Some(event) = event {
                    text.push_str(&format!(r#","event":{event}"#));
                }
                if let Some(again) = again {
                    text.push_str(&format!(r#","type":{again}"#));
                }
                text.push('}');
                let filter = MessageFilter::new(&FilterConfig { types, events, properties: None });
                let doc = Doc::parse(text.as_bytes()).unwrap();
                let field = |key| doc.get(key).and_then(Doc::as_str);
                let decided = filter.decide(field("type"), field("event"));
                prop_assert_eq!(decided, Some(filter.matches(text.as_bytes())), "{}", text);
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            #[test]
            fn globs_match_what_the_regex_matches(
                pattern in "[ab*?é]{0,8}",
                text in "[abé]{0,10}",
            ) {
                let ours = Pattern::new(&pattern).matches(&text);
                prop_assert_eq!(ours, reference(&pattern).is_match(&text), "{:?} on {:?}", pattern, text);
            }
        }
    }
}
