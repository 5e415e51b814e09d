"""The benchmark's own helpers (the benchmark itself runs with `make bench`, not in the test suite).

They are tested where they live (tools/load.py, tools/bench_report.py); tests do not import tools.bench."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from imgserve.worker.model import keras_labels
from tools.bench_report import Report
from tools.load import batch_sizes, serving_commands
from tools.standin import StandInModel


@pytest.mark.unit
def test_the_stand_in_model_answers_in_the_real_format():
    labels = set(keras_labels().tolist())
    result = StandInModel().classify(np.zeros((3, 224, 224, 3), np.uint8))
    assert len(result) == 3
    for predictions in result:
        assert len(predictions) == 5
        assert all(p["label"] in labels and p["probability"] == 0.0 for p in predictions)


@pytest.mark.unit
def test_serving_commands_leave_out_the_benchmarks_own():
    before = Counter({"info": 3, "lpush": 10, "getex": 5})
    after = Counter({"info": 9, "lpush": 20, "getex": 15, "lindex": 2})
    assert serving_commands(before, after) == Counter({"lpush": 10, "getex": 10})


@pytest.mark.unit
def test_batch_sizes_are_read_from_worker_debug_lines():
    log = "[t] [model] [run_model_server.py] batch done: 32 jobs: a b\n... batch done: 7 jobs: c\n"
    assert batch_sizes(log) == [32, 7]


@pytest.mark.unit
def test_goals_are_judged_and_written_as_markdown(capsys):
    report = Report()
    report.goal("ratio", 0.97, ">= 0.95", True, "0.970")
    report.goal("overhead", 12.0, "<= 10 ms", False, "12.0 ms")
    assert capsys.readouterr().out.splitlines() == [
        "   ratio: 0.970   goal >= 0.95: met",
        "   overhead: 12.0 ms   goal <= 10 ms: NOT met",
    ]
    text = report.markdown()
    assert "| ratio | 0.970 | >= 0.95 | met |" in text
    assert "| overhead | 12.0 ms | <= 10 ms | **NOT met** |" in text


@pytest.mark.unit
def test_a_timed_step_is_charged_its_own_cpu_less_the_timed_steps_inside_it():
    from tools import web_profile

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    inner = web_profile.timed("test: inner", lambda: spin(0.05))
    outer = web_profile.timed("test: outer", lambda: (spin(0.02), inner()))
    outer()
    assert 0.045 <= web_profile._totals["test: inner"] < 0.07
    assert 0.015 <= web_profile._totals["test: outer"] < 0.04


@pytest.mark.system
def test_the_front_door_profile_times_the_steps_of_real_requests():
    """A short real run: gunicorn with the profiled app, a stand-in worker, two clients."""
    from tools import front_door

    lines: list[str] = []
    out = front_door.run(("steps",), front_door.BASE_REV, rounds=1, seconds=2, clients=2, say=lines.append)
    steps = out["steps"]["steps_ms"]
    assert steps["decode and resize the image (prepare_image)"] > 0.5
    assert steps["multipart parse (request.files: uploads.py)"] > 0
    assert steps["Redis: LPUSH the job (WebQueue.enqueue_many)"] > 0
    assert 0 < steps["gunicorn: accept, read and parse HTTP, write the answer"] < out["steps"]["process_ms"] / 2
    assert out["steps"]["window"]["errors"] == 0 and out["steps"]["window"]["web_ms"] > 1
