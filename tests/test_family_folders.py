"""diffusers folders of SD 2.x (ε, v, inpainting) and SDXL (base, refiner): minisd reads the folders diffusers
itself writes to the same networks as the original file, diffusers reads the folders `minisd convert` writes (no
missing or unexpected keys) to the same outputs, file -> folder -> file keeps every tensor the folder can hold, and
`minisd info` / `minisd convert` describe and convert them from the command line."""
from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import minisd
from minisd.checkpoint import IGNORED_KEYS, original_state_dict
from minisd.cli import main
from minisd.config import PRESETS, V_PREDICTION, infer_config
from minisd.models.conditioner import text_encoder_for
from minisd.models.unet import UNetModel, timestep_embedding
from minisd.models.vae import AutoencoderKL
from minisd.testing import SD_SCHEDULER, reference_family_pipeline, write_checkpoint
from minisd.tokenizer import BOS_ID, EOS_ID

from conftest import DATA

PROMPT, NEGATIVE = "a red circle on the left, blue background", "blurry"
_SD2 = PRESETS["tiny-sd2"]
CASES = {  # name: (config, diffusers pipeline class)
    "sd2": (_SD2, "StableDiffusionPipeline"),
    "sd2-v": (dataclasses.replace(_SD2, schedule=V_PREDICTION), "StableDiffusionPipeline"),
    "sd2-inpaint": (dataclasses.replace(_SD2, variant="sd2-inpaint", unet=dataclasses.replace(_SD2.unet, in_channels=9)),
                    "StableDiffusionInpaintPipeline"),
    "sdxl": (PRESETS["tiny-sdxl"], "StableDiffusionXLPipeline"),
    "sdxl-refiner": (PRESETS["tiny-sdxl-refiner"], "StableDiffusionXLImg2ImgPipeline"),
}
OPEN_CLIP_PREFIX = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model.",
                    "sdxl-refiner": "conditioner.embedders.0.model."}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def folder_lacks(name: str, config) -> set[str]:
    """The original keys a diffusers folder has no place for: OpenCLIP's `logit_scale`; SD 2.x's last layer and
    (CLIPTextModel has no projection) `text_projection`."""
    prefix = OPEN_CLIP_PREFIX[config.variant.replace("-inpaint", "")]
    with torch.device("meta"):
        keys = original_state_dict(UNetModel(config.unet), AutoencoderKL(config.vae), text_encoder_for(config)).keys()
    last = f"{prefix}transformer.resblocks.{config.open_clip.layers - 1}."
    return {k for k in keys if k == prefix + "logit_scale" or name.startswith("sd2") and (
        k.startswith(last) or k == prefix + "text_projection")}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    name = request.param
    config, kind = CASES[name]
    tmp = tmp_path_factory.mktemp(name)
    path = tmp / f"{name}.safetensors"
    state = write_checkpoint(path, config, seed=51)
    converted = tmp / "by-minisd"
    assert main(["convert", str(path), str(converted)]) == 0
    sd = minisd.load(path, dtype=torch.float32)
    return SimpleNamespace(name=name, config=config, kind=kind, path=path, state=state, tmp=tmp, folder=converted,
                           sd=sd, outputs=network_outputs(sd), latents=None if "inpaint" in name else latents(sd))


