"""Writing outputs when the disk says no: a full disk (a real 1 MiB tmpfs in a private mount namespace, and the
file-size limit RLIMIT_FSIZE, whose EFBIG is the same failure of write()), a read-only folder, and Ctrl-C.
Each time: one line (exit code 2 from the CLI, 130 for Ctrl-C), no partial file, existing files untouched."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from minisd.image import save_png
from minisd.safetensors_file import write_safetensors

PY = sys.executable


def noisy_image(size: int = 96) -> Image.Image:
    """Random pixels: PNG cannot compress them, so the file is about 3·size² bytes."""
    g = torch.Generator().manual_seed(0)
    return Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())


def run_limited(code: str, limit_bytes: int) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter whose files may not grow beyond `limit_bytes` (write() then fails with
    EFBIG, as it fails with ENOSPC on a full disk; Python ignores SIGXFSZ, so it is an OSError)."""
    prelude = f"import resource\nresource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, resource.RLIM_INFINITY))\n"
    return subprocess.run([PY, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_png_over_the_file_size_limit_leaves_nothing(tmp_path):
    (tmp_path / "existing.png").write_bytes(b"keep me")
    before = snapshot(tmp_path)
    noisy_image().save(tmp_path.parent / "noise.png")
    result = run_limited(f"""
        from PIL import Image
        from minisd.image import save_png
        try:
            save_png(Image.open({str(tmp_path.parent / 'noise.png')!r}), {str(tmp_path / 'out.png')!r}, "p")
        except OSError as e:
            print(e)
        """, limit_bytes=8192)
    assert result.returncode == 0, result.stderr
    assert "File too large" in result.stdout and "out.png" in result.stdout and result.stdout.count("\n") == 1
    assert snapshot(tmp_path) == before  # no out.png, no temporary file, the existing file as it was


def test_safetensors_over_the_file_size_limit_leaves_nothing(tmp_path):
    (tmp_path / "existing.safetensors").write_bytes(b"keep me")
    before = snapshot(tmp_path)
    result = run_limited(f"""
        import torch
        from minisd.safetensors_file import write_safetensors
        try:
            write_safetensors({{"w": torch.ones(100_000)}}, {str(tmp_path / 'out.safetensors')!r})
        except OSError as e:
            print(e)
        """, limit_bytes=65536)
    assert result.returncode == 0, result.stderr
    assert "File too large" in result.stdout and "out.safetensors" in result.stdout
    assert snapshot(tmp_path) == before


def test_existing_files_are_never_overwritten(tmp_path):
    (tmp_path / "a.png").write_bytes(b"keep")
    (tmp_path / "a.safetensors").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        save_png(noisy_image(8), tmp_path / "a.png")
    with pytest.raises(FileExistsError):
        write_safetensors({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    assert snapshot(tmp_path) == {"a.png": b"keep", "a.safetensors": b"keep"}


def test_ctrl_c_while_writing_a_png_leaves_nothing(tmp_path, monkeypatch):
    """KeyboardInterrupt in the middle of the PNG encoder: the temporary file is removed, no output appears."""
    real_save = Image.Image.save

    def interrupted(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_png(noisy_image(8), tmp_path / "out.png", "p")
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_generation_leaves_no_files(tmp_path):
    """SIGINT while the sampler runs: `minisd generate` says one line, exits 130, and wrote nothing."""
    out = tmp_path / "out"
    process = subprocess.Popen([PY, "-m", "minisd", "generate", "a red circle", "--steps", "1000", "--seed", "1",
                                "--dtype", "fp32", "--outdir", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    err, sampling = [], threading.Event()

    def read_stderr():
        while text := process.stderr.read(1):
            err.append(text)
            if text == "|":  # the progress bar is drawn: the model is loaded and sampling has begun
                sampling.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    assert sampling.wait(timeout=300), "".join(err)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    reader.join(timeout=10)
    text = "".join(err)
    assert process.returncode == 130, text
    assert text.count("minisd: interrupted") == 1 and "Traceback" not in text and "Error" not in text
    assert list(out.iterdir()) == []


# ---- a real full disk and a real read-only folder: tmpfs in a private mount namespace ------------------------

def in_mount_namespace(script: str) -> subprocess.CompletedProcess:
    """`script` (sh) as root of a new user and mount namespace: its mounts vanish with it, nothing on the host
    changes. Skips where this kernel or sandbox allows no such namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || mount -t tmpfs tmpfs /tmp"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no user+mount namespaces here ({probe.stderr.strip()}); the RLIMIT_FSIZE tests cover writing")
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-ec", script],
                          capture_output=True, text=True, timeout=600)


def test_generate_on_a_full_disk(tmp_path):
    """A 1 MiB tmpfs filled up to its last 4 KiB: `minisd generate` fails at the write with one line."""
    disk = tmp_path / "disk"
    disk.mkdir()
    result = in_mount_namespace(f"""
        mount -t tmpfs -o size=1m tmpfs {disk}
        printf 'keep me' > {disk}/00000-7.png
        head -c $(( 1024 * 1024 - 8192 )) /dev/zero > {disk}/filler 2>/dev/null || true
        df -k {disk} | tail -1 >&2
        set +e
        {PY} -m minisd generate 'a red circle' --steps 1 --seed 1 --dtype fp32 -q --outdir {disk} 2>{disk}.err
        echo "exit=$?"
        set -e
        ls -A {disk}
        cat {disk}/00000-7.png; echo
        """)
    assert result.returncode == 0, result.stderr
    err = (tmp_path / "disk.err").read_text()
    lines = result.stdout.splitlines()
    assert "exit=2" in lines, (result.stdout, err)
    assert err.count("\n") == 1 and "No space left on device" in err and str(disk) in err, err
    assert lines[lines.index("exit=2") + 1:] == ["00000-7.png", "filler", "keep me"]  # no partial or temp file


def test_convert_on_a_full_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    result = in_mount_namespace(f"""
        mount -t tmpfs -o size=1m tmpfs {disk}
        set +e
        {PY} -m minisd convert demo {disk}/demo.safetensors 2>{disk}.err
        echo "exit=$?"
        set -e
        ls -A {disk}
        """)
    err = (tmp_path / "disk.err").read_text()
    assert result.stdout.splitlines() == ["exit=2"], (result.stdout, err)  # and an empty folder
    assert err.count("\n") == 1 and "No space left on device" in err and "demo.safetensors" in err, err


def test_read_only_folder(tmp_path):
    """A read-only mount: generate refuses before loading the model; writing a PNG names the file; the existing
    file is untouched."""
    disk = tmp_path / "ro"
    disk.mkdir()
    result = in_mount_namespace(f"""
        mount -t tmpfs -o size=1m tmpfs {disk}
        printf 'keep me' > {disk}/existing.png
        mount -o remount,ro {disk}
        set +e
        {PY} -m minisd generate 'x' --steps 1 --outdir {disk} 2>{disk}.err
        echo "exit=$?"
        {PY} -c "
from PIL import Image
from minisd.image import save_png
try:
    save_png(Image.new('RGB', (8, 8)), '{disk}/new.png')
except OSError as e:
    print(e)
"
        set -e
        ls -A {disk}
        cat {disk}/existing.png; echo
        """)
    err = (tmp_path / "ro.err").read_text()
    lines = result.stdout.splitlines()
    assert lines[0] == "exit=2" and err.count("\n") == 1 and "not writable" in err, (result.stdout, err)
    assert "Read-only file system" in lines[1] and "new.png" in lines[1]
    assert lines[2:] == ["existing.png", "keep me"]
