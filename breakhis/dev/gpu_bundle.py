"""Pack what a GPU machine without network and without Ray needs to run ``make bench-gpu``.

    make gpu-bundle                     # = python -m breakhis.dev.gpu_bundle gpu-bundle
    python -m breakhis.dev.gpu_bundle gpu-bundle --python 3.12 --limit-mb 48

The lent GPU machines (docs/benchmarks.md) hold Python 3.12, their own torch, torchvision,
numpy, pandas, pyarrow, scikit-learn, Pillow and most small libraries, but no Ray and no
network, and what travels to them is at most 64 MiB with the working tree. So the bundle
is:

- Ray's wheel for that Python (``pip download``: the pip cache, else the index), stripped:
  the Java jars, RLlib, Serve, Ray LLM, the dashboard's web client and test folders
  removed, the native binaries' symbols stripped (``strip --strip-unneeded``), its RECORD
  rewritten, recompressed: 79 MB becomes about a third of it;
- the small wheels of SMALL_WHEELS (what Ray and this package import that the image
  lacks), pure Python or for that Python;
- ``install.sh``: ``pip install --no-index --no-deps`` of every wheel in the folder, then
  this package without its dependencies (``pip install --no-deps -e .``).

On the GPU machine: ``sh gpu-bundle/install.sh && make bench-gpu``. The build fails when
the folder would exceed ``limit_mb`` (the tree has to travel too).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

RAY = "ray==2.60.0"
"""The pinned Ray (pyproject.toml)."""
SMALL_WHEELS: tuple[str, ...] = (
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    "tensorboardX",
    "pyspng",
    "captum",
)
"""What Ray and breakhis import at run time that the GPU image lacks (its package list:
/work/.library/device/KINDS.md of the lending workplace)."""
STRIP_FOLDERS: tuple[str, ...] = (
    "ray/jars",
    "ray/rllib",
    "ray/serve",
    "ray/llm",
    "ray/dashboard/client/build",
)
"""Parts of Ray's wheel no benchmark uses (Java workers, RLlib, Serve, LLM, the web UI)."""


def strip_wheel(wheel: Path, out_dir: Path, *, drop: tuple[str, ...] = STRIP_FOLDERS) -> Path:
    """A copy of ``wheel`` in ``out_dir`` without the folders ``drop`` and any ``tests``
    folder, its ELF files' symbols stripped (when ``strip`` is on the PATH), its RECORD
    rewritten for what is left, compressed at deflate level 9. Returns its path (same
    name). Raises FileNotFoundError for a missing wheel, ValueError for one without RECORD.
    """
    if not wheel.is_file():
        raise FileNotFoundError(f"{wheel}: no such wheel")
    strip = shutil.which("strip")
    out = out_dir / wheel.name
    with tempfile.TemporaryDirectory() as scratch, zipfile.ZipFile(wheel) as source:
        names = source.namelist()
        records = [n for n in names if n.endswith(".dist-info/RECORD")]
        if not records:
            raise ValueError(f"{wheel}: not a wheel (no .dist-info/RECORD)")
        kept = [n for n in names if not _dropped(n, drop) and n != records[0]]
        rows = []
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as target:
            for name in kept:
                info = source.getinfo(name)
                if info.is_dir():
                    continue
                data = source.read(name)
                if strip and data[:4] == b"\x7fELF":
                    data = _stripped(data, Path(scratch), strip)
                target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
                rows.append(f"{name},sha256={digest.decode()},{len(data)}")
            rows.append(f"{records[0]},,")
            target.writestr(records[0], "\n".join(rows) + "\n")
    return out


def _dropped(name: str, drop: tuple[str, ...]) -> bool:
    if any(name == d or name.startswith(d.rstrip("/") + "/") for d in drop):
        return True
    return "/tests/" in f"/{name}"


def _stripped(data: bytes, scratch: Path, strip: str) -> bytes:
    path = scratch / "elf"
    path.write_bytes(data)
    done = subprocess.run([strip, "--strip-unneeded", str(path)], capture_output=True)
    return path.read_bytes() if done.returncode == 0 else data


def download(requirements: list[str], dest: Path, *, python: str, platform: str) -> list[Path]:
    """``pip download`` wheels of ``requirements`` (no dependencies) for ``python`` on
    ``platform`` into ``dest``; returns the wheels there. Raises CalledProcessError naming
    the requirement pip could not find."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    for requirement in requirements:
        subprocess.run(
            [
                sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                "--only-binary=:all:", "--python-version", python, "--platform", platform,
                "--platform", "any", "-d", str(dest), requirement,
            ],
            check=True,
        )  # fmt: skip
    return sorted(set(dest.glob("*.whl")) - before) or sorted(dest.glob("*.whl"))


INSTALL_SH = """#!/bin/sh
# Installs Ray (stripped) and the small wheels beside this file, then breakhis without its
# dependencies (the machine's own torch, numpy, pyarrow... stay). Run from the repository root.
set -e
here=$(dirname "$0")
python3 -m pip install --quiet --no-index --no-deps "$here"/*.whl
python3 -m pip install --quiet --no-deps --no-build-isolation -e .
python3 -c "import ray, torch; print('ray', ray.__version__, 'torch', torch.__version__)"
"""


def build_bundle(
    out: str,
    *,
    python: str = "3.12",
    platform: str = "manylinux2014_x86_64",
    small: tuple[str, ...] = SMALL_WHEELS,
    limit_mb: float = 48.0,
    ray_wheel: str | None = None,
) -> dict[str, int]:
    """Write the bundle (module docstring) into folder ``out``: {file name: bytes}.

    ``ray_wheel`` uses that Ray wheel instead of downloading one. Raises ValueError when
    the folder exceeds ``limit_mb`` MiB, and what pip raises for a wheel it cannot find.
    """
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(ray_wheel) if ray_wheel else download([RAY], Path(scratch), python=python,
                                                         platform=platform)[0]  # fmt: skip
        stripped = strip_wheel(raw, target)
        log.info("%s: %.1f MB -> %.1f MB", raw.name, raw.stat().st_size / 1e6,
                 stripped.stat().st_size / 1e6)  # fmt: skip
    download(list(small), target, python=python, platform=platform)
    (target / "install.sh").write_text(INSTALL_SH)
    os.chmod(target / "install.sh", 0o755)
    sizes = {p.name: p.stat().st_size for p in sorted(target.iterdir()) if p.is_file()}
    total = sum(sizes.values())
    if total > limit_mb * 1024**2:
        raise ValueError(
            f"{out}: the bundle is {total / 1024**2:.1f} MiB, over its limit of {limit_mb:g} MiB; "
            "drop a wheel from SMALL_WHEELS or more folders of Ray (STRIP_FOLDERS)"
        )
    return sizes


def main(argv: list[str] | None = None) -> int:
    """``python -m breakhis.dev.gpu_bundle OUT``: build the bundle and list its files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write the bundle into (e.g. gpu-bundle)")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (3.12)")
    parser.add_argument("--platform", default="manylinux2014_x86_64", help="wheel platform")
    parser.add_argument("--limit-mb", type=float, default=48.0, help="largest bundle, MiB")
    parser.add_argument("--ray-wheel", default=None, help="a Ray wheel to strip (no download)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sizes = build_bundle(args.out, python=args.python, platform=args.platform,
                         limit_mb=args.limit_mb, ray_wheel=args.ray_wheel)  # fmt: skip
    for name, size in sizes.items():
        print(f"{size / 1024**2:8.2f} MiB  {name}")
    print(f"{sum(sizes.values()) / 1024**2:8.2f} MiB  in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
