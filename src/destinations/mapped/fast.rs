//! The fast path: a template of the common forms — a path (`traits.email`,
//! `properties["Order Id"]`) or a literal, then fanout's filters with literal arguments,
//! alone or in text — compiled at load and evaluated on the parsed message in place.
//! Any other template goes to minijinja, and so does any value the fast path could not
//! render exactly as minijinja would (a filter's error, an object in text…).

use std::borrow::Cow;

use minijinja::Environment;
use serde_json::Value as Json;

use crate::json::doc::Doc;

use super::context::{Found, Scope};
use super::filters::{Filter, Val, PLAIN};

/// A slot (one template string) in its fast form.
#[derive(Debug)]
pub enum Slot {
    /// `{{ expression }}`: the value keeps its type.
    Typed(Expr),
    /// Text around expressions.
    Text(Vec<Piece>),
}

#[derive(Debug)]
pub enum Piece {
    Text(String),
    Expr(Expr),
}

/// A path or a literal, then filters.
#[derive(Debug)]
pub struct Expr {
    head: Head,
    steps: Vec<Step>,
    filters: Vec<Filter>,
}

#[derive(Debug)]
enum Head {
    Name(String),
    Literal(Json),
}

#[derive(Debug)]
enum Step {
    Key(String),
    Index(usize),
}

/// Words that are not a path's head in Jinja (literals, operators, special names).
const KEYWORDS: [&str; 14] = [
    "true", "false", "none", "True", "False", "None", "not", "and", "or", "in", "is", "if", "else",
    "loop",
];

impl Slot {
    /// The fast form of a slot: `expression` when the string is exactly one (`text`
    /// otherwise); `None` when minijinja must render it.
    pub fn compile(text: &str, expression: Option<&str>, env: &Environment) -> Option<Slot> {
        // A name minijinja resolves itself when the message lacks it (`range`, a slot's
        // variable `__0`) is left to minijinja.
        let reserved = |name: &str| {
            KEYWORDS.contains(&name)
                || name.starts_with("__")
                || env.globals().any(|(global, _)| global == name)
        };
        if let Some(expression) = expression {
            let mut cursor = Cursor {
                s: expression,
                at: 0,
            };
            let expr = cursor.expr(&reserved)?;
            cursor.ws();
            return cursor.done().then_some(Slot::Typed(expr));
        }
        if text.contains("{%") || text.contains("{#") {
            return None;
        }
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                pieces.push(Piece::Text(rest[..start].to_string()));
            }
            let mut cursor = Cursor {
                s: &rest[start + 2..],
                at: 0,
            };
            // Whitespace control (`{{-`, `-}}`) is minijinja's to apply.
            if cursor.peek().is_some_and(|c| c == b'-' || c == b'+') {
                return None;
            }
            let expr = cursor.expr(&reserved)?;
            cursor.ws();
            if !cursor.eat("}}") {
                return None;
            }
            pieces.push(Piece::Expr(expr));
            rest = &cursor.s[cursor.at..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Some(Slot::Text(pieces))
    }

    /// The slot's value; `None` when minijinja must render it.
    pub fn eval<'a>(&'a self, scope: &'a Scope) -> Option<Val<'a>> {
        match self {
            Slot::Typed(expr) => expr.eval(scope),
            Slot::Text(pieces) => {
                let mut out = String::with_capacity(64);
                for piece in pieces {
                    match piece {
                        Piece::Text(text) => out.push_str(text),
                        Piece::Expr(expr) => write_text(&expr.eval(scope)?, &mut out)?,
                    }
                }
                Some(Val::Json(Cow::Owned(Json::String(out))))
            }
        }
    }
}

