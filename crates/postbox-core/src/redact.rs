//! Keeping secrets out of messages and logs.

/// `url` with its password replaced by `***` (user info that cannot be
/// delimited shown as `<redacted>@`) and every query parameter whose name
/// holds `password`, `token` or `secret` dropped, for error messages and
/// logs. Works for every URL postbox takes (databases and brokers); text
/// that is not a URL keeps everything but the values of such `key=value`
/// words (libpq-style strings).
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
                Some((k, _)) if is_secret_name(k) => format!("{k}=***"),
                _ => word.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" ");
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    if let Some(at) = rest.rfind('@')
        && rest[..at].contains(['/', '?', '#'])
    {
        // an unescaped '/', '?' or '#' in the password, or an '@' past the
        // host: the user info cannot be told apart, so none of it is shown
        return format!(
            "{scheme}<redacted>@{}",
            without_password_params(&rest[at + 1..])
        );
    }
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    // the last '@' ends the user info: a password may contain '@'
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    format!("{scheme}{authority}{}", without_password_params(tail))
}

/// Whether a query parameter or `key=value` word names a secret: its name
/// contains `password`, `token` or `secret` (`sslpassword`, `access_token`,
/// `client_secret`, …), whatever the case.
fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "token", "secret"]
        .iter()
        .any(|s| name.contains(s))
}

/// `tail` (path, query, fragment) without query parameters that name a
/// secret ([`is_secret_name`]).
fn without_password_params(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let is_password = |kv: &str| kv.split('=').next().is_some_and(is_secret_name);
    if !query.split('&').any(is_password) {
        return tail.to_owned();
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| !kv.is_empty() && !is_password(kv))
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

/// `url` with its whole user-info part (user name and password) and any
/// `password=` query parameter removed, for error messages and logs of
/// brokers whose user name may itself be a secret (a NATS token,
/// `nats://TOKEN@host`). Unlike [`redact_url`], which keeps the user name,
/// nothing before the host survives.
///
/// The user info ends at the last `@` (a password may contain `@`, and
/// `/`). When a `?` or `#` comes before that `@`, it is either an `@` in
/// the query or an unescaped `?` / `#` in a password: then everything up to
/// the last `@` is shown as `<redacted>`, which may hide more than the
/// secret but never less. Text that is not a URL but holds an `@` is
/// treated the same way.
///
/// ```
/// use postbox_core::redact_userinfo;
/// assert_eq!(redact_userinfo("nats://s3cret@h:4222"), "nats://h:4222");
/// assert_eq!(redact_userinfo("amqp://u:p@ss@h:5672/%2f"), "amqp://h:5672/%2f");
/// assert_eq!(redact_userinfo("redis://h:6379/0"), "redis://h:6379/0");
/// assert_eq!(redact_userinfo("u:p@h:4222"), "<redacted>@h:4222");
/// ```
pub fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return match url.rsplit_once('@') {
            Some((_, host)) => format!("<redacted>@{host}"),
            None => url.to_owned(),
        };
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    let Some(at) = rest.rfind('@') else {
        return format!("{scheme}{}", without_password_params(rest));
    };
    if rest[..at].contains(['?', '#']) {
        return format!(
            "{scheme}<redacted>@{}",
            without_password_params(&rest[at + 1..])
        );
    }
    format!("{scheme}{}", without_password_params(&rest[at + 1..]))
}

