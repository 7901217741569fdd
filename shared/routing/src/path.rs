//! Path normalization before matching (RFC 3986 §5.2.4), as Istio does by default: without it
//! `/public/../admin` would match a `/public/` prefix and reach `/admin` upstream.

/// The path with escaped unreserved characters decoded (`%61` is `a`, RFC 3986 §6.2.2.2), the
/// other escapes' hex digits upper-cased (`%2f` is `%2F`, §6.2.2.1) and `.` and `..` segments
/// removed (also when written `%2e`), or `None` when it is already normal: Envoy's
/// `normalize_path`, Istio's default. Without the decoding, `/%61dmin` would pass a policy on
/// `/admin*` and reach an app that decodes it; without the upper-casing, `/a%2fb` would pass a
/// deny of `/a%2Fb`. The upstream must be sent the normalized path too.
pub fn normalize_path(path: &str) -> Option<String> {
    // A dot segment needs a '.' (or its escape, "%2e"); most paths have neither.
    if !path.contains(['.', '%', '\\']) {
        return None;
    }
    // A backslash is a slash, as Envoy's canonical path has it and as apps written for
    // Windows take it: `/public\..\admin` must not pass a policy on `/public/*`.
    let slashed = path.contains('\\').then(|| path.replace('\\', "/"));
    let path = slashed.as_deref().unwrap_or(path);
    let decoded = normalize_escapes(path);
    let path = decoded.as_deref().unwrap_or(path);
    let has_dots = path.split('/').any(|s| is_dot(s) || is_dotdot(s));
    if !has_dots {
        return decoded.or(slashed);
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        if is_dot(seg) {
            trailing_slash = i == last;
        } else if is_dotdot(seg) {
            out.pop();
            trailing_slash = i == last;
        } else {
            out.push(seg);
            trailing_slash = false;
        }
    }
    let mut normal = String::with_capacity(path.len());
    for seg in &out {
        normal.push('/');
        normal.push_str(seg);
    }
    if trailing_slash || normal.is_empty() {
        normal.push('/');
    }
    Some(normal)
}

/// `path` with each `%XX` that encodes an unreserved character (a letter, a digit, `-`, `.`,
/// `_` or `~`) decoded and the others' hex digits upper-cased, or `None` when it has neither.
/// Other escapes (`%2F`, `%20`) stay escaped.
fn normalize_escapes(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    // What the escape at `i` becomes, if anything: the byte it encodes, or itself upper-cased.
    let normal_at = |i: usize| -> Option<([u8; 3], usize)> {
        let hex = (bytes.get(i + 1..i + 3))
            .filter(|hex| bytes[i] == b'%' && hex.iter().all(u8::is_ascii_hexdigit))?;
        let byte = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            Some(([byte, 0, 0], 1))
        } else {
            let upper = [
                b'%',
                hex[0].to_ascii_uppercase(),
                hex[1].to_ascii_uppercase(),
            ];
            (upper[1..] != *hex).then_some((upper, 3))
        }
    };
    let first = (0..bytes.len()).find(|&i| normal_at(i).is_some())?;
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..first]);
    let mut i = first;
    while i < bytes.len() {
        match normal_at(i) {
            Some((normal, len)) => {
                out.extend_from_slice(&normal[..len]);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    // ASCII replaced ASCII escapes: still UTF-8.
    String::from_utf8(out).ok()
}

fn is_dot(seg: &str) -> bool {
    seg == "." || seg.eq_ignore_ascii_case("%2e")
}

fn is_dotdot(seg: &str) -> bool {
    ["..", "%2e.", ".%2e", "%2e%2e"]
        .iter()
        .any(|dots| seg.eq_ignore_ascii_case(dots))
}

#[cfg(test)]
mod tests {
    use super::normalize_path;

    #[test]
    fn removes_dot_segments() {
        for (raw, want) in [
            ("/public/../admin", "/admin"),
            ("/a/./b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E./admin", "/admin"),
            ("/..", "/"),
            ("/reviews/%61dmin", "/reviews/admin"),
            ("/%7Euser/%2Fkept%20too", "/~user/%2Fkept%20too"),
            ("/a/%2E%2e/%62", "/b"),
            ("/public\\..\\admin", "/admin"),
            ("/a\\b", "/a/b"),
            ("/api/a%2fb", "/api/a%2Fb"),
            ("/x%2f%3a%7e", "/x%2F%3A~"),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Some(want), "{raw}");
        }
    }

    #[test]
    fn leaves_normal_paths_alone() {
        for path in [
            "/",
            "/a/b",
            "/a..b/c",
            "/.well-known/x",
            "/a/b/",
            "//double",
            "/a%2Fb%20c",
            "/100%",
            "/%zz",
        ] {
            assert_eq!(normalize_path(path), None, "{path}");
        }
    }
}
