"""The GPU bundle's wheel stripping, on a small wheel built here (no download)."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from breakhis.dev.gpu_bundle import strip_wheel


def _wheel(path: Path) -> Path:
    files = {
        "ray/__init__.py": b"__version__ = '2.60.0'\n",
        "ray/data/read.py": b"x = 1\n" * 100,
        "ray/jars/ray_dist.jar": b"\0" * 50_000,
        "ray/rllib/algo.py": b"y = 2\n" * 1000,
        "ray/data/tests/test_read.py": b"def test(): pass\n",
        "ray/dashboard/client/build/index.html": b"<html></html>" * 100,
        "ray-2.60.0.dist-info/METADATA": b"Name: ray\nVersion: 2.60.0\n",
    }
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("ray-2.60.0.dist-info/RECORD", "\n".join(f"{n},," for n in files))
    return path


def test_a_stripped_wheel_keeps_what_runs_and_a_true_record(tmp_path: Path) -> None:
    source = _wheel(tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl")
    out = tmp_path / "out"
    out.mkdir()
    stripped = strip_wheel(source, out)
    assert stripped.name == source.name and stripped.stat().st_size < source.stat().st_size
    with zipfile.ZipFile(stripped) as wheel:
        names = set(wheel.namelist())
        assert names == {
            "ray/__init__.py",
            "ray/data/read.py",
            "ray-2.60.0.dist-info/METADATA",
            "ray-2.60.0.dist-info/RECORD",
        }
        record = wheel.read("ray-2.60.0.dist-info/RECORD").decode().splitlines()
        for row in record:
            name, digest, size = row.split(",")
            if name.endswith("RECORD"):
                continue
            data = wheel.read(name)
            want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={want}" and int(size) == len(data)
    with pytest.raises(ValueError, match="not a wheel"):
        bad = tmp_path / "bad.whl"
        with zipfile.ZipFile(bad, "w") as wheel:
            wheel.writestr("x.py", "")
        strip_wheel(bad, out)
