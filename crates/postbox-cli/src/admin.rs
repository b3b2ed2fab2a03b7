//! One-shot commands: migrate, enqueue, status, dead, purge.

use std::io::IsTerminal as _;
use std::time::{Duration, SystemTime};

use postbox_core::{
    Filter, GroupBy, GroupStats, ListQuery, MessageRecord, NewMessage, PurgeQuery, RelayRecord,
    Status, Store, StoreError, since,
};

use crate::any::{AnyStore, Patience};
use crate::cli::{
    DeadActArgs, DeadCommand, DeadShowArgs, EnqueueArgs, FilterArgs, PurgeArgs, RelaysCommand,
    StatusArgs, StoreArgs,
};
use crate::human;
use crate::output::outln;
use crate::usage;
use anyhow::Context as _;

pub(crate) async fn migrate(args: StoreArgs) -> anyhow::Result<()> {
    let store = AnyStore::open(&args, Patience::Brief).await?;
    store.migrate().await?;
    // `migrate` does not say whether it applied anything (its log does, at
    // info): true either way
    outln!(
        "outbox table {} is at the latest schema version",
        args.table
    );
    Ok(())
}

/// Longest `enqueue --delay`: 100 years as `humantime` counts them (of
/// 365.25 days, so `100y` is accepted). A longer one is a typo, not a plan,
/// and soon past what the databases hold (MySQL's `DATETIME` ends with the
/// year 9999; the library clamps longer delays).
const MAX_DELAY: Duration = Duration::from_secs(100 * 31_557_600);

pub(crate) async fn enqueue(args: EnqueueArgs) -> anyhow::Result<()> {
    // checked before the store opens: a refused message touches nothing
    if let Some(d) = args.delay
        && d > MAX_DELAY
    {
        return Err(usage(format!(
            "--delay {} is too long: at most 100 years",
            human::duration(d)
        )));
    }
    let store = AnyStore::open(&args.store, Patience::Brief).await?;
    let mut msg = NewMessage::new(args.topic, args.payload.into_bytes());
    msg.key = args.key;
    msg.tenant = args.tenant;
    msg.max_attempts = args.max_attempts;
    for (k, v) in args.headers {
        msg.headers.insert(k, v);
    }
    if let Some(d) = args.delay {
        msg = msg.delay(d);
    }
    store.enqueue(&msg).await?;
    outln!("{}", msg.id);
    Ok(())
}

/// Topics or tenants shown per breakdown table; `--json` has them all.
const GROUPS_SHOWN: usize = 30;

