"""LoRA files in every key layout, merged into a tiny SD 1.x model, against diffusers' `load_lora_weights` +
`fuse_lora` on the very same files; exact unloading; several LoRAs; the prompt syntax; bad files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import minisd
from minisd.config import PRESETS
from minisd.diffusers_format import rename, unet_prefixes
from minisd.errors import ParameterError
from minisd.lora import LoraError, extract_lora_tags, find_lora
from minisd.params import GenerationParams
from minisd.testing import SD_SCHEDULER, reference_pipeline, write_checkpoint

CONFIG = PRESETS["tiny"]
RANK = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora-model") / "tiny.safetensors"
    write_checkpoint(path, CONFIG, seed=5)
    return path


@pytest.fixture()
def sd(checkpoint):
    return minisd.load(checkpoint, dtype=torch.float32)


def compvis_layers(sd) -> dict[str, tuple[int, ...]]:
    """UNet layers a LoRA typically adapts, by CompVis module path: attention, projections, feed-forward,
    and (LoCon) the ResBlock convolutions and time projection."""
    attention = tuple(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0"))
    wanted = attention + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "in_layers.2", "out_layers.3",
                          "emb_layers.1")
    return {name: tuple(m.weight.shape) for name, m in sd.unet.named_modules() if name.endswith(wanted)}


def text_layers_of(encoder) -> dict[str, tuple[int, ...]]:
    return {name: tuple(m.weight.shape) for name, m in encoder.named_modules()
            if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))}


def text_layers(sd) -> dict[str, tuple[int, ...]]:
    return text_layers_of(sd.text_encoder)


def factors(shape: tuple[int, ...], g: torch.Generator, rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (up, down) for a layer of `shape`: linear (out, in) or conv (out, in, kh, kw)."""
    out_ch, in_ch = shape[:2]
    if len(shape) == 4:
        down = torch.randn(rank, in_ch, *shape[2:], generator=g) * 0.2
        up = torch.randn(out_ch, rank, 1, 1, generator=g) * 0.2
    else:
        down, up = torch.randn(rank, in_ch, generator=g) * 0.2, torch.randn(out_ch, rank, generator=g) * 0.2
    return up, down


def diffusers_name(name: str) -> str:
    return rename({name + ".": 0}, unet_prefixes(CONFIG.unet), to_original=False).popitem()[0][:-1]


