//! Keeping secrets out of messages and logs.

/// `url` with its password replaced by `***` and any `password=` query
/// parameter dropped, for error messages and logs. Works for every URL
/// postbox takes (databases and brokers); text that is not a URL keeps
/// everything but the values of `password=` words (libpq-style strings).
///
/// ```
/// use postbox_core::redact_url;
/// assert_eq!(redact_url("postgres://u:secret@h/db"), "postgres://u:***@h/db");
/// assert_eq!(redact_url("amqp://u:p@ss@h:5672/%2f"), "amqp://u:***@h:5672/%2f");
/// assert_eq!(redact_url("postgres://h/db?sslmode=require&password=x"), "postgres://h/db?sslmode=require");
/// assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url
            .split(' ')
            .map(|word| match word.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => word.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" ");
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    // the last '@' ends the user info: a password may contain '@'
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let (query, fragment) = match query.split_once('#') {
                Some((q, f)) => (q, Some(f)),
                None => (query, None),
            };
            let kept: Vec<&str> = query
                .split('&')
                .filter(|kv| {
                    let name = kv.split('=').next().unwrap_or("");
                    !kv.is_empty() && !name.eq_ignore_ascii_case("password")
                })
                .collect();
            let mut t = path.to_owned();
            if !kept.is_empty() {
                t.push('?');
                t.push_str(&kept.join("&"));
            }
            if let Some(f) = fragment {
                t.push('#');
                t.push_str(f);
            }
            t
        }
        None => tail.to_owned(),
    };
    format!("{scheme}{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn removes_every_password() {
        let cases = [
            (
                "postgres://app:s3cret@db:5432/shop",
                "postgres://app:***@db:5432/shop",
            ),
            ("postgres://app@db/shop", "postgres://app@db/shop"),
            ("postgres://db/shop", "postgres://db/shop"),
            ("postgresql://a:p%40ss@h", "postgresql://a:***@h"),
            ("postgres://a:p@ss@h:1/d", "postgres://a:***@h:1/d"),
            (
                "postgres://h/d?sslmode=disable&password=hunter2&application_name=x",
                "postgres://h/d?sslmode=disable&application_name=x",
            ),
            ("postgres://h/d?password=hunter2", "postgres://h/d"),
            (
                "postgres://h/d?PASSWORD=hunter2#frag",
                "postgres://h/d#frag",
            ),
            (
                "mysql://u:p%40ss@h:3306/db?ssl-mode=disabled",
                "mysql://u:***@h:3306/db?ssl-mode=disabled",
            ),
            (
                "host=h user=u password=hunter2 dbname=d",
                "host=h user=u password=*** dbname=d",
            ),
            ("stdout", "stdout"),
        ];
        for (url, want) in cases {
            let got = redact_url(url);
            assert_eq!(got, want, "{url}");
            for secret in ["s3cret", "hunter2", "p%40ss", "p@ss"] {
                assert!(!got.contains(secret), "{got} leaks {secret}");
            }
        }
    }
}
