"""The invariant every fuzz target checks on each input, and the atheris entry point they share.

For any input a parser returns, or raises one of its documented errors; no other exception escapes, it finishes
within a time bound, its peak memory stays within a bound proportional to the input, and it starts no process,
loads no library and opens no socket. `check_input` enforces this in the fuzzer and in the test suite alike.
No minisd import at module level: atheris must instrument minisd's modules as they are first imported.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import resource
import shlex
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

FUZZ_DIR = Path(__file__).resolve().parent
CORPUS_DIR = FUZZ_DIR / "corpus"
MiB = 2**20
# Memory a parser may use beyond the input's own size times `memory_per_byte`: the interpreter's and torch's
# working space (building a small model on `meta`, thread pools) but nothing near a declared gigabyte.
MEMORY_SLACK = 192 * MiB
# Audit events (PEP 578) that no parser may raise: running programs, loading native code, networking.
FORBIDDEN_EVENTS = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                    "subprocess.Popen", "ctypes.dlopen", "ctypes.dlsym", "socket.connect", "socket.bind",
                    "socket.sendto", "webbrowser.open", "os.kill", "os.killpg")
# Where inputs that must be files go: tmpfs when there is one (every execution writes one).
SCRATCH = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())


class InvariantViolation(AssertionError):
    """A fuzz input broke the contract: an undocumented exception, a hang, a memory blow-up or code execution."""


class InputTimeout(BaseException):
    """Raised by the CPU-time alarm inside a parser that ran too long (BaseException: `except Exception`
    does not hide it)."""


@dataclass
class Target:
    """One fuzz target: `check(data)` feeds the bytes to the parser under test (returning or raising)."""
    name: str
    check: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...]   # the documented errors
    seeds: Callable[[], dict[str, bytes]]      # name -> input, made by the project's own code
    modules: tuple[str, ...] = ()              # the modules whose line coverage is reported
    mutate: Callable[[bytes, int, int], bytes] | None = None  # atheris custom mutator (data, max_size, seed)
    time_limit: float = 10.0                   # CPU seconds per input
    memory_per_byte: int = 16
    memory_slack: int = MEMORY_SLACK          # bytes allowed whatever the input's size
    dictionary: list[bytes] = field(default_factory=list)  # tokens for libFuzzer's -dict

    @property
    def corpus(self) -> Path:
        return CORPUS_DIR / self.name


# ---- the invariant ------------------------------------------------------------------------------------------

_events: list[str] = []
_watching = False


def _audit(event: str, args: tuple) -> None:
    if _watching and event.startswith(FORBIDDEN_EVENTS):
        _events.append(f"{event}{args!r:.200}")


_audit_installed = False


def _install_audit_hook() -> None:
    global _audit_installed
    if not _audit_installed:
        sys.addaudithook(_audit)
        _audit_installed = True


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _reset_peak_rss() -> bool:
    """Linux resets VmHWM (peak resident memory) when "5" is written to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _alarm(signum, frame):
    raise InputTimeout()


def _allocation_failure(error: BaseException) -> BaseException | None:
    """A MemoryError or failed torch allocation anywhere in the chain of `error` (also one a parser wrapped
    into its own error): the input made it try to allocate beyond the bound."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, MemoryError) or "can't allocate memory" in str(error) \
                or "Cannot allocate memory" in str(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def check_input(target: Target, data: bytes, use_alarm: bool = True) -> None:
    """Run `target.check(data)` and raise InvariantViolation unless it kept the contract."""
    global _watching
    _install_audit_hook()
    budget = target.memory_slack + target.memory_per_byte * len(data)
    rss_before = _status_kib("VmRSS") * 1024
    peak_known = _reset_peak_rss()
    limit_before = resource.getrlimit(resource.RLIMIT_AS)
    # A ceiling on address space catches allocations that are reserved but never touched (RSS would miss them).
    ceiling = _status_kib("VmSize") * 1024 + 4 * budget + 2048 * MiB
    if limit_before[1] == resource.RLIM_INFINITY or ceiling < limit_before[1]:
        resource.setrlimit(resource.RLIMIT_AS, (ceiling, limit_before[1]))
    if use_alarm:  # CPU time, not wall time: a fuzzer at low priority on a busy machine is not hanging
        previous = signal.signal(signal.SIGPROF, _alarm)
        signal.setitimer(signal.ITIMER_PROF, target.time_limit)
    _events.clear()
    _watching = True
    start = time.process_time()
    failure = None
    try:
        target.check(data)
    except InputTimeout:
        failure = f"took more than {target.time_limit} s of CPU time"
    except target.allowed as e:
        if _allocation_failure(e) is not None:
            failure = f"tried to allocate beyond the bound ({type(e).__name__}: {e})"[:500]
    except BaseException as e:  # noqa: BLE001 - exactly what the fuzzer looks for
        if isinstance(e, KeyboardInterrupt):
            raise
        failure = (f"{type(e).__name__} escaped: {str(e)[:300]}\n"
                   + "".join(traceback.format_exception(e)[-6:]))
    finally:
        _watching = False
        if use_alarm:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.signal(signal.SIGPROF, previous)
        resource.setrlimit(resource.RLIMIT_AS, limit_before)
    elapsed = time.process_time() - start
    if failure is None and elapsed > target.time_limit:
        failure = f"took {elapsed:.1f} s of CPU time, over {target.time_limit} s"
    if failure is None and peak_known:
        grown = _status_kib("VmHWM") * 1024 - rss_before
        if grown > budget:
            failure = f"peak memory grew by {grown / MiB:.0f} MiB, over the {budget / MiB:.0f} MiB bound"
    if failure is None and _events:
        failure = f"raised forbidden audit events: {_events[:3]}"
    if failure is not None:
        raise InvariantViolation(f"{target.name}: {failure}")


@contextlib.contextmanager
def input_file(data: bytes, suffix: str = ""):
    """`data` as a file in the scratch folder (tmpfs when there is one), removed afterwards."""
    fd, name = tempfile.mkstemp(prefix="minisd-fuzz-", suffix=suffix, dir=SCRATCH)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield Path(name)
    finally:
        os.unlink(name)


# ---- corpora ------------------------------------------------------------------------------------------------

def corpus_inputs(target: Target) -> list[Path]:
    """Every file of the target's corpus: seeds, what fuzzing kept, and regression inputs of fixed crashes."""
    return sorted(p for p in target.corpus.rglob("*") if p.is_file())


