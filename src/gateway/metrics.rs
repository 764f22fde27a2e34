//! `/metrics`: the layer's, the gate's, the retention task's and the expiry-notice task's
//! counters in the Prometheus text format, read at each scrape from [`PatAuthLayer::stats`],
//! [`Gate::decisions`], [`Retention::stats`] and [`ExpiryNotices::stats`].

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::gate::Gate;
use crate::PatAuthLayer;
use crate::notices::ExpiryNotices;
use crate::retention::Retention;
use crate::stats::{FeedState, Outcomes};

/// The collector behind `/metrics`.
#[derive(Debug)]
pub struct Metrics {
    layer: PatAuthLayer,
    gate: Gate,
    retention: std::sync::OnceLock<Retention>,
    notices: std::sync::OnceLock<ExpiryNotices>,
    /// Per listener, by its configuration key (`listen`, `admin_listen`, `ext_authz_listen`):
    /// the connections it closed for their client's limit.
    connections_refused: std::sync::Mutex<Vec<(&'static str, RefusedCount)>>,
}

/// A listener's count of connections closed for their client's limit.
pub(crate) type RefusedCount = std::sync::Arc<std::sync::atomic::AtomicU64>;

impl Metrics {
    /// Metrics of `layer` (every request it verified: forward-auth and the management API) and of
    /// `gate` (forward-auth decisions, route rules included).
    pub fn new(layer: PatAuthLayer, gate: Gate) -> Self {
        Self {
            layer,
            gate,
            retention: std::sync::OnceLock::new(),
            notices: std::sync::OnceLock::new(),
            connections_refused: std::sync::Mutex::default(),
        }
    }

    /// The count of connections `listener` (its configuration key: `listen`, `admin_listen`,
    /// `ext_authz_listen`) closed for their client's limit, for it to add to:
    /// `patd_connections_refused_total{listener="…"}`, exported from this call on.
    pub(crate) fn connections_refused(&self, listener: &'static str) -> RefusedCount {
        let mut counts = crate::usage::lock(&self.connections_refused);
        if let Some((_, count)) = counts.iter().find(|(name, _)| *name == listener) {
            return std::sync::Arc::clone(count);
        }
        let count = RefusedCount::default();
        counts.push((listener, std::sync::Arc::clone(&count)));
        count
    }

    /// Adds the counters of the retention task (`patd_retention_*`); the first call wins.
    pub fn track_retention(&self, retention: Retention) {
        let _ = self.retention.set(retention);
    }

    /// Adds the counters of the expiry-notice task (`patd_expiry_notices_*`); the first call
    /// wins.
    pub fn track_expiry_notices(&self, notices: ExpiryNotices) {
        let _ = self.notices.set(notices);
    }

    /// The Prometheus text exposition.
    pub fn render(self: &std::sync::Arc<Self>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(std::sync::Arc::clone(self)));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::error!(error = %e, "could not encode the metrics");
        }
        out
    }
}

