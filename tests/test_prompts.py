"""minisd.prompts: A1111's prompt syntax (expected values from its documented rules and docstring
examples), chunk packing with comma backtrack and BREAK, and conditioning through a tiny random CLIP
text encoder checked against transformers' CLIPTextModel with the same weights."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minisd.models.clip import CLIPTextConfig, CLIPTextModel
from minisd.prompts import (
    EMBEDDING_PLACEHOLDER_ID,
    apply_emphasis,
    encode_chunks,
    encode_prompt,
    encode_prompt_pair,
    parse_prompt_attention,
    tokenize_prompt,
)
from minisd.tokenizer import BOS_ID, EOS_ID, CLIPTokenizer

UP = 1.1
DOWN = 1 / 1.1


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, expected",
    [  # the examples of A1111's parse_prompt_attention docstring, floats included
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
    ],
)
def test_a1111_docstring_examples(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        # Weights: (x) ×1.1, [x] ÷1.1, (x:w) ×w; nesting multiplies, innermost bracket first.
        ("((a))", [("a", 1.0 * UP * UP)]),
        ("[[a]]", [("a", 1.0 * DOWN * DOWN)]),
        ("(a:1.5)", [("a", 1.5)]),
        ("(a: 1.5 )", [("a", 1.5)]),  # spaces around the weight are allowed
        ("(a:-1)", [("a", -1.0)]),
        ("(a:+.5) b", [("a", 0.5), (" b", 1.0)]),
        ("((a:2))", [("a", 2.0 * UP)]),
        ("[(a:2)]", [("a", 2.0 * DOWN)]),
        ("x (a [b] c) y", [("x ", 1.0), ("a ", UP), ("b", 1.0 * DOWN * UP), (" c", UP), (" y", 1.0)]),
        # Only round brackets take a weight; elsewhere the colon and number are text.
        ("[a:1.5]", [("a:1.5", DOWN)]),
        ("a:1.5", [("a:1.5", 1.0)]),
        ("time: 10:30", [("time: 10:30", 1.0)]),
        # Escapes: \( \) \[ \] \\ are literal; a backslash before anything else is dropped.
        ("\\(a\\)", [("(a)", 1.0)]),
        ("\\[a\\]", [("[a]", 1.0)]),
        ("a \\\\ b", [("a \\ b", 1.0)]),
        ("a\\b", [("ab", 1.0)]),
        ("(\\(a\\))", [("(a)", UP)]),
        # Unbalanced: closers with nothing open are text; openers still open at the end close there.
        (")a(", [(")a", 1.0)]),
        ("a) b]", [("a) b]", 1.0)]),
        ("a:1.2) b", [("a:1.2) b", 1.0)]),
        ("(a [b", [("a ", UP), ("b", 1.0 * UP * DOWN)]),
        ("[a (b", [("a ", DOWN), ("b", 1.0 * UP * DOWN)]),
        ("(a]", [("a]", UP)]),
        # Merging: neighbours of exactly equal weight join; 1.1*1.1 is not 1.21 in floating point.
        ("(a)(b:1.1)", [("ab", 1.1)]),
        ("((a))(b:1.21)", [("a", 1.0 * UP * UP), ("b", 1.21)]),
        ("(a)b(c)", [("a", UP), ("b", 1.0), ("c", UP)]),
        # Empty input and empty brackets give one empty fragment.
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
    ],
)
def test_weights_escapes_unbalanced_merging(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("a\nBREAK\tb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
        ("a BREAK", [("a", 1.0), ("BREAK", -1.0), ("", 1.0)]),
        ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("a, BREAK (b)", [("a,", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", 1.1)]),
        # Only the whole upper-case word separates.
        ("aBREAKb", [("aBREAKb", 1.0)]),
        ("a break b", [("a break b", 1.0)]),
        ("a BREAKING b", [("a BREAKING b", 1.0)]),
        # Inside brackets BREAK is reweighted like any fragment and so stops being a separator.
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ],
)
def test_break(text, expected):
    assert parse_prompt_attention(text) == expected


def test_bad_weight_is_an_error():
    with pytest.raises(ValueError, match="weight"):
        parse_prompt_attention("(a:1.2.3)")


# ---------------------------------------------------------------- chunks


def _content(chunk) -> list[int]:
    """The prompt tokens of a chunk: between BOS and the first EOS."""
    assert chunk.ids[0] == BOS_ID
    return chunk.ids[1 : chunk.ids.index(EOS_ID)]


def _words(n: int) -> str:
    """`n` distinct one-token words (checked by the tests that use them)."""
    return " ".join(["cat", "dog", "tree", "house", "red", "blue", "sky", "sun"][i % 8] for i in range(n))


def test_short_prompt_is_one_padded_chunk(tok):
    (chunk,) = tokenize_prompt(tok, "a photo of a cat")
    ids = tok.encode("a photo of a cat")
    assert chunk.ids == ids + [EOS_ID] * (77 - len(ids))
    assert chunk.weights == [1.0] * 77
    assert chunk.embeddings == []


def test_weights_follow_tokens(tok):
    (chunk,) = tokenize_prompt(tok, "a (red cat:1.5) on [grass]")
    red_cat = tok.encode("red cat", add_special_tokens=False)
    grass = tok.encode("grass", add_special_tokens=False)
    assert _content(chunk) == tok.encode("a red cat on grass", add_special_tokens=False)
    assert chunk.weights[:6] == [1.0, 1.0, 1.5, 1.5, 1.0, DOWN]
    assert len(red_cat) == 2 and len(grass) == 1
    assert chunk.weights[6:] == [1.0] * 71


def test_75_tokens_fit_76_do_not(tok):
    assert len(tok.encode(_words(75), add_special_tokens=False)) == 75
    (chunk,) = tokenize_prompt(tok, _words(75))
    assert chunk.ids[-1] == EOS_ID and EOS_ID not in chunk.ids[1:-1]
    first, second = tokenize_prompt(tok, _words(76))
    assert _content(first) == tok.encode(_words(75), add_special_tokens=False)
    assert _content(second) == tok.encode(_words(76), add_special_tokens=False)[75:]


@pytest.mark.parametrize("comma_at, moves", [(70, True), (55, True), (54, False), (74, False)])
def test_comma_backtrack(tok, comma_at, moves):
    """A1111: when a 76th token arrives and the chunk's last comma sits within 20 tokens of its end
    (75 - index <= 20), the tokens after the comma move to the next chunk."""
    text = f"{_words(comma_at)}, {_words(30)}"
    tokens = tok.encode(text, add_special_tokens=False)
    comma = tok.token_to_id(",</w>")
    assert tokens.index(comma) == comma_at and len(tokens) == comma_at + 31
    first, second = tokenize_prompt(tok, text)
    cut = comma_at + 1 if moves else 75  # a comma in the last slot leaves nothing to move
    assert _content(first) == tokens[:cut]
    assert first.ids[cut + 1 :] == [EOS_ID] * (76 - cut)
    assert _content(second) == tokens[cut:]
    (no_backtrack, _) = tokenize_prompt(tok, text, comma_backtrack=0)
    assert _content(no_backtrack) == tokens[:75]


TAGS = ", ".join(_words(5) for _ in range(24))  # 24 tags of 5 words: 6 * 24 - 1 = 143 tokens


def test_long_tag_prompt_splits_after_a_comma(tok):
    tokens = tok.encode(TAGS, add_special_tokens=False)
    assert len(tokens) == 143
    first, second = tokenize_prompt(tok, TAGS)
    # Commas sit at 5, 11, ..., 71, 77: when token 76 arrives the last is 4 back, so the chunk ends at 72.
    assert _content(first) == tokens[:72] and _content(second) == tokens[72:]
    assert first.ids[73:] == [EOS_ID] * 4 and second.ids[72:] == [EOS_ID] * 5
    first, second = tokenize_prompt(tok, TAGS, comma_backtrack=0)  # mid-tag split without it
    assert _content(first) == tokens[:75] and _content(second) == tokens[75:]


def test_comma_arriving_at_a_full_chunk_opens_the_next(tok):
    """In A1111 a comma is recorded before the full chunk closes, so it opens the next chunk, nothing
    moves back, and it does not count as that chunk's last comma."""
    text = ", ".join(_words(3) for _ in range(37))  # commas at 3, 7, ..., 71, 75, ...
    tokens = tok.encode(text, add_special_tokens=False)
    comma = tok.token_to_id(",</w>")
    assert tokens[75] == comma
    first, second = tokenize_prompt(tok, text)
    assert _content(first) == tokens[:75] and _content(second) == tokens[75:]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["cat", "dog", "tree", ",", "astronaut"]), max_size=260), st.integers(0, 30))
