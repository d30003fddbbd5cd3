"""minisd.tokenizer against transformers' CLIPTokenizer built from the same vocabulary: ids on realistic
prompts and on 20,000 seeded random strings, decoding, and the original CLIP clean-up mode."""
from __future__ import annotations

import importlib.util
import random
import unicodedata
from pathlib import Path

import pytest
import regex

from minisd.tokenizer import BOS_ID, EOS_ID, VOCAB_PATH, CLIPTokenizer, read_merges, write_hf_files

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile, (blue eyes:1.2)",
    "A beautiful sunset over the ocean, highly detailed, 8k, trending on artstation",
    "portrait of a cyberpunk samurai, neon lights, rain, by Greg Rutkowski and Alphonse Mucha",
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped",
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry",
    "a [red:blue:0.5] car parked in front of a ((victorian)) house BREAK snowy street, night",
    "an oil painting of a fox in the style of Van Gogh's Starry Night",
    "close-up photo of a bee on a sunflower, macro lens, f/2.8, 1/250s, ISO 100",
    "cinematic still of a dragon flying over Mt. Fuji, 35mm film, Kodak Portra 400",
    "(((best quality))), [[worst quality]], (detailed face:1.4), (hands:0.8)",
    "ultra-realistic 3D render of a robot's head, octane render, unreal engine 5, ray tracing",
    "Café terrace at night — impressionism, palette knife, thick impasto",
    "anime screencap, Studio Ghibli style, a girl & her cat on a train, summer, 夏",
    "a cute corgi wearing sunglasses 😎 on the beach 🏖️",
    "watercolor of Kyoto temple (清水寺), cherry blossoms, spring",
    "Москва, Красная площадь, зима, фотография",
    "professional photo of a bowl of ramen, steam, chopsticks, shallow depth of field",
    "isometric pixel art of a tiny island, 16-bit, SNES style",
    "a man's portrait, 50% grey background, rim light; studio lighting: softbox",
    "logo design for \"Blue Whale Coffee\", minimalist, vector, flat",
    "embedding:EasyNegative, (worst quality:2), (low quality:2), nsfw",
    "<lora:add_detail:0.7> a knight in shining armor, epic fantasy",
    "steampunk airship above London, 1890s, sepia\ttone\n\nvery detailed",
    "\\(parenthesised\\) literal text with \\[brackets\\] and a backslash \\\\",
    "a very long prompt, " * 20,
    "HDR, UHD, 8K, 4K, RAW photo, DSLR, Fujifilm XT3, high resolution",
    "ΑΘΗΝΑ ΣΟΦΙΑ, Greek statue of Athena, marble",
    "mediæval manuscript illumination, gold leaf, Œuvre, naïve façade",
    "",
]

# Material for the random strings: each entry draws one fragment.
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_UNICODE_LETTERS = (
    "àáâãäåæçèéêëìíîïðñòóôõöøùúûüýþÿÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖØÙÚÛÜÝÞßŒœŠšŸŽžİıĞğŞş"
    "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩςάέήίόύώ"
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ"
    "אבגדהוזחטיכלמנסעפצקרשת" "ابتثجحخدذرزسشصضطظعغفقكلمنهوي" "अआइईउऊकखगघचछजझटठडढणतथदधनपफबभमयरलवशषसह"
    "กขคงจฉชซญฎฏฐณดตถทธนบปผพฟภมยรลวศษสหฬอฮ" "가나다라마바사아자차카타파하한국어" "ǅǈǋǲﬀﬁﬂﬃﬄＡＢＣａｂｃｘｙｚ"
)
_CJK = "日本語中文汉字漢字東京大阪天気花鳥風月山水雪雨龍虎猫犬のはをにがでとひらがなカタカナテキスト"
_DIGITS = "0123456789٠١٢٣٤٥٦٧٨٩०१२३४५६७८९０１２３４５６７８９²³½¼⅓Ⅻ①"
_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~¡¿«»‘’“”„‹›–—…·•§¶©®™°±×÷€£¥¢"
_WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\xa0", "\u3000", "\u2003", "\u2028", "\x85", " \t \n "]
_EMOJI = [
    "😀", "😎", "🎉", "🔥", "❤️", "👍🏽", "👩‍💻", "👨‍👩‍👧‍👦", "🇯🇵", "🏳️‍🌈", "✨", "🌸", "🐱", "🦊", "🍜", "☕", "⭐", "🤖", "🧙‍♂️", "©️",
]
_COMBINING = [chr(c) for c in range(0x300, 0x370)] + ["\u20dd", "\u0e31", "\u093f", "\ufe0f", "\u200d", "\u200b"]
_ENTITIES = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&nbsp;", "&eacute;", "&#x1F600;", "&amp;amp;", "&copy;"]
_SPECIAL = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "</w>"]