def text_outputs(sd: minisd.StableDiffusion, clip_skip: int = 1) -> list[torch.Tensor]:
    """The text encoder(s) of `sd` on fixed random ids: contexts, and SDXL's pooled embedding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, EOS_ID, (2, 77), generator=g)
    ids[:, 0], ids[:, 30:] = BOS_ID, EOS_ID
    with torch.no_grad():
        if sd.config.family == "sd2":
            return [sd.text_encoder(ids, clip_skip=clip_skip)]
        zero = ids.clone()
        zero[:, 31:] = 0
        hidden, pooled = sd.text_encoder(ids, zero, clip_skip=clip_skip)
        return [*hidden, pooled]


def network_outputs(sd: minisd.StableDiffusion) -> list[torch.Tensor]:
    """Every network of `sd` on fixed random inputs: UNet (with SDXL's vector y), VAE encode and decode, text
    encoder(s)."""
    config = sd.config
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = torch.randn(2, config.unet.in_channels, 8, 12, generator=g)
        context = torch.randn(2, 9, config.unet.context_dim, generator=g)
        y = torch.randn(2, config.unet.adm_in_channels, generator=g) if config.unet.adm_in_channels else None
        out = [sd.unet(x, torch.tensor([1.0, 981.0]), context, **({"y": y} if y is not None else {}))]
        out += [sd.vae.encode(torch.rand(1, 3, 32, 48, generator=g) * 2 - 1), sd.vae.decode(x[:1, :4, :4, :6])]
    return out + text_outputs(sd)


def latents(sd: minisd.StableDiffusion) -> torch.Tensor:
    """A short generation: txt2img, or img2img for the refiner (a second-stage model)."""
    options = dict(negative_prompt=NEGATIVE, width=64, height=48, steps=4, cfg_scale=5.0, sampler="Euler",
                   schedule="Simple", seed=7, output="latent")
    if sd.config.variant == "sdxl-refiner":
        return sd.img2img(init_image(), PROMPT, strength=0.5, **options)
    return sd.txt2img(PROMPT, **options)


def init_image():
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 48), (40, 60, 200))
    ImageDraw.Draw(image).ellipse([4, 8, 32, 44], fill=(220, 30, 30))
    return image


def euler(prediction_type: str):
    from diffusers import EulerDiscreteScheduler
    return EulerDiscreteScheduler(**{**SD_SCHEDULER, "prediction_type": prediction_type}, timestep_spacing="trailing")


def test_reads_the_folders_diffusers_writes(case):
    """diffusers' own folder (its `from_single_file` pipeline on the original file, `save_pretrained`): the same
    config (the OpenCLIP tower aside), the same tensors but those a folder cannot hold, bit-equal outputs."""
    ref = reference_family_pipeline(case.kind, case.path, case.config, case.tmp,
                                    euler(case.config.schedule.prediction_type))
    folder = case.tmp / "by-diffusers"
    ref.save_pretrained(folder)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == case.kind
    theirs = minisd.load(folder, dtype=torch.float32)
    assert dataclasses.replace(theirs.config, open_clip=None) == dataclasses.replace(case.config, open_clip=None)
    assert theirs.config.open_clip.dropped_last_layers == (1 if case.name.startswith("sd2") else 0)
    ours, read = case.sd.state_dict(), theirs.state_dict()
    assert read.keys() == ours.keys() - folder_lacks(case.name, case.config)
    assert all(torch.equal(read[k], ours[k]) for k in read)
    for a, b in zip(network_outputs(theirs), case.outputs, strict=True):
        assert torch.equal(a, b)
    if case.config.family == "sd2":  # clip skip counts from the original tower's end in both
        assert torch.equal(text_outputs(theirs, clip_skip=2)[0], text_outputs(case.sd, clip_skip=2)[0])
        for sd in (theirs, case.sd):
            with pytest.raises(minisd.ParameterError, match="clip skip must be between 1 and 2"):
                text_outputs(sd, clip_skip=3)
    if case.latents is not None:
        assert torch.equal(latents(theirs), case.latents)


def test_diffusers_reads_the_folders_minisd_writes(case):
    """`minisd convert FILE FOLDER`: every component loads into diffusers/transformers without missing or unexpected
    keys, `DiffusionPipeline.from_pretrained` builds the family's pipeline, and its results equal minisd's."""
    import diffusers
    import transformers

    folder, config = case.folder, case.config
    index = json.loads((folder / "model_index.json").read_text())
    networks = {}
    for part, entry in index.items():
        if not isinstance(entry, list) or entry[0] is None or part == "scheduler" or "tokenizer" in part:
            continue
        library, cls = entry
        loader = getattr(diffusers if library == "diffusers" else transformers, cls)
        networks[part], info = loader.from_pretrained(folder, subfolder=part, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (part, info)
    assert ("text_encoder" in networks) == (config.variant != "sdxl-refiner")
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, **networks)  # the rest as model_index.json says
    assert type(pipe).__name__ == case.kind
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == config.schedule.prediction_type
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    open_tokenizer = pipe.tokenizer if config.family == "sd2" else pipe.tokenizer_2
    assert open_tokenizer.pad_token_id == 0  # OpenCLIP pads with "!" (0); CLIP-L with end-of-text
    if config.variant == "sdxl":
        assert pipe.tokenizer.pad_token_id == EOS_ID
        assert pipe.config.force_zeros_for_empty_prompt
    if config.variant == "sdxl-refiner":
        assert pipe.config.requires_aesthetics_score

    sd = case.sd
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, output_type="latent")
    with torch.no_grad():
        if case.name == "sd2-inpaint":  # the networks, as the inpainting pipeline calls them
            g = torch.Generator().manual_seed(1)
            x, context = torch.randn(2, 9, 8, 8, generator=g), torch.randn(2, 5, config.unet.context_dim, generator=g)
            t = torch.tensor([10.0, 900.0])
            assert relative(sd.unet(x, t, context), pipe.unet(x, t, encoder_hidden_states=context).sample) <= 1e-4
            ids = torch.tensor([open_tokenizer(PROMPT, padding="max_length", max_length=77).input_ids])
            assert relative(sd.text_encoder(ids), pipe.text_encoder(ids).last_hidden_state) <= 1e-4
            z = torch.randn(1, 4, 6, 8, generator=g)
            assert relative(sd.vae.decode(z), pipe.vae.decode(z).sample) <= 1e-4
            return
        if config.variant == "sdxl-refiner":  # A1111's strength 0.5 of 4 steps is diffusers' 0.75 (test_sdxl)
            start = sd.encode_latents(minisd.image.pil_to_tensor(init_image()))
            theirs = pipe(**common, image=start, strength=0.75, num_inference_steps=4,
                          generator=torch.Generator().manual_seed(7)).images
        else:
            noise = torch.randn((1, 4, 6, 8), generator=torch.Generator().manual_seed(7))
            theirs = pipe(**common, height=48, width=64, num_inference_steps=4, latents=noise).images
    assert relative(case.latents, theirs) <= 1e-4


def test_file_folder_file_round_trip(case):
    """FOLDER -> FILE keeps every tensor bit for bit (those the folder could not hold aside) and the config,
    SD 2.x's shortened tower recorded; the file loads to the same results, and writes the same folder again."""
    back = case.tmp / "back.safetensors"
    assert main(["convert", str(case.folder), str(back)]) == 0
    written = load_file(str(back))
    assert written.keys() == case.state.keys() - folder_lacks(case.name, case.config)
    assert all(torch.equal(written[k], case.state[k]) for k in written)
    again = minisd.load(back, dtype=torch.float32)
    assert dataclasses.replace(again.config, open_clip=None) == dataclasses.replace(case.config, open_clip=None)
    assert again.config.open_clip.dropped_last_layers == (1 if case.name.startswith("sd2") else 0)
    assert again.config.open_clip.has_logit_scale is False
    for a, b in zip(network_outputs(again), case.outputs, strict=True):
        assert torch.equal(a, b)
    refolder = case.tmp / "again"
    assert main(["convert", str(back), str(refolder)]) == 0
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        stem = "model" if part.startswith("text") else "diffusion_pytorch_model"
        if (case.folder / part).is_dir():
            first, second = (load_file(str(f / part / f"{stem}.safetensors")) for f in (case.folder, refolder))
            assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), part


