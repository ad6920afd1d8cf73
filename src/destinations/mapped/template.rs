//! The mapping language: a TOML value whose strings are Jinja templates (minijinja),
//! compiled once at config load into one template per mapping, rendered against a message.
//!
//! Type rules: a string that is exactly one `{{ expression }}` keeps the expression's JSON
//! type; undefined drops the key, and so does null unless `keep_nulls`; any other string
//! with a `{{`, `{%` or `{#` renders as text; strings without them, numbers, booleans and
//! date-times are literals; tables and arrays are mapped member by member.

use std::borrow::Cow;
use std::collections::BTreeSet;

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde_json::Value as Json;

use crate::json::doc::Doc;

use super::context::Scope;
use super::fast;
use super::filters::{self, Val};
use crate::destinations::KeyError;

/// A mapping's shape: literals where the TOML had no template, slots where it had one.
#[derive(Debug)]
enum Shape {
    /// A subtree without templates, built at load, with its JSON text.
    Literal(Json, Vec<u8>),
    /// `{{ expression }}`: the value keeps its type.
    Typed(usize),
    /// Text around expressions: always a string.
    Text(usize),
    /// Members in the order JSON objects keep, each key with its JSON text (`"key":`).
    Object(Vec<(String, Vec<u8>, Shape)>),
    Array(Vec<Shape>),
}

/// One compiled mapping (a body, a URL, a header…): its shape and, when it has slots, the
/// names of its templates in the environment.
#[derive(Debug)]
pub struct Mapping {
    shape: Shape,
    /// Per slot, its fast form (`fast.rs`) when it has one.
    fast: Vec<Option<fast::Slot>>,
    /// Every slot: what renders when the fast path gives up on a message.
    template: Option<String>,
    /// Only the slots without a fast form, when some have one.
    partial: Option<String>,
    /// `__0`, `__1`…: the variables the template sets, one per slot.
    slots: Vec<String>,
    /// Where each slot starts in the template (1-based line) and its key path.
    lines: Vec<(usize, String)>,
}

/// The environment holding every mapping of one destination, with fanout's filters.
pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    // Missing paths are undefined all the way down (`traits.address.city`), never errors.
    env.set_undefined_behavior(UndefinedBehavior::Chainable);
    // Values go into JSON and headers, never HTML (a mapping named `….html` included).
    env.set_auto_escape_callback(|_| AutoEscape::None);
    filters::register(&mut env);
    env
}

/// What a mapping renders to.
#[derive(Debug)]
pub struct Rendered {
    /// `None` when the whole value was undefined (or null without `keep_nulls`).
    pub value: Option<Json>,
}

impl Mapping {
    /// Compiles `value` (at `key`, the path named in errors) into `env`. `env_names`
    /// collects the `env.NAME`s its templates read.
    pub fn compile(
        env: &mut Environment<'static>,
        key: &str,
        value: &toml::Value,
        env_names: &mut BTreeSet<String>,
    ) -> Result<Mapping, KeyError> {
        let mut builder = Builder {
            env,
            source: String::new(),
            partial: String::new(),
            fast: Vec::new(),
            slots: Vec::new(),
            lines: Vec::new(),
            env_names,
        };
        let shape = builder.shape(key, value)?;
        let Builder {
            env,
            source,
            partial,
            fast,
            slots,
            lines,
            ..
        } = builder;
        let mut add = |name: String, source: String| {
            env.add_template_owned(name.clone(), source)
                .map_err(|e| KeyError::new(key, describe(&e, e.line())))
                .map(|()| name)
        };
        let template = match slots.is_empty() {
            true => None,
            false => Some(add(key.to_string(), source)?),
        };
        let partial = match fast.iter().any(Option::is_some) && fast.iter().any(Option::is_none) {
            true => Some(add(format!("{key} (partial)"), partial)?),
            false => None,
        };
        Ok(Mapping {
            shape,
            fast,
            template,
            partial,
            slots,
            lines,
        })
    }

    /// Renders against `scope`; the error names the key path.
    pub fn render(
        &self,
        env: &Environment<'static>,
        scope: &Scope,
        keep_nulls: bool,
    ) -> Result<Rendered, String> {
        let values = self.values(env, scope, true)?;
        Ok(Rendered {
            value: assemble(&self.shape, &values, keep_nulls),
        })
    }

