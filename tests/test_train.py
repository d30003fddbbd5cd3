"""Training of the demo model: the deterministic shapes dataset and its detector, single training steps of
both stages, checkpoint/resume, the written model, the evaluation, and the shipped demo model's adherence."""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import minisd
from minisd.checkpoint import DEMO_MODEL
from minisd.config import CLIPTextConfig, ModelConfig, UNetConfig, VAEConfig
from minisd.models.clip import CLIPTextModel
from minisd.models.unet import UNetModel
from minisd.models.vae import AutoencoderKL
from minisd.prompts import tokenize_prompt
from minisd.tokenizer import CLIPTokenizer
from minisd.train import autoencoder, cli, diffusion
from minisd.train.config import DEMO_MODEL as DEMO_CONFIG, DiffusionTrainConfig, TrainConfig, VAETrainConfig
from minisd.train.detector import check, detect
from minisd.train.evaluate import adherence, img2img_checks, inpaint_checks
from minisd.train.loop import EMA, learning_rate
from minisd.train.shapes import CaptionSpec, ShapesDataset, parse_caption, render, sample_caption

# Millisecond-sized networks with the demo model's structure.
TINY = ModelConfig(
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=2,
                    context_dim=32, norm_groups=8),
    vae=VAEConfig(channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8),
    text=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1),
)


def tiny_run(tmp_path: Path, **changes) -> TrainConfig:
    return TrainConfig(out_dir=tmp_path / "run", output=tmp_path / "model.safetensors", card=tmp_path / "CARD.md",
                       save_every=2, eval_prompts=0, model=TINY, image_size=32,
                       vae=VAETrainConfig(steps=6, batch_size=4, minutes=None, scale_batches=2, eval_images=8),
                       diffusion=DiffusionTrainConfig(steps=6, batch_size=8, minutes=None, num_latents=48,
                                                      warmup_steps=2),
                       **changes)


# ---- dataset and detector -----------------------------------------------------------------------------

def test_dataset_is_deterministic_per_seed_and_index():
    a, b = ShapesDataset(seed=3, omit_prob=0.3), ShapesDataset(seed=3, omit_prob=0.3)
    for i in (0, 1, 57, 999):
        x, y = a[i], b[i]
        assert x.caption == y.caption and x.truth == y.truth
        assert x.image.tobytes() == y.image.tobytes()
    assert a[0].image.tobytes() != a[1].image.tobytes()
    assert ShapesDataset(seed=4)[0].image.tobytes() != ShapesDataset(seed=3)[0].image.tobytes()
    assert a[5].image.size == (64, 64) and a[5].image.mode == "RGB"


def test_captions_follow_the_grammar_and_parse_back():
    rng = random.Random(0)
    specs = [sample_caption(rng, omit_prob=0.3) for _ in range(300)]
    assert any(s.position is None for s in specs) and any(s.background is None for s in specs)
    assert all(s.color != s.background for s in specs)
    for spec in specs:
        assert parse_caption(spec.text) == spec
    assert CaptionSpec("circle", "red", "left", "blue").text == "a red circle on the left, blue background"
    with pytest.raises(ValueError):
        parse_caption("a dog on a skateboard")


def test_training_ids_equal_the_pipeline_prompt_ids():
    """The text encoder must see at inference exactly the ids it was trained on."""
    tokenizer = CLIPTokenizer()
    for caption in ["", *(ShapesDataset(1, omit_prob=0.3)[i].caption for i in range(40))]:
        ids = diffusion.caption_ids(tokenizer, caption)
        assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
        assert ids == tokenize_prompt(tokenizer, caption)[0].ids


def test_detector_reads_the_dataset_images():
    dataset = ShapesDataset(seed=11, omit_prob=0.2)
    results = [check(dataset[i].image, dataset[i].truth) for i in range(300)]
    for name in ("background", "color", "shape", "position", "all"):
        assert np.mean([r[name] for r in results]) >= 0.99, name


