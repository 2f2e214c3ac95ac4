//! Signed-cookie sessions: the cookie carries the session, the server keeps nothing per
//! session.
//!
//! Format: `v1.<kid>.<payload>.<mac>`, where `payload` is base64url (no padding) of
//! `user_id|issued_at|expires_at|last_seen_at` (ms since the epoch) and `mac` is base64url of
//! HMAC-SHA256 under key `kid` over everything before the last dot — version and kid included,
//! so neither can be swapped. Verification is constant-time (`hmac`'s `verify_slice`) and
//! happens before the payload is parsed.
//!
//! Keys: a [`KeyRing`] has one current key (signs) and older verify-only keys. Rotation
//! without logging anyone out: put a new key first, keep the old one after it; a cookie
//! signed by an old key is accepted and re-signed with the current key on that response.
//! Once every active user has been seen (or the absolute TTL has passed), remove the old key:
//! cookies still signed by it are refused.
//!
//! Expiry: `expires_at` (absolute) and `last_seen_at` (idle) are checked on every load; a
//! cookie is refreshed — re-signed with a new `last_seen_at` — at most once per
//! `touch_every`, and each refresh checks the user's revocation epoch in the store
//! (`sessions_valid_after`, moved by a password change), so a revoked cookie dies at its next
//! refresh. Logout only clears the cookie in the browser.

use crate::{count, ms, Config, Counters, Error, Issued, Loaded, Result};
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use holdfast_store::Store;
use rand::RngCore;
use sha2::Sha256;
use std::fmt;
use std::sync::atomic::Ordering;

const VERSION: &str = "v1";
/// Anything longer is not one of ours (ours are about 170 bytes).
const MAX_TOKEN: usize = 512;
const MIN_KEY_BYTES: usize = 32;

#[derive(Clone)]
struct Key {
    kid: String,
    secret: Vec<u8>,
}

/// The signing keys: `current` signs, all verify. Parsed from
/// `kid1:base64key,kid0:base64key` (first = current; keys of at least 32 bytes, standard or
/// URL-safe base64; kids of 1 to 32 `[A-Za-z0-9_-]`). `Debug` shows the kids only.
#[derive(Clone)]
pub struct KeyRing {
    current: Key,
    verify_only: Vec<Key>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let old: Vec<&str> = self.verify_only.iter().map(|k| k.kid.as_str()).collect();
        f.debug_struct("KeyRing")
            .field("current", &self.current.kid)
            .field("verify_only", &old)
            .finish()
    }
}

