"""The repository's own contracts: CI runs the README's test command, and the benchmark suite stays importable."""
import ast
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


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every import statement in a file, wherever it sits (functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def test_no_import_cycle_in_fastlm_and_no_private_names_across_modules():
    """A module never imports one that imports it back, and no module reaches for another's _private names."""
    graph = {}
    for package in ("fastlm", "kernels"):
        for path in (ROOT / package).glob("*.py"):
            name = f"{package}.{path.stem}" if path.stem != "__init__" else package
            imports = _imports(path)
            graph[name] = {m for m, _ in imports if m.split(".")[0] == "fastlm" and m != "fastlm"}
            graph[name] |= {f"{m}.{n}" for m, names in imports if m == "fastlm" for n in names if (ROOT / "fastlm" / f"{n}.py").exists()}
            private = [f"{m}.{n}" for m, names in imports if m.split(".")[0] in ("fastlm", "kernels")
                       for n in names if n.startswith("_") and m != "kernels._utils"]
            assert not private, f"{name} imports private names: {private}"

    def reaches(start, target, seen=()):
        return any(dep == target or (dep not in seen and reaches(dep, target, (*seen, dep))) for dep in graph.get(start, ()))

    cycles = [name for name in graph if name.startswith("fastlm.") and reaches(name, name)]
    assert not cycles, f"import cycles through {cycles}"


def test_evaluate_computes_the_loss_through_the_model():
    """evaluate.py uses GPT.loss, so there is one copy of the head and loss: it imports nothing from kernels."""
    assert not [m for m, _ in _imports(ROOT / "fastlm" / "evaluate.py") if m.split(".")[0] == "kernels"]
