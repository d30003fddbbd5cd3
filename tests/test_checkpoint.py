"""Checkpoint loading: every container format gives identical tensors, EMA is chosen, and every kind of
bad input is refused with one clear line (through the API and through `minisd info`), never by running
code from the file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from unittest import mock
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import minisd
from minisd import CheckpointError, UnsupportedModelError
from minisd.config import PRESETS

from minisd.testing import diffusers_config_folder, random_state_dict, write_checkpoint


def load_fp32(source, **options) -> minisd.StableDiffusion:
    """Loaded in the file's own precision, whatever this machine's default would be."""
    return minisd.load(source, dtype=torch.float32, **options)


def tensors(sd: minisd.StableDiffusion) -> dict[str, torch.Tensor]:
    return sd.state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def fake_lightning_callback():
    """An object of a class named like PyTorch-Lightning's ModelCheckpoint, as full SD .ckpt files carry."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = 0.5

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    return module, ModelCheckpoint()


def write_ckpt(path: Path, state: dict[str, torch.Tensor]):
    module, callback = fake_lightning_callback()
    fake = {"pytorch_lightning": types.ModuleType("pytorch_lightning"),
            "pytorch_lightning.callbacks": types.ModuleType("pytorch_lightning.callbacks"), module.__name__: module}
    with mock.patch.dict(sys.modules, fake):
        torch.save({"state_dict": state, "global_step": 470000, "epoch": 6,
                    "callbacks": {type(callback): {"best": callback}}}, path)


def test_safetensors_ckpt_and_diffusers_folders_load_identically(tmp_path, tiny_config):
    path = tmp_path / "m.safetensors"
    state = write_checkpoint(path, tiny_config, seed=7)
    reference = tensors(load_fp32(path))
    assert_same_weights(reference, {k: v for k, v in state.items()})

    write_ckpt(tmp_path / "m.ckpt", state)
    assert_same_weights(tensors(load_fp32(tmp_path / "m.ckpt", config=tiny_config)), reference)

    # A diffusers folder written by diffusers and transformers themselves (transformers 5 drops `text_model.`).
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    configs = diffusers_config_folder(tmp_path / "configs", tiny_config)
    folder = tmp_path / "by-diffusers"
    UNet2DConditionModel.from_single_file(str(path), config=str(configs), subfolder="unet").save_pretrained(folder / "unet")
    AutoencoderKL.from_single_file(str(path), config=str(configs), subfolder="vae").save_pretrained(folder / "vae")
    text = CLIPTextModel(CLIPTextConfig(**json.loads((configs / "text_encoder" / "config.json").read_text())))
    prefix = "cond_stage_model.transformer.text_model."
    text.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=False)
    text.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert_same_weights(tensors(load_fp32(folder)), reference)

    # ... and the folder `minisd convert` writes, which diffusers reads back to the same weights.
    subprocess.run([sys.executable, "-m", "minisd", "convert", str(path), str(tmp_path / "by-minisd")], check=True,
                   capture_output=True)
    assert_same_weights(tensors(load_fp32(tmp_path / "by-minisd")), reference)
    reread = UNet2DConditionModel.from_pretrained(tmp_path / "by-minisd", subfolder="unet").state_dict()
    written = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()
    assert_same_weights(reread, written)


