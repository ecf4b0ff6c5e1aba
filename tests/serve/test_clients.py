"""Real third-party clients against `sdtrt serve` on loopback (uvicorn in a subprocess, two tiny models in a
`--models-dir`, HTTP Basic and an API key on): each client's own sequence of calls — start-up, connect check, lists,
switch model, generate, cancel — in the order and shape its source makes them, and each answer parsed as that source
parses it.

- webuiapi and the OpenAI SDK are the real packages (the `test` extra; versions in constraints.txt).
- Open WebUI and SillyTavern are not Python packages: their calls are replayed with httpx, line by line from their
  sources, cited at each step:
  Open WebUI: open-webui/open-webui backend/open_webui/routers/images.py @ 02530d501461ce58ab06231d7c2ef2024a141ddf
  (aiohttp; the A1111 engine). SillyTavern 1.12.6 @ ba6f7b7a98cf7a5eaf4f0e81da9779a9a668ced4: the browser side
  public/scripts/extensions/stable-diffusion/index.js calls ST's own /api/sd/* routes, which
  src/endpoints/stable-diffusion.js turns into these A1111 calls (the newer 02903fdd3ad3 adds the options check
  before /generate and the /sd-modules probe; both replayed).
"""

import base64
import io
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve.test_app import png, start

openai = pytest.importorskip("openai", reason="the client tests need the `test` extra (openai, webuiapi)")
webuiapi = pytest.importorskip("webuiapi", reason="the client tests need the `test` extra (openai, webuiapi)")

USER, PASSWORD, API_KEY = "webui", "s3cret", "sk-sdtrt-test"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()  # what each client builds from user:pass
SLOW = {"width": 192, "height": 192, "steps": 150}  # a generation that runs for tens of seconds unless interrupted
STOPPED_WITHIN_S = 10  # an interrupted generation is over within this (uninterrupted: several times longer)


@pytest.fixture(scope="module")
def server(tiny_fp32, tiny_fp16, tmp_path_factory):
    """Two models (the fp32 and fp16 exports of tiny: other files, other hashes, other pixels)."""
    models = tmp_path_factory.mktemp("models")
    (models / "tiny-a").symlink_to(tiny_fp32[0], target_is_directory=True)
    (models / "tiny-b").symlink_to(tiny_fp16[0], target_is_directory=True)
    proc, url = start(f"--models-dir={models}", "--backend", "onnxruntime-cpu", "--api-auth", f"{USER}:{PASSWORD}",
                      "--api-key", API_KEY)
    deadline = time.time() + 120
    while httpx.get(f"{url}/ready", headers={"Authorization": BASIC}).status_code != 200:
        assert time.time() < deadline, "the models did not load"
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(10)


def entry(url: str, name: str) -> dict:
    """The /sd-models entry a client's model name stands for (its title, model name or hash)."""
    models = httpx.get(f"{url}/sdapi/v1/sd-models", headers={"Authorization": BASIC}).json()
    (found,) = [m for m in models if name in (m["title"], m["model_name"], m["hash"])]
    return found


def idle(progress: dict) -> bool:
    """How SillyTavern (/set-model) and webuiapi (util_wait_for_ready) tell an idle A1111: `progress === 0.0 &&
    state.job_count === 0` — numbers, in JSON."""
    p, jobs = progress["progress"], progress["state"]["job_count"]
    return type(p) in (int, float) and type(jobs) is int and p == 0 and jobs == 0


def wait_running(get_progress) -> None:
    """Until the slow generation has made a step (a stop is pressed on a generation that runs; A1111 forgets an
    interrupt that comes before its job begins: State.begin resets it)."""
    deadline = time.time() + 60
    while True:
        if get_progress()["progress"] > 0:
            return
        assert time.time() < deadline, "the slow generation never showed in /progress"
        time.sleep(0.05)


def wait_idle(get_progress, within_s: float) -> None:
    deadline = time.time() + within_s
    while not idle(get_progress()):
        assert time.time() < deadline, f"still busy {within_s} s after the cancel"
        time.sleep(0.1)