def test_packing_invariants(words, backtrack):
    """Any word/comma sequence: every chunk is 77 ids, no token is lost or reordered, and a chunk
    shorter than 75 (but the last) ends in a comma no more than `backtrack` slots from the end."""
    tok = CLIPTokenizer()
    text = " ".join(words)
    tokens = tok.encode(text, add_special_tokens=False)
    chunks = tokenize_prompt(tok, text, comma_backtrack=backtrack)
    assert all(len(c.ids) == len(c.weights) == 77 and c.ids[0] == BOS_ID and c.ids[-1] == EOS_ID for c in chunks)
    assert sum((_content(c) for c in chunks), []) == tokens
    comma = tok.token_to_id(",</w>")
    for chunk in chunks[:-1]:
        content = _content(chunk)
        if len(content) < 75:
            assert content[-1] == comma and 75 - (len(content) - 1) <= backtrack


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abc xyz,.!?-", min_size=1, max_size=30), st.floats(0.1, 3.0).map(lambda w: round(w, 2)))
def test_plain_text_in_brackets(text, weight):
    assert parse_prompt_attention(text) == [(text, 1.0)]
    assert parse_prompt_attention(f"({text})") == [(text, 1.1)]
    assert parse_prompt_attention(f"[{text}]") == [(text, 1 / 1.1)]
    assert parse_prompt_attention(f"({text}:{weight})") == [(text, weight)]


