//! Turning sqlx errors into [`StoreError`]s, and keeping passwords out of them.

use postbox_core::StoreError;

/// SQLSTATEs after which retrying later is the right response: connection
/// exceptions (class 08), server shutting down or starting (57P01..57P03),
/// too many connections (53300), serialization failure and deadlock (40001,
/// 40P01; the transaction was rolled back and may simply be run again).
fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01"
        )
}

/// Maps an error from a query on an established pool.
pub(crate) fn map(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => StoreError::Unavailable(Box::new(e)),
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            if transient_sqlstate(&code) {
                StoreError::Unavailable(Box::new(e))
            } else if code == "42P01" || code == "42703" || code == "42883" {
                // undefined table / column / function
                StoreError::Schema(db.message().to_owned())
            } else {
                StoreError::Database(Box::new(e))
            }
        }
        _ => StoreError::Database(Box::new(e)),
    }
}

/// Maps an error from connecting to `url`; the message names the URL without
/// its password.
pub(crate) fn map_connect(url: &str, e: sqlx::Error) -> StoreError {
    let shown = redact_url(url);
    if let sqlx::Error::Database(db) = &e {
        let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
        // wrong password or role, missing database: retrying will not help
        if matches!(code.as_str(), "28P01" | "28000" | "3D000") {
            return StoreError::Config(format!("cannot connect to {shown}: {}", db.message()));
        }
    }
    let detail = redact_text(&e.to_string(), url);
    match map(e) {
        StoreError::Unavailable(_) => {
            StoreError::Unavailable(format!("cannot connect to {shown}: {detail}").into())
        }
        _ => StoreError::Database(format!("cannot connect to {shown}: {detail}").into()),
    }
}

/// Removes any password in `url` from `text` (belt and braces: sqlx errors
/// do not normally repeat the URL).
pub(crate) fn redact_text(text: &str, url: &str) -> String {
    match password_of(url) {
        Some(pw) if !pw.is_empty() => text.replace(pw, "***"),
        _ => text.to_owned(),
    }
}

fn password_of(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    userinfo.split_once(':').map(|(_, pw)| pw)
}

/// `url` with its password removed: the `user:password@` userinfo becomes
/// `user@`, and a `password=` query parameter is dropped. Used in every
/// error and log line that names a database URL.
///
/// ```
/// use postbox_postgres::redact_url;
/// assert_eq!(redact_url("postgres://app:s3cret@db:5432/shop"), "postgres://app@db:5432/shop");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // not a URL we understand: show nothing that could be a secret
        return "<unparsable database URL>".to_owned();
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{user}{host}")
        }
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
                    !name.eq_ignore_ascii_case("password") && !kv.is_empty()
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
    use super::*;

    #[test]
    fn redact_url_removes_every_password() {
        let cases = [
            (
                "postgres://app:s3cret@db:5432/shop",
                "postgres://app@db:5432/shop",
            ),
            ("postgres://app@db/shop", "postgres://app@db/shop"),
            ("postgres://db/shop", "postgres://db/shop"),
            ("postgresql://a:p%40ss@h", "postgresql://a@h"),
            // an '@' inside the password: the last '@' ends the userinfo
            ("postgres://a:p@ss@h:1/d", "postgres://a@h:1/d"),
            (
                "postgres://h/d?sslmode=disable&password=hunter2&application_name=x",
                "postgres://h/d?sslmode=disable&application_name=x",
            ),
            ("postgres://h/d?password=hunter2", "postgres://h/d"),
            (
                "postgres://h/d?PASSWORD=hunter2#frag",
                "postgres://h/d#frag",
            ),
            ("not a url with secret", "<unparsable database URL>"),
        ];
        for (url, want) in cases {
            let got = redact_url(url);
            assert_eq!(got, want, "{url}");
            for secret in ["s3cret", "hunter2", "p%40ss", "p@ss"] {
                assert!(!got.contains(secret), "{got} leaks {secret}");
            }
        }
    }

    #[test]
    fn password_is_found_for_text_redaction() {
        assert_eq!(password_of("postgres://a:pw@h/d"), Some("pw"));
        assert_eq!(password_of("postgres://a@h/d"), None);
        assert_eq!(
            redact_text("failed for a:pw@h", "postgres://a:pw@h/d"),
            "failed for a:***@h"
        );
    }
}
