"""The CUDA C++ decode attention: its host-side planning and choice on any machine, the kernel
itself against the PyTorch reference where a GPU and CuPy are present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoflow.kernels import decode_attention
from nanoflow.kernels import decode_attention_cuda as cuda_kernel
from nanoflow.kernels.decode_attention import (
    CONFIG_ENV,
    _cuda_choice,
    force_config,
    forced_config,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
    parse_cuda_config,
)

ROOT = Path(__file__).resolve().parent.parent
GPU = torch.cuda.is_available() and cuda_kernel.available(torch.device("cuda"))


@pytest.mark.parametrize("batch", [1, 8, 64, 256, 1024, 4096])
@pytest.mark.parametrize("width", [1, 7, 16, 33, 512])
@pytest.mark.parametrize("warps", [128, 1056])
def test_split_plan_covers_the_table_and_splits_only_small_batches(batch, width, warps) -> None:
    splits, split_pages = cuda_kernel.split_plan(batch, 8, width, warps, 4)
    assert splits * split_pages >= width > (splits - 1) * split_pages  # no split is empty
    assert split_pages >= min(width, cuda_kernel.MIN_SPLIT_PAGES)
    if batch * 8 >= 4 * warps:
        assert splits == 1  # enough (sequence, head) items: the output is written directly
    elif width >= 2 * cuda_kernel.MIN_SPLIT_PAGES:
        assert splits > 1


def test_default_configs_fit_one_sm() -> None:
    for kv_elt in (1, 2):
        for group in range(1, cuda_kernel.MAX_GROUP + 1):
            for sms in (None, 16, cuda_kernel.FEW_SMS, 132):
                config = cuda_kernel.default_config(kv_elt, group, sms)
                assert config.stages >= 2
                assert cuda_kernel.smem_bytes(config, kv_elt, group) <= cuda_kernel.SMEM_PER_SM
    # a 16-bit cache: 12 warps where a two-stage ring fits (the usual GQA group of 4)
    assert cuda_kernel.default_config(2, 4) == cuda_kernel.CudaDecodeConfig(12, 2)
    # fp8 pages are half the bytes: on many SMs two pages a step, on few SMs more warps
    assert cuda_kernel.default_config(1, 4).pages_per_stage == 2
    assert cuda_kernel.default_config(1, 4, 132).pages_per_stage == 2
    assert cuda_kernel.default_config(1, 4, 16) == cuda_kernel.CudaDecodeConfig(16, 2)


def test_shared_memory_holds_the_rings_and_the_queues() -> None:
    config = cuda_kernel.CudaDecodeConfig(warps=8, stages=3, pages_per_stage=2)
    ring = 8 * 3 * (2 * 2 * 16 * 128 * 2 + 4 * 128 * 2)
    assert cuda_kernel.smem_bytes(config, 2, 4) == ring + 8 * 2 * 4 * 4


def test_a_forced_configuration_is_parsed_or_named_wrong() -> None:
    assert parse_cuda_config("cuda:8,3") == cuda_kernel.CudaDecodeConfig(8, 3)
    assert parse_cuda_config("cuda:4,2,2,8,2") == cuda_kernel.CudaDecodeConfig(4, 2, 2, 8, 2)
    for bad in ("cuda:8", "cuda:8,x", "cuda:8,0", "cuda:1,2,3,4,5,6"):
        with pytest.raises(ValueError, match=CONFIG_ENV):
            parse_cuda_config(bad)


def paged_inputs(lens: list[int], kv_dtype: torch.dtype, device: str, width: int | None = None):
    """Random q, caches and shuffled block tables for ``lens`` (width padded to ``width``)."""
    pages = [-(-n // 16) for n in lens]
    width = max(max(pages, default=1), width or 1)
    total = max(sum(pages), 1)
    k = torch.randn(total, 8, 16, 128, device=device).to(kv_dtype)
    v = torch.randn(total, 8, 16, 128, device=device).to(kv_dtype)
    perm = torch.randperm(total, device=device).to(torch.int32)
    tables = torch.zeros(len(lens), width, dtype=torch.int32, device=device)
    start = 0
    for i, n in enumerate(pages):
        tables[i, :n] = perm[start : start + n]
        start += n
    q = torch.randn(len(lens), 32, 128, device=device, dtype=torch.bfloat16)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k, v, tables, lens_t


def test_the_cuda_kernel_is_chosen_only_where_it_runs(monkeypatch) -> None:
    monkeypatch.setattr(decode_attention, "_forced", "")  # restored after the test
    args = paged_inputs([5, 40], torch.bfloat16, "cpu")
    assert _cuda_choice(*args) is None  # CPU tensors: never
    force_config("triton")
    assert _cuda_choice(*args) is None  # forced off
    assert forced_config() == "triton"
    force_config(None)
    assert forced_config() is None


def test_memory_unit_script_dry_run(tmp_path) -> None:
    """Without a GPU the script checks the split plans and the interpreter's kernels and writes
    its result file (and no targets)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "memory_unit.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "cpu" / "memory_unit" / "llama-3-8b-shapes.json").read_text())
    assert record["checks"] and all(c["ok"] for c in record["checks"])
    assert set(record["dry_run"]["split_plans"]) == {"b64_ctx8192", "b256_ctx2048",
                                                      "b1024_ctx512", "b1024_ctx256"}  # fmt: skip
    assert not (tmp_path / "targets").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU of SM 8.9+ and CuPy")
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("num_ctas", [None, 16])
@pytest.mark.parametrize("config", [None, "cuda:8,3,1,4,1", "cuda:4,3,1,1,2"])
def test_cuda_decode_matches_the_reference(kv_dtype, num_ctas, config, monkeypatch) -> None:
    """Fresh random lengths (zero, one token, partial pages, long rows) in a wide table; every
    element written (the output starts as NaN)."""
    monkeypatch.setattr(decode_attention, "_forced", config or "")
    gen = torch.Generator().manual_seed(0)
    for batch, max_len in ((3, 40), (64, 3000), (300, 700)):
        lens = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
        lens[0] = 0
        lens[-1] = 1
        args = paged_inputs(lens, kv_dtype, "cuda", width=256)
        assert _cuda_choice(*args) is not None
        out = torch.full_like(args[0], float("nan"))
        paged_decode_attention_triton(*args, 0.088, num_ctas=num_ctas, out=out)
        ref = paged_decode_attention_ref(*args, 0.088)  # a zero-length row: zeros
        err = (out.float() - ref.float()).norm() / ref.float().norm()
        assert torch.isfinite(out).all() and err < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU of SM 8.9+ and CuPy")
@pytest.mark.parametrize("group", [1, 2, 7, 8])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_other_gqa_groups_match_the_reference(group, kv_dtype) -> None:
    """The groups the engine does not send to the kernel yet, launched directly: the check
    that lets CHECKED_GROUPS grow."""
    lens = torch.randint(1, 900, (40,), generator=torch.Generator().manual_seed(group)).tolist()
    q, k, v, tables, lens_t = paged_inputs(lens, kv_dtype, "cuda", width=64)
    q = torch.randn(len(lens), 8 * group, 128, device="cuda", dtype=torch.bfloat16)
    assert cuda_kernel.supports(q, k, v, groups=frozenset({group}))
    config = cuda_kernel.default_config(k.element_size(), group, 132)
    out = torch.full_like(q, float("nan"))
    cuda_kernel.launch_decode_cuda(
        q, k, v, tables, lens_t, 0.088, 132, 1, 64, out, None, None, config
    )  # one split: the output is written directly
    ref = paged_decode_attention_ref(q, k, v, tables, lens_t, 0.088)
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert torch.isfinite(out).all() and err < 2e-2
