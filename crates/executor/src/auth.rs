//! Authenticated decisions: the policy side signs each [`Decision`] with
//! HMAC-SHA256 under a named key; the executor verifies before acting.
//!
//! The MAC covers a canonical encoding: the domain tag `waterbear-decision-v1`,
//! the key id, and the decision as `serde_json` (fields in struct order, floats
//! in serde_json's shortest round-trip form), each separated by a newline. The
//! key id is inside the MAC so a signature cannot be moved to another key.
//! Everything here is pure (no clock, no I/O): freshness takes `now_ms` as an
//! argument.

use std::collections::BTreeMap;
use std::fmt;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use waterbear_policy::Decision;

type HmacSha256 = Hmac<Sha256>;

const DOMAIN: &[u8] = b"waterbear-decision-v1";

/// A signing key: an id (published with each signature) and a secret.
#[derive(Clone)]
pub struct Key {
    id: String,
    secret: Vec<u8>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl Key {
    /// A key from raw secret bytes (at least 16).
    pub fn new(id: impl Into<String>, secret: impl Into<Vec<u8>>) -> Result<Self, AuthError> {
        let secret = secret.into();
        if secret.len() < 16 {
            return Err(AuthError::WeakKey(secret.len()));
        }
        Ok(Self {
            id: id.into(),
            secret,
        })
    }

    /// A key from a hex secret (e.g. the contents of a key file; whitespace trimmed).
    pub fn from_hex(id: impl Into<String>, hex_secret: &str) -> Result<Self, AuthError> {
        let secret = hex::decode(hex_secret.trim()).map_err(|_| AuthError::MalformedKey)?;
        Self::new(id, secret)
    }

    /// The key id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// The keys an executor accepts, by id.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: BTreeMap<String, Key>,
}

impl Keyring {
    /// A keyring holding `keys`.
    pub fn new(keys: impl IntoIterator<Item = Key>) -> Self {
        Self {
            keys: keys.into_iter().map(|k| (k.id.clone(), k)).collect(),
        }
    }

    /// The key with this id.
    pub fn get(&self, id: &str) -> Option<&Key> {
        self.keys.get(id)
    }
}

/// A decision with its MAC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedDecision {
    /// The decision as the policy made it.
    pub decision: Decision,
    /// Which key signed it.
    pub key_id: String,
    /// HMAC-SHA256 over [`canonical_bytes`], hex.
    pub mac: String,
}

/// Why a signed decision is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    /// The key secret is too short.
    #[error("key secret of {0} bytes is too short (need at least 16)")]
    WeakKey(usize),
    /// The key secret is not hex.
    #[error("key secret is not valid hex")]
    MalformedKey,
    /// Signed with a key this executor does not know.
    #[error("unknown key id {0:?}")]
    UnknownKey(String),
    /// The MAC is not hex of the right length.
    #[error("malformed MAC")]
    MalformedMac,
    /// The MAC does not match the content (forged or altered).
    #[error("MAC does not match decision {id} under key {key_id:?}")]
    BadMac {
        /// Decision id as claimed.
        id: String,
        /// Key id as claimed.
        key_id: String,
    },
    /// The decision is outside the freshness window.
    #[error(
        "decision {id} at {ts_ms} ms is outside the freshness window of {window_ms} ms around {now_ms} ms"
    )]
    Stale {
        /// Decision id.
        id: String,
        /// Its time.
        ts_ms: i64,
        /// The verifier's time.
        now_ms: i64,
        /// Allowed distance.
        window_ms: i64,
    },
}

