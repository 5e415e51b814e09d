"""The client scripts simple_request.py and stress_test.py, against a live stack and a dead port."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import threading
import uuid

import pytest
import requests

from imgserve.client import stress_test
from imgserve.launch.local_redis import free_port
from imgserve.worker.model import keras_labels
from tools.processes import PROJECT, live_stack, sample_image_bytes, server_env

pytestmark = pytest.mark.system

LABELS = set(keras_labels().tolist())
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def stack(redis_server):
    env = server_env(redis_server.url, f"clients-{uuid.uuid4().hex[:6]}", BATCH_WAIT_MS=5)
    with live_stack(env) as (_, web):
        yield web


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(sample_image_bytes())
    return path


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=PROJECT, capture_output=True, text=True, timeout=300)


# ---- simple_request.py -----------------------------------------------------------------------


def test_simple_request_prints_five_ranked_lines(stack, image_file):
    result = run_script("simple_request.py", str(image_file), "--url", stack.url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 5
    parsed = [re.fullmatch(r"(\d)\. (\S+): (\d\.\d{4})", line) for line in lines]
    assert all(parsed), lines
    assert [int(m.group(1)) for m in parsed] == [1, 2, 3, 4, 5]
    assert all(m.group(2) in LABELS for m in parsed)
    probabilities = [float(m.group(3)) for m in parsed]
    assert probabilities == sorted(probabilities, reverse=True)


def test_simple_request_json_prints_the_servers_json(stack, image_file):
    result = run_script("simple_request.py", str(image_file), "--url", stack.url, "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["success"] is True
    assert len(body["predictions"]) == 5


def test_simple_request_server_down_says_start_it(image_file):
    result = run_script("simple_request.py", str(image_file), "--url", dead_url(), "--timeout", "5")
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "make run" in result.stderr and "Traceback" not in result.stderr


def test_simple_request_missing_file(tmp_path):
    result = run_script("simple_request.py", str(tmp_path / "nope.jpg"), "--url", dead_url())
    assert result.returncode == 2
    assert "no such file" in result.stderr and "Traceback" not in result.stderr


def test_simple_request_shows_the_servers_error(stack, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    server_error = requests.post(stack.url + "/predict", files={"image": text_file.read_bytes()}, timeout=30).json()
    result = run_script("simple_request.py", str(text_file), "--url", stack.url)
    assert result.returncode == 1
    assert "400" in result.stderr
    assert server_error["error"] in result.stderr


def test_simple_request_timeout_is_reported():
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        result = run_script("simple_request.py", "simple_request.py", "--url", url, "--timeout", "0.5")
    assert result.returncode == 1
    assert "no answer" in result.stderr and "Traceback" not in result.stderr


# ---- stress_test.py --------------------------------------------------------------------------


def summary_counts(output: str) -> dict[str, int]:
    return {key: int(value) for key, value in re.findall(r"^(requests|successes|failures):\s+(\d+)$", output, re.M)}


def test_stress_test_against_live_stack(stack, tmp_path, capsys):
    csv_path, plot_path = tmp_path / "run.csv", tmp_path / "latency.png"
    argv = ["--url", stack.url, "--requests", "20", "--concurrency", "4", "--gap", "0.01"]
    code = stress_test.main(argv + ["--csv", str(csv_path), "--plot", str(plot_path)])
    output = capsys.readouterr().out
    assert code == 0, output
    assert not [t for t in threading.enumerate() if t.name.startswith(stress_test.THREAD_PREFIX)]
    counts = summary_counts(output)
    assert counts == {"requests": 20, "successes": 20, "failures": 0}
    assert re.search(r"latency \(successful requests\): p50 \d+ ms, p95 \d+ ms, p99 \d+ ms, max \d+ ms", output)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20
    assert sorted(int(row["index"]) for row in rows) == list(range(20))
    assert {row["status"] for row in rows} == {"200"} and {row["error"] for row in rows} == {""}
    assert plot_path.read_bytes().startswith(PNG_SIGNATURE)


def test_stress_test_server_down_exits_non_zero(tmp_path):
    result = run_script("stress_test.py", "--url", dead_url(), "--requests", "3", "--gap", "0", "--no-progress")
    assert result.returncode == 1, result.stdout + result.stderr
    assert summary_counts(result.stdout) == {"requests": 3, "successes": 0, "failures": 3}
    assert "connection error: 3" in result.stdout
    assert "make run" in result.stdout


def test_stress_test_missing_image_file(tmp_path, capsys):
    assert stress_test.main(["--image", str(tmp_path / "nope.jpg"), "--url", dead_url()]) == 2
    assert "no such file" in capsys.readouterr().err


def test_send_one_records_timeouts_and_connection_errors():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        silent = f"http://127.0.0.1:{listener.getsockname()[1]}"
        timed_out = stress_test.send_one(silent, b"x", 0, 0.0, timeout=0.3)
    refused = stress_test.send_one(dead_url(), b"x", 1, 0.0, timeout=5)
    assert (timed_out.kind, timed_out.status) == ("timeout", None)
    assert (refused.kind, refused.status) == ("connection error", None)
    assert not timed_out.ok and not refused.ok


def test_summarize_counts_errors_by_kind_and_percentiles_of_successes():
    good = [stress_test.Outcome(i, 0.0, latency=i / 1000) for i in range(1, 101)]  # 1 ms .. 100 ms
    bad = [
        stress_test.Outcome(101, 0.0, 9.0, status=503, error="HTTP 503: busy"),
        stress_test.Outcome(102, 0.0, 9.0, status=503, error="HTTP 503: busy"),
        stress_test.Outcome(103, 0.0, 9.0, error="connection error: ConnectionError"),
        stress_test.Outcome(104, 0.0, 9.0, error="timeout: no answer within 5 s"),
        stress_test.Outcome(105, 0.0, 9.0, status=200, error="bad answer: success is not true"),
    ]
    summary = stress_test.summarize(good + bad, wall=10.0)
    assert (summary.total, summary.successes, summary.failures) == (105, 100, 5)
    assert summary.errors == {"HTTP 503": 2, "bad answer": 1, "connection error": 1, "timeout": 1}
    assert summary.p50 == pytest.approx(0.0505) and summary.p95 == pytest.approx(0.09505)
    assert summary.p99 == pytest.approx(0.09901) and summary.max == pytest.approx(0.1)
    assert summary.throughput == pytest.approx(10.5)


def test_summary_without_successes_has_no_latency():
    outcomes = [stress_test.Outcome(0, 0.0, 0.01, error="connection error: ConnectionError")]
    summary = stress_test.summarize(outcomes, wall=1.0)
    assert summary.max is None
    text = stress_test.format_summary(summary)
    assert "latency: n/a" in text and "make run" in text


# ---- submitted jobs, top_k, the /predict URL --------------------------------------------------


def test_simple_request_async_submits_polls_and_prints_the_top_k(stack, image_file):
    result = run_script("simple_request.py", str(image_file), "--url", stack.url + "/predict", "--async",
                        "--top-k", "3")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3 and "job done after" in result.stderr


@pytest.mark.parametrize("value", ["0", "21", "x"])
def test_simple_request_refuses_a_top_k_out_of_range(image_file, value):
    result = run_script("simple_request.py", str(image_file), "--top-k", value)
    assert result.returncode == 2 and "1 to 20" in result.stderr


@pytest.mark.parametrize("later", [False, True], ids=["predict", "async"])
def test_stress_test_takes_the_predict_url_and_async(stack, capsys, later):
    argv = ["--url", stack.url + "/predict/", "--requests", "6", "--concurrency", "3", "--gap", "0", "--no-progress"]
    code = stress_test.main(argv + (["--async"] if later else []))
    output = capsys.readouterr().out
    assert code == 0, output
    assert summary_counts(output) == {"requests": 6, "successes": 6, "failures": 0}
    assert ("/jobs (then polling each job), 3 threads" in output) is later


# ---- a server with API_KEYS set: --api-key, IMGSERVE_API_KEY -----------------------------------

API_KEY = "clients-test-key-" + "k" * 16


@pytest.fixture(scope="module")
def keyed_stack(redis_server):
    env = server_env(redis_server.url, f"keyed-{uuid.uuid4().hex[:6]}", BATCH_WAIT_MS=5, API_KEYS=API_KEY)
    with live_stack(env) as (_, web):
        yield web


def run_with_key_env(*args: str, key: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "IMGSERVE_API_KEY"}
    if key is not None:
        env["IMGSERVE_API_KEY"] = key
    return subprocess.run([sys.executable, *args], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300)


def test_simple_request_without_a_key_says_the_server_needs_one(keyed_stack, image_file):
    result = run_with_key_env("simple_request.py", str(image_file), "--url", keyed_stack.url, key=None)
    assert result.returncode == 1
    assert "the server needs an API key: --api-key or IMGSERVE_API_KEY" in result.stderr
    assert "401" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "key_env"),
    [(["--api-key", API_KEY], None), ([], API_KEY), (["--async"], API_KEY), (["--api-key", API_KEY], "wrong-key")],
    ids=["flag", "environment", "environment-async", "flag-wins"],
)
def test_simple_request_sends_the_key_from_the_flag_or_the_environment(keyed_stack, image_file, flags, key_env):
    result = run_with_key_env("simple_request.py", str(image_file), "--url", keyed_stack.url, *flags, key=key_env)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 5


@pytest.mark.parametrize("later", [False, True], ids=["predict", "async"])
def test_stress_test_sends_the_key(keyed_stack, later):
    argv = ["stress_test.py", "--url", keyed_stack.url, "--requests", "4", "--gap", "0", "--no-progress"]
    result = run_with_key_env(*argv, *(["--async"] if later else []), "--api-key", API_KEY, key=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary_counts(result.stdout) == {"requests": 4, "successes": 4, "failures": 0}
    from_env = run_with_key_env(*argv, key=API_KEY)
    assert summary_counts(from_env.stdout)["successes"] == 4, from_env.stdout


def test_stress_test_without_a_key_counts_401s_and_says_why(keyed_stack):
    argv = ["stress_test.py", "--url", keyed_stack.url, "--requests", "3", "--gap", "0", "--no-progress"]
    result = run_with_key_env(*argv, key=None)
    assert result.returncode == 1
    assert "HTTP 401: 3" in result.stdout
    assert "the server needs an API key: --api-key or IMGSERVE_API_KEY" in result.stdout
