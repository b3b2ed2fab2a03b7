//! Keeping secrets out of messages and logs.

/// `url` with any password replaced by `***`, for messages and logs.
///
/// ```
/// assert_eq!(postbox_core::redact_url("postgres://u:secret@h/db"), "postgres://u:***@h/db");
/// assert_eq!(postbox_core::redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{path}")
            } else {
                format!("{scheme}://{user}@{host}{path}")
            }
        }
        None => url.to_owned(),
    }
}
