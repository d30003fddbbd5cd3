"""A1111 prompt syntax -> weighted 77-token chunks -> text-encoder conditioning of any length.

`parse_prompt_attention(text)` reads (emphasis), [de-emphasis], (text:weight), escapes and BREAK.
`tokenize_prompt(tokenizer, text)` packs the weighted tokens into `PromptChunk`s of 75 (+ BOS/EOS).
`encode_prompt(text_encoder, tokenizer, text)` runs each chunk through the encoder and joins them:
(1, 77·k, D). `encode_prompt_pair(...)` encodes prompt and negative prompt with equal chunk counts.
A1111's prompt editing `[a:b:n]`, alternation `[a|b]` and `AND` are scheduling syntax, not handled here.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence

import torch

from .tokenizer import BOS_ID, EOS_ID, CLIPTokenizer

CHUNK_LENGTH = 75  # prompt tokens per chunk; with BOS and EOS the text encoder's 77
COMMA_BACKTRACK = 20  # A1111's default "comma padding backtrack"
EMPHASIS_MULTIPLIER = 1.1  # (x) multiplies by this, [x] divides by it
# Slots a textual-inversion embedding will fill carry this id until the encoder splices its vectors in.
EMBEDDING_PLACEHOLDER_ID = 0

Emphasis = Literal["Original", "No norm", "Ignore", "None"]
EMPHASIS_MODES: tuple[str, ...] = ("Original", "No norm", "Ignore", "None")

# One syntax token per match, tried in this order (A1111's grammar).
_ATTENTION = re.compile(
    r"""
      \\[()\[\]\\]             # escaped bracket or backslash: that character, literally
    | \\                       # any other backslash: dropped
    | \(                       # opens emphasis
    | \[                       # opens de-emphasis
    | :\s*([+-]?[.\d]+)\s*\)   # closes a round bracket with an explicit weight
    | \)
    | \]
    | [^\\()\[\]:]+            # plain text
    | :                        # a colon that starts no weight
    """,
    re.VERBOSE,
)
# A1111's extra-network syntax `<kind:arg:arg>` (`<lora:name:0.8>`): applied to the model (lora.py), never tokenized.
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def extract_extra_networks(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """`text` without its `<kind:args>` tags, and the tags as (kind, args split at ":")."""
    found: list[tuple[str, list[str]]] = []

    def take(match: re.Match) -> str:
        found.append((match.group(1), match.group(2).split(":")))
        return ""

    return EXTRA_NETWORK.sub(take, text), found


_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
BREAK = ("BREAK", -1.0)  # what parse_prompt_attention yields between BREAK-separated parts


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split `text` into (fragment, weight) pairs by A1111's rules: `(x)` ×1.1, `[x]` ÷1.1, `(x:w)` ×w,
    nesting multiplies, `\\( \\) \\[ \\] \\\\` are literal, unclosed brackets close at the end,
    neighbours of equal weight merge, and a standalone `BREAK` yields ("BREAK", -1.0).

    A BREAK inside brackets gets its weight multiplied and so becomes the literal word "BREAK", as in A1111.
    """
    parts: list[list[Any]] = []  # [fragment, weight]; weights are updated in place as brackets close
    round_open: list[int] = []  # index in `parts` where each open bracket began
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        # Multiplying every fragment at its bracket's close (not a running product) keeps A1111's
        # exact floats, which decide the merging below: ((x)) is 1.1*1.1, not 1.21.
        for part in parts[start:]:
            part[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(parts))
        elif token == "[":
            square_open.append(len(parts))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                raise ValueError(f"invalid emphasis weight {weight!r} in prompt {text!r}") from None
            scale_from(round_open.pop(), factor)
        elif token == ")" and round_open:
            scale_from(round_open.pop(), EMPHASIS_MULTIPLIER)
        elif token == "]" and square_open:
            scale_from(square_open.pop(), 1 / EMPHASIS_MULTIPLIER)
        else:  # text, or a closing bracket / weight with nothing open: literal text
            for i, piece in enumerate(_BREAK.split(token)):
                if i:
                    parts.append(list(BREAK))
                parts.append([piece, 1.0])

    for start in round_open:
        scale_from(start, EMPHASIS_MULTIPLIER)
    for start in square_open:
        scale_from(start, 1 / EMPHASIS_MULTIPLIER)

    merged: list[list[Any]] = []
    for part in parts or [["", 1.0]]:
        if merged and merged[-1][1] == part[1]:
            merged[-1][0] += part[0]
        else:
            merged.append(part)
    return [(fragment, weight) for fragment, weight in merged]


