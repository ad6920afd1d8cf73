//! What templates see: the stored message's fields (in a `batch.body` envelope: `batch`,
//! the bodies) and, above them, named values (`env`, `settings`). The message is parsed
//! once, in place (`Doc`): the fast path (`fast.rs`) reads that; minijinja, when a
//! template needs it, reads it converted to JSON through a lazy object (only the paths a
//! template names become template values).

use std::cell::OnceCell;
use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectRepr, Value};
use serde_json::Value as Json;

use crate::json::doc::Doc;

/// Top-level names a template reads besides the message's fields (`env`, `settings`); a
/// name here hides a message field of the same name. Adding one is one `with` where the
/// scope is made.
#[derive(Debug, Clone, Default)]
pub struct Names(Vec<(&'static str, Arc<Json>)>);

impl Names {
    pub fn with(mut self, name: &'static str, value: Json) -> Names {
        self.0.retain(|(n, _)| *n != name);
        self.0.push((name, Arc::new(value)));
        self
    }

    fn get(&self, name: &str) -> Option<&Arc<Json>> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

/// One render's context: a message, read in place, and the names above it.
pub struct Scope<'a> {
    message: Doc<'a>,
    names: Arc<Names>,
    /// What minijinja renders against, made the first time a template needs it.
    root: OnceCell<Value>,
}

/// Where a top-level name is found: among the names, or in the message.
#[derive(Debug, Clone, Copy)]
pub enum Found<'s> {
    Name(&'s Json),
    Message(&'s Doc<'s>),
}

impl<'a> Scope<'a> {
    pub fn new(message: Doc<'a>, names: Arc<Names>) -> Scope<'a> {
        Scope {
            message,
            names,
            root: OnceCell::new(),
        }
    }

    pub fn message(&self) -> &Doc<'a> {
        &self.message
    }

    /// The value of a top-level name, `None` when undefined.
    pub fn get(&self, name: &str) -> Option<Found<'_>> {
        match self.names.get(name) {
            Some(value) => Some(Found::Name(value)),
            None => self.message.get(name).map(Found::Message),
        }
    }

    /// The scope as a minijinja value (the root a template renders against); the message
    /// is converted to JSON once, the first time.
    pub fn value(&self) -> Value {
        self.root
            .get_or_init(|| {
                Value::from_object(Root {
                    message: Arc::new(self.message.to_value()),
                    names: self.names.clone(),
                })
            })
            .clone()
    }
}

/// A scope as minijinja reads it: the message as JSON, read lazily.
struct Root {
    message: Arc<Json>,
    names: Arc<Names>,
}

// Not the message: it can hold personal data, and Debug output ends up in error text.
impl std::fmt::Debug for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<scope>")
    }
}

impl Object for Root {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let name = key.as_str()?;
        match self.names.get(name) {
            Some(value) => Some(node(value.clone(), Vec::new())),
            None => Node::at(self.message.clone()).child(&Step::Key(name.to_string())),
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::NonEnumerable
    }
}

#[derive(Clone)]
enum Step {
    Key(String),
    Index(usize),
}

/// A JSON object or array inside a shared document, found by its path from the root.
struct Node {
    root: Arc<Json>,
    path: Vec<Step>,
}

// Not the document: it can hold personal data, and Debug output ends up in error text.
impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<json>")
    }
}

/// A JSON object or array as a template value (what `merge` and `omit` return).
pub fn document(value: Json) -> Value {
    node(Arc::new(value), Vec::new())
}

/// The value at `path` in `root`: scalars converted, objects and arrays left lazy.
fn node(root: Arc<Json>, path: Vec<Step>) -> Value {
    match Node::walk(&root, &path) {
        Json::Null => Value::from(()),
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => number(n),
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(_) | Json::Object(_) => Value::from_object(Node { root, path }),
    }
}

impl Node {
    fn at(root: Arc<Json>) -> Node {
        Node {
            root,
            path: Vec::new(),
        }
    }

    fn walk<'a>(root: &'a Json, path: &[Step]) -> &'a Json {
        let mut node = root;
        for step in path {
            node = match (step, node) {
                (Step::Key(k), Json::Object(map)) => &map[k.as_str()],
                (Step::Index(i), Json::Array(items)) => &items[*i],
                _ => unreachable!("a node's path was walked when it was made"),
            };
        }
        node
    }

    fn json(&self) -> &Json {
        Node::walk(&self.root, &self.path)
    }

    fn child(&self, step: &Step) -> Option<Value> {
        match (step, self.json()) {
            (Step::Key(k), Json::Object(map)) if map.contains_key(k.as_str()) => {}
            (Step::Index(i), Json::Array(items)) if *i < items.len() => {}
            _ => return None,
        }
        let mut path = self.path.clone();
        path.push(step.clone());
        Some(node(self.root.clone(), path))
    }
}

impl Object for Node {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        match self.json() {
            Json::Array(_) => ObjectRepr::Seq,
            _ => ObjectRepr::Map,
        }
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match self.json() {
            Json::Array(_) => self.child(&Step::Index(key.as_usize()?)),
            _ => self.child(&Step::Key(key.as_str()?.to_string())),
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        match self.json() {
            Json::Array(items) => Enumerator::Seq(items.len()),
            Json::Object(map) => {
                Enumerator::Values(map.keys().map(|k| Value::from(k.as_str())).collect())
            }
            _ => Enumerator::Empty,
        }
    }
}

fn number(n: &serde_json::Number) -> Value {
    if let Some(i) = n.as_i64() {
        Value::from(i)
    } else if let Some(u) = n.as_u64() {
        Value::from(u)
    } else {
        Value::from(n.as_f64().unwrap_or(f64::NAN))
    }
}

/// A template value as JSON; a part of the message comes back as it was stored.
pub fn to_json(value: &Value) -> Json {
    if let Some(node) = value.downcast_object_ref::<Node>() {
        return node.json().clone();
    }
    serde_json::to_value(value).unwrap_or(Json::Null)
}
