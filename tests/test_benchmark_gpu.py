"""``breakhis benchmark gpu`` on a machine without a GPU: the parts that need none run, the
ones that do are recorded as failed with the reason, and the figures are written anyway."""

from __future__ import annotations

import json

import pytest
import torch

from breakhis.benchmarks.gpu import GpuBenchmarkConfig, run_gpu_benchmark


def test_bad_parts_are_refused_naming_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="accepted predictor, decode, train, score"):
        GpuBenchmarkConfig(parts=("predictor", "bogus"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a GPU")
def test_a_part_that_needs_a_gpu_fails_alone_and_the_others_are_kept(tmp_path) -> None:
    config = GpuBenchmarkConfig(
        workdir=str(tmp_path), parts=("predictor", "decode"), arch="smallcnn", image_size=32
    )
    result = run_gpu_benchmark(config)
    assert "needs a CUDA GPU" in result.errors["predictor"]
    decode = result.parts["decode"]
    assert decode["tiles"] > 0 and decode["ms_per_tile"] > 0
    assert decode["tiles_per_s_all_cpus"] > 1000 / decode["ms_per_tile"] * 0.99
    written = json.loads((tmp_path / "benchmark-gpu.json").read_text())
    assert written["parts"]["decode"] == decode and "predictor" in written["errors"]
    table = (tmp_path / "benchmark-gpu.md").read_text()
    assert "predictor: FAILED" in table and "PNG decode" in table