pub(crate) async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let store = AnyStore::open(&args.store, Patience::Brief).await?;
    let mut filter = Filter::all();
    filter.topic = args.topic;
    filter.tenant = args.tenant;
    let s = store.stats(&filter).await?;
    let by_topic = store.stats_by(&filter, GroupBy::Topic).await?;
    let by_tenant = store.stats_by(&filter, GroupBy::Tenant).await?;
    // an outbox migrated before heartbeats existed still shows its counts
    let relays = match store.relays().await {
        Ok(r) => Some(r),
        Err(StoreError::Schema(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let now = SystemTime::now();
    if args.json {
        let mut v = serde_json::to_value(s)?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("table".into(), args.store.table.clone().into());
            obj.insert(
                "oldest_pending_age_ms".into(),
                s.oldest_pending_at.map(|t| millis(since(now, t))).into(),
            );
            obj.insert("by_topic".into(), groups_json(&by_topic, "topic")?);
            obj.insert("by_tenant".into(), groups_json(&by_tenant, "tenant")?);
            obj.insert(
                "relays".into(),
                match &relays {
                    Some(r) => relays_json(r)?,
                    None => serde_json::Value::Null,
                },
            );
            if let AnyStore::Postgres(pg) = &store {
                obj.insert(
                    "blockers".into(),
                    serde_json::to_value(pg.blockers().await?)?,
                );
                obj.insert("horizon".into(), serde_json::to_value(pg.horizon().await?)?);
                // shown as null when it cannot be read, as in the text
                let vacuum = match pg.vacuum_state().await {
                    Ok(v) => serde_json::to_value(v)?,
                    Err(_) => serde_json::Value::Null,
                };
                obj.insert("vacuum".into(), vacuum);
            }
        }
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    outln!("outbox {}", args.store.table);
    outln!(
        "  pending      {:>8}   (ready {}, delayed {}, retrying {}, leased {})",
        s.pending,
        s.ready,
        s.delayed,
        s.retrying,
        s.leased
    );
    outln!(
        "  dead         {:>8}   (parked keys {})",
        s.dead,
        s.parked_keys
    );
    if s.sent > 0 {
        outln!("  sent (kept)  {:>8}", s.sent);
    }
    match s.oldest_pending_at {
        Some(t) => outln!("  oldest pending written {} ago", ago(since(now, t))),
        None => outln!("  nothing pending"),
    }
    print_groups("topic", &by_topic, now)?;
    print_groups("tenant", &by_tenant, now)?;
    match &relays {
        Some(r) => print_relays(r)?,
        None => outln!(
            "\nrelays: this outbox has no heartbeat table yet: run `postbox migrate` to add it"
        ),
    }
    if let AnyStore::Postgres(pg) = &store {
        outln!();
        print_pg_holdups(pg).await?;
    }
    Ok(())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A duration for people: whole seconds, largest units first.
fn ago(d: Duration) -> String {
    human::duration(round_secs(d))
}

/// Groups as JSON objects, the group under its own name (`topic`/`tenant`).
fn groups_json(groups: &[GroupStats], name: &str) -> anyhow::Result<serde_json::Value> {
    let mut out = Vec::with_capacity(groups.len());
    for g in groups {
        let mut v = serde_json::to_value(g)?;
        if let Some(obj) = v.as_object_mut()
            && let Some(group) = obj.remove("group")
        {
            obj.insert(name.to_owned(), group);
        }
        out.push(v);
    }
    Ok(out.into())
}

/// A breakdown table, biggest backlog first.
fn print_groups(name: &str, groups: &[GroupStats], now: SystemTime) -> anyhow::Result<()> {
    if groups.is_empty() {
        return Ok(());
    }
    let mut sorted: Vec<&GroupStats> = groups.iter().collect();
    sorted.sort_by(|a, b| {
        (b.stats.pending, b.stats.dead)
            .cmp(&(a.stats.pending, a.stats.dead))
            .then_with(|| a.group.cmp(&b.group))
    });
    outln!(
        "\nby {name:<22} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}  oldest pending",
        "pending",
        "ready",
        "delayed",
        "retrying",
        "leased",
        "dead",
        "parked"
    );
    for g in sorted.iter().take(GROUPS_SHOWN) {
        let s = &g.stats;
        let label = g.group.as_deref().unwrap_or("(none)");
        outln!(
            "  {:<23} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}  {}",
            truncate(label, 23),
            s.pending,
            s.ready,
            s.delayed,
            s.retrying,
            s.leased,
            s.dead,
            s.parked_keys,
            s.oldest_pending_at
                .map_or_else(|| "-".to_owned(), |t| ago(since(now, t)))
        );
    }
    if sorted.len() > GROUPS_SHOWN {
        outln!(
            "  … and {} more {name}s (narrow with --{name}, or see them all with --json)",
            sorted.len() - GROUPS_SHOWN
        );
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

/// Relays as JSON, each with `silent` and `stale` decided here.
fn relays_json(relays: &[RelayRecord]) -> anyhow::Result<serde_json::Value> {
    let mut out = Vec::with_capacity(relays.len());
    for r in relays {
        let mut v = serde_json::to_value(r)?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("silent".into(), r.is_silent().into());
            obj.insert("stale".into(), r.is_stale().into());
        }
        out.push(v);
    }
    Ok(out.into())
}

/// One line per relay; stale ones (silent for 3 heartbeats while holding
/// leases) say so first.
fn print_relays(relays: &[RelayRecord]) -> anyhow::Result<()> {
    if relays.is_empty() {
        outln!("\nrelays: none running (none has written a heartbeat)");
        return Ok(());
    }
    let stale = relays.iter().filter(|r| r.is_stale()).count();
    outln!("\nrelays: {} ({} stale)", relays.len(), stale);
    let now = SystemTime::now();
    for r in relays {
        let h = &r.heartbeat;
        let state = if r.is_stale() {
            format!(
                "STALE: last seen {} ago holding {} leases (heartbeat every {}); its rows wait for their leases to run out",
                ago(r.silent_for),
                h.leased,
                ago(h.interval)
            )
        } else if r.is_silent() {
            format!(
                "silent: last seen {} ago, holding no leases (stopped without a clean shutdown? `postbox relays forget {}` removes it)",
                ago(r.silent_for),
                h.relay_id
            )
        } else {
            format!(
                "live: seen {} ago, holding {} leases, last claim {}",
                ago(r.silent_for),
                h.leased,
                h.last_claim_at.map_or_else(
                    || "never".to_owned(),
                    |t| format!("{} ago", ago(since(now, t)))
                )
            )
        };
        outln!(
            "  {} on {} (pid {}, postbox {}, up {}): {state}",
            h.relay_id,
            h.host,
            h.pid,
            h.version,
            ago(since(now, h.started_at))
        );
    }
    Ok(())
}

pub(crate) async fn relays(cmd: RelaysCommand) -> anyhow::Result<()> {
    match cmd {
        RelaysCommand::List { store, json } => {
            let s = AnyStore::open(&store, Patience::Brief).await?;
            let relays = s.relays().await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&relays_json(&relays)?)?);
            } else {
                print_relays(&relays)?;
            }
            Ok(())
        }
        RelaysCommand::Forget { store, id } => {
            let s = AnyStore::open(&store, Patience::Brief).await?;
            if s.remove_relay(id).await? {
                outln!("forgot relay {id}");
                Ok(())
            } else {
                Err(anyhow::anyhow!("no relay {id} in the heartbeat table"))
            }
        }
    }
}

/// What can hold messages back on PostgreSQL: open transactions holding
/// keys (their later messages wait), and the oldest holder of the cleanup
/// horizon in any database (it stops vacuum of the outbox's dead rows).
async fn print_pg_holdups(pg: &postbox_postgres::PgStore) -> anyhow::Result<()> {
    let blockers = pg.blockers().await?;
    if blockers.is_empty() {
        outln!("  no open transaction holds a key");
    }
    for b in &blockers {
        outln!(
            "  HELD: pid {} has held {} key(s) for {} ({}), {} producer(s) waiting; `SELECT pg_terminate_backend({})` ends it",
            b.pid,
            b.keys_held,
            ago(b.xact_age),
            b.state.as_deref().unwrap_or("unknown state"),
            b.waiters,
            b.pid
        );
    }
    let mut horizon_held = false;
    if let Some(h) = pg.horizon().await?
        && h.age.unwrap_or_default() >= std::time::Duration::from_secs(60)
    {
        horizon_held = true;
        outln!(
            "  cleanup horizon held for {} by {}: the outbox's deleted rows cannot be vacuumed until it ends",
            ago(h.age.unwrap_or_default()),
            h.description
        );
    }
    // A line for operators, not a check: a failure is shown, not fatal.
    let v = match pg.vacuum_state().await {
        Ok(v) => v,
        Err(e) => {
            outln!("  vacuum: unknown ({e})");
            return Ok(());
        }
    };
    let when = match v.since_vacuum {
        Some(d) => format!("{} ago", ago(d)),
        None => "no vacuum on record: statistics may have been reset (a crash, a failover), and then the count covers only changes since".into(),
    };
    let auto = if v.autovacuum {
        ""
    } else {
        "; autovacuum is off for it"
    };
    outln!(
        "  vacuum: {} dead rows since the table was last vacuumed ({when}{auto})",
        v.dead_rows
    );
    if v.dead_rows >= postbox_postgres::VacuumState::SLOW_KEYED_CLAIMS {
        let then = if horizon_held {
            "end the transaction holding the horizon (above), then run `VACUUM` on the table or let the relays do it ([store] vacuum_after)"
        } else {
            "run `VACUUM` on the table, or let the relays do it ([store] vacuum_after)"
        };
        outln!(
            "  SLOW KEYED CLAIMS: keyed claims step over the index entries of the keyed rows deleted since; {then} (docs/operations.md)"
        );
    }
    Ok(())
}

fn round_secs(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_secs(d.as_secs())
}

fn filter_of(f: FilterArgs) -> Filter {
    let mut filter = Filter::all().ids(f.ids);
    filter.topic = f.topic;
    filter.key = f.key;
    filter.tenant = f.tenant;
    // a filter that matches everything is no filter: `--older-than 0s` or
    // `--error ""` must not stand in for `--all`
    filter.older_than = f.older_than.filter(|age| !age.is_zero());
    filter.error_contains = f.error.filter(|e| !e.is_empty());
    filter
}

fn is_unfiltered(f: &Filter) -> bool {
    *f == Filter::all()
}

pub(crate) async fn dead(cmd: DeadCommand) -> anyhow::Result<()> {
    match cmd {
        DeadCommand::List(args) => {
            let store = AnyStore::open(&args.store, Patience::Brief).await?;
            // clap keeps it at least 1; a limit past memory is no limit
            let limit = usize::try_from(args.limit).unwrap_or(usize::MAX);
            let q = ListQuery::new(Some(Status::Dead), limit).filter(filter_of(args.filter));
            let rows = store.list(&q).await?;
            if args.json {
                let out: Vec<_> = rows.iter().map(record_json).collect();
                outln!("{}", serde_json::to_string_pretty(&out)?);
            } else if rows.is_empty() {
                outln!("no dead messages");
            } else {
                outln!(
                    "{:<8} {:<36} {:<24} {:<16} {:>4} {:<6} error",
                    "seq",
                    "id",
                    "topic",
                    "key",
                    "try",
                    "parks"
                );
                for r in &rows {
                    outln!(
                        "{:<8} {:<36} {:<24} {:<16} {:>4} {:<6} {}",
                        r.seq,
                        r.id,
                        r.topic,
                        r.key.as_deref().unwrap_or("-"),
                        r.attempts,
                        if r.parked { "yes" } else { "no" },
                        r.last_error
                            .as_deref()
                            .unwrap_or("")
                            .chars()
                            .take(80)
                            .collect::<String>()
                    );
                }
            }
            Ok(())
        }
        DeadCommand::Show(args) => show(args).await,
        DeadCommand::Replay(args) => act(args, Act::Replay).await,
        DeadCommand::Skip(args) => act(args, Act::Skip).await,
        DeadCommand::Purge(args) => act(args, Act::Purge).await,
    }
}

/// `dead show ID`: one message, whole.
async fn show(args: DeadShowArgs) -> anyhow::Result<()> {
    let store = AnyStore::open(&args.store, Patience::Brief).await?;
    let q = ListQuery::new(None, 1).filter(Filter::all().ids([args.id]));
    let Some(r) = store.list(&q).await?.into_iter().next() else {
        return Err(anyhow::anyhow!(
            "no message {} in outbox {} (sent messages are deleted, unless the relay keeps them with [store] retain_sent)",
            args.id,
            args.store.table
        ));
    };
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&record_json(&r))?);
        return Ok(());
    }
    let now = SystemTime::now();
    let when = |t: SystemTime| {
        format!(
            "{} ({} ago)",
            humantime::format_rfc3339_seconds(t),
            ago(since(now, t))
        )
    };
    let status = match (r.status, r.parked) {
        (Status::Dead, true) => "dead, parks its key (later messages of the key wait)".to_owned(),
        (Status::Dead, false) => "dead".to_owned(),
        (other, _) => format!("{other:?}, not dead").to_lowercase(),
    };
    outln!("id          {}", r.id);
    outln!("seq         {}", r.seq);
    outln!("topic       {}", r.topic);
    outln!("key         {}", r.key.as_deref().unwrap_or("-"));
    outln!("tenant      {}", r.tenant.as_deref().unwrap_or("-"));
    outln!("status      {status}");
    outln!(
        "attempts    {} of {}",
        r.attempts,
        r.max_attempts
            .map_or_else(|| "the relay's max_attempts".to_owned(), |m| m.to_string())
    );
    outln!("created     {}", when(r.created_at));
    outln!("available   {}", when(r.available_at));
    if let Some(at) = r.sent_at {
        outln!("sent        {}", when(at));
    }
    outln!("last error  {}", r.last_error.as_deref().unwrap_or("-"));
    if r.headers.is_empty() {
        outln!("headers     (none)");
    } else {
        outln!("headers");
        for (k, v) in &r.headers {
            outln!("  {k}: {v}");
        }
    }
    match std::str::from_utf8(&r.payload) {
        Ok(text) => outln!("payload     ({} bytes, text)\n{text}", r.payload.len()),
        Err(_) => outln!(
            "payload     ({} bytes, not UTF-8: base64)\n{}",
            r.payload.len(),
            base64_encode(&r.payload)
        ),
    }
    Ok(())
}

