//! What templates see: the stored message, `env`, `settings` and (in a batch body)
//! `batch`, as minijinja values read lazily: only the paths a template names are converted.

use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectRepr, Value};
use serde_json::Value as Json;

/// The root of a render: the message's fields, with `env`, `settings` and `batch` above
/// them.
pub fn root(message: Arc<Json>, env: &Value, settings: &Value, batch: Option<Value>) -> Value {
    Value::from_object(Root {
        message: Node {
            root: message,
            path: Vec::new(),
        },
        env: env.clone(),
        settings: settings.clone(),
        batch,
    })
}

/// A JSON array as a template value (the `batch` of rendered bodies).
pub fn array(items: Vec<Json>) -> Value {
    document(Json::Array(items))
}

/// A JSON object or array as a template value (`settings`).
pub fn document(value: Json) -> Value {
    Value::from_object(Node {
        root: Arc::new(value),
        path: Vec::new(),
    })
}

#[derive(Debug)]
struct Root {
    message: Node,
    env: Value,
    settings: Value,
    batch: Option<Value>,
}

impl Object for Root {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "env" => Some(self.env.clone()),
            "settings" => Some(self.settings.clone()),
            "batch" => self.batch.clone(),
            name => self.message.child(&Step::Key(name.to_string())),
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

impl Node {
    fn json(&self) -> &Json {
        let mut node = &*self.root;
        for step in &self.path {
            node = match (step, node) {
                (Step::Key(k), Json::Object(map)) => &map[k.as_str()],
                (Step::Index(i), Json::Array(items)) => &items[*i],
                _ => unreachable!("a node's path was walked when it was made"),
            };
        }
        node
    }

    fn child(&self, step: &Step) -> Option<Value> {
        let child = match (step, self.json()) {
            (Step::Key(k), Json::Object(map)) => map.get(k.as_str())?,
            (Step::Index(i), Json::Array(items)) => items.get(*i)?,
            _ => return None,
        };
        Some(match child {
            Json::Null => Value::from(()),
            Json::Bool(b) => Value::from(*b),
            Json::Number(n) => number(n),
            Json::String(s) => Value::from(s.as_str()),
            Json::Array(_) | Json::Object(_) => {
                let mut path = self.path.clone();
                path.push(step.clone());
                Value::from_object(Node {
                    root: self.root.clone(),
                    path,
                })
            }
        })
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