_UNASSIGNED = regex.compile(r"\p{Cn}")


def _random_code_point(rng: random.Random) -> str:
    """Any code point but lone surrogates (not encodable) and those assigned after Unicode 14: the
    `regex` package, Python's unicodedata and transformers' Oniguruma each carry their own Unicode
    version (17, 14 and 16 here), so letters, case and composition of the newest characters differ."""
    while True:
        c = chr(rng.choice([rng.randrange(0x20, 0x3000), rng.randrange(0x3000, 0x10000), rng.randrange(0x10000, 0x40000)]))
        if not 0xD800 <= ord(c) < 0xE000 and (unicodedata.category(c) != "Cn" or _UNASSIGNED.match(c)):
            return c


def _fragment(rng: random.Random) -> str:
    kind = rng.randrange(12)
    if kind == 0:
        return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(1, 12)))
    if kind == 1:
        return "".join(rng.choice(_UNICODE_LETTERS) for _ in range(rng.randint(1, 10)))
    if kind == 2:
        return "".join(rng.choice(_CJK) for _ in range(rng.randint(1, 8)))
    if kind == 3:
        return "".join(rng.choice(_DIGITS) for _ in range(rng.randint(1, 6)))
    if kind == 4:
        return "".join(rng.choice(_PUNCT) for _ in range(rng.randint(1, 6)))
    if kind == 5:
        return rng.choice(_WHITESPACE)
    if kind == 6:
        return "".join(rng.choice(_EMOJI) for _ in range(rng.randint(1, 3)))
    if kind == 7:
        return rng.choice(_LETTERS + "aeiouxyz") + "".join(rng.choice(_COMBINING) for _ in range(rng.randint(1, 3)))
    if kind == 8:
        return rng.choice(_ENTITIES)
    if kind == 9:
        return rng.choice(_SPECIAL)
    if kind == 10:  # very long words exercise BPE far beyond its cache
        return "".join(rng.choice(_LETTERS + _UNICODE_LETTERS[:60]) for _ in range(rng.randint(40, 300)))
    return "".join(_random_code_point(rng) for _ in range(rng.randint(1, 4)))


