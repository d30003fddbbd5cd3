"""`minisd serve` driven by the real `webuiapi` client (and plain HTTP for what it does not wrap): images equal
the library's pixel for pixel, infotext read back by sd-parsers, the queue under 8 concurrent clients, progress,
interrupt, skip, model switching, bad input answered with A1111-shaped 4xx errors while the server keeps serving."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

pytest.importorskip("fastapi", reason="the server extra (make test installs it)")
import requests  # noqa: E402
import sd_parsers  # noqa: E402
import webuiapi  # noqa: E402

import minisd  # noqa: E402
from minisd.config import PRESETS  # noqa: E402
from minisd.server.app import ServerThread, create_app  # noqa: E402
from minisd.testing import write_checkpoint  # noqa: E402

MAX_BODY = 1 << 20
SIZE = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server-models")
    write_checkpoint(folder / "tiny.safetensors", PRESETS["tiny"], seed=1)
    (folder / "more").mkdir()
    write_checkpoint(folder / "more" / "other.safetensors", PRESETS["tiny"], seed=2)
    return folder


@pytest.fixture(scope="module")
def reference(models):
    """The same files loaded by the library, for the expected images."""
    return {"tiny": minisd.load(models / "tiny.safetensors", dtype=torch.float32),
            "other": minisd.load(models / "more" / "other.safetensors", dtype=torch.float32)}


@pytest.fixture(scope="module")
def server(models):
    app = create_app(models / "tiny.safetensors", models, dtype=torch.float32, max_size=256, max_batch=8,
                     max_body_bytes=MAX_BODY)
    with ServerThread(app) as running:
        yield running


@pytest.fixture
def api(server):
    client = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    yield client
    client.util_set_model("tiny.safetensors")  # every test starts on the startup model


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def assert_same_images(got: list[Image.Image], expected: list[Image.Image]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.size == b.size
        assert np.array_equal(pixels(a), pixels(b))


def test_txt2img_equals_the_library_and_its_infotext_reads_back(api, reference):
    r = api.txt2img(prompt="a red (circle:1.2)", negative_prompt="blurry", seed=1234, steps=5, cfg_scale=5.5,
                    width=SIZE, height=48, sampler_name="DPM++ 2M", scheduler="Karras", batch_size=2)
    expected = reference["tiny"].txt2img("a red (circle:1.2)", negative_prompt="blurry", seed=1234, steps=5,
                                         cfg_scale=5.5, width=SIZE, height=48, sampler="DPM++ 2M",
                                         schedule="karras", batch_size=2)
    assert_same_images(r.images, expected)
    assert r.info["all_seeds"] == [1234, 1235]
    assert r.info["infotexts"] == [image.info["parameters"] for image in expected]
    digest = hashlib.sha256(reference["tiny"].source.read_bytes()).hexdigest()
    assert r.info["sd_model_hash"] == digest[:10] and r.info["sampler_name"] == "DPM++ 2M"
    assert r.parameters["prompt"] == "a red (circle:1.2)" and r.parameters["steps"] == 5

    info = sd_parsers.ParserManager().parse(r.images[1])  # the PNG as the client received it
    assert info.generator.name == "AUTOMATIC1111"
    assert [p.value for p in info.prompts] == ["a red (circle:1.2)"]
    assert [p.value for p in info.negative_prompts] == ["blurry"]
    (sampler,) = info.samplers
    assert sampler.name == "DPM++ 2M" and sampler.parameters["scheduler"] == "Karras"
    assert sampler.parameters["seed"] == "1235" and sampler.parameters["steps"] == "5"
    assert sampler.model.hash == digest[:10] and sampler.model.name == "tiny"
    assert info.metadata["Size"] == "64x48"


def test_webuiapi_defaults_euler_a_with_eta_equal_the_library(api, reference):
    # webuiapi sends sampler "Euler a", eta 1.0, s_noise 1, scheduler "automatic" and many ignored fields.
    r = api.txt2img(prompt="a cat", seed=7, steps=4, width=SIZE, height=SIZE)
    expected = reference["tiny"].txt2img("a cat", seed=7, steps=4, width=SIZE, height=SIZE, sampler="Euler a",
                                         cfg_scale=7.0)
    assert_same_images(r.images, expected)


def test_img2img_and_inpainting_equal_the_library(api, reference):
    sd = reference["tiny"]
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    common = dict(seed=99, steps=4, width=SIZE, height=SIZE, cfg_scale=6.0)
    r = api.img2img(images=[init], prompt="a house", sampler_name="Euler", denoising_strength=0.6, resize_mode=1,
                    **common)
    assert_same_images(r.images, sd.img2img(init, "a house", sampler="Euler", strength=0.6,
                                            resize_mode="Crop and resize", **common))
    assert "Denoising strength: 0.6" in r.info["infotexts"][0]
    assert r.parameters["init_images"] is None  # include_init_images False, as A1111

    # A mask of another size than the image (resized as A1111 does), repaint the white part, whole picture.
    square = init.resize((SIZE, SIZE))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 20))
    r = api.img2img(images=[square], mask_image=mask, prompt="a door", sampler_name="Euler", inpaint_full_res=False,
                    inpainting_fill=1, mask_blur=2, **common)
    assert_same_images(r.images, sd.inpaint(square, mask, "a door", sampler="Euler", mask_blur=2, **common))
    assert "Mask blur: 2" in r.info["infotexts"][0]

    # "Only masked" (webuiapi's default inpaint_full_res=True) with padding, and an inverted mask.
    big_mask = mask.resize((SIZE, SIZE))
    r = api.img2img(images=[square], mask_image=big_mask, prompt="a door", sampler_name="Euler",
                    inpaint_full_res=True, inpaint_full_res_padding=8, inpainting_fill=1, inpainting_mask_invert=1,
                    **common)
    assert_same_images(r.images, sd.inpaint(square, ImageOps.invert(big_mask), "a door", sampler="Euler",
                                            inpaint_only_masked=True, only_masked_padding=8, **common))


def test_inpainting_fill_paints_the_hole_with_the_surrounding_colours(api, reference):
    from minisd.server.a1111 import fill_masked
    image = Image.new("RGB", (SIZE, SIZE), (200, 30, 40))
    image.paste((20, 40, 220), (SIZE // 2, 0, SIZE, SIZE))
    image.paste((255, 255, 0), (8, 24, 24, 40))  # a yellow square, masked out below
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 24, 24, 40))
    filled = np.asarray(fill_masked(image, mask)).astype(int)
    outside = np.asarray(mask) == 0
    assert np.array_equal(filled[outside], np.asarray(image).astype(int)[outside])  # untouched outside the mask
    hole = filled[26:38, 10:22]
    assert np.abs(hole - np.array([200, 30, 40])).max() < 40  # red from the left half, no yellow, no black

    # webuiapi's defaults: inpainting_fill 0 and "only masked"
    r = api.img2img(images=[image], mask_image=mask, prompt="a hole", seed=8, steps=3, width=SIZE, height=SIZE,
                    sampler_name="Euler")
    assert_same_images(r.images, reference["tiny"].inpaint(fill_masked(image, mask), mask, "a hole", seed=8, steps=3,
                                                           width=SIZE, height=SIZE, sampler="Euler", cfg_scale=7.0,
                                                           inpaint_only_masked=True, only_masked_padding=0))


def test_hires_fix_and_the_upscaler_lists(api, server, reference):
    sd = reference["tiny"]
    # webuiapi's hires fields: latent upscale ×2, 2 hires steps, denoising strength of the second pass.
    common = dict(seed=31, steps=3, width=32, height=24, cfg_scale=6.0)
    r = api.txt2img(prompt="a tower", sampler_name="Euler", enable_hr=True, hr_scale=2, hr_second_pass_steps=2,
                    denoising_strength=0.6, hr_upscaler=webuiapi.HiResUpscaler.Latent, **common)
    expected = sd.txt2img("a tower", sampler="Euler", enable_hr=True, hr_scale=2, hr_steps=2, strength=0.6,
                          hr_upscaler="Latent", **common)
    assert r.image.size == (64, 48)
    assert_same_images(r.images, expected)
    assert r.info["infotexts"] == [image.info["parameters"] for image in expected]
    assert "Hires upscale: 2" in r.info["infotexts"][0] and "Hires steps: 2" in r.info["infotexts"][0]
    # An image upscaler to an explicit size (A1111 keeps the aspect ratio and crops), webuiapi's default strength.
    r = api.txt2img(prompt="a tower", sampler_name="Euler", enable_hr=True, hr_resize_x=48, hr_resize_y=48,
                    hr_upscaler=webuiapi.HiResUpscaler.Lanczos, **common)
    expected = sd.txt2img("a tower", sampler="Euler", enable_hr=True, hr_resize_x=48, hr_resize_y=48, strength=0.7,
                          hr_upscaler="Lanczos", **common)
    assert r.image.size == (48, 48)
    assert_same_images(r.images, expected)

    upscalers = requests.get(f"{server.url}/sdapi/v1/upscalers").json()
    assert [u["name"] for u in upscalers] == ["None", "Lanczos", "Nearest"]
    assert set(upscalers[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    modes = requests.get(f"{server.url}/sdapi/v1/latent-upscale-modes").json()
    assert modes == [{"name": name} for name in ("Latent", "Latent (antialiased)", "Latent (bicubic)",
                                                 "Latent (bicubic antialiased)", "Latent (nearest)",
                                                 "Latent (nearest-exact)")]


def test_variation_seed_and_seed_resize_equal_the_library(api, reference):
    common = dict(seed=12, subseed=345, subseed_strength=0.3, seed_resize_from_w=48, seed_resize_from_h=40,
                  steps=3, width=32, height=32, cfg_scale=7.0)
    r = api.txt2img(prompt="a boat", sampler_name="Euler", batch_size=2, **common)
    expected = reference["tiny"].txt2img("a boat", sampler="Euler", batch_size=2, **common)
    assert_same_images(r.images, expected)
    assert r.info["all_seeds"] == [12, 12] and r.info["all_subseeds"] == [345, 346]
    assert r.info["subseed_strength"] == 0.3 and "Variation seed: 345" in r.info["infotexts"][0]
    # n_iter: each batch a run of its own, with the next variation seeds (as one library call)
    r = api.txt2img(prompt="a boat", sampler_name="Euler", n_iter=2, **common)
    assert_same_images(r.images, reference["tiny"].txt2img("a boat", sampler="Euler", n_iter=2, **common))
    # without a variation seed the subseed is ignored (webuiapi sends 0 for "no seed resize")
    r = api.txt2img(prompt="a boat", sampler_name="Euler", seed=12, subseed=345, steps=3, width=32, height=32)
    assert_same_images(r.images, reference["tiny"].txt2img("a boat", sampler="Euler", seed=12, steps=3, width=32,
                                                           height=32, cfg_scale=7.0))


def test_latent_inpainting_fill_and_noise_multiplier_equal_the_library(api, reference):
    sd = reference["tiny"]
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 8, 48, 40))
    common = dict(seed=21, steps=4, width=SIZE, height=SIZE, mask_blur=2)
    for number, name in ((2, "latent noise"), (3, "latent nothing")):
        r = api.img2img(images=[image], mask_image=mask, prompt="a window", sampler_name="Euler",
                        inpainting_fill=number, inpaint_full_res=False, denoising_strength=0.8, **common)
        expected = sd.inpaint(image, mask, "a window", sampler="Euler", inpaint_mode="a1111", inpainting_fill=name,
                              strength=0.8, cfg_scale=7.0, **common)
        assert_same_images(r.images, expected)
        assert f"Masked content: {name}" in r.info["infotexts"][0]
    r = api.img2img(images=[image], prompt="a window", sampler_name="Euler", initial_noise_multiplier=0.9,
                    denoising_strength=0.7, seed=21, steps=4, width=SIZE, height=SIZE)
    assert_same_images(r.images, sd.img2img(image, "a window", sampler="Euler", noise_multiplier=0.9, strength=0.7,
                                            seed=21, steps=4, width=SIZE, height=SIZE, cfg_scale=7.0))
    assert "Noise multiplier: 0.9" in r.info["infotexts"][0]


def test_randn_source_and_ensd_from_override_settings_and_options(api, reference):
    sd = reference["tiny"]
    common = dict(seed=77, steps=3, width=32, height=32)
    r = api.txt2img(prompt="a fox", sampler_name="Euler a", override_settings={"randn_source": "GPU"}, **common)
    expected = sd.txt2img("a fox", sampler="Euler a", rng="gpu", eta=1.0, cfg_scale=7.0, **common)
    assert_same_images(r.images, expected)
    assert "RNG: GPU" in r.info["infotexts"][0]
    assert not np.array_equal(pixels(r.image), pixels(sd.txt2img("a fox", sampler="Euler a", eta=1.0,
                                                                   cfg_scale=7.0, **common)[0]))
    # the same through the options store, with an ENSD (it moves the ancestral sampler's noise)
    assert api.get_options()["randn_source"] == "CPU"
    api.set_options({"randn_source": "nv", "eta_noise_seed_delta": 31337})
    try:
        assert api.get_options()["randn_source"] == "NV" and api.get_options()["eta_noise_seed_delta"] == 31337
        r = api.txt2img(prompt="a fox", sampler_name="Euler a", **common)
        assert_same_images(r.images, sd.txt2img("a fox", sampler="Euler a", rng="nv", eta_noise_seed_delta=31337,
                                                eta=1.0, cfg_scale=7.0, **common))
        # override_settings wins over the options store for its request
        r = api.txt2img(prompt="a fox", sampler_name="Euler a",
                        override_settings={"randn_source": "CPU", "eta_noise_seed_delta": 0}, **common)
        assert_same_images(r.images, sd.txt2img("a fox", sampler="Euler a", eta=1.0, cfg_scale=7.0, **common))
    finally:
        api.set_options({"randn_source": "CPU", "eta_noise_seed_delta": 0})


def test_model_listing_switching_and_overrides(api, reference, models):
    names = ["more/other.safetensors", "tiny.safetensors"]  # A1111's order: sorted by path
    hashes = {name: hashlib.sha256((models / name).read_bytes()).hexdigest()[:10] for name in names}
    assert api.util_get_model_names() == [f"{name} [{hashes[name]}]" for name in names]
    titles = [f"tiny.safetensors [{hashes['tiny.safetensors']}]", f"more/other.safetensors [{hashes[names[0]]}]"]
    assert api.util_get_current_model() == titles[0]
    listed = requests.get(f"{api.baseurl}/sd-models").json()
    assert [m["model_name"] for m in listed] == ["more/other", "tiny"]
    assert listed[0]["sha256"] == hashlib.sha256((models / "more/other.safetensors").read_bytes()).hexdigest()

    def run(**extra):
        return api.txt2img(prompt="a tree", seed=5, steps=3, width=SIZE, height=SIZE, sampler_name="Euler", **extra)

    def expected(name, **extra):
        return reference[name].txt2img("a tree", seed=5, steps=3, width=SIZE, height=SIZE, sampler="Euler",
                                       cfg_scale=7.0, **extra)

    api.util_set_model(titles[1])
    assert api.util_get_current_model() == titles[1]
    assert_same_images(run().images, expected("other"))
    # per-request overrides: the model (then back, as override_settings_restore_afterwards) and clip skip
    r = run(override_settings={"sd_model_checkpoint": "tiny", "CLIP_stop_at_last_layers": 2})
    assert_same_images(r.images, expected("tiny", clip_skip=2))
    assert api.util_get_current_model() == titles[1]
    api.set_options({"sd_model_checkpoint": hashes["tiny.safetensors"], "CLIP_stop_at_last_layers": 2})
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    assert_same_images(run().images, expected("tiny", clip_skip=2))
    api.set_options({"CLIP_stop_at_last_layers": 1})

    # names outside --models-dir never reach the loader
    target = models.parent / "outside.safetensors"
    write_checkpoint(target, PRESETS["tiny"], seed=3)
    for name in ("../outside.safetensors", str(target), "/etc/passwd", "more/../../outside.safetensors"):
        reply = requests.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": name})
        assert reply.status_code == 404 and "not found" in reply.json()["detail"]
    assert api.util_get_current_model() == titles[0]


def test_samplers_schedulers_scripts_and_docs(api, server):
    names = api.util_get_sampler_names()
    assert {"Euler a", "Euler", "DPM++ 2M", "DPM++ SDE", "DDIM", "UniPC", "LCM"} <= set(names)
    assert {"Automatic", "Karras", "Exponential"} <= {s["label"] for s in api.get_schedulers()}
    assert "karras" in api.util_get_scheduler_names()
    assert requests.get(f"{api.baseurl}/scripts").json() == {"txt2img": [], "img2img": []}
    paths = requests.get(f"{server.url}/openapi.json").json()["paths"]
    for path in ("txt2img", "img2img", "samplers", "schedulers", "sd-models", "options", "progress", "interrupt",
                 "skip", "scripts", "png-info"):
        assert f"/sdapi/v1/{path}" in paths
    assert "/v1/images/generations" in paths
    assert requests.get(f"{server.url}/docs").status_code == 200


def test_png_info_reads_the_parameters_of_a_generated_image(api, server):
    r = api.txt2img(prompt="a boat", negative_prompt="fog", seed=11, steps=2, width=SIZE, height=SIZE)
    buffer = io.BytesIO()
    r.image.save(buffer, format="PNG", pnginfo=_pnginfo(r.image.info["parameters"]))
    got = requests.post(f"{server.url}/sdapi/v1/png-info",
                        json={"image": base64.b64encode(buffer.getvalue()).decode()}).json()
    assert got["info"] == r.info["infotexts"][0]
    assert got["parameters"]["Prompt"] == "a boat" and got["parameters"]["Negative prompt"] == "fog"
    assert got["parameters"]["Seed"] == "11" and got["parameters"]["Size"] == "64x64"


def _pnginfo(text: str):
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return info


def _wait_for(predicate, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _progress_if(api, condition):
    progress = api.get_progress()
    return progress if condition(progress) else None


def test_progress_preview_and_interrupt(api, reference):
    results = {}
    worker = threading.Thread(target=lambda: results.update(r=api.txt2img(
        prompt="a slow one", seed=3, steps=1000, width=SIZE, height=SIZE, sampler_name="Euler")))
    worker.start()
    seen = _wait_for(lambda: _progress_if(api, lambda p: p["state"]["sampling_step"] >= 3), "sampling steps to run")
    assert seen["state"]["job_count"] == 1 and seen["state"]["sampling_steps"] == 1000
    assert 0 < seen["progress"] < 1 and seen["eta_relative"] > 0
    preview = Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))
    assert preview.format == "PNG" and min(preview.size) >= 64
    later = _wait_for(lambda: _progress_if(api, lambda p: p["state"]["sampling_step"] > seen["state"]["sampling_step"]),
                      "progress to move")
    assert later["progress"] > seen["progress"]
    api.interrupt()
    worker.join(120)
    r = results["r"]
    assert r.info["minisd_job"]["interrupted"] is True and len(r.images) == 1 and r.image.size == (SIZE, SIZE)
    idle = api.get_progress()
    assert idle["state"]["interrupted"] is True and idle["state"]["job_count"] == 0 and idle["progress"] == 0
    # stopped early: not the 1000-step image (which the library would take minutes for), yet a real decode
    assert not np.array_equal(pixels(r.image), pixels(api.txt2img(
        prompt="a slow one", seed=3, steps=2, width=SIZE, height=SIZE, sampler_name="Euler").image))


def test_previews_use_taesd_when_one_is_loaded(models, tmp_path):
    from safetensors.torch import save_file

    from minisd.models.taesd import TAESDDecoder
    torch.manual_seed(0)
    decoder = {k: v.contiguous() for k, v in TAESDDecoder().state_dict().items()}  # the published bare layout
    save_file(decoder, str(tmp_path / "taesd_decoder.safetensors"))
    app = create_app(models / "tiny.safetensors", dtype=torch.float32, taesd=tmp_path / "taesd_decoder.safetensors")
    with ServerThread(app) as running:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=running.port)
        worker = threading.Thread(target=lambda: api.txt2img(prompt="x", seed=1, steps=1000, width=SIZE, height=48))
        worker.start()
        seen = _wait_for(lambda: _progress_if(api, lambda p: p["state"]["sampling_step"] >= 2), "steps to run")
        api.interrupt()
        worker.join(120)
    # TAESD decodes the latent to the image's own size; the linear map would give an enlarged 8x6 latent
    assert Image.open(io.BytesIO(base64.b64decode(seen["current_image"]))).size == (SIZE, 48)


def test_skip_stops_the_current_batch_and_goes_on(api, reference):
    results = {}
    worker = threading.Thread(target=lambda: results.update(r=api.txt2img(
        prompt="two batches", seed=40, steps=1000, width=SIZE, height=SIZE, sampler_name="Euler", n_iter=2)))
    worker.start()
    _wait_for(lambda: api.get_progress()["state"]["sampling_step"] >= 2, "the first batch to run")
    api.skip()
    _wait_for(lambda: api.get_progress()["state"]["job_no"] == 1, "the second batch to start")
    _wait_for(lambda: api.get_progress()["state"]["sampling_step"] >= 2, "the second batch to run")
    api.interrupt()
    worker.join(120)
    r = results["r"]
    assert r.info["all_seeds"] == [40, 41] and len(r.images) == 2


def test_eight_clients_three_requests_each_in_submission_order(server, reference):
    barrier = threading.Barrier(8)
    replies: dict[tuple[int, int], webuiapi.WebUIApiResult] = {}
    errors = []

    def client(i: int) -> None:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        barrier.wait()
        try:
            for k in range(3):
                replies[i, k] = api.txt2img(prompt=f"client {i} request {k}", seed=1000 + 10 * i + k, steps=1,
                                            width=SIZE, height=SIZE, sampler_name="Euler")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(replies) == 24
    sd = reference["tiny"]
    for (i, k), r in replies.items():  # each answer is its own request's: prompt, seed and pixels
        assert r.info["prompt"] == f"client {i} request {k}" and r.info["all_seeds"] == [1000 + 10 * i + k]
        assert_same_images(r.images, sd.txt2img(f"client {i} request {k}", seed=1000 + 10 * i + k, steps=1,
                                                width=SIZE, height=SIZE, sampler="Euler", cfg_scale=7.0))
    jobs = [r.info["minisd_job"] for r in replies.values()]
    by_submission = sorted(jobs, key=lambda j: j["submitted"])
    assert [j["started"] for j in by_submission] == sorted(j["started"] for j in jobs)  # FIFO
    for i in range(8):  # a client's later request was submitted after its earlier one
        order = [replies[i, k].info["minisd_job"]["submitted"] for k in range(3)]
        assert order == sorted(order)


def test_a_client_killed_mid_request_does_not_stop_the_server(api, server):
    body = json.dumps({"prompt": "abandoned", "steps": 1000, "width": SIZE, "height": SIZE, "seed": 1,
                       "sampler_name": "Euler"}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        step = _wait_for(lambda: api.get_progress()["state"]["sampling_step"], "the job to start")
    # the client is gone; the job runs on, and the server answers others meanwhile
    _wait_for(lambda: api.get_progress()["state"]["sampling_step"] > step + 1, "the job to go on")
    assert api.get_options()["sd_model_checkpoint"].startswith("tiny.safetensors")
    api.interrupt()
    r = api.txt2img(prompt="next", seed=2, steps=2, width=SIZE, height=SIZE)
    assert r.info["all_seeds"] == [2] and r.image.size == (SIZE, SIZE)


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


BAD_REQUESTS = [
    ("img2img", {"init_images": ["not base64 at all!"]}, 400, "invalid base64"),
    ("img2img", {"init_images": [base64.b64encode(b"hello, not an image").decode()]}, 400, "not a readable image"),
    ("img2img", {"init_images": ["data:image/png;base64," + _png_b64(Image.new("RGB", (8, 8)))],
                 "mask": "%%%"}, 400, "mask: invalid base64"),
    ("img2img", {"prompt": "no init image"}, 404, "Init image not found"),
    ("img2img", {"init_images": [_png_b64(Image.new("RGB", (8, 8)))], "mask": _png_b64(Image.new("L", (8, 8))),
                 "inpainting_fill": 4}, 422, "3 (latent nothing)"),
    ("txt2img", {"width": 512, "height": 64}, 422, "--max-size"),
    ("txt2img", {"batch_size": 9}, 422, "--max-batch"),
    ("txt2img", {"batch_size": 3, "n_iter": 3}, 422, "--max-batch"),
    ("txt2img", {"sampler_name": "Euler z"}, 404, "Sampler not found"),
    ("txt2img", {"scheduler": "sideways"}, 404, "Scheduler not found"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "missing.safetensors"}}, 404, "not found"),
    ("txt2img", {"steps": -3}, 422, "steps must be between 1"),
    ("txt2img", {"steps": "many"}, 422, "steps"),
    ("txt2img", {"width": 60}, 422, "multiple of 8"),
    ("txt2img", {"cfg_scale": "nan"}, 422, "finite"),
    ("txt2img", {"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, 422, "Latent (bicubic), Latent (bicubic "),
    ("txt2img", {"enable_hr": True, "hr_sampler_name": "DDIM"}, 422, "hr_sampler_name"),
    ("txt2img", {"enable_hr": True, "hr_scale": 5}, 422, "hires fix size 320x320 is over"),
    ("txt2img", {"override_settings": {"randn_source": "TPU"}}, 422, "rng must be one of"),
    ("options", {"randn_source": "TPU"}, 422, "randn_source"),
    ("options", {"eta_noise_seed_delta": -1}, 422, "eta_noise_seed_delta"),
    ("txt2img", {"script_name": "x/y/z plot"}, 422, "not found"),
    ("options", {"CLIP_stop_at_last_layers": 0}, 422, "CLIP_stop_at_last_layers"),
]


@pytest.mark.parametrize("endpoint, body, status, phrase", BAD_REQUESTS)
def test_bad_input_gets_a1111_shaped_4xx_and_the_server_keeps_serving(server, endpoint, body, status, phrase):
    reply = requests.post(f"{server.url}/sdapi/v1/{endpoint}", json={"steps": 2, "width": SIZE, "height": SIZE,
                                                                     **body})
    assert reply.status_code == status, reply.text
    error = reply.json()
    assert set(error) == {"error", "detail", "body", "errors"} and phrase in str(error["detail"])
    ok = requests.post(f"{server.url}/sdapi/v1/txt2img", json={"steps": 1, "width": SIZE, "height": SIZE})
    assert ok.status_code == 200 and len(ok.json()["images"]) == 1


def test_malformed_and_oversized_bodies(server):
    url = f"{server.url}/sdapi/v1/txt2img"
    reply = requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"})
    assert reply.status_code == 422 and reply.json()["error"] == "RequestValidationError"
    big = b'{"prompt": "' + b"a" * MAX_BODY + b'"}'
    reply = requests.post(url, data=big, headers={"Content-Type": "application/json"})
    assert reply.status_code == 413 and set(reply.json()) == {"error", "detail", "body", "errors"}
    reply = requests.post(url, data=iter([big[:1000], big[1000:]]), headers={"Content-Type": "application/json"})
    assert 400 <= reply.status_code < 500
    # fields A1111 does not know are accepted and ignored
    assert requests.post(url, json={"steps": 1, "width": SIZE, "height": SIZE, "no_such_field": [1]}).status_code == 200


def test_openai_images_endpoint(server, reference):
    url = f"{server.url}/v1/images/generations"
    reply = requests.post(url, json={"prompt": "a lighthouse", "n": 2, "size": "32x32",
                                     "response_format": "b64_json", "model": "dall-e-3", "quality": "hd"})
    assert reply.status_code == 200
    data = reply.json()["data"]
    images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in data]
    seed = int(images[0].info["parameters"].split("Seed: ")[1].split(",")[0])
    expected = reference["tiny"].txt2img("a lighthouse", seed=seed, width=32, height=32, batch_size=2)
    assert_same_images(images, expected)
    for body, param in (({"prompt": "x", "size": "huge"}, "size"), ({"prompt": "x", "size": "1024x1024"}, "size"),
                        ({"prompt": "x", "response_format": "url"}, "response_format"), ({"prompt": ""}, "prompt"),
                        ({"prompt": "x", "n": 99}, "n")):
        reply = requests.post(url, json=body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param


def test_api_auth(models):
    app = create_app(models / "tiny.safetensors", models, dtype=torch.float32, api_auth="alice:s3cret,bob:hunter2")
    with ServerThread(app) as running:
        assert requests.get(f"{running.url}/sdapi/v1/samplers").status_code == 401
        assert requests.get(f"{running.url}/sdapi/v1/samplers", auth=("alice", "wrong")).status_code == 401
        assert requests.get(f"{running.url}/", auth=("bob", "hunter2")).status_code == 200
        api = webuiapi.WebUIApi(host="127.0.0.1", port=running.port)
        api.set_auth("alice", "s3cret")
        r = api.txt2img(prompt="secret", seed=1, steps=1, width=SIZE, height=SIZE)
        assert r.info["all_seeds"] == [1]
        token = requests.post(f"{running.url}/v1/images/generations", headers={"Authorization": "Bearer s3cret"},
                              json={"prompt": "x", "size": "64x64"})
        assert token.status_code == 200


def test_demo_model_served(tmp_path):
    app = create_app("demo", dtype=torch.float32)
    sd = minisd.load("demo", dtype=torch.float32)
    with ServerThread(app) as running:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=running.port)
        assert api.get_options()["minisd_image_size"] == 64
        assert api.util_get_current_model().startswith("demo.safetensors [")
        r = api.txt2img(prompt="a red circle on the left, blue background", seed=4, steps=8, width=64, height=64,
                        sampler_name="DPM++ 2M", cfg_scale=5)
    expected = sd.txt2img("a red circle on the left, blue background", seed=4, steps=8, width=64, height=64,
                          sampler="DPM++ 2M", cfg_scale=5)
    assert_same_images(r.images, expected)


def test_serve_refuses_an_open_host_without_auth_and_names_the_missing_extra(capsys, monkeypatch):
    from minisd import cli
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--api-auth" in err
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert cli.main(["serve"]) == 2
    assert "pip install 'minisd[server]'" in capsys.readouterr().err
