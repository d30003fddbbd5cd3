"""`minisd batch`: a JSONL file of generation requests -> `{index:06d}.png` (with the A1111 infotext) and
`results.jsonl` keyed by line index. Seeds are resolved before any work, so an image depends neither on the
number of workers nor on the order; a rerun skips what is written; a failing line is recorded, not fatal."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from PIL import Image

from .errors import MinisdError, ParameterError
from .image import open_user_image, read_infotext, save_png
from .params import MAX_SEED, GenerationParams

RESULTS_FILE = "results.jsonl"
IMAGE_NAME = re.compile(r"([0-9]{6,})\.png")
PARAM_FIELDS = {f.name for f in dataclasses.fields(GenerationParams)} - {"output"}
PATH_FIELDS = ("model", "init_image", "mask")
ONE_IMAGE_FIELDS = ("batch_size", "n_iter")  # one line makes one image: `{index:06d}.png`


def image_name(index: int) -> str:
    return f"{index:06d}.png"


# ---- reading the requests (on the driver) -------------------------------------------------------------------

@dataclass(frozen=True)
class BatchLine:
    """One line of the JSONL file: its index (0-based line number) and either the request, with the seed
    resolved and paths made absolute, or the reason it cannot run."""
    index: int
    request: dict | None
    error: str | None = None


def resolve_seed(own: object, base_seed: int, index: int) -> int:
    """The line's own seed, else base_seed + index (wrapped into A1111's seed range); -1 counts as no seed."""
    if own is None or own == -1 or own == "-1":
        return (base_seed + index) % (MAX_SEED + 1)
    return own  # validated with the other parameters


def parse_line(text: str, index: int, *, base_seed: int, model: str, folder: Path) -> dict:
    """The request of one non-empty line; raises ParameterError with a message naming what is wrong."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise ParameterError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(fields, dict):
        raise ParameterError(f"expected a JSON object, got {type(fields).__name__}")
    if "size" in fields:  # "WxH", as in the infotext
        size = fields.pop("size")
        try:
            fields["width"], fields["height"] = (int(v) for v in str(size).lower().split("x"))
        except ValueError:
            raise ParameterError(f"size must be WIDTHxHEIGHT, got {size!r}") from None
    unknown = sorted(set(fields) - PARAM_FIELDS - set(PATH_FIELDS))
    if unknown:
        raise ParameterError(f"unknown field{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}")
    for name in ONE_IMAGE_FIELDS:
        if fields.get(name, 1) not in (1, "1"):
            raise ParameterError(f"{name} must be 1: a line makes one image (repeat the line for more)")
    if not isinstance(fields.get("prompt", ""), str):
        raise ParameterError("prompt must be a string")
    fields["seed"] = resolve_seed(fields.get("seed"), base_seed, index)
    params = {k: v for k, v in fields.items() if k in PARAM_FIELDS}
    fields.update(dataclasses.asdict(GenerationParams(**params).validated()))  # canonical names, checked values
    fields.pop("output")
    fields.setdefault("model", model)
    for name in PATH_FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise ParameterError(f"{name} must be a path")
        if not (name == "model" and value == "demo"):
            # Relative to the JSONL file; absolute so that every worker finds it at the same path.
            fields[name] = str((folder / os.path.expanduser(value)).absolute())
    return fields