def test_detector_rejects_wrong_captions_and_empty_images():
    sample = ShapesDataset(seed=2)[0]
    truth = sample.truth
    wrong_shape = "square" if truth.shape != "square" else "circle"
    assert not check(sample.image, dataclasses.replace(truth, shape=wrong_shape))["all"]
    assert check(sample.image, dataclasses.replace(truth, shape=wrong_shape))["color"]
    blank = Image.new("RGB", (64, 64), (30, 60, 230))
    found = detect(blank)
    assert found.background == "blue" and not found.found
    assert not check(blank, truth)["all"]


def test_detector_tolerates_blur_and_larger_images():
    rng = random.Random(5)
    spec = CaptionSpec("triangle", "yellow", "right", "purple")
    from PIL import ImageFilter
    image = render(spec, rng, size=128).filter(ImageFilter.GaussianBlur(1.5))
    assert check(image, spec)["all"]


# ---- the two training stages ------------------------------------------------------------------------------

def test_vae_loss_is_finite_and_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY.vae)
    autoencoder.init_vae(vae)
    x = autoencoder.to_tensor([ShapesDataset(0, size=32)[i].image for i in range(4)])
    noise = torch.randn(4, 4, 4, 4)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        loss, parts = autoencoder.vae_loss(vae, x, noise, VAETrainConfig())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and set(parts) == {"l1", "edge", "kl"}
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_diffusion_loss_is_finite_and_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    unet, text = UNetModel(TINY.unet), CLIPTextModel(TINY.text)
    diffusion.init_unet(unet)
    diffusion.init_text_encoder(text)
    # A zero-initialised UNet predicts ε = 0, so the first loss is E[ε²] ≈ 1.
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    tokenizer = CLIPTokenizer()
    ids = torch.tensor([diffusion.caption_ids(tokenizer, ShapesDataset(0)[i].caption) for i in range(8)])
    from minisd.schedule import DiscreteSchedule
    alphas = DiscreteSchedule.from_config().alphas_cumprod.float()
    params = [*unet.parameters(), *text.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(20):
        loss = diffusion.diffusion_loss(unet, text, x0, ids, t, noise, alphas)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - noise.square().mean().item()) < 1e-5
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_learning_rate_warms_up_then_decays():
    assert learning_rate(1.0, 0, 0.0, 10) == pytest.approx(0.1)
    assert learning_rate(1.0, 9, 0.0, 10) == pytest.approx(1.0)
    assert learning_rate(1.0, 500, 0.5, 10) == pytest.approx(0.55)
    assert learning_rate(1.0, 1000, 1.0, 10) == pytest.approx(0.1)


def test_ema_averages_and_warms_up():
    layer = torch.nn.Linear(2, 2)
    ema = EMA([layer], decay=0.9)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    ema.update()  # first update: decay (1 + 1) / (10 + 1), so most of the new value is taken
    assert torch.allclose(ema.shadow[0], torch.full((2, 2), 1.0), atol=0.2)
    target = torch.nn.Linear(2, 2)
    ema.copy_to([target])
    assert torch.equal(target.weight, ema.shadow[0])


def capture_states(monkeypatch, module) -> dict[int, dict]:
    """Record a copy of every run state the stage saves, by step (to simulate a crash after one)."""
    saved: dict[int, dict] = {}
    original = module.save_state

    def spy(path, state):
        original(path, state)
        if "step" in state:
            saved[state["step"]] = torch.load(path, weights_only=True)

    monkeypatch.setattr(module, "save_state", spy)
    return saved