impl Expr {
    fn eval<'a>(&'a self, scope: &'a Scope) -> Option<Val<'a>> {
        let mut value = match &self.head {
            Head::Literal(json) => Some(Found::Name(json)),
            Head::Name(name) => scope.get(name),
        };
        for step in &self.steps {
            let Some(found) = value else { break };
            value = match (step, found) {
                (Step::Key(key), Found::Name(Json::Object(map))) => map.get(key).map(Found::Name),
                (Step::Key(key), Found::Message(doc @ Doc::Object(_))) => {
                    doc.get(key).map(Found::Message)
                }
                (Step::Index(i), Found::Name(Json::Array(items))) => items.get(*i).map(Found::Name),
                (Step::Index(i), Found::Message(Doc::Array(items))) => {
                    items.get(*i).map(Found::Message)
                }
                (Step::Index(_), Found::Name(Json::Object(_)) | Found::Message(Doc::Object(_)))
                | (Step::Key(_), Found::Name(Json::Array(_)) | Found::Message(Doc::Array(_))) => {
                    None
                }
                // Characters of a string, attributes of none…: minijinja's rules.
                _ => return None,
            };
        }
        let mut value = match value {
            None => Val::Undefined,
            Some(Found::Name(json)) => Val::Json(Cow::Borrowed(json)),
            Some(Found::Message(doc)) => Val::Doc(doc),
        };
        for filter in &self.filters {
            value = filter.apply(value).ok()?;
        }
        Some(value)
    }
}

/// A value minijinja prints inside text.
enum Printed<'s> {
    Str(&'s str),
    Number(&'s serde_json::Number),
    Bool(bool),
    Null,
}

/// Appends the value as minijinja prints it; `None` for what the fast path leaves to it.
fn write_text(value: &Val<'_>, out: &mut String) -> Option<()> {
    let printed = match value {
        Val::Undefined => return Some(()),
        Val::Json(json) => match &**json {
            Json::String(s) => Printed::Str(s),
            Json::Number(n) => Printed::Number(n),
            Json::Bool(b) => Printed::Bool(*b),
            Json::Null => Printed::Null,
            Json::Array(_) | Json::Object(_) => return None,
        },
        Val::Doc(doc) => match doc {
            Doc::Str(s) => Printed::Str(s),
            Doc::Number(n) => Printed::Number(n),
            Doc::Bool(b) => Printed::Bool(*b),
            Doc::Null => Printed::Null,
            Doc::Array(_) | Doc::Object(_) => return None,
        },
    };
    match printed {
        Printed::Str(s) => out.push_str(s),
        Printed::Number(n) if n.is_f64() => {
            let text = n.as_f64()?.to_string();
            out.push_str(&text);
            if !text.contains('.') {
                out.push_str(".0");
            }
        }
        Printed::Number(n) => out.push_str(&n.to_string()),
        Printed::Bool(b) => out.push_str(if b { "True" } else { "False" }),
        Printed::Null => out.push_str("None"),
    }
    Some(())
}

/// A parser over the fast path's subset of Jinja expressions.
struct Cursor<'s> {
    s: &'s str,
    at: usize,
}

