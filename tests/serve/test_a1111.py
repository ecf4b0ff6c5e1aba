"""A1111's API as its clients call it, against `sdtrt serve` on the tiny fp32 export over loopback: the options and
list endpoints in A1111's shapes, sampler and schedule names as A1111 takes them (each checked against the library's
image for the sampler table it maps to), override_settings, the ``info`` JSON of ``Processed.js()``, interrupt and
skip. Each test names the A1111 function it follows (AUTOMATIC1111/stable-diffusion-webui, v1.10)."""

import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from sdtrt.runtime import Pipeline
from tests.serve.test_app import png, start


@pytest.fixture(scope="module")
def server(tiny_fp32):
    proc, url = start(tiny_fp32[0], "--backend", "onnxruntime-cpu", "--batch-window", "0")
    while httpx.get(f"{url}/ready").status_code != 200:
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def pipe(tiny_fp32):
    with Pipeline.from_dir(tiny_fp32[0], backend="onnxruntime-cpu") as p:
        yield p


def txt2img(url, **body):
    body = {"prompt": "a red fox", "steps": 3, "width": 64, "height": 64, "seed": 11, **body}
    return httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)


def ok(r):
    assert r.status_code == 200, r.text
    return r.json()


# modules/api/api.py Processed.js() keys (modules/processing.py class Processed, def js), in A1111's order
PROCESSED_JS = ["prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
                "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps",
                "batch_size", "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash",
                "sd_vae_name", "sd_vae_hash", "seed_resize_from_w", "seed_resize_from_h", "denoising_strength",
                "extra_generation_params", "index_of_first_image", "infotexts", "styles", "job_timestamp",
                "clip_skip", "is_using_inpainting_conditioning", "version"]


def test_options_read_and_written_as_a1111_set_config_takes_them(server):
    # modules/api/api.py get_config (every option) and set_config (an unknown checkpoint refused before anything is
    # set; then opts.set for each key; returns None); Open WebUI set_image_model POSTs back the whole dict it read
    options = ok(httpx.get(f"{server}/sdapi/v1/options"))
    title = ok(httpx.get(f"{server}/sdapi/v1/sd-models"))[0]["title"]
    assert options["sd_model_checkpoint"] == title and options["CLIP_stop_at_last_layers"] == 1
    assert options["sd_vae"] == "Automatic" and options["samples_format"] == "png" and "forge_preset" not in options
    assert ok(httpx.post(f"{server}/sdapi/v1/options", json={**options, "some_extension_option": 3})) is None
    assert ok(httpx.post(f"{server}/sdapi/v1/options", json={"sd_model_checkpoint": title})) is None
    r = httpx.post(f"{server}/sdapi/v1/options", json={"sd_model_checkpoint": "nope.safetensors",
                                                         "CLIP_stop_at_last_layers": 2})
    assert r.status_code == 422 and "nope.safetensors" in r.json()["detail"] and title in r.json()["detail"]
    r = httpx.post(f"{server}/sdapi/v1/options", json={"sd_vae": "kl-f8-anime.ckpt"})
    assert r.status_code == 422 and "Automatic" in r.json()["detail"]
    assert ok(httpx.get(f"{server}/sdapi/v1/options")) == options  # nothing of a refused POST was kept


def test_every_list_endpoint_answers_in_a1111_shapes(server):
    # modules/api/api.py: get_schedulers, get_upscalers, get_latent_upscale_modes, get_sd_vaes, get_embeddings,
    # get_prompt_styles, get_cmd_flags, get_memory, interruptapi ({}), skip (None), refresh_checkpoints (None);
    # extensions-builtin/Lora/scripts/lora_script.py api_networks (loras, refresh-loras); modules/ui.py /internal/ping
    get = lambda path: ok(httpx.get(f"{server}{path}"))  # noqa: E731
    post = lambda path: ok(httpx.post(f"{server}{path}"))  # noqa: E731
    schedulers = get("/sdapi/v1/schedulers")
    assert {"automatic", "karras", "exponential", "sgm_uniform", "normal", "simple", "uniform"} <= {
        s["name"] for s in schedulers}
    assert set(schedulers[0]) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
    assert next(s for s in schedulers if s["name"] == "karras")["default_rho"] == 7.0
    assert [u["name"] for u in get("/sdapi/v1/upscalers")][:2] == ["None", "Lanczos"]
    assert "Latent (bicubic antialiased)" in [m["name"] for m in get("/sdapi/v1/latent-upscale-modes")]
    assert get("/sdapi/v1/sd-vae") == [] and get("/sdapi/v1/sd-modules") == [] and get("/sdapi/v1/prompt-styles") == []
    assert get("/sdapi/v1/embeddings") == {"loaded": {}, "skipped": {}} and get("/sdapi/v1/loras") == []
    assert get("/sdapi/v1/cmd-flags")["api"] is True and get("/sdapi/v1/memory")["ram"]["total"] > 0
    samplers = get("/sdapi/v1/samplers")
    assert "k_euler_a" in next(s for s in samplers if s["name"] == "Euler a")["aliases"]
    assert get("/internal/ping") == {} and post("/sdapi/v1/interrupt") == {}
    assert post("/sdapi/v1/skip") is None and post("/sdapi/v1/refresh-loras") is None
    assert post("/sdapi/v1/refresh-checkpoints") is None
    ok(txt2img(server))  # an interrupt or skip sent while idle stops nothing later (A1111's state.begin resets it)


