"""TAESD against diffusers' AutoencoderTiny with the same random weights, in the published file layout
(taesd_encoder / taesd_decoder, .safetensors and .pth) and in diffusers' own; then as the pipeline's decoder."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import minisd
from minisd.config import PRESETS
from minisd.errors import CheckpointError
from minisd.models.taesd import read_taesd
from minisd.testing import write_checkpoint

WIDTH = 16


@pytest.fixture(scope="module")
def reference():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    model = AutoencoderTiny(encoder_block_out_channels=(WIDTH,) * 4, decoder_block_out_channels=(WIDTH,) * 4,
                            num_encoder_blocks=(1, 2, 1, 2), num_decoder_blocks=(2, 1, 2, 1)).eval()
    with torch.no_grad():  # every weight perturbed: default inits leave no bias non-zero pattern to catch swaps
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def published_files(reference, folder, suffix: str):
    """The layout of madebyollin/taesd: two bare nn.Sequential state dicts; the decoder's index 0 is the clamp."""
    state = reference.state_dict()
    encoder = {k[len("encoder.layers."):]: v for k, v in state.items() if k.startswith("encoder.layers.")}
    decoder = {}
    for k, v in state.items():
        if k.startswith("decoder.layers."):
            index, rest = k[len("decoder.layers."):].split(".", 1)
            decoder[f"{int(index) + 1}.{rest}"] = v
    paths = folder / f"taesd_encoder{suffix}", folder / f"taesd_decoder{suffix}"
    for path, part in zip(paths, (encoder, decoder)):
        if suffix == ".safetensors":
            save_file(part, str(path))
        else:
            torch.save(part, path)
    return paths


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("layout", ["published-safetensors", "published-pth", "diffusers"])
def test_decode_and_encode_equal_diffusers(reference, tmp_path, layout):
    if layout == "diffusers":
        reference.save_pretrained(tmp_path / "tiny")
        ours = read_taesd(tmp_path / "tiny")
        encoder = decoder = ours
    else:
        enc_path, dec_path = published_files(reference, tmp_path, ".safetensors" if "safetensors" in layout else ".pth")
        encoder, decoder = read_taesd(enc_path), read_taesd(dec_path)
        assert decoder.encoder is None and encoder.decoder is None
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 6, 5, generator=g) * 2
    images = torch.rand(2, 3, 48, 40, generator=g) * 2 - 1
    with torch.no_grad():
        assert relative(decoder.decode(latents), reference.decode(latents).sample) <= 1e-5
        assert relative(encoder.encode(images), reference.encode(images).latents) <= 1e-5


def test_a_file_that_is_not_taesd_is_refused(tmp_path):
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="not a TAESD file"):
        read_taesd(tmp_path / "vae.safetensors")


# ---- in the pipeline: TAESD decodes, and full VAE files swap in from every container --------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae-swap")
    write_checkpoint(folder / "a.safetensors", PRESETS["tiny"], seed=31)
    write_checkpoint(folder / "b.safetensors", PRESETS["tiny"], seed=32)
    return folder


def test_taesd_decodes_the_pipelines_latents(tiny_model, reference, tmp_path):
    sd = minisd.load(tiny_model / "a.safetensors", dtype=torch.float32)
    options = dict(width=32, height=24, steps=2, seed=5, sampler="Euler")
    latents = sd.txt2img("a cat", output="latent", **options)
    _, decoder_file = published_files(reference, tmp_path, ".safetensors")
    sd.load_vae(decoder_file)  # recognised as TAESD by its keys
    (image,) = sd.txt2img("a cat", **options)
    with torch.no_grad():
        expected = reference.decode(latents).sample.clamp(-1, 1)
    expected = ((expected[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    import numpy as np
    assert np.abs(np.asarray(image, dtype=np.int16) - expected.astype(np.int16)).max() <= 1
    text = image.info["parameters"]
    from minisd.hashes import sha256_model
    assert f"VAE hash: {sha256_model(decoder_file)[:10]}, VAE: taesd_decoder.safetensors" in text


@pytest.mark.parametrize("container", ["safetensors", "ckpt", "diffusers-folder", "whole-checkpoint"])
def test_vae_swap_from_every_container(tiny_model, tmp_path, container):
    """Model A with the VAE file of model B decodes exactly as model B itself."""
    a = minisd.load(tiny_model / "a.safetensors", dtype=torch.float32)
    b = minisd.load(tiny_model / "b.safetensors", dtype=torch.float32)
    vae_state = {k: v.clone() for k, v in b.vae.state_dict().items()}
    if container == "safetensors":
        path = tmp_path / "vae.safetensors"
        save_file(vae_state, str(path))
    elif container == "ckpt":  # as the SD 1.5 "ft-MSE" VAE ships: {"state_dict": ...} with loss weights beside
        path = tmp_path / "vae.ckpt"
        torch.save({"state_dict": {**vae_state, "loss.logvar": torch.zeros(())}}, path)
    elif container == "diffusers-folder":
        b.save(tmp_path / "b-diffusers")
        path = tmp_path / "b-diffusers" / "vae"
    else:
        path = tiny_model / "b.safetensors"
    a.load_vae(path)
    z = torch.randn(1, 4, 3, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.decode_latents(z), b.decode_latents(z))


def test_a_vae_for_another_model_is_refused_with_one_line(tiny_model, tmp_path, capsys):
    from minisd.cli import main

    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, str(tmp_path / "odd.safetensors"))
    code = main(["generate", "a cat", "-m", str(tiny_model / "a.safetensors"), "-W", "32", "-H", "32", "--steps", "1",
                 "-o", str(tmp_path / "out.png"), "--vae", str(tmp_path / "odd.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a VAE file" in err[0], err


def test_cli_records_the_vae_and_from_image_finds_it_again(tiny_model, reference, tmp_path, capsys):
    from minisd.cli import main
    from minisd.image import read_infotext

    _, decoder_file = published_files(reference, tmp_path, ".safetensors")
    common = ["-m", str(tiny_model / "a.safetensors"), "--dtype", "fp32"]
    assert main(["generate", "a cat", *common, "-W", "32", "-H", "32", "--steps", "2", "--seed", "4",
                 "-o", str(tmp_path / "first.png"), "--vae", "taesd", str(decoder_file)]) == 0
    assert "VAE: taesd_decoder.safetensors" in read_infotext(tmp_path / "first.png")
    assert main(["generate", "--from-image", str(tmp_path / "first.png"), *common, "--vae-dir", str(tmp_path),
                 "-o", str(tmp_path / "again.png")]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "first.png").tobytes() == Image.open(tmp_path / "again.png").tobytes()
    capsys.readouterr()
