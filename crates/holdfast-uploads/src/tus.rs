//! The tus 1.0.0 protocol's headers, parsed at the boundary into values that can only be
//! valid: offsets and lengths, `Upload-Metadata`, `Upload-Checksum`, and a single `Range`.

use base64::Engine;
use sha1::Digest as _;
use std::collections::BTreeMap;

/// The protocol version this server speaks (and the only one it accepts).
pub const TUS_VERSION: &str = "1.0.0";
/// The extensions `OPTIONS` advertises: exactly what this server does.
pub const TUS_EXTENSIONS: &str = "creation,creation-with-upload,expiration,checksum,termination";
/// The checksum algorithms `Upload-Checksum` may name.
pub const TUS_CHECKSUMS: &str = "sha1,sha256";
/// The content type of a PATCH body (and of a creation request that carries bytes).
pub const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";
/// tus's own status for a body whose checksum does not match `Upload-Checksum`.
pub const CHECKSUM_MISMATCH: u16 = 460;

/// A malformed header: which, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{header}: {why}")]
pub struct BadHeader {
    pub header: &'static str,
    pub why: &'static str,
}

fn bad(header: &'static str, why: &'static str) -> BadHeader {
    BadHeader { header, why }
}

/// A non-negative byte count or offset (`Upload-Length`, `Upload-Offset`): digits only,
/// no sign, no spaces, at most `i64::MAX`.
pub fn byte_count(header: &'static str, value: &str) -> Result<i64, BadHeader> {
    if value.is_empty() || value.len() > 19 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(header, "must be a whole number of bytes"));
    }
    value
        .parse::<i64>()
        .map_err(|_| bad(header, "is too large"))
}

/// `Upload-Metadata`: comma-separated pairs of a key and, optionally, its value in base64.
/// Keys are unique, non-empty, ASCII, without spaces or commas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pairs: BTreeMap<String, Vec<u8>>,
    /// The header as sent, kept verbatim so `HEAD` returns exactly it.
    raw: String,
}

/// Metadata past this is refused (it travels in every `HEAD`).
pub const MAX_METADATA: usize = 4096;

impl Metadata {
    pub fn parse(raw: &str) -> Result<Self, BadHeader> {
        const H: &str = "Upload-Metadata";
        if raw.len() > MAX_METADATA {
            return Err(bad(H, "is longer than 4096 bytes"));
        }
        let mut pairs = BTreeMap::new();
        if !raw.trim().is_empty() {
            for pair in raw.split(',') {
                let pair = pair.trim();
                let (key, value) = match pair.split_once(' ') {
                    Some((k, v)) => (k, Some(v)),
                    None => (pair, None),
                };
                if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
                    return Err(bad(
                        H,
                        "a key must be non-empty ASCII without spaces or commas",
                    ));
                }
                let value = match value {
                    None => Vec::new(),
                    Some(v) => base64::engine::general_purpose::STANDARD
                        .decode(v)
                        .map_err(|_| bad(H, "a value must be base64"))?,
                };
                if pairs.insert(key.to_owned(), value).is_some() {
                    return Err(bad(H, "a key appears twice"));
                }
            }
        }
        Ok(Self {
            pairs,
            raw: raw.trim().to_owned(),
        })
    }

    /// The value of `key`, if it is there and is UTF-8.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .get(key)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every pair, values as text (bytes that are not UTF-8 replaced).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.pairs
            .iter()
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect()
    }

    /// The header as the client sent it.
    pub fn raw(&self) -> &str {
        &self.raw
    }
}

/// `Upload-Checksum`: an algorithm and the digest the PATCH body must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    algorithm: Algorithm,
    digest: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Sha1,
    Sha256,
}

impl Checksum {
    pub fn parse(raw: &str) -> Result<Self, BadHeader> {
        const H: &str = "Upload-Checksum";
        let (name, digest) = raw
            .trim()
            .split_once(' ')
            .ok_or(bad(H, "must be an algorithm and a base64 digest"))?;
        let (algorithm, len) = match name {
            "sha1" => (Algorithm::Sha1, 20),
            "sha256" => (Algorithm::Sha256, 32),
            _ => return Err(bad(H, "the algorithm must be sha1 or sha256")),
        };
        let digest = base64::engine::general_purpose::STANDARD
            .decode(digest.trim())
            .map_err(|_| bad(H, "the digest must be base64"))?;
        if digest.len() != len {
            return Err(bad(H, "the digest has the wrong length for its algorithm"));
        }
        Ok(Self { algorithm, digest })
    }

    /// A hasher for the body this checksum covers.
    pub fn hasher(&self) -> BodyHasher {
        match self.algorithm {
            Algorithm::Sha1 => BodyHasher::Sha1(sha1::Sha1::new()),
            Algorithm::Sha256 => BodyHasher::Sha256(sha2::Sha256::new()),
        }
    }

    /// Whether the finished hasher's digest is this checksum's.
    pub fn matches(&self, hasher: BodyHasher) -> bool {
        let got: Vec<u8> = match hasher {
            BodyHasher::Sha1(h) => h.finalize().to_vec(),
            BodyHasher::Sha256(h) => h.finalize().to_vec(),
        };
        got == self.digest
    }
}

