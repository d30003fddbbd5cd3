"""Structure-aware mutations for the fuzz targets: edits that keep a container's framing valid (the safetensors
length prefix, zip CRCs, JSON syntax) so that most mutated inputs reach the parser's deeper checks."""
from __future__ import annotations

import io
import json
import random
import struct
import zipfile

# Values that probe type and range checks: wrong JSON types, boundaries, huge and negative numbers.
ODD_VALUES = [None, True, False, 0, 1, -1, 2, 3, 7, 8, 32, 64, 2**31, 2**63, 2**64 + 1, 10**30, -(2**63), 0.5,
              1e308, float("nan"), float("inf"), -0.0, "", "x", "F16", "BF16", "F8_E4M3", "BOOL", "I64",
              "quick_gelu", "v_prediction", "linear", "sd1", "sd2", "sdxl", [], [0], [1, 2], [0, 10**12], [-1, 4],
              [[1]], {}, {"a": 1}, "{not json", "[" * 50]


def _random_value(rng: random.Random):
    value = rng.choice(ODD_VALUES)
    if isinstance(value, int) and not isinstance(value, bool) and rng.random() < 0.3:
        value += rng.randint(-3, 3)
    return value


def _leaves(obj, path=()):
    """Every (path, value) in nested dicts/lists, containers included."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))


def mutate_json_value(obj, rng: random.Random):
    """`obj` with one random node replaced, deleted or duplicated (JSON-like structures, edited in place)."""
    nodes = list(_leaves(obj))
    path, _ = rng.choice(nodes)
    if not path:
        return _random_value(rng) if rng.random() < 0.1 else obj
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    r = rng.random()
    if r < 0.7:
        parent[key] = _random_value(rng)
    elif r < 0.85:
        del parent[key]
    elif isinstance(parent, dict):
        parent[f"{key}{rng.randint(0, 9)}"] = parent[key]
    else:
        parent.append(parent[key])
    return obj


def dumps(obj, rng: random.Random) -> bytes:
    """JSON bytes; sometimes with NaN/Infinity literals, which Python's json accepts and strict readers do not."""
    return json.dumps(obj, allow_nan=True, ensure_ascii=rng.random() < 0.5).encode()


# ---- safetensors --------------------------------------------------------------------------------------------

def split_safetensors(data: bytes) -> tuple[bytes, bytes] | None:
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    return (data[8:8 + n], data[8 + n:]) if 8 + n <= len(data) else None


def pack_safetensors(header: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


def mutate_safetensors(data: bytes, max_size: int, seed: int, byte_mutate) -> bytes:
    rng = random.Random(seed)
    parts = split_safetensors(data)
    if parts is None or rng.random() < 0.15:
        return byte_mutate(data, max_size)
    header, body = parts
    choice = rng.random()
    if choice < 0.25:
        header = byte_mutate(header, max(len(header) * 2, 64))
    elif choice < 0.85:
        try:
            obj = json.loads(header)
        except (ValueError, RecursionError):
            return byte_mutate(data, max_size)
        if isinstance(obj, dict) and choice < 0.55 and isinstance(obj.get("__metadata__"), dict) \
                and isinstance(obj["__metadata__"].get("minisd_config"), str):
            # the model config is JSON inside a JSON string: edit its structure, not its escaped bytes
            try:
                config = json.loads(obj["__metadata__"]["minisd_config"])
                obj["__metadata__"]["minisd_config"] = dumps(mutate_json_value(config, rng), rng).decode()
            except (ValueError, RecursionError):
                obj["__metadata__"]["minisd_config"] = byte_mutate(
                    obj["__metadata__"]["minisd_config"].encode(), 4096).decode("utf-8", "replace")
        elif isinstance(obj, dict) and obj:
            name = rng.choice(list(obj))
            entry = obj[name]
            if isinstance(entry, dict) and rng.random() < 0.5 and isinstance(entry.get("data_offsets"), list) \
                    and isinstance(entry.get("shape"), list):
                # a consistent resize or move: offsets and shape agree, the file's bounds decide
                other = rng.choice(list(obj.values()))
                if isinstance(other, dict) and isinstance(other.get("data_offsets"), list) and rng.random() < 0.5:
                    entry["data_offsets"] = list(other["data_offsets"])  # overlap another tensor
                    entry["shape"] = other.get("shape", entry["shape"])
                    entry["dtype"] = other.get("dtype", entry.get("dtype"))
                else:
                    entry["shape"] = [rng.choice([0, 1, 2, 3, 4, 2**20, 2**40])] + entry["shape"][1:]
            else:
                mutate_json_value(obj, rng)
        header = dumps(obj, rng)
    else:
        body = byte_mutate(body, max(len(body), 16))
    out = pack_safetensors(header, body)
    return out if len(out) <= max_size else byte_mutate(data, max_size)


# ---- zip (torch.save) ---------------------------------------------------------------------------------------

def read_zip(data: bytes) -> list[tuple[str, bytes]] | None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return [(info.filename, z.read(info)) for info in z.infolist()]
    except Exception:  # noqa: BLE001 - any damage: fall back to byte mutations
        return None


def write_zip(members: list[tuple[str, bytes]]) -> bytes:
    """Stored (uncompressed) members with correct CRCs, as torch.save writes them."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, content in members:
            z.writestr(name, content)
    return out.getvalue()


PICKLE_TOKENS = [b"ctorch._utils\n_rebuild_tensor_v2\n", b"cos\nsystem\n", b"cbuiltins\neval\n",
                 b"ccollections\nOrderedDict\n", b"ctorch\nFloatStorage\n", b"ctorch\nBFloat16Storage\n",
                 b"X\x0a\x00\x00\x00state_dict", b"}q\x00(", b"\x8c\x08builtins\x8c\x04exec\x93", b"h\x00",
                 b"(K\x00K\x01tq\x01", b"J\xff\xff\xff\x7f", b"\x8a\x08" + b"\xff" * 8, b"R", b"b", b"s", b"u",
                 b"\x94", b"\x85", b"\x86", b"\x87", b")", b"]", b"e", b"."]


def mutate_torch_zip(data: bytes, max_size: int, seed: int, byte_mutate) -> bytes:
    rng = random.Random(seed)
    members = read_zip(data)
    if not members or rng.random() < 0.15:
        return byte_mutate(data, max_size)
    pickles = [i for i, (name, _) in enumerate(members) if name.endswith(".pkl")]
    index = rng.choice(pickles) if pickles and rng.random() < 0.7 else rng.randrange(len(members))
    name, content = members[index]
    choice = rng.random()
    if choice < 0.6 or not content:
        content = byte_mutate(content, max(len(content) * 2, 64))
    elif choice < 0.8:  # splice a pickle opcode sequence
        at = rng.randrange(len(content) + 1)
        content = content[:at] + rng.choice(PICKLE_TOKENS) + content[at:]
    elif choice >= 0.9 or len(members) == 1:  # rename a member (torch finds records by name)
        name = name[:rng.randrange(len(name) + 1)] + rng.choice(["data/0", "data.pkl", "version", "x", ""])
    members[index] = (name, content)
    if 0.8 <= choice < 0.9 and len(members) > 1:  # drop a member
        del members[index]
    try:
        out = write_zip(members)
    except Exception:  # noqa: BLE001 - a name zipfile will not write (empty, too long): mutate bytes instead
        return byte_mutate(data, max_size)
    return out if len(out) <= max_size else byte_mutate(data, max_size)
