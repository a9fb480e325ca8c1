"""bench/report.py renders pytest-benchmark JSON: ratios to eager and to the best other provider, peak fractions."""
import json

import pytest

from bench.report import main, render


def fake_results():
    def bench(provider, median, **info):
        return {"group": "layer_norm 16384x768 forward", "name": f"bench_norm[{provider}]", "params": {"provider": provider},
                "stats": {"median": median}, "extra_info": {"device": "NVIDIA H100 80GB HBM3", "peak_memory_mib": 24.0, **info}}
    return {"datetime": "2026-11-22T12:00:00", "version": "5.3.1", "commit_info": {"id": "abcdef1234567"},
            "benchmarks": [bench("eager", 0.004, gb_per_s=1000.0), bench("triton", 0.002, gb_per_s=2680.0),
                           bench("compile", 0.0025, gb_per_s=1600.0)]}


def test_table_has_ratios_and_peak_fractions():
    table = render(fake_results())
    assert "Device: NVIDIA H100 80GB HBM3" in table and "commit abcdef1234" in table
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ") and "provider" not in line}
    assert "| 2.000 | 2.00x | 1.25x | 2680 GB/s (80% of peak) |" in rows["triton"]
    assert "| 4.000 | 1.00x | 0.50x |" in rows["eager"]
    assert table.index("| triton") < table.index("| compile") < table.index("| eager"), "fastest first"


def test_cli_reads_a_file_and_rejects_a_bad_one(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(fake_results()))
    main([str(path)])
    assert "### layer_norm 16384x768 forward" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "bad.json")])
    assert info.value.code == 2 and "error:" in capsys.readouterr().err


def test_several_files_of_one_session_make_one_table(tmp_path, capsys):
    """gpu_session.sh writes one JSON per benchmark group; the report merges them."""
    first, second = fake_results(), fake_results()
    second["benchmarks"] = [dict(b, group="cross_entropy 16384x50257 forward_backward") for b in second["benchmarks"]]
    paths = []
    for i, data in enumerate((first, second)):
        paths.append(tmp_path / f"bench-{i}.json")
        paths[-1].write_text(json.dumps(data))
    main([str(p) for p in paths])
    table = capsys.readouterr().out
    assert "layer_norm 16384x768 forward" in table and "cross_entropy 16384x50257 forward_backward" in table