def test_a_23_layer_vit_h_file_is_read_as_sd2_conditioning_on_its_last_layer():
    """A single file without minisd's metadata whose ViT-H tower has 23 layers (written from a diffusers folder
    by diffusers' conversion script: no last layer, no projection, no logit scale) is SD 2.x with its penultimate
    layer stored last: every key of it, and nothing more, is the model's."""
    with gzip.open(DATA / "sd2.json.gz", "rt") as f:
        real = json.load(f)["keys"]
    prefix = "cond_stage_model.model."
    gone = {k for k in real if k.startswith(f"{prefix}transformer.resblocks.23.")} | {
        prefix + "text_projection", prefix + "logit_scale"}
    keys = {k: v for k, v in real.items() if k not in gone}
    config = infer_config({k: torch.empty(v, device="meta") for k, v in keys.items()})
    assert config.open_clip == dataclasses.replace(PRESETS["sd2-base"].open_clip, layers=23, dropped_last_layers=1,
                                                   has_logit_scale=False)
    with torch.device("meta"):
        state = original_state_dict(UNetModel(config.unet), AutoencoderKL(config.vae), text_encoder_for(config))
    assert {k: list(v.shape) for k, v in state.items()} == {k: v for k, v in keys.items() if k not in IGNORED_KEYS}


