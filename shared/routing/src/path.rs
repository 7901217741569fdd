//! Path normalization before matching (RFC 3986 §5.2.4), as Istio does by default: without it
//! `/public/../admin` would match a `/public/` prefix and reach `/admin` upstream.

/// The path with escaped unreserved characters decoded (`%61` is `a`, RFC 3986 §6.2.2.2) and
/// `.` and `..` segments removed (also when written `%2e`), or `None` when it is already
/// normal: Envoy's `normalize_path`, Istio's default. Without the decoding, `/%61dmin` would
/// pass a policy on `/admin*` and reach an app that decodes it. The upstream must be sent the
/// normalized path too.
pub fn normalize_path(path: &str) -> Option<String> {
    // A dot segment needs a '.' (or its escape, "%2e"); most paths have neither.
    if !path.contains(['.', '%', '\\']) {
        return None;
    }
    // A backslash is a slash, as Envoy's canonical path has it and as apps written for
    // Windows take it: `/public\..\admin` must not pass a policy on `/public/*`.
    let slashed = path.contains('\\').then(|| path.replace('\\', "/"));
    let path = slashed.as_deref().unwrap_or(path);
    let decoded = decode_unreserved(path);
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
/// `_` or `~`) decoded, or `None` when it has none. Other escapes (`%2F`, `%20`) stay.
fn decode_unreserved(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let decode_at = |i: usize| {
        let hex = bytes.get(i + 1..i + 3)?;
        let byte = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
        (byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)).then_some(byte)
    };
    let first = (0..bytes.len()).find(|&i| bytes[i] == b'%' && decode_at(i).is_some())?;
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..first]);
    let mut i = first;
    while i < bytes.len() {
        match (bytes[i], decode_at(i)) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
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
