//! Matching one request against one match block.

use std::borrow::Cow;

use weir_config::{Match, PathMatch, ValueMatch};

/// Read access to request headers; names are lower case.
pub trait Headers {
    /// The first value of header `name`, if present and valid UTF-8.
    fn get(&self, name: &str) -> Option<&str>;
}

/// Headers as a list of (name, value) pairs, for tests and `explain`.
pub struct HeaderList<'a>(pub &'a [(&'a str, &'a str)]);

impl Headers for HeaderList<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// What routing sees of a request.
pub struct Request<'a> {
    pub method: &'a str,
    /// Lower case, without port.
    pub host: &'a str,
    /// The path, without query.
    pub path: &'a str,
    /// The raw query string, without '?'.
    pub query: Option<&'a str>,
    pub headers: &'a dyn Headers,
}

impl Request<'_> {
    /// The first value of query parameter `name`, percent-decoded.
    fn query_param(&self, name: &str) -> Option<Cow<'_, str>> {
        form_urlencoded::parse(self.query?.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

/// Whether `req` matches block `m`: the request path, so no allocation.
pub(crate) fn matches(m: &Match, req: &Request<'_>) -> bool {
    let path_ok = match &m.path {
        None => true,
        Some(PathMatch::Exact(s)) => req.path == s,
        Some(PathMatch::Prefix(s)) => req.path.starts_with(s.as_str()),
        Some(PathMatch::Regex(r)) => r.is_match(req.path),
    };
    path_ok
        && (m.methods.is_empty() || m.methods.iter().any(|x| x == req.method))
        && m.headers
            .iter()
            .all(|(name, cond)| value_matches(cond, req.headers.get(name)))
        && m.query
            .iter()
            .all(|(name, cond)| value_matches(cond, req.query_param(name).as_deref()))
}

fn value_matches(cond: &ValueMatch, value: Option<&str>) -> bool {
    match (cond, value) {
        (ValueMatch::Present(want), v) => *want == v.is_some(),
        (_, None) => false,
        (ValueMatch::Exact(s), Some(v)) => v == s,
        (ValueMatch::Prefix(s), Some(v)) => v.starts_with(s.as_str()),
        (ValueMatch::Regex(r), Some(v)) => r.is_match(v),
    }
}

/// Why `req` does not match block `m`, or `None` if it does (for `explain`; agrees with
/// [`matches`], which the tests check).
pub(crate) fn mismatch(m: &Match, req: &Request<'_>) -> Option<String> {
    if let Some(p) = &m.path {
        let ok = match p {
            PathMatch::Exact(s) => req.path == s,
            PathMatch::Prefix(s) => req.path.starts_with(s.as_str()),
            PathMatch::Regex(r) => r.is_match(req.path),
        };
        if !ok {
            let want = match p {
                PathMatch::Exact(s) => format!("is not {s:?}"),
                PathMatch::Prefix(s) => format!("does not start with {s:?}"),
                PathMatch::Regex(r) => format!("does not match regex {:?}", r.source),
            };
            return Some(format!("path {:?} {want}", req.path));
        }
    }
    if !m.methods.is_empty() && !m.methods.iter().any(|x| x == req.method) {
        return Some(format!(
            "method {} is not one of {:?}",
            req.method, m.methods
        ));
    }
    for (name, cond) in &m.headers {
        if let Some(why) = value_mismatch(cond, req.headers.get(name)) {
            return Some(format!("header {name}: {why}"));
        }
    }
    for (name, cond) in &m.query {
        if let Some(why) = value_mismatch(cond, req.query_param(name).as_deref()) {
            return Some(format!("query {name}: {why}"));
        }
    }
    None
}

fn value_mismatch(cond: &ValueMatch, value: Option<&str>) -> Option<String> {
    let ok = value_matches(cond, value);
    if ok {
        return None;
    }
    Some(match (cond, value) {
        (ValueMatch::Present(true), _) => "absent".into(),
        (ValueMatch::Present(false), _) => "present, but must be absent".into(),
        (ValueMatch::Exact(s), Some(v)) => format!("{v:?} is not {s:?}"),
        (ValueMatch::Prefix(s), Some(v)) => format!("{v:?} does not start with {s:?}"),
        (ValueMatch::Regex(r), Some(v)) => format!("{v:?} does not match regex {:?}", r.source),
        (_, None) => "absent".into(),
    })
}
