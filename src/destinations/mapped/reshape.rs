//! Filters that reshape a value where a vendor's API wants another shape than Segment's:
//! `pick` builds an object from named paths (`products | map('pick', {...})` renames every
//! product's keys, which Jinja cannot do in one expression); `digits` and `snake_case`
//! normalise text as vendors document (Meta's phones, GA4's event names). Like every
//! fanout filter they pass undefined and null through untouched.

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

pub fn register(env: &mut Environment<'static>) {
    env.add_filter("pick", pick);
    env.add_filter("digits", digits);
    env.add_filter("snake_case", snake_case);
}

fn missing(v: &Value) -> bool {
    v.is_undefined() || v.is_none()
}

/// `pick({"new": "old.path", …})`: an object with each new key set to the value at its
/// dotted path in the input; a path that is undefined or null leaves its key out.
fn pick(v: Value, keys: Value) -> Result<Value, Error> {
    if missing(&v) {
        return Ok(v);
    }
    if keys.kind() != ValueKind::Map {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "pick takes a map of new key → path, e.g. pick({'item_id': 'product_id'})",
        ));
    }
    let mut picked = Vec::new();
    for key in keys.try_iter()? {
        let path = keys.get_item(&key)?;
        let Some(path) = path.as_str() else {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("pick: the path of `{key}` is not a string"),
            ));
        };
        let value = path
            .split('.')
            .try_fold(v.clone(), |node, part| match part.parse::<usize>() {
                Ok(index) => node.get_item(&Value::from(index)),
                Err(_) => node.get_attr(part),
            })
            .unwrap_or_default();
        if !missing(&value) {
            picked.push((key, value));
        }
    }
    Ok(Value::from_pairs(picked))
}

/// The ASCII digits of the text; `digits(leading_zeros=false)` drops the zeros they start
/// with, as Meta normalises phone numbers ("+1 (555) 010-9999" → "15550109999", "0044 20…"
/// → "4420…").
fn digits(v: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let leading_zeros = kwargs.get::<Option<bool>>("leading_zeros")?.unwrap_or(true);
    kwargs.assert_all_used()?;
    if missing(&v) {
        return Ok(v);
    }
    let text = match v.as_str() {
        Some(s) => s.to_string(),
        None => v.to_string(),
    };
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    Ok(Value::from(if leading_zeros {
        digits.as_str()
    } else {
        digits.trim_start_matches('0')
    }))
}

/// Lower-cased, every run of characters other than letters and digits one `_`, none at
/// the ends: "Order Completed" → "order_completed" (GA4's event name rule).
fn snake_case(v: Value) -> Value {
    if missing(&v) {
        return v;
    }
    let text = match v.as_str() {
        Some(s) => s.to_string(),
        None => v.to_string(),
    };
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
    }
    while out.ends_with('_') {
        out.pop();
    }
    Value::from(out)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value as Json};

    fn eval(expression: &str, context: Json) -> Json {
        let mut env = minijinja::Environment::new();
        super::register(&mut env);
        let context: minijinja::Value = serde_json::from_value(context).unwrap();
        let value = env
            .compile_expression(expression)
            .unwrap()
            .eval(context)
            .unwrap();
        serde_json::to_value(&value).unwrap()
    }

    #[test]
    fn pick_renames_every_item_and_leaves_missing_paths_out() {
        let products = json!({"products": [
            {"product_id": "p1", "name": "Pen", "price": 2.5, "extra": 1},
            {"product_id": "p2", "price": null, "dims": {"w": 3}}
        ]});
        assert_eq!(
            eval(
                "products | map('pick', {'item_id': 'product_id', 'item_name': 'name', \
                 'price': 'price', 'width': 'dims.w'}) | list",
                products
            ),
            json!([
                {"item_id": "p1", "item_name": "Pen", "price": 2.5},
                {"item_id": "p2", "width": 3}
            ])
        );
        assert_eq!(eval("nothing | pick({'a': 'b'})", json!({})), json!(null));
    }

    #[test]
    fn pick_needs_a_map_of_paths() {
        let mut env = minijinja::Environment::new();
        super::register(&mut env);
        for expression in ["x | pick('a')", "x | pick({'a': 1})"] {
            let result = env
                .compile_expression(expression)
                .unwrap()
                .eval(minijinja::context! { x => minijinja::context! { a => 1 } });
            assert!(result.is_err(), "{expression}");
        }
    }

    #[test]
    fn digits_keeps_only_digits() {
        assert_eq!(
            eval("p | digits", json!({"p": "+1 (555) 010-9999 ext"})),
            json!("15550109999")
        );
        assert_eq!(eval("p | digits", json!({"p": 33612})), json!("33612"));
        assert_eq!(eval("p | digits", json!({"p": null})), json!(null));
        assert_eq!(
            eval(
                "p | digits(leading_zeros=false)",
                json!({"p": "0044 20 7946 0000"})
            ),
            json!("442079460000")
        );
    }

    #[test]
    fn snake_case_makes_an_identifier() {
        for (input, output) in [
            ("Order Completed", "order_completed"),
            ("  Sign-up -- Started! ", "sign_up_started"),
            ("already_snake", "already_snake"),
            ("Été Payé", "été_payé"),
        ] {
            assert_eq!(eval("e | snake_case", json!({ "e": input })), json!(output));
        }
    }
}
