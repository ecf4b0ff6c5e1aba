"""``sdtrt bench-serve URL``: a bounded load generator for ``sdtrt serve`` (loopback): C clients post A1111 txt2img
requests back to back for S seconds; reports throughput, latency percentiles and errors by status."""

from __future__ import annotations

import json
import statistics
import threading
import time


def run_load(url: str, concurrency: int, duration: float, body: dict, api_key: str | None = None) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    stop = time.perf_counter() + duration

    def client() -> None:
        with httpx.Client(timeout=max(60.0, duration * 4), headers=headers) as http:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    code = str(http.post(f"{url.rstrip('/')}/sdapi/v1/txt2img", json=body).status_code)
                except httpx.HTTPError as ex:
                    code = type(ex).__name__
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1
                    if code == "200":
                        latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = (lambda p: statistics.quantiles(latencies, n=100)[p - 1]) if len(latencies) >= 2 else (lambda p: float("nan"))
    return {"url": url, "concurrency": concurrency, "duration_s": round(wall, 2), "request": body,
            "ok": len(latencies), "statuses": statuses, "requests_per_s": round(len(latencies) / wall, 3),
            "images_per_s": round(len(latencies) * body.get("batch_size", 1) / wall, 3),
            "latency_s": {"p50": round(q(50), 3), "p95": round(q(95), 3), "p99": round(q(99), 3)}}


def main(url: str, concurrency: int, duration: float, body: dict, api_key: str | None, out: str | None) -> dict:
    result = run_load(url, concurrency, duration, body, api_key)
    text = json.dumps(result, indent=2)
    if out:
        from pathlib import Path

        from sdtrt.fsutil import write_atomic

        write_atomic(Path(out), (text + "\n").encode())
    print(text)
    return result