    /// Renders as JSON text appended to `out` (`null` when the value is dropped).
    pub fn write(
        &self,
        env: &Environment<'static>,
        scope: &Scope,
        keep_nulls: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        if !self.write_some(env, scope, keep_nulls, out)? {
            out.extend_from_slice(b"null");
        }
        Ok(())
    }

    /// Renders as JSON text appended to `out`; false, with nothing written, when the value
    /// is dropped (a body that renders to nothing: its action is not taken).
    pub fn write_some(
        &self,
        env: &Environment<'static>,
        scope: &Scope,
        keep_nulls: bool,
        out: &mut Vec<u8>,
    ) -> Result<bool, String> {
        let values = self.values(env, scope, true)?;
        Ok(write(&self.shape, &values, keep_nulls, out))
    }

    /// Renders to text (a URL, a header): numbers and booleans as JSON writes them;
    /// `None` when undefined or null.
    pub fn render_text(
        &self,
        env: &Environment<'static>,
        scope: &Scope,
    ) -> Result<Option<String>, String> {
        let (Shape::Typed(slot) | Shape::Text(slot)) = self.shape else {
            return Ok(match self.render(env, scope, false)?.value {
                None => None,
                Some(Json::String(text)) => Some(text),
                Some(other) => Some(other.to_string()),
            });
        };
        // One slot: its value taken as it is, not assembled into JSON first.
        let value = self.values(env, scope, true)?.swap_remove(slot);
        Ok(match value {
            Val::Undefined => None,
            value if value.is_null() => None,
            Val::Json(Cow::Owned(Json::String(text))) => Some(text),
            Val::Json(json) => Some(match &*json {
                Json::String(text) => text.clone(),
                other => other.to_string(),
            }),
            Val::Doc(Doc::Str(text)) => Some(text.to_string()),
            Val::Doc(doc) => Some(serde_json::to_string(doc).expect("JSON values serialize")),
        })
    }

    /// How many slots have a fast form, of how many.
    #[cfg(test)]
    pub fn fast_slots(&self) -> usize {
        self.fast.iter().flatten().count()
    }

    #[cfg(test)]
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Renders every slot with minijinja alone (what the fast path must agree with).
    #[cfg(test)]
    pub fn render_slow(
        &self,
        env: &Environment<'static>,
        scope: &Scope,
        keep_nulls: bool,
    ) -> Result<Rendered, String> {
        let values = self.values(env, scope, false)?;
        Ok(Rendered {
            value: assemble(&self.shape, &values, keep_nulls),
        })
    }

    /// Each slot's value: from the fast path where it has an answer (when `fast`), the
    /// rest from minijinja.
    fn values<'a>(
        &'a self,
        env: &Environment<'static>,
        scope: &'a Scope,
        fast: bool,
    ) -> Result<Vec<Val<'a>>, String> {
        let Some(full) = &self.template else {
            return Ok(Vec::new());
        };
        match (fast, &self.partial) {
            (false, _) => {}
            // Every slot has a fast form, or none has.
            (true, None) => {
                let values: Option<Vec<Val<'a>>> = self
                    .fast
                    .iter()
                    .map(|slot| slot.as_ref()?.eval(scope))
                    .collect();
                if let Some(values) = values {
                    return Ok(values);
                }
            }
            (true, Some(partial)) => {
                let values: Option<Vec<Option<Val<'a>>>> = self
                    .fast
                    .iter()
                    .map(|slot| match slot {
                        Some(slot) => slot.eval(scope).map(Some),
                        None => Some(None),
                    })
                    .collect();
                if let Some(mut values) = values {
                    if let Ok(slow) = self.minijinja(env, partial, scope) {
                        for (value, slow) in values.iter_mut().zip(slow) {
                            value.get_or_insert(slow);
                        }
                        return Ok(values.into_iter().flatten().collect());
                    }
                }
            }
        }
        self.minijinja(env, full, scope)
    }

    /// The slots `template` sets, rendered by minijinja (undefined for those it does not).
    fn minijinja(
        &self,
        env: &Environment<'static>,
        name: &str,
        scope: &Scope,
    ) -> Result<Vec<Val<'static>>, String> {
        let template = env.get_template(name).map_err(|e| describe(&e, None))?;
        let captured = template.render_captured(scope.value()).map_err(|e| {
            let line = e.line().unwrap_or(1);
            let (start, key) = self
                .lines
                .iter()
                .rev()
                .find(|(start, _)| *start <= line)
                .map_or((1, ""), |(start, key)| (*start, key.as_str()));
            format!("`{key}`: {}", describe(&e, Some(line + 1 - start)))
        })?;
        let state = captured.state();
        Ok(self
            .slots
            .iter()
            .map(|slot| Val::from_value(&state.lookup(slot).unwrap_or_default()))
            .collect())
    }
}