def test_convert_ckpt_to_fp16_safetensors(tmp_path, tiny_config):
    state = random_state_dict(tiny_config, seed=8)
    write_ckpt(tmp_path / "m.ckpt", state)
    out = tmp_path / "m.safetensors"
    result = subprocess.run([sys.executable, "-m", "minisd", "convert", str(tmp_path / "m.ckpt"), str(out),
                             "--dtype", "fp16"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    written = load_file(str(out))
    assert all(v.dtype == torch.float16 for v in written.values())
    assert_same_weights(written, {k: v.half() for k, v in state.items()})
    # never overwrites what the user has
    again = subprocess.run([sys.executable, "-m", "minisd", "convert", str(tmp_path / "m.ckpt"), str(out)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert_same_weights(load_file(str(out)), written)


def test_ema_weights_are_chosen_when_present(tmp_path, tiny_config):
    state = random_state_dict(tiny_config, seed=9)
    unet_keys = [k for k in state if k.startswith("model.diffusion_model.")]
    ema = {"model_ema." + k.removeprefix("model.").replace(".", ""): state[k] + 1 for k in unet_keys}
    full = {**state, **ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5),
            "betas": torch.rand(1000), "alphas_cumprod": torch.rand(1000), "logvar": torch.zeros(1000),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77.0)[None]}
    save_file(full, str(tmp_path / "ema.safetensors"))
    with_ema = load_fp32(tmp_path / "ema.safetensors", config=tiny_config)
    without = load_fp32(tmp_path / "ema.safetensors", config=tiny_config, use_ema=False)
    assert with_ema.has_ema and not without.has_ema
    key = unet_keys[0]
    name = key.removeprefix("model.diffusion_model.")
    assert torch.equal(with_ema.unet.state_dict()[name], state[key] + 1)
    assert torch.equal(without.unet.state_dict()[name], state[key])


def test_text_encoder_keys_without_text_model_level(tmp_path, tiny_config):
    state = random_state_dict(tiny_config, seed=10)
    prefix = "cond_stage_model.transformer.text_model."
    flat = {k.replace(prefix, "cond_stage_model.transformer."): v for k, v in state.items()}
    save_file(flat, str(tmp_path / "flat.safetensors"))
    assert_same_weights(tensors(load_fp32(tmp_path / "flat.safetensors", config=tiny_config)), state)


def test_dtype_is_cast_once_at_load(tiny_checkpoint):
    sd = minisd.load(tiny_checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters()} == {torch.bfloat16}


# ---- bad input -------------------------------------------------------------------------------------------

def bad_inputs(tmp: Path, config) -> dict[str, tuple[Path, str]]:
    """name -> (path, a phrase the one-line message must contain)."""
    cases = {}
    state = random_state_dict(config, seed=11)

    def save(name: str, sd: dict) -> Path:
        save_file(sd, str(tmp / name))
        return tmp / name

    (tmp / "empty.safetensors").write_bytes(b"")
    cases["empty"] = (tmp / "empty.safetensors", "empty file")
    (tmp / "random.safetensors").write_bytes(bytes(range(7, 250)) * 40)
    cases["random bytes"] = (tmp / "random.safetensors", "not a safetensors file")
    good = save("good.safetensors", state)
    (tmp / "truncated.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["truncated"] = (tmp / "truncated.safetensors", "truncated")
    (tmp / "lfs.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n"
                                         "oid sha256:" + "0" * 64 + "\nsize 4265380512\n")
    cases["lfs pointer"] = (tmp / "lfs.safetensors", "Git LFS pointer")
    torch.save({"state_dict": state}, tmp / "legacy.ckpt", _use_new_zipfile_serialization=False)
    cases["legacy pickle"] = (tmp / "legacy.ckpt", "legacy")
    flux = {"double_blocks.0.img_attn.qkv.weight": torch.ones(3, 3), "double_blocks.0.img_attn.proj.weight": torch.ones(1)}
    cases["other architecture"] = (save("flux.safetensors", flux), "Flux checkpoints are not supported")
    cases["not SD at all"] = (save("classifier.safetensors", {"fc.weight": torch.ones(3, 3)}),
                              "not a Stable Diffusion checkpoint")
    missing = dict(state)
    del missing["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    cases["missing unet keys"] = (save("missing.safetensors", missing), "input_blocks.1.0.in_layers.2.weight")
    mismatch = dict(state)
    mismatch["model.diffusion_model.out.0.weight"] = torch.ones(7)
    cases["shape mismatch"] = (save("mismatch.safetensors", mismatch), "shape mismatch for out.0.weight")
    nan = dict(state)
    nan["first_stage_model.decoder.conv_out.bias"] = torch.full((3,), float("nan"))
    cases["nan"] = (save("nan.safetensors", nan), "NaN")
    (tmp / "folder").mkdir()
    (tmp / "folder" / "readme.txt").write_text("hello")
    cases["not a diffusers folder"] = (tmp / "folder", "not a diffusers model")
    cases["missing file"] = (tmp / "nope.safetensors", "no such file")
    return cases


class Evil:
    """Pickles to a call of os.system: loading this must never run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    cases = bad_inputs(tmp, PRESETS["tiny"])
    marker = tmp / "code-was-executed"
    torch.save({"state_dict": random_state_dict(PRESETS["tiny"], seed=12), "x": Evil(marker)}, tmp / "evil.ckpt")
    cases["code-running pickle"] = (tmp / "evil.ckpt", "system")
    return cases, marker


CASES = ["empty", "random bytes", "truncated", "lfs pointer", "legacy pickle", "other architecture",
         "not SD at all", "missing unet keys", "shape mismatch", "nan", "not a diffusers folder", "missing file",
         "code-running pickle"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_through_the_api(bad, case):
    cases, marker = bad
    path, phrase = cases[case]
    with pytest.raises(CheckpointError) as info:
        minisd.load(path)
    assert phrase in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_bad_input_through_minisd_info(bad):
    """Each case in a subprocess: exit code 2, one line naming the file and the problem, no traceback."""
    cases, marker = bad
    running = {case: subprocess.Popen([sys.executable, "-m", "minisd", "info", str(cases[case][0])],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for case in CASES}
    for case, process in running.items():
        out, err = process.communicate(timeout=300)
        path, phrase = cases[case]
        assert process.returncode == 2, (case, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (case, err)
        assert phrase in err and str(path) in err, (case, err)
    assert not marker.exists()


def test_unsupported_is_a_checkpoint_error(bad):
    cases, _ = bad
    with pytest.raises(UnsupportedModelError):
        minisd.load(cases["other architecture"][0])


def test_info_describes_a_model(tiny_checkpoint):
    import hashlib
    result = subprocess.run([sys.executable, "-m", "minisd", "info", str(tiny_checkpoint)],
                            capture_output=True, text=True, check=True)
    digest = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert "variant:     sd1" in result.stdout
    assert digest in result.stdout and f"model hash:  {digest[:10]}" in result.stdout
    n_unet = sum(v.numel() for k, v in load_file(str(tiny_checkpoint)).items() if k.startswith("model.diffusion"))
    assert f"{n_unet:,} parameters" in result.stdout


@pytest.mark.slow
def test_loading_fp16_full_sd15_into_fp32_keeps_peak_memory_low(tmp_path):
    """Peak RSS of loading the full SD 1.5 model from an fp16 .safetensors into fp32 stays under 1.3× the
    fp32 model's own size: no random init, no second copy, file pages released after each cast."""
    path = tmp_path / "sd15-fp16.safetensors"
    write_checkpoint(path, PRESETS["sd1"], seed=13, dtype=torch.float16, record_config=False)
    script = ("import torch, minisd\n"
              f"sd = minisd.load({str(path)!r}, device='cpu', dtype=torch.float32)\n"
              "n = sum(p.numel() for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters())\n"
              # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) pytest parent across exec.
              "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
              "print(n * 4, int(hwm) * 1024)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    model_bytes, peak = map(int, out.split())
    print(f"fp32 model {model_bytes / 2**30:.2f} GiB, peak RSS {peak / 2**30:.2f} GiB, ratio {peak / model_bytes:.3f}")
    assert peak < 1.3 * model_bytes
