"""`HTTPLimits`: what one client may cost the HTTP layer (README "Limits"). Each field is a `minke serve` flag of
the same name (`max_request_body_bytes` = `--max-request-body-bytes`, `timeout_body_s` = `--timeout-body`)."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class HTTPLimits:
    # 8 MiB: ~2M token ids or ~8M characters of prompt, far past what a 163,840-token context can use.
    max_request_body_bytes: int = 8 * 1024 * 1024
    timeout_header_s: float = 10.0  # a request head must arrive within this of the connection (or last response)
    timeout_body_s: float = 60.0  # the whole body, from the request head on
    timeout_keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    limit_concurrency: int = 1024  # connections + requests in flight; above it new requests get 503

    @staticmethod
    def flag(name: str) -> str:
        return "--" + name.removesuffix("_s").replace("_", "-")

    def __post_init__(self):
        if self.max_request_body_bytes < 1024:
            raise ValueError(f"{self.flag('max_request_body_bytes')} must be >= 1024, "
                             f"got {self.max_request_body_bytes}")
        if self.limit_concurrency < 1:
            raise ValueError(f"{self.flag('limit_concurrency')} must be >= 1, got {self.limit_concurrency}")
        for f in fields(self):
            if f.name.startswith("timeout_") and not getattr(self, f.name) > 0:
                raise ValueError(f"{self.flag(f.name)} must be > 0 seconds, got {getattr(self, f.name)}")
