//! Finding the key in what the upstream sends back, in any of the forms an
//! echo may give it, and replacing it with `[redacted]` (issue 14):
//!
//! - the key's bytes one by one, each as itself (ASCII case folded), as a
//!   percent escape (`%2F`, `%2f`, double-encoded `%252F`), as a JSON
//!   escape (`\u002f`, `\/`), as an HTML character reference (`&#47;`,
//!   `&#x2F;`), or `+` for a space; any mix of these, so a partly encoded or
//!   upper-cased key is found too (JSON and HTML escapes of code points
//!   above ASCII are not decoded: a non-ASCII key is found raw or
//!   percent-encoded);
//! - base64, standard and URL-safe, padded or not, of the key and of its
//!   form-encoding, at each of the three alignments it can have inside a
//!   longer base64 text (the characters that depend only on the key);
//! - in headers, the values of one name taken together (a key split over two
//!   lines of the same name) and the names themselves;
//! - in bodies sent with a `Content-Encoding` keyward did not ask for: gzip,
//!   deflate and br are decoded (at most [`super::forward::MAX_ANSWER`]
//!   bytes) and scrubbed, and the answer goes out unencoded; any other
//!   coding, a corrupt one or a bomb is refused (502) rather than passed on
//!   unread.

use std::io::Read as _;

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD},
};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, header};

/// What replaces the key wherever it would appear.
pub const REDACTED: &str = "[redacted]";

/// Base64 needles shorter than this are not used (they would match text
/// that has nothing to do with the key); keys of 6 bytes and more get all.
const MIN_B64: usize = 6;

/// Finds and replaces the key's forms.
#[derive(Clone)]
pub struct Scrubber {
    key: Vec<u8>,
    /// Base64 forms, matched exactly.
    b64: Vec<Vec<u8>>,
    /// Bytes a form can start with; every other position is skipped.
    starts: [bool; 256],
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrubber([redacted])")
    }
}

/// Why an answer cannot be passed on. Never carries the key (nor anything
/// else the upstream wrote, which could).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unreadable {
    #[error("the answer's content-encoding is not one keyward can read (gzip, deflate, br)")]
    UnknownEncoding,
    #[error("the answer is larger than {0} bytes once decoded")]
    TooLarge(usize),
    #[error("the answer's {0} encoding is corrupt")]
    Corrupt(&'static str),
}

impl Scrubber {
    pub fn new(key: &str) -> Scrubber {
        let form: String = form_urlencoded::byte_serialize(key.as_bytes()).collect();
        let mut b64 = Vec::new();
        for n in b64_needles(key.as_bytes()).into_iter().chain(b64_needles(form.as_bytes())) {
            if n.len() >= MIN_B64 && !b64.contains(&n) {
                b64.push(n);
            }
        }
        let mut starts = [false; 256];
        let first = key.as_bytes().first().copied().unwrap_or(b'%');
        for b in [first.to_ascii_lowercase(), first.to_ascii_uppercase(), b'%', b'\\', b'&', b'+']
            .into_iter()
            .chain(b64.iter().filter_map(|n| n.first().copied()))
        {
            if let Some(s) = starts.get_mut(usize::from(b)) {
                *s = true;
            }
        }
        Scrubber { key: key.as_bytes().to_vec(), b64, starts }
    }

    /// The end of a form of the key starting at `hay[at]`, if one does.
    fn match_at(&self, hay: &[u8], at: usize) -> Option<usize> {
        if !hay.get(at).is_some_and(|b| self.starts.get(usize::from(*b)).copied().unwrap_or(false)) {
            return None;
        }
        if let Some(end) = match_key(&self.key, hay, at) {
            return Some(end);
        }
        let rest = hay.get(at..)?;
        self.b64.iter().find(|n| rest.starts_with(n)).map(|n| at + n.len())
    }

    /// Whether any form of the key is in `hay`.
    pub fn contains(&self, hay: &[u8]) -> bool {
        (0..hay.len()).any(|i| self.match_at(hay, i).is_some())
    }

