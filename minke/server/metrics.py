"""Prometheus metrics for `GET /metrics`, named as vLLM names them with the `minke:` prefix, so a vLLM
dashboard ports by renaming `vllm:` to `minke:`. Every series carries the label `model_name`.

Two sources:
- Engine state (queue sizes, KV usage, token and prefix-cache counters, preemptions) is read from
  `engine.get_stats()` at scrape time by a custom collector: the engine owns those numbers, so the
  server never keeps a second copy that could drift.
- Per-request latencies and sizes (TTFT, inter-token latency, end-to-end latency, prompt / generation
  tokens, finished requests by reason) are observed by the server as it streams, timed with
  `time.monotonic()` from the moment the HTTP request arrived, i.e. what the client experiences.

The registry is per app (not prometheus_client's global one), so several apps in one process (tests)
never clash.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Buckets as vLLM uses them (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)


class _EngineStatsCollector:
    """Turns `get_stats()` into gauges and counters at each scrape."""

    # (stats key, metric name, help, kind)
    SERIES = (
        ("num_running", "minke:num_requests_running", "Requests in the running batch.", "gauge"),
        ("num_waiting", "minke:num_requests_waiting", "Requests waiting to be scheduled.", "gauge"),
        ("kv_cache_usage", "minke:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).", "gauge"),
        ("kv_capacity_tokens", "minke:kv_cache_capacity_tokens", "KV cache capacity in tokens.", "gauge"),
        ("prompt_tokens_total", "minke:prompt_tokens", "Prompt tokens admitted.", "counter"),
        ("generation_tokens_total", "minke:generation_tokens", "Tokens generated.", "counter"),
        ("prefix_cache_queries", "minke:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
         "counter"),
        ("prefix_cache_hits", "minke:prefix_cache_hits", "Prompt tokens found in the prefix cache.", "counter"),
        ("num_preemptions", "minke:num_preemptions", "Requests preempted (recomputed later).", "counter"),
    )

    def __init__(self, get_stats: Callable[[], dict], model_name: str):
        self._get_stats = get_stats
        self._model_name = model_name

    def collect(self):
        stats = self._get_stats()
        for key, name, doc, kind in self.SERIES:
            if key not in stats:
                continue
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, labels=["model_name"])
            family.add_metric([self._model_name], float(stats[key]))
            yield family


class ServerMetrics:
    """The registry of one app plus the request-level instruments the handlers observe."""

    def __init__(self, get_stats: Callable[[], dict], model_name: str):
        # No `*_created` series (vLLM turns them off too): they double the output and no dashboard reads them.
        disable_created_metrics()
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineStatsCollector(get_stats, model_name))
        labels = ["model_name"]

        def hist(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.ttft = hist("minke:time_to_first_token_seconds", "Time to first token (from request arrival).",
                         TTFT_BUCKETS)
        self.itl = hist("minke:inter_token_latency_seconds", "Time between consecutive output tokens.",
                        ITL_BUCKETS)
        self.e2e = hist("minke:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                        E2E_BUCKETS)
        self.prompt_tokens = hist("minke:request_prompt_tokens", "Prompt length per request.", TOKEN_BUCKETS)
        self.generation_tokens = hist("minke:request_generation_tokens", "Generated tokens per request.",
                                      TOKEN_BUCKETS)
        self._success = Counter("minke:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        for reason in ("stop", "length", "abort"):  # present from the start, as vLLM does
            self._success.labels(model_name, reason)

    def request_finished(self, reason: str | None) -> None:
        self._success.labels(self.model_name, reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latency bookkeeping of one HTTP request (all its choices): call `tokens(index, k)` whenever output
    `index` grew by k tokens, and `finish(...)` once at the end."""

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self._m = metrics
        self.arrival = arrival
        self.first_token: float | None = None
        self._last: dict[int, float] = {}

    def tokens(self, index: int, k: int, now: float) -> None:
        if k <= 0:
            return
        if self.first_token is None:
            self.first_token = now
            self._m.ttft.observe(now - self.arrival)
        last = self._last.get(index)
        if last is not None:
            # One engine step can deliver several tokens of one output: spread the gap over them.
            for _ in range(k):
                self._m.itl.observe((now - last) / k)
        self._last[index] = now

    def finish(self, now: float, prompt_tokens: int, generation_tokens: int, reasons: list[str | None]) -> None:
        self._m.e2e.observe(now - self.arrival)
        self._m.prompt_tokens.observe(prompt_tokens)
        self._m.generation_tokens.observe(generation_tokens)
        for r in reasons:
            self._m.request_finished(r)