def random_factors(sd, seed: int = 0, text: bool = True) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(component, module path in our layout) -> random (up, down)."""
    g = torch.Generator().manual_seed(seed)
    layers = {("unet", n): s for n, s in compvis_layers(sd).items()}
    if text:
        layers.update({("te", n): s for n, s in text_layers(sd).items()})
    return {key: factors(shape, g) for key, shape in layers.items()}


def write_lora(path, factors_by_layer, layout: str, alpha: float | None = 2.0) -> None:
    """The same factors as a kohya file with CompVis or diffusers UNet paths, or a diffusers/PEFT file."""
    state = {}
    for (component, name), (up, down) in factors_by_layer.items():
        if layout == "peft":
            stem = ("unet." + diffusers_name(name)) if component == "unet" else "text_encoder." + name
            state[stem + ".lora_A.weight"], state[stem + ".lora_B.weight"] = down, up
            continue
        if component == "unet":
            stem = "lora_unet_" + (name if layout == "kohya-compvis" else diffusers_name(name)).replace(".", "_")
        else:
            stem = "lora_te_" + name.replace(".", "_")
        state[stem + ".lora_up.weight"], state[stem + ".lora_down.weight"] = up, down
        if alpha is not None:
            state[stem + ".alpha"] = torch.tensor(alpha)
    save_file(state, str(path))


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    """diffusers' pipeline on the same checkpoint, and a function that fuses a LoRA file into a fresh copy of its
    weights (`load_lora_weights` + `fuse_lora(lora_scale)` + `unload_lora_weights`, which keeps the fused weights)."""
    from diffusers import EulerDiscreteScheduler
    ref = reference_pipeline("StableDiffusionPipeline", checkpoint, CONFIG, tmp_path_factory.mktemp("reference"),
                             EulerDiscreteScheduler(**SD_SCHEDULER, timestep_spacing="trailing"))
    pristine = {name: {k: v.clone() for k, v in getattr(ref, name).state_dict().items()}
                for name in ("unet", "text_encoder")}

    def fused(lora_path, scale: float):
        for name, state in pristine.items():
            getattr(ref, name).load_state_dict(state)
        ref.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name, adapter_name="x")
        ref.fuse_lora(lora_scale=scale)
        ref.unload_lora_weights()
        return ref

    return fused


def relative(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    assert ours.keys() == theirs.keys()
    return max(((ours[k].float() - theirs[k].float()).abs().max() / theirs[k].float().abs().max()).item()
               for k in ours)


def unet_as_original(ref) -> dict[str, torch.Tensor]:
    return rename(ref.unet.state_dict(), unet_prefixes(CONFIG.unet), to_original=True)


def text_as_ours(ref) -> dict[str, torch.Tensor]:
    state = ref.text_encoder.state_dict()
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()
            if "position_ids" not in k}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> int:
    return sum(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("layout", ["kohya-compvis", "kohya-diffusers", "peft"])
def test_merged_weights_equal_diffusers_fuse_lora(sd, reference, tmp_path, layout):
    """diffusers 0.42.1 maps kohya's CompVis UNet paths of SD 1.x only for attention layers (its SGM mapping is
    written for SDXL), so for that layout the reference reads the same factors under diffusers paths."""
    weights = random_factors(sd)
    path = tmp_path / f"{layout}.safetensors"
    write_lora(path, weights, layout)
    reference_file = path
    if layout == "kohya-compvis":
        reference_file = tmp_path / "reference.safetensors"
        write_lora(reference_file, weights, "kohya-diffusers")
    before_unet = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    before_text = {k: v.clone() for k, v in sd.text_encoder.state_dict().items()}
    sd.load_lora(path, 0.7)
    ref = reference(reference_file, 0.7)
    ours_unet, ours_text = sd.unet.state_dict(), sd.text_encoder.state_dict()
    # Every adapted layer really moved (a key that silently matched nothing would leave it).
    assert changed(before_unet, ours_unet) == len(compvis_layers(sd))
    assert changed(before_text, ours_text) == len(text_layers(sd))
    assert relative(ours_unet, unet_as_original(ref)) <= 1e-5
    assert relative(ours_text, text_as_ours(ref)) <= 1e-5
    sd.unload_loras()
    assert all(torch.equal(before_unet[k], v) for k, v in sd.unet.state_dict().items())
    assert all(torch.equal(before_text[k], v) for k, v in sd.text_encoder.state_dict().items())


def test_prompt_tag_image_equals_diffusers_with_the_adapter_at_its_weight(sd, reference, tmp_path):
    write_lora(tmp_path / "style.safetensors", random_factors(sd, seed=3), "peft")
    sd.lora_dirs = [tmp_path]
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    options = dict(width=32, height=32, steps=4, cfg_scale=5.0, sampler="Euler", schedule="Simple", seed=9)
    (image,) = sd.txt2img("a red circle <lora:style:0.7>", negative_prompt="blurry", **options)
    # Merged for that generation only.
    assert all(torch.equal(before[k], v) for k, v in sd.unet.state_dict().items())
    assert "Lora hashes: \"style: " in image.info["parameters"]
    assert "<lora:style:0.7>" in image.info["parameters"].splitlines()[0]
    ref = reference(tmp_path / "style.safetensors", 0.7)
    eps = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(9))
    (ref_image,) = ref(prompt="a red circle ", negative_prompt="blurry", height=32, width=32, num_inference_steps=4,
                       guidance_scale=5.0, latents=eps).images
    difference = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(ref_image, dtype=np.int16)).max()
    assert difference <= 1


def test_two_loras_add_up_and_unload_exactly(sd, tmp_path):
    first, second = random_factors(sd, seed=1), random_factors(sd, seed=2)
    write_lora(tmp_path / "a.safetensors", first, "kohya-compvis")
    write_lora(tmp_path / "b.safetensors", second, "peft")
    original = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    sd.load_lora(tmp_path / "a.safetensors", 0.5)
    only_a = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    sd.unload_loras()
    sd.load_lora(tmp_path / "b.safetensors", -0.8)
    only_b = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    sd.load_lora(tmp_path / "a.safetensors", 0.5)
    both = sd.unet.state_dict()
    for k in original:
        expected = only_a[k] + only_b[k] - original[k]
        assert torch.allclose(both[k], expected, rtol=0, atol=1e-6 * expected.abs().max().item()), k
    sd.unload_loras()
    assert all(torch.equal(original[k], v) for k, v in sd.unet.state_dict().items())


def test_locon_with_a_mid_kernel_equals_its_three_convolutions(sd, tmp_path):
    """LyCORIS' CP-decomposed 3×3 LoCon: 1×1 down, r×r×3×3 mid, 1×1 up applied in turn is the merged delta."""
    name = "input_blocks.1.0.in_layers.2"
    conv = sd.unet.get_submodule(name)
    out_ch, in_ch = conv.weight.shape[:2]
    g = torch.Generator().manual_seed(4)
    down, mid, up = (torch.randn(RANK, in_ch, 1, 1, generator=g), torch.randn(RANK, RANK, 3, 3, generator=g),
                     torch.randn(out_ch, RANK, 1, 1, generator=g))
    stem = "lora_unet_" + name.replace(".", "_")
    save_file({stem + ".lora_down.weight": down, stem + ".lora_mid.weight": mid, stem + ".lora_up.weight": up,
               stem + ".alpha": torch.tensor(2.0)}, str(tmp_path / "locon.safetensors"))
    x = torch.randn(1, in_ch, 9, 7, generator=g)
    with torch.no_grad():
        plain = conv(x)
        sd.load_lora(tmp_path / "locon.safetensors", 0.6)
        merged = conv(x)
        chain = torch.nn.functional.conv2d(torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down), mid,
                                                                      padding=1), up)
    expected = plain + 0.6 * (2.0 / RANK) * chain
    assert ((merged - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_prompt_tags_are_read_as_a1111_does():
    text, tags = extract_lora_tags("a cat <lora:style:0.7>, <lora:detail> <lyco:x:0.5:0.25> <lora:y:unet=0.3:te=2>")
    assert text == "a cat ,   "
    assert [(t.name, t.te_weight, t.unet_weight) for t in tags] == [
        ("style", 0.7, 0.7), ("detail", 1.0, 1.0), ("x", 0.5, 0.25), ("y", 2.0, 0.3)]
    with pytest.raises(ParameterError, match="hypernet"):
        extract_lora_tags("<hypernet:h:1>")
    with pytest.raises(ParameterError, match="unknown LoRA 'missing'"):
        find_lora("missing", [])


def test_diffusers_attention_processor_keys_merge_like_peft_keys(sd, tmp_path):
    """diffusers < 0.17 wrote attention LoRAs as `attn1.processor.to_q_lora.down.weight`."""
    g = torch.Generator().manual_seed(6)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    width = sd.unet.input_blocks[4][1].transformer_blocks[0].attn1.to_q.weight.shape[0]
    processor, peft = {}, {}
    for proj, path in (("to_q", "to_q"), ("to_out", "to_out.0")):
        up, down = torch.randn(width, RANK, generator=g), torch.randn(RANK, width, generator=g)
        processor[f"unet.{name}.processor.{proj}_lora.up.weight"] = up
        processor[f"unet.{name}.processor.{proj}_lora.down.weight"] = down
        peft[f"unet.{name}.{path}.lora_B.weight"], peft[f"unet.{name}.{path}.lora_A.weight"] = up, down
    save_file(processor, str(tmp_path / "processor.safetensors"))
    save_file(peft, str(tmp_path / "peft.safetensors"))
    sd.load_lora(tmp_path / "processor.safetensors")
    via_processor = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    sd.unload_loras()
    sd.load_lora(tmp_path / "peft.safetensors")
    assert changed(via_processor, sd.unet.state_dict()) == 0
    assert not torch.equal(via_processor["input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"],
                           sd.unet.input_blocks[4][1].transformer_blocks[0].attn1.to_q.weight * 0)


# ---- bad files: one line, exit 2 -----------------------------------------------------------------------------

def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    from minisd.cli import main
    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_lora_files_and_names_give_one_line_and_exit_2(sd, checkpoint, tmp_path, capsys):
    g = torch.Generator()
    sdxl = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 1280, generator=g),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(1280, 4, generator=g)}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    wide = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 768, generator=g),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(768, 4, generator=g)}
    save_file(wide, str(tmp_path / "sd15.safetensors"))
    # A layer the tiny model has, and one (layer 7) it does not.
    stray = {f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj.lora_{part}.weight": torch.randn(*shape)
             for i in (0, 7) for part, shape in (("down", (4, 32)), ("up", (32, 4)))}
    save_file(stray, str(tmp_path / "stray.safetensors"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    common = ["generate", "a cat", "-m", str(checkpoint), "-W", "32", "-H", "32", "--steps", "1", "-o",
              str(tmp_path / "out.png")]
    for lora, phrase in (("sdxl", "another architecture"), ("sd15", "another architecture"),
                         ("stray", "match no layer"), ("corrupt", "corrupt")):
        code, err = run_cli(capsys, *common, "--lora", str(tmp_path / f"{lora}.safetensors:0.5"))
        assert code == 2 and len(err) == 1 and phrase in err[0], (lora, err)
    code, err = run_cli(capsys, "generate", "a cat <lora:nowhere:1>", *common[2:], "--lora-dir", str(tmp_path))
    assert code == 2 and len(err) == 1 and "unknown LoRA 'nowhere'" in err[0], err
    assert not (tmp_path / "out.png").exists()


def test_cli_lora_flag_is_recorded_in_the_prompt_and_hashes(checkpoint, tmp_path, capsys):
    from minisd.image import read_infotext
    from minisd.lora import lora_short_hash

    model = minisd.load(checkpoint, dtype=torch.float32)
    write_lora(tmp_path / "ink.safetensors", random_factors(model, seed=8), "kohya-diffusers")
    code, err = run_cli(capsys, "generate", "a cat", "-m", str(checkpoint), "-W", "32", "-H", "32", "--steps", "2",
                        "--lora", str(tmp_path / "ink.safetensors") + ":0.6", "-o", str(tmp_path / "out.png"),
                        "--dtype", "fp32", "--seed", "3")
    assert code == 0, err
    text = read_infotext(tmp_path / "out.png")
    assert text.splitlines()[0] == "a cat <lora:ink:0.6>"
    assert f'Lora hashes: "ink: {lora_short_hash(tmp_path / "ink.safetensors")}"' in text
    # --from-image finds the LoRA again in --lora-dir and makes the same image.
    code, err = run_cli(capsys, "generate", "--from-image", str(tmp_path / "out.png"), "-m", str(checkpoint),
                        "--lora-dir", str(tmp_path), "-o", str(tmp_path / "again.png"), "--dtype", "fp32")
    assert code == 0, err
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(Image.open(tmp_path / "again.png")))


# ---- SDXL: lora_te1_ (CLIP ViT-L), lora_te2_ (OpenCLIP bigG, fused q/k/v), sgm UNet paths ----------------------

def test_sdxl_kohya_lora_equals_diffusers(tmp_path):
    from diffusers import EulerDiscreteScheduler

    from minisd.testing import reference_family_pipeline

    config = PRESETS["tiny-sdxl"]
    write_checkpoint(tmp_path / "xl.safetensors", config, seed=12)
    model = minisd.load(tmp_path / "xl.safetensors", dtype=torch.float32)
    clip_l, big_g = model.text_encoder.embedders[0].transformer, model.text_encoder.embedders[1].model
    g = torch.Generator().manual_seed(13)
    state = {}

    def add(stem: str, shape) -> None:
        up, down = factors(tuple(shape), g)
        state[stem + ".lora_up.weight"], state[stem + ".lora_down.weight"], state[stem + ".alpha"] = \
            up, down, torch.tensor(3.0)

    unet_layers = {n: m.weight.shape for n, m in model.unet.named_modules()
                   if n.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_v", "attn1.to_out.0", "proj_in", "ff.net.2"))}
    for name, shape in unet_layers.items():
        add("lora_unet_" + name.replace(".", "_"), shape)
    for name, shape in text_layers_of(clip_l).items():
        add("lora_te1_" + name.replace(".", "_"), shape)
    width = big_g.config.width
    for i in range(big_g.config.layers):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            add(f"lora_te2_text_model_encoder_layers_{i}_self_attn_{proj}", (width, width))
        add(f"lora_te2_text_model_encoder_layers_{i}_mlp_fc1", (big_g.config.mlp_width, width))
        add(f"lora_te2_text_model_encoder_layers_{i}_mlp_fc2", (width, big_g.config.mlp_width))
    save_file(state, str(tmp_path / "xl-lora.safetensors"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_lora(tmp_path / "xl-lora.safetensors", 0.8)
    # Every adapted layer moved: UNet layers, CLIP-L layers, and per bigG block in_proj, out_proj, c_fc, c_proj.
    expected_changes = len(unet_layers) + len(text_layers_of(clip_l)) + 4 * big_g.config.layers
    assert changed(before, model.state_dict()) == expected_changes

    ref = reference_family_pipeline("StableDiffusionXLPipeline", tmp_path / "xl.safetensors", config, tmp_path,
                                    EulerDiscreteScheduler(**SD_SCHEDULER))
    ref.load_lora_weights(str(tmp_path), weight_name="xl-lora.safetensors", adapter_name="x")
    ref.fuse_lora(lora_scale=0.8)
    ref.unload_lora_weights()
    assert relative(model.unet.state_dict(), rename(ref.unet.state_dict(), unet_prefixes(config.unet),
                                                    to_original=True)) <= 1e-5
    theirs_l = {(k if k.startswith("text_model.") else "text_model." + k): v
                for k, v in ref.text_encoder.state_dict().items() if "position_ids" not in k}
    assert relative(clip_l.state_dict(), theirs_l) <= 1e-5
    theirs_g = ref.text_encoder_2.state_dict()
    level = "text_model." if any(k.startswith("text_model.") for k in theirs_g) else ""
    ours_g, mapped = {}, {}
    for i, block in enumerate(big_g.transformer.resblocks):
        hf = f"{level}encoder.layers.{i}."
        ours_g[f"{i}.in_proj"] = block.attn.in_proj_weight
        mapped[f"{i}.in_proj"] = torch.cat([theirs_g[hf + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        pairs = (("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))
        for ours, theirs in pairs:
            ours_g[f"{i}.{ours}"] = block.get_submodule(ours).weight
            mapped[f"{i}.{ours}"] = theirs_g[hf + theirs + ".weight"]
    assert relative(ours_g, mapped) <= 1e-5


# ---- LyCORIS LoHa and LoKr against PEFT's implementations -------------------------------------------------------

@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_loha_and_lokr_deltas_equal_peft(kind):
    """PEFT's LoHa/LoKr layers with random factors, merged; the same factors under LyCORIS' key names here."""
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    from minisd.lora import LoraLayer

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 32))
    original = base[0].weight.detach().clone()
    config = (LoHaConfig(r=4, alpha=6, target_modules=["0"]) if kind == "loha" else
              LoKrConfig(r=2, alpha=3, target_modules=["0"]))
    model = get_peft_model(base, config)
    parts = {"alpha": torch.tensor(6.0 if kind == "loha" else 3.0)}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".hada_" in name or ".lokr_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
                parts[name.split(".")[-2]] = param.detach().clone()
    if kind == "lokr":  # the case where LyCORIS and PEFT agree on the scale: w2 decomposed at rank r
        assert "lokr_w2_a" in parts and "lokr_w2_b" in parts
    merged = model.merge_and_unload()[0].weight.detach()
    delta = LoraLayer("layer", parts).delta()
    expected = merged - original
    assert ((delta - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_sd2_kohya_lora_reaches_the_fused_openclip_attention(tmp_path):
    """SD 2.x LoRAs name OpenCLIP's layers as Hugging Face CLIP's (q/k/v/out_proj, fc1/fc2), as diffusers' converted
    text encoder has them; q/k/v are rows of the fused in_proj here. (diffusers drops the last layer, which SD 2.x
    does not use, so the LoRA adapts the others.)"""
    from diffusers import EulerDiscreteScheduler

    from minisd.testing import reference_family_pipeline

    config = PRESETS["tiny-sd2"]
    write_checkpoint(tmp_path / "sd2.safetensors", config, seed=15)
    model = minisd.load(tmp_path / "sd2.safetensors", dtype=torch.float32)
    ref = reference_family_pipeline("StableDiffusionPipeline", tmp_path / "sd2.safetensors", config, tmp_path,
                                    EulerDiscreteScheduler(**SD_SCHEDULER))
    g = torch.Generator().manual_seed(16)
    state = {}
    for name, shape in text_layers_of(ref.text_encoder).items():
        up, down = factors(shape, g)
        stem = "lora_te_" + (name if name.startswith("text_model.") else "text_model." + name).replace(".", "_")
        state[stem + ".lora_up.weight"], state[stem + ".lora_down.weight"] = up, down
        state[stem + ".alpha"] = torch.tensor(2.0)
    save_file(state, str(tmp_path / "sd2-lora.safetensors"))
    params = GenerationParams(prompt="a red circle", negative_prompt="blue").validated()
    with torch.no_grad():
        before = model.conditioning(params)
    model.load_lora(tmp_path / "sd2-lora.safetensors", 0.9)
    ref.load_lora_weights(str(tmp_path), weight_name="sd2-lora.safetensors", adapter_name="x")
    ref.fuse_lora(lora_scale=0.9)
    ref.unload_lora_weights()
    with torch.no_grad():
        ours = model.conditioning(params)
        theirs = ref.encode_prompt("a red circle", "cpu", 1, True, negative_prompt="blue")
    for a, b, unadapted in zip(ours, theirs, before):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5
        assert ((a - unadapted).abs().max() / b.abs().max()).item() > 1e-2  # the LoRA did change it


def test_dora_and_half_files_are_refused_by_name(sd, tmp_path):
    stem = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({stem + ".lora_down.weight": torch.randn(4, 32), stem + ".lora_up.weight": torch.randn(32, 4),
               stem + ".dora_scale": torch.ones(32, 1)}, str(tmp_path / "dora.safetensors"))
    save_file({stem + ".lora_down.weight": torch.randn(4, 32)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(LoraError, match=f"{stem}: DoRA"):
        sd.load_lora(tmp_path / "dora.safetensors")
    with pytest.raises(LoraError, match="only one of the two LoRA factors"):
        sd.load_lora(tmp_path / "half.safetensors")
    assert sd.loras.loaded == []


def _refuse_multiplying(*args, **kwargs):
    raise AssertionError("a factor product was computed before its shape was checked")


@pytest.mark.parametrize("case,phrase", [
    ("loha-missing-w1b", "incomplete LoHa factors: hada_w1_b is missing"),
    ("lokr-missing-w2a", "incomplete LoKr factors: lokr_w2_a is missing"),
    ("lora-bomb", "delta has shape [100000, 100000]"),
    ("loha-broadcast", "the two LoHa products are [100000, 1] and [1, 100000]"),
    ("lokr-kron", "delta has shape [10000, 10000]"),
    ("locon-mid", "delta has shape [1000, 1000, 100, 100]"),
    ("down-3d", "down has shape [1000, 4, 32], a LoRA factor has 2 or 4 dimensions"),
    ("rank-0", "down has rank 0"),
])
def test_bad_factor_sets_are_refused_in_one_line_before_multiplying(sd, tmp_path, monkeypatch, case, phrase):
    """Incomplete LyCORIS sets and products far bigger than their layer (a 400 KB file asking for 40 GB): a
    LoraError from the factors' shapes alone; no matmul, einsum or kron runs."""
    te, conv = "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_input_blocks_0_0"
    z = torch.zeros
    files = {
        "loha-missing-w1b": {f"{te}.hada_w1_a": z(32, 2), f"{te}.hada_w2_a": z(32, 2), f"{te}.hada_w2_b": z(2, 32)},
        "lokr-missing-w2a": {f"{te}.lokr_w1": z(2, 2), f"{te}.lokr_w2_b": z(2, 16)},
        "lora-bomb": {f"{te}.lora_up.weight": z(100000, 1), f"{te}.lora_down.weight": z(1, 100000)},
        "loha-broadcast": {f"{te}.hada_w1_a": z(100000, 1), f"{te}.hada_w1_b": z(1, 1), f"{te}.hada_w2_a": z(1, 1),
                           f"{te}.hada_w2_b": z(1, 100000)},
        "lokr-kron": {f"{te}.lokr_w1": z(100, 100), f"{te}.lokr_w2": z(100, 100)},
        "locon-mid": {f"{conv}.lora_up.weight": z(1000, 1, 1, 1), f"{conv}.lora_mid.weight": z(1, 1, 100, 100),
                      f"{conv}.lora_down.weight": z(1, 1000, 1, 1)},
        "down-3d": {f"{te}.lora_up.weight": z(32, 4), f"{te}.lora_down.weight": z(1000, 4, 32)},
        "rank-0": {f"{te}.lora_up.weight": z(32, 0), f"{te}.lora_down.weight": z(0, 32), f"{te}.alpha": z(())},
    }
    save_file(files[case], str(tmp_path / "bad.safetensors"))
    for name in ("matmul", "einsum", "kron"):
        monkeypatch.setattr(torch, name, _refuse_multiplying)
    monkeypatch.setattr(torch.Tensor, "__matmul__", _refuse_multiplying)
    with pytest.raises(LoraError) as error:
        sd.load_lora(tmp_path / "bad.safetensors")
    assert phrase in str(error.value) and "\n" not in str(error.value)
    assert sd.loras.loaded == []


@pytest.mark.parametrize("kind", ["locon-mid", "loha-cp", "lokr-cp", "lokr-conv"])
def test_shape_from_factors_is_the_shape_of_the_delta_and_cp_forms_follow_lycoris(kind):
    """LoraLayer.shape() (no arithmetic) against the computed delta; the CP forms, contracted pairwise here to
    bound the intermediate, against LyCORIS' einsum formulas written out."""
    from minisd.lora import LoraLayer

    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(shape, generator=g)

    if kind == "locon-mid":
        parts = {"up": r(6, 3, 1, 1), "mid": r(3, 3, 3, 3), "down": r(3, 5, 1, 1), "alpha": torch.tensor(1.5)}
        expected = torch.einsum("oa,abhw,bi->oihw", parts["up"].flatten(1), parts["mid"],
                                parts["down"].flatten(1)) * 0.5
    elif kind == "loha-cp":
        parts = {"hada_t1": r(4, 4, 3, 3), "hada_w1_a": r(4, 6), "hada_w1_b": r(4, 5),
                 "hada_t2": r(4, 4, 3, 3), "hada_w2_a": r(4, 6), "hada_w2_b": r(4, 5)}
        expected = (torch.einsum("ijkl,jr,ip->prkl", parts["hada_t1"], parts["hada_w1_b"], parts["hada_w1_a"])
                    * torch.einsum("ijkl,jr,ip->prkl", parts["hada_t2"], parts["hada_w2_b"], parts["hada_w2_a"]))
    elif kind == "lokr-cp":
        parts = {"lokr_w1": r(2, 3), "lokr_t2": r(4, 4, 3, 3), "lokr_w2_a": r(4, 5), "lokr_w2_b": r(4, 7),
                 "alpha": torch.tensor(2.0)}
        w2 = torch.einsum("ijkl,jr,ip->prkl", parts["lokr_t2"], parts["lokr_w2_b"], parts["lokr_w2_a"]).contiguous()
        expected = torch.kron(parts["lokr_w1"][:, :, None, None], w2) * 0.5
    else:
        parts = {"lokr_w1": r(2, 3), "lokr_w2": r(4, 5, 3, 3)}
        expected = torch.kron(parts["lokr_w1"][:, :, None, None], parts["lokr_w2"])
    layer = LoraLayer("layer", parts)
    delta = layer.delta()
    assert layer.shape() == tuple(delta.shape) == tuple(expected.shape)
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5)