def test_break_starts_new_chunk(tok):
    a, b = tokenize_prompt(tok, "a red cat BREAK a blue dog")
    assert _content(a) == tok.encode("a red cat", add_special_tokens=False)
    assert _content(b) == tok.encode("a blue dog", add_special_tokens=False)
    empty, cat = tokenize_prompt(tok, "BREAK cat")  # A1111 closes the (empty) chunk anyway
    assert _content(empty) == [] and _content(cat) == tok.encode("cat", add_special_tokens=False)
    assert len(tokenize_prompt(tok, "cat BREAK")) == 1
    assert len(tokenize_prompt(tok, "(cat BREAK dog)")) == 1  # a reweighted BREAK is a word
    assert len(tokenize_prompt(tok, f"{_words(80)} BREAK cat")) == 3


def test_sd2_padding(tok):
    (chunk,) = tokenize_prompt(tok, "a cat", pad_id=0)
    assert chunk.ids == tok.encode("a cat") + [0] * 73


def test_emphasis_none_keeps_syntax_literal(tok):
    (chunk,) = tokenize_prompt(tok, "(a cat:1.5) BREAK dog", emphasis="None")
    assert _content(chunk) == tok.encode("(a cat:1.5) BREAK dog", add_special_tokens=False)
    assert set(chunk.weights) == {1.0}
    with pytest.raises(ValueError):
        tokenize_prompt(tok, "a", emphasis="Loud")  # type: ignore[arg-type]


@dataclass
class _Embedding:
    vectors: torch.Tensor


class _Lookup:
    """A stand-in for the textual-inversion registry: `trigger` (one token) means `embedding`."""

    def __init__(self, trigger: int, embedding: _Embedding):
        self.trigger, self.embedding = trigger, embedding

    def find(self, ids, position):
        return (self.embedding, 1) if ids[position] == self.trigger else None