def test_vae_stage_resumes_where_it_stopped(tmp_path, monkeypatch):
    cfg = tiny_run(tmp_path)
    saved = capture_states(monkeypatch, autoencoder)
    autoencoder.train_vae(cfg)
    full = torch.load(cfg.out_dir / "vae.pt", weights_only=True)
    assert saved[6]["finished"] and len(saved[6]["losses"]) == 6

    # As if the process had died right after its step-4 save: resume continues from step 4 ...
    crashed = dict(saved[4])
    torch.save(crashed, cfg.out_dir / "vae_state.pt")
    (cfg.out_dir / "vae.pt").unlink()
    resumed = autoencoder.train_vae(dataclasses.replace(cfg, resume=True))
    again = torch.load(resumed, weights_only=True)
    state = torch.load(cfg.out_dir / "vae_state.pt", weights_only=True)
    assert state["step"] == 6 and state["losses"][:4] == saved[4]["losses"]
    # ... and ends with the weights of the uninterrupted run (same batches, same noise, same optimizer state).
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(again["state_dict"][key], value, rtol=1e-5, atol=1e-6)
    # A finished stage is not trained again, unless its budget grows.
    written = resumed.stat().st_mtime_ns
    assert autoencoder.train_vae(dataclasses.replace(cfg, resume=True)) == resumed
    assert resumed.stat().st_mtime_ns == written
    longer = dataclasses.replace(cfg, resume=True, vae=dataclasses.replace(cfg.vae, steps=8))
    autoencoder.train_vae(longer)
    assert torch.load(cfg.out_dir / "vae_state.pt", weights_only=True)["step"] == 8


def test_whole_run_writes_a_loadable_model_and_resumes(tmp_path, monkeypatch):
    cfg = tiny_run(tmp_path)
    autoencoder.train_vae(cfg)
    vae_config = autoencoder.load_trained_vae(cfg.out_dir / "vae.pt", torch.device("cpu"))[1]
    assert vae_config.scaling_factor > 0 and vae_config != TINY.vae

    saved = capture_states(monkeypatch, diffusion)
    facts = diffusion.train_diffusion(cfg)
    assert facts["steps"] == 6 and np.isfinite(facts["final_loss"])
    assert (cfg.out_dir / "diffusion_loss.png").exists()

    sd = minisd.load(cfg.output, device="cpu", dtype=torch.float32)
    assert sd.config == dataclasses.replace(TINY, vae=vae_config, image_size=32)  # its training size
    # The shipped weights are the EMA weights (in fp16).
    shadow = saved[6]["ema"]["shadow"]
    ema_unet = dict(zip([k for k, _ in UNetModel(TINY.unet).named_parameters()], shadow))
    for name, value in sd.unet.named_parameters():
        torch.testing.assert_close(value, ema_unet[name].half().float())
    image = sd.txt2img("a red circle on the left, blue background", width=64, height=64, steps=2, seed=1)[0]
    assert image.size == (64, 64)

    # Refuses to overwrite the model without --overwrite; resuming after a crash at step 4 reproduces it.
    with pytest.raises(FileExistsError):
        diffusion.train_diffusion(cfg)
    torch.save(saved[4], cfg.out_dir / "diffusion_state.pt")
    again = diffusion.train_diffusion(dataclasses.replace(cfg, resume=True, overwrite=True))
    assert again["losses"][:4] == saved[4]["losses"] and again["steps"] == 6
    resumed = minisd.load(cfg.output, device="cpu", dtype=torch.float32)
    for (name, a), b in zip(sd.unet.state_dict().items(), resumed.unet.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3, msg=name)

    # The model card is filled in from the run.
    cli.finish(dataclasses.replace(cfg, eval_prompts=1), again)
    card = cfg.card.read_text()
    assert "## Evaluation" in card and "Reproduce" in card and f"{again['parameters']['unet']:,}" in card
    assert (tmp_path / "CARD_loss.png").exists() and (tmp_path / "CARD_samples.png").exists()


def test_command_line_fills_the_config():
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["unet", "--device", "cuda", "--unet-steps", "123", "--vae-minutes", "0",
                              "--card", "none", "--resume"])
    cfg = cli.config_from_args(args, "minisd train unet")
    assert args.stage == "unet" and cfg.device == "cuda" and cfg.resume and cfg.card is None
    assert cfg.diffusion.steps == 123 and cfg.vae.minutes is None and cfg.diffusion.minutes == 60.0
    assert cfg.model == DEMO_CONFIG


def test_demo_config_fits_the_size_budget():
    with torch.device("meta"):
        count = sum(p.numel() for m in (UNetModel(DEMO_CONFIG.unet), AutoencoderKL(DEMO_CONFIG.vae),
                                         CLIPTextModel(DEMO_CONFIG.text)) for p in m.parameters())
    assert count * 2 <= 25e6  # fp16 bytes


# ---- evaluation ------------------------------------------------------------------------------------------

