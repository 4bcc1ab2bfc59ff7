//! Mask personal data in record values: e-mail addresses, IPv4 and IPv6 addresses, and payment
//! card numbers (13 to 19 digits, optionally grouped with spaces or dashes, that pass the Luhn
//! check, so order numbers and the like are left alone).
//!
//! Config:
//! - `kinds`: which to mask, from `email`, `ip`, `card` (default: all three).
//! - `mask`: replacement text for every kind (default `[EMAIL]`, `[IP]`, `[CARD]`).
//! - `count_header`: header that receives the number of masked items (default `redactions`;
//!   an empty string adds no header).
//!
//! Values must be UTF-8 text (JSON is text too); others go to the dead letters.

use std::borrow::Cow;
use std::net::{Ipv4Addr, Ipv6Addr};

use regex::{Captures, Regex};
use weir_plugin_sdk::{bail, Config, Error, Record, State};

struct Redactor {
    email: Option<Regex>,
    card: Option<Regex>,
    ipv4: Option<Regex>,
    ipv6: Option<Regex>,
    mask: Option<String>,
    count_header: Option<String>,
}

static REDACTOR: State<Redactor> = State::new();

// Unicode mode stays on (so nothing can match half a character), but the patterns use only
// ASCII classes: the regex crate is built without its Unicode tables to keep the module small.
const EMAIL: &str = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}";
const CARD: &str = r"(?-u:\b)[0-9](?:[ -]?[0-9]){12,18}(?-u:\b)";
const IPV4: &str = r"(?-u:\b)[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?-u:\b)";
const IPV6: &str = r"[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:\.[0-9]{1,3}){0,3}";

fn regex(pattern: &str) -> Result<Regex, Error> {
    Regex::new(pattern).map_err(|e| Error::new(format!("bad built-in pattern: {e}")))
}

fn redactor_from(config: &Config) -> Result<Redactor, Error> {
    let kinds = config
        .string_list("kinds")?
        .unwrap_or_else(|| vec!["email".into(), "ip".into(), "card".into()]);
    for k in &kinds {
        if !["email", "ip", "card"].contains(&k.as_str()) {
            bail!("unknown kind `{k}` in `kinds` (expected email, ip, card)");
        }
    }
    let on = |k: &str| kinds.iter().any(|x| x == k);
    Ok(Redactor {
        email: if on("email") {
            Some(regex(EMAIL)?)
        } else {
            None
        },
        card: if on("card") { Some(regex(CARD)?) } else { None },
        ipv4: if on("ip") { Some(regex(IPV4)?) } else { None },
        ipv6: if on("ip") { Some(regex(IPV6)?) } else { None },
        mask: config.str("mask")?.map(str::to_string),
        count_header: match config.str("count_header")? {
            None => Some("redactions".to_string()),
            Some("") => None,
            Some(h) => Some(h.to_string()),
        },
    })
}

/// The Luhn checksum of the digits in `s` is valid.
fn luhn(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| match (i % 2 == 1, d * 2) {
            (true, dd) if dd > 9 => dd - 9,
            (true, dd) => dd,
            (false, _) => d,
        })
        .sum();
    sum % 10 == 0
}

/// Whether the match at `start..end` of `text` stands alone (no letter, digit, `_` or `:`
/// glued to it), so `std::fmt` or a hex hash is not taken for an IPv6 address.
fn standalone(text: &str, start: usize, end: usize) -> bool {
    let glued =
        |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    !glued(text[..start].chars().next_back()) && !glued(text[end..].chars().next())
}

impl Redactor {
    fn replacement<'a>(&'a self, default: &'a str) -> &'a str {
        self.mask.as_deref().unwrap_or(default)
    }

    /// Mask `text`; returns the new text and the number of items masked. A pattern runs only
    /// where a cheap look at the text says it could match: most records hold no personal
    /// data, and each pass of a regex over them costs more than the rest of the plugin.
    fn redact(&self, text: &str) -> (String, usize) {
        let mut count = 0;
        let mut out = Cow::Borrowed(text);
        if let Some(re) = self.email.as_ref().filter(|_| out.contains('@')) {
            let replaced = re.replace_all(&out, |_: &Captures| {
                count += 1;
                self.replacement("[EMAIL]").to_string()
            });
            out = Cow::Owned(replaced.into_owned());
        }
        if let Some(re) = self.card.as_ref().filter(|_| digits(&out) >= 13) {
            let replaced = re.replace_all(&out, |c: &Captures| {
                if luhn(&c[0]) {
                    count += 1;
                    self.replacement("[CARD]").to_string()
                } else {
                    c[0].to_string()
                }
            });
            out = Cow::Owned(replaced.into_owned());
        }
        if let Some(re) = self.ipv4.as_ref().filter(|_| out.contains('.')) {
            let replaced = re.replace_all(&out, |c: &Captures| {
                if c[0].parse::<Ipv4Addr>().is_ok() {
                    count += 1;
                    self.replacement("[IP]").to_string()
                } else {
                    c[0].to_string()
                }
            });
            out = Cow::Owned(replaced.into_owned());
        }
        if let Some(re) = self.ipv6.as_ref().filter(|_| close_colons(&out)) {
            let source = out.clone();
            let replaced = re.replace_all(&source, |c: &Captures| {
                let m = c.get(0).expect("group 0 is the whole match");
                if m.as_str().parse::<Ipv6Addr>().is_ok() && standalone(&source, m.start(), m.end())
                {
                    count += 1;
                    self.replacement("[IP]").to_string()
                } else {
                    m.as_str().to_string()
                }
            });
            out = Cow::Owned(replaced.into_owned());
        }
        (out.into_owned(), count)
    }
}