/// What `dead replay|skip|purge` does to each chunk.
#[derive(Debug, Clone, Copy)]
enum Act {
    Replay,
    Skip,
    Purge,
}

impl Act {
    fn verb(self) -> &'static str {
        match self {
            Act::Replay => "replayed",
            Act::Skip => "unparked",
            Act::Purge => "purged",
        }
    }

    async fn run(self, store: &AnyStore, filter: &Filter) -> Result<u64, StoreError> {
        match self {
            Act::Replay => store.replay(filter).await,
            Act::Skip => store.skip(filter).await,
            Act::Purge => {
                store
                    .purge(&PurgeQuery::new(Status::Dead, filter.clone()))
                    .await
            }
        }
    }
}

/// Dead messages acted on per statement: each chunk is one short statement
/// (no long lock on a big table), and the progress bar moves per chunk.
const CHUNK: usize = 500;

async fn act(args: DeadActArgs, what: Act) -> anyhow::Result<()> {
    let filter = filter_of(args.filter);
    if is_unfiltered(&filter) && !args.all {
        return Err(usage(
            "this would affect every dead message: pass --all, or narrow it with --id, --topic, --key, --tenant, --older-than or --error",
        ));
    }
    let store = AnyStore::open(&args.store, Patience::Brief).await?;
    let done = act_in_chunks(&store, &filter, what).await?;
    let verb = what.verb();
    if args.json {
        outln!("{}", serde_json::json!({ verb: done }));
    } else {
        outln!("{verb} {done} message(s)");
    }
    Ok(())
}

