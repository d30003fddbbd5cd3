"""Property tests (hypothesis) of the round trips: A1111 infotext format -> parse for any prompt and value text,
prompt emphasis parsing that never loses or invents a character, safetensors write -> read for any tensors,
and `minisd convert` file -> diffusers folder -> file."""
from __future__ import annotations

import math
import string

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from minisd.image import NEGATIVE_PREFIX, format_infotext, parse_infotext
from minisd.prompts import BREAK, EMPHASIS_MULTIPLIER, parse_prompt_attention

# Any text, including quotes, commas, colons, newlines and every plane of unicode (not lone surrogates,
# which no file or terminal can carry).
ANY_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=80) | st.text(
    st.sampled_from(' \t\r\n\x0b\x0c\x85\u2028\u3000,:"\\\'=()[]{}xyé🎨'), max_size=20)  # the awkward ones, often
KEYS = ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "Lora hashes",
        "Hires upscaler", "Denoising strength", "Version", "Emphasis"]


def canonical(text: str) -> str:
    """A prompt as the infotext format carries it (A1111's reader does the same): each line stripped of
    surrounding whitespace, empty lines at the start dropped; empty lines inside and at the end stay."""
    lines = [line.strip() for line in text.split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    return "\n".join(lines)


@settings(max_examples=300, deadline=None)
@given(prompt=ANY_TEXT, negative=ANY_TEXT,
       params=st.dictionaries(st.sampled_from(KEYS), ANY_TEXT | st.integers() | st.floats(allow_nan=False),
                              min_size=3, max_size=8))
def test_infotext_round_trip(prompt, negative, params):
    """The parameters come back exactly (as strings) whatever the prompts hold; the prompts come back as
    `canonical` text unless a prompt line itself starts with "Negative prompt:" (ambiguous in A1111 too)."""
    text = format_infotext(prompt, negative, params)
    got_prompt, got_negative, got_params = parse_infotext(text)
    assert got_params == {k: str(v) for k, v in params.items()}
    lines = [line.strip() for line in prompt.split("\n")]
    if not any(line.startswith(NEGATIVE_PREFIX) for line in lines):
        assert got_prompt == canonical(prompt)
        assert got_negative == canonical(negative)


# ---- emphasis -----------------------------------------------------------------------------------------------

PLAIN = st.text(st.sampled_from(string.ascii_letters + string.digits + " ,.!?-_'\"<>|éß🎨\n\t"), min_size=1,
                max_size=8).filter(lambda t: "BREAK" not in t)
ESCAPES = st.sampled_from(["\\(", "\\)", "\\[", "\\]", "\\\\"])


@st.composite
def prompt_tree(draw, depth: int = 0):
    """A prompt built from A1111's syntax with its meaning known by construction: a list of (text, weight)
    per literal character run, and the prompt string that says it."""
    pieces, source = [], []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["plain", "escape", "round", "weighted", "square"] if depth < 3 else ["plain"]))
        if kind == "plain":
            text = draw(PLAIN)
            pieces.append((text, 1.0))
            source.append(text)
        elif kind == "escape":
            escape = draw(ESCAPES)
            pieces.append((escape[1], 1.0))
            source.append(escape)
        else:
            inner_pieces, inner_source = draw(prompt_tree(depth + 1))
            if kind == "weighted":
                weight_text = draw(st.sampled_from(["0.5", "1.25", "2", "0", "-1", ".7", "1.0"]))
                factor, opening, closing = float(weight_text), "(", f":{weight_text})"
            elif kind == "round":
                factor, opening, closing = EMPHASIS_MULTIPLIER, "(", ")"
            else:
                factor, opening, closing = 1 / EMPHASIS_MULTIPLIER, "[", "]"
            pieces.extend((t, w * factor) for t, w in inner_pieces)
            source.append(opening + inner_source + closing)
    return pieces, "".join(source)


def per_character(pairs) -> list[tuple[str, float]]:
    return [(c, w) for text, w in pairs for c in text]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt_tree())
