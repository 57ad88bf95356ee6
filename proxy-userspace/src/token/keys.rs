//! The token key file: one `kid secret` per line, `#` comments and blank
//! lines allowed, secrets of at least 32 bytes written as hex or base64. The
//! first key signs; every listed key verifies, so a rotation lists the new
//! key first and keeps the old one for one token lifetime. Hosts that share
//! the file accept each other's tokens and challenges. The file must not be
//! readable by other users. Secrets never appear in `Debug` or errors; each
//! use (token MAC, challenge signature, derived-key signature) gets its own
//! subkey, derived with HMAC-SHA-256 and a label.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;
/// The longest key id accepted.
pub const MAX_KID_LEN: usize = 16;

/// Why the key file cannot be used. Never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: other users may read or write it (mode {mode:03o}); run `chmod o-rwx {path}`")]
    Mode { path: PathBuf, mode: u32 },
    #[error("{path}:{line}: {message}")]
    Line { path: PathBuf, line: usize, message: String },
    #[error(
        "{path}: lists no key; write one `kid secret` line (e.g. `k1 ` and 64 hex digits from `openssl rand -hex 32`)"
    )]
    Empty { path: PathBuf },
}

/// One key: its id and the subkeys derived from its secret.
#[derive(Clone)]
pub struct Key {
    kid: String,
    token_mac: [u8; 32],
    challenge_sig: String,
    key_sig: String,
    bind: [u8; 32],
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({}, [redacted])", self.kid)
    }
}

/// An HMAC-SHA-256 keyed with `key`. HMAC zero-pads keys up to the block
/// size and hashes longer ones; doing that here makes construction infallible.
pub(crate) fn hmac(key: &[u8]) -> Hmac<Sha256> {
    use sha2::Digest as _;
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    <Hmac<Sha256> as hmac::digest::KeyInit>::new(&block.into())
}

fn derive(secret: &[u8], label: &str) -> [u8; 32] {
    let mut m = hmac(secret);
    m.update(label.as_bytes());
    m.finalize().into_bytes().into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Key {
    /// A key from its id and raw secret (at least [`MIN_SECRET_BYTES`]).
    pub fn new(kid: &str, secret: &[u8]) -> Result<Key, String> {
        check_kid(kid)?;
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!("key `{kid}`: secret is {} bytes; use at least {MIN_SECRET_BYTES}", secret.len()));
        }
        Ok(Key {
            kid: kid.to_owned(),
            token_mac: derive(secret, "keyward token mac v1"),
            challenge_sig: hex(&derive(secret, "keyward altcha challenge v1")),
            key_sig: hex(&derive(secret, "keyward altcha derived key v1")),
            bind: derive(secret, "keyward altcha binding v1"),
        })
    }

    /// The key id (carried in tokens and challenges).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A fresh HMAC-SHA-256 over token bytes.
    pub(crate) fn token_mac(&self) -> Hmac<Sha256> {
        hmac(&self.token_mac)
    }

    /// A fresh HMAC-SHA-256 for challenge bindings.
    pub(crate) fn bind_mac(&self) -> Hmac<Sha256> {
        hmac(&self.bind)
    }

    /// The Altcha `hmacSignatureSecret`.
    pub(crate) fn challenge_secret(&self) -> &str {
        &self.challenge_sig
    }

    /// The Altcha `hmacKeySignatureSecret`.
    pub(crate) fn key_signature_secret(&self) -> &str {
        &self.key_sig
    }
}

fn check_kid(kid: &str) -> Result<(), String> {
    let ok = !kid.is_empty()
        && kid.len() <= MAX_KID_LEN
        && kid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(format!("key id `{kid}` must be 1 to {MAX_KID_LEN} of A-Z a-z 0-9 _ -")) }
}

/// A secret written as hex (an even number of hex digits) or else base64
/// (standard or URL-safe alphabet, padding optional).
fn decode_secret(s: &str) -> Result<Vec<u8>, String> {
    if s.len().is_multiple_of(2) && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return (0..s.len())
            .step_by(2)
            .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(|| "bad hex".to_owned()))
            .collect();
    }
    let norm: String = s
        .trim_end_matches('=')
        .chars()
        .map(|c| {
            if c == '-' {
                '+'
            } else if c == '_' {
                '/'
            } else {
                c
            }
        })
        .collect();
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(norm)
        .map_err(|_| "secret is neither hex nor base64".to_owned())
}

/// The keys of a key file, signing key first.
#[derive(Clone, Debug)]
pub struct KeyRing {
    signing: Key,
    others: Vec<Key>,
}

impl KeyRing {
    /// Read and check the key file at `path`, including its mode.
    pub fn load(path: &Path) -> Result<KeyRing, KeyFileError> {
        use std::os::unix::fs::PermissionsExt as _;
        let read = |source| KeyFileError::Read { path: path.to_owned(), source };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            return Err(KeyFileError::Mode { path: path.to_owned(), mode });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        KeyRing::parse(path, &text)
    }

