//! Small helpers for plugins that work on JSON values.

use serde_json::Value;

/// The JSON Pointer (RFC 6901) for a field path given in config: `user.address.city` (dots
/// between object keys, array indexes as numbers), or a pointer as is when it starts with `/`.
/// An empty path is the whole document.
pub fn pointer(path: &str) -> String {
    if path.is_empty() || path.starts_with('/') {
        return path.to_string();
    }
    path.split('.')
        .map(|part| format!("/{}", part.replace('~', "~0").replace('/', "~1")))
        .collect()
}

/// A scalar as text: a string as is, a number or boolean spelled out; `None` for null, arrays
/// and objects. Lets config given as text (`--config status=200` or `"200"`) match JSON numbers.
pub fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dotted_paths_become_pointers() {
        let doc = json!({"a": {"b/c": [10, {"d~": true}]}});
        assert_eq!(pointer("a.b/c.1.d~"), "/a/b~1c/1/d~0");
        assert_eq!(doc.pointer(&pointer("a.b/c.1.d~")), Some(&json!(true)));
        assert_eq!(doc.pointer(&pointer("/a")), doc.get("a"));
        assert_eq!(doc.pointer(&pointer("")), Some(&doc));
    }

    #[test]
    fn scalars_spell_out() {
        assert_eq!(scalar_text(&json!(200)), Some("200".into()));
        assert_eq!(scalar_text(&json!(false)), Some("false".into()));
        assert_eq!(scalar_text(&json!([1])), None);
    }
}