def test_open_webui(server):
    """Open WebUI, engine "automatic1111", AUTOMATIC1111_API_AUTH="webui:s3cret", an admin generating from chat with
    the model picked in its settings (no cancel: Open WebUI never calls /interrupt)."""
    url = server
    a1111 = httpx.Client(base_url=url, headers={"authorization": BASIC}, timeout=300)  # get_automatic1111_api_auth

    # verify_url(): GET /options, r.raise_for_status() — the body is not read
    a1111.get("/sdapi/v1/options").raise_for_status()
    # get_models(): [{'id': model['title'], 'name': model['model_name']}]
    models = [{"id": m["title"], "name": m["model_name"]} for m in a1111.get("/sdapi/v1/sd-models").json()]
    assert len(models) == 2 and len({m["id"] for m in models}) == 2, models

    def get_image_model():  # options['sd_model_checkpoint'] (a KeyError: "Failed to connect to the image engine")
        return a1111.get("/sdapi/v1/options").json()["sd_model_checkpoint"]

    def set_image_model(model):  # POSTs back the WHOLE options dict it read, with the model changed
        options = a1111.get("/sdapi/v1/options").json()
        if model != options["sd_model_checkpoint"]:
            options["sd_model_checkpoint"] = model
            a1111.post("/sdapi/v1/options", json=options).raise_for_status()

    current = get_image_model()
    assert current in [m["id"] for m in models]  # the title, as /sd-models spells it (else it re-POSTs every time)
    target = next(m["id"] for m in models if m["id"] != current)
    set_image_model(target)  # update_config() with IMAGE_GENERATION_MODEL = the other model

    # image_generations(form_data={model, prompt, size: "64x96", n: 2, steps: 3, negative_prompt}):
    assert get_image_model() == target
    set_image_model(target)  # `if form_data.model and user.role == 'admin'`: nothing to change now
    data = {"prompt": "a lighthouse at dusk", "batch_size": 2, "width": 64, "height": 96, "steps": 3,
            "negative_prompt": "blurry",
            # AUTOMATIC1111_PARAMS, merged last: what an admin sets (A1111 1.9+ names)
            "cfg_scale": 5, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}
    res = a1111.post("/sdapi/v1/txt2img", json=data).json()  # r.json(content_type=None): no status check
    images = res["images"]
    metadata = {**data, "info": res["info"]}  # stored with each image; a missing 'info' is a KeyError
    assert len(images) == 2 and isinstance(metadata["info"], str)
    want_hash = entry(url, target)["hash"]
    for i, b64 in enumerate(images):
        assert "," not in b64  # get_image_data(): no ',' = raw base64 of an image/png
        assert base64.b64decode(b64).startswith(b"\x89PNG")
        image, parameters = png(b64)
        assert image.size == (64, 96)
        assert f"Model hash: {want_hash}," in parameters  # it ran on the model Open WebUI switched to
        assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5," in parameters, parameters


