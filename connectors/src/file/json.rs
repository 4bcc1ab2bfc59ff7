//! Small JSON helpers shared by the file source and sink: validation without building a value
//! tree, and compaction that keeps key order and number spelling exactly as written.

use bytes::Bytes;
use serde::de::IgnoredAny;

/// Checks that `bytes` hold exactly one JSON value (surrounding whitespace allowed).
pub(crate) fn validate(bytes: &[u8]) -> Result<(), serde_json::Error> {
    serde_json::from_slice::<IgnoredAny>(bytes).map(|_| ())
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Whether a byte can begin a JSON value.
pub(crate) fn is_value_start(b: u8) -> bool {
    matches!(
        b,
        b'{' | b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n'
    )
}

/// Index of the first non-whitespace byte (or `bytes.len()`).
pub(crate) fn skip_ws(bytes: &[u8]) -> usize {
    bytes.iter().position(|&b| !is_ws(b)).unwrap_or(bytes.len())
}

/// Removes the whitespace outside strings from valid JSON text. Returns the input itself (no
/// copy) when there is none to remove.
pub(crate) fn compact(raw: &Bytes) -> Bytes {
    if !has_insignificant_ws(raw) {
        return raw.clone();
    }
    let mut out = Vec::with_capacity(raw.len());
    compact_into(raw, &mut out);
    Bytes::from(out)
}

/// Appends `raw` (valid JSON) to `out` without the whitespace outside strings.
pub(crate) fn compact_into(raw: &[u8], out: &mut Vec<u8>) {
    let mut in_string = false;
    let mut escaped = false;
    let mut run_start = 0;
    for (i, &b) in raw.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if is_ws(b) {
            out.extend_from_slice(&raw[run_start..i]);
            run_start = i + 1;
        }
    }
    out.extend_from_slice(&raw[run_start..]);
}

fn has_insignificant_ws(raw: &[u8]) -> bool {
    let mut in_string = false;
    let mut escaped = false;
    for &b in raw {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if is_ws(b) {
            return true;
        }
    }
    false
}

/// serde_json's message without its " at line L column C" suffix, and that position.
pub(crate) fn describe(e: &serde_json::Error) -> (String, usize, usize) {
    let text = e.to_string();
    let message = match text.rsplit_once(" at line ") {
        Some((m, _)) if e.line() > 0 => m.to_string(),
        _ => text,
    };
    (message, e.line(), e.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> String {
        String::from_utf8(compact(&Bytes::copy_from_slice(s.as_bytes())).to_vec()).unwrap()
    }

    #[test]
    fn compacts_outside_strings_only() {
        assert_eq!(
            c("{ \"a b\" : [1, 2.50 ,\n\t3] }\r\n"),
            r#"{"a b":[1,2.50,3]}"#
        );
        assert_eq!(
            c(r#"{"q":"say \"hi there\" \\ ok"}"#),
            r#"{"q":"say \"hi there\" \\ ok"}"#
        );
        assert_eq!(c(r#" "esc\\" "#), r#""esc\\""#);
        // key order and number spelling are kept
        assert_eq!(
            c(r#"{"z":1e3, "a":10000000000000000000001}"#),
            r#"{"z":1e3,"a":10000000000000000000001}"#
        );
    }

    #[test]
    fn compact_input_is_not_copied() {
        let raw = Bytes::from_static(br#"{"a":[1,2]}"#);
        let out = compact(&raw);
        assert_eq!(out.as_ptr(), raw.as_ptr());
    }

    #[test]
    fn describe_strips_the_position() {
        let e = serde_json::from_slice::<IgnoredAny>(b"{\"a\":}").unwrap_err();
        let (m, line, col) = describe(&e);
        assert_eq!(m, "expected value");
        assert_eq!((line, col), (1, 6));
    }
}
