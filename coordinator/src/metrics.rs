//! Prometheus metrics of the coordinator (prefix `shoal_coordinator_`), served on their own
//! listener, never on the registry port.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    status: u16,
    /// The replica URL that answered, or "-" when the coordinator answered itself.
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabel {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    registry: String,
    replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistryLabel {
    registry: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    file: &'static str,
    result: &'static str,
}

/// All coordinator metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<RequestLabels, Counter>,
    response_bytes: Family<UpstreamLabel, Counter>,
    request_bytes: Counter,
    upstream_up: Family<ReplicaLabels, Gauge>,
    upstream_failures: Family<ReplicaLabels, Counter>,
    upstream_retries: Family<RegistryLabel, Counter>,
    auth_failures: Family<ReasonLabel, Counter>,
    coalesced: Counter,
    flights: Counter,
    framing_rejections: Counter,
    reloads: Family<ReloadLabels, Counter>,
    cluster_nodes: Gauge,
    cluster_locates: Counter,
    cluster_origin_slots: Counter,
    cluster_manifests_asked: Counter,
    cluster_bad_peer_reports: Counter,
    cluster_enrollments: Family<ResultLabel, Counter>,
    cluster_renewals: Family<ResultLabel, Counter>,
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
        let mut registry = Registry::with_prefix("shoal_coordinator");
        let m = Metrics {
            registry: Arc::default(),
            requests: Family::default(),
            response_bytes: Family::default(),
            request_bytes: Counter::default(),
            upstream_up: Family::default(),
            upstream_failures: Family::default(),
            upstream_retries: Family::default(),
            auth_failures: Family::default(),
            coalesced: Counter::default(),
            flights: Counter::default(),
            framing_rejections: Counter::default(),
            reloads: Family::default(),
            cluster_nodes: Gauge::default(),
            cluster_locates: Counter::default(),
            cluster_origin_slots: Counter::default(),
            cluster_manifests_asked: Counter::default(),
            cluster_bad_peer_reports: Counter::default(),
            cluster_enrollments: Family::default(),
            cluster_renewals: Family::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by status and by the upstream replica that answered",
            m.requests.clone(),
        );
        registry.register(
            "response_bytes",
            "Response body bytes sent to clients, by upstream replica",
            m.response_bytes.clone(),
        );
        registry.register(
            "request_bytes",
            "Request body bytes received from clients and forwarded upstream",
            m.request_bytes.clone(),
        );
        registry.register(
            "upstream_up",
            "1 when a replica is available (healthy and not ejected), else 0",
            m.upstream_up.clone(),
        );
        registry.register(
            "upstream_failures",
            "Failed requests to a replica (connect errors, timeouts, 500, 502-504)",
            m.upstream_failures.clone(),
        );
        registry.register(
            "upstream_retries",
            "Idempotent requests retried on another replica",
            m.upstream_retries.clone(),
        );
        registry.register(
            "auth_failures",
            "Requests refused authentication, by reason (missing, malformed, bad_credentials, rate_limited)",
            m.auth_failures.clone(),
        );
        registry.register(
            "coalesced_requests",
            "Requests served by joining an identical upstream request already in flight",
            m.coalesced.clone(),
        );
        registry.register(
            "coalesce_flights",
            "Upstream requests made on behalf of coalescable requests",
            m.flights.clone(),
        );
        registry.register(
            "framing_rejections",
            "HTTP/1 requests refused for ambiguous or invalid framing",
            m.framing_rejections.clone(),
        );
        registry.register(
            "reloads",
            "Reloads of the certificate and htpasswd files, by result",
            m.reloads.clone(),
        );
        registry.register(
            "cluster_nodes_connected",
            "Agents with a control session open to this coordinator",
            m.cluster_nodes.clone(),
        );
        registry.register(
            "cluster_locates",
            "Locate requests answered by the tracker",
            m.cluster_locates.clone(),
        );
        registry.register(
            "cluster_origin_slots_granted",
            "Origin slots granted to agents (in locate answers and later grants)",
            m.cluster_origin_slots.clone(),
        );
        registry.register(
            "cluster_manifests_asked",
            "Holders asked for a blob's piece manifest (after the blob's swarm moved here)",
            m.cluster_manifests_asked.clone(),
        );
        registry.register(
            "cluster_bad_peer_reports",
            "Reports of peers that sent pieces failing verification",
            m.cluster_bad_peer_reports.clone(),
        );
        registry.register(
            "cluster_enrollments",
            "Enrollment requests, by result (issued, bad_token, revoked, rate_limited, bad_request, error)",
            m.cluster_enrollments.clone(),
        );
        registry.register(
            "cluster_renewals",
            "Certificate renewals over the control channel, by result (issued, refused)",
            m.cluster_renewals.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            ..m
        }
    }

    pub fn request(&self, status: u16, upstream: &str, bytes: u64) {
        let upstream = upstream.to_owned();
        self.requests
            .get_or_create(&RequestLabels {
                status,
                upstream: upstream.clone(),
            })
            .inc();
        self.response_bytes
            .get_or_create(&UpstreamLabel { upstream })
            .inc_by(bytes);
    }

    pub fn request_bytes(&self, n: u64) {
        self.request_bytes.inc_by(n);
    }

    pub fn upstream_up(&self, registry: &str, replica: &str, up: bool) {
        self.upstream_up
            .get_or_create(&ReplicaLabels {
                registry: registry.to_owned(),
                replica: replica.to_owned(),
            })
            .set(i64::from(up));
    }

    pub fn upstream_failure(&self, registry: &str, replica: &str) {
        self.upstream_failures
            .get_or_create(&ReplicaLabels {
                registry: registry.to_owned(),
                replica: replica.to_owned(),
            })
            .inc();
    }

    pub fn upstream_retry(&self, registry: &str) {
        self.upstream_retries
            .get_or_create(&RegistryLabel {
                registry: registry.to_owned(),
            })
            .inc();
    }

    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn coalesced(&self) {
        self.coalesced.inc();
    }

    pub fn flight(&self) {
        self.flights.inc();
    }

    pub fn framing_rejection(&self) {
        self.framing_rejections.inc();
    }

    pub fn reload(&self, file: &'static str, ok: bool) {
        self.reloads
            .get_or_create(&ReloadLabels {
                file,
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    pub fn cluster_nodes(&self, n: usize) {
        self.cluster_nodes.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn cluster_locate(&self) {
        self.cluster_locates.inc();
    }

    pub fn cluster_origin_slot(&self) {
        self.cluster_origin_slots.inc();
    }

    pub fn cluster_manifest_asked(&self) {
        self.cluster_manifests_asked.inc();
    }

    pub fn cluster_bad_peer_report(&self) {
        self.cluster_bad_peer_reports.inc();
    }

    pub fn enrollment(&self, result: &'static str) {
        self.cluster_enrollments
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn renewal(&self, result: &'static str) {
        self.cluster_renewals
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