def test_sillytavern(server):
    """SillyTavern's "SD WebUI (A1111)" source, auto_auth="webui:s3cret": Connect, the lists of its settings panel,
    a model picked, an image generated with its default settings, a generation cancelled."""
    url = server
    st = httpx.Client(base_url=url, headers={"Authorization": BASIC}, timeout=300)  # getBasicAuthHeader(auth)

    def ok(r):  # `if (!result.ok) throw new Error('SD WebUI returned an error.')`
        assert r.is_success, (r.request.url.path, r.status_code, r.text)
        return r

    # validateAutoUrl() -> /api/sd/ping: GET /options, result.ok only
    ok(st.get("/sdapi/v1/options"))
    # loadSettingOptions(): samplers, models, schedulers, VAEs
    samplers = [x["name"] for x in ok(st.get("/sdapi/v1/samplers")).json()]  # /api/sd/samplers
    current = st.get("/sdapi/v1/options").json()["sd_model_checkpoint"]  # loadAutoModels -> /api/sd/get-model
    models = [{"value": x["title"], "text": x["title"]} for x in ok(st.get("/sdapi/v1/sd-models")).json()]
    upscalers = [x["name"] for x in ok(st.get("/sdapi/v1/upscalers")).json()]  # /api/sd/upscalers: both must be ok
    latent = [x["name"] for x in ok(st.get("/sdapi/v1/latent-upscale-modes")).json()]
    upscalers[1:1] = latent  # upscalers.splice(1, 0, ...latentUpscalers): "0 = None, then Latent Upscalers"
    schedulers = [x["name"] for x in ok(st.get("/sdapi/v1/schedulers")).json()]  # /api/sd/schedulers
    # /api/sd/vaes: Promise.allSettled([/sd-vae, /sd-modules]), the first fulfilled array wins
    settled = [r.json() for r in (st.get("/sdapi/v1/sd-vae"), st.get("/sdapi/v1/sd-modules")) if r.is_success]
    assert settled and isinstance(settled[0], list)
    vaes = ["Automatic"] + [x["model_name"] for x in settled[0]]  # placeholderVae unshifted client-side
    titles = [m["value"] for m in models]
    assert current in titles and len(titles) == 2
    # its saved defaults must be among the choices it offers: sampler 'DDIM', hr_upscaler 'Latent', and a
    # scheduler list to pick from (its default 'normal' is sent whatever the list holds)
    assert "DDIM" in samplers and upscalers[1] == "Latent" and schedulers and vaes

    # onModelChange() -> /api/sd/set-model: POST /options {sd_model_checkpoint}, ok; then up to 10 x GET
    # /progress, 2 s apart, until progress === 0.0 && state.job_count === 0
    target = next(t for t in titles if t != current)
    ok(st.post("/sdapi/v1/options", json={"sd_model_checkpoint": target}))
    for _ in range(10):
        if idle(st.get("/sdapi/v1/progress").json()):
            break
        time.sleep(2)
    else:
        raise AssertionError("never idle after the model switch")

    # generateAutoImage() -> /api/sd/generate (02903fdd: first GET /options, `'forge_preset' in optionsData`)
    options = st.get("/sdapi/v1/options")
    assert options.is_success and "forge_preset" not in options.json()  # not Forge: no forge_additional_modules
    body = {"url": url, "auth": f"{USER}:{PASSWORD}",  # getSdRequestBody(): sent on to A1111 as they are
            "prompt": "a cat in a hat", "negative_prompt": "lowres", "sampler_name": "DDIM", "scheduler": "normal",
            "steps": 3, "cfg_scale": 7, "width": 64, "height": 64, "restore_faces": False, "enable_hr": False,
            "hr_upscaler": "Latent", "hr_scale": 2.0, "denoising_strength": 0.7, "hr_second_pass_steps": 0,
            # seed -1 is undefined: JSON.stringify drops it; sd_vae 'Automatic' likewise
            "override_settings": {"CLIP_stop_at_last_layers": 1}, "override_settings_restore_afterwards": True,
            "clip_skip": 1, "save_images": True, "send_images": True, "do_not_save_grid": False,
            "do_not_save_samples": False}
    r = ok(st.post("/sdapi/v1/txt2img", json=body))
    image, parameters = png(r.json()["images"][0])  # { format: 'png', data: data.images[0] }
    assert image.size == (64, 64) and "Sampler: DDIM" in parameters
    assert f"Model hash: {entry(url, target)['hash']}," in parameters

    # the user stops it: ST's server, on its client's socket 'close', POSTs /interrupt (Authorization only, no
    # body) and aborts its txt2img fetch
    slow = json.dumps({**body, **SLOW, "prompt": "a slow cat"}).encode()
    sock = socket.create_connection(("127.0.0.1", httpx.URL(url).port))
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Authorization: {BASIC}\r\nContent-Length: {len(slow)}\r\n\r\n".encode() + slow)
    get_progress = lambda: st.get("/sdapi/v1/progress").json()  # noqa: E731
    wait_running(get_progress)
    r = st.post("/sdapi/v1/interrupt", headers={"Authorization": BASIC})
    sock.close()  # controller.abort()
    assert r.status_code == 200  # ST ignores the answer; A1111's is {} (a 404 would leave the GPU busy)
    wait_idle(get_progress, STOPPED_WITHIN_S)