class TextualInversion(Protocol):
    """A learned embedding: `vectors` (n, hidden) replace n token embeddings of the prompt."""

    vectors: torch.Tensor


class EmbeddingLookup(Protocol):
    """Finds textual-inversion triggers in a fragment's token ids (implemented by a later issue)."""

    def find(self, ids: Sequence[int], position: int) -> tuple[TextualInversion, int] | None:
        """The embedding whose trigger starts at `ids[position]` and how many ids the trigger spans."""


@dataclass
class PromptChunk:
    """One text-encoder input: `ids` and per-token `weights` (77 each: BOS, 75 tokens padded, EOS)
    and the textual-inversion `embeddings` to splice in, as (offset in ids, embedding)."""

    ids: list[int]
    weights: list[float]
    embeddings: list[tuple[int, TextualInversion]] = field(default_factory=list)


class _ChunkPacker:
    """Fills chunks token by token with A1111's rules: when a chunk is full and its last comma lies
    within `comma_backtrack` tokens of the end, the tokens after that comma move to the next chunk."""

    def __init__(self, comma_id: int, comma_backtrack: int, pad_id: int):
        self.comma_id, self.comma_backtrack, self.pad_id = comma_id, comma_backtrack, pad_id
        self.chunks: list[PromptChunk] = []
        self._start_chunk()

    def _start_chunk(self) -> None:
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.embeddings: list[tuple[int, TextualInversion]] = []
        self.last_comma = -1

    def close_chunk(self) -> None:
        """Pad the current chunk with EOS to 75, wrap it in BOS/EOS, and start a new one."""
        fill = CHUNK_LENGTH - len(self.ids)
        ids = [BOS_ID, *self.ids, *[EOS_ID] * fill, EOS_ID]
        if self.pad_id != EOS_ID:
            # SD 2.x pads after the first EOS with `pad_id` (A1111 looks for the first EOS, so an EOS
            # typed into the prompt ends it there too).
            first_eos = ids.index(EOS_ID)
            ids[first_eos + 1 :] = [self.pad_id] * (len(ids) - first_eos - 1)
        self.chunks.append(PromptChunk(ids, [1.0, *self.weights, *[1.0] * fill, 1.0], self.embeddings))
        self._start_chunk()

    def _make_room(self, token: int) -> None:
        """Track commas, apply the backtrack, and close a full chunk before `token` is placed."""
        if token == self.comma_id:
            self.last_comma = len(self.ids)
        elif (
            self.comma_backtrack
            and len(self.ids) == CHUNK_LENGTH
            and self.last_comma != -1
            and len(self.ids) - self.last_comma <= self.comma_backtrack
        ):
            cut = self.last_comma + 1
            moved_ids, moved_weights = self.ids[cut:], self.weights[cut:]
            # Embeddings after the comma move with their slots (A1111 leaves them behind, misplaced).
            moved_embeddings = [(offset - cut, e) for offset, e in self.embeddings if offset > cut]
            self.embeddings = [(offset, e) for offset, e in self.embeddings if offset <= cut]
            del self.ids[cut:], self.weights[cut:]
            self.close_chunk()
            self.ids, self.weights, self.embeddings = moved_ids, moved_weights, moved_embeddings
        if len(self.ids) == CHUNK_LENGTH:
            self.close_chunk()

    def add_token(self, token: int, weight: float) -> None:
        self._make_room(token)
        self.ids.append(token)
        self.weights.append(weight)

    def add_embedding(self, first_token: int, embedding: TextualInversion, weight: float) -> None:
        """Place an embedding whose trigger begins with `first_token`; it is never split across
        chunks: if it does not fit, it starts the next one."""
        n = int(embedding.vectors.shape[0])
        if n > CHUNK_LENGTH:
            raise ValueError(f"an embedding of {n} vectors does not fit in a chunk of {CHUNK_LENGTH}")
        self._make_room(first_token)
        if len(self.ids) + n > CHUNK_LENGTH:
            self.close_chunk()
        self.embeddings.append((len(self.ids) + 1, embedding))  # +1: BOS precedes the tokens
        self.ids.extend([EMBEDDING_PLACEHOLDER_ID] * n)
        self.weights.extend([weight] * n)

    def finish(self) -> list[PromptChunk]:
        if self.ids or not self.chunks:
            self.close_chunk()
        return self.chunks


