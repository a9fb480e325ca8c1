"""The kernels' static instruction counts stay within 10% of the committed table, and no 16-bit kernel spills.

bench/static_counts.py compiles every kernel at GPT-2's real call shapes ahead of time (no GPU) and counts the SASS
instructions of its main loop per unit of work (a static proxy, not a timing). This test runs it for sm_90 in a
subprocess (the interpreter that tests/conftest.py turns on would replace the kernels) and compares each row with
bench/results/static-counts-sm90-triton<version>.json for the Triton that compiled: that of this test's Python,
or of FASTLM_AOT_PYTHON=<python> (e.g. one with triton 3.6, the GPU machines' version), as in test_aot_compile.py.
Without a committed table for that version the test skips. FASTLM_STATIC_COUNTS_ARCHS=80,90 checks sm_80 too.

After changing a kernel on purpose (re-tuning, a new kernel or case), regenerate the tables and commit them:

    python -m bench.static_counts --write

(with the same Python as above; add `--tutorial <copy of Triton's python/tutorials/06-fused-attention.py>` to keep
the tutorial's reference rows). The table must describe the kernels as they are: a row it has that the kernels no
longer produce, or a new row it lacks, fails here too until it is regenerated.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
TOLERANCE = 1.10  # a count may rise at most 10% above the committed table
REGENERATE = "python -m bench.static_counts --write"
ARCHS = [int(a) for a in os.environ.get("FASTLM_STATIC_COUNTS_ARCHS", "90").split(",")]


def _python() -> str:
    return os.environ.get("FASTLM_AOT_PYTHON", sys.executable)


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTLM_TUTORIAL06")}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(ROOT))
    return env


@pytest.fixture(scope="module")
def triton_version(tmp_path_factory) -> str:
    proc = subprocess.run([_python(), "-c", "import triton; print(triton.__version__)"], capture_output=True, text=True,
                          env=_env(tmp_path_factory.mktemp("version")))
    if proc.returncode:
        pytest.skip(f"triton does not import in {_python()}: {proc.stderr.strip()[-300:]}")
    return proc.stdout.strip()


def _rows(result: dict) -> dict:
    return {(r["case"], r["kernel"]): r for r in result["records"] if not r["kernel"].startswith("tutorial06")}


@pytest.mark.parametrize("arch", ARCHS)
def test_static_counts_within_committed_table(arch, triton_version, tmp_path):
    committed_path = RESULTS / f"static-counts-sm{arch}-triton{triton_version}.json"
    if not committed_path.exists():
        pytest.skip(f"no committed static-count table for triton {triton_version} on sm_{arch} ({committed_path.name}); "
                    f"make one with `{REGENERATE}`")
    out = tmp_path / "counts.json"
    proc = subprocess.run([_python(), "-m", "bench.static_counts", "--arch", str(arch), "--json", str(out),
                           "--out", str(tmp_path / "counts.md")],
                          cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    fresh, committed = _rows(json.loads(out.read_text())), _rows(json.loads(committed_path.read_text()))

    failed = [f"{case} {kernel}: {r['error'][:300]}" for (case, kernel), r in fresh.items() if not r["ok"]]
    assert not failed, "kernels failed to compile:\n" + "\n".join(failed)
    spills = [f"{case} {kernel}: {r['stack']} bytes of stack ({r['registers']} registers)"
              for (case, kernel), r in fresh.items() if r["dtype"] in ("bfloat16", "float16") and r["stack"] > 0]
    assert not spills, f"16-bit kernels spill registers on sm_{arch}:\n" + "\n".join(spills)

    missing, new = sorted(committed.keys() - fresh.keys()), sorted(fresh.keys() - committed.keys())
    assert not missing and not new, (
        f"the committed table ({committed_path.name}) does not describe the kernels as they are: rows it has that "
        f"were not produced {missing}, rows it lacks {new}; regenerate it with `{REGENERATE}`")
    risen = [f"{case} {kernel}: {fresh[case, kernel]['per_unit']:.4g} warp-instructions per {committed[case, kernel]['unit']}, "
             f"committed {committed[case, kernel]['per_unit']:.4g}"
             for case, kernel in sorted(fresh) if fresh[case, kernel]["per_unit"] > TOLERANCE * committed[case, kernel]["per_unit"]]
    assert not risen, (f"static counts on sm_{arch} rose more than {TOLERANCE - 1:.0%} above the committed table "
                       f"{committed_path.name} (if intended, regenerate it with `{REGENERATE}`):\n" + "\n".join(risen))