/// How many ASCII digits `text` holds (a card number needs 13).
fn digits(text: &str) -> usize {
    text.bytes().filter(u8::is_ascii_digit).count()
}

/// Whether two colons stand at most four hex digits apart, as in every IPv6 address.
fn close_colons(text: &str) -> bool {
    let mut since_colon: Option<usize> = None;
    for b in text.bytes() {
        since_colon = match (b, since_colon) {
            (b':', Some(_)) => return true,
            (b':', None) => Some(0),
            (b, Some(n)) if b.is_ascii_hexdigit() && n < 4 => Some(n + 1),
            _ => None,
        };
    }
    false
}

fn init(config: &Config) -> Result<(), Error> {
    REDACTOR.set(redactor_from(config)?);
    Ok(())
}

fn redact(mut record: Record) -> Result<Record, Error> {
    let r = REDACTOR.get()?;
    let (text, count) = r.redact(record.value_str()?);
    record.value = Some(text.into_bytes());
    if let Some(h) = &r.count_header {
        record.set_header(h, count.to_string());
    }
    Ok(record)
}

weir_plugin_sdk::export_map!(redact, init = init);

#[cfg(test)]
mod tests {
    use super::*;

    fn with(config: &str) -> Redactor {
        redactor_from(&Config::from_json(config.as_bytes()).unwrap()).unwrap()
    }

    #[test]
    fn masks_emails_ips_and_valid_cards() {
        let r = with("{}");
        let (out, n) = r.redact(
            "user jane.doe+x@mail.example.org from 192.168.1.20 paid with 4111 1111 1111 1111, \
             ref 1234567890123 at 2001:db8::8a2e:370:7334",
        );
        assert_eq!(
            out,
            "user [EMAIL] from [IP] paid with [CARD], ref 1234567890123 at [IP]"
        );
        assert_eq!(n, 4);
    }

    #[test]
    fn leaves_lookalikes_alone() {
        let r = with("{}");
        for text in [
            "version 1.2.3.4567 and 300.1.1.1",
            "std::fmt::Display at 10:20:30",
            "order 4111111111111112",
            "sha deadbeef::cafe",
            "no@tld",
        ] {
            let (out, n) = r.redact(text);
            assert_eq!((out.as_str(), n), (text, 0));
        }
    }

    #[test]
    fn the_quick_looks_pass_whatever_a_pattern_could_match() {
        for text in ["2001:db8::1", "::1", "fe80::", "a:b:c", "x ::ffff:1.2.3.4"] {
            assert!(close_colons(text), "{text}");
        }
        for text in [
            r#"{"user": "u1", "n": 2}"#,
            "10:20",
            "a:xyzw:b",
            "a:12345:b",
        ] {
            assert!(!close_colons(text), "{text}");
        }
        assert_eq!(digits("4111 1111 1111 1111"), 16);
        // JSON without personal data comes back as it was, and counts nothing.
        let json = r#"{"user": "u0000123", "pad": "xxxxxxxxxxxx"}"#;
        assert_eq!(with("{}").redact(json), (json.to_string(), 0));
    }

    #[test]
    fn cards_with_dashes_and_the_luhn_check() {
        assert!(luhn("5500-0000-0000-0004"));
        assert!(!luhn("5500-0000-0000-0005"));
        let (out, _) = with("{}").redact("card 5500-0000-0000-0004.");
        assert_eq!(out, "card [CARD].");
    }

    #[test]
    fn kinds_mask_and_header_are_configurable() {
        let r = with(r#"{"kinds": "email", "mask": "***", "count_header": ""}"#);
        let (out, n) = r.redact("a@b.io 10.0.0.1");
        assert_eq!((out.as_str(), n), ("*** 10.0.0.1", 1));
        assert!(r.count_header.is_none());
        assert!(redactor_from(&Config::from_json(br#"{"kinds":["phone"]}"#).unwrap()).is_err());
    }

    #[test]
    fn the_map_sets_the_count_header_and_rejects_binary_values() {
        init(&Config::default()).unwrap();
        let input = [
            Record::new("mail me: x@y.com"),
            Record::new(vec![0xff, 0x00]),
        ];
        let out = weir_plugin_sdk::testing::run_map(redact, &input);
        let recs = weir_plugin_sdk::testing::records(&out);
        assert_eq!(recs[0].value_str().unwrap(), "mail me: [EMAIL]");
        assert_eq!(recs[0].header("redactions"), Some(Some(&b"1"[..])));
        assert_eq!(weir_plugin_sdk::testing::errors(&out)[0].0, 1);
    }
}