def test_webuiapi(server):
    """The `webuiapi` package (mix1009/sdwebuiapi, webuiapi/webuiapi.py): its defaults (sampler "Euler a",
    scheduler "automatic", every field of its txt2img/img2img payloads), its model switch, its result parsing
    (`_to_api_result`: status 200, `images` raw base64, `info` json.loads'ed), png-info, interrupt."""
    url = server
    # __init__ -> set_auth -> check_extensions(): GET /scripts, scripts["txt2img"] (any failure tolerated)
    api = webuiapi.WebUIApi(host="127.0.0.1", port=httpx.URL(url).port, username=USER, password=PASSWORD,
                            sampler="Euler a", steps=4)
    assert not (api.has_controlnet or api.has_adetailer or api.has_animatediff)  # it would send their args
    api.util_wait_for_ready(check_interval=0.2)  # GET /progress: progress, state.job_count

    titles = api.util_get_model_names()  # sorted [x["title"] for x in GET /sd-models]
    current = api.util_get_current_model()  # options["sd_model_checkpoint"]
    target = next(t for t in titles if t != current)
    api.util_set_model(target)  # lower-cases, matches titles (difflib), POST /options -> response.json()
    assert api.util_get_current_model() == target
    want_hash = entry(url, target)["hash"]
    assert "Euler a" in api.util_get_sampler_names() and "automatic" in api.util_get_scheduler_names()
    assert webuiapi.HiResUpscaler.Latent in [u["name"] for u in api.get_latent_upscale_modes()]

    # txt2img with its defaults: sampler_index/sampler_name "Euler a", scheduler "automatic", hr_* fields, eta...
    r = api.txt2img(prompt="a lighthouse", seed=5, width=64, height=64, batch_size=2, cfg_scale=6)
    assert [im.size for im in r.images] == [(64, 64)] * 2
    assert (r.info["seed"], r.info["all_seeds"], r.info["steps"], r.info["cfg_scale"]) == (5, [5, 6], 4, 6)
    assert r.info["sampler_name"] == "Euler a" and (r.info["width"], r.info["height"]) == (64, 64)
    assert r.parameters["prompt"] == "a lighthouse"  # A1111 echoes the request
    for i, im in enumerate(r.images):
        assert f"Seed: {5 + i}," in im.info["parameters"] and f"Model hash: {want_hash}," in im.info["parameters"]
        assert r.info["infotexts"][i] == im.info["parameters"]
    # the second image, from its own seed alone (A1111: image i of a batch is seed + i)
    alone = api.txt2img(prompt="a lighthouse", seed=6, width=64, height=64, cfg_scale=6)
    np.testing.assert_array_equal(np.asarray(alone.image), np.asarray(r.images[1]))

    # hires fix as webuiapi sends it (its HiResUpscaler enum): the output twice the first pass
    hr = api.txt2img(prompt="a lighthouse", seed=5, width=64, height=64, enable_hr=True, hr_scale=2,
                     hr_upscaler=webuiapi.HiResUpscaler.Latent, hr_second_pass_steps=2, denoising_strength=0.6)
    assert hr.image.size == (128, 128) and (hr.info["width"], hr.info["height"]) == (64, 64)
    assert "Hires upscale: 2" in hr.image.info["parameters"] and "Hires upscaler: Latent" in hr.image.info["parameters"]

    # inpainting with its defaults (data-URL init_images and mask, mask_blur 4, inpaint_full_res True, padding 0)
    init = r.images[0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 48, 48))
    out = api.img2img(images=[init], mask_image=mask, prompt="a red door", seed=9, width=64, height=64,
                      denoising_strength=0.6, inpainting_fill=1)
    o, i = np.asarray(out.image.convert("RGB")), np.asarray(init.convert("RGB"))
    assert out.image.size == (64, 64) and "Denoising strength: 0.6" in out.image.info["parameters"]
    np.testing.assert_array_equal(o[:8], i[:8])  # far from the mask: the original pixels, pasted back
    assert not np.array_equal(o[28:44, 28:44], i[28:44, 28:44])  # inside it: repainted

    # png_info(image): POST /png-info {"image": data URL}; info = the infotext (not JSON: kept as a string)
    read = api.png_info(r.images[0])
    assert read.info == r.images[0].info["parameters"]
    assert read.parameters["Prompt"] == "a lighthouse" and str(read.parameters["Seed"]) == "5"

    # interrupt() from another thread while txt2img runs: txt2img still returns, with the image as far as it got
    # (A1111 modules/sd_samplers_common.py Sampler.launch_sampling: `except InterruptedException: return
    # self.last_latent`, decoded and answered 200; webuiapi raises on anything else); interrupt() and skip() JSON
    done: dict = {}

    def slow():
        try:
            done["result"] = api.txt2img(prompt="a slow lighthouse", seed=1, **SLOW)
        except Exception as ex:  # noqa: BLE001  (reported below)
            done["error"] = ex

    thread = threading.Thread(target=slow)
    thread.start()
    wait_running(api.get_progress)
    assert isinstance(api.interrupt(), dict)
    thread.join(STOPPED_WITHIN_S)
    assert not thread.is_alive(), "interrupt() did not stop the running txt2img"
    assert "error" not in done, done
    assert done["result"].image.size == (SLOW["width"], SLOW["height"])
    api.util_wait_for_ready(check_interval=0.2)
    api.skip()  # response.json(): any JSON (A1111: null)