def random_strings(n: int, seed: int) -> list[str]:
    """`n` seeded random strings mixing the fragment kinds above; about 1 in 40 is empty."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.025:
            out.append("")
            continue
        out.append("".join(_fragment(rng) for _ in range(rng.randint(1, 10))))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """transformers' CLIPTokenizer (in transformers 5 the `tokenizers`-backed class, the one that
    `openai/clip-vit-large-patch14` loads) from vocab.json + merges.txt written as OpenAI builds them."""
    folder = tmp_path_factory.mktemp("clip_vocab")
    write_hf_files(folder)
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


def test_vocabulary_layout(tok):
    merges = read_merges()
    assert len(merges) == 48894 and merges[0] == ("i", "n")
    assert len(tok) == 49408
    assert tok.vocab["!"] == 0 and tok.vocab["!</w>"] == 256 and tok.vocab["in"] == 512
    assert tok.vocab["<|startoftext|>"] == BOS_ID == 49406 and tok.vocab["<|endoftext|>"] == EOS_ID == 49407
    assert tok.token_to_id(",</w>") == 267


def test_known_ids(tok):
    # Ids of the SD 1.x tokenizer as published (e.g. diffusers docs and A1111's comma token 267).
    assert tok.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.encode("") == [49406, 49407]
    assert tok.encode(",", add_special_tokens=False) == [267]


def test_realistic_prompts_match_transformers(tok, reference):
    expected = reference(PROMPTS)["input_ids"]
    for prompt, ids in zip(PROMPTS, expected):
        assert tok.encode(prompt) == ids, prompt
        assert tok.encode(prompt, add_special_tokens=False) == ids[1:-1]


def _check_parity(tok, reference, strings):
    expected = reference(strings)["input_ids"]
    ours = [tok.encode(s) for s in strings]
    mismatches = [(s, want, got) for s, want, got in zip(strings, expected, ours) if got != want]
    assert not mismatches, f"{len(mismatches)} of {len(strings)} differ; first: {mismatches[:3]!r}"
    decoded = reference.batch_decode(expected, skip_special_tokens=True)
    wrong = [(ids, text) for ids, text in zip(expected, decoded) if tok.decode(ids) != text]
    assert not wrong, f"{len(wrong)} decodes differ; first: {wrong[:3]!r}"


def test_random_strings_match_transformers(tok, reference):
    _check_parity(tok, reference, random_strings(20_000, seed=1234))


def test_decode_with_specials_matches_transformers(tok, reference):
    for s in PROMPTS[:5] + random_strings(200, seed=7):
        ids = reference(s)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)


def test_decode_inverts_encode_on_normalised_text(tok):
    # Normalised text: lower case, single spaces, every piece (word, digit, symbol run) space-separated.
    rng = random.Random(3)
    words = ["cat", "astronaut", "riding", "8", "k", "!!", ",", "über", "日本語", "🎉", "'s", "(", "):", "é", "σοφία"]
    for _ in range(500):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        assert tok.decode(tok.encode(text)) == text
    for s in random_strings(500, seed=11):  # decoding is a fixed point after one round
        ids = tok.encode(s, add_special_tokens=False)
        once = tok.decode(ids, skip_special_tokens=False)
        assert tok.encode(once, add_special_tokens=False) == ids or "\ufffd" in once


def test_special_tokens_typed_in_text(tok, reference):
    # Verbatim specials become their ids; other casings are ordinary text (transformers matches them
    # before normalisation).
    ids = tok.encode("a<|endoftext|>b")
    assert ids == reference("a<|endoftext|>b")["input_ids"] and ids.count(EOS_ID) == 2
    assert EOS_ID not in tok.encode("<|ENDOFTEXT|>")[1:-1]
    assert tok.encode("<|ENDOFTEXT|>") == reference("<|ENDOFTEXT|>")["input_ids"]


def test_bpe_is_cached(tok):
    tok.encode("supercalifragilisticexpialidocious")
    hits = tok._bpe.cache_info().hits
    tok.encode("supercalifragilisticexpialidocious")
    assert tok._bpe.cache_info().hits == hits + 1


@pytest.fixture(scope="module")
def openai_reference():
    """OpenAI's own `simple_tokenizer.py` (PyPI `openai-clip`), loaded alone: the package's
    `__init__` needs torchvision, the tokenizer module only ftfy and regex."""
    pytest.importorskip("ftfy")
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("openai-clip is not installed")
    path = Path(spec.submodule_search_locations[0]) / "simple_tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(VOCAB_PATH))


def test_openai_clean_mode_matches_original_clip(openai_reference):
    """`clean="openai"`: ftfy's fix-up, HTML entities decoded twice, whitespace folded, str.lower(),
    specials recognised anywhere after cleaning, and the case-insensitive split of the original."""
    openai = CLIPTokenizer(clean="openai")
    for s in PROMPTS + random_strings(2000, seed=5):
        assert openai.encode(s) == [BOS_ID, *openai_reference.encode(s), EOS_ID], s


def test_openai_clean_mode_worked_examples(tok):
    """Where the two clean-ups differ, worked out from ftfy's documented defaults and HTML."""
    pytest.importorskip("ftfy")
    openai = CLIPTokenizer(clean="openai")
    same_as = {
        "“curly” quotes": '"curly" quotes',  # ftfy uncurls quotes
        "fish &amp; chips": "fish & chips",  # HTML entities
        "&amp;amp;": "&",  # decoded twice
        "ＡＢＣ ﬁne": "abc fine",  # full-width forms and ligatures
        "ΟΔΟΣ ΣΟΦΙΑ": "οδος σοφια",  # context-sensitive final sigma (str.lower()); transformers keeps σ
    }
    for raw, plain in same_as.items():
        assert openai.encode(raw) == tok.encode(plain), raw
        assert tok.encode(raw) != tok.encode(plain), raw
    assert openai.encode("a <|ENDOFTEXT|>") == [BOS_ID, 320, EOS_ID, EOS_ID]


def test_bad_clean_mode_rejected():
    with pytest.raises(ValueError):
        CLIPTokenizer(clean="nfkc")  # type: ignore[arg-type]
