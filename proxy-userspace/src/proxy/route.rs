//! The route allow-list. A route maps a method and a path template that the
//! page calls on keyward (`/postcodes/{postcode}`) onto a fixed upstream path
//! (`/postcodes/{postcode}`). Parameters are percent-decoded, must match
//! their pattern in full, and are percent-encoded again (everything but
//! RFC 3986 unreserved characters) when the upstream path is built, so no
//! value can add a segment, a query, or climb with `..`. Only listed query
//! keys are passed on; the client never picks the host, scheme or path.

use std::collections::BTreeMap;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use regex_lite::Regex;

use crate::config;

/// Everything but unreserved characters (`A-Z a-z 0-9 - . _ ~`) is encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
/// Longest accepted parameter or query value, in bytes after decoding.
pub const MAX_VALUE: usize = 256;
/// The pattern of a parameter that the route does not constrain.
#[cfg(test)]
const DEFAULT_PATTERN: &str = "[A-Za-z0-9_-]{1,64}";

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    Param(String),
}

/// What a parameter's value must match.
#[derive(Debug, Clone)]
enum Pattern {
    /// `[A-Za-z0-9_-]{1,64}`, checked without the regex engine (most routes
    /// use it, and regex-lite's matcher showed in the refusal profile).
    Default,
    Custom(Regex),
}

impl Pattern {
    fn compile(pattern: Option<&str>) -> Result<Pattern, regex_lite::Error> {
        match pattern {
            None => Ok(Pattern::Default),
            Some(p) => Regex::new(&format!("^(?:{p})$")).map(Pattern::Custom),
        }
    }

    fn is_match(&self, v: &str) -> bool {
        match self {
            Pattern::Default => {
                (1..=64).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            }
            Pattern::Custom(re) => re.is_match(v),
        }
    }
}

/// A compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    /// The route's name in metrics and logs: `METHOD path-template`.
    pub name: String,
    pub method: http::Method,
    path: Vec<Segment>,
    upstream: Vec<Segment>,
    params: BTreeMap<String, Pattern>,
    query: Vec<String>,
    /// Cost of one billable call, in micro-units.
    pub cost: u64,
    pub charge_any: bool,
    pub cache_ttl: Option<std::time::Duration>,
}

/// Why a request matched no route or was refused by one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    /// No route for this method and path.
    NoRoute,
    /// The path matched but a value was refused; the message names it.
    BadParameter(String),
}

/// A request mapped onto its upstream call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// Upstream path relative to `base_url` (already encoded).
    pub path: String,
    /// Kept query pairs (decoded), in request order.
    pub query: Vec<(String, String)>,
}

fn template(t: &str) -> Result<Vec<Segment>, String> {
    if !t.starts_with('/') {
        return Err(format!("path `{t}` must start with /"));
    }
    t.split('/')
        .skip(1)
        .map(|s| {
            if let Some(name) = s.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!("bad parameter name `{{{name}}}` in `{t}`"));
                }
                Ok(Segment::Param(name.to_owned()))
            } else if s.contains(['{', '}', '?', '#', '%']) {
                Err(format!("path `{t}`: segment `{s}` is neither literal nor {{param}}"))
            } else {
                Ok(Segment::Literal(s.to_owned()))
            }
        })
        .collect()
}

fn names(segs: &[Segment]) -> Vec<&str> {
    segs.iter()
        .filter_map(|s| match s {
            Segment::Param(n) => Some(n.as_str()),
            Segment::Literal(_) => None,
        })
        .collect()
}

impl Route {
    /// Compile a configured route, or say what is wrong with it.
    pub fn compile(r: &config::Route) -> Result<Route, String> {
        let method: http::Method =
            r.method.to_ascii_uppercase().parse().map_err(|_| format!("`{}` is not an HTTP method", r.method))?;
        let path = template(&r.path)?;
        let upstream = template(&r.upstream_path)?;
        let declared = names(&path);
        for n in names(&upstream) {
            if !declared.contains(&n) {
                return Err(format!("upstream_path uses {{{n}}} which path does not capture"));
            }
        }
        let mut params = BTreeMap::new();
        for n in &declared {
            let re = Pattern::compile(r.params.get(*n).map(String::as_str))
                .map_err(|e| format!("params.{n}: bad pattern: {e}"))?;
            params.insert((*n).to_owned(), re);
        }
        if let Some(extra) = r.params.keys().find(|k| !declared.contains(&k.as_str())) {
            return Err(format!("params.{extra} names no {{{extra}}} in path"));
        }
        let cost =
            super::limit::micros(r.cost).ok_or_else(|| format!("cost {} must be a non-negative amount", r.cost))?;
        Ok(Route {
            name: format!("{} {}", method, r.path),
            method,
            path,
            upstream,
            params,
            query: r.query.clone(),
            cost,
            charge_any: r.charge_on == config::ChargeOn::Any,
            cache_ttl: r.cache_ttl.map(|s| s.0),
        })
    }

