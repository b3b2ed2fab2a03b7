//! Property tests of the config parser (issue 9, bad input): whatever the
//! text of `postbox.toml`, parsing never panics, and a bad value of a known
//! key is refused with an error that names that key.

use proptest::prelude::*;

use super::FileConfig;

/// The environment the parser sees: `${SET_*}` variables exist, every other
/// name is unset.
fn env(name: &str) -> Option<String> {
    name.starts_with("SET_").then(|| format!("value of {name}"))
}

fn parse(text: &str) -> anyhow::Result<FileConfig> {
    FileConfig::parse_with_env(text, &env)
}

/// A TOML basic string holding `s` (every character the spec requires to be
/// escaped is).
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Any TOML value, written as TOML: strings (arbitrary text, durations good
/// and bad, `${VAR}` references set and unset), integers, floats (NaN and
/// infinities included), booleans, datetimes, arrays and inline tables.
fn value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        "\\PC{0,24}".prop_map(|s| quoted(&s)),
        "(0|1|30|250|9999999999999|18446744073709551616)(ns|ms|s|m|h|d|years|x|)"
            .prop_map(|s| quoted(&s)),
        "\\$\\{(SET_A|UNSET_B|)\\}?\\PC{0,6}".prop_map(|s| quoted(&s)),
        "(park|skip|text|json|stdout|\\*\\*|a\\.\\*|a\\.\\.b|\\*\\*\\.x|)".prop_map(|s| quoted(&s)),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| {
            if f.is_nan() {
                "nan".to_owned()
            } else if f.is_infinite() {
                if f > 0.0 { "inf" } else { "-inf" }.to_owned()
            } else {
                format!("{f:?}")
            }
        }),
        any::<bool>().prop_map(|b| b.to_string()),
        Just("1979-05-27T07:32:00Z".to_owned()),
        Just("07:32:00".to_owned()),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..3).prop_map(|kv| {
                let body: Vec<String> = kv.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", body.join(", "))
            }),
        ]
    })
}

/// Every key of the file, as (document with `{}` where the value goes, the
/// name an error about it must contain).
const KEYS: &[(&str, &str)] = &[
    ("[store]\nurl = {}\n", "url"),
    ("[store]\ntable = {}\n", "table"),
    ("[store]\nretain_sent = {}\n", "retain_sent"),
    ("[relay]\nbatch_size = {}\n", "batch_size"),
    ("[relay]\nlease = {}\n", "lease"),
    ("[relay]\nsend_timeout = {}\n", "send_timeout"),
    ("[relay]\npoll_interval = {}\n", "poll_interval"),
    ("[relay]\nconcurrency = {}\n", "concurrency"),
    ("[relay]\nmax_attempts = {}\n", "max_attempts"),
    ("[relay]\nretry_base = {}\n", "retry_base"),
    ("[relay]\nretry_cap = {}\n", "retry_cap"),
    ("[relay]\non_dead = {}\n", "on_dead"),
    ("[relay]\ntenant = {}\n", "tenant"),
    ("[relay]\ncleanup_interval = {}\n", "cleanup_interval"),
    ("[log]\nformat = {}\n", "format"),
    ("[publishers]\nout = {}\n", "out"),
    ("[publishers.out]\nurl = {}\n", "url"),
    (
        "[publishers.out]\nurl = \"stdout\"\n[[routes]]\ntopics = {}\npublisher = \"out\"\n",
        "topics",
    ),
    (
        "[publishers.out]\nurl = \"stdout\"\n[[routes]]\ntopics = \"**\"\npublisher = {}\n",
        "publisher",
    ),
    ("store = {}\n", "store"),
    ("relay = {}\n", "relay"),
    ("routes = {}\n", "routes"),
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any text at all: an error or a config, never a panic.
    #[test]
    fn any_text_never_panics(text in "\\PC{0,200}") {
        let _ = parse(&text);
    }

    /// Text built from the file's own sections and keys with any values:
    /// never a panic, and an accepted file has valid relay options, but for
    /// the send timeout against the lease (compared once merged with flags
    /// and environment).
    #[test]
    fn any_document_of_known_keys_never_panics(
        lines in prop::collection::vec((0..KEYS.len(), value()), 0..6)
    ) {
        let text: String = lines
            .iter()
            .map(|(k, v)| KEYS[*k].0.replace("{}", v))
            .collect();
        if let Ok(config) = parse(&text)
            && let Err(e) = config.relay.options()
        {
            let e = format!("{e:#}");
            prop_assert!(e.contains("must be shorter than the lease"), "{text}: {e}");
        }
    }

    /// Any value for one known key: accepted, or refused with an error that
    /// names the key.
    #[test]
    fn a_bad_value_is_refused_naming_its_key(key in 0..KEYS.len(), v in value()) {
        let (template, name) = KEYS[key];
        let text = template.replace("{}", &v);
        if let Err(e) = parse(&text) {
            let message = format!("{e:#}");
            prop_assert!(message.contains(name), "{text:?}: the error does not name {name}: {message}");
        }
    }
}
