"""`sdtrt serve` over loopback: the real FastAPI app under uvicorn in a subprocess, called over HTTP with httpx, on the
tiny fp32 export. Every endpoint answers; bad requests get a 4xx JSON body and the server keeps serving; the images
are the library's for the same request; a full queue is a 503 with Retry-After."""

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from sdtrt.runtime import Pipeline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(folder, *extra):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "serve", str(folder), "--port", str(port), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start")


@pytest.fixture(scope="module")
def server(tiny_fp32):
    proc, url = start(tiny_fp32[0], "--backend", "onnxruntime-cpu", "--max-queue", "2", "--batch-window", "400")
    headers = {}
    while httpx.get(f"{url}/ready").status_code != 200:
        time.sleep(0.2)
    yield url, headers
    proc.terminate()
    proc.wait(10)


def png(b64: str):
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    return image, image.text.get("parameters", "")


def test_every_read_endpoint_answers(server):
    url, _ = server
    r = httpx.options(f"{url}/sdapi/v1/txt2img", headers={"Origin": "https://ui.example",
                                                          "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers  # CORS is off unless configured
    assert httpx.get(f"{url}/health").json() == {"status": "alive"}
    assert httpx.get(f"{url}/ready").json()["status"] == "ready"
    names = [s["name"] for s in httpx.get(f"{url}/sdapi/v1/samplers").json()]
    assert "Euler a" in names and "DPM++ 2M Karras" in names
    assert httpx.get(f"{url}/sdapi/v1/sd-models").json()[0]["model_name"] == "tiny"
    assert httpx.get(f"{url}/sdapi/v1/progress").json()["progress"] == 0.0
    assert "sdtrt_requests_total" in httpx.get(f"{url}/metrics").text


def test_an_a1111_client_request_works_unchanged_and_gives_the_library_image(server, tiny_fp32):
    url, _ = server
    # the example of A1111's API wiki, plus the fields its clients send and sdtrt ignores
    body = {"prompt": "maltese puppy", "steps": 5, "seed": 7, "width": 128, "height": 96, "sampler_name": "Euler a",
            "restore_faces": False, "tiling": False, "override_settings": {}, "styles": [], "subseed": -1,
            "subseed_strength": 0.0, "seed_resize_from_h": 0, "seed_resize_from_w": 0}
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    data = r.json()
    image, parameters = png(data["images"][0])
    assert image.size == (128, 96) and parameters.startswith("maltese puppy\nSteps: 5, Sampler: Euler a")
    assert json.loads(data["info"])["seed"] == 7
    with Pipeline.from_dir(tiny_fp32[0], backend="onnxruntime-cpu") as pipe:
        want = pipe("maltese puppy", num_inference_steps=5, guidance_scale=7.0, width=128, height=96, seed=7,
                    scheduler="euler_a").images[0]
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(want))


def test_a_random_seed_is_a1111s_and_image_i_of_the_job_gets_seed_plus_i(server):
    # A1111 (modules/processing.py): get_fixed_seed(-1) = int(random.randrange(4294967294)); all_seeds =
    # [seed + x for x in range(batch_size * n_iter)], batch n taking all_seeds[n * batch_size:(n + 1) * batch_size]
    url, _ = server
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2, "width": 64, "height": 64,
                                                    "batch_size": 2, "n_iter": 2}, timeout=120)
    assert r.status_code == 200, r.text
    seeds = [int(png(b)[1].split("Seed: ")[1].split(",")[0]) for b in r.json()["images"]]
    assert seeds == [seeds[0] + i for i in range(4)] and 0 <= seeds[0] < 4294967294
    assert json.loads(r.json()["info"])["seed"] == seeds[0]