def tokenize_prompt(
    tokenizer: CLIPTokenizer,
    text: str,
    *,
    emphasis: Emphasis = "Original",
    comma_backtrack: int = COMMA_BACKTRACK,
    pad_id: int = EOS_ID,
    embeddings: EmbeddingLookup | None = None,
) -> list[PromptChunk]:
    """Parse `text` (literally if `emphasis="None"`), tokenize each fragment without specials, and
    pack the tokens into chunks of 77; BREAK starts a new chunk. `pad_id` 0 gives SD 2.x padding."""
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis must be one of {EMPHASIS_MODES}, got {emphasis!r}")
    text = extract_extra_networks(text)[0]
    fragments = parse_prompt_attention(text) if emphasis != "None" else [(text, 1.0)]
    packer = _ChunkPacker(tokenizer.token_to_id(",</w>"), comma_backtrack, pad_id)
    for fragment, weight in fragments:
        if (fragment, weight) == BREAK:
            packer.close_chunk()  # even an empty chunk: a leading BREAK gives an all-padding chunk, as in A1111
            continue
        ids = tokenizer.encode(fragment, add_special_tokens=False)
        position = 0
        while position < len(ids):
            found = embeddings.find(ids, position) if embeddings is not None else None
            if found is None:
                packer.add_token(ids[position], weight)
                position += 1
            else:
                embedding, span = found
                packer.add_embedding(ids[position], embedding, weight)
                position += span
    return packer.finish()


def apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor, emphasis: Emphasis = "Original") -> torch.Tensor:
    """Scale each token's hidden state (k, 77, D) by its weight (k, 77). "Original" then rescales each
    chunk so its mean over tokens and channels is unchanged (A1111 takes that mean over the prompts it
    encodes together, the same for one prompt); "No norm" does not; "Ignore" and "None" leave them."""
    if emphasis in ("Ignore", "None"):
        return hidden
    # Weights stay float32, so a half-precision chunk is reweighted in float32 (as A1111 does) and
    # then cast back.
    weighted = hidden * weights.to(device=hidden.device, dtype=torch.float32)[..., None]
    if emphasis == "Original":
        old_mean = hidden.mean(dim=(1, 2), keepdim=True)
        weighted = weighted * (old_mean / weighted.mean(dim=(1, 2), keepdim=True))
    return weighted.to(hidden.dtype)