class Painter:
    """A stand-in for the pipeline that draws exactly what the prompt says (or, `broken`, always the same)."""

    def __init__(self, broken: bool = False):
        self.broken = broken

    def txt2img(self, prompt, *, seed, width, height, **options):
        spec = CaptionSpec("square", "red", "left", "white") if self.broken else parse_caption(prompt)
        return [render(spec, random.Random(seed), size=width)]

    def img2img(self, init_image, prompt, *, strength, seed, width, **options):
        if strength < 0.5:
            return [init_image.copy()]
        return [render(parse_caption(prompt), random.Random(seed), size=width)]

    def inpaint(self, init_image, mask_image, prompt, *, seed, width, **options):
        found = detect(init_image)
        spec = dataclasses.replace(parse_caption(prompt), position=found.position, background=found.background)
        return [Image.composite(render(spec, random.Random(seed), size=width), init_image, mask_image)]


def test_evaluation_scores_a_perfect_and_a_broken_model():
    perfect = adherence(Painter(), 12)
    assert perfect.accuracy["all"] == 1.0 and not perfect.failures and len(perfect.images) == 12
    broken = adherence(Painter(broken=True), 12)
    assert broken.accuracy["all"] < 0.2 and len(broken.failures) == 12 * (1 - broken.accuracy["all"])
    assert img2img_checks(Painter(), 4) == {"layout_kept": 1.0, "layout_iou_mean": 1.0, "recolored": 1.0}
    inpaint = inpaint_checks(Painter(), 4)
    assert inpaint["new_color_inside"] == 1.0 and inpaint["unchanged_outside"] == 1.0


@pytest.fixture
def one_thread():
    """Batch-2 steps of a small UNet: one thread is fastest, and immune to a busy second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo():
    return minisd.load("demo", device="cpu", dtype=torch.float32)


def test_demo_model_ships_and_defaults_to_its_size(demo):
    assert DEMO_MODEL.stat().st_size <= 25_000_000
    assert demo.source == DEMO_MODEL and demo.config.image_size == 64
    assert demo.config.vae.scaling_factor != VAEConfig().scaling_factor  # measured, not SD's 0.18215
    image = demo.txt2img("a red circle on the left, blue background", steps=4, seed=1)[0]
    assert image.size == (64, 64)


def test_demo_model_follows_prompts_and_owes_it_to_the_prompt(demo, one_thread):
    guided = adherence(demo, 24)
    assert guided.accuracy["all"] >= 0.85, guided.failures
    # The same seeds without the prompt (CFG 0 is the unconditional model): the images match their captions
    # only by chance. (CFG 1 — the conditional model, unguided — already follows them as well; see the card.)
    unconditional = adherence(demo, 24, cfg_scale=0.0)
    assert unconditional.accuracy["all"] <= 0.1 and unconditional.accuracy["position"] <= 0.4


def test_demo_model_img2img_keeps_layout_and_recolours(demo, one_thread):
    checks = img2img_checks(demo, 8)
    assert checks["layout_iou_mean"] >= 0.8 and checks["layout_kept"] >= 0.75, checks
    assert checks["recolored"] >= 0.75, checks


def test_demo_model_inpaints_inside_the_mask_only(demo, one_thread):
    checks = inpaint_checks(demo, 8)
    assert checks["unchanged_outside"] == 1.0, checks
    assert checks["new_color_inside"] >= 0.75, checks


def test_demo_model_at_the_default_precision_draws_the_fp32_images(demo, one_thread, cpu_kind):
    """The precision chosen per CPU kind (bf16 where AMX exists, fp32 elsewhere) keeps the demo model's images:
    PSNR ≥ 30 dB against fp32."""
    default = minisd.load("demo", device="cpu")
    assert default.dtype == (torch.bfloat16 if cpu_kind == "amx" else torch.float32)
    rng = random.Random(5)
    for i, spec in enumerate(sample_caption(rng) for _ in range(4)):
        a, b = (np.asarray(sd.txt2img(spec.text, seed=i, steps=20)[0], dtype=np.float64) for sd in (demo, default))
        psnr = 10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-12))
        assert psnr >= 30, (spec.text, psnr)