    /// Parse key file text; `path` names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<KeyRing, KeyFileError> {
        let mut keys: Vec<Key> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |message: String| KeyFileError::Line { path: path.to_owned(), line: i + 1, message };
            let mut fields = line.split_whitespace();
            let (Some(kid), Some(secret), None) = (fields.next(), fields.next(), fields.next()) else {
                return Err(bad("expected `kid secret`".into()));
            };
            let secret = decode_secret(secret).map_err(|m| bad(format!("key `{kid}`: {m}")))?;
            let key = Key::new(kid, &secret).map_err(bad)?;
            if keys.iter().any(|k| k.kid == key.kid) {
                return Err(bad(format!("key id `{kid}` is listed twice")));
            }
            keys.push(key);
        }
        KeyRing::from_keys(keys).ok_or_else(|| KeyFileError::Empty { path: path.to_owned() })
    }

    /// A ring of the given keys, the first signing; `None` when empty.
    pub fn from_keys(mut keys: Vec<Key>) -> Option<KeyRing> {
        if keys.is_empty() {
            return None;
        }
        let signing = keys.remove(0);
        Some(KeyRing { signing, others: keys })
    }

    /// The key that signs new tokens and challenges.
    pub fn signing(&self) -> &Key {
        &self.signing
    }

    /// The key with id `kid`, if listed.
    pub fn get(&self, kid: &str) -> Option<&Key> {
        self.keys().find(|k| k.kid == kid)
    }

    fn keys(&self) -> impl Iterator<Item = &Key> {
        std::iter::once(&self.signing).chain(&self.others)
    }

    /// Every key id, signing key first.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys().map(|k| k.kid.as_str())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const HEX_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    /// A ring of `kids`, each with a distinct secret.
    pub(crate) fn ring(kids: &[&str]) -> KeyRing {
        let keys =
            kids.iter().enumerate().map(|(i, k)| Key::new(k, &[u8::try_from(i).unwrap(); 32]).unwrap()).collect();
        KeyRing::from_keys(keys).unwrap()
    }

    fn parse(t: &str) -> Result<KeyRing, KeyFileError> {
        KeyRing::parse(Path::new("token.keys"), t)
    }

    #[test]
    fn parses_hex_and_base64_first_signs() {
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 40]);
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xfbu8; 33]);
        let r = parse(&format!("# rotation: new first\n\nk2 {HEX_A}\n  k1   {b64}\nold_3 {url}\n")).unwrap();
        assert_eq!(r.kids().collect::<Vec<_>>(), ["k2", "k1", "old_3"]);
        assert_eq!(r.signing().kid(), "k2");
        assert!(r.get("k1").is_some() && r.get("k9").is_none());
        // Distinct secrets, distinct subkeys; one secret, distinct subkeys per use.
        let (a, b) = (r.get("k2").unwrap(), r.get("k1").unwrap());
        assert_ne!(a.challenge_secret(), b.challenge_secret());
        assert_ne!(a.challenge_secret(), a.key_signature_secret());
    }

    #[test]
    fn errors_carry_line_numbers_and_no_secret() {
        let cases = [
            ("k1\n", "token.keys:1: expected `kid secret`"),
            (&format!("# c\nk1 {HEX_A} extra\n"), "token.keys:2: expected `kid secret`"),
            ("\nk1 00ff\n", "token.keys:2: key `k1`: secret is 2 bytes; use at least 32"),
            ("k1 not*base64!\n", "token.keys:1: key `k1`: secret is neither hex nor base64"),
            (&format!("k.1 {HEX_A}\n"), "token.keys:1: key id `k.1` must be"),
            (&format!("k1 {HEX_A}\nk1 {HEX_A}\n"), "token.keys:2: key id `k1` is listed twice"),
            ("# only a comment\n", "token.keys: lists no key"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
            assert!(!e.contains(HEX_A), "{e}");
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let r = parse(&format!("k1 {HEX_A}\n")).unwrap();
        let d = format!("{r:?}");
        assert!(d.contains("k1") && d.contains("[redacted]"), "{d}");
        let k = r.signing();
        for s in [k.challenge_secret(), k.key_signature_secret(), HEX_A] {
            assert!(!d.contains(s), "{d}");
        }
        assert!(!d.contains(&format!("{:?}", k.token_mac)), "{d}");
    }

    #[test]
    fn load_refuses_world_readable() {
        use std::os::unix::fs::PermissionsExt as _;
        let p = std::env::temp_dir().join(format!("keyward-keys-test-{}", std::process::id()));
        std::fs::write(&p, format!("k1 {HEX_A}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = KeyRing::load(&p).unwrap_err().to_string();
        assert!(e.contains("mode 644") && e.contains("chmod o-rwx"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(KeyRing::load(&p).unwrap().signing().kid(), "k1");
        std::fs::remove_file(&p).unwrap();
        assert!(matches!(KeyRing::load(&p), Err(KeyFileError::Read { .. })));
    }
}