    /// Whether this route's template matches `path` (method aside).
    fn matches_path(&self, raw: &[&str]) -> bool {
        raw.len() == self.path.len()
            && self.path.iter().zip(raw).all(|(s, r)| match s {
                Segment::Literal(l) => l == r,
                Segment::Param(_) => true,
            })
    }

    /// Map a request path and query onto the upstream call.
    pub fn map(&self, raw: &[&str], query: Option<&str>, drop_key: Option<&str>) -> Result<Mapped, Miss> {
        let mut values = BTreeMap::new();
        for (s, r) in self.path.iter().zip(raw) {
            if let Segment::Param(n) = s {
                let v =
                    percent_decode_str(r).decode_utf8().map_err(|_| Miss::BadParameter(format!("{n}: not UTF-8")))?;
                if v.len() > MAX_VALUE || v.chars().any(char::is_control) || v == "." || v == ".." {
                    return Err(Miss::BadParameter(format!("{n}: not an acceptable value")));
                }
                if !self.params.get(n).is_some_and(|re| re.is_match(&v)) {
                    return Err(Miss::BadParameter(format!("{n} does not match its pattern")));
                }
                values.insert(n.as_str(), v.into_owned());
            }
        }
        let mut path = String::new();
        for s in &self.upstream {
            path.push('/');
            match s {
                Segment::Literal(l) => path.push_str(l),
                Segment::Param(n) => {
                    let v = values.get(n.as_str()).map_or("", String::as_str);
                    path.extend(utf8_percent_encode(v, COMPONENT));
                }
            }
        }
        let mut kept = Vec::new();
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            if Some(k.as_ref()) == drop_key || !self.query.iter().any(|q| q == &k) {
                continue; // unlisted keys (and any client-sent key) are dropped
            }
            if v.len() > MAX_VALUE || v.chars().any(char::is_control) {
                return Err(Miss::BadParameter(format!("query {k}: not an acceptable value")));
            }
            kept.push((k.into_owned(), v.into_owned()));
        }
        Ok(Mapped { path, query: kept })
    }
}

/// The compiled allow-list.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    routes: Vec<Route>,
}

