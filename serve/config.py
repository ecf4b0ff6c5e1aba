"""``ServeConfig``: what one ``sdtrt serve`` process serves and its limits (frozen; round-trips through JSON for
Ray Serve's builder arguments)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sdtrt.errors import UsageError
from sdtrt.serve.http import check_credentials


@dataclass(frozen=True)
class ServeConfig:
    folder: str | None = None  # one engine folder; or, exclusively:
    models_dir: str | None = None  # a folder of engine folders, each a model clients select by name
    max_loaded: int = 1  # --models-dir: models loaded at once (the least recently used is unloaded)
    backend: str = "auto"
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None
    api_auth: str | None = None  # A1111's --api-auth: "user:pass[,user2:pass2]" (HTTP Basic)
    max_queue: int = 8  # requests waiting or running; beyond: 503
    timeout_s: float = 600.0  # per request, queue wait included
    max_body_mb: float = 32.0
    max_pixels: int = 1024 * 1024  # per image made
    max_input_pixels: int = 4096 * 4096  # per image sent (img2img's init_images, mask): read from the header first
    max_steps: int = 150
    max_images: int = 8  # per request (batch_size x n_iter)
    batch_window_ms: float = 50.0  # how long the first of compatible requests waits for others (0: no batching)
    cors_origins: tuple[str, ...] = ()  # A1111's --cors-allow-origins; empty: no CORS headers at all
    body_timeout_s: float = 60.0  # the whole body must arrive within this of the request's start; else 408

    def check(self) -> None:
        from sdtrt.runtime.backends import BACKENDS

        if (self.folder is None) == (self.models_dir is None):
            raise UsageError("give one engine folder, or --models-dir DIR (a folder of engine folders), not "
                             + ("both" if self.folder is not None else "neither"))
        if isinstance(self.max_loaded, bool) or not isinstance(self.max_loaded, int) or self.max_loaded < 1:
            raise UsageError(f"--max-loaded-models must be at least 1, got {self.max_loaded!r}")
        if self.backend not in BACKENDS:
            raise UsageError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be 1..65535 (0: any free port), got {self.port!r}")
        check_credentials(self.api_key, self.api_auth)
        if self.host not in ("127.0.0.1", "localhost", "::1") and not (self.api_key or self.api_auth):
            raise UsageError(f"binding to {self.host} exposes the server: set --api-key (clients send "
                             "'Authorization: Bearer KEY') or --api-auth USER:PASS, or keep the default 127.0.0.1")
        for label, value in (("--max-queue", self.max_queue), ("--max-steps", self.max_steps),
                             ("--max-images", self.max_images), ("--max-pixels", self.max_pixels),
                             ("--max-input-pixels", self.max_input_pixels)):
            if value < 1:
                raise UsageError(f"{label} must be at least 1, got {value}")
        if not (math.isfinite(self.max_body_mb) and self.max_body_mb > 0):
            raise UsageError(f"--max-body-mb must be positive, got {self.max_body_mb}")
        for label, seconds in (("--timeout", self.timeout_s), ("--body-timeout", self.body_timeout_s)):
            if not (math.isfinite(seconds) and seconds > 0):
                raise UsageError(f"{label} must be positive, got {seconds}")
        if not (math.isfinite(self.batch_window_ms) and 0 <= self.batch_window_ms <= 10_000):
            raise UsageError(f"--batch-window must be 0..10000 ms, got {self.batch_window_ms}")
        for origin in self.cors_origins:
            host = origin.split("//", 1)[1] if "//" in origin else ""
            if origin != "*" and not (origin.startswith(("http://", "https://")) and host and "/" not in host):
                raise UsageError(f"--cors-allow-origins takes origins like https://app.example.com or *, got {origin!r}")
