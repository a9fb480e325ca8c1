"""Every kernel configuration compiles ahead of time for Ampere (sm_80) and Hopper (sm_90), fits in shared
memory, and spills no register in any 16-bit configuration (fp32 at most a few bytes, except fp32 attention, whose
exact FMA matmuls are the accuracy path). This is what keeps a kernel that only works in the interpreter from
landing: the CPU interpreter accepts code that the GPU compiler rejects.

FASTLM_AOT_PYTHON=/path/to/python runs the compiler under another environment, e.g. one with triton 3.6 (the
GPU machines' version) beside CI's 3.9; without it the test process's own Python is used."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block: A100, H100
# fp32 only: ptxas spills 12 bytes in a few sm_80 norm backward configs with 80 registers in use (seen 2026-11-22);
# a larger stack means a block too big for the register file, which costs real bandwidth. 16-bit configs: none.
MAX_STACK_BYTES_FP32 = 32
# The one 16-bit spill left, in a file this test does not own: kernels/norms.py's streaming LayerNorm forward (with
# bias, BLOCK_N = 4096, 4 warps) spills 8 bytes on sm_80 under triton 3.6 (not 3.9; seen 2026-12-01). Listed so that
# it stays at most that and nothing joins it; remove the entry once norms.py's tile is changed.
KNOWN_16BIT_SPILLS = {("_norm_fwd_kernel", 80, 4096, False, False, True): 8}  # + SINGLE_PASS, IS_RMS, HAS_BIAS: bytes


def _known_spill(r: dict) -> int:
    key = (r["kernel"], r["arch"], r.get("BLOCK_N"), r.get("SINGLE_PASS"), r.get("IS_RMS"), r.get("HAS_BIAS"))
    return KNOWN_16BIT_SPILLS.get(key, 0)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("family", ["layer_norm", "cross_entropy", "attention"])
def test_every_config_compiles_for_gpu(family, arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(ROOT))
    python = os.environ.get("FASTLM_AOT_PYTHON", sys.executable)
    proc = subprocess.run([python, "-m", "tests.kernels.aot_compile", family, str(arch)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert records, "no kernel configuration was compiled"
    failures = [r for r in records if not r["ok"]]
    assert not failures, "\n".join(f"{r['kernel']} {r}" for r in failures[:5])
    too_big = [r for r in records if r["shared"] > SHARED_MEMORY_LIMIT[arch]]
    assert not too_big, f"shared memory over the sm_{arch} limit: {too_big[:5]}"
    spills = [r for r in records if r["dtype"] != "fp32" and r["stack"] > _known_spill(r)]
    assert not spills, f"register spills in 16-bit configs ({len(spills)}): {spills[:5]}"
    # fp32 attention does its matmuls as FMA loops (exact, no tensor cores) and spills: it is the accuracy path.
    spills = [r for r in records if r["dtype"] == "fp32" and r["stack"] > MAX_STACK_BYTES_FP32 and not r["kernel"].startswith("_attn")]
    assert not spills, f"register spills in fp32 configs: {spills[:5]}"
