"""The benchmark harness times only the work: the L2 flush has finished before pytest-benchmark's timer starts,
and each timed round waits for the GPU. Checked on the CPU by recording the order of the harness's CUDA calls."""
import types

import torch

from bench import conftest as harness


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, name, value=None):
        return lambda *args, **kwargs: self.events.append(name) or value


def test_flush_finishes_before_the_timer_and_rounds_synchronise(monkeypatch):
    record = Recorder()
    for name, value in [("synchronize", None), ("reset_peak_memory_stats", None), ("memory_allocated", 0),
                        ("max_memory_allocated", 0), ("get_device_name", "fake GPU")]:
        monkeypatch.setattr(torch.cuda, name, record(name, value))

    class Flush:
        def numel(self):
            return 0

        def zero_(self):
            record.events.append("flush")

    class Benchmark:
        extra_info = {}
        stats = types.SimpleNamespace(stats=types.SimpleNamespace(median=1.0))

        def pedantic(self, target, setup, rounds, iterations, warmup_rounds):
            for _ in range(rounds):
                setup()
                record.events.append("timer starts")
                target()
                record.events.append("timer stops")

    harness.time_on_gpu(Benchmark(), lambda: record.events.append("work"), Flush(), rounds=2, warmup=1)
    timed = [e for e in record.events[record.events.index("flush"):] if e != "get_device_name"]
    assert timed == ["flush", "synchronize", "timer starts", "work", "synchronize", "timer stops"] * 2, timed