impl<'s> Cursor<'s> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.at).copied()
    }

    fn done(&self) -> bool {
        self.at == self.s.len()
    }

    fn ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.at += 1;
        }
    }

    fn eat(&mut self, token: &str) -> bool {
        let found = self.s[self.at..].starts_with(token);
        if found {
            self.at += token.len();
        }
        found
    }

    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'s str {
        let start = self.at;
        while self.peek().is_some_and(&f) {
            self.at += 1;
        }
        &self.s[start..self.at]
    }

    fn ident(&mut self) -> Option<&'s str> {
        if !self
            .peek()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        {
            return None;
        }
        Some(self.take_while(|c| c.is_ascii_alphanumeric() || c == b'_'))
    }

    /// `'…'` or `"…"`, without escapes.
    fn string(&mut self) -> Option<String> {
        let quote = self.peek().filter(|c| *c == b'\'' || *c == b'"')?;
        self.at += 1;
        let text = self.take_while(|c| c != quote && c != b'\\');
        self.eat(if quote == b'"' { "\"" } else { "'" })
            .then(|| text.to_string())
    }

    /// An integer that fits i64, or a decimal number.
    fn number(&mut self) -> Option<Json> {
        let start = self.at;
        self.eat("-");
        if self.take_while(|c| c.is_ascii_digit()).is_empty() {
            return None;
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            if self.take_while(|c| c.is_ascii_digit()).is_empty() {
                return None;
            }
            let f: f64 = self.s[start..self.at].parse().ok()?;
            return serde_json::Number::from_f64(f).map(Json::Number);
        }
        // Exponents and `_` separators are minijinja's.
        if self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
        {
            return None;
        }
        self.s[start..self.at].parse::<i64>().ok().map(Json::from)
    }

    fn literal(&mut self) -> Option<Json> {
        match self.peek()? {
            b'\'' | b'"' => self.string().map(Json::String),
            b'-' | b'0'..=b'9' => self.number(),
            _ => match self.ident()? {
                "true" | "True" => Some(Json::Bool(true)),
                "false" | "False" => Some(Json::Bool(false)),
                "none" | "None" => Some(Json::Null),
                _ => None,
            },
        }
    }

    fn expr(&mut self, reserved: &dyn Fn(&str) -> bool) -> Option<Expr> {
        self.ws();
        let head = match self.peek()? {
            b'\'' | b'"' | b'0'..=b'9' => Head::Literal(self.literal()?),
            _ => {
                let name = self.ident()?;
                if reserved(name) {
                    return None;
                }
                Head::Name(name.to_string())
            }
        };
        let mut steps = Vec::new();
        loop {
            self.ws();
            if self.eat(".") {
                self.ws();
                let name = self.ident()?;
                if KEYWORDS.contains(&name) {
                    return None;
                }
                steps.push(Step::Key(name.to_string()));
            } else if self.eat("[") {
                self.ws();
                let step = match self.peek()? {
                    b'\'' | b'"' => Step::Key(self.string()?),
                    _ => Step::Index(self.take_while(|c| c.is_ascii_digit()).parse().ok()?),
                };
                self.ws();
                if !self.eat("]") {
                    return None;
                }
                steps.push(step);
            } else {
                break;
            }
        }
        let mut filters = Vec::new();
        while self.eat("|") {
            self.ws();
            let name = self.ident()?;
            self.ws();
            let mut args = Vec::new();
            if self.eat("(") {
                self.ws();
                while !self.eat(")") {
                    if !args.is_empty() {
                        if !self.eat(",") {
                            return None;
                        }
                        self.ws();
                    }
                    args.push(self.literal()?);
                    self.ws();
                }
                self.ws();
            }
            filters.push(filter(name, args)?);
        }
        Some(Expr {
            head,
            steps,
            filters,
        })
    }
}

/// A filter of fanout's with literal arguments of the types it takes.
fn filter(name: &str, mut args: Vec<Json>) -> Option<Filter> {
    let text = |arg: Option<Json>| match arg {
        None => Some(None),
        Some(Json::String(s)) => Some(Some(s)),
        Some(_) => None,
    };
    match (name, args.len()) {
        ("default" | "d", 0..=2) => {
            let boolean = match args.get(1) {
                None => false,
                Some(Json::Bool(b)) => *b,
                Some(_) => return None,
            };
            args.truncate(1);
            // minijinja takes a `none` argument as none given.
            let other = match args.pop() {
                None | Some(Json::Null) => Json::from(""),
                Some(other) => other,
            };
            Some(Filter::Default {
                other: Val::Json(Cow::Owned(other)),
                boolean,
            })
        }
        ("round", 1) => {
            let precision = args.pop()?.as_i64()?;
            Some(Filter::Round(i32::try_from(precision).ok()?))
        }
        ("split", 0..=1) => Some(Filter::Split(text(args.pop())?)),
        ("join", 0..=1) => Some(Filter::Join(text(args.pop())?)),
        (name, 0) => PLAIN
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| f.clone()),
        _ => None,
    }
}