#[cfg(test)]
mod tests {
    use super::{redact_url, redact_userinfo};
    use proptest::prelude::*;

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
            ("mysql://u:p#ss@h/db", "mysql://<redacted>@h/db"),
            (
                "postgres://h/d?sslmode=verify-full&sslpassword=hunter2",
                "postgres://h/d?sslmode=verify-full",
            ),
            (
                "https://hooks.example.com/in?access_token=hunter2&x=1",
                "https://hooks.example.com/in?x=1",
            ),
            ("host=h sslpassword=hunter2", "host=h sslpassword=***"),
            (
                "postgres://u:p/ss@h:5432/d",
                "postgres://<redacted>@h:5432/d",
            ),
            (
                "postgres://u:p?ss@h/d?password=p?ss",
                "postgres://<redacted>@h/d",
            ),
        ];
        for (url, want) in cases {
            let got = redact_url(url);
            assert_eq!(got, want, "{url}");
            for secret in [
                "s3cret", "hunter2", "p%40ss", "p@ss", "p#ss", "p/ss", "p?ss",
            ] {
                assert!(!got.contains(secret), "{got} leaks {secret}");
            }
        }
    }

    #[test]
    fn removes_the_whole_user_info() {
        let cases = [
            ("nats://s3cret@127.0.0.1:4222", "nats://127.0.0.1:4222"),
            ("nats://alice:s3cret@h:4222", "nats://h:4222"),
            ("tls://alice:s3cret@h:4222", "tls://h:4222"),
            ("amqp://guest:s3cret@h:5672/%2f", "amqp://h:5672/%2f"),
            (
                "amqps://u:p@ss@h:5671/v?heartbeat=5",
                "amqps://h:5671/v?heartbeat=5",
            ),
            ("redis://:s3cret@h:6379/0", "redis://h:6379/0"),
            ("rediss://alice:s3cret@h", "rediss://h"),
            ("nats://h:4222/?x=a@b", "nats://<redacted>@b"),
            ("nats://u:s3cret@h:4222/?x=1", "nats://h:4222/?x=1"),
            ("nats://h:4222/?password=s3cret&x=1", "nats://h:4222/?x=1"),
            ("redis://u:s3cret@h/0?PASSWORD=s3cret", "redis://h/0"),
            ("nats://h:4222/?&&x", "nats://h:4222/?&&x"),
            ("amqp://u:p?s3cret@h/", "amqp://<redacted>@h/"),
            ("amqp://u:p#s3cret@h/", "amqp://<redacted>@h/"),
            ("amqp://u:p/s3cret@h/", "amqp://h/"),
            ("nats://[::1]:4222", "nats://[::1]:4222"),
            ("alice:s3cret@h:4222", "<redacted>@h:4222"),
            ("h:4222", "h:4222"),
            ("", ""),
        ];
        for (url, want) in cases {
            let got = redact_userinfo(url);
            assert_eq!(got, want, "{url}");
            assert!(!got.contains("s3cret") && !got.contains("alice"), "{got}");
        }
    }

    proptest! {
        /// Whatever the user name and password hold (any text, including
        /// `@ : / ? #`), neither survives, and the host always does.
        #[test]
        fn user_info_never_survives(
            scheme in "(nats|tls|amqp|amqps|redis|rediss|mqtt)",
            user in "[A-Za-z0-9@:/?#%!$&'()*+,;=._~-]{0,12}SECRETUSER[A-Za-z0-9@:/?#%._~-]{0,12}",
            pass in proptest::option::of("[A-Za-z0-9@:/?#%!$&'()*+,;=._~-]{0,12}SECRETPASS[A-Za-z0-9@:/?#%._~-]{0,12}"),
            tail in "(|/|/%2f|/0|/v\\?heartbeat=5)",
        ) {
            let userinfo = match &pass {
                Some(p) => format!("{user}:{p}"),
                None => user.clone(),
            };
            let url = format!("{scheme}://{userinfo}@broker.example:4222{tail}");
            let got = redact_userinfo(&url);
            prop_assert!(!got.contains("SECRET"), "{url} -> {got}");
            prop_assert!(got.contains("broker.example:4222"), "{url} -> {got}");
        }

        /// Never panics, on any input, and never changes a secret-free input.
        #[test]
        fn any_text(raw in "\\PC{0,64}") {
            let got = redact_userinfo(&raw);
            if !raw.contains('@') && !raw.to_ascii_lowercase().contains("password") {
                prop_assert_eq!(got, raw);
            }
        }
    }
}
