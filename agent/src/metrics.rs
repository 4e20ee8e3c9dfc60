//! Prometheus metrics of the agent, served on their own listener (never on the mirror port).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What a request asked for.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Kind {
    Manifest,
    Blob,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Manifest => "manifest",
            Kind::Blob => "blob",
        }
    }
}

/// Where the bytes of a response came from.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Source {
    /// The local store.
    Cache,
    /// A download from upstream that this request started or joined.
    Upstream,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Upstream => "upstream",
        }
    }
}

impl EncodeLabelValue for Kind {
    fn encode(&self, enc: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(enc, self.as_str())
    }
}

impl EncodeLabelValue for Source {
    fn encode(&self, enc: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(enc, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: Kind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: Source,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: u16,
}

/// All agent metrics. Cheap to clone (every metric is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    served_bytes: Family<SourceLabel, Counter>,
    upstream_bytes: Counter,
    hits: Family<KindLabel, Counter>,
    misses: Family<KindLabel, Counter>,
    in_flight: Gauge,
    verification_failures: Counter,
    responses: Family<StatusLabel, Counter>,
    stale_manifests: Counter,
    store_bytes: Gauge<u64, AtomicU64>,
    store_blobs: Gauge<u64, AtomicU64>,
    evicted_bytes: Counter,
    peer_sent_bytes: Counter,
    peer_received_bytes: Counter,
    bad_pieces: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("shoal_agent");
        let m = Metrics {
            registry: Arc::default(),
            served_bytes: Family::default(),
            upstream_bytes: Counter::default(),
            hits: Family::default(),
            misses: Family::default(),
            in_flight: Gauge::default(),
            verification_failures: Counter::default(),
            responses: Family::default(),
            stale_manifests: Counter::default(),
            store_bytes: Gauge::default(),
            store_blobs: Gauge::default(),
            evicted_bytes: Counter::default(),
            peer_sent_bytes: Counter::default(),
            peer_received_bytes: Counter::default(),
            bad_pieces: Counter::default(),
        };
        registry.register(
            "served_bytes",
            "Bytes sent to clients, by where they came from",
            m.served_bytes.clone(),
        );
        registry.register(
            "upstream_bytes",
            "Bytes received from upstream registries (blob and manifest bodies)",
            m.upstream_bytes.clone(),
        );
        registry.register(
            "cache_hits",
            "Requests answered from the local store",
            m.hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Requests that needed upstream",
            m.misses.clone(),
        );
        registry.register(
            "downloads_in_flight",
            "Blob downloads from upstream in progress",
            m.in_flight.clone(),
        );
        registry.register(
            "verification_failures",
            "Blobs or manifests whose content did not match their digest",
            m.verification_failures.clone(),
        );
        registry.register(
            "responses",
            "HTTP responses of the mirror, by status",
            m.responses.clone(),
        );
        registry.register(
            "stale_manifests_served",
            "Tag requests answered from cache because upstream was unreachable",
            m.stale_manifests.clone(),
        );
        registry.register(
            "store_bytes",
            "Bytes of blobs in the store",
            m.store_bytes.clone(),
        );
        registry.register("store_blobs", "Blobs in the store", m.store_blobs.clone());
        registry.register(
            "evicted_bytes",
            "Bytes evicted from the store to stay under its cap",
            m.evicted_bytes.clone(),
        );
        registry.register(
            "peer_sent_bytes",
            "Piece bytes uploaded to other agents",
            m.peer_sent_bytes.clone(),
        );
        registry.register(
            "peer_received_bytes",
            "Piece bytes received from other agents (before verification)",
            m.peer_received_bytes.clone(),
        );
        registry.register(
            "bad_pieces",
            "Pieces that failed verification against the piece manifest and were discarded",
            m.bad_pieces.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            ..m
        }
    }

    pub fn served(&self, source: Source, bytes: u64) {
        self.served_bytes
            .get_or_create(&SourceLabel { source })
            .inc_by(bytes);
    }

    pub fn upstream_bytes(&self, bytes: u64) {
        self.upstream_bytes.inc_by(bytes);
    }

    pub fn hit(&self, kind: Kind) {
        self.hits.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn miss(&self, kind: Kind) {
        self.misses.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn download_started(&self) {
        self.in_flight.inc();
    }

    pub fn download_finished(&self) {
        self.in_flight.dec();
    }

    pub fn verification_failure(&self) {
        self.verification_failures.inc();
    }

    pub fn response(&self, status: u16) {
        self.responses.get_or_create(&StatusLabel { status }).inc();
    }

    pub fn stale_manifest(&self) {
        self.stale_manifests.inc();
    }

    pub fn store_usage(&self, blobs: u64, bytes: u64) {
        self.store_blobs.set(blobs);
        self.store_bytes.set(bytes);
    }

    pub fn evicted(&self, bytes: u64) {
        self.evicted_bytes.inc_by(bytes);
    }

    pub fn peer_bytes_sent(&self, bytes: u64) {
        self.peer_sent_bytes.inc_by(bytes);
    }

    pub fn peer_bytes_received(&self, bytes: u64) {
        self.peer_received_bytes.inc_by(bytes);
    }

    pub fn bad_piece(&self) {
        self.bad_pieces.inc();
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding into a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_family() {
        let m = Metrics::new();
        m.served(Source::Cache, 10);
        m.hit(Kind::Blob);
        m.verification_failure();
        let text = m.encode();
        assert!(text.contains("shoal_agent_served_bytes_total{source=\"cache\"} 10"));
        assert!(text.contains("shoal_agent_cache_hits_total{kind=\"blob\"} 1"));
        assert!(text.contains("shoal_agent_verification_failures_total 1"));
        assert!(text.contains("shoal_agent_downloads_in_flight 0"));
    }
}