/// The running digest of a PATCH body.
pub enum BodyHasher {
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
}

impl BodyHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            BodyHasher::Sha1(h) => h.update(bytes),
            BodyHasher::Sha256(h) => h.update(bytes),
        }
    }
}

/// What a `Range` header asks of a body of `len` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeAsk {
    /// No usable range (absent, malformed, several ranges): the whole body, 200.
    Whole,
    /// One satisfiable range, `start..end`: 206.
    Part(u64, u64),
    /// A range that starts past the end: 416.
    Unsatisfiable,
}

/// Reads a `Range` header: one range of `bytes=` (`a-b`, `a-`, `-n`); anything else is
/// ignored, as RFC 9110 allows.
pub fn range(header: Option<&str>, len: u64) -> RangeAsk {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeAsk::Whole;
    };
    if spec.contains(',') {
        return RangeAsk::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAsk::Whole;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.trim(), b.trim()) {
        ("", suffix) => match num(suffix) {
            Some(0) => RangeAsk::Unsatisfiable,
            Some(n) if len > 0 => RangeAsk::Part(len.saturating_sub(n), len),
            Some(_) => RangeAsk::Unsatisfiable,
            None => RangeAsk::Whole,
        },
        (first, last) => match (num(first), last) {
            (Some(s), _) if s >= len => RangeAsk::Unsatisfiable,
            (Some(s), "") => RangeAsk::Part(s, len),
            (Some(s), last) => match num(last) {
                Some(e) if e >= s => RangeAsk::Part(s, e.saturating_add(1).min(len)),
                _ => RangeAsk::Whole,
            },
            (None, _) => RangeAsk::Whole,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_is_pairs_of_a_key_and_base64() {
        let m = Metadata::parse("filename d29ybGRfZG9taW5hdGlvbl9wbGFuLnBkZg==,is_confidential")
            .expect("valid");
        assert_eq!(m.get("filename"), Some("world_domination_plan.pdf"));
        assert_eq!(m.get("is_confidential"), Some(""));
        assert!(Metadata::parse("").expect("empty").to_map().is_empty());
        for bad in [
            "a b c",
            "a !!!",
            "a YQ==,a YQ==",
            "a  YQ==",
            ",",
            "k\u{e9} YQ==",
        ] {
            assert!(Metadata::parse(bad).is_err(), "{bad:?} is refused");
        }
        assert!(Metadata::parse(&"k,".repeat(3000)).is_err());
    }

    #[test]
    fn checksums_name_an_algorithm_and_a_digest_of_its_length() {
        let c = Checksum::parse("sha1 Kq5sNclPz7QV2+lfQIuc6R7oRu0=").expect("valid sha1");
        let mut h = c.hasher();
        h.update(b"hello world");
        assert!(c.matches(h));
        let c = Checksum::parse("sha1 Kq5sNclPz7QV2+lfQIuc6R7oRu0=").expect("valid");
        let mut h = c.hasher();
        h.update(b"hello world!");
        assert!(!c.matches(h), "another body does not match");
        for bad in [
            "md5 abc=",
            "sha256 Kq5sNclPz7QV2+lfQIuc6R7oRu0=",
            "sha1",
            "sha1 !!",
        ] {
            assert!(Checksum::parse(bad).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn byte_counts_are_plain_digits() {
        assert_eq!(byte_count("Upload-Offset", "0"), Ok(0));
        assert_eq!(byte_count("Upload-Offset", "1048576"), Ok(1_048_576));
        for bad in ["", "-1", "+1", " 1", "1.0", "0x10", "99999999999999999999"] {
            assert!(
                byte_count("Upload-Offset", bad).is_err(),
                "{bad:?} is refused"
            );
        }
    }

    #[test]
    fn one_range_is_served_and_the_rest_ignored() {
        assert_eq!(range(None, 100), RangeAsk::Whole);
        assert_eq!(range(Some("bytes=0-9"), 100), RangeAsk::Part(0, 10));
        assert_eq!(range(Some("bytes=90-"), 100), RangeAsk::Part(90, 100));
        assert_eq!(range(Some("bytes=-10"), 100), RangeAsk::Part(90, 100));
        assert_eq!(range(Some("bytes=-1000"), 100), RangeAsk::Part(0, 100));
        assert_eq!(range(Some("bytes=50-1000"), 100), RangeAsk::Part(50, 100));
        assert_eq!(
            range(Some("bytes=5-18446744073709551615"), 100),
            RangeAsk::Part(5, 100)
        );
        assert_eq!(range(Some("bytes=100-"), 100), RangeAsk::Unsatisfiable);
        assert_eq!(range(Some("bytes=-0"), 100), RangeAsk::Unsatisfiable);
        for ignored in [
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=9-1",
            "bytes=a-b",
            "bytes",
        ] {
            assert_eq!(range(Some(ignored), 100), RangeAsk::Whole, "{ignored:?}");
        }
    }
}