/// Applies `what` to the dead messages matching `filter`, [`CHUNK`] at a
/// time with a progress bar; returns how many it changed.
async fn act_in_chunks(store: &AnyStore, filter: &Filter, what: Act) -> anyhow::Result<u64> {
    let total = store.stats(filter).await?.dead;
    let bar = progress_bar(total, what.verb(), "dead messages");
    let mut done = 0;
    let mut query = ListQuery::new(Some(Status::Dead), CHUNK).filter(filter.clone());
    let mut unaddressable = false;
    loop {
        let page = store.list(&query).await?;
        let Some(last) = page.last() else { break };
        query.after_seq = Some(last.seq);
        // the chunk's own ids: the rows the filter matched when listed
        unaddressable |= page.iter().any(|r| r.id.is_nil());
        let chunk = filter.clone().ids(page.iter().map(|r| r.id));
        done += what
            .run(store, &chunk)
            .await
            .with_context(|| format!("{done} message(s) {} before the error", what.verb()))?;
        bar.inc(page.len() as u64);
        if page.len() < CHUNK {
            break;
        }
    }
    if unaddressable {
        // Rows whose id a plain-SQL producer wrote in a form the store
        // cannot read are listed with the nil id and no chunk names them;
        // one statement over the whole filter reaches them (the rows done
        // above no longer match it).
        done += what
            .run(store, filter)
            .await
            .with_context(|| format!("{done} message(s) {} before the error", what.verb()))?;
    }
    bar.finish_and_clear();
    Ok(done)
}