/// The bytes the MAC covers.
pub fn canonical_bytes(decision: &Decision, key_id: &str) -> Vec<u8> {
    let json = serde_json::to_vec(decision).expect("a decision always serialises");
    let mut out = Vec::with_capacity(DOMAIN.len() + key_id.len() + json.len() + 2);
    out.extend_from_slice(DOMAIN);
    out.push(b'\n');
    out.extend_from_slice(key_id.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(&json);
    out
}

/// SHA-256 (hex) of a decision's canonical JSON: two decisions with one id and
/// different digests are a replay with altered content.
pub fn content_digest(decision: &Decision) -> String {
    let json = serde_json::to_vec(decision).expect("a decision always serialises");
    hex::encode(Sha256::digest(&json))
}

fn mac_for(key: &Key) -> HmacSha256 {
    HmacSha256::new_from_slice(&key.secret).expect("HMAC accepts any key length")
}

/// Signs a decision.
pub fn sign(decision: &Decision, key: &Key) -> SignedDecision {
    let mut mac = mac_for(key);
    mac.update(&canonical_bytes(decision, &key.id));
    SignedDecision {
        decision: decision.clone(),
        key_id: key.id.clone(),
        mac: hex::encode(mac.finalize().into_bytes()),
    }
}

/// Checks the MAC (constant-time comparison).
pub fn verify(signed: &SignedDecision, keys: &Keyring) -> Result<(), AuthError> {
    let key = keys
        .get(&signed.key_id)
        .ok_or_else(|| AuthError::UnknownKey(signed.key_id.clone()))?;
    let tag = hex::decode(&signed.mac).map_err(|_| AuthError::MalformedMac)?;
    if tag.len() != 32 {
        return Err(AuthError::MalformedMac);
    }
    let mut mac = mac_for(key);
    mac.update(&canonical_bytes(&signed.decision, &signed.key_id));
    mac.verify_slice(&tag).map_err(|_| AuthError::BadMac {
        id: signed.decision.id.clone(),
        key_id: signed.key_id.clone(),
    })
}

/// Checks that a decision's time is within `window_ms` of `now_ms` (either side:
/// a decision from the future is as suspect as an old one).
pub fn check_fresh(decision: &Decision, now_ms: i64, window_ms: i64) -> Result<(), AuthError> {
    if (now_ms - decision.ts_ms).abs() > window_ms {
        return Err(AuthError::Stale {
            id: decision.id.clone(),
            ts_ms: decision.ts_ms,
            now_ms,
            window_ms,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::decision;
    use waterbear_policy::Action;

    fn key(id: &str) -> Key {
        Key::new(id, *b"0123456789abcdef0123456789abcdef").unwrap()
    }

    #[test]
    fn signs_and_verifies() {
        let d = decision("h1", Action::LiveMigrate, "d1");
        let s = sign(&d, &key("k1"));
        let ring = Keyring::new([key("k1")]);
        verify(&s, &ring).unwrap();
        // round trip through JSON keeps the MAC valid
        let back: SignedDecision =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        verify(&back, &ring).unwrap();
    }

    #[test]
    fn rejects_altered_content_wrong_key_and_garbage() {
        let d = decision("h1", Action::LiveMigrate, "d1");
        let ring = Keyring::new([key("k1")]);
        let mut s = sign(&d, &key("k1"));
        s.decision.host_id = "h2".into();
        assert!(matches!(verify(&s, &ring), Err(AuthError::BadMac { .. })));
        let mut s = sign(&d, &key("k1"));
        s.decision.score += 1e-12;
        assert!(matches!(verify(&s, &ring), Err(AuthError::BadMac { .. })));
        // same key bytes under another id: the id is inside the MAC
        let mut s = sign(&d, &key("k1"));
        s.key_id = "k2".into();
        let ring2 = Keyring::new([key("k1"), key("k2")]);
        assert!(matches!(verify(&s, &ring2), Err(AuthError::BadMac { .. })));
        let s = sign(&d, &key("k9"));
        assert_eq!(verify(&s, &ring), Err(AuthError::UnknownKey("k9".into())));
        let mut s = sign(&d, &key("k1"));
        s.mac = "zz".into();
        assert_eq!(verify(&s, &ring), Err(AuthError::MalformedMac));
        let other = Key::new("k1", *b"another secret of enough length!").unwrap();
        let s = sign(&d, &other);
        assert!(matches!(verify(&s, &ring), Err(AuthError::BadMac { .. })));
        assert_eq!(Key::new("x", *b"short").unwrap_err(), AuthError::WeakKey(5));
    }

    #[test]
    fn freshness_window_is_symmetric() {
        let d = decision("h1", Action::Reboot, "d1"); // ts 1000
        check_fresh(&d, 1000, 0).unwrap();
        check_fresh(&d, 6000, 5000).unwrap();
        check_fresh(&d, -4000, 5000).unwrap();
        assert!(check_fresh(&d, 6001, 5000).is_err());
        assert!(check_fresh(&d, -4001, 5000).is_err());
    }

    #[test]
    fn digest_tracks_content() {
        let d = decision("h1", Action::Reboot, "d1");
        let mut e = d.clone();
        assert_eq!(content_digest(&d), content_digest(&e));
        e.why.push('!');
        assert_ne!(content_digest(&d), content_digest(&e));
    }
}