struct Builder<'a> {
    env: &'a mut Environment<'static>,
    source: String,
    partial: String,
    fast: Vec<Option<fast::Slot>>,
    slots: Vec<String>,
    lines: Vec<(usize, String)>,
    env_names: &'a mut BTreeSet<String>,
}

impl Builder<'_> {
    fn shape(&mut self, key: &str, value: &toml::Value) -> Result<Shape, KeyError> {
        let shape = match value {
            toml::Value::String(text) => self.string(key, text)?,
            toml::Value::Table(table) => {
                // The order serde_json's objects keep, so that writing in it is what
                // serialising the object would give.
                let order: serde_json::Map<String, Json> =
                    table.keys().map(|k| (k.clone(), Json::Null)).collect();
                let mut fields = Vec::with_capacity(table.len());
                for k in order.keys() {
                    let shape = self.shape(&format!("{key}.{k}"), &table[k])?;
                    let mut name = serde_json::to_vec(k).expect("strings serialize");
                    name.push(b':');
                    fields.push((k.clone(), name, shape));
                }
                Shape::Object(fields)
            }
            toml::Value::Array(items) => Shape::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.shape(&format!("{key}[{i}]"), v))
                    .collect::<Result<_, KeyError>>()?,
            ),
            toml::Value::Datetime(t) => Shape::literal(Json::String(t.to_string())),
            toml::Value::Integer(n) => Shape::literal(Json::from(*n)),
            toml::Value::Float(f) => Shape::literal(
                serde_json::Number::from_f64(*f)
                    .map(Json::Number)
                    .ok_or_else(|| KeyError::new(key, "not a number JSON can hold (nan or inf)"))?,
            ),
            toml::Value::Boolean(b) => Shape::literal(Json::Bool(*b)),
        };
        // A table or array without templates is one literal, built once.
        Ok(match assemble_literal(&shape) {
            Some(json) if !matches!(shape, Shape::Literal(..)) => Shape::literal(json),
            _ => shape,
        })
    }

    fn string(&mut self, key: &str, text: &str) -> Result<Shape, KeyError> {
        if !has_template(text) {
            return Ok(Shape::literal(Json::String(text.to_string())));
        }
        // Compiled on its own first, so that an error's line is the value's own.
        let own = self
            .env
            .template_from_str(text)
            .map_err(|e| KeyError::new(key, describe(&e, e.line())))?;
        for name in own.undeclared_variables(true) {
            if name == "env" {
                return Err(KeyError::new(
                    key,
                    "read secrets as `env.NAME` (a name, so that it is read at start)",
                ));
            }
            if let Some(var) = name.strip_prefix("env.") {
                self.env_names.insert(var.to_string());
            }
        }
        let slot = self.slots.len();
        let name = format!("__{slot}");
        let line = 1 + self.source.matches('\n').count();
        let expression = single_expression(text);
        let (source, shape) = match expression {
            Some(expression) => (
                format!("{{% set {name} = ({expression}) %}}"),
                Shape::Typed(slot),
            ),
            None => (
                format!("{{% set {name} %}}{text}{{% endset %}}"),
                Shape::Text(slot),
            ),
        };
        let fast = fast::Slot::compile(text, expression, self.env);
        if fast.is_none() {
            self.partial.push_str(&source);
        }
        self.source.push_str(&source);
        self.fast.push(fast);
        self.slots.push(name);
        self.lines.push((line, key.to_string()));
        Ok(shape)
    }
}

