"""Textual-inversion files in every format, used by name in prompts, against diffusers' `load_textual_inversion`
on the same files; A1111's chunk counting for multi-vector embeddings; bad files."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import minisd
from minisd.config import PRESETS
from minisd.embeddings import EmbeddingDatabase, EmbeddingError, read_embedding
from minisd.errors import ParameterError
from minisd.prompts import CHUNK_LENGTH, EMBEDDING_PLACEHOLDER_ID, encode_prompt, encode_prompt_pair, tokenize_prompt
from minisd.testing import SD_SCHEDULER, reference_pipeline, write_checkpoint

CONFIG = PRESETS["tiny"]
WIDTH = CONFIG.text.hidden_size


def vectors(n: int, seed: int, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.05


def write(path, kind: str, value: torch.Tensor) -> None:
    """An embedding file as each tool writes it."""
    if kind == "a1111-pt":  # A1111 .pt: a plain dict with the vectors under string_to_param["*"]
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": value}, "name": path.stem, "step": 3000,
                    "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "model"}, path)
    elif kind == "a1111-safetensors":
        save_file({"emb_params": value}, str(path))
    elif kind == "diffusers-bin":  # learned_embeds.bin: {token: (width,)} for one vector
        torch.save({f"<{path.stem}>": value[0] if value.shape[0] == 1 else value}, path)
    elif kind == "diffusers-safetensors":
        save_file({f"<{path.stem}>": value}, str(path))


FORMATS = {"a1111-pt": ".pt", "a1111-safetensors": ".safetensors", "diffusers-bin": ".bin",
           "diffusers-safetensors": ".safetensors"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ti-model") / "tiny.safetensors"
    write_checkpoint(path, CONFIG, seed=7)
    return path


@pytest.fixture(scope="module")
def sd(checkpoint):
    return minisd.load(checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    from diffusers import EulerDiscreteScheduler
    return reference_pipeline("StableDiffusionPipeline", checkpoint, CONFIG, tmp_path_factory.mktemp("reference"),
                              EulerDiscreteScheduler(**SD_SCHEDULER))


@pytest.mark.parametrize("kind", FORMATS)
def test_each_format_loads(tmp_path, kind):
    value = vectors(1 if kind == "diffusers-bin" else 3, seed=1)
    path = tmp_path / f"style{FORMATS[kind]}"
    write(path, kind, value)
    embedding = read_embedding(path)
    assert embedding.name == "style" and torch.equal(embedding.vectors, value)


def test_prompt_embeddings_equal_diffusers_load_textual_inversion(sd, reference, tmp_path):
    """Every format in one prompt (and one in the negative prompt), against diffusers' tokens added on the fly."""
    names = {}
    for i, kind in enumerate(FORMATS):
        name = f"concept{i}"
        value = vectors(1 if kind == "diffusers-bin" else i + 1, seed=10 + i)
        path = tmp_path / f"{name}{FORMATS[kind]}"
        write(path, kind, value)
        names[name] = path
        reference.load_textual_inversion(str(path), token=name)
    sd.embedding_dirs = [tmp_path]
    prompt = "a concept0 photo of concept2, concept1 in concept3 style"
    negative = "blurry concept2"
    cond, uncond = encode_prompt_pair(sd.text_encoder, sd.tokenizer, prompt, negative, embeddings=sd.embeddings)
    ref_cond, ref_uncond = reference.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
    try:
        for ours, theirs in ((cond, ref_cond), (uncond, ref_uncond)):
            assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5
        assert set(sd.embeddings.used) == set(names)
        # The infotext's "TI hashes": A1111's 12-digit short hashes of the files.
        from minisd.hashes import sha256_model
        assert sd.embeddings.infotext()["TI hashes"] == ", ".join(
            f"{name}: {sha256_model(path)[:12]}" for name, path in sorted(names.items()))
    finally:
        reference.unload_textual_inversion()


