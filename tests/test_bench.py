"""The benchmark's own helpers (the benchmark itself runs with `make bench`, not in the test suite)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from model import keras_labels
from tools.bench import Report, batch_sizes, serving_commands
from tools.standin import StandInModel


def test_the_stand_in_model_answers_in_the_real_format():
    labels = set(keras_labels().tolist())
    result = StandInModel().classify(np.zeros((3, 224, 224, 3), np.uint8))
    assert len(result) == 3
    for predictions in result:
        assert len(predictions) == 5
        assert all(p["label"] in labels and p["probability"] == 0.0 for p in predictions)


def test_serving_commands_leave_out_the_benchmarks_own():
    before = Counter({"info": 3, "lpush": 10, "getdel": 5})
    after = Counter({"info": 9, "lpush": 20, "getdel": 15, "lindex": 2})
    assert serving_commands(before, after) == Counter({"lpush": 10, "getdel": 10})


def test_batch_sizes_are_read_from_worker_debug_lines():
    log = "[t] [model] [run_model_server.py] batch done: 32 jobs: a b\n... batch done: 7 jobs: c\n"
    assert batch_sizes(log) == [32, 7]


def test_goals_are_judged_and_written_as_markdown(capsys):
    report = Report()
    report.goal("ratio", 0.97, ">= 0.95", True, "0.970")
    report.goal("overhead", 12.0, "<= 10 ms", False, "12.0 ms")
    assert "met" in capsys.readouterr().out
    text = report.markdown()
    assert "| ratio | 0.970 | >= 0.95 | met |" in text
    assert "| overhead | 12.0 ms | <= 10 ms | **NOT met** |" in text
