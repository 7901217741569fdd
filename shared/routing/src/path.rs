//! Path normalization before matching (RFC 3986 §5.2.4), as Istio does by default: without it
//! `/public/../admin` would match a `/public/` prefix and reach `/admin` upstream.

/// The path with `.` and `..` segments removed (also when written `%2e`), or `None` when it is
/// already normal. The upstream must be sent the normalized path too.
pub fn normalize_path(path: &str) -> Option<String> {
    // A dot segment needs a '.' (or its escape, "%2e"); most paths have neither.
    if !path.contains(['.', '%']) {
        return None;
    }
    let has_dots = path.split('/').any(|s| is_dot(s) || is_dotdot(s));
    if !has_dots {
        return None;
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
        ] {
            assert_eq!(normalize_path(path), None, "{path}");
        }
    }
}