/// `purge --sent-older-than AGE [--dead-older-than AGE]`: deletes kept sent
/// messages sent at least AGE ago (and dead ones created at least AGE ago),
/// [`CHUNK`] rows per statement, each its own short transaction.
pub(crate) async fn purge(args: PurgeArgs) -> anyhow::Result<()> {
    // as with `dead purge --older-than 0s`, an age that matches every dead
    // message must not stand in for `--all`
    if args.dead_older_than.is_some_and(|age| age.is_zero()) {
        return Err(usage(
            "--dead-older-than 0s would delete every dead message: give an age greater than zero, or run `postbox dead purge --all` to delete them all",
        ));
    }
    let store = AnyStore::open(&args.store, Patience::Brief).await?;
    let mut summary = serde_json::Map::new();
    let mut lines = Vec::new();
    if let Some(age) = args.sent_older_than {
        // every kept sent row: the bar's length is an upper bound
        let kept = store.stats(&Filter::all()).await?.sent;
        let bar = progress_bar(kept, "purged", "kept sent messages");
        let mut done = 0;
        loop {
            let n = store.purge_sent(age, CHUNK).await?;
            done += n;
            bar.inc(n);
            if n < CHUNK as u64 {
                break;
            }
        }
        bar.finish_and_clear();
        summary.insert("sent_purged".into(), done.into());
        lines.push(format!(
            "purged {done} sent message(s) sent at least {} ago",
            human::duration(age)
        ));
    }
    if let Some(age) = args.dead_older_than {
        let done = act_in_chunks(&store, &Filter::all().older_than(age), Act::Purge).await?;
        summary.insert("dead_purged".into(), done.into());
        lines.push(format!(
            "purged {done} dead message(s) created at least {} ago",
            human::duration(age)
        ));
    }
    if args.json {
        outln!("{}", serde_json::Value::Object(summary));
    } else {
        for line in lines {
            outln!("{line}");
        }
    }
    Ok(())
}

/// A progress bar on stderr when it is a terminal and there is more than
/// one chunk of work; otherwise a hidden one (logs and pipes stay clean).
fn progress_bar(total: u64, verb: &str, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() || total <= CHUNK as u64 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
        "{{msg}} [{{bar:40}}] {{pos}}/{{len}} {what} ({{per_sec}}, {{eta}} left)"
    )) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(verb.to_owned());
    bar
}

fn record_json(r: &MessageRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        match std::str::from_utf8(&r.payload) {
            Ok(text) => obj.insert("payload".into(), text.into()),
            Err(_) => obj.insert("payload_base64".into(), base64_encode(&r.payload).into()),
        };
    }
    v
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