def test_img2img_and_openai_images(server):
    url, _ = server
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    init = base64.b64encode(buf.getvalue()).decode()
    r = httpx.post(f"{url}/sdapi/v1/img2img", json={"prompt": "a cat", "init_images": [init], "steps": 4,
                                                    "width": 80, "height": 64, "denoising_strength": 0.6,
                                                    "batch_size": 2}, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 2 and "Denoising strength: 0.6" in png(r.json()["images"][0])[1]
    r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a dog", "n": 1, "size": "64x64"}, timeout=120)
    assert r.status_code == 200, r.text
    assert png(r.json()["data"][0]["b64_json"])[0].size == (64, 64)


def test_img2img_inpainting_fields_as_a1111(server, tiny_fp32):
    """issue 23: A1111's inpainting_mask_invert and inpainting_fill reach the library (the same image as the
    library's), the original is pasted back outside the mask (A1111's overlay), A1111's infotext keys are written,
    and a value A1111 does not have is a 422 naming the field."""
    from tests.runtime.test_tasks import box_mask, picture

    url, _ = server

    def b64(image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    image, mask = picture(80, 64, seed=3), box_mask(80, 64, (20, 12, 60, 48))
    body = {"prompt": "a cat", "init_images": [b64(image)], "mask": b64(mask), "steps": 3, "seed": 3, "width": 80,
            "height": 64, "denoising_strength": 0.6, "sampler_name": "Euler a", "inpainting_mask_invert": 1,
            "inpainting_fill": 2, "initial_noise_multiplier": 1}
    r = httpx.post(f"{url}/sdapi/v1/img2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    got, text = png(r.json()["images"][0])
    assert "Masked content: latent noise" in text and "Mask mode: Inpaint not masked" in text, text
    with Pipeline.from_dir(tiny_fp32[0], backend="onnxruntime-cpu") as pipe:
        want = pipe("a cat", image=image, mask_image=mask, num_inference_steps=3, guidance_scale=7.0, seed=3,
                    width=80, height=64, strength=0.6, scheduler="euler_a", mask_invert=True,
                    inpainting_fill="latent noise").images[0]
    np.testing.assert_array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
    kept = np.asarray(mask) == 255  # inverted: the box is kept, pixel for pixel
    np.testing.assert_array_equal(np.asarray(got.convert("RGB"))[kept], np.asarray(image)[kept])
    for change, needle in (({"inpainting_fill": 7}, "inpainting_fill"), ({"inpainting_mask_invert": 3}, "mask_invert"),
                           ({"initial_noise_multiplier": 0.5}, "initial_noise_multiplier")):
        r = httpx.post(f"{url}/sdapi/v1/img2img", json={**body, **change}, timeout=60)
        assert r.status_code == 422 and needle in r.json()["detail"], r.text


BAD = [
    # A1111's variation seeds: sdtrt has none, so a strength above 0 is refused by name (the fields themselves, as
    # webuiapi sends them, are accepted: test_an_a1111_client_request_works_unchanged...)
    ("/sdapi/v1/txt2img", {"prompt": "a", "subseed": 3, "subseed_strength": 0.4}, 422),
    ("/sdapi/v1/txt2img", {"prompt": "a", "seed_resize_from_h": 256, "seed_resize_from_w": 384}, 422),
    ("/sdapi/v1/txt2img", b"{not json", 422),
    ("/v1/images/generations", b'{"prompt": "a", "n": 1', 400),
    ("/sdapi/v1/txt2img", {"prompt": "a", "steps": -3}, 422),
    ("/sdapi/v1/txt2img", {"prompt": "a", "steps": "many"}, 422),
    ("/sdapi/v1/txt2img", {"prompt": "a", "width": 100000, "height": 100000}, 422),
    ("/sdapi/v1/txt2img", {"prompt": "a", "sampler_name": "Heun++"}, 422),
    ("/sdapi/v1/txt2img", {"prompt": "a", "steps": 10000}, 422),
    ("/sdapi/v1/txt2img", {"prompt": "a", "cfg_scale": 1e300}, 422),
    ("/sdapi/v1/txt2img", {"prompt": "a", "width": 60}, 422),
    ("/sdapi/v1/img2img", {"prompt": "a", "init_images": ["%%% not base64 %%%"]}, 422),
    ("/sdapi/v1/img2img", {"prompt": "a", "init_images": [base64.b64encode(b"not an image").decode()]}, 422),
    ("/sdapi/v1/img2img", {"prompt": "a"}, 422),
    ("/v1/images/generations", {"prompt": "a", "size": "big"}, 400),
    ("/v1/images/generations", {"n": 1}, 400),
]


def test_bad_requests_are_4xx_json_and_the_server_keeps_serving(server):
    url, _ = server
    for k in range(50):
        path, body, status = BAD[k % len(BAD)]
        kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        r = httpx.post(f"{url}{path}", timeout=60, **kwargs)
        if path.startswith("/v1/"):  # OpenAI's error shape, and its status for a bad request
            assert r.status_code == 400 and r.json()["error"]["message"], (path, body, r.status_code, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error", r.text
        else:
            assert r.status_code == status and r.json()["detail"], (path, body, r.status_code, r.text)
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "still here", "steps": 2, "width": 64, "height": 64},
                   timeout=60)
    assert r.status_code == 200
    assert 'sdtrt_errors_total{kind="RequestValidationError"}' in httpx.get(f"{url}/metrics").text


def test_image_bombs_and_oversized_inputs_are_4xx_json_and_rotated_ones_upright(server):
    """issue 22: A1111's img2img images (init_images and mask) are held to the server's pixel limit from their
    header, a decompression bomb is a 422 in A1111's error shape (not a 500 with PIL's traceback), and a JPEG's EXIF
    orientation is applied. (OpenAI's endpoint here takes no image.)"""
    from tests.runtime.test_images import _oriented, header_png, text_bomb

    url, _ = server
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    buf = io.BytesIO()
    Image.new("RGB", (4100, 4100), "white").save(buf, format="PNG")  # over the default 4096x4096 input pixels
    big = io.BytesIO()
    Image.new("RGB", (1600, 1200), "white").save(big, format="PNG")  # a photo over --max-pixels (output): taken
    ok = io.BytesIO()
    Image.new("RGB", (64, 64), "gray").save(ok, format="PNG")
    cases = [(header_png(20000, 20000), "too large to decode safely"),
             (header_png(10000, 10000), "is 10000x10000, over the limit of 16777216 pixels per image"),
             (buf.getvalue(), "is 4100x4100, over the limit of 16777216 pixels per image"),
             (header_png(8, 8, text_bomb(50)), "holds text chunks that expand beyond what PIL reads safely")]
    for data, needle in cases:
        for field, body in (("init_images[0]", {"init_images": [b64(data)]}),
                            ("mask", {"init_images": [b64(ok.getvalue())], "mask": "data:image/png;base64," + b64(data)})):
            r = httpx.post(f"{url}/sdapi/v1/img2img", json={"prompt": "a", "steps": 2, **body}, timeout=60)
            assert r.status_code == 422, (field, needle, r.status_code, r.text)
            assert r.json()["error"] == "UsageError" and r.json()["detail"].startswith(field), r.text
            assert needle in r.json()["detail"], r.text
    r = httpx.post(f"{url}/sdapi/v1/img2img", json={"prompt": "a", "steps": 2, "width": 64, "height": 64,
                                                    "init_images": [b64(big.getvalue())]}, timeout=120)
    assert r.status_code == 200, r.text  # input and output limits are separate: clients send full-size photos
    upright = io.BytesIO()
    Image.open(io.BytesIO(_oriented(6))).transpose(Image.Transpose.ROTATE_270).save(upright, format="PNG")
    images = []
    for data in (_oriented(6), upright.getvalue()):
        r = httpx.post(f"{url}/sdapi/v1/img2img", json={"prompt": "a cat", "init_images": [b64(data)], "steps": 3,
                                                        "seed": 2, "width": 64, "height": 64,
                                                        "denoising_strength": 0.6}, timeout=120)
        assert r.status_code == 200, r.text
        images.append(np.asarray(png(r.json()["images"][0])[0]))
    assert np.array_equal(images[0], images[1])


def test_a_full_queue_answers_503_with_retry_after(server):
    url, _ = server
    slow = {"prompt": "slow", "steps": 15, "width": 512, "height": 512}  # seconds each on 2 cores
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        httpx.post(f"{url}/sdapi/v1/txt2img", json=slow, timeout=300).status_code)) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # both are queued or running now: the queue holds 2
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "one more", "steps": 2, "width": 64, "height": 64})
    for t in threads:
        t.join()
    assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
    assert results == [200, 200]


