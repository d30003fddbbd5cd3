"""CLIP's byte-level BPE tokenizer (Radford et al. 2021, after Sennrich et al. 2016 and GPT-2) in pure
Python, reading the vocabulary shipped in minisd/assets. Ids equal those of transformers' CLIPTokenizer
for SD 1.x (`openai/clip-vit-large-patch14`); `clean="openai"` gives the original CLIP / OpenCLIP clean-up."""
from __future__ import annotations

import functools
import gzip
import heapq
import html
import json
import unicodedata
from pathlib import Path
from typing import Literal, Sequence

import regex

try:
    import ftfy
except ImportError:  # optional, as in the original: without it mojibake and typography stay unfixed
    ftfy = None

VOCAB_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
PAD_ID = EOS_ID  # SD 1.x pads with end-of-text; SD 2.x (OpenCLIP) pads with 0
MAX_LENGTH = 77  # the text encoder's context: BOS + 75 tokens + EOS
END_OF_WORD = "</w>"

# The vocabulary file lists 262,144 merges; CLIP uses the first 49152 - 256 - 2 of them, so that
# 256 bytes + 256 end-of-word bytes + merges + 2 specials make 49408 ids.
NUM_MERGES = 49152 - 256 - 2

# Whitespace as `tokenizers` (Oniguruma) sees it, which is also the `regex` module's \s: Unicode's
# White_Space property. Python's str.isspace() would add U+001C..U+001F, which CLIP keeps as symbols.
_WHITESPACE = regex.compile(r"\s+")
# One piece per special-token spelling, word, single digit or run of other symbols; the English
# contractions stand alone. Letter and number classes come from the `regex` package's Unicode tables,
# transformers' from Oniguruma's: they can differ only on characters assigned in the newest Unicode.
_PIECES = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
_PIECE = regex.compile(_PIECES)
# The original tokenizer matches case-insensitively and gives the special-token pieces their ids.
_OPENAI_PIECE = regex.compile(_PIECES, regex.IGNORECASE)
# transformers' byte-level step re-splits pieces with GPT-2's pattern, which changes only these two.
_SPECIAL_SPELLINGS = {"<|startoftext|>": ["<|", "startoftext", "|>"], "<|endoftext|>": ["<|", "endoftext", "|>"]}
# transformers recognises the specials verbatim in the raw text, before any normalisation.
_SPECIAL_SPLIT = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")