def test_emphasis_parsing_keeps_every_character_and_its_weight(tree):
    """Every literal character comes out once, in order, with the product of its brackets' factors; no syntax
    character leaks into the text and none is invented."""
    expected, source = tree
    parsed = parse_prompt_attention(source)
    assert BREAK not in parsed
    got = per_character(parsed)
    assert "".join(c for c, _ in got) == "".join(c for c, _ in per_character(expected))
    for (c, w), (_, want) in zip(got, per_character(expected)):
        assert math.isclose(w, want, rel_tol=1e-9, abs_tol=1e-12), (source, c, w, want)


@settings(max_examples=300, deadline=None)
@given(ANY_TEXT)
def test_emphasis_parsing_never_invents_characters(text):
    """On any text (unbalanced brackets included) the fragments are the text's characters, in order, minus
    syntax: a subsequence of the input, never anything else."""
    try:
        parsed = parse_prompt_attention(text)
    except ValueError:
        return  # "(a:1.2.3)": the documented refusal of a weight that is not a number
    out = "".join(f for f, w in parsed if (f, w) != BREAK)
    remaining = iter(text)
    assert all(c in remaining for c in out), (text, out)  # `in` on an iterator consumes it: a subsequence


@settings(max_examples=200, deadline=None)
@given(st.text(st.sampled_from(string.ascii_letters + " ,.:'\"🎨é"), max_size=60))
def test_text_without_brackets_is_one_fragment(text):
    """Without brackets, backslashes or BREAK the prompt is one fragment of weight 1, unchanged."""
    assume("BREAK" not in text)
    assert parse_prompt_attention(text) == [(text, 1.0)]


# ---- safetensors and convert --------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool]


@st.composite
def tensors(draw):
    out = {}
    for i in range(draw(st.integers(0, 5))):
        shape = draw(st.lists(st.integers(0, 4), max_size=4))
        dtype = draw(st.sampled_from(DTYPES))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
        value = torch.randn(shape, generator=g, dtype=torch.float64) * 100
        out[draw(st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12)) + str(i)] = \
            value.to(dtype) if dtype != torch.bool else value > 0
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=tensors(), metadata=st.dictionaries(st.text(max_size=10), ANY_TEXT, max_size=3))
def test_safetensors_write_read_round_trip(tmp_path_factory, state, metadata):
    """What minisd writes, minisd and the reference reader read back bit for bit, with its metadata."""
    from safetensors.torch import load_file

    from minisd.safetensors_file import SafetensorsFile, write_safetensors

    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    write_safetensors(state, path, metadata)
    file = SafetensorsFile(path)
    ours, reference = file.tensors(), load_file(str(path))
    assert file.metadata == metadata and ours.keys() == reference.keys() == state.keys()
    for key, value in state.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value) and torch.equal(reference[key], value)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(["fp32", "fp16", "bf16"]), seed=st.integers(0, 1000))
def test_convert_round_trip_with_explicit_dtype(tmp_path_factory, tiny_config, dtype, seed):
    """file -> diffusers folder -> file with --dtype D: every tensor equals the original cast to D."""
    from safetensors.torch import load_file

    from minisd.cli import DTYPES, main
    from minisd.testing import write_checkpoint

    tmp = tmp_path_factory.mktemp("convert")
    state = write_checkpoint(tmp / "x.safetensors", tiny_config, seed=seed)
    assert main(["convert", str(tmp / "x.safetensors"), str(tmp / "y"), "--dtype", dtype]) == 0
    assert main(["convert", str(tmp / "y"), str(tmp / "z.safetensors"), "--dtype", dtype]) == 0
    back = load_file(str(tmp / "z.safetensors"))
    position_ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert back.keys() - {position_ids} == state.keys() - {position_ids}
    for key, value in state.items():
        if key != position_ids:
            assert torch.equal(back[key], value.to(DTYPES[dtype])), key


@pytest.mark.parametrize("text", ["a (b:1.2.3) c"])
def test_a_weight_that_is_not_a_number_is_the_documented_value_error(text):
    with pytest.raises(ValueError, match="invalid emphasis weight"):
        parse_prompt_attention(text)