@pytest.mark.parametrize("name", ["sd2-v", "sdxl"])
def test_cli_info_and_convert(name, tmp_path, capsys):
    """`minisd info` on the file and on its folder: family, prediction, default size, the stored tower; `convert`
    both ways exits 0; a folder with a broken text encoder is one line on stderr and exit code 2."""
    config, _ = CASES[name]
    path = tmp_path / f"{name}.safetensors"
    write_checkpoint(path, config, seed=52)
    assert main(["convert", str(path), str(tmp_path / "folder")]) == 0
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "back.safetensors")]) == 0
    capsys.readouterr()
    for source in (path, tmp_path / "folder", tmp_path / "back.safetensors"):
        assert main(["info", str(source)]) == 0
        out = capsys.readouterr().out
        assert f"variant:     {config.variant}\n" in out
        assert f"prediction:  {config.schedule.prediction_type}, default size 512x512\n" in out
        stored = name.startswith("sd2") and source != path
        assert ("OpenCLIP:    2 of 3 layers stored" in out) == stored, (source, out)

    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "folder", broken)
    part = "text_encoder" if name.startswith("sd2") else "text_encoder_2"
    weights = load_file(str(broken / part / "model.safetensors"))
    del weights["text_model.encoder.layers.1.self_attn.k_proj.weight"]
    save_file(weights, str(broken / part / "model.safetensors"))
    for command in (["info", str(broken)], ["convert", str(broken), str(tmp_path / "x.safetensors")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "text_model.encoder.layers.1.self_attn has only q/v of the q, k and v" in err
    assert not (tmp_path / "x.safetensors").exists()
    # a depth-conditioned (5-channel) UNet is refused by name, as its single file is
    unet_config = json.loads((broken / "unet" / "config.json").read_text())
    (broken / "unet" / "config.json").write_text(json.dumps({**unet_config, "in_channels": 5}))
    assert main(["info", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a UNet with 5 input channels" in err and "is not supported" in err


def test_the_released_folders_configs_read_as_the_presets():
    """The UNet and text-encoder `config.json` fields of Stability's released diffusers folders (SD 2.1 768-v,
    SDXL base 1.0 and refiner 1.0) read as the configs the single files infer to."""
    from minisd.diffusers_format import _open_clip_config, _unet_config

    sd21 = {"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": [5, 10, 20, 20],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "cross_attention_dim": 1024,
            "use_linear_projection": True, "layers_per_block": 2, "sample_size": 96}
    xl = {"block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
          "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
          "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048, "use_linear_projection": True,
          "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
          "projection_class_embeddings_input_dim": 2816, "layers_per_block": 2}
    refiner = {**xl, "block_out_channels": [384, 768, 1536, 1536], "attention_head_dim": [6, 12, 24, 24],
               "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
               "transformer_layers_per_block": 4, "cross_attention_dim": 1280,
               "projection_class_embeddings_input_dim": 2560}
    for raw, preset in ((sd21, "sd2"), (xl, "sdxl"), (refiner, "sdxl-refiner")):
        assert _unet_config(raw) == PRESETS[preset].unet, preset
    vit_h = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
             "projection_dim": 512, "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu"}
    big_g = {**vit_h, "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
             "num_hidden_layers": 32, "projection_dim": 1280}
    assert _open_clip_config(vit_h, 1) == dataclasses.replace(PRESETS["sd2"].open_clip, layers=23,
                                                             dropped_last_layers=1, has_logit_scale=False)
    assert _open_clip_config(big_g, 0) == dataclasses.replace(PRESETS["sdxl"].open_clip, has_logit_scale=False)
