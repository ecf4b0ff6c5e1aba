"""`sdtrt serve`'s OpenAI-compatible API with the real OpenAI Python SDK as the client (its calls, multipart
encoding, error classes): images.generate, images.edit (OpenAI: "An additional image whose fully transparent areas
(e.g. where alpha is zero) indicate where `image` should be edited" — openai-python ``resources/images.py``; without a
mask the image's own transparency is the mask), models.list/retrieve, errors in OpenAI's shape (``ErrorObject``:
message, type, param, code) raised as the SDK's own exception classes. Each image is checked against the library's
for the same request (its seed read from the PNG)."""

import base64
import io
import re

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from sdtrt.runtime import Pipeline
from sdtrt.runtime.infotext import parse_infotext
from tests.serve.test_app import start

KEY = "sk-test"


@pytest.fixture(scope="module")
def server(tiny_fp32):
    proc, url = start(tiny_fp32[0], "--backend", "onnxruntime-cpu", "--api-key", KEY, "--api-auth", "ann:pw",
                      "--max-body-mb", "1", "--batch-window", "0")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def pipe(tiny_fp32):
    with Pipeline.from_dir(tiny_fp32[0], backend="onnxruntime-cpu") as p:
        yield p


def decoded(item):
    image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
    return np.asarray(image.convert("RGB")), parse_infotext(image.text["parameters"])


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def picture(alpha: np.ndarray | None = None) -> Image.Image:
    rgb = (np.random.default_rng(3).random((64, 64, 3)) * 255).astype(np.uint8)
    if alpha is None:
        return Image.fromarray(rgb, "RGB")
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def hole() -> np.ndarray:
    """Alpha: opaque but for a transparent 24x16 box (and a half-transparent stripe, which is not edited)."""
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[8:24, 30:54] = 0
    alpha[40:44, :] = 128
    return alpha


def test_images_generate_gives_the_librarys_image(client, pipe):
    result = client.images.generate(prompt="a lighthouse", size="64x64", n=2, model="tiny",
                                    response_format="b64_json")
    assert len(result.data) == 2 and result.created > 0
    for item in result.data:
        image, info = decoded(item)
        want = pipe("a lighthouse", num_inference_steps=30, guidance_scale=7.5, width=64, height=64,
                    seed=int(info["Seed"]), num_images_per_prompt=2).images
        assert any(np.array_equal(image, np.asarray(w)) for w in want)


def test_images_generate_without_a_size_is_the_models_own_size(client, tiny_fp32):
    """OpenAI's ``size`` omitted (the SDK sends none) or "auto": the model's own size, from its manifest (tiny 256,
    SD 1.x 512, SDXL 1024), not a fixed 512x512."""
    from sdtrt.manifest import Manifest

    side = Manifest.load(tiny_fp32[0]).model.default_size
    assert side != 512
    for size in ({}, {"size": "auto"}):
        image, _ = decoded(client.images.generate(prompt="a lighthouse", n=1, **size).data[0])
        assert image.shape == (side, side, 3)


@pytest.mark.parametrize("with_mask", [False, True])
def test_images_edit_inpaints_the_transparent_area(client, pipe, with_mask):
    if with_mask:  # an opaque image and a separate mask: the mask's transparent pixels are edited
        result = client.images.edit(image=("photo.png", png(picture()), "image/png"), prompt="a window",
                                    mask=("mask.png", png(Image.fromarray(np.dstack([np.zeros((64, 64, 3), np.uint8),
                                                                                     hole()]), "RGBA")), "image/png"))
    else:  # no mask: the image's own transparency
        result = client.images.edit(image=("photo.png", png(picture(hole())), "image/png"), prompt="a window")
    image, info = decoded(result.data[0])
    assert image.shape == (64, 64, 3)
    mask = Image.fromarray(np.where(hole() == 0, 255, 0).astype(np.uint8), "L")  # A1111's: white is inpainted
    want = pipe("a window", image=picture(), mask_image=mask, num_inference_steps=30, guidance_scale=7.5,
                seed=int(info["Seed"])).images[0]
    np.testing.assert_array_equal(image, np.asarray(want))
    inverted = pipe("a window", image=picture(), mask_image=Image.eval(mask, lambda v: 255 - v),
                    num_inference_steps=30, guidance_scale=7.5, seed=int(info["Seed"])).images[0]
    assert not np.array_equal(image, np.asarray(inverted))  # the other reading of the mask is a different image


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].object == "model"
    assert models.data[0].owned_by == "sdtrt" and models.data[0].created > 0
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as ex:
        client.models.retrieve("dall-e-9")
    assert ex.value.body["param"] == "model" and "'tiny [" in ex.value.body["message"]