Clean = Literal["hf", "openai"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters: printable Latin-1
    bytes map to themselves, the rest to code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    # Insertion order (printable first) is the order of the first 256 vocabulary entries.
    return table


def read_merges(path: str | Path = VOCAB_PATH) -> list[tuple[str, str]]:
    """The merge rules CLIP uses, in priority order (line 0 of the file is a version header)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # type: ignore[misc]


def build_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Token string -> id, in CLIP's order: bytes, bytes + "</w>", one token per merge, then the specials."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}


def write_hf_files(folder: str | Path, vocab_path: str | Path = VOCAB_PATH, pad_token: str = EOS_TOKEN) -> None:
    """Write the vocabulary as Hugging Face's `vocab.json` + `merges.txt` (+ the tokenizer settings), the
    `tokenizer/` folder of a diffusers model. CLIP-L pads with end-of-text; OpenCLIP's tokenizers (SD 2.x,
    SDXL's `tokenizer_2`) with "!" (id 0)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = read_merges(vocab_path)
    (folder / "vocab.json").write_text(json.dumps(build_vocab(merges), ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token,
                "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))


@functools.lru_cache(maxsize=4)
def _load(path: str) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    merges = read_merges(path)
    return build_vocab(merges), {m: rank for rank, m in enumerate(merges)}


def _fold_whitespace(text: str) -> str:
    return _WHITESPACE.sub(" ", text)


def _lower_per_char(text: str) -> str:
    """Lower-case one code point at a time, as `tokenizers` does: a word-final capital sigma becomes
    'σ', not the 'ς' that str.lower() picks from context."""
    if "Σ" in text:
        return "".join(c.lower() for c in text)
    return text.lower()


def clean_hf(text: str) -> str:
    """transformers' CLIP normalisation (the `tokenizer.json` of openai/clip-vit-large-patch14):
    NFC, whitespace runs to one space, lower case."""
    return _lower_per_char(_fold_whitespace(unicodedata.normalize("NFC", text)))


def clean_openai(text: str) -> str:
    """The original CLIP clean-up (also OpenCLIP's, used by SD 2.x): ftfy's fix-up when ftfy is
    installed, HTML entities decoded twice, whitespace folded, lower case."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _fold_whitespace(text).strip().lower()


class CLIPTokenizer:
    """Text <-> CLIP token ids. `encode` adds BOS/EOS and neither pads nor truncates."""

    bos_id = BOS_ID
    eos_id = EOS_ID
    pad_id = PAD_ID

    def __init__(self, vocab_path: str | Path = VOCAB_PATH, *, clean: Clean = "hf", cache_size: int = 1 << 16):
        """`clean="hf"` matches transformers >= 5 (and so diffusers). `clean="openai"` matches the original
        CLIP and OpenCLIP (SD 2.x) tokenizers; transformers 4's slow tokenizer, which A1111 uses, agrees
        with it on ordinary prompts (not on some HTML entities, nor on specials not typed verbatim)."""
        if clean not in ("hf", "openai"):
            raise ValueError(f"clean must be 'hf' or 'openai', got {clean!r}")
        self.clean = clean
        self.vocab, self._ranks = _load(str(vocab_path))
        self._id_to_token = {i: t for t, i in self.vocab.items()}
        self._byte_to_char = bytes_to_unicode()
        self._char_to_byte = {c: b for b, c in self._byte_to_char.items()}
        self._special = {BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID}
        # Prompts repeat the same words endlessly; BPE of a word is pure, so memoise it.
        self._bpe = functools.lru_cache(maxsize=cache_size)(self._bpe_uncached)

    def __len__(self) -> int:
        return len(self.vocab)

    def token_to_id(self, token: str) -> int:
        """Id of a vocabulary entry such as ",</w>"."""
        return self.vocab[token]

    def _bpe_uncached(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized piece (already mapped to byte characters). BPE merges the adjacent
        pair of lowest rank, leftmost first, until no pair has a rank. A heap of candidate pairs over a
        linked list of symbols keeps long words O(n log n) instead of quadratic."""
        symbols: list[str | None] = [*piece[:-1], piece[-1] + END_OF_WORD]
        n = len(symbols)
        ranks = self._ranks
        nxt = [*range(1, n), -1]
        prv = [*range(-1, n - 1)]
        heap = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i]
            # Entries go stale when a neighbour merges first; ranks are unique, so equal rank = same pair.
            if symbols[i] is None or j < 0 or ranks.get((symbols[i], symbols[j])) != rank:
                continue
            symbols[i] = symbols[i] + symbols[j]  # type: ignore[operator]
            symbols[j] = None
            k = nxt[i] = nxt[j]
            if k >= 0:
                prv[k] = i
                if (rank := ranks.get((symbols[i], symbols[k]))) is not None:
                    heapq.heappush(heap, (rank, i))
            p = prv[i]
            if p >= 0 and (rank := ranks.get((symbols[p], symbols[i]))) is not None:
                heapq.heappush(heap, (rank, p))
        return tuple(self.vocab[t] for t in symbols if t is not None)

    def _encode_pieces(self, pieces: list[str], ids: list[int]) -> None:
        b2c = self._byte_to_char
        for piece in pieces:
            ids.extend(self._bpe("".join(b2c[b] for b in piece.encode("utf-8"))))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`: BOS, the tokens, EOS (just the tokens with `add_special_tokens=False`)."""
        ids: list[int] = [BOS_ID] if add_special_tokens else []
        if self.clean == "hf":
            for i, part in enumerate(_SPECIAL_SPLIT.split(text)):
                if i % 2:  # the captured separators: specials typed verbatim
                    ids.append(self._special[part])
                elif part:  # here "<|ENDOFTEXT|>", lower-cased, is ordinary text
                    pieces = _PIECE.findall(clean_hf(part))
                    pieces = [q for p in pieces for q in _SPECIAL_SPELLINGS.get(p, (p,))]
                    self._encode_pieces(pieces, ids)
        else:
            for piece in _OPENAI_PIECE.findall(clean_openai(text)):
                if piece in self._special:
                    ids.append(self._special[piece])
                else:
                    self._encode_pieces([piece], ids)
        if add_special_tokens:
            ids.append(EOS_ID)
        return ids

    def tokenize(self, text: str) -> list[str]:
        """The vocabulary entries `text` becomes, without BOS/EOS (for inspection)."""
        return [self._id_to_token[i] for i in self.encode(text, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`: words end where a token ends in "</w>"; invalid UTF-8 becomes U+FFFD."""
        tokens = [
            self._id_to_token[int(i)] for i in ids if not (skip_special_tokens and int(i) in (BOS_ID, EOS_ID))
        ]
        # Bytes are joined across tokens before decoding: a character may span several tokens.
        data = bytes(self._char_to_byte[c] for c in "".join(tokens))
        text = data.decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()
