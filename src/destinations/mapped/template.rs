//! The mapping language: a TOML value whose strings are Jinja templates (minijinja),
//! compiled once at config load into one template per mapping, rendered against a message.
//!
//! Type rules: a string that is exactly one `{{ expression }}` keeps the expression's JSON
//! type; undefined drops the key, and so does null unless `keep_nulls`; any other string
//! with a `{{`, `{%` or `{#` renders as text; strings without them, numbers, booleans and
//! date-times are literals; tables and arrays are mapped member by member.

use std::collections::BTreeSet;

use minijinja::{Environment, UndefinedBehavior, Value};
use serde_json::Value as Json;

use super::context;
use super::filters;
use crate::destinations::KeyError;

/// A mapping's shape: literals where the TOML had no template, slots where it had one.
#[derive(Debug)]
enum Shape {
    Literal(Json),
    /// `{{ expression }}`: the value keeps its type.
    Typed(usize),
    /// Text around expressions: always a string.
    Text(usize),
    Object(Vec<(String, Shape)>),
    Array(Vec<Shape>),
}

/// One compiled mapping (a body, a URL, a header…): its shape and, when it has slots, the
/// name of its template in the environment.
#[derive(Debug)]
pub struct Mapping {
    shape: Shape,
    template: Option<String>,
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
            slots: Vec::new(),
            lines: Vec::new(),
            env_names,
        };
        let shape = builder.shape(key, value)?;
        let Builder {
            env,
            source,
            slots,
            lines,
            ..
        } = builder;
        let template = if slots.is_empty() {
            None
        } else {
            let name = key.to_string();
            env.add_template_owned(name.clone(), source)
                .map_err(|e| KeyError::new(key, describe(&e, e.line())))?;
            Some(name)
        };
        Ok(Mapping {
            shape,
            template,
            slots,
            lines,
        })
    }

    /// Renders against `root` (see `context::root`); the error names the key path.
    pub fn render(
        &self,
        env: &Environment<'static>,
        root: &Value,
        keep_nulls: bool,
    ) -> Result<Rendered, String> {
        let Some(name) = &self.template else {
            return Ok(Rendered {
                value: literal(&self.shape),
            });
        };
        let template = env.get_template(name).map_err(|e| describe(&e, None))?;
        let captured = template.render_captured(root.clone()).map_err(|e| {
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
        let values: Vec<Value> = self
            .slots
            .iter()
            .map(|slot| state.lookup(slot).unwrap_or_default())
            .collect();
        Ok(Rendered {
            value: assemble(&self.shape, &values, keep_nulls),
        })
    }

    /// Renders to text (a URL, a header): numbers and booleans as JSON writes them;
    /// `None` when undefined or null.
    pub fn render_text(
        &self,
        env: &Environment<'static>,
        root: &Value,
    ) -> Result<Option<String>, String> {
        Ok(match self.render(env, root, false)?.value {
            None => None,
            Some(Json::String(text)) => Some(text),
            Some(other) => Some(other.to_string()),
        })
    }
}

struct Builder<'a> {
    env: &'a mut Environment<'static>,
    source: String,
    slots: Vec<String>,
    lines: Vec<(usize, String)>,
    env_names: &'a mut BTreeSet<String>,
}

impl Builder<'_> {
    fn shape(&mut self, key: &str, value: &toml::Value) -> Result<Shape, KeyError> {
        Ok(match value {
            toml::Value::String(text) => self.string(key, text)?,
            toml::Value::Table(table) => Shape::Object(
                table
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), self.shape(&format!("{key}.{k}"), v)?)))
                    .collect::<Result<_, KeyError>>()?,
            ),
            toml::Value::Array(items) => Shape::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.shape(&format!("{key}[{i}]"), v))
                    .collect::<Result<_, KeyError>>()?,
            ),
            toml::Value::Datetime(t) => Shape::Literal(Json::String(t.to_string())),
            toml::Value::Integer(n) => Shape::Literal(Json::from(*n)),
            toml::Value::Float(f) => Shape::Literal(
                serde_json::Number::from_f64(*f)
                    .map(Json::Number)
                    .ok_or_else(|| KeyError::new(key, "not a number JSON can hold (nan or inf)"))?,
            ),
            toml::Value::Boolean(b) => Shape::Literal(Json::Bool(*b)),
        })
    }

    fn string(&mut self, key: &str, text: &str) -> Result<Shape, KeyError> {
        if !has_template(text) {
            return Ok(Shape::Literal(Json::String(text.to_string())));
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
        let shape = match single_expression(text) {
            Some(expression) => {
                self.source
                    .push_str(&format!("{{% set {name} = ({expression}) %}}"));
                Shape::Typed(slot)
            }
            None => {
                self.source
                    .push_str(&format!("{{% set {name} %}}{text}{{% endset %}}"));
                Shape::Text(slot)
            }
        };
        self.slots.push(name);
        self.lines.push((line, key.to_string()));
        Ok(shape)
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

fn literal(shape: &Shape) -> Option<Json> {
    assemble(shape, &[], true)
}

fn assemble(shape: &Shape, values: &[Value], keep_nulls: bool) -> Option<Json> {
    match shape {
        Shape::Literal(json) => Some(json.clone()),
        Shape::Typed(slot) => {
            let value = &values[*slot];
            if value.is_undefined() {
                None
            } else if value.is_none() {
                keep_nulls.then_some(Json::Null)
            } else {
                Some(context::to_json(value))
            }
        }
        Shape::Text(slot) => Some(Json::String(values[*slot].to_string())),
        Shape::Object(fields) => Some(Json::Object(
            fields
                .iter()
                .filter_map(|(k, s)| Some((k.clone(), assemble(s, values, keep_nulls)?)))
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