@contextmanager
def spliced_embeddings(text_encoder: torch.nn.Module, chunks: Sequence[PromptChunk]):
    """While active, every token-embedding layer of `text_encoder` (one per encoder; SDXL has two) puts the chunks'
    textual-inversion vectors into their placeholder slots, before position embeddings are added, as A1111 does.
    Chunk i must be row i of the batch the encoder sees. An embedding offers `vectors_for(width, encoder)` when it
    holds vectors for several encoders (SDXL's "clip_l": the CLIP model, "clip_g": OpenCLIP), else its `vectors`."""
    fixes = [(row, offset, embedding) for row, chunk in enumerate(chunks) for offset, embedding in chunk.embeddings]
    if not fixes:
        yield
        return

    def splice(module: torch.nn.Module, inputs, output: torch.Tensor, encoder: str = "") -> torch.Tensor:
        output = output.clone()
        for row, offset, embedding in fixes:
            pick = getattr(embedding, "vectors_for", None)
            vectors = pick(output.shape[-1], encoder) if pick is not None else embedding.vectors
            n = min(output.shape[1] - offset, vectors.shape[0])
            output[row, offset:offset + n] = vectors[:n].to(device=output.device, dtype=output.dtype)
        return output

    def hook(encoder: str):
        return lambda module, inputs, output: splice(module, inputs, output, encoder)

    # Hugging Face's CLIP layout (`text_model.embeddings.token_embedding`) is CLIP ViT-L; OpenCLIP's is bare.
    handles = [module.register_forward_hook(hook("clip_l" if name.endswith("embeddings.token_embedding") else "clip_g"))
               for name, module in text_encoder.named_modules()
               if isinstance(module, torch.nn.Embedding) and name.split(".")[-1] == "token_embedding"]
    if not handles:
        raise NotImplementedError("textual-inversion embeddings need a text encoder with a `token_embedding` layer")
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def encode_chunks(
    text_encoder: torch.nn.Module,
    chunks: Sequence[PromptChunk],
    *,
    clip_skip: int = 1,
    emphasis: Emphasis = "Original",
) -> torch.Tensor:
    """Run the chunks through the text encoder (as one batch; chunks never attend to each other),
    apply emphasis, and join them along the token axis: (1, 77·k, D)."""
    param = next(text_encoder.parameters())
    ids = torch.tensor([chunk.ids for chunk in chunks], dtype=torch.long, device=param.device)
    weights = torch.tensor([chunk.weights for chunk in chunks], dtype=torch.float32)
    with spliced_embeddings(text_encoder, chunks):
        hidden = apply_emphasis(text_encoder(ids, clip_skip=clip_skip), weights, emphasis)
    return hidden.reshape(1, -1, hidden.shape[-1])  # (k, 77, D) -> (1, 77·k, D)


def encode_prompt(
    text_encoder: torch.nn.Module,
    tokenizer: CLIPTokenizer,
    text: str,
    *,
    clip_skip: int = 1,
    emphasis: Emphasis = "Original",
    comma_backtrack: int = COMMA_BACKTRACK,
    pad_id: int = EOS_ID,
    embeddings: EmbeddingLookup | None = None,
) -> torch.Tensor:
    """Conditioning for one prompt of any length: (1, 77·k, D) for k chunks."""
    chunks = tokenize_prompt(tokenizer, text, emphasis=emphasis, comma_backtrack=comma_backtrack, pad_id=pad_id,
                             embeddings=embeddings)
    return encode_chunks(text_encoder, chunks, clip_skip=clip_skip, emphasis=emphasis)