def test_embedding_seam_reserves_slots_and_never_splits(tok):
    (horse,) = tok.encode("horse", add_special_tokens=False)
    emb = _Embedding(torch.zeros(4, 8))
    (chunk,) = tokenize_prompt(tok, "a (horse) dog", embeddings=_Lookup(horse, emb))
    a, dog = tok.encode("a dog", add_special_tokens=False)
    assert _content(chunk) == [a] + [EMBEDDING_PLACEHOLDER_ID] * 4 + [dog]
    assert chunk.weights[1:7] == [1.0, UP, UP, UP, UP, 1.0]
    assert chunk.embeddings == [(2, emb)]
    # 73 words, then the 4-vector embedding: it does not fit in the 2 slots left, so it moves whole.
    first, second = tokenize_prompt(tok, f"{_words(73)} horse", embeddings=_Lookup(horse, emb))
    assert len(_content(first)) == 73 and first.embeddings == []
    assert second.embeddings == [(1, emb)] and _content(second) == [EMBEDDING_PLACEHOLDER_ID] * 4
    # 70 words, a comma, the embedding fills slots 71-74; "dog" then triggers the comma backtrack and
    # the embedding moves with its slots.
    first, second = tokenize_prompt(tok, f"{_words(70)}, horse dog", embeddings=_Lookup(horse, emb))
    assert len(_content(first)) == 71 and first.embeddings == []
    assert second.embeddings == [(1, emb)] and _content(second) == [EMBEDDING_PLACEHOLDER_ID] * 4 + [dog]


# ---------------------------------------------------------------- conditioning


