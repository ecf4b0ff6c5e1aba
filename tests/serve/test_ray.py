"""`sdtrt serve --ray`: a real local Ray cluster started by the CLI (ray.init + serve.run), two replicas of the tiny
fp32 export behind Ray Serve's proxy, called over HTTP on loopback, with the default dynamic batching on. Both
replicas answer concurrent requests; a replica whose process is killed mid-load is replaced by Ray, every answer is
the image of the request it answers (its own prompt, seed and pixels), and no live replica ran a request more often
than it answered it."""

import base64
import io
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="the Ray tests need sdtrt[ray]")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from sdtrt.runtime import Pipeline  # noqa: E402
from tests.serve.test_app import free_port  # noqa: E402

CLIENTS = 3
SLOW_STEPS = 40  # a 128x128 request that runs for seconds on the tiny export (5-7 s on 2 busy CPU cores)


def body(seed: int) -> dict:
    return {"prompt": f"request {seed}", "steps": 3, "seed": seed, "width": 64, "height": 64, "sampler_name": "DDIM"}


def replicas(url: str, want: int, deadline_s: float = 120) -> dict[str, int]:
    """The replica ids and pids that answer /ready, once ``want`` distinct ones have."""
    seen: dict[str, int] = {}
    deadline = time.time() + deadline_s
    while len(seen) < want:
        assert time.time() < deadline, f"only {seen} answered"
        try:
            r = httpx.get(f"{url}/ready", timeout=5)
            if r.status_code == 200:
                seen[r.json()["replica"]] = r.json()["pid"]
                continue
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # still deploying (Ray's proxy answers 404/503 meanwhile)
    return seen


def images_made(url: str, ids) -> dict[str, float]:
    """Each named replica's ``sdtrt_images_total`` (the proxy picks the replica: ask until each has answered)."""
    got: dict[str, float] = {}
    for _ in range(200):
        r = httpx.get(f"{url}/metrics", timeout=10)
        replica = r.headers.get("x-sdtrt-replica")
        if replica in ids:
            got[replica] = float(re.search(r"^sdtrt_images_total (\S+)", r.text, re.M).group(1))
        if set(got) == set(ids):
            return got
    raise AssertionError(f"/metrics came only from {sorted(got)}")


SERVERS: dict[str, subprocess.Popen] = {}  # url -> the `sdtrt serve --ray` process (the SIGTERM test stops it)


def stop(url: str) -> int:
    """SIGTERM, as a service manager stops it: the app drains, the cluster stops. Its exit status."""
    proc = SERVERS[url]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def ray_server(tiny_fp32):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "serve", str(tiny_fp32[0]), "--ray", "--replicas", "2",
                             "--port", str(port), "--backend", "onnxruntime-cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    SERVERS[url] = proc
    try:
        replicas(url, 2)
        yield url
    finally:
        returncode = stop(url)
    assert returncode == 0, proc.stderr.read()


def unavailable(r: httpx.Response, openai: bool = False) -> bool:
    """A 503 as this server answers one: its protocol's JSON error shape, and Retry-After (never Ray's plain-text
    500 or 404)."""
    if r.status_code != 503 or not r.headers.get("retry-after", "").isdigit():
        return False
    error = r.json()["error"]
    return isinstance(error["message"], str) if openai else (isinstance(error, str) and bool(r.json()["detail"]))


@pytest.fixture(scope="module")
def library(tiny_fp32):
    with Pipeline.from_dir(tiny_fp32[0], backend="onnxruntime-cpu") as pipe:
        yield pipe


def check_answer(library, seed: int, data: dict) -> None:
    """The answer to ``body(seed)`` is that request's own image: its prompt and seed, the library's pixels (within
    1/255: a request batched with others may be summed in another order)."""
    (encoded,) = data["images"]
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert image.text["parameters"].startswith(f"request {seed}\n") and f"Seed: {seed}," in image.text["parameters"]
    want = library(f"request {seed}", num_inference_steps=3, guidance_scale=7.0, width=64, height=64, seed=seed,
                   scheduler="ddim").images[0]
    diff = np.abs(np.asarray(image.convert("RGB"), np.int16) - np.asarray(want, np.int16)).max()
    assert diff <= 1, (seed, diff)