def test_binding_beyond_loopback_needs_an_api_key_and_the_key_is_checked(tiny_fp32):
    out = subprocess.run([sys.executable, "-m", "sdtrt", "serve", str(tiny_fp32[0]), "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "binding to 0.0.0.0 exposes the server: set --api-key" in out.stderr
    proc, url = start(tiny_fp32[0], "--api-key", "s3cret", "--api-auth", "ann:pw1,bob:pw2", "--backend",
                      "onnxruntime-cpu", "--cors-allow-origins", "https://ui.example")
    try:
        # a browser's preflight carries no credentials: CORS answers it, for the configured origin only
        preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"}
        r = httpx.options(f"{url}/sdapi/v1/txt2img", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ui.example"
        r = httpx.options(f"{url}/sdapi/v1/txt2img", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = httpx.get(f"{url}/sdapi/v1/samplers", headers={"Origin": "https://ui.example",
                                                           "Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ui.example"
        assert httpx.get(f"{url}/sdapi/v1/samplers").status_code == 401
        assert httpx.get(f"{url}/sdapi/v1/samplers", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(f"{url}/sdapi/v1/samplers", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/sdapi/v1/samplers", auth=("bob", "pw2")).status_code == 200  # A1111's --api-auth
        assert httpx.get(f"{url}/sdapi/v1/samplers", auth=("bob", "pw1")).status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # liveness probes carry no credentials
    finally:
        proc.terminate()
        proc.wait(10)


def test_bench_serve_reports_throughput_and_latency(server, capsys):
    from sdtrt.cli import main

    url, _ = server
    assert main(["bench-serve", url, "--concurrency", "2", "--duration", "2", "--steps", "2", "--size", "64x64"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] >= 2 and result["statuses"] == {"200": result["ok"]} and result["latency_s"]["p50"] > 0


def test_compatible_concurrent_requests_share_an_engine_call_and_get_their_own_images(server):
    url, _ = server

    def body(prompt, seed, n=1):  # Euler a draws noise at every step: each image from its own seed's generator
        return {"prompt": prompt, "negative_prompt": "blurry", "steps": 4, "seed": seed, "width": 96, "height": 64,
                "sampler_name": "Euler a", "batch_size": n}

    def batch_counts():
        text = httpx.get(f"{url}/metrics").text
        count = float(text.split("sdtrt_batch_size_count ")[1].split()[0])
        ones = float(text.split('sdtrt_batch_size_bucket{le="1.0"} ')[1].split()[0])
        return count, count - ones

    calls, merged = batch_counts()
    bodies = [body("a red fox", 3), body("a castle at night", 11, 2)]
    got = [None, None]

    def post(i):
        got[i] = httpx.post(f"{url}/sdapi/v1/txt2img", json=bodies[i], timeout=120).json()

    threads = [threading.Thread(target=post, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after_calls, after_merged = batch_counts()
    assert (after_calls - calls, after_merged - merged) == (1, 1)  # one engine call, of 3 images
    for i in range(2):  # each request alone gives the same images and metadata
        alone = httpx.post(f"{url}/sdapi/v1/txt2img", json=bodies[i], timeout=120).json()
        assert len(alone["images"]) == len(got[i]["images"]) == bodies[i]["batch_size"]
        for j, (a, b) in enumerate(zip(alone["images"], got[i]["images"])):
            (ia, pa), (ib, pb) = png(a), png(b)
            assert pa == pb and f", Seed: {bodies[i]['seed'] + j}, " in pb  # A1111: image j gets seed + j
            diff = np.abs(np.asarray(ia, np.int16) - np.asarray(ib, np.int16)).max()
            assert diff <= 1, diff  # ONNX Runtime may sum a batch of 3 in another order: at most 1/255


def test_a_client_that_goes_away_takes_its_queued_work_with_it(server):
    url, _ = server

    def calls():
        return float(httpx.get(f"{url}/metrics").text.split("sdtrt_batch_size_count ")[1].split()[0])

    before = calls()
    slow = threading.Thread(target=lambda: httpx.post(f"{url}/sdapi/v1/txt2img", timeout=300, json={
        "prompt": "slow", "steps": 15, "width": 512, "height": 512, "sampler_name": "Euler a"}))
    slow.start()
    time.sleep(0.5)
    with pytest.raises(httpx.ReadTimeout):  # queued behind the slow one; the client gives up after 1 s
        httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "impatient", "steps": 2, "width": 64, "height": 64},
                   timeout=1)
    slow.join()
    time.sleep(1.0)
    assert calls() - before == 1  # only the slow request reached the engine
