"""Every Triton kernel, run by the Triton interpreter on the CPU, agrees with its torch twin on random inputs
of many shapes (GQA groups of 1-4, head dims and block sizes that are not powers of two, split-KV partitions,
sliding windows, soft caps), in float32 and bfloat16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.kernels.interpreted import run_interpreted
from tokenmill.kernels.checks import KernelCase, kernel_cases

pytest.importorskip("triton")  # tests extra: the kernels need it, even interpreted

DTYPES = ("float32", "bfloat16")
CASES = [case.name for name in DTYPES for case in kernel_cases(False, torch.device("cpu"), getattr(torch, name))]


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return run_interpreted(Path(__file__).with_name("kernel_cases_script.py"), "layers", *DTYPES)


@pytest.mark.parametrize("name", CASES)
def test_kernel_agrees_with_its_twin(name: str, results: dict[str, dict]) -> None:
    result = results[name]
    assert result["ok"], result


def test_every_kernel_family_is_covered() -> None:
    families = {name.split()[0] for name in CASES}
    assert families == {"kv_store", "rms_norm", "rotary", "silu_and_mul", "gelu_tanh_and_mul", "decode", "varlen"}


def test_a_kernel_off_by_more_than_rounding_fails_its_case() -> None:
    want = torch.randn(64, 32)
    assert KernelCase("off", 1e-2, lambda: (want * 1.02, want)).run()["ok"] is False
    assert KernelCase("nan", 1e-2, lambda: (want.masked_fill(want > 2, float("nan")), want)).run()["ok"] is False
    assert KernelCase("same", 1e-2, lambda: (want.clone(), want)).run()["ok"] is True


def test_case_names_are_unique_at_both_sizes() -> None:
    # The device check reports results by name: two cases with one name would hide one of them.
    assert len(set(CASES)) == len(CASES)
    full = [case.name for case in kernel_cases(True, torch.device("cpu"), torch.bfloat16)]
    assert len(set(full)) == len(full)