def test_openai_sdk(server):
    """The OpenAI Python SDK (openai-python: client.models.list, images.generate, images.edit; its errors are
    typed from the status and the body's "error" object; a timeout closes the connection)."""
    url = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY)

    with pytest.raises(openai.AuthenticationError) as wrong:
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong").models.list()
    assert wrong.value.status_code == 401 and wrong.value.message

    models = list(client.models.list())  # GET /models -> SyncPage[Model]: {"object": "list", "data": [...]}
    assert len(models) == 2
    for m in models:
        assert m.object == "model" and isinstance(m.created, int) and isinstance(m.owned_by, str)
    ids = [m.id for m in models]

    generated = client.images.generate(model=ids[1], prompt="a lighthouse", n=2, size="64x64",
                                       response_format="b64_json")
    assert isinstance(generated.created, int) and len(generated.data) == 2
    for item in generated.data:
        image, parameters = png(item.b64_json)
        assert image.size == (64, 64) and f"Model hash: {entry(url, ids[1])['hash']}," in parameters

    # images.edit: multipart, `image` and `mask` files; the mask's transparent pixels are where to edit
    rng = np.random.default_rng(0)
    init = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, :32] = 0  # edit the left half
    files = []
    for array in (init, np.dstack([init, alpha])):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        files.append(buf.getvalue())
    edited = client.images.edit(image=("image.png", files[0], "image/png"), mask=("mask.png", files[1], "image/png"),
                                prompt="a red door", model=ids[0], n=1, size="64x64", response_format="b64_json")
    (item,) = edited.data
    out = np.asarray(png(item.b64_json)[0].convert("RGB"))
    np.testing.assert_array_equal(out[:, 48:], init[:, 48:])  # kept: the original pixels
    assert not np.array_equal(out[:, :16], init[:, :16])  # edited

    # errors: OpenAI's {"error": {"message", "type", "param", "code"}} -> typed exceptions with .type, .param, .code
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="a lighthouse", size="13x7")
    assert bad.value.status_code == 400 and bad.value.type == "invalid_request_error"
    assert {"message", "type", "param", "code"} <= set(bad.value.body) and bad.value.body["message"]
    with pytest.raises(openai.APIStatusError) as unknown:
        client.images.generate(model="no-such-model", prompt="a lighthouse", size="64x64")
    assert 400 <= unknown.value.status_code < 500 and ids[0] in unknown.value.message  # names the known ones

    # cancel: the SDK's timeout closes the connection; the server takes the next request
    with pytest.raises(openai.APITimeoutError):
        # 512x512 takes seconds on tiny here (128x128 can be over within the 0.5 s)
        client.with_options(timeout=0.5, max_retries=0).images.generate(prompt="a slow lighthouse", size="512x512")
    again = client.images.generate(model=ids[0], prompt="a lighthouse", size="64x64", response_format="b64_json")
    assert png(again.data[0].b64_json)[0].size == (64, 64)