    /// `hay` with every form of the key replaced, or `None` when there is none.
    pub fn scrub(&self, hay: &[u8]) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        let mut i = 0;
        let mut copied = 0;
        while i < hay.len() {
            match self.match_at(hay, i) {
                Some(end) if end > i => {
                    let o = out.get_or_insert_with(|| Vec::with_capacity(hay.len()));
                    o.extend_from_slice(hay.get(copied..i).unwrap_or_default());
                    o.extend_from_slice(REDACTED.as_bytes());
                    i = end;
                    copied = end;
                }
                _ => i += 1,
            }
        }
        let mut o = out?;
        o.extend_from_slice(hay.get(copied..).unwrap_or_default());
        Some(o)
    }

    /// Scrub headers: a name that holds the key is dropped; the values of
    /// one name are checked one by one and together (a key split over two
    /// lines becomes one `[redacted]` line).
    pub fn headers(&self, h: &mut HeaderMap) {
        let names: Vec<HeaderName> = h.keys().cloned().collect();
        for name in names {
            if self.contains(name.as_str().as_bytes()) {
                h.remove(&name);
                continue;
            }
            let values: Vec<HeaderValue> = h.get_all(&name).iter().cloned().collect();
            let cleaned: Vec<Option<Vec<u8>>> = values.iter().map(|v| self.scrub(v.as_bytes())).collect();
            let joined: Vec<u8> =
                values.iter().zip(&cleaned).flat_map(|(v, c)| c.as_deref().unwrap_or(v.as_bytes()).to_vec()).collect();
            if values.len() > 1 && self.contains(&joined) {
                h.insert(name, HeaderValue::from_static(REDACTED));
            } else if cleaned.iter().any(Option::is_some) {
                h.remove(&name);
                for (v, c) in values.into_iter().zip(cleaned) {
                    let v = c.map_or(Ok(v), |c| HeaderValue::from_bytes(&c));
                    h.append(name.clone(), v.unwrap_or_else(|_| HeaderValue::from_static(REDACTED)));
                }
            }
        }
    }
}

/// Whether `hay[at..]` spells `key`, each byte in any of its forms; returns
/// the end. Backtracks over the forms (a `%` in the key may be literal or
/// `%25`), at most a few per byte.
fn match_key(key: &[u8], hay: &[u8], at: usize) -> Option<usize> {
    let Some((&c, rest)) = key.split_first() else { return Some(at) };
    for len in forms(c, hay.get(at..).unwrap_or_default()) {
        if let Some(end) = match_key(rest, hay, at + len) {
            return Some(end);
        }
    }
    None
}