# (sampler_name, scheduler) as clients send them -> sdtrt's sampler, and the infotext's Sampler / Schedule type.
# modules/sd_samplers.py get_sampler_and_scheduler: a schedule suffix in the sampler's name applies unless a
# scheduler is named (sdtrt: unless a non-Automatic one is); names by name or label (sdtrt: any case, and aliases)
NAMES = [
    (("Euler", "karras"), "euler_karras", ("Euler", "Karras")),  # webuiapi's Euler + Karras, refused before
    (("DPM++ 2M Karras", None), "dpmpp_2m_karras", ("DPM++ 2M", "Karras")),
    (("DPM++ 2M Karras", "Exponential"), "dpmpp_2m_exponential", ("DPM++ 2M", "Exponential")),
    (("k_euler_a", "SGM UNIFORM"), "euler_a_trailing", ("Euler a", "SGM Uniform")),
    (("ddim", "normal"), "ddim_linspace", ("DDIM", "Normal")),  # SillyTavern's defaults: DDIM, "normal"
    (("UniPC", "Simple"), "unipc_trailing", ("UniPC", "SGM Uniform")),
    (("LMS Karras", "automatic"), "lms_karras", ("LMS", "Karras")),  # webuiapi always sends "automatic"
]


def test_sampler_and_schedule_names_run_the_table_they_map_to(server, pipe):
    for (sampler, scheduler), ours, (name, schedule) in NAMES:
        data = ok(txt2img(server, sampler_name=sampler, scheduler=scheduler))
        image, text = png(data["images"][0])
        assert f"Sampler: {name}, Schedule type: {schedule}," in text, (sampler, scheduler, text)
        want = pipe("a red fox", num_inference_steps=3, guidance_scale=7.0, width=64, height=64, seed=11,
                    scheduler=ours).images[0]
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(want), err_msg=ours)
        info = json.loads(data["info"])
        assert (info["sampler_name"], info["scheduler"]) == (name, schedule)
    plain = png(ok(txt2img(server, sampler_name="Euler"))["images"][0])[0]
    karras = png(ok(txt2img(server, sampler_name="Euler", scheduler="Karras"))["images"][0])[0]
    assert np.abs(np.asarray(plain, np.int16) - np.asarray(karras, np.int16)).max() > 0  # the schedule changed it


def test_unknown_schedulers_fall_back_to_automatic_and_sampler_index_is_read(server):
    # modules/sd_samplers.py fix_p_invalid_sampler_and_scheduler: an unknown scheduler ('N/A' from SillyTavern when
    # its list failed) runs as Automatic; modules/api/api.py text2imgapi reads sampler_index when sampler_name is empty
    data = ok(txt2img(server, sampler_index="Euler", scheduler="N/A"))
    info = json.loads(data["info"])
    assert info["sampler_name"] == "Euler" and info["scheduler"] == "Automatic" and "'N/A'" in info["notes"][0]
    assert "Schedule type" not in png(data["images"][0])[1]
    assert json.loads(ok(txt2img(server, sampler_name="Euler a", sampler_index="DDIM"))["info"])["sampler_name"] == \
        "Euler a"
    for body, needle in [({"sampler_name": "Euler a", "scheduler": "Karras"}, "'Euler a' has no schedule type 'Karras'"),
                         ({"sampler_name": "Euler", "scheduler": "Align Your Steps"}, "not available in sdtrt"),
                         ({"sampler_name": "Heun"}, "sampler 'Heun' is not available")]:
        r = txt2img(server, **body)
        assert r.status_code == 422 and needle in r.json()["detail"], r.text