@pytest.mark.parametrize("call, param, words", [
    (lambda c: c.images.generate(prompt="x", size="13"), "size", "WIDTHxHEIGHT"),
    (lambda c: c.images.generate(prompt="x", size="64x64", model="sd-nope"), "model", "unknown model 'sd-nope'"),
    (lambda c: c.images.generate(prompt="x", size="64x64", response_format="url"), "response_format", "no URLs"),
    (lambda c: c.images.generate(prompt="x", size="64x64", n="many"), "n", "integer"),
    (lambda c: c.images.edit(image=("a.png", png(picture()), "image/png"), prompt="x"), "image", "no transparency"),
    (lambda c: c.images.edit(image=("a.png", png(picture()), "image/png"), prompt="x",
                             mask=("m.png", png(picture()), "image/png")), "mask", "no alpha channel"),
    (lambda c: c.images.edit(image=("a.png", png(picture(hole())), "image/png"), prompt="x",
                             mask=("m.png", png(picture(hole()).resize((32, 32))), "image/png")), "mask", "same size"),
    (lambda c: c.images.edit(image=("a.png", png(picture(np.full((64, 64), 255, np.uint8))), "image/png"),
                             prompt="x"), "image", "nothing to edit"),
    (lambda c: c.images.edit(image=("a.png", b"not a png", "image/png"), prompt="x"), "image",
     "image is not a readable image (no image format PIL reads"),
    (lambda c: c.images.edit(image=[("a.png", png(picture(hole())), "image/png")] * 2, prompt="x"), "image", "one"),
])
def test_errors_are_openais_shape_and_the_sdks_bad_request(client, call, param, words):
    with pytest.raises(openai.BadRequestError) as ex:
        call(client)
    body = ex.value.body  # the SDK hands over the inner "error" object
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    assert ex.value.status_code == 400 and words in body["message"], body
    if param is not None:
        assert body["param"] == param


def test_credentials_unknown_paths_methods_and_body_size(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as ex:
        bad.models.list()
    assert ex.value.body["code"] == "invalid_api_key"
    r = httpx.get(f"{server}/sdapi/v1/sd-models")  # an A1111 client without credentials: a browser would ask
    assert r.status_code == 401 and re.match(r'Basic realm="[^"]+"', r.headers["www-authenticate"])
    assert httpx.get(f"{server}/sdapi/v1/sd-models", auth=("ann", "pw")).status_code == 200
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(f"{server}/v1/images/variations-of-nothing", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["message"] == "Invalid URL (GET /v1/images/variations-of-nothing)"
    r = httpx.get(f"{server}/v1/images/generations", headers=auth)
    assert r.status_code == 405 and "POST" in r.json()["error"]["message"] and r.headers["allow"] == "POST"
    assert httpx.get(f"{server}/sdapi/v1/nothing", auth=("ann", "pw")).json() == {"detail": "Not Found"}  # A1111's
    r = httpx.post(f"{server}/v1/images/edits", headers=auth, json={"prompt": "x", "image": "aGk="})
    assert r.status_code == 400 and "not multipart/form-data" in r.json()["error"]["message"]
    big = png(Image.fromarray((np.random.default_rng(0).random((700, 700, 4)) * 255).astype(np.uint8), "RGBA"))
    assert len(big) > 2**20
    r = httpx.post(f"{server}/v1/images/edits", headers=auth, data={"prompt": "x"}, files={"image": ("a.png", big)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