def test_two_replicas_answer_concurrent_requests(ray_server, library):
    answers: dict[int, httpx.Response] = {}

    def post(seed):
        answers[seed] = httpx.post(f"{ray_server}/sdapi/v1/txt2img", json=body(seed), timeout=120)

    for burst in range(3):  # Ray picks replicas at random (two choices, the less busy): a burst may miss one
        seeds = range(1 + 8 * burst, 9 + 8 * burst)
        threads = [threading.Thread(target=post, args=(seed,)) for seed in seeds]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if len({r.headers["x-sdtrt-replica"] for r in answers.values()}) == 2:
            break
    assert {r.status_code for r in answers.values()} == {200}
    assert len({r.headers["x-sdtrt-replica"] for r in answers.values()}) == 2
    for seed, r in answers.items():
        check_answer(library, seed, r.json())


def test_a_replica_killed_mid_load_is_restarted_and_no_answer_is_wrong(ray_server, library):
    before = replicas(ray_server, 2)
    victim, pid = sorted(before.items())[0]
    (survivor,) = set(before) - {victim}
    made_before = images_made(ray_server, [survivor])[survivor]
    seeds = itertools.count(1000)
    outcomes: dict[int, tuple | None] = {}  # seed -> (status, replica, body); None while in flight
    stop = threading.Event()

    def client():
        while not stop.is_set():
            seed = next(seeds)
            outcomes[seed] = None
            try:
                r = httpx.post(f"{ray_server}/sdapi/v1/txt2img", json=body(seed), timeout=60)
                outcomes[seed] = (r.status_code, r.headers.get("x-sdtrt-replica"),
                                  r.json() if r.status_code == 200 else r)
            except httpx.HTTPError as ex:
                outcomes[seed] = ("disconnected", None, repr(ex))

    def answered_by(ids):
        return [s for s, got in list(outcomes.items()) if got and got[0] == 200 and got[1] in ids]

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 60
        while len(answered_by(set(before))) < 6:
            assert time.time() < deadline, outcomes
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)  # the replica's process dies mid-load, as an OOM kill or a crash would
        killed = max(outcomes)
        deadline = time.time() + 120
        new = set()
        while len(answered_by(new)) < 3:  # Ray starts a replacement, and it takes requests
            assert time.time() < deadline, "no new replica answered"
            time.sleep(0.5)
            new |= set(replicas(ray_server, 1, 30)) - set(before)
    finally:
        stop.set()
        for t in threads:
            t.join()
    ok = [s for s, got in outcomes.items() if got[0] == 200]
    failed = {s: got for s, got in outcomes.items() if got[0] != 200}
    # a request the dead replica held is sent again once, to another replica, by the gateway; if it fails it is a
    # 503 with Retry-After in A1111's error shape (never Ray's plain-text 500, a dropped connection, or a 200 with
    # another request's image); and only around the kill
    assert all(status != "disconnected" and unavailable(r) for status, _, r in failed.values()), \
        {s: (got[0], got[2] if got[0] == "disconnected" else (got[2].headers, got[2].text)) for s, got in failed.items()}
    assert len(failed) <= 2 * CLIENTS, failed
    assert not any(got[1] == victim for s, got in outcomes.items() if s > killed + CLIENTS)  # it did die
    for seed in ok:
        check_answer(library, seed, outcomes[seed][2])
    # no request ran twice where it can be counted: each live replica made exactly the images it answered with (a
    # request re-sent after it had run would show as one more image than answers)
    (fresh,) = new
    made = images_made(ray_server, [survivor, fresh])
    answered = {r: sum(1 for got in outcomes.values() if got[:2] == (200, r)) for r in (survivor, fresh)}
    assert (made[survivor] - made_before, made[fresh]) == (answered[survivor], answered[fresh])