/// The lengths of the forms of byte `c` that `s` starts with.
fn forms(c: u8, s: &[u8]) -> impl Iterator<Item = usize> {
    let hex_at = |from: usize, n: usize| -> Option<u32> {
        let h = std::str::from_utf8(s.get(from..from + n)?).ok()?;
        u32::from_str_radix(h, 16).ok().filter(|_| h.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    let c32 = u32::from(c);
    let literal = s.first().is_some_and(|b| b.eq_ignore_ascii_case(&c)).then_some(1);
    let pct = (s.first() == Some(&b'%') && hex_at(1, 2) == Some(c32)).then_some(3);
    let pct2 = (s.starts_with(b"%25") && hex_at(3, 2) == Some(c32)).then_some(5);
    let json = (c.is_ascii() && s.starts_with(b"\\u") && hex_at(2, 4) == Some(c32)).then_some(6);
    let slash = (c == b'/' && s.starts_with(b"\\/")).then_some(2);
    let plus = (c == b' ' && s.first() == Some(&b'+')).then_some(1);
    let html = if c.is_ascii() { html_ref(s, c32) } else { None };
    [literal, pct, pct2, json, slash, plus, html].into_iter().flatten()
}

/// `&#47;` or `&#x2F;` for code point `c`: the length.
fn html_ref(s: &[u8], c: u32) -> Option<usize> {
    let body = s.strip_prefix(b"&#")?;
    let end = body.iter().position(|b| *b == b';').filter(|e| *e <= 8)?;
    let digits = std::str::from_utf8(body.get(..end)?).ok()?;
    let v = match digits.strip_prefix(['x', 'X']) {
        Some(h) => u32::from_str_radix(h, 16).ok()?,
        None => digits.parse().ok()?,
    };
    (v == c).then_some(2 + end + 1)
}

/// Base64 of `bytes` at each alignment inside a longer text, standard and
/// URL-safe: only the characters that depend on `bytes` alone.
fn b64_needles(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for engine in [STANDARD_NO_PAD, URL_SAFE_NO_PAD] {
        for (pad, skip) in [(0usize, 0usize), (1, 2), (2, 3)] {
            let mut v = vec![0u8; pad];
            v.extend_from_slice(bytes);
            let enc = engine.encode(&v).into_bytes();
            let end = if v.len() % 3 == 0 { enc.len() } else { enc.len().saturating_sub(1) };
            if let Some(n) = enc.get(skip..end) {
                out.push(n.to_vec());
            }
        }
    }
    out
}

/// Undo a `Content-Encoding` keyward did not ask for, so the body can be
/// scrubbed; the header is removed. At most `max` bytes decoded.
pub fn decode(headers: &mut HeaderMap, body: Bytes, max: usize) -> Result<Bytes, Unreadable> {
    let codings: Vec<String> = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .map(|v| v.to_str().map_err(|_| Unreadable::UnknownEncoding))
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .flat_map(|v| v.split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity")
        .collect();
    headers.remove(header::CONTENT_ENCODING);
    let mut b = body;
    // Applied in the order listed, so undone from the last.
    for c in codings.iter().rev() {
        b = match c.as_str() {
            "gzip" | "x-gzip" => bounded(flate2::read::MultiGzDecoder::new(&b[..]), max, "gzip")?,
            // zlib-wrapped as the RFC says, else the raw deflate some send.
            "deflate" => match bounded(flate2::read::ZlibDecoder::new(&b[..]), max, "deflate") {
                Err(Unreadable::Corrupt(_)) => bounded(flate2::read::DeflateDecoder::new(&b[..]), max, "deflate")?,
                other => other?,
            },
            "br" => bounded(brotli_decompressor::Decompressor::new(&b[..], 4096), max, "br")?,
            _ => return Err(Unreadable::UnknownEncoding),
        };
    }
    Ok(b)
}

/// Read all of `r`, refusing more than `max` bytes.
fn bounded(r: impl std::io::Read, max: usize, name: &'static str) -> Result<Bytes, Unreadable> {
    let mut out = Vec::new();
    r.take(u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|_| Unreadable::Corrupt(name))?;
    if out.len() > max {
        return Err(Unreadable::TooLarge(max));
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use base64::engine::general_purpose::{STANDARD, URL_SAFE};

    use super::*;

    const KEY: &str = "sk_live/ab+cd=XY";

    fn clean(s: &Scrubber, text: &str) -> String {
        String::from_utf8(s.scrub(text.as_bytes()).unwrap_or_else(|| text.as_bytes().to_vec())).unwrap()
    }

    #[test]
    fn every_listed_text_form_is_replaced() {
        let s = Scrubber::new(KEY);
        let json_all: String = KEY.chars().map(|c| format!("\\u{:04x}", c as u32)).collect();
        let html: String = KEY.chars().map(|c| format!("&#x{:X};", c as u32)).collect();
        for form in [
            KEY.to_owned(),
            KEY.to_uppercase(),
            KEY.to_lowercase(),
            "sk_live%2Fab%2Bcd%3DXY".into(),
            "sk_live%2fab%2bcd%3dXY".into(),
            "sk_live%252Fab%252Bcd%253DXY".into(),
            "sk_live\\/ab\\u002bcd\\u003dXY".into(),
            json_all,
            html,
            "%73%6B_live/ab+cd%3dxy".into(),
        ] {
            let out = clean(&s, &format!("<p>echo: {form}!</p>"));
            assert_eq!(out, "<p>echo: [redacted]!</p>", "{form}");
        }
        assert!(s.scrub(b"nothing to see here").is_none());
        assert!(s.scrub(b"sk_live/ab+cd=X").is_none(), "a prefix is not the key");
    }

    #[test]
    fn base64_at_every_alignment_in_both_alphabets() {
        let s = Scrubber::new(KEY);
        let form: String = form_urlencoded::byte_serialize(KEY.as_bytes()).collect();
        for engine in [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD] {
            for inner in [KEY.to_owned(), form.clone()] {
                for prefix in ["", "k=", "api_key="] {
                    let enc = engine.encode(format!("{prefix}{inner}&more"));
                    let out = clean(&s, &format!("token {enc} end"));
                    assert!(out.contains(REDACTED), "{prefix}{inner} as {enc}: {out}");
                    // What is left cannot be decoded back to the key.
                    assert!(!out.contains(&enc), "{out}");
                }
            }
        }
    }

    #[test]
    fn headers_are_checked_by_name_and_together() {
        let s = Scrubber::new(KEY);
        let mut h = HeaderMap::new();
        h.append("x-echo", HeaderValue::from_static("sk_live/ab"));
        h.append("x-echo", HeaderValue::from_static("+cd=XY"));
        h.append("x-one", HeaderValue::from_str(&format!("key={KEY}")).unwrap());
        h.append(HeaderName::from_bytes(b"x-sk_live%2fab%2bcd%3dxy").unwrap(), HeaderValue::from_static("1"));
        h.append("x-fine", HeaderValue::from_static("a"));
        h.append("x-fine", HeaderValue::from_static("b"));
        s.headers(&mut h);
        assert_eq!(h.get_all("x-echo").iter().collect::<Vec<_>>(), ["[redacted]"]);
        assert_eq!(h["x-one"], "key=[redacted]");
        assert_eq!(h.len(), 4, "{h:?}");
        assert_eq!(h.get_all("x-fine").iter().count(), 2);
    }

    #[test]
    fn unasked_encodings_are_decoded_bounded_or_refused() {
        let body = format!("{{\"url\":\"/x?api_key={KEY}\"}}");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(body.as_bytes()).unwrap();
        let gz = Bytes::from(gz.finish().unwrap());
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(decode(&mut h, gz.clone(), 1 << 20).unwrap(), body.as_bytes());
        assert!(h.get(header::CONTENT_ENCODING).is_none());
        let mut br = Vec::new();
        {
            let mut w = brotli_writer(&mut br);
            w.write_all(body.as_bytes()).unwrap();
        }
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
        assert_eq!(decode(&mut h, Bytes::from(br), 1 << 20).unwrap(), body.as_bytes());
        // A bomb: a megabyte of zeros is refused above the bound.
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(&vec![0u8; 1 << 20]).unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("deflate"));
        assert_eq!(decode(&mut h, Bytes::from(z.finish().unwrap()), 4096), Err(Unreadable::TooLarge(4096)));
        for (ce, b) in [("zstd", gz.clone()), ("gzip", Bytes::from_static(b"not gzip")), ("sk_live", gz)] {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(ce));
            let e = decode(&mut h, b, 1 << 20).unwrap_err();
            assert!(!e.to_string().contains("sk_live"), "{e}");
        }
    }

    /// A brotli encoder is not a dependency: a stored (uncompressed)
    /// meta-block is valid brotli and enough to test the decoder.
    fn brotli_writer(out: &mut Vec<u8>) -> impl std::io::Write + '_ {
        struct Stored<'a>(&'a mut Vec<u8>, Vec<u8>);
        impl std::io::Write for Stored<'_> {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.1.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        impl Drop for Stored<'_> {
            fn drop(&mut self) {
                *self.0 = brotli_stored(&self.1);
            }
        }
        Stored(out, Vec::new())
    }

    /// RFC 7932: WBITS=16 (one 0 bit), one uncompressed meta-block
    /// (ISLAST=0, MNIBBLES=4, MLEN-1, ISUNCOMPRESSED=1), then an empty last
    /// meta-block (ISLAST=1, ISLASTEMPTY=1).
    fn brotli_stored(data: &[u8]) -> Vec<u8> {
        assert!(!data.is_empty() && data.len() <= 1 << 16);
        let mut bits: Vec<bool> = Vec::new();
        let put = |v: u32, n: u32, bits: &mut Vec<bool>| (0..n).for_each(|i| bits.push(v >> i & 1 == 1));
        put(0, 1, &mut bits); // WBITS = 16
        put(0, 1, &mut bits); // ISLAST = 0
        put(0, 2, &mut bits); // MNIBBLES = 4
        put(data.len() as u32 - 1, 16, &mut bits); // MLEN - 1
        put(1, 1, &mut bits); // ISUNCOMPRESSED
        while !bits.len().is_multiple_of(8) {
            bits.push(false);
        }
        let mut out: Vec<u8> =
            bits.chunks(8).map(|c| c.iter().enumerate().fold(0u8, |a, (i, b)| a | (u8::from(*b) << i))).collect();
        out.extend_from_slice(data);
        out.push(0b11); // ISLAST = 1, ISLASTEMPTY = 1
        out
    }
}