def test_override_settings_apply_to_the_request_and_are_restored(server):
    # modules/processing.py process_images: override_settings set before, restored after unless
    # override_settings_restore_afterwards is false; CLIP_stop_at_last_layers is "Clip skip", samples_format the
    # images' format (modules/api/api.py encode_pil_to_base64)
    data = ok(txt2img(server, override_settings={"CLIP_stop_at_last_layers": 2, "samples_format": "jpg",
                                                  "unknown_setting": 5}))
    raw = base64.b64decode(data["images"][0])
    assert Image.open(io.BytesIO(raw)).format == "JPEG"
    assert json.loads(data["info"])["clip_skip"] == 2 and "Clip skip: 2" in json.loads(data["info"])["infotexts"][0]
    after = ok(txt2img(server))
    assert Image.open(io.BytesIO(base64.b64decode(after["images"][0]))).format == "PNG"
    assert json.loads(after["info"])["clip_skip"] == 1  # restored
    kept = ok(txt2img(server, override_settings={"CLIP_stop_at_last_layers": 2},
                      override_settings_restore_afterwards=False))
    assert json.loads(kept["info"])["clip_skip"] == 2
    try:
        assert ok(httpx.get(f"{server}/sdapi/v1/options"))["CLIP_stop_at_last_layers"] == 2
        assert "Clip skip: 2" in png(ok(txt2img(server))["images"][0])[1]
    finally:
        ok(httpx.post(f"{server}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}))
    r = txt2img(server, override_settings={"sd_model_checkpoint": "other.safetensors"})
    assert r.status_code == 422 and "other.safetensors" in r.json()["detail"]


def test_info_carries_every_key_of_processed_js_read_from_the_images(server, tiny_fp32):
    # modules/processing.py Processed.js; the request echoed as modules/api/api.py text2imgapi's `parameters`
    data = ok(txt2img(server, batch_size=2, negative_prompt="blurry", cfg_scale=5.5, styles=["none"]))
    info = json.loads(data["info"])
    assert [k for k in PROCESSED_JS if k not in info] == []
    texts = [png(b)[1] for b in data["images"]]
    assert info["infotexts"] == texts
    assert info["all_seeds"] == [int(t.split("Seed: ")[1].split(",")[0]) for t in texts]
    assert info["seed"] == info["all_seeds"][0] == 11
    assert info["all_prompts"] == ["a red fox"] * 2 and info["all_negative_prompts"] == ["blurry"] * 2
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 64, 3, 5.5)
    assert info["sampler_name"] and info["sampler_name"] in texts[0]  # the model's own sampler, named
    assert info["sd_model_name"] == "tiny" and info["sd_model_hash"] in texts[0] and info["version"].startswith("sdtrt")
    assert info["styles"] == ["none"] and info["batch_size"] == 2 and len(info["job_timestamp"]) == 14
    assert info["is_using_inpainting_conditioning"] is False and info["index_of_first_image"] == 0
    assert data["parameters"]["sampler_name"] == info["sampler_name"] and data["parameters"]["batch_size"] == 2
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 30, 10)).save(buf, format="PNG")
    init = base64.b64encode(buf.getvalue()).decode()
    img = ok(httpx.post(f"{server}/sdapi/v1/img2img", json={"prompt": "a", "init_images": [init], "steps": 4,
                                                          "width": 64, "height": 64, "denoising_strength": 0.5},
                        timeout=60))
    assert img["parameters"]["init_images"] is None  # img2imgapi: not echoed unless include_init_images
    assert json.loads(img["info"])["denoising_strength"] == 0.5
    # modules/api/api.py pnginfoapi: the parameters text, and it parsed
    read = ok(httpx.post(f"{server}/sdapi/v1/png-info", json={"image": "data:image/png;base64," + data["images"][0]}))
    assert read["info"] == texts[0] and read["parameters"]["Seed"] == "11"
    assert ok(httpx.post(f"{server}/sdapi/v1/png-info", json={"image": init}))["info"] == ""


