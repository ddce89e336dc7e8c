//! Fields of the daemon's JSON log lines, which every figure set reads for the daemon's own
//! view of what happened and when.

use serde_json::Value;

/// A string field of a JSON log line.
pub(crate) fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// A numeric field that the daemon may log as a number or as a formatted string.
pub(crate) fn num_field(v: &Value, key: &str) -> Option<f64> {
    match v.get(key)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields() {
        let v: Value =
            serde_json::from_str(r#"{"message":"m","a":7,"b":" 2.5 ","c":true}"#).expect("JSON");
        assert_eq!(str_field(&v, "message"), Some("m"));
        assert_eq!(str_field(&v, "a"), None);
        assert_eq!(num_field(&v, "a"), Some(7.0));
        assert_eq!(num_field(&v, "b"), Some(2.5));
        assert_eq!(num_field(&v, "c"), None);
        assert_eq!(num_field(&v, "missing"), None);
    }
}
