"""The web page of `minisd serve` in a real browser: Debian's headless Chromium driven by Playwright (no browser
download) loads `/`, generates with a live progress bar, interrupts, paints a mask, inpaints, reads a PNG's
parameters back, and leaves screenshots (desktop and phone width) in the test's temporary folder."""
from __future__ import annotations

import base64
import io
import os
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the server extra (make test installs it)")
from playwright.sync_api import sync_playwright  # noqa: E402

import minisd  # noqa: E402
from minisd.config import PRESETS  # noqa: E402
from minisd.server.app import ServerThread, create_app  # noqa: E402
from minisd.testing import write_checkpoint  # noqa: E402

CHROMIUM = "/usr/bin/chromium"  # Debian's package; `make test` installs it
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]


def _data_url_image(src: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def _generate(page, *, cards_before: int, interrupt_when_moving: bool = False) -> list[float]:
    """Click Generate and sample the progress bar until a new card lands in the gallery; with
    `interrupt_when_moving`, click Interrupt once the bar has shown two different values between 0 and 1."""
    page.click("#generate")
    seen = []
    deadline = time.monotonic() + 120
    while page.locator("#gallery .card").count() == cards_before:
        assert time.monotonic() < deadline, f"no image appeared; progress seen: {sorted(set(seen))[:20]}"
        assert not page.is_visible("#error"), page.inner_text("#error")
        seen.append(float(page.eval_on_selector("#progress", "e => e.value")))
        if interrupt_when_moving and len({v for v in seen if 0 < v < 1}) >= 2:
            page.click("#interrupt")
            interrupt_when_moving = False
        time.sleep(0.03)
    return seen


def test_page_generates_shows_progress_paints_a_mask_and_inpaints(tmp_path):
    assert os.path.exists(CHROMIUM), "Debian's chromium package is missing (`make test` installs it)"
    path = tmp_path / "tiny.safetensors"
    write_checkpoint(path, PRESETS["tiny"], seed=5)
    sd = minisd.load(path, dtype=torch.float32)
    with ServerThread(create_app(path, dtype=torch.float32)) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelectorAll('#sampler_name option').length > 5")
        assert page.title() == "minisd" and page.input_value("#model").startswith("tiny.safetensors [")

        # txt2img: prompt, a fixed seed, a small size; a long job: the bar and the preview move, Interrupt stops it
        page.fill("#prompt", "a red circle")
        page.fill("#negative_prompt", "blue")
        page.select_option("#sampler_name", "Euler")
        for field, value in (("#steps", "1000"), ("#width", "64"), ("#height", "64"), ("#seed", "77"),
                             ("#cfg_scale", "6")):
            page.fill(field, value)
        seen = _generate(page, cards_before=0, interrupt_when_moving=True)
        moving = sorted({v for v in seen if 0 < v < 1})
        assert len(moving) >= 2, f"the progress bar did not move: {seen}"
        assert page.inner_text("#status") == "interrupted"

        # the whole job, shorter: the image in the gallery is the library's, pixel for pixel
        page.fill("#steps", "12")
        _generate(page, cards_before=1)
        assert float(page.eval_on_selector("#progress", "e => e.value")) == 1 and page.inner_text("#status") == "done"
        card = page.locator("#gallery .card").first
        infotext = card.locator("pre").inner_text()
        assert infotext.startswith("a red circle\nNegative prompt: blue\nSteps: 12, Sampler: Euler")
        assert "Seed: 77" in infotext
        first = _data_url_image(card.locator("img").get_attribute("src"))
        expected = sd.txt2img("a red circle", negative_prompt="blue", seed=77, steps=12, width=64, height=64,
                              sampler="Euler", cfg_scale=6.0)[0]
        assert np.array_equal(np.asarray(first.convert("RGB")), np.asarray(expected))
        page.click("#seed-random")
        page.click("#seed-reuse")
        assert page.input_value("#seed") == "77"

        # send to img2img, paint a stroke over the middle with the mouse, inpaint
        card.get_by_role("button", name="Send to img2img").click()
        page.wait_for_selector("#stack", state="visible")
        page.fill("#brush", "40")
        page.dispatch_event("#brush", "input")
        box = page.locator("#mask-canvas").bounding_box()
        y = box["y"] + box["height"] / 2
        page.mouse.move(box["x"] + box["width"] * 0.35, y)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.65, y, steps=8)
        page.mouse.up()
        page.fill("#steps", "8")
        page.fill("#prompt", "a green square")
        _generate(page, cards_before=2)
        card = page.locator("#gallery .card").first
        text = card.locator("pre").inner_text()
        assert "a green square" in text and "Mask blur: 4" in text and "Denoising strength: 0.75" in text
        painted = np.asarray(_data_url_image(card.locator("img").get_attribute("src")).convert("RGB")).astype(int)
        original = np.asarray(first.convert("RGB")).astype(int)
        assert np.array_equal(painted[:8], original[:8]) and np.array_equal(painted[-8:], original[-8:])  # kept
        assert np.abs(painted[28:36, 28:36] - original[28:36, 28:36]).max() > 0  # repainted under the stroke

        # drop a PNG on the page to read its parameters back
        page.click("#tab-pnginfo")
        png = io.BytesIO()
        from PIL import PngImagePlugin
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", infotext)
        first.save(png, format="PNG", pnginfo=info)
        dropped = page.evaluate_handle("""(b64) => {
            const transfer = new DataTransfer();
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            transfer.items.add(new File([bytes], "a.png", { type: "image/png" }));
            return transfer;
        }""", base64.b64encode(png.getvalue()).decode())
        page.dispatch_event("#drop-png", "drop", {"dataTransfer": dropped})
        page.wait_for_function("document.getElementById('png-text').textContent.includes('Seed: 77')")
        page.click("#png-to-txt2img")
        assert page.input_value("#prompt") == "a red circle" and page.input_value("#steps") == "12"

        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        page.set_viewport_size({"width": 390, "height": 844})  # a phone
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=str(tmp_path / "page-phone.png"), full_page=True)
        browser.close()
    assert re.match(rb"\x89PNG", (tmp_path / "page.png").read_bytes()[:4])
    print(f"screenshots: {tmp_path / 'page.png'} {tmp_path / 'page-phone.png'}")