def test_interrupt_and_skip_stop_the_running_generation_at_its_next_step(server):
    # modules/shared_state.py State.interrupt / skip, checked between steps (sd_samplers_common
    # InterruptedException); processing.py process_images_inner: after an interrupt no further batch runs, after a
    # skip the next one does; the stopped batch's images are made from the latents so far (sd_samplers_common.py
    # Sampler.launch_sampling: `except InterruptedException: return self.last_latent`), answered 200.
    def run(how, when):
        box = {}
        t = threading.Thread(target=lambda: box.update(r=txt2img(server, steps=100, n_iter=2, sampler_name="Euler")))
        t.start()
        while httpx.get(f"{server}/sdapi/v1/progress").json()["progress"] < when and t.is_alive():
            time.sleep(0.02)
        assert ok(httpx.post(f"{server}/sdapi/v1/{how}")) in ({}, None)
        t.join(120)
        return box["r"]

    def images(data):
        return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))), np.float32) for b in data["images"]]

    full = ok(txt2img(server, steps=100, n_iter=1, sampler_name="Euler"))
    data = ok(run("interrupt", 0.6))  # during the second batch: the first comes back whole, the second stopped
    assert json.loads(data["info"])["all_seeds"] == [11, 12]
    first, stopped = images(data)
    assert np.array_equal(first, images(full)[0])  # the finished batch is the image it would be alone
    data = ok(run("skip", 0.1))  # during the first batch: it ends there, the second still runs whole
    assert json.loads(data["info"])["all_seeds"] == [11, 12]
    cut, second = images(data)
    assert np.abs(cut - images(full)[0]).mean() > 5  # made from latents 10-60 % of the way: not the finished image
    data = ok(run("interrupt", 0.1))  # during the first batch: its image so far, and no second batch
    assert json.loads(data["info"])["all_seeds"] == [11] and len(data["images"]) == 1


@pytest.mark.parametrize("field, value, needle", [
    ("tiling", True, "tiling"),
    ("hr_checkpoint_name", "other [abc]", "hr_checkpoint_name"), ("script_name", "x/y/z plot", "script_name"),
    ("alwayson_scripts", {"ControlNet": {"args": [{"enabled": True}]}}, "alwayson_scripts 'ControlNet'"),
    ("resize_mode", 1, "resize_mode 1"), ("init_images", ["a", "b"], "2 init_images")])
def test_fields_that_would_change_the_image_unseen_are_refused_by_name(server, field, value, needle):
    # A1111 does these (processing.py: tiling, hr_checkpoint_name; scripts; img2img resize_mode 1-3 and
    # init_images cycled over the batch): sdtrt does not, so it says so rather than answer an image without them
    endpoint = "img2img" if field in ("resize_mode", "init_images") else "txt2img"
    body = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, field: value}
    if endpoint == "img2img" and field != "init_images":
        body["init_images"] = [base64.b64encode(_png(64)).decode()]
    r = httpx.post(f"{server}/sdapi/v1/{endpoint}", json=body, timeout=60)
    assert r.status_code == 422 and needle in r.json()["detail"] and "not available in sdtrt" in r.json()["detail"], r.text
    defaults = {"tiling": False, "hr_checkpoint_name": None, "script_name": None,
                "alwayson_scripts": {"ControlNet": {"args": []}}, "resize_mode": 0}  # what clients send by default
    if field in defaults:
        body[field] = defaults[field]
        assert httpx.post(f"{server}/sdapi/v1/{endpoint}", json=body, timeout=60).status_code == 200


def _png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), "gray").save(buf, format="PNG")
    return buf.getvalue()


def test_requests_on_other_schedules_are_not_merged_into_one_engine_call(pipe):
    # the batching key holds the whole sampler configuration: Euler and Euler + Karras share a table name, not a
    # schedule (a merged call would run the second on the first's schedule while its text said Karras)
    from sdtrt.runtime.request import GenerationRequest
    from sdtrt.serve.app import Server

    keys = [Server.batch_key(req, 1, pipe.plan(req)) for req in (
        GenerationRequest.create("a", None, 4, 7.0, 64, 64, 1, 1, name) for name in ("euler", "euler_karras", "euler"))]
    assert keys[0] != keys[1] and keys[0] == keys[2]


@pytest.mark.parametrize("refiner", ["", "None", None])
def test_a_refiner_checkpoint_that_is_no_model_is_a_4xx_and_none_runs_alone(server, refiner):
    """refiner_checkpoint runs base + refiner (tests/runtime/test_refiner.py); an unknown one is named, the values
    clients send for "no refiner" run the model alone."""
    body = {"prompt": "a fox", "steps": 2, "width": 64, "height": 64, "refiner_checkpoint": "sd_xl_refiner"}
    r = httpx.post(f"{server}/sdapi/v1/txt2img", json=body, timeout=60)
    assert 400 <= r.status_code < 500 and "sd_xl_refiner" in r.text, r.text
    r = httpx.post(f"{server}/sdapi/v1/txt2img", json={**body, "refiner_checkpoint": refiner}, timeout=60)
    assert r.status_code == 200 and "Refiner" not in json.loads(r.json()["info"])["infotexts"][0]