fn outcomes(o: &Outcomes) -> [(&'static str, u64); 11] {
    [
        ("ok", o.ok),
        ("anonymous", o.anonymous),
        ("missing", o.missing),
        ("invalid", o.invalid),
        ("revoked", o.revoked),
        ("disabled", o.disabled),
        ("expired", o.expired),
        ("ip_denied", o.ip_denied),
        ("scope_denied", o.scope_denied),
        ("limited", o.limited),
        ("unavailable", o.unavailable),
    ]
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

fn by_outcome(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    o: &Outcomes,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (outcome, value) in outcomes(o) {
        let labels = [("outcome", outcome)];
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Metrics {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = self.layer.stats();
        by_outcome(
            &mut e,
            "patd_requests",
            "Requests verified by the layer (forward-auth and the management API), by outcome",
            &s.outcomes,
        )?;
        by_outcome(
            &mut e,
            "patd_forward_auth_decisions",
            "Forward-auth and ext_authz decisions, route rules included, by outcome",
            &self.gate.decisions(),
        )?;
        {
            let counts = crate::usage::lock(&self.connections_refused).clone();
            let mut family = e.encode_descriptor(
                "patd_connections_refused",
                "Connections closed at once, by listener: their client held \
                 max_connections_per_client of a listener at least half full",
                None,
                MetricType::Counter,
            )?;
            for (listener, count) in counts {
                let value = count.load(std::sync::atomic::Ordering::Relaxed);
                ConstCounter::new(value)
                    .encode(family.encode_family(&[("listener", listener)])?)?;
            }
        }
        counter(
            &mut e,
            "patd_cache_hits",
            "Tokens the cache answered for",
            s.cache.hits,
        )?;
        counter(
            &mut e,
            "patd_cache_negative_hits",
            "Tokens the negative cache answered for",
            s.cache.negative_hits,
        )?;
        counter(
            &mut e,
            "patd_cache_misses",
            "Tokens that needed a store lookup",
            s.cache.misses,
        )?;
        counter(
            &mut e,
            "patd_store_lookups",
            "Store queries made",
            s.store_lookups,
        )?;
        counter(
            &mut e,
            "patd_store_lookup_failures",
            "Store queries that failed",
            s.store_lookup_failures,
        )?;
        counter(
            &mut e,
            "patd_reused_secrets",
            "Rotated-out secrets presented (with [reuse] detection on)",
            s.reused_secrets,
        )?;
        {
            let h = &s.lookup_latency;
            let mut cumulative = 0;
            let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(h.counts.len());
            for (i, count) in h.counts.iter().enumerate() {
                cumulative += count;
                let bound = h
                    .bounds_us
                    .get(i)
                    .map_or(f64::INFINITY, |us| *us as f64 / 1e6);
                buckets.push((bound, *count));
            }
            let mut metric = e.encode_descriptor(
                "patd_store_lookup_seconds",
                "Store query latency",
                None,
                MetricType::Histogram,
            )?;
            metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                h.sum_us as f64 / 1e6,
                cumulative,
                &buckets,
                None,
            )?;
        }
        gauge(
            &mut e,
            "patd_cached_tokens",
            "Tokens in the positive cache",
            s.cached_tokens as i64,
        )?;
        gauge(
            &mut e,
            "patd_negative_entries",
            "Entries in the negative cache",
            s.negative_entries as i64,
        )?;
        gauge(
            &mut e,
            "patd_lookups_in_flight",
            "Store lookups in flight",
            s.lookups_in_flight as i64,
        )?;
        if let Some(u) = s.usage {
            counter(&mut e, "patd_usage_marks", "Usage marks received", u.marks)?;
            counter(
                &mut e,
                "patd_usage_rows_written",
                "Usage rows written",
                u.rows_written,
            )?;
            counter(
                &mut e,
                "patd_usage_flush_retries",
                "Failed usage flushes",
                u.retries,
            )?;
            counter(
                &mut e,
                "patd_usage_dropped_marks",
                "Usage marks dropped",
                u.dropped_marks,
            )?;
            gauge(
                &mut e,
                "patd_usage_pending_tokens",
                "Tokens with usage marks pending",
                u.pending_tokens as i64,
            )?;
        }
        if let Some(r) = self.retention.get().map(Retention::stats) {
            counter(
                &mut e,
                "patd_retention_runs",
                "Retention runs completed",
                r.runs,
            )?;
            counter(
                &mut e,
                "patd_retention_purged",
                "Revoked and expired records removed by retention",
                r.purged,
            )?;
            counter(
                &mut e,
                "patd_retention_errors",
                "Retention runs that failed",
                r.errors,
            )?;
        }
        if let Some(n) = self.notices.get().map(ExpiryNotices::stats) {
            counter(
                &mut e,
                "patd_expiry_notices_runs",
                "Expiry notice runs completed",
                n.runs,
            )?;
            counter(
                &mut e,
                "patd_expiry_notices_expiring",
                "personalAccessToken.expiring notices sent",
                n.expiring,
            )?;
            counter(
                &mut e,
                "patd_expiry_notices_expired",
                "personalAccessToken.expired notices sent",
                n.expired,
            )?;
            counter(
                &mut e,
                "patd_expiry_notices_errors",
                "Expiry notice runs that failed",
                n.errors,
            )?;
        }
        let (connected, disconnected_secs) = match s.feed {
            FeedState::None => (-1, 0),
            FeedState::Connected => (1, 0),
            FeedState::Disconnected(d) => (0, d.as_secs() as i64),
        };
        gauge(
            &mut e,
            "patd_feed_connected",
            "The store's change feed: 1 connected, 0 disconnected, -1 none",
            connected,
        )?;
        gauge(
            &mut e,
            "patd_feed_disconnected_seconds",
            "How long the change feed has been disconnected",
            disconnected_secs,
        )?;
        Ok(())
    }
}
