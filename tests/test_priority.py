"""Priority levels: the fair-share chooser, the job's level on the wire, per-level caps, the claim across levels,
and release/reap returning each job to its own level (the Lua scripts against a real Redis)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from imgserve import settings
from imgserve.protocol import Job, JobError, job_metadata
from imgserve.protocol.acl import key_patterns
from imgserve.protocol.keys import Keys
from imgserve.protocol.priority import PRIORITIES, FairShare
from tests.support.workers import numbered_job

pytestmark = pytest.mark.unit

ALL_BUSY = dict.fromkeys(PRIORITIES, 10**9)


def job_at(n: int, priority: str) -> Job:
    job = numbered_job(n)
    job.priority = priority
    return job


def levels_of(raws: list[bytes]) -> list[str]:
    return [Job.from_json(raw).priority for raw in raws]


# ---- the chooser ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(8, 4, 1), (1, 1, 1), (3, 5, 2), (100, 1, 1)])
def test_picks_over_busy_levels_follow_the_weights_exactly_each_cycle(weights):
    share, cycle = FairShare(weights), sum(weights)
    picks = [share.pick(ALL_BUSY) for _ in range(cycle * 50)]
    assert Counter(picks) == {level: w * 50 for level, w in zip(PRIORITIES, weights, strict=True)}
    for start in range(0, len(picks), cycle):  # smooth: every cycle of sum(weights) picks, not only the total
        assert Counter(picks[start : start + cycle]) == dict(zip(PRIORITIES, weights, strict=True))


def test_an_empty_level_is_skipped_and_blocks_no_other():
    share = FairShare()
    assert share.pick({}) is None and share.pick({"high": 0, "normal": 0}) is None
    assert [share.pick({"low": 3}) for _ in range(5)] == ["low"] * 5
    assert share.plan({"high": 0, "normal": 2, "low": 1}, 10) == ["normal", "normal", "low"], "fewer than asked"
    assert share.plan({"high": 1, "normal": 0, "low": 100}, 4).count("low") == 3, "work-conserving"


def test_a_flood_of_high_never_starves_low():
    share, waiting = FairShare((8, 4, 1)), {"high": 10**6, "low": 10**6}
    picks = share.plan(waiting, 9 * 1000)
    assert picks.count("low") == 1000
    for start in range(len(picks) - 8):  # in any 9 consecutive picks, low's 1 in 9 at least
        assert "low" in picks[start : start + 9]


def test_an_idle_level_banks_no_credit_for_a_burst_later():
    share = FairShare((8, 4, 1))
    share.plan({"high": 10**6}, 1000)  # low had nothing waiting all along
    picks = share.plan({"high": 10**6, "low": 10**6}, 18)
    assert picks.count("low") == 2, picks


def test_weights_are_one_positive_whole_number_per_level():
    with pytest.raises(ValueError, match="one weight"):
        FairShare((8, 4))
    with pytest.raises(ValueError, match="one weight"):
        FairShare((8, 0, 1))
    assert settings.load(env={"PRIORITY_WEIGHTS": "2, 2,1"}, dotenv=False).priority_weights == (2, 2, 1)
    for bad in ("8,4", "8,4,0", "a,b,c", "8,4,1,1"):
        with pytest.raises(settings.SettingsError, match="PRIORITY_WEIGHTS"):
            settings.load(env={"PRIORITY_WEIGHTS": bad}, dotenv=False)


# ---- the wire and the keys ------------------------------------------------------------------------------------


def test_a_job_carries_its_level_on_the_wire_and_a_default_job_is_unchanged():
    assert "priority" not in json.loads(numbered_job(1).to_json())
    high = job_at(1, "high")
    assert json.loads(high.to_json())["priority"] == "high" and Job.from_json(high.to_json()) == high
    assert job_metadata(high.to_json())["priority"] == "high", "dead letters keep it"
    for bad in ("urgent", 1, None, "HIGH"):
        wire = json.loads(high.to_json()) | {"priority": bad}
        with pytest.raises(JobError, match="priority"):
            Job.from_json(json.dumps(wire))
        assert "priority" not in job_metadata(json.dumps(wire))


def test_normal_keeps_the_queue_key_and_the_other_levels_share_its_hash_tag():
    assert Keys("q").levels == {"high": "q:high", "normal": "q", "low": "q:low"}
    assert Keys("q", 2).levels == {"high": "{q:2}:high", "normal": "{q:2}", "low": "{q:2}:low"}
    web = key_patterns("q", "web")
    assert {"q", "q:high", "q:low", "{q:*}", "{q:*}:high", "{q:*}:low"} <= set(web)


# ---- against Redis --------------------------------------------------------------------------------------------


def test_max_queue_holds_for_each_level_on_its_own(queue):
    assert queue.web.enqueue_many([job_at(n, "high") for n in range(2)], 2)
    assert not queue.web.enqueue(job_at(2, "high"), 2), "high is full"
    assert queue.web.enqueue(job_at(3, "low"), 2) and queue.web.enqueue(job_at(4, "normal"), 2)
    submitted = job_at(5, "high")
    submitted.origin = "submitted"
    assert not queue.web.submit(submitted, 2)
    assert [d for d in queue.inspect.level_depths()] == [{"high": 2, "normal": 1, "low": 1}]
    assert queue.inspect.depth() == 4


def test_a_claim_takes_each_level_its_share_and_a_batch_mixes_levels(queue):
    for level in PRIORITIES:
        queue.web.enqueue_many([job_at(n, level) for n in range(30)], 100)
    share = FairShare((8, 4, 1))
    for slot in range(3):  # 3 batches of 13: exactly the weights each time
        batch = queue.worker.claim_batch("w", 13, 0, 0, slot=slot, share=share)
        assert Counter(levels_of(batch)) == {"high": 8, "normal": 4, "low": 1}
    assert queue.inspect.level_depths() == [{"high": 6, "normal": 18, "low": 27}]
    batch = queue.worker.claim_batch("w", 13, 0, 0, slot=3, share=share)
    assert Counter(levels_of(batch)) == {"high": 6, "normal": 6, "low": 1}, "high ran out: the others take its share"


def test_a_claim_blocks_on_the_level_it_took_last_and_finds_a_job_on_any_level_next_time(queue):
    share = FairShare()
    share.last = "low"
    queue.web.enqueue(job_at(1, "low"), 100)
    assert levels_of(queue.worker.claim_batch("w", 4, 0, 1, share=share)) == ["low"]
    queue.worker.finish_batch("w", [], [])
    queue.web.enqueue(job_at(2, "high"), 100)
    assert levels_of(queue.worker.claim_batch("w", 4, 0, 1, share=share)) == ["high"]


def test_release_returns_each_job_to_its_own_level(queue, redis_client):
    jobs = [job_at(n, level) for n, level in enumerate(PRIORITIES)]
    for job in jobs:
        queue.web.enqueue(job, 100)
    batch = queue.worker.claim_batch("w", 3, 0, 0)
    assert sorted(levels_of(batch)) == sorted(PRIORITIES)
    assert queue.worker.release("w", "test", count_attempt=True) == (3, 0)
    for job in jobs:
        [raw] = redis_client.lrange(queue.keys.level(job.priority), 0, -1)
        back = Job.from_json(raw)
        assert back.id == job.id and back.priority == job.priority and back.attempts == 1


def test_the_reaper_returns_a_dead_workers_jobs_to_their_own_levels(queue, redis_client):
    jobs = [job_at(n, level) for n, level in enumerate([*PRIORITIES, "high"])]
    redis_client.sadd(queue.keys.workers, "ghost")  # registered, no heartbeat: dead
    redis_client.rpush(queue.keys.processing("ghost", 0), *(job.to_json() for job in jobs[:2]))
    redis_client.rpush(queue.keys.processing("ghost", 5), *(job.to_json() for job in jobs[2:]))
    assert queue.worker.reap() == (1, 4, 0)
    assert queue.inspect.level_depths() == [{"high": 2, "normal": 1, "low": 1}]
    for job in jobs:
        ids = [Job.from_json(raw).id for raw in redis_client.lrange(queue.keys.level(job.priority), 0, -1)]
        assert job.id in ids


def test_a_dead_letter_keeps_its_jobs_level(queue, redis_client):
    job = job_at(1, "low")
    job.attempts = 2  # the next failure is its third delivery (MAX_ATTEMPTS=3)
    redis_client.rpush(queue.keys.processing("w"), job.to_json())
    assert queue.worker.release("w", "inference failed") == (0, 1)
    [letter] = queue.inspect.dead_letters()
    assert letter["job"]["priority"] == "low" and letter["job"]["id"] == job.id