def write_seeds(target: Target) -> list[Path]:
    """Write the target's seeds (made by the project's code) into its corpus folder, named by content."""
    (target.corpus / "seeds").mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in target.seeds().items():
        path = target.corpus / "seeds" / f"{name}-{hashlib.sha1(data).hexdigest()[:10]}"
        path.write_bytes(data)
        written.append(path)
    return written


# ---- atheris ------------------------------------------------------------------------------------------------

def _escaped(token: bytes) -> str:
    return "".join(f"\\x{b:02x}" for b in token)  # libFuzzer dictionary syntax


def byte_mutate(data: bytes, max_size: int) -> bytes:
    """libFuzzer's own mutation of `data` inside a fuzzing run; outside one, a random flip, insert or cut."""
    if "atheris" in sys.modules and _fuzzing:
        return sys.modules["atheris"].Mutate(data, max_size)
    import random
    rng = random.Random(hashlib.sha1(data).digest())
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(out) + 1)
        op = rng.randrange(3)
        if op == 0 and at < len(out):
            out[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[at:at] = bytes([rng.randrange(256)])
        else:
            del out[at:at + rng.randint(1, 8)]
    return bytes(out[:max_size])


_fuzzing = False


def instrumented(active: bool):
    """Context for a target's minisd imports: atheris instruments them when the target runs as the fuzzer."""
    if not active:
        return contextlib.nullcontext()
    import atheris
    return atheris.instrument_imports(include=["minisd"])


def main(target: Target) -> None:
    """`python fuzz/<target>.py [libFuzzer flags] [corpus dirs]`; `--make-seeds` writes the seed corpus.
    With MINISD_FUZZ_KEEP_GOING=DIR a violation is saved under DIR (input and report) and fuzzing goes on."""
    if "--make-seeds" in sys.argv:
        for path in write_seeds(target):
            print(path)
        return
    import atheris

    keep_going = os.environ.get("MINISD_FUZZ_KEEP_GOING")
    seen: set[str] = set()

    def one_input(data: bytes) -> None:
        try:
            check_input(target, data)
        except InvariantViolation as e:
            if not keep_going:
                raise
            signature = str(e).splitlines()[0][:160]
            digest = hashlib.sha1(data).hexdigest()
            folder = Path(keep_going)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"crash-{digest}").write_bytes(data)
            (folder / f"crash-{digest}.txt").write_text(str(e))
            if signature not in seen:
                seen.add(signature)
                print(f"\n== violation: {signature} -> {folder / ('crash-' + digest)}", flush=True)

    mutator = target.mutate  # atheris calls it as (data, max_size, seed)
    # libFuzzer's -merge and -fork modes rerun argv[0] through sh: make that this interpreter and this script.
    argv = [f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(sys.argv[0]).resolve()))}", *sys.argv[1:]]
    if target.dictionary and not any(a.startswith("-dict=") for a in argv):
        path = SCRATCH / f"minisd-fuzz-{target.name}.dict"
        path.write_text("".join(f'"{_escaped(token)}"\n' for token in target.dictionary))
        argv.insert(1, f"-dict={path}")
    global _fuzzing
    _fuzzing = True
    atheris.Setup(argv, one_input, custom_mutator=mutator)
    atheris.Fuzz()