def test_multi_vector_embeddings_count_against_chunks_as_a1111(sd, tmp_path):
    """An embedding is never split: 72 tokens + a 4-vector embedding moves it whole to the next chunk; 71 + 4 fits."""
    save_file({"emb_params": vectors(4, seed=2)}, str(tmp_path / "quad.safetensors"))
    db = EmbeddingDatabase(sd.tokenizer, [tmp_path])
    words = " ".join(["cat"] * 72)
    first, second = tokenize_prompt(sd.tokenizer, f"{words} quad", embeddings=db)
    assert first.embeddings == [] and first.ids[1:73] == [sd.tokenizer.encode("cat", add_special_tokens=False)[0]] * 72
    assert [offset for offset, _ in second.embeddings] == [1]
    assert second.ids[1:5] == [EMBEDDING_PLACEHOLDER_ID] * 4
    (only,) = tokenize_prompt(sd.tokenizer, " ".join(["cat"] * 71) + " quad", embeddings=db)
    assert [offset for offset, _ in only.embeddings] == [72] and len(only.ids) == CHUNK_LENGTH + 2
    # The two-chunk prompt encodes to two 77-token chunks with the vectors spliced into the second.
    assert encode_prompt(sd.text_encoder, sd.tokenizer, f"{words} quad", embeddings=db).shape[1] == 2 * 77


def test_sdxl_embedding_gives_each_encoder_its_vectors(tmp_path):
    """clip_l vectors for CLIP ViT-L and clip_g for OpenCLIP bigG, picked by the encoders' widths."""
    save_file({"clip_l": vectors(2, 3, 768), "clip_g": vectors(2, 4, 1280)}, str(tmp_path / "xl.safetensors"))
    embedding = read_embedding(tmp_path / "xl.safetensors")
    assert embedding.vectors_for(1280, "clip_g").shape == (2, 1280)
    assert torch.equal(embedding.vectors, embedding.vectors_for(768, "clip_l"))
    with pytest.raises(ParameterError, match="width 768, 1280"):
        embedding.vectors_for(1024)


def test_bad_embeddings_are_refused_with_one_line(sd, checkpoint, tmp_path, capsys):
    from minisd.cli import main

    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(EmbeddingError):
        read_embedding(tmp_path / "no-such.pt")
    save_file({"emb_params": vectors(2, 5, 768)}, str(tmp_path / "wide.safetensors"))
    common = ["generate", "-m", str(checkpoint), "-W", "32", "-H", "32", "--steps", "1", "-o",
              str(tmp_path / "out.png"), "--embeddings-dir", str(tmp_path)]
    for prompt, phrase in (("a broken cat", "broken.pt"), ("a wide cat", "an embedding for another model")):
        code = main([common[0], prompt, *common[1:]])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and phrase in err[0], err
    assert not (tmp_path / "out.png").exists()


def test_sdxl_prompt_embeddings_equal_diffusers(tmp_path):
    """clip_l into CLIP ViT-L, clip_g into bigG, as diffusers' two `load_textual_inversion` calls. (The pooled
    vector is not compared: transformers finds the end token by the largest id, which diffusers' added tokens
    exceed; A1111 and minisd take the real end token.)"""
    from diffusers import EulerDiscreteScheduler

    from minisd.prompts import encode_sdxl_prompt_pair
    from minisd.testing import reference_family_pipeline

    config = PRESETS["tiny-sdxl"]
    write_checkpoint(tmp_path / "xl.safetensors", config, seed=14)
    model = minisd.load(tmp_path / "xl.safetensors", dtype=torch.float32)
    widths = (config.text.hidden_size, config.open_clip.width)
    clip_l, clip_g = vectors(3, 20, widths[0]), vectors(3, 21, widths[1])
    (tmp_path / "ti").mkdir()
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "ti" / "xlstyle.safetensors"))
    model.embedding_dirs = [tmp_path / "ti"]
    ref = reference_family_pipeline("StableDiffusionXLPipeline", tmp_path / "xl.safetensors", config, tmp_path,
                                    EulerDiscreteScheduler(**SD_SCHEDULER))
    ref.load_textual_inversion(clip_l, token="xlstyle", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(clip_g, token="xlstyle", text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    prompt, negative = "a xlstyle photo of a cat", "blurry xlstyle"
    (cond, _), (uncond, _) = encode_sdxl_prompt_pair(model.text_encoder, model.tokenizer, prompt, negative,
                                                     embeddings=model.embeddings)
    ref_cond, ref_uncond, _, _ = ref.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=True, negative_prompt=negative)
    for ours, theirs in ((cond, ref_cond), (uncond, ref_uncond)):
        assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5
