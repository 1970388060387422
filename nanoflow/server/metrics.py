"""Prometheus metrics: request latencies seen by the front end, queue and cache state from the
engine process (asked for at scrape time, so the gauges are never stale)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from nanoflow.server.streaming import ChoiceState

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class ServerMetrics:
    """One registry per app, so several servers (tests) can live in one process."""

    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        reg, labels = self.registry, ["model_name"]
        self.model = model

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=reg)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg)

        self.running = gauge("nanoflow_num_requests_running", "Requests in the running batch")
        self.waiting = gauge("nanoflow_num_requests_waiting", "Requests queued for admission")
        self.kv_usage = gauge("nanoflow_kv_cache_usage_perc", "Fraction of KV blocks in use")
        self.free_blocks = gauge("nanoflow_kv_cache_free_blocks", "Free KV-cache blocks")
        self.num_blocks = gauge("nanoflow_kv_cache_total_blocks", "KV-cache blocks in all")
        self.prefix_cached = gauge(
            "nanoflow_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache so far"
        )
        self.prompt_tokens = Counter(
            "nanoflow_prompt_tokens", "Prompt tokens of accepted requests", labels, registry=reg
        )
        self.generation_tokens = Counter(
            "nanoflow_generation_tokens", "Tokens generated", labels, registry=reg
        )
        self.ttft = histogram(
            "nanoflow_time_to_first_token_seconds", "Time to first token", _LATENCY_BUCKETS
        )
        self.itl = histogram(
            "nanoflow_inter_token_latency_seconds", "Time between tokens", _LATENCY_BUCKETS
        )
        self.e2e = histogram(
            "nanoflow_e2e_request_latency_seconds", "Request latency", _LATENCY_BUCKETS
        )
        self.replica_requests = Gauge(
            "nanoflow_replica_requests",
            "Requests sent to each data-parallel replica",
            ["model_name", "replica"],
            registry=reg,
        )
        self.replica_outstanding = Gauge(
            "nanoflow_replica_outstanding_tokens",
            "Prompt + remaining output tokens of each replica's unfinished requests",
            ["model_name", "replica"],
            registry=reg,
        )
        self.iteration = histogram(
            "nanoflow_iteration_seconds", "Engine iteration time (host side)", _STEP_BUCKETS
        )

    def observe_iteration(self, seconds: float) -> None:
        self.iteration.labels(self.model).observe(seconds)

    def observe_prompt(self, num_tokens: int) -> None:
        self.prompt_tokens.labels(self.model).inc(num_tokens)

    def observe_choice(self, state: ChoiceState) -> None:
        """Record a finished choice's tokens and latencies."""
        m = self.model
        self.generation_tokens.labels(m).inc(len(state.token_ids))
        if state.first_token_time is not None:
            self.ttft.labels(m).observe(state.first_token_time - state.created)
            self.e2e.labels(m).observe(state.last_token_time - state.created)
        for gap in state.inter_token_seconds:
            self.itl.labels(m).observe(gap)

    def render(self, stats: dict[str, float]) -> bytes:
        m = self.model
        self.running.labels(m).set(stats["running"])
        self.waiting.labels(m).set(stats["waiting"])
        self.kv_usage.labels(m).set(stats["kv_usage"])
        self.free_blocks.labels(m).set(stats["free_blocks"])
        self.num_blocks.labels(m).set(stats["num_blocks"])
        self.prefix_cached.labels(m).set(stats.get("prefix_cached_tokens", 0))
        for i, replica in enumerate(stats.get("replicas", [])):
            self.replica_requests.labels(m, str(i)).set(replica["requests"])
            self.replica_outstanding.labels(m, str(i)).set(replica["outstanding_tokens"])
        return generate_latest(self.registry)