@pytest.fixture(scope="module")
def encoder() -> CLIPTextModel:
    """A tiny CLIP text encoder (the real vocabulary, 3 layers) with every weight perturbed."""
    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    model = CLIPTextModel(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def reference(encoder):
    """transformers' CLIPTextModel holding the same weights (HF names; transformers 5 drops the
    `text_model.` level in its module tree)."""
    transformers = pytest.importorskip("transformers")
    c = encoder.config
    config = transformers.CLIPTextConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings,
        hidden_act="quick_gelu",
        layer_norm_eps=c.layer_norm_eps,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    model = transformers.CLIPTextModel(config).eval()
    body = getattr(model, "text_model", model)
    body.load_state_dict({k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}, strict=True)
    return model, body.final_layer_norm


def _hf_hidden(reference, ids: list[int], clip_skip: int) -> torch.Tensor:
    model, final_norm = reference
    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.last_hidden_state if clip_skip == 1 else final_norm(out.hidden_states[-clip_skip])


@torch.no_grad()
def test_short_unweighted_prompt_is_the_encoder_output(encoder, tok, reference):
    text = "a photo of an astronaut riding a horse"
    padded = tok.encode(text) + [EOS_ID] * (77 - len(tok.encode(text)))
    cond = encode_prompt(encoder, tok, text)
    assert cond.shape == (1, 77, 32)
    assert torch.equal(cond, encoder(torch.tensor([padded])))
    torch.testing.assert_close(cond, _hf_hidden(reference, padded, 1), rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_clip_skip_is_earlier_layer_through_final_norm(encoder, tok, reference, clip_skip):
    text = "masterpiece, portrait of a knight"
    padded = tok.encode(text) + [EOS_ID] * (77 - len(tok.encode(text)))
    cond = encode_prompt(encoder, tok, text, clip_skip=clip_skip)
    torch.testing.assert_close(cond, _hf_hidden(reference, padded, clip_skip), rtol=1e-5, atol=1e-5)
    if clip_skip > 1:
        assert not torch.allclose(cond, encode_prompt(encoder, tok, text))


@torch.no_grad()
def test_weighted_prompt_by_hand(encoder, tok):
    """A1111 "Original": z * w per token, then z * (mean before / mean after) over the chunk."""
    text = "a (red:1.4) cat on [grass]"
    ids = tok.encode("a red cat on grass")
    ids += [EOS_ID] * (77 - len(ids))
    w = torch.ones(77)
    w[2], w[5] = 1.4, DOWN  # BOS, a, red, cat, on, grass
    z = encoder(torch.tensor([ids]))
    weighted = z * w[None, :, None]
    torch.testing.assert_close(encode_prompt(encoder, tok, text, emphasis="No norm"), weighted)
    expected = weighted * (z.mean() / weighted.mean())
    got = encode_prompt(encoder, tok, text)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.mean(), z.mean())
    torch.testing.assert_close(encode_prompt(encoder, tok, text, emphasis="Ignore"), z)


@torch.no_grad()
def test_long_prompt_chunks_are_encoded_separately(encoder, tok, reference):
    chunks = tokenize_prompt(tok, TAGS)
    cond = encode_prompt(encoder, tok, TAGS)
    assert len(chunks) == 2 and cond.shape == (1, 2 * 77, 32)
    for i, chunk in enumerate(chunks):
        hf = _hf_hidden(reference, chunk.ids, 1)
        torch.testing.assert_close(cond[:, 77 * i : 77 * (i + 1)], hf, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_emphasis_normalises_each_chunk(encoder, tok):
    text = f"(({_words(40)})) BREAK [{_words(10)}]"
    chunks = tokenize_prompt(tok, text)
    plain = torch.cat([encoder(torch.tensor([c.ids])) for c in chunks], dim=1)
    cond = encode_prompt(encoder, tok, text)
    for i in range(2):
        torch.testing.assert_close(cond[:, 77 * i : 77 * (i + 1)].mean(), plain[:, 77 * i : 77 * (i + 1)].mean())


@torch.no_grad()
def test_cond_uncond_padded_with_empty_prompt(encoder, tok):
    long_text = f"{_words(60)} BREAK {_words(10)}"
    empty = encode_prompt(encoder, tok, "")
    cond, uncond = encode_prompt_pair(encoder, tok, long_text, "blurry")
    assert cond.shape == uncond.shape == (1, 154, 32)
    torch.testing.assert_close(cond, encode_prompt(encoder, tok, long_text))
    torch.testing.assert_close(uncond, torch.cat([encode_prompt(encoder, tok, "blurry"), empty], dim=1))
    cond, uncond = encode_prompt_pair(encoder, tok, "a cat", long_text)  # the other way round
    torch.testing.assert_close(cond, torch.cat([encode_prompt(encoder, tok, "a cat"), empty], dim=1))
    cond, uncond = encode_prompt_pair(encoder, tok, "a cat", "a dog")
    assert cond.shape == uncond.shape == (1, 77, 32)


@torch.no_grad()
def test_device_dtype_and_sd2_padding_reach_the_encoder(encoder, tok):
    half = CLIPTextModel(encoder.config).to(torch.bfloat16)
    half.load_state_dict(encoder.state_dict())
    cond = encode_prompt(half, tok, "a (cat:1.3)")
    assert cond.dtype == torch.bfloat16
    padded = tok.encode("a cat") + [0] * 73
    torch.testing.assert_close(encode_prompt(encoder, tok, "a cat", pad_id=0), encoder(torch.tensor([padded])))


def test_apply_emphasis_original_restores_mean():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 77, 8, generator=g) + 0.5
    w = 1 + torch.rand(2, 77, generator=g)
    out = apply_emphasis(z, w)
    torch.testing.assert_close(out.mean(dim=(1, 2)), z.mean(dim=(1, 2)))
    torch.testing.assert_close(out / out.mean(dim=(1, 2), keepdim=True), z * w[..., None] / (z * w[..., None]).mean(dim=(1, 2), keepdim=True))


def test_embedding_vectors_take_the_place_of_their_tokens(encoder, tok):
    """An embedding whose vectors are the token embeddings of "big horse" encodes exactly as those words."""
    (horse,) = tok.encode("horse", add_special_tokens=False)
    table = encoder.text_model.embeddings.token_embedding.weight
    vectors = table[tok.encode("big horse", add_special_tokens=False)].clone()
    chunks = tokenize_prompt(tok, "a horse", embeddings=_Lookup(horse, _Embedding(vectors)))
    with torch.no_grad():
        assert torch.equal(encode_chunks(encoder, chunks), encode_chunks(encoder, tokenize_prompt(tok, "a big horse")))
