//! Turning sqlx errors into [`StoreError`]s, and keeping passwords out of them.

use postbox_core::StoreError;

/// SQLSTATEs after which retrying later is the right response: connection
/// exceptions (class 08), server shutting down or starting (57P01..57P03),
/// too many connections (53300), serialization failure and deadlock (40001,
/// 40P01; the transaction was rolled back and may simply be run again), a
/// row lock not granted within the claim sessions' `lock_timeout` (55P03),
/// a session the server ended for idling in or out of a transaction (25P03,
/// 57P05), a statement cancelled by an operator or a `statement_timeout`
/// (57014), a server out of disk or memory (53100, 53200), and a read-only
/// server (25006: connected to a standby, as right after a failover).
fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01"
                | "57P02"
                | "57P03"
                | "57P05"
                | "57014"
                | "53100"
                | "53200"
                | "53300"
                | "40001"
                | "40P01"
                | "55P03"
                | "25P03"
                | "25006"
        )
}

/// Maps an error from a query on an established pool.
pub(crate) fn map(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
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
    // `Io` says "error communicating with database: Connection refused (os
    // error 111)"; after "cannot connect to" only the io error adds anything
    let detail = match &e {
        sqlx::Error::Io(io) => io.to_string(),
        _ => e.to_string(),
    };
    let detail = redact_text(&detail, url);
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

pub use postbox_core::redact_url;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_found_for_text_redaction() {
        assert_eq!(password_of("postgres://a:pw@h/d"), Some("pw"));
        assert_eq!(password_of("postgres://a@h/d"), None);
        assert_eq!(
            redact_text("failed for a:pw@h", "postgres://a:pw@h/d"),
            "failed for a:***@h"
        );
    }

    #[test]
    fn lock_and_idle_timeouts_are_retried_later() {
        for code in [
            "55P03", "25P03", "08006", "40P01", "57P05", "57014", "53100", "53200", "25006",
        ] {
            assert!(transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "42P01", "22P02"] {
            assert!(!transient_sqlstate(code), "{code}");
        }
    }
}