def test_after_sigterm_new_requests_get_503_json_while_the_one_in_flight_finishes(ray_server, library):
    """Runs last of the tests on ``ray_server``: it stops it. Ray alone answers new requests 404 (plain text) as soon
    as the application is being removed; here they get 503 + Retry-After in their protocol's shape until the
    request in flight is done, and that request gets its own image."""
    # long enough to be still running 1 s after it is sent on an idle machine too (128x128 x 40 steps was not)
    slow = {**body(4242), "steps": 150, "width": 256, "height": 256}
    answer: dict[str, object] = {}

    def post():
        answer["r"] = httpx.post(f"{ray_server}/sdapi/v1/txt2img", json=slow, timeout=120)
        answer["done"] = time.monotonic()

    thread = threading.Thread(target=post)
    thread.start()
    time.sleep(1.0)  # it is in a replica's engine thread (it takes several seconds)
    assert thread.is_alive(), "the in-flight request finished too soon to test anything"
    SERVERS[ray_server].send_signal(signal.SIGTERM)
    seen = []
    while thread.is_alive():
        sent = time.monotonic()
        try:
            r = (httpx.post(f"{ray_server}/v1/images/generations", json={"prompt": "x", "size": "64x64"}, timeout=30)
                 if len(seen) % 2 else httpx.post(f"{ray_server}/sdapi/v1/txt2img", json=body(1), timeout=30))
        except httpx.HTTPError:  # the proxy has stopped listening: after the drain
            break
        seen.append((sent, r))
        time.sleep(0.2)
    thread.join()
    assert answer["r"].status_code == 200, answer["r"].text
    (encoded,) = answer["r"].json()["images"]
    assert "Seed: 4242," in Image.open(io.BytesIO(base64.b64decode(encoded))).text["parameters"]
    # until the request in flight is done every new one is refused in its protocol's shape (those sent before the
    # gateway heard of the stop are answered as usual)
    during = [(sent, r.request.url.path, r) for sent, r in seen if sent < answer["done"]]
    assert any(r.status_code == 503 for _, _, r in during), [(p, r.status_code) for _, p, r in during]
    # the answer reaches this client a moment after the gateway saw it done, and the server went down at that moment:
    # a request sent in that last moment may find the proxy without routes
    racing = answer["done"] - 0.5
    bad = [(p, r.status_code, r.text[:80]) for sent, p, r in during
           if r.status_code != 200 and not unavailable(r, openai=p.startswith("/v1/"))
           and not (r.status_code == 404 and sent > racing)]
    assert not bad, bad
    assert stop(ray_server) == 0, SERVERS[ray_server].stderr.read()


def test_a_replica_that_cannot_load_its_engines_is_one_line_naming_the_error(tiny_fp32, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_fp32[0], broken)
    with open(broken / "unet.onnx", "r+b") as f:  # the manifest reads fine; the replicas find the file corrupt
        f.seek(200)
        f.write(b"garbage!")
    out = subprocess.run([sys.executable, "-m", "sdtrt", "serve", str(broken), "--ray", "--port", str(free_port()),
                          "--backend", "onnxruntime-cpu"], capture_output=True, text=True, timeout=180)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert "Ray Serve could not start the replicas: ManifestError: unet.onnx: its sha256 differs" in out.stderr


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "2"], "--replicas is an option of Ray Serve scale-out: add --ray"),
    (["--ray", "--replicas", "0"], "--replicas must be at least 1, got 0"),
    (["--ray", "--autoscale", "3"], "--autoscale takes MIN:MAX replica counts"),
    (["--ray", "--autoscale", "3:1"], "--autoscale needs 0 <= MIN <= MAX"),
    (["--ray", "--replicas", "3", "--autoscale", "1:4"], "--replicas and --autoscale exclude each other"),
    (["--ray", "--target-ongoing-requests", "3"], "--target-ongoing-requests steers autoscaling: it needs"),
    (["--cors-allow-origins", "https://"], "--cors-allow-origins takes origins like"),
    (["--ray", "--gpus-per-replica", "-1"], "--gpus-per-replica must be a non-negative number"),
    (["--ray", "--host", "0.0.0.0"], "binding to 0.0.0.0 exposes the server"),
    (["--cors-allow-origins", "ui.example"], "--cors-allow-origins takes origins like"),
])
def test_bad_scale_out_options_are_refused_before_anything_starts(tiny_fp32, capsys, argv, message):
    from sdtrt.cli import main

    assert main(["serve", str(tiny_fp32[0]), *argv]) == 2
    assert message in capsys.readouterr().err


