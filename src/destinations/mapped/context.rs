//! What templates see: the stored message's fields and, above them, named values (`env`,
//! `settings`, `batch`…). The message is parsed once; the fast path (`fast.rs`) reads it
//! in place, and minijinja reads it through a lazy object: only the paths a template names
//! are converted.

use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectRepr, Value};
use serde_json::Value as Json;

/// Top-level names a template reads besides the message's fields (`env`, `settings`,
/// `batch` in a batch body); a name here hides a message field of the same name. Adding
/// one is one `with` where the scope is made.
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

/// One render's context: a message and the names above it.
#[derive(Debug, Clone)]
pub struct Scope {
    message: Arc<Json>,
    names: Arc<Names>,
}

impl Scope {
    pub fn new(message: Arc<Json>, names: Arc<Names>) -> Scope {
        Scope { message, names }
    }

    pub fn message(&self) -> &Json {
        &self.message
    }

    /// The value of a top-level name, `None` when undefined.
    pub fn get(&self, name: &str) -> Option<&Json> {
        match self.names.get(name) {
            Some(value) => Some(value),
            None => self.message.get(name),
        }
    }

    /// The scope as a minijinja value (the root a template renders against).
    pub fn value(&self) -> Value {
        Value::from_object(self.clone())
    }
}

impl Object for Scope {
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
