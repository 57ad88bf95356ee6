//! The secret: where it comes from (`key_env` or `key_file`, read at start
//! and on reload, never from the TOML itself), how it is put on the upstream
//! request (a query parameter or a header, after any client-sent copy is
//! removed), and how it is scrubbed from anything the upstream sends back
//! (the forms it is found in: [`super::scrub`]).
//! [`Secret`] prints as `[redacted]` everywhere, including `Debug`.

use std::{fmt, path::Path};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{Inject, Upstream};

pub use super::scrub::REDACTED;
use super::scrub::{Scrubber, Unreadable};

/// The upstream key. No `Display`; `Debug` is redacted.
#[derive(Clone)]
pub struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Why the key could not be loaded. Never contains the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("upstream.key_env: environment variable {0} is not set or empty")]
    Env(String),
    #[error("upstream.key_file: cannot read {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream: set exactly one of key_env and key_file")]
    Source,
    #[error("upstream key is empty or contains characters a header cannot carry")]
    Unusable,
    #[error("[upstream] inject: {0}")]
    Placement(String),
}

impl Secret {
    /// Load from the configured source.
    pub fn load(u: &Upstream) -> Result<Secret, KeyError> {
        let raw = match (&u.key_env, &u.key_file) {
            (Some(var), None) => std::env::var(var).map_err(|_| KeyError::Env(var.clone()))?,
            (None, Some(path)) => read_file(path)?,
            _ => return Err(KeyError::Source),
        };
        let key = raw.trim().to_owned();
        if key.is_empty() || key.chars().any(|c| c.is_control()) {
            return Err(KeyError::Unusable);
        }
        Ok(Secret(key))
    }

    /// For unit tests.
    #[cfg(test)]
    pub fn from_str_for_test(k: &str) -> Secret {
        Secret(k.to_owned())
    }
}

fn read_file(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::File { path: path.display().to_string(), source })
}

/// Puts the key on requests and scrubs it from answers. `Debug` shows only
/// where the key goes.
#[derive(Clone)]
pub struct Injector {
    secret: Secret,
    place: Place,
    /// Finds the key in an echoed answer, in any form.
    scrubber: Scrubber,
}

impl fmt::Debug for Injector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.place {
            Place::Query(q) => write!(f, "Injector(query {q}={REDACTED})"),
            Place::Header(h, _) => write!(f, "Injector(header {h}: {REDACTED})"),
        }
    }
}

#[derive(Clone)]
enum Place {
    Query(String),
    Header(HeaderName, HeaderValue),
}

/// Where the key goes, checked without the key (so `check` can verify it
/// from a shell that cannot read the key).
#[derive(Clone, Debug)]
pub enum Placement {
    Query(String),
    /// The header and its value template (`{key}` is replaced).
    Header(HeaderName, String),
}

impl Placement {
    /// Check `[upstream] inject`.
    pub fn new(inject: &Inject) -> Result<Placement, KeyError> {
        Ok(match inject {
            Inject::Query { query } if query.is_empty() => return Err(KeyError::Placement("query is empty".into())),
            Inject::Query { query } => Placement::Query(query.clone()),
            Inject::Header { header, value } => {
                let name = HeaderName::from_bytes(header.as_bytes())
                    .map_err(|_| KeyError::Placement(format!("`{header}` is not a header name")))?;
                if !value.contains("{key}") {
                    return Err(KeyError::Placement(format!("header value `{value}` has no {{key}}")));
                }
                HeaderValue::from_str(&value.replace("{key}", "k"))
                    .map_err(|_| KeyError::Placement(format!("`{value}` cannot be a header value")))?;
                Placement::Header(name, value.clone())
            }
        })
    }
}

impl Injector {
    /// Put the loaded secret in its checked place.
    pub fn new(placement: Placement, secret: Secret) -> Result<Injector, KeyError> {
        let place = match placement {
            Placement::Query(q) => Place::Query(q),
            Placement::Header(name, value) => {
                let mut v =
                    HeaderValue::from_str(&value.replace("{key}", &secret.0)).map_err(|_| KeyError::Unusable)?;
                v.set_sensitive(true);
                Place::Header(name, v)
            }
        };
        let scrubber = Scrubber::new(&secret.0);
        Ok(Injector { secret, place, scrubber })
    }

    /// The query key a client must not send, if the key goes in the query.
    pub fn query_key(&self) -> Option<&str> {
        match &self.place {
            Place::Query(q) => Some(q),
            Place::Header(..) => None,
        }
    }

    /// Append the key to an encoded query (query mode).
    pub fn query(&self, ser: &mut form_urlencoded::Serializer<'_, String>) {
        if let Place::Query(k) = &self.place {
            ser.append_pair(k, &self.secret.0);
        }
    }