fn valid_kid(kid: &str) -> bool {
    (1..=32).contains(&kid.len())
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl KeyRing {
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |why: String| Err(Error::Keys(why));
        let mut keys: Vec<Key> = Vec::new();
        for (i, entry) in spec.split(',').map(str::trim).enumerate() {
            let Some((kid, b64)) = entry.split_once(':') else {
                return bad(format!("entry {} is not kid:base64key", i + 1));
            };
            if !valid_kid(kid) {
                return bad(format!(
                    "entry {}: a kid is 1 to 32 of A-Z a-z 0-9 - _",
                    i + 1
                ));
            }
            let secret = [&STANDARD, &URL_SAFE].iter().find_map(|e| {
                e.decode(b64.trim_end_matches('=').to_owned() + pad(b64))
                    .ok()
            });
            let Some(secret) = secret else {
                return bad(format!("key {kid:?} is not base64"));
            };
            if secret.len() < MIN_KEY_BYTES {
                return bad(format!("key {kid:?} is shorter than {MIN_KEY_BYTES} bytes"));
            }
            if keys.iter().any(|k| k.kid == kid) {
                return bad(format!("kid {kid:?} appears twice"));
            }
            keys.push(Key {
                kid: kid.to_owned(),
                secret,
            });
        }
        let mut keys = keys.into_iter();
        let Some(current) = keys.next() else {
            return bad("no keys".into());
        };
        Ok(Self {
            current,
            verify_only: keys.collect(),
        })
    }

    /// A fresh one-key ring as a spec string (for `holdfast up`, which shares it with its
    /// instances). A secret: pass it in the environment, never on a command line.
    pub fn generate_spec(kid: &str) -> String {
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        format!("{kid}:{}", URL_SAFE_NO_PAD.encode(secret))
    }

    pub fn current_kid(&self) -> &str {
        &self.current.kid
    }

    fn find(&self, kid: &str) -> Option<&Key> {
        std::iter::once(&self.current)
            .chain(&self.verify_only)
            .find(|k| k.kid == kid)
    }

    pub(crate) fn sign(&self, c: &Claims) -> String {
        let payload = format!(
            "{}|{}|{}|{}",
            c.user_id, c.issued_at, c.expires_at, c.last_seen_at
        );
        let signed = format!(
            "{VERSION}.{}.{}",
            self.current.kid,
            URL_SAFE_NO_PAD.encode(payload)
        );
        let tag = mac(&self.current, &signed).finalize().into_bytes();
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// The claims of a cookie we signed with a key still on the ring, and whether that key is
    /// the current one.
    pub(crate) fn verify(&self, token: &str) -> Result<(Claims, bool), Reject> {
        if token.len() > MAX_TOKEN {
            return Err(Reject::Malformed);
        }
        let (signed, tag_b64) = token.rsplit_once('.').ok_or(Reject::Malformed)?;
        let mut parts = signed.split('.');
        let (Some(VERSION), Some(kid), Some(payload_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Reject::Malformed);
        };
        let key = self.find(kid).ok_or(Reject::UnknownKey)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag_b64)
            .map_err(|_| Reject::Malformed)?;
        mac(key, signed)
            .verify_slice(&tag)
            .map_err(|_| Reject::BadSignature)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| Reject::Malformed)?;
        let claims = Claims::parse(&payload).ok_or(Reject::Malformed)?;
        Ok((claims, key.kid == self.current.kid))
    }
}

/// Re-adds the padding a `kid:key` spec may have left off, so either form decodes.
fn pad(b64: &str) -> &'static str {
    match b64.trim_end_matches('=').len() % 4 {
        2 => "==",
        3 => "=",
        _ => "",
    }
}

fn mac(key: &Key, signed: &str) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(&key.secret).expect("HMAC takes keys of any length");
    m.update(signed.as_bytes());
    m
}

pub(crate) struct Claims {
    pub user_id: String,
    pub issued_at: i64,
    pub expires_at: i64,
    pub last_seen_at: i64,
}

