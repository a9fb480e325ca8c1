"""The repository's own contracts: CI runs the README's test command, and the benchmark suite stays importable."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    marker = readme.index("# install and run the tests")
    command = readme[marker + 1]
    assert command.endswith("pytest") and "pip install torch==2.13.0" in command
    assert "README.md" in (ROOT / ".ci" / "run").read_text()


def test_benchmarks_collect_without_a_gpu():
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench", "--collect-only", "-q"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " collected" in proc.stdout
