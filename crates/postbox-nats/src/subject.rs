//! Which subjects the publisher may publish to.

/// Checks that `subject` is a NATS subject postbox may publish to:
/// dot-separated non-empty tokens, no whitespace, no wildcards, and not a
/// system subject.
///
/// System subjects are refused because the relay publishes with its own
/// credentials whatever a producer wrote as the topic: with the default
/// template `"{topic}"`, a topic `$JS.API.STREAM.DELETE.ORDERS` would be a
/// JetStream API request that deletes a stream, and one under `_INBOX.`
/// would answer somebody else's request. A first token starting with `$`
/// (`$JS`, `$SYS`, ...) or equal to `_INBOX` is refused, but for `$KV` and
/// `$O`: writes to a key-value or object store bucket are ordinary stream
/// publishes.
pub(crate) fn check_subject(subject: &str) -> Result<(), String> {
    let bad = subject.is_empty()
        || subject.contains(|c: char| c.is_whitespace() || c.is_control())
        || subject
            .split('.')
            .any(|t| t.is_empty() || t == "*" || t == ">");
    if bad {
        return Err(format!(
            "{subject:?} is not a valid NATS subject to publish to (dot-separated non-empty tokens, no spaces or wildcards)"
        ));
    }
    let first = subject.split('.').next().unwrap_or_default();
    // `$KV` and `$O`: a key-value or object store bucket's stream, written
    // by plain publishes that get a PubAck like any other
    let bucket = first == "$KV" || first == "$O";
    if (first.starts_with('$') && !bucket) || first == "_INBOX" {
        return Err(format!(
            "{subject:?} is a NATS system subject ($... or _INBOX...): postbox does not publish to those (change the topic or subject_template)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_subject;

    #[test]
    fn ordinary_subjects_pass() {
        for s in [
            "orders",
            "orders.created",
            "a.$b",
            "x._INBOX",
            "_INBOXES.a",
            "$KV.orders.k1",
            "$O.files.chunk",
        ] {
            assert_eq!(check_subject(s), Ok(()), "{s}");
        }
    }

    #[test]
    fn malformed_and_system_subjects_are_refused() {
        for s in [
            "",
            "a..b",
            "a.*",
            "a.>",
            "a b",
            "$JS.API.STREAM.DELETE.X",
            "$SYS.REQ.SERVER.PING",
            "$JSC.x",
            "_INBOX.abc",
        ] {
            let e = check_subject(s).expect_err(s);
            assert!(e.contains(&format!("{s:?}")), "{e}");
        }
    }
}