def test_what_would_leave_ray_waiting_or_fail_inside_it_is_refused_first(tiny_fp32, capsys):
    import socket

    from sdtrt.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(tiny_fp32[0]), "--ray", "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err
    # more replicas than this machine's CPUs: Ray would wait for them forever; refused once the cluster says so
    out = subprocess.run([sys.executable, "-m", "sdtrt", "serve", str(tiny_fp32[0]), "--ray", "--replicas",
                          str(os.cpu_count() + 1), "--port", str(free_port()), "--backend", "onnxruntime-cpu"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"{os.cpu_count() + 1} replicas x 1 CPU need" in out.stderr


def test_the_ray_builder_reads_serve_run_arguments_and_sets_ray_serve_options():
    from sdtrt.serve import RayConfig, ServeConfig, ray_app, ray_configs, ray_deployment_options

    config, ray_config = ray_configs({"folder": "/engines/sd15", "replicas": "3", "max_queue": "4",
                                      "batch_window_ms": "0", "cors_origins": "https://a.example, https://b.example",
                                      "num_gpus": "1", "api_key": "123"})  # `serve run` passes strings
    assert config == ServeConfig(folder="/engines/sd15", max_queue=4, batch_window_ms=0.0, api_key="123",
                                 cors_origins=("https://a.example", "https://b.example"))
    assert ray_config == RayConfig(replicas=3, num_gpus=1.0)
    options = ray_deployment_options(config, ray_config)
    assert (options["num_replicas"], options["max_ongoing_requests"], options["max_queued_requests"],
            options["ray_actor_options"]["num_gpus"]) == (3, 4, 4, 1.0)
    auto = ray_deployment_options(ServeConfig(folder="x", backend="onnxruntime-cpu"),
                                  RayConfig(min_replicas=0, max_replicas=4, target_ongoing_requests=3))
    assert "num_replicas" not in auto and auto["ray_actor_options"]["num_gpus"] == 0
    assert ray_deployment_options(ServeConfig(folder="x", backend="openvino"), RayConfig())["ray_actor_options"][
        "num_gpus"] == 0  # a CPU backend
    assert auto["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 3.0}
    # Ray Serve itself accepts them (it validates a deployment's options when the application is built)
    ray_app({"folder": "/engines/sd15", "min_replicas": "1", "max_replicas": "2", "num_gpus": "0",
             "allow_unauthenticated": "true"})
    for bad, message in (({"folder": "/x", "port": "80"}, "does not take port"),
                         ({"replicas": "2"}, "needs folder="),
                         ({"folder": "/x", "replicas": "two"}, "RayConfig.replicas: expected int"),
                         ({"folder": "engines/sd15", "api_key": "k"}, "needs an absolute folder="),
                         # Ray's http_options decide the address (a RayService binds 0.0.0.0): a key, or an explicit no
                         ({"folder": "/x"}, "needs api_key= or api_auth=USER:PASS"),
                         ({"folder": "/x", "api_key": "k", "replicas": "2", "min_replicas": "1", "max_replicas": "3"},
                          "exclude each other")):
        with pytest.raises(Exception, match=message):
            ray_configs(bad)


def test_the_gateway_sends_a_request_whose_replica_died_again_once_then_answers_503_in_its_shape():
    """The gateway's logic without a cluster (the kill test above cannot tell whether a request was in flight on
    the killed replica): a ``RayActorError`` (the replica died) -> the same request once more; twice -> 503 +
    Retry-After in the path's protocol shape; back-pressure likewise; draining -> 503, ``/health`` still forwarded."""
    import asyncio
    import json

    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError
    from starlette.requests import Request

    from sdtrt.serve.ray_gateway import GatewayLogic

    class Replicas:  # a DeploymentHandle to the replicas: .handle.remote(scope, body), awaited
        def __init__(self, *outcomes):
            self.outcomes, self.calls = list(outcomes), []
            self.handle = self

        async def remote(self, scope, body):
            self.calls.append((scope["method"], scope["path"], body))
            outcome = self.outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

    def call(gateway, path, body=b'{"prompt": "a"}'):
        chunks = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return chunks.pop(0) if chunks else {"type": "http.disconnect"}

        scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [(b"content-type", b"application/json")], "http_version": "1.1", "scheme": "http"}
        return asyncio.run(gateway(Request(scope, receive)))

    ok = (200, [(b"content-type", b"application/json"), (b"content-length", b"2"), (b"x-sdtrt-replica", b"r2")], b"{}")
    replicas = Replicas(ActorDiedError(), ok)
    r = call(GatewayLogic(replicas, 2**20, 5.0), "/sdapi/v1/txt2img")
    assert (r.status_code, r.body, dict(r.raw_headers)[b"x-sdtrt-replica"]) == (200, b"{}", b"r2")
    assert replicas.calls == [("POST", "/sdapi/v1/txt2img", b'{"prompt": "a"}')] * 2  # the same request again
    for path, died in (("/sdapi/v1/txt2img", ActorDiedError()), ("/v1/images/generations", ActorDiedError()),
                       ("/sdapi/v1/img2img", BackPressureError(num_queued_requests=8, max_queued_requests=8))):
        replicas = Replicas(died, died)
        r = call(GatewayLogic(replicas, 2**20, 5.0), path)
        body = json.loads(r.body)
        assert r.status_code == 503 and r.headers["retry-after"].isdigit(), (path, r.body)
        assert (body["error"]["message"] if path.startswith("/v1/") else body["detail"]), body
        assert len(replicas.calls) == (1 if isinstance(died, BackPressureError) else 2)
    gateway = GatewayLogic(Replicas(ok), 2**20, 5.0)
    assert asyncio.run(gateway.drain(1.0)) == 0
    r = call(gateway, "/sdapi/v1/txt2img")
    assert r.status_code == 503 and json.loads(r.body)["error"] == "unavailable" and r.headers["retry-after"]
    assert call(gateway, "/health").status_code == 200 and not gateway.replicas.outcomes