def read_lines(path: str | os.PathLike, *, base_seed: int = 0, model: str = "demo") -> list[BatchLine]:
    """Every non-empty line of a JSONL file as a BatchLine (a bad line carries its error, the others run)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParameterError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ParameterError(f"{path}: not a UTF-8 text file") from None
    if model != "demo":
        model = str(Path(model).absolute())
    lines = []
    for index, raw in enumerate(text.splitlines()):
        if not raw.strip():
            continue
        try:
            lines.append(BatchLine(index, parse_line(raw, index, base_seed=base_seed, model=model,
                                                     folder=path.parent)))
        except ParameterError as e:
            lines.append(BatchLine(index, None, f"line {index + 1}: {e}"))
    return lines


# ---- generating one line (on a worker, or locally) ----------------------------------------------------------

@dataclass
class LineOutcome:
    """What a worker returns for one line: the image (with infotext and seed) or the error."""
    index: int
    image: Image.Image | None = None
    infotext: str = ""
    seed: int = -1
    error: str = ""
    seconds: float = 0.0
    worker: str = ""


class LineGenerator:
    """Generates single lines; keeps the last model it loaded, so a worker loads it once for all its lines."""

    def __init__(self, device: str | None = None, dtype=None):
        self.device, self.dtype = device, dtype
        self.source: str | None = None
        self.sd = None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def model(self, source: str):
        if source != self.source:
            from .pipeline import load

            self.sd, self.source = None, None  # free the old model before loading the next
            self.sd, self.source = load(source, device=self.device, dtype=self.dtype), source
        return self.sd

    def __call__(self, index: int, request: dict) -> LineOutcome:
        start = time.perf_counter()
        try:
            image = self.generate(request)
        except Exception as e:  # noqa: BLE001 - one failing line must not end the run; its error is recorded
            message = str(e) if isinstance(e, MinisdError) else f"{type(e).__name__}: {e}"
            return LineOutcome(index, error=f"line {index + 1}: {message}", worker=self.worker,
                               seconds=time.perf_counter() - start)
        return LineOutcome(index, image, image.info["parameters"], image.info["seed"], worker=self.worker,
                           seconds=time.perf_counter() - start)

    def generate(self, request: dict) -> Image.Image:
        sd = self.model(request["model"])
        params = GenerationParams(**{k: v for k, v in request.items() if k in PARAM_FIELDS})
        init = open_user_image(request["init_image"], "init image") if request.get("init_image") else None
        mask = open_user_image(request["mask"], "mask") if request.get("mask") else None
        image, = sd.generate(params, init_image=init, mask_image=mask)
        return image


# ---- writing the outputs (on the driver) --------------------------------------------------------------------

class ResultsWriter:
    """The output folder: `{index:06d}.png` files and `results.jsonl`, appended line by line while running
    (a crash loses nothing written) and rewritten at the end sorted by index, one entry per index."""

    def __init__(self, outdir: str | os.PathLike):
        self.outdir = Path(outdir)
        try:
            self.outdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ParameterError(f"{outdir}: cannot create the output directory ({e.strerror})") from None
        if not os.access(self.outdir, os.W_OK | os.X_OK):
            raise ParameterError(f"{outdir}: output directory is not writable")
        self.results_path = self.outdir / RESULTS_FILE
        self.entries: dict[int, dict] = {}
        if self.results_path.exists():
            for line in self.results_path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[int(entry["index"])] = entry  # the latest entry of an index wins
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash
        self.done = {int(m.group(1)) for name in os.listdir(self.outdir) if (m := IMAGE_NAME.fullmatch(name))}

    def pending(self, lines: Iterable[BatchLine]) -> list[BatchLine]:
        """The lines without an image yet (failed lines are tried again)."""
        return [line for line in lines if line.index not in self.done]

    def record(self, outcome: LineOutcome, request: dict | None = None) -> dict:
        if outcome.error:
            entry = {"index": outcome.index, "status": "error", "error": outcome.error}
        else:
            name = image_name(outcome.index)
            try:
                save_png(outcome.image, self.outdir / name, outcome.infotext)
            except FileExistsError:
                pass  # written by an earlier attempt of this line: the same seed, the same image
            self.done.add(outcome.index)
            entry = {"index": outcome.index, "status": "ok", "file": name, "seed": outcome.seed,
                     "infotext": outcome.infotext}
        if outcome.worker:
            entry.update(seconds=round(outcome.seconds, 3), worker=outcome.worker)
        if request is not None and "prompt" in request:
            entry["prompt"] = request["prompt"]
        self.entries[outcome.index] = entry
        with open(self.results_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        return entry

    def finish(self) -> None:
        """Rewrite results.jsonl sorted by index; images written before a crash get an entry from their infotext."""
        for index in self.done - {i for i, e in self.entries.items() if e.get("status") == "ok"}:
            infotext = read_infotext(self.outdir / image_name(index)) or ""
            seed = re.search(r"Seed: (\d+)", infotext)
            self.entries[index] = {"index": index, "status": "ok", "file": image_name(index),
                                   "seed": int(seed.group(1)) if seed else None, "infotext": infotext}
        tmp = self.results_path.with_name(f".{RESULTS_FILE}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for index in sorted(self.entries):
                f.write(json.dumps(self.entries[index], ensure_ascii=False) + "\n")
        os.replace(tmp, self.results_path)


@dataclass
class BatchSummary:
    written: int = 0
    skipped: int = 0
    failed: int = 0


def run_batch(lines: list[BatchLine], writer: ResultsWriter, outcomes: Callable[[list[BatchLine]], Iterator[LineOutcome]],
              *, quiet: bool = False, on_result: Callable[[dict], None] | None = None) -> BatchSummary:
    """Record the bad lines, then the outcomes of the lines still to do as they arrive, with a progress bar."""
    from tqdm import tqdm

    todo = writer.pending(lines)
    summary = BatchSummary(skipped=len(lines) - len(todo))
    requests = {line.index: line.request for line in todo}
    runnable = [line for line in todo if line.request is not None]
    for line in todo:
        if line.request is None:
            writer.record(LineOutcome(line.index, error=line.error))
            summary.failed += 1
    bar = tqdm(total=len(runnable), unit="img", disable=quiet or not runnable, dynamic_ncols=True)
    try:
        for outcome in outcomes(runnable):
            entry = writer.record(outcome, requests[outcome.index])
            summary.failed += bool(outcome.error)
            summary.written += not outcome.error
            bar.update(1)
            if summary.failed:
                bar.set_postfix(failed=summary.failed)
            if on_result is not None:
                on_result(entry)
    finally:
        bar.close()
        writer.finish()
    return summary


def local_outcomes(device: str | None = None, dtype=None) -> Callable[[list[BatchLine]], Iterator[LineOutcome]]:
    """Generate in this process, grouped by model (each model loaded once), in file order within a model."""
    def outcomes(lines: list[BatchLine]) -> Iterator[LineOutcome]:
        generate = LineGenerator(device, dtype)
        order = {}
        for line in lines:
            order.setdefault(line.request["model"], len(order))
        for line in sorted(lines, key=lambda line: (order[line.request["model"]], line.index)):
            yield generate(line.index, line.request)
    return outcomes
