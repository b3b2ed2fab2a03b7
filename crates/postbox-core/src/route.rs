//! Routing messages to publishers by topic pattern.

use futures_util::future::join_all;
use tokio::time::Instant;

use crate::error::ConfigError;
use crate::message::Message;
use crate::publish::{PublishOutcome, Publisher};

/// A topic pattern: dot-separated segments where `*` matches exactly one
/// segment and a final `**` matches one or more; anything else matches
/// itself.
///
/// ```
/// use postbox_core::TopicPattern;
/// let p = TopicPattern::new("orders.*").unwrap();
/// assert!(p.matches("orders.created"));
/// assert!(!p.matches("orders.created.v2"));
/// assert!(TopicPattern::new("orders.**").unwrap().matches("orders.created.v2"));
/// assert!(TopicPattern::new("**").unwrap().matches("anything.at.all"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    text: String,
    segments: Vec<String>,
}

impl TopicPattern {
    /// Parses a pattern; `**` may only stand last, and segments may not be
    /// empty.
    pub fn new(pattern: &str) -> Result<Self, ConfigError> {
        let segments: Vec<String> = pattern.split('.').map(str::to_owned).collect();
        let bad = |reason: &str| ConfigError::invalid("route pattern", pattern, reason);
        if segments.iter().any(String::is_empty) {
            return Err(bad("segments between dots must not be empty"));
        }
        if let Some(pos) = segments.iter().position(|s| s == "**")
            && pos != segments.len() - 1
        {
            return Err(bad("`**` may only be the last segment"));
        }
        if segments
            .iter()
            .any(|s| s != "*" && s != "**" && s.contains('*'))
        {
            return Err(bad("`*` must be a whole segment"));
        }
        Ok(Self {
            text: pattern.to_owned(),
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        let mut parts = topic.split('.');
        for (i, seg) in self.segments.iter().enumerate() {
            if seg == "**" {
                // one or more remaining segments
                return parts.next().is_some() && i == self.segments.len() - 1;
            }
            match parts.next() {
                Some(p) if seg == "*" || seg == p => {}
                _ => return false,
            }
        }
        parts.next().is_none()
    }
}

/// A [`Publisher`] that sends each message to the first route whose pattern
/// matches its topic; a message no route matches is `Rejected` with reason
/// "no route". Routes of one batch publish concurrently.
///
/// All routes share one publisher type; to mix brokers, use an enum over
/// them (the `postbox` binary's `AnyPublisher`).
#[derive(Debug, Clone)]
pub struct Router<P> {
    routes: Vec<(TopicPattern, P)>,
}

impl<P> Default for Router<P> {
    fn default() -> Self {
        Self { routes: Vec::new() }
    }
}

impl<P: Publisher> Router<P> {
    /// A router with no routes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a route, tried after the ones already added.
    pub fn route(mut self, pattern: &str, publisher: P) -> Result<Self, ConfigError> {
        self.routes.push((TopicPattern::new(pattern)?, publisher));
        Ok(self)
    }

    /// The routes in order.
    pub fn routes(&self) -> impl Iterator<Item = (&TopicPattern, &P)> {
        self.routes.iter().map(|(t, p)| (t, p))
    }

    fn route_of(&self, topic: &str) -> Option<usize> {
        self.routes.iter().position(|(p, _)| p.matches(topic))
    }
}

impl<P: Publisher> Publisher for Router<P> {
    async fn publish(&self, batch: &[Message]) -> Vec<PublishOutcome> {
        self.publish_routed(batch, None).await
    }

    async fn publish_until(&self, batch: &[Message], deadline: Instant) -> Vec<PublishOutcome> {
        self.publish_routed(batch, Some(deadline)).await
    }
}

impl<P: Publisher> Router<P> {
    /// Each route's part of `batch` through its publisher, concurrently.
    async fn publish_routed(
        &self,
        batch: &[Message],
        deadline: Option<Instant>,
    ) -> Vec<PublishOutcome> {
        let mut outcomes: Vec<Option<PublishOutcome>> = vec![None; batch.len()];
        // per route: the batch positions and messages it takes, in order
        let mut groups: Vec<(Vec<usize>, Vec<Message>)> =
            vec![(Vec::new(), Vec::new()); self.routes.len()];
        for (i, m) in batch.iter().enumerate() {
            match self.route_of(&m.topic) {
                Some(r) => {
                    groups[r].0.push(i);
                    groups[r].1.push(m.clone());
                }
                None => {
                    outcomes[i] = Some(PublishOutcome::rejected(format!(
                        "no route for topic {:?}",
                        m.topic
                    )));
                }
            }
        }
        let sends = groups
            .iter()
            .enumerate()
            .filter(|(_, (idx, _))| !idx.is_empty())
            .map(|(r, (idx, msgs))| async move {
                let route = &self.routes[r].1;
                let results = match deadline {
                    Some(d) => route.publish_until(msgs, d).await,
                    None => route.publish(msgs).await,
                };
                (idx, results)
            });
        for (idx, results) in join_all(sends).await {
            if results.len() == idx.len() {
                for (&i, outcome) in idx.iter().zip(results) {
                    outcomes[i] = Some(outcome);
                }
            } else {
                // which message an outcome belongs to is unknown: none of
                // them counts (as the relay does with a whole batch)
                let reason = format!(
                    "publisher returned {} outcomes for {} messages",
                    results.len(),
                    idx.len()
                );
                for &i in idx {
                    outcomes[i] = Some(PublishOutcome::transient(reason.clone()));
                }
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| PublishOutcome::transient("message was not routed")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let m = |p: &str, t: &str| TopicPattern::new(p).expect("pattern").matches(t);
        assert!(m("orders.created", "orders.created"));
        assert!(!m("orders.created", "orders.updated"));
        assert!(m("*.created", "orders.created"));
        assert!(!m("*", "orders.created"));
        assert!(m("orders.**", "orders.a.b"));
        assert!(!m("orders.**", "orders"));
        assert!(m("**", "x"));
        for bad in ["", "a..b", "a.**.b", "ord*rs", "a."] {
            assert!(TopicPattern::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// A keyless message of `topic`.
    fn msg(topic: &str) -> Message {
        Message::new(
            uuid::Uuid::now_v7(),
            1,
            topic.to_owned(),
            None,
            bytes::Bytes::new(),
            crate::Headers::new(),
            None,
            1,
            None,
            std::time::SystemTime::now(),
        )
    }

    /// Reports `NotSent` for everything when given a deadline, `Ok` without.
    struct DeadlineAware;

    impl Publisher for DeadlineAware {
        async fn publish(&self, batch: &[Message]) -> Vec<PublishOutcome> {
            vec![PublishOutcome::Ok; batch.len()]
        }

        async fn publish_until(&self, batch: &[Message], _: Instant) -> Vec<PublishOutcome> {
            vec![PublishOutcome::NotSent; batch.len()]
        }
    }

    #[tokio::test]
    async fn the_deadline_reaches_every_route() {
        let router = Router::new()
            .route("a.*", DeadlineAware)
            .and_then(|r| r.route("b.*", DeadlineAware))
            .expect("routes");
        let batch = [msg("a.x"), msg("b.y"), msg("c.z")];
        let until = router.publish_until(&batch, Instant::now()).await;
        assert_eq!(
            until[..2],
            [PublishOutcome::NotSent, PublishOutcome::NotSent]
        );
        assert!(matches!(until[2], PublishOutcome::Rejected { .. }));
        let plain = router.publish(&batch).await;
        assert_eq!(plain[..2], [PublishOutcome::Ok, PublishOutcome::Ok]);
    }

    /// Answers `Ok` for the first message of a batch only.
    struct OneAnswer;

    impl Publisher for OneAnswer {
        async fn publish(&self, _: &[Message]) -> Vec<PublishOutcome> {
            vec![PublishOutcome::Ok]
        }
    }

    /// A route that returns the wrong number of outcomes cannot say which
    /// message each belongs to: all its messages are `Transient`, none `Ok`.
    #[tokio::test]
    async fn a_route_with_too_few_outcomes_sends_nothing() {
        let router = Router::new().route("a.*", OneAnswer).expect("route");
        let out = router.publish(&[msg("a.x"), msg("a.y")]).await;
        assert!(
            out.iter()
                .all(|o| matches!(o, PublishOutcome::Transient { .. })),
            "{out:?}"
        );
    }
}
