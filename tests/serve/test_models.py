"""`sdtrt serve --models-dir`: several engine folders behind one server, as A1111 clients and the OpenAI SDK select
them. Two different tiny models (weights seeds 0 and 1) and a third folder with the first's weights; each image is
compared with the library's on the folder that should have made it, so a request that ran on the wrong model fails.

A1111 (modules/api/api.py, v1.10): ``set_config`` switches the checkpoint named by ``sd_model_checkpoint``;
``get_config`` reports it as the checkpoint's title ``name [shorthash]``; ``text2imgapi`` runs a request's
``override_settings.sd_model_checkpoint`` on that checkpoint (modules/processing.py ``process_images``)."""

import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from sdtrt.export import ExportConfig, export
from sdtrt.runtime import Pipeline
from tests.conftest import TINY_RANGES
from tests.serve.test_app import free_port

BODY = {"prompt": "a red fox", "steps": 2, "width": 64, "height": 64, "seed": 11, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def models_dir(tiny_fp32, tmp_path_factory):
    """alpha: tiny (weights seed 0); beta: tiny with weights seed 1; gamma: alpha's folder again; broken: a folder
    whose manifest cannot be read; notes: a folder that is no engine folder."""
    root = tmp_path_factory.mktemp("models")
    os.symlink(tiny_fp32[0], root / "alpha")
    export(ExportConfig(model="tiny", out=str(root / "beta"), precision="fp32", seed=1, **TINY_RANGES),
           log=lambda s: None)
    os.symlink(tiny_fp32[0], root / "gamma")
    (root / "broken").mkdir()
    (root / "broken" / "manifest.json").write_text("{not json")
    (root / "notes").mkdir()
    return root


def manifest_hash(folder) -> str:
    return json.loads((folder / "manifest.json").read_text())["components"]["unet"]["sha256"]


def start_models(models_dir, *extra):
    """``sdtrt serve --models-dir DIR``: (process, url, the stderr lines up to the startup line)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "serve", "--models-dir", str(models_dir), "--port",
                             str(port), "--backend", "onnxruntime-cpu", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    while not (lines and lines[-1].startswith("sdtrt serve: listening")):
        line = proc.stderr.readline()
        assert line, f"the server exited: {lines}"
        lines.append(line.rstrip("\n"))
    return proc, f"http://127.0.0.1:{port}", lines


@pytest.fixture(scope="module")
def server(models_dir):
    proc, url, lines = start_models(models_dir, "--batch-window", "0")
    yield url, lines
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def library(models_dir):
    """The image each model makes of BODY, with the library."""
    out = {}
    for name in ("alpha", "beta"):
        with Pipeline.from_dir(models_dir / name, backend="onnxruntime-cpu") as pipe:
            out[name] = np.asarray(pipe("a red fox", num_inference_steps=2, guidance_scale=7.0, width=64, height=64,
                                        seed=11, scheduler="euler").images[0])
    assert not np.array_equal(out["alpha"], out["beta"])  # two models, two images: the comparisons below can fail
    return out


def image_of(b64: str):
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    return np.asarray(image.convert("RGB")), image.text.get("parameters", "")


def txt2img(url, **extra):
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={**BODY, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return image_of(r.json()["images"][0])


def checkpoint(url) -> str:
    return httpx.get(f"{url}/sdapi/v1/options").json()["sd_model_checkpoint"]


def select(url, name):
    r = httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": name}, timeout=120)
    assert r.status_code == 200 and r.json() is None, r.text  # A1111's set_config returns None


def loads(url) -> dict:
    text = httpx.get(f"{url}/metrics").text
    counts = {m[1]: float(m[2]) for m in re.finditer(r'^sdtrt_model_loads_total\{model="(\w+)"\} (\S+)$', text, re.M)}
    counts["loaded now"] = float(re.search(r"^sdtrt_models_loaded (\S+)$", text, re.M)[1])
    return counts


def test_every_engine_folder_is_listed_and_broken_ones_are_named_at_startup(server, models_dir):
    url, lines = server
    assert len(lines) == 2 and lines[0].startswith("sdtrt serve: warning: skipped 1 folder(s)")
    assert "broken: manifest.json is not valid JSON" in lines[0]
    assert "notes" not in lines[0] and "3 models, default alpha, at most 1 loaded" in lines[1]
    titles = [m["title"] for m in httpx.get(f"{url}/sdapi/v1/sd-models").json()]
    want = [f"{name} [{manifest_hash(models_dir / name)[:10]}]" for name in ("alpha", "beta", "gamma")]
    assert titles == want and want[0] != want[1]
    assert checkpoint(url) == want[0]  # the first by name is the default
    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["alpha", "beta", "gamma"]


def test_options_switch_the_default_model_and_requests_run_on_it(server, library, models_dir):
    url, _ = server
    image, parameters = txt2img(url)
    np.testing.assert_array_equal(image, library["alpha"])
    select(url, f"beta [{manifest_hash(models_dir / 'beta')[:10]}]")  # as clients send it: the title
    try:
        assert checkpoint(url).startswith("beta [")
        image, parameters = txt2img(url)
        np.testing.assert_array_equal(image, library["beta"])
        assert "Model: beta" in parameters and f"Model hash: {manifest_hash(models_dir / 'beta')[:10]}" in parameters
    finally:
        select(url, "alpha")  # by name, as A1111's checkpoint_aliases take it too
    assert checkpoint(url).startswith("alpha [")


def test_override_settings_run_one_request_on_another_model(server, library):
    url, _ = server
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={**BODY, "override_settings": {"sd_model_checkpoint": "beta"}},
                   timeout=120)
    assert r.status_code == 200 and json.loads(r.json()["info"])["sd_model_name"] == "beta", r.text
    np.testing.assert_array_equal(image_of(r.json()["images"][0])[0], library["beta"])
    assert checkpoint(url).startswith("alpha [")  # the default is unchanged
    np.testing.assert_array_equal(txt2img(url)[0], library["alpha"])
    # override_settings_restore_afterwards false: A1111 keeps the override, the model included (processing.py
    # process_images: the settings are restored only when it is true)
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={**BODY, "override_settings": {"sd_model_checkpoint": "beta"},
                                                    "override_settings_restore_afterwards": False}, timeout=120)
    assert r.status_code == 200 and checkpoint(url).startswith("beta [")
    np.testing.assert_array_equal(txt2img(url)[0], library["beta"])
    assert httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "alpha"}, timeout=120).status_code == 200


def test_the_openai_model_field_selects_the_model(server):
    url, _ = server
    made = {}
    for model in ("beta", "alpha", "dall-e-2"):  # OpenAI's own names run on the default
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a fox", "size": "64x64", "model": model},
                       timeout=120)
        assert r.status_code == 200, r.text
        made[model] = image_of(r.json()["data"][0]["b64_json"])[1]
    assert "Model: beta" in made["beta"] and "Model: alpha" in made["alpha"] and "Model: alpha" in made["dall-e-2"]


def test_an_unknown_model_is_a_4xx_naming_the_known_ones_in_each_protocols_shape(server):
    url, _ = server
    for r in (httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "delta"}),
              httpx.post(f"{url}/sdapi/v1/txt2img",
                         json={**BODY, "override_settings": {"sd_model_checkpoint": "delta"}})):
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["error"] == "UnknownModel" and "'delta'" in body["detail"]
        assert all(f"'{name} [" in body["detail"] for name in ("alpha", "beta", "gamma"))
    r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a fox", "size": "64x64", "model": "delta"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "model" and error["type"] == "invalid_request_error" and "'alpha [" in error["message"]
    assert checkpoint(url).startswith("alpha [")  # nothing switched


def test_at_most_n_models_are_loaded_and_the_least_recently_used_is_unloaded(server, models_dir):
    url, _ = server  # at most 1
    before = loads(url)
    for name in ("beta", "alpha", "alpha"):
        assert f"Model: {name}" in txt2img(url, override_settings={"sd_model_checkpoint": name})[1]
    after = loads(url)
    assert after["loaded now"] == 1 and after["beta"] == before.get("beta", 0) + 1
    assert after["alpha"] == before["alpha"] + 1  # unloaded for beta, loaded again once (not for the second)
    proc, url2, _ = start_models(models_dir, "--max-loaded-models", "2", "--batch-window", "0")
    try:
        for name in ("beta", "alpha", "gamma", "alpha"):  # gamma unloads beta, used before alpha
            assert f"Model: {name}" in txt2img(url2, override_settings={"sd_model_checkpoint": name})[1]
        assert loads(url2) == {"alpha": 1, "beta": 1, "gamma": 1, "loaded now": 2}
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_switch_waits_for_the_request_that_runs(server, models_dir):
    url, _ = server
    body = {**BODY, "steps": 40, "width": 192, "height": 192}
    done = {}

    def long_request():
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)
        done["request"] = time.monotonic()
        done["response"] = r

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/sdapi/v1/progress").json()["progress"] == 0 and "request" not in done \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "request" not in done  # it runs now (else make it longer)
    select(url, "beta")
    try:
        # the running request was done before the switch was answered (it counts as waiting until its handler
        # takes its result, which the engine thread hands over before it loads beta)
        assert httpx.get(f"{url}/sdapi/v1/progress").json()["state"]["job_count"] == 0
        t.join()
        image, parameters = image_of(done["response"].json()["images"][0])
        assert "Model: alpha" in parameters  # ran on the model it was sent to
        with Pipeline.from_dir(models_dir / "alpha", backend="onnxruntime-cpu") as pipe:
            want = pipe("a red fox", num_inference_steps=40, guidance_scale=7.0, width=192, height=192, seed=11,
                        scheduler="euler").images[0]
        np.testing.assert_array_equal(image, np.asarray(want))  # the whole of it on alpha: no switch in between
    finally:
        select(url, "alpha")


def test_refresh_checkpoints_rescans_the_folder(server, models_dir, tiny_fp32):
    url, _ = server
    os.symlink(tiny_fp32[0], models_dir / "zeta")
    try:
        assert "zeta" not in [m["model_name"] for m in httpx.get(f"{url}/sdapi/v1/sd-models").json()]
        r = httpx.post(f"{url}/sdapi/v1/refresh-checkpoints")
        assert r.status_code == 200 and r.json() is None
        assert "zeta" in [m["model_name"] for m in httpx.get(f"{url}/sdapi/v1/sd-models").json()]
        assert "Model: zeta" in txt2img(url, override_settings={"sd_model_checkpoint": "zeta"})[1]
    finally:
        (models_dir / "zeta").unlink()
        httpx.post(f"{url}/sdapi/v1/refresh-checkpoints")
    assert "zeta" not in [m["model_name"] for m in httpx.get(f"{url}/sdapi/v1/sd-models").json()]


@pytest.mark.parametrize("argv, message", [
    ([], "give one engine folder, or --models-dir DIR"),
    (["ENGINE", "--models-dir", "MODELS"], "not both"),
    (["--models-dir", "EMPTY"], "holds no engine folder that can be served"),
    (["--models-dir", "MODELS", "--max-loaded-models", "0"], "--max-loaded-models must be at least 1"),
    (["ENGINE", "--max-loaded-models", "2"], "--max-loaded-models is an option of --models-dir"),
    (["--models-dir", "MISSING"], "does not exist"),
])
def test_bad_models_dir_arguments_are_one_line_and_exit_2(cli, models_dir, tiny_fp32, tmp_path, argv, message):
    names = {"ENGINE": tiny_fp32[0], "MODELS": models_dir, "EMPTY": tmp_path, "MISSING": tmp_path / "nope"}
    code, _, err = cli("serve", *[names.get(a, a) for a in argv], "--port", "0")
    assert code == 2 and message in err and "\n" not in err, err
