//! Newtypes for every value that enters from outside. Constructors validate; the inner value is
//! never reachable in an invalid state. Secrets (`SessionId`, `Password`) redact themselves in
//! `Debug` so they never reach a log line by accident.

use crate::ParseError;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::fmt;

/// A user's email in one canonical form, so that one mailbox is one account: trimmed, NFKC
/// normalised and case-folded (`ＡＮＮ@Example.com`, `ann@example.com` and `ANN@EXAMPLE.COM` are
/// one email). Characters that do not show — controls, zero-width and bidirectional
/// formatting marks, variation selectors — are refused rather than stripped, since an address
/// that looks like another one is the point of an attack.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        use unicode_normalization::UnicodeNormalization;
        let err = |r: &str| Err(ParseError::new("email", r));
        let trimmed = raw.trim();
        if trimmed.len() > 254 * 4 {
            return err("must be 1 to 254 characters");
        }
        if trimmed.chars().any(is_invisible) {
            return err("must not contain invisible, formatting or bidirectional characters");
        }
        let nfkc: String = trimmed.nfkc().collect();
        let s: String = caseless::default_case_fold_str(&nfkc).nfkc().collect();
        if s.is_empty() || s.chars().count() > 254 {
            return err("must be 1 to 254 characters");
        }
        if s.chars().any(|c| c.is_whitespace() || is_invisible(c)) {
            return err("must not contain spaces or control characters");
        }
        match s.split_once('@') {
            Some((local, domain))
                if !local.is_empty() && !domain.is_empty() && !domain.contains('@') =>
            {
                Ok(Self(s))
            }
            _ => err("must look like name@domain"),
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Controls and the characters that render as nothing or reorder text: Unicode's format
/// characters (zero-width spaces and joiners, bidi embeddings, overrides and isolates, the
/// byte-order mark, tags), variation selectors, and the fillers that display blank.
fn is_invisible(c: char) -> bool {
    c.is_control()
        || matches!(
            c as u32,
            0x00AD
                | 0x034F
                | 0x061C
                | 0x115F..=0x1160
                | 0x17B4..=0x17B5
                | 0x180B..=0x180F
                | 0x200B..=0x200F
                | 0x202A..=0x202E
                | 0x2060..=0x206F
                | 0x3164
                | 0xFE00..=0xFE0F
                | 0xFEFF
                | 0xFFA0
                | 0xFFF0..=0xFFFB
                | 0x1D173..=0x1D17A
                | 0xE0000..=0xE0FFF
        )
}

/// A plaintext password on its way to argon2id. Never printed.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    pub const MIN_LEN: usize = 8;
    pub const MAX_LEN: usize = 128;
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        let n = raw.chars().count();
        if !(Self::MIN_LEN..=Self::MAX_LEN).contains(&n) {
            return Err(ParseError::new("password", "must be 8 to 128 characters"));
        }
        Ok(Self(raw.to_owned()))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

macro_rules! uuid_id {
    ($name:ident, $field:literal) => {
        #[derive(Clone, PartialEq, Eq, Hash, Debug)]
        pub struct $name(String);

        impl $name {
            pub fn generate() -> Self {
                Self(uuid::Uuid::new_v4().to_string())
            }
            pub fn parse(raw: &str) -> Result<Self, ParseError> {
                uuid::Uuid::parse_str(raw)
                    .map(|u| Self(u.to_string()))
                    .map_err(|_| ParseError::new($field, "must be a UUID"))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

uuid_id!(UserId, "user_id");

/// A bearer secret: 256 random bits, hex-encoded. The store keeps only its SHA-256, so a
/// leaked database does not leak live ones, and `Debug` never prints it.
macro_rules! secret_token {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name(String);

        impl $name {
            pub fn generate() -> Self {
                let mut bytes = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut bytes);
                Self(hex::encode(bytes))
            }
            /// Parses a cookie value; anything but 64 lower-case hex digits is rejected.
            pub fn parse(raw: &str) -> Result<Self, ParseError> {
                if raw.len() == 64
                    && raw
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    Ok(Self(raw.to_owned()))
                } else {
                    Err(ParseError::new($field, concat!("malformed ", $field, " token")))
                }
            }
            /// The value to put in the cookie.
            pub fn expose(&self) -> &str {
                &self.0
            }
            /// What the store keys it by.
            pub fn storage_hash(&self) -> String {
                hex::encode(Sha256::digest(self.0.as_bytes()))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
}

secret_token!(
    /// A session id.
    SessionId,
    "session"
);
secret_token!(
    /// A known-device token: given to a browser at a successful login, it lets that browser
    /// keep logging in to that account while the account's shared login quota is exhausted
    /// by someone else.
    DeviceToken,
    "device"
);

/// The value of an `Idempotency-Key` header.
///
/// draft-ietf-httpapi-idempotency-key-header-07 makes the header an RFC 8941 sf-string
/// (`"…"`, printable ASCII, `\"` and `\\` escapes). Many clients send a bare token instead
/// (`Idempotency-Key: 4f1c-…`), so a bare token of URL-safe characters is accepted too.
/// Anything else — empty, longer than 255 characters, control bytes, unbalanced quotes — is
/// rejected so it never reaches the store.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub const MAX_LEN: usize = 255;

    pub fn parse(header: &[u8]) -> Result<Self, ParseError> {
        let err = |r: &str| Err(ParseError::new("Idempotency-Key", r));
        let raw = trim_ows(header);
        let value = if raw.first() == Some(&b'"') {
            parse_sf_string(raw).ok_or_else(|| {
                ParseError::new("Idempotency-Key", "must be a structured-field string")
            })?
        } else if !raw.is_empty()
            && raw
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:~+/=".contains(b))
        {
            String::from_utf8(raw.to_vec()).expect("ascii")
        } else {
            return err("must be a quoted string (or a bare token of A-Z a-z 0-9 -_.:~+/=)");
        };
        if value.is_empty() {
            return err("must not be empty");
        }
        if value.len() > Self::MAX_LEN {
            return err("must be at most 255 characters");
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn trim_ows(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| *c != b' ' && *c != b'\t')
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| *c != b' ' && *c != b'\t')
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// RFC 8941 §4.2.5: a whole-input sf-string, no parameters.
fn parse_sf_string(b: &[u8]) -> Option<String> {
    let mut out = String::new();
    let mut i = 1;
    while i < b.len() {
        match b[i] {
            b'\\' => {
                let next = *b.get(i + 1)?;
                if next != b'"' && next != b'\\' {
                    return None;
                }
                out.push(next as char);
                i += 2;
            }
            b'"' => return (i == b.len() - 1).then_some(out),
            c if (0x20..=0x7e).contains(&c) => {
                out.push(c as char);
                i += 1;
            }
            _ => return None,
        }
    }
    None
}

/// What makes two requests "the same payload" for idempotency: method, path and the canonical
/// form of the body (JSON re-serialised with sorted keys by the caller), hashed with SHA-256.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RequestFingerprint(String);

impl RequestFingerprint {
    pub fn of(method: &str, path: &str, canonical_body: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(method.as_bytes());
        h.update([0]);
        h.update(path.as_bytes());
        h.update([0]);
        h.update(canonical_body);
        Self(hex::encode(h.finalize()))
    }
    pub fn from_stored(s: String) -> Self {
        Self(s)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn idempotency_key_accepts_sf_strings_and_bare_tokens() {
        let ok = |h: &str, want: &str| {
            assert_eq!(IdempotencyKey::parse(h.as_bytes()).unwrap().as_str(), want)
        };
        ok(
            "\"8e03978e-40d5-43e8-bc93-6894a57f9324\"",
            "8e03978e-40d5-43e8-bc93-6894a57f9324",
        );
        ok("  \"a b\"\t", "a b");
        ok(r#""quote\"slash\\""#, r#"quote"slash\"#);
        ok("abc-123", "abc-123");
    }

    #[test]
    fn idempotency_key_rejects_absurd_values() {
        for bad in [
            "",
            "\"\"",
            "\"open",
            "\"a\"b",
            "\"bad\\x\"",
            "two words",
            "\"\u{7f}\"",
            "é",
        ] {
            assert!(
                IdempotencyKey::parse(bad.as_bytes()).is_err(),
                "accepted {bad:?}"
            );
        }
        assert!(IdempotencyKey::parse(format!("\"{}\"", "k".repeat(256)).as_bytes()).is_err());
        assert!(IdempotencyKey::parse(format!("\"{}\"", "k".repeat(255)).as_bytes()).is_ok());
        assert!(IdempotencyKey::parse(b"\"a\x00\"").is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let s = SessionId::generate();
        assert!(!format!("{s:?}").contains(s.expose()));
        assert_eq!(
            format!("{:?}", Password::parse("hunter22hunter").unwrap()),
            "Password(<redacted>)"
        );
    }

    #[test]
    fn session_id_round_trips_and_rejects_garbage() {
        let s = SessionId::generate();
        assert_eq!(SessionId::parse(s.expose()).unwrap(), s);
        assert_eq!(s.expose().len(), 64);
        for bad in ["", "zz", &"A".repeat(64), &"a".repeat(63)] {
            assert!(SessionId::parse(bad).is_err());
        }
    }

    #[test]
    fn email_bounds() {
        assert_eq!(
            Email::parse(" Ann@Example.COM ").unwrap().as_str(),
            "ann@example.com"
        );
        for bad in ["", "no-at", "@x", "x@", "a@b@c", "a b@c"] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn look_alike_emails_are_one_account_or_refused() {
        let canonical = |s: &str| Email::parse(s).map(|e| e.as_str().to_owned());
        // Full-width letters (NFKC), non-ASCII case (folding) and the sharp s all collapse.
        assert_eq!(canonical("ＡＮＮ@Example.com").unwrap(), "ann@example.com");
        assert_eq!(
            canonical("ÉLODIE@example.com").unwrap(),
            "élodie@example.com"
        );
        assert_eq!(
            canonical("E\u{301}lodie@example.com").unwrap(),
            "élodie@example.com",
            "a combining accent composes"
        );
        assert_eq!(
            canonical("STRAẞE@example.com").unwrap(),
            "strasse@example.com"
        );
        assert_eq!(
            canonical("ΣΊΣΥΦΟΣ@example.com"),
            canonical("σίσυφος@example.com")
        );
        for invisible in [
            "an\u{200B}n@example.com",  // zero-width space
            "ann\u{200D}@example.com",  // zero-width joiner
            "\u{202E}moc.elpmaxe@nna",  // right-to-left override
            "ann@exa\u{2066}mple.com",  // left-to-right isolate
            "ann\u{FE0F}@example.com",  // variation selector
            "\u{FEFF}ann@example.com",  // byte-order mark
            "ann\u{AD}@example.com",    // soft hyphen
            "ann@example.com\u{E0041}", // tag
        ] {
            assert!(Email::parse(invisible).is_err(), "{invisible:?}");
        }
    }

    proptest! {
        #[test]
        fn idempotency_key_parser_never_panics_and_bounds_hold(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(k) = IdempotencyKey::parse(&bytes) {
                prop_assert!(!k.as_str().is_empty() && k.as_str().len() <= 255);
                prop_assert!(k.as_str().bytes().all(|b| (0x20..=0x7e).contains(&b)));
            }
        }

        #[test]
        fn sf_string_round_trip(s in "[ -~]{1,200}") {
            let quoted = format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
            let key = IdempotencyKey::parse(quoted.as_bytes());
            prop_assert_eq!(key.as_ref().map(|k| k.as_str()), Ok(s.as_str()));
        }

        #[test]
        fn other_parsers_never_panic(s in "\\PC{0,300}") {
            let _ = Email::parse(&s);
            let _ = SessionId::parse(&s);
            let _ = Password::parse(&s);
            let _ = UserId::parse(&s);
        }
    }
}