def pad_to_same_length(cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append copies of `empty` (an encoded empty prompt, (1, 77, D)) to the shorter of `cond` and
    `uncond` until both have the same number of chunks, so guidance can batch them."""
    missing = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
    if missing > 0:
        uncond = torch.cat([uncond, empty.expand(uncond.shape[0], -1, -1).repeat(1, missing, 1)], dim=1)
    elif missing < 0:
        cond = torch.cat([cond, empty.expand(cond.shape[0], -1, -1).repeat(1, -missing, 1)], dim=1)
    return cond, uncond


def encode_prompt_pair(
    text_encoder: torch.nn.Module,
    tokenizer: CLIPTokenizer,
    prompt: str,
    negative_prompt: str = "",
    *,
    clip_skip: int = 1,
    emphasis: Emphasis = "Original",
    comma_backtrack: int = COMMA_BACKTRACK,
    pad_id: int = EOS_ID,
    embeddings: EmbeddingLookup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) for classifier-free guidance, each (1, 77·k, D) with the same k: the shorter is
    padded with the encoded empty prompt (A1111's "pad prompt/negative prompt to same length")."""
    options = dict(clip_skip=clip_skip, emphasis=emphasis, comma_backtrack=comma_backtrack, pad_id=pad_id,
                   embeddings=embeddings)
    cond = encode_prompt(text_encoder, tokenizer, prompt, **options)
    uncond = encode_prompt(text_encoder, tokenizer, negative_prompt, **options)
    if cond.shape[1] == uncond.shape[1]:
        return cond, uncond
    empty = encode_prompt(text_encoder, tokenizer, "", **options)
    return pad_to_same_length(cond, uncond, empty)


# ---- SDXL: two encoders on the same chunks ------------------------------------------------------------------

def zero_padded(ids: list[int]) -> list[int]:
    """OpenCLIP's padding of a chunk: 0 after the first end-of-text token (A1111's rule, as `close_chunk`)."""
    first_eos = ids.index(EOS_ID)
    return ids[: first_eos + 1] + [0] * (len(ids) - first_eos - 1)


def encode_sdxl_prompt(
    text_encoders: torch.nn.Module,
    tokenizer: CLIPTokenizer,
    text: str,
    *,
    clip_skip: int = 1,
    emphasis: Emphasis = "Original",
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: EmbeddingLookup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning of one prompt: context (1, 77·k, 768 + 1280), the encoders' outputs side by side, each
    with its own emphasis (A1111 wraps each embedder separately), and bigG's pooled embedding of the first
    chunk (1, 1280), which emphasis does not touch. `text_encoders` is models.conditioner.SDXLTextEncoders."""
    chunks = tokenize_prompt(tokenizer, text, emphasis=emphasis, comma_backtrack=comma_backtrack, embeddings=embeddings)
    device = next(text_encoders.parameters()).device
    eos_ids = torch.tensor([chunk.ids for chunk in chunks], dtype=torch.long, device=device)
    zero_ids = torch.tensor([zero_padded(chunk.ids) for chunk in chunks], dtype=torch.long, device=device)
    weights = torch.tensor([chunk.weights for chunk in chunks], dtype=torch.float32)
    with spliced_embeddings(text_encoders, chunks):
        hidden, pooled = text_encoders(eos_ids, zero_ids, clip_skip=clip_skip)
    context = torch.cat([apply_emphasis(h, weights, emphasis) for h in hidden], dim=-1)
    return context.reshape(1, -1, context.shape[-1]), pooled[:1]


def encode_sdxl_prompt_pair(
    text_encoders: torch.nn.Module,
    tokenizer: CLIPTokenizer,
    prompt: str,
    negative_prompt: str = "",
    *,
    clip_skip: int = 1,
    emphasis: Emphasis = "Original",
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: EmbeddingLookup | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((cond context, cond pooled), (uncond context, uncond pooled)) with equal chunk counts. An empty
    negative prompt gives zeros, context and pooled alike, as A1111 and diffusers (`force_zeros_for_empty_prompt`)
    both do for SDXL."""
    options = dict(clip_skip=clip_skip, emphasis=emphasis, comma_backtrack=comma_backtrack, embeddings=embeddings)
    cond, pooled = encode_sdxl_prompt(text_encoders, tokenizer, prompt, **options)
    if negative_prompt == "":
        return (cond, pooled), (torch.zeros_like(cond), torch.zeros_like(pooled))
    uncond, uncond_pooled = encode_sdxl_prompt(text_encoders, tokenizer, negative_prompt, **options)
    if cond.shape[1] != uncond.shape[1]:
        empty, _ = encode_sdxl_prompt(text_encoders, tokenizer, "", **options)
        cond, uncond = pad_to_same_length(cond, uncond, empty)
    return (cond, pooled), (uncond, uncond_pooled)