impl Claims {
    fn parse(raw: &[u8]) -> Option<Self> {
        let (user_id, [issued_at, expires_at, last_seen_at]) = crate::user_and_times(raw, '|')?;
        let claims = Self {
            user_id,
            issued_at,
            expires_at,
            last_seen_at,
        };
        (!claims.user_id.is_empty()).then_some(claims)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reject {
    Malformed,
    UnknownKey,
    BadSignature,
    Expired,
    Revoked,
}

impl Reject {
    fn reason(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::UnknownKey => "unknown_key",
            Reject::BadSignature => "bad_signature",
            Reject::Expired => "expired",
            Reject::Revoked => "revoked",
        }
    }
}

/// [`crate::Sessions::load`] for the cookie tier.
pub(crate) async fn load(
    keys: &KeyRing,
    store: &Store,
    config: &Config,
    counters: &Counters,
    token: &str,
    now: i64,
) -> Result<Option<Loaded>> {
    let reject = |r: Reject| {
        counters.rejected.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("holdfast_sessions_rejected_total", "reason" => r.reason()).increment(1);
        Ok(None)
    };
    let (claims, current) = match keys.verify(token) {
        Ok(v) => v,
        Err(r) => return reject(r),
    };
    if now >= claims.expires_at || now.saturating_sub(claims.last_seen_at) >= ms(config.idle_ttl) {
        return reject(Reject::Expired);
    }
    if current && now.saturating_sub(claims.last_seen_at) < ms(config.touch_every) {
        return Ok(Some(Loaded {
            user_id: claims.user_id,
            reissue: None,
        }));
    }
    // Refresh (or re-sign): the one moment a cookie session meets the store.
    match store.user_sessions_valid_after(&claims.user_id).await? {
        Some(valid_after) if claims.issued_at >= valid_after => {}
        _ => return reject(Reject::Revoked),
    }
    if !current {
        count!(counters, resigned, 1);
    }
    let fresh = Claims {
        last_seen_at: now,
        ..claims
    };
    Ok(Some(Loaded {
        reissue: Some(Issued {
            token: keys.sign(&fresh),
            expires_at: fresh.expires_at,
        }),
        user_id: fresh.user_id,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(spec: &str) -> KeyRing {
        KeyRing::parse(spec).unwrap()
    }

    fn claims() -> Claims {
        Claims {
            user_id: "3f0c8a52-5d0e-4c1e-9d43-6d3c1f0e9a11".into(),
            issued_at: 1,
            expires_at: 2,
            last_seen_at: 3,
        }
    }

    #[test]
    fn parses_rings_and_refuses_bad_ones() {
        let a = KeyRing::generate_spec("a");
        let b = KeyRing::generate_spec("b");
        let r = ring(&format!("{a},{b}"));
        assert_eq!(r.current_kid(), "a");
        assert_eq!(
            format!("{r:?}"),
            r#"KeyRing { current: "a", verify_only: ["b"] }"#
        );
        // Padded standard base64 works too.
        let std_key = STANDARD.encode([7u8; 32]);
        assert!(KeyRing::parse(&format!("k:{std_key}")).is_ok());
        for bad in [
            "",
            "nokey",
            "k:!!!",
            "k:c2hvcnQ=",
            &format!("bad kid:{}", STANDARD.encode([1u8; 32])),
            &format!("{a},{a}"),
        ] {
            let e = KeyRing::parse(bad).unwrap_err();
            assert!(e.is_config(), "{bad}");
            assert!(!e.to_string().contains(&a[2..]), "no secret in errors");
        }
    }

    #[test]
    fn signs_verifies_and_rotates() {
        let (k1, k2) = (KeyRing::generate_spec("k1"), KeyRing::generate_spec("k2"));
        let old = ring(&k1);
        let rotated = ring(&format!("{k2},{k1}"));
        let token = old.sign(&claims());
        assert!(token.starts_with("v1.k1."));
        let (c, current) = old.verify(&token).unwrap();
        assert!(current && c.user_id == claims().user_id && c.last_seen_at == 3);
        assert!(matches!(rotated.verify(&token), Ok((_, false))));
        assert_eq!(
            ring(&k2).verify(&token).err(),
            Some(Reject::UnknownKey),
            "old key removed"
        );
        // Same kid, different secret: a forgery.
        let impostor = ring(&KeyRing::generate_spec("k1"));
        assert_eq!(impostor.verify(&token).err(), Some(Reject::BadSignature));
        // The kid is under the MAC: relabelling a k1 cookie as k2 fails.
        let relabelled = token.replacen("v1.k1.", "v1.k2.", 1);
        assert_eq!(
            rotated.verify(&relabelled).err(),
            Some(Reject::BadSignature)
        );
    }

    #[test]
    fn rejects_every_truncation_and_every_flipped_byte() {
        let r = ring(&KeyRing::generate_spec("k"));
        let token = r.sign(&claims());
        for cut in 0..token.len() {
            assert!(r.verify(&token[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..token.len() {
            let mut b = token.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            let t = String::from_utf8(b).unwrap();
            if t != token {
                assert!(r.verify(&t).is_err(), "byte {i} flipped");
            }
        }
    }
}