    /// Remove any client copy of the key header, then set ours (header mode).
    pub fn headers(&self, h: &mut HeaderMap) {
        if let Place::Header(name, value) = &self.place {
            if h.remove(name).is_some() {
                tracing::debug!(header = %name, "stripped a client-sent copy of the key header");
            }
            h.insert(name.clone(), value.clone());
        }
    }

    /// Replace every form of the key in `b`.
    pub fn scrub(&self, b: &[u8]) -> Option<Vec<u8>> {
        self.scrubber.scrub(b)
    }

    /// Scrub a body.
    pub fn scrub_body(&self, b: Bytes) -> Bytes {
        self.scrub(&b).map_or(b, Bytes::from)
    }

    /// Scrub headers in place: names, values, and values of one name
    /// together.
    pub fn scrub_headers(&self, h: &mut HeaderMap) {
        self.scrubber.headers(h);
    }

    /// An upstream answer made safe to pass on: a `Content-Encoding` we did
    /// not ask for undone (bounded), then headers and body scrubbed. An
    /// answer that cannot be read is refused rather than passed on unread.
    pub fn scrub_answer(&self, h: &mut HeaderMap, body: Bytes) -> Result<Bytes, Unreadable> {
        let body = super::scrub::decode(h, body, super::forward::MAX_ANSWER)?;
        self.scrub_headers(h);
        Ok(self.scrub_body(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk_live/ab+cd=";

    fn inj(i: Inject, s: Secret) -> Injector {
        Injector::new(Placement::new(&i).unwrap(), s).unwrap()
    }

    #[test]
    fn placement_is_checked_without_the_key() {
        assert!(Placement::new(&Inject::Query { query: String::new() }).is_err());
        assert!(Placement::new(&Inject::Header { header: "bad name".into(), value: "{key}".into() }).is_err());
        assert!(Placement::new(&Inject::Header { header: "x-k".into(), value: "Bearer".into() }).is_err());
        assert!(Placement::new(&Inject::Header { header: "x-k".into(), value: "Bearer {key}".into() }).is_ok());
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::from_str_for_test(KEY);
        assert_eq!(format!("{s:?}"), REDACTED);
        let i = inj(Inject::Header { header: "Authorization".into(), value: "Bearer {key}".into() }, s);
        let dbg = format!("{i:?}");
        assert!(!dbg.contains("sk_live") && !dbg.contains("115, 107"), "{dbg}");
    }

    #[test]
    fn header_mode_strips_then_injects() {
        let i =
            inj(Inject::Header { header: "x-api-key".into(), value: "{key}".into() }, Secret::from_str_for_test(KEY));
        let mut h = HeaderMap::new();
        h.append("x-api-key", "client-guess".parse().unwrap());
        h.append("x-api-key", "another".parse().unwrap());
        i.headers(&mut h);
        assert_eq!(h.get_all("x-api-key").iter().count(), 1);
        assert_eq!(h["x-api-key"], KEY);
        assert!(h["x-api-key"].is_sensitive());
        assert_eq!(i.query_key(), None);
    }

    #[test]
    fn query_mode_appends_encoded() {
        let i = inj(Inject::Query { query: "api_key".into() }, Secret::from_str_for_test(KEY));
        let mut s = form_urlencoded::Serializer::new(String::new());
        s.append_pair("filter", "x");
        i.query(&mut s);
        assert_eq!(s.finish(), "filter=x&api_key=sk_live%2Fab%2Bcd%3D");
        assert_eq!(i.query_key(), Some("api_key"));
    }

    #[test]
    fn scrubs_every_encoding_of_the_key() {
        let i = inj(Inject::Query { query: "k".into() }, Secret::from_str_for_test(KEY));
        let body = format!("bad request: GET /x?k={} or {} or {}", "sk_live%2Fab%2Bcd%3D", KEY, "sk_live%2Fab%2Bcd%3D");
        let out = String::from_utf8(i.scrub(body.as_bytes()).unwrap()).unwrap();
        assert!(!out.contains("sk_live"), "{out}");
        assert_eq!(out.matches(REDACTED).count(), 3);
        let echoes = "{\"url\":\"k=sk_live\\/ab+cd=\",\"q\":\"sk_live%2fab%2bcd%3d\"}";
        let out = String::from_utf8(i.scrub(echoes.as_bytes()).unwrap()).unwrap();
        assert!(!out.contains("sk_live"), "{out}");
        assert!(i.scrub(b"nothing here").is_none());
        let mut h = HeaderMap::new();
        h.insert("x-echo", format!("key={KEY}").parse().unwrap());
        i.scrub_headers(&mut h);
        assert_eq!(h["x-echo"], "key=[redacted]");
    }
}