impl Shape {
    fn literal(json: Json) -> Shape {
        let text = serde_json::to_vec(&json).expect("JSON values serialize");
        Shape::Literal(json, text)
    }
}

/// Whether the string holds any Jinja syntax at all.
pub fn has_template(text: &str) -> bool {
    text.contains("{{") || text.contains("{%") || text.contains("{#")
}

/// The expression of a string that is exactly `{{ expression }}`.
fn single_expression(text: &str) -> Option<&str> {
    let inner = text.strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    (!has_template(inner) && !inner.contains("}}") && !inner.trim().is_empty()).then_some(inner)
}

/// The value of a shape without slots.
fn assemble_literal(shape: &Shape) -> Option<Json> {
    match shape {
        Shape::Literal(json, _) => Some(json.clone()),
        Shape::Typed(_) | Shape::Text(_) => None,
        Shape::Object(fields) => Some(Json::Object(
            fields
                .iter()
                .map(|(k, _, s)| Some((k.clone(), assemble_literal(s)?)))
                .collect::<Option<_>>()?,
        )),
        Shape::Array(items) => Some(Json::Array(
            items.iter().map(assemble_literal).collect::<Option<_>>()?,
        )),
    }
}

/// A slot's value as it goes into JSON: `None` when its key is dropped.
fn slot_value<'v, 'a>(
    shape: &Shape,
    values: &'v [Val<'a>],
    keep_nulls: bool,
) -> Option<&'v Val<'a>> {
    let (Shape::Typed(slot) | Shape::Text(slot)) = shape else {
        unreachable!("only slots have values")
    };
    match &values[*slot] {
        Val::Undefined => None,
        value if value.is_null() && !keep_nulls => None,
        value => Some(value),
    }
}

fn assemble(shape: &Shape, values: &[Val<'_>], keep_nulls: bool) -> Option<Json> {
    match shape {
        Shape::Literal(json, _) => Some(json.clone()),
        Shape::Typed(_) | Shape::Text(_) => {
            slot_value(shape, values, keep_nulls).and_then(Val::to_json)
        }
        Shape::Object(fields) => Some(Json::Object(
            fields
                .iter()
                .filter_map(|(k, _, s)| Some((k.clone(), assemble(s, values, keep_nulls)?)))
                .collect(),
        )),
        Shape::Array(items) => Some(Json::Array(
            items
                .iter()
                .filter_map(|s| assemble(s, values, keep_nulls))
                .collect(),
        )),
    }
}

/// `assemble`, written as JSON text straight into `out`; false when the value is dropped
/// (nothing written).
fn write(shape: &Shape, values: &[Val<'_>], keep_nulls: bool, out: &mut Vec<u8>) -> bool {
    match shape {
        Shape::Literal(_, text) => out.extend_from_slice(text),
        Shape::Typed(_) | Shape::Text(_) => match slot_value(shape, values, keep_nulls) {
            Some(value) => serde_json::to_writer(&mut *out, value).expect("JSON values serialize"),
            None => return false,
        },
        Shape::Object(fields) => {
            out.push(b'{');
            let mut first = true;
            for (_, name, shape) in fields {
                let start = out.len();
                if !first {
                    out.push(b',');
                }
                out.extend_from_slice(name);
                if write(shape, values, keep_nulls, out) {
                    first = false;
                } else {
                    out.truncate(start);
                }
            }
            out.push(b'}');
        }
        Shape::Array(items) => {
            out.push(b'[');
            let mut first = true;
            for shape in items {
                let start = out.len();
                if !first {
                    out.push(b',');
                }
                if write(shape, values, keep_nulls, out) {
                    first = false;
                } else {
                    out.truncate(start);
                }
            }
            out.push(b']');
        }
    }
    true
}

/// An error as one line: what, and on which line of the value.
fn describe(e: &minijinja::Error, line: Option<usize>) -> String {
    let what = match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    };
    match line {
        Some(line) => format!("template error on line {line}: {what}"),
        None => format!("template error: {what}"),
    }
}