impl Routes {
    /// Compile every route; an error names the index of the route that is wrong.
    pub fn compile(rs: &[toml::Spanned<config::Route>]) -> Result<Routes, (usize, String)> {
        let routes = rs
            .iter()
            .enumerate()
            .map(|(i, r)| Route::compile(r.get_ref()).map_err(|e| (i, e)))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, r) in routes.iter().enumerate() {
            if r.cache_ttl.is_some() && r.method != http::Method::GET && r.method != http::Method::HEAD {
                let m = &r.method;
                return Err((
                    i,
                    format!(
                        "cache_ttl on a {m} route would serve one client's answer to another; cache GET routes only"
                    ),
                ));
            }
        }
        Ok(Routes { routes })
    }

    /// The route for `method` and `path`. `Err(NoRoute)` when none matches.
    pub fn find<'a, 'b>(&'a self, method: &http::Method, path: &'b str) -> Result<(&'a Route, Vec<&'b str>), Miss> {
        let raw: Vec<&str> = path.split('/').skip(1).collect();
        if !path.starts_with('/') {
            return Err(Miss::NoRoute);
        }
        let r = self.routes.iter().find(|r| r.method == *method && r.matches_path(&raw)).ok_or(Miss::NoRoute)?;
        Ok((r, raw))
    }

    /// Methods allowed on `path` (for CORS preflight).
    pub fn methods_for(&self, path: &str) -> Vec<&http::Method> {
        let raw: Vec<&str> = path.split('/').skip(1).collect();
        self.routes.iter().filter(|r| r.matches_path(&raw)).map(|r| &r.method).collect()
    }

    /// All routes.
    pub fn all(&self) -> &[Route] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_pattern_matches_exactly_what_its_regex_does() {
        let re = Regex::new(&format!("^(?:{DEFAULT_PATTERN})$")).unwrap();
        let long = "a".repeat(64);
        let too_long = "a".repeat(65);
        for v in ["", "a", "AB1", "x_y-z", "a b", "a/b", "é", "a.b", "%41", "ab\n", long.as_str(), too_long.as_str()] {
            assert_eq!(Pattern::Default.is_match(v), re.is_match(v), "{v:?}");
        }
    }

    fn route(path: &str, up: &str, params: &[(&str, &str)], query: &[&str]) -> Route {
        Route::compile(&config::Route {
            method: "GET".into(),
            path: path.into(),
            upstream_path: up.into(),
            params: params.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect(),
            query: query.iter().map(|q| (*q).into()).collect(),
            cost: 0.02,
            charge_on: config::ChargeOn::Success,
            cache_ttl: None,
        })
        .unwrap()
    }

    fn map(r: &Route, path: &str, q: Option<&str>) -> Result<Mapped, Miss> {
        let raw: Vec<&str> = path.split('/').skip(1).collect();
        assert!(r.matches_path(&raw), "{path}");
        r.map(&raw, q, Some("api_key"))
    }

    #[test]
    fn maps_parameters_and_filters_query() {
        let r = route(
            "/postcodes/{postcode}",
            "/v2/lookup/{postcode}",
            &[("postcode", "^[A-Za-z0-9 ]{2,10}$")],
            &["filter"],
        );
        let m = map(&r, "/postcodes/SW1A%201AA", Some("filter=a,b&evil=1&api_key=stolen")).unwrap();
        assert_eq!(m.path, "/v2/lookup/SW1A%201AA");
        assert_eq!(m.query, vec![("filter".to_owned(), "a,b".to_owned())]);
        assert_eq!(r.cost, 20_000);
    }

    #[test]
    fn hostile_values_never_change_the_upstream_path() {
        let r = route("/p/{x}", "/q/{x}", &[("x", ".*")], &["f"]);
        // Even with a permissive pattern, slashes and dots stay inside one segment.
        assert_eq!(map(&r, "/p/a%2F..%2Fadmin", None).unwrap().path, "/q/a%2F..%2Fadmin");
        assert_eq!(map(&r, "/p/%3Fx%3D1%23", None).unwrap().path, "/q/%3Fx%3D1%23");
        assert!(matches!(map(&r, "/p/..", None), Err(Miss::BadParameter(_))));
        assert!(matches!(map(&r, "/p/%2E%2E", None), Err(Miss::BadParameter(_))));
        assert!(matches!(map(&r, "/p/a%0D%0AHost:%20evil", None), Err(Miss::BadParameter(_))));
        assert!(matches!(map(&r, "/p/%FF", None), Err(Miss::BadParameter(_))));
        let long = format!("/p/{}", "a".repeat(MAX_VALUE + 1));
        assert!(matches!(map(&r, &long, None), Err(Miss::BadParameter(_))));
        assert!(matches!(map(&r, "/p/x", Some("f=a%0d%0ab")), Err(Miss::BadParameter(_))));
    }

    #[test]
    fn patterns_are_anchored() {
        let r = route("/p/{x}", "/q/{x}", &[("x", "[0-9]+")], &[]);
        assert!(map(&r, "/p/123", None).is_ok());
        assert!(matches!(map(&r, "/p/123abc", None), Err(Miss::BadParameter(_))));
        let d = route("/p/{x}", "/q/{x}", &[], &[]);
        assert!(matches!(map(&d, "/p/a.b", None), Err(Miss::BadParameter(_))));
    }

    #[test]
    fn finding_routes() {
        let rs = Routes { routes: vec![route("/postcodes/{p}", "/x/{p}", &[], &[])] };
        assert!(rs.find(&http::Method::GET, "/postcodes/AB1").is_ok());
        assert_eq!(rs.find(&http::Method::POST, "/postcodes/AB1").unwrap_err(), Miss::NoRoute);
        assert_eq!(rs.find(&http::Method::GET, "/postcodes/AB1/extra").unwrap_err(), Miss::NoRoute);
        assert_eq!(rs.find(&http::Method::GET, "/postcodes").unwrap_err(), Miss::NoRoute);
        assert_eq!(rs.find(&http::Method::GET, "http://evil/postcodes/AB1").unwrap_err(), Miss::NoRoute);
        assert_eq!(rs.methods_for("/postcodes/x"), vec![&http::Method::GET]);
    }

    #[test]
    fn bad_routes_are_refused() {
        let c = |path: &str, up: &str, params: &[(&str, &str)]| {
            Route::compile(&config::Route {
                method: "GET".into(),
                path: path.into(),
                upstream_path: up.into(),
                params: params.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect(),
                query: vec![],
                cost: 0.0,
                charge_on: config::ChargeOn::Success,
                cache_ttl: None,
            })
        };
        assert!(c("/a/{x}", "/b/{y}", &[]).unwrap_err().contains("{y}"));
        assert!(c("/a/{x}", "/b/{x}", &[("x", "(")]).unwrap_err().contains("bad pattern"));
        assert!(c("/a/{x}", "/b/{x}", &[("z", ".")]).unwrap_err().contains("params.z"));
        assert!(c("a", "/b", &[]).is_err());
        assert!(c("/a/%2F", "/b", &[]).is_err());
    }
}
