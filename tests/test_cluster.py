"""Sharded queues on a real local Redis Cluster: 3 primaries with a replica each, started by the suite.

The protocol on the cluster (hash tags, scripts that declare every key, spreading, fair claiming), then real
worker and web processes: predictions end to end, a worker killed under load, a primary stopped and
restarted, a manual failover under load, and a shard's slot moved to another primary under load. One cluster,
worker and web server are shared by the module; the tests that stop or move things run last and leave the
cluster whole again.
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import redis
import requests
from prometheus_client import REGISTRY
from redis.cluster import RedisCluster
from redis.crc import key_slot

from imgserve import settings
from imgserve.launch.local_redis import LocalCluster, LocalRedis
from imgserve.protocol import SLOTS, SUBMITTED, Claimer, Job, ResultListener, connect
from imgserve.protocol.claim import ROTATE_BLOCK
from imgserve.protocol.notifications import servers
from imgserve.protocol.priority import PRIORITIES
from imgserve.worker.cli import parse_args
from tests.support.freezing import freeze_holding_jobs
from tests.support.workers import MALFORMED, NumberedModel, RunningWorker, numbered_job, worker_config
from tools import processes
from tools.processes import PublishedResults, WebServer, Worker, env_queue, sample_image_bytes, server_env, wait_until
from tools.queues import Queues

pytestmark = pytest.mark.system

LEVELS = len(PRIORITIES)
SHARDS = 3
FAST_REAPING = dict(HEARTBEAT_TTL=2, REAP_INTERVAL=0.5)
post_image = functools.partial(processes.post_image, timeout=120)


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(primaries=3, replicas=1) as running:
        yield running


def spread_name(prefix: str) -> str:
    """A queue name whose shards land on three different primaries."""
    return LocalCluster(primaries=3).spread_queue_name(prefix, SHARDS)


@pytest.fixture
def cqueue(cluster) -> Queues:
    return Queues.on(connect(cluster.url), spread_name(f"t{uuid.uuid4().hex[:6]}"), result_ttl=60, shards=SHARDS)


def node_of(cluster: LocalCluster, queue: Queues, shard: int) -> LocalRedis:
    """The node that is the primary of a shard now, as the cluster itself says."""
    with redis.Redis(port=cluster.nodes[0].port) as client:
        slots = client.cluster("slots")
    slot = key_slot(queue.shards[shard].queue.encode())
    [port] = [int(entry[2][1]) for entry in slots if entry[0] <= slot <= entry[1]]
    return next(node for node in cluster.nodes if node.port == port)


def replica_of(cluster: LocalCluster, primary: LocalRedis) -> LocalRedis:
    """The node that replicates `primary`."""
    with redis.Redis(port=primary.port, decode_responses=True) as client:
        my_id = client.execute_command("CLUSTER", "MYID")
        nodes = client.cluster("nodes")
    [address] = [address for address, node in nodes.items() if node["master_id"] == my_id]
    port = int(address.split("@")[0].rsplit(":", 1)[1])
    return next(node for node in cluster.nodes if node.port == port)


# ---- the protocol on a cluster ------------------------------------------------------------------


def test_a_cluster_is_detected_from_the_server_and_every_key_of_a_shard_is_in_one_slot(cluster, redis_server):
    plain = Queues.on(connect(redis_server.url), "image_queue")
    assert not plain.cluster and [k.queue for k in plain.shards] == ["image_queue"]
    assert (plain.keys.workers, plain.keys.processing("w", 1)) == ("image_queue:workers", "image_queue:processing:w:1")
    queue = Queues.on(connect(cluster.url), "image_queue", shards=SHARDS)
    assert isinstance(queue.redis, RedisCluster) and queue.cluster
    assert [k.queue for k in queue.shards] == ["{image_queue:0}", "{image_queue:1}", "{image_queue:2}"]
    for keys in queue.shards:
        names = [keys.queue, keys.workers, keys.dead, keys.heartbeat("w"), keys.result("o", "j")]
        assert len({key_slot(name.encode()) for name in names + keys.processing_lists("w")}) == 1


def script_keys_touched(redis_server: LocalRedis, action) -> list[tuple[set[str], list[str]]]:
    """Run `action` under MONITOR: for each script run, (its declared KEYS, the keys its commands touched)."""
    runs: list[tuple[set[str], list[str]]] = []
    client = redis.Redis(port=redis_server.port)
    with client.monitor() as monitor:
        action()
        client_end = redis.Redis(port=redis_server.port)
        client_end.echo("end-of-test")
        while (entry := monitor.next_command())["command"] != "ECHO end-of-test":
            words = entry["command"].split(" ")
            if words[0] == "EVALSHA":
                numkeys = int(words[2])
                runs.append(({w.strip('"') for w in words[3 : 3 + numkeys]}, []))
            elif entry["client_type"] == "lua" and len(words) > 1:
                runs[-1][1].append(words[1].strip('"'))
    return runs


def test_every_script_touches_only_the_keys_it_declares(redis_server, queue_name):
    """A cluster runs a script on the slot of its KEYS: every key it touches must be among them."""
    queue = Queues.on(connect(redis_server.url), queue_name, result_ttl=60, shards=2, max_attempts=1)
    ghost = queue.shards[1]
    bad = json_job_without_image()

    def action() -> None:
        queue.redis.sadd(ghost.workers, "ghost")  # registered, no heartbeat: dead
        queue.redis.rpush(ghost.processing("ghost", 0), numbered_job(1).to_json(), MALFORMED["NaN deadline"])
        queue.redis.rpush(ghost.processing("ghost", SLOTS - 1), bad)
        assert queue.worker.reap() == (1, 0, 3), "out of attempts (MAX_ATTEMPTS=1) or unreadable: all dead-lettered"
        queue.redis.rpush(ghost.processing("w", 2), numbered_job(2).to_json())
        assert queue.worker.release("w", "inference failed", slot=2, shard=1) == (0, 1)
        queue.redis.rpush(ghost.processing("w", 3), b"x")
        queue.worker.finish_batch("w", [], [dead_letter(b"x")], slot=3, shard=1)

    runs = [run for run in script_keys_touched(redis_server, action) if run[1]]  # not the NOSCRIPT replies
    assert len(runs) == 3, "REAP, RELEASE and ACK ran"
    for declared, touched in runs:
        assert set(touched) <= declared, set(touched) - declared
    answered = [queue.web.take_result("00000000000f", numbered_job(n).id, 1) for n in (1, 2)]
    assert all(a is None or a["success"] is False for a in answered)


def json_job_without_image() -> bytes:
    job = numbered_job(3)
    return job.to_json().replace(b',"image":"', b',"picture":"')


def dead_letter(raw: bytes):
    from imgserve.protocol import DeadLetter

    return DeadLetter(raw, "unreadable")


def test_on_a_plain_redis_several_shards_are_tagged_and_their_results_notified(redis_server, queue_name):
    queue = Queues.on(connect(redis_server.url), queue_name, result_ttl=60, shards=2)
    assert [k.queue for k in queue.shards] == [f"{{{queue_name}:0}}", f"{{{queue_name}:1}}"]
    listener = ResultListener(queue.web, "00000000000f")  # numbered_job's origin
    listener.start()
    try:
        assert listener.wait_ready(5) and listener.mode == "notifications"
        listener.SAFETY_POLL = listener.MAX_SAFETY_POLL = 30  # only a notification can wake the waiter in time
        for job in (numbered_job(1), numbered_job(2)):
            with listener.expect(job.id):
                assert queue.web.enqueue(job, 100)
                threading.Timer(0.1, lambda job=job: finish_one(queue, job)).start()
                started = time.monotonic()
                assert listener.wait(job.id, time.time() + 20, job.shard) == {"success": True}
                assert time.monotonic() - started < 5
    finally:
        listener.stop()


def finish_one(queue: Queues, job: Job) -> None:
    [raw] = queue.worker.claim_batch("w", 1, 0, 1, shard=job.shard)
    queue.worker.finish_batch("w", [(Job.from_json(raw), {"success": True})], [], shard=job.shard)


def test_jobs_are_spread_evenly_over_the_shards_and_full_shards_are_skipped(cqueue):
    jobs = [numbered_job(n) for n in range(300)]
    assert all(cqueue.web.enqueue(job, max_queue=1000) for job in jobs)
    assert cqueue.inspect.depths() == [100, 100, 100]
    assert Counter(job.shard for job in jobs) == {0: 100, 1: 100, 2: 100}
    for keys in cqueue.shards:
        cqueue.redis.delete(keys.queue)
    assert all(cqueue.web.enqueue(numbered_job(n), max_queue=6) for n in range(6))  # two per shard
    assert not cqueue.web.enqueue(numbered_job(7), max_queue=6), "every shard full: refused"
    assert cqueue.inspect.depths() == [2, 2, 2]
    cqueue.redis.rpop(cqueue.shards[1].queue)
    late = numbered_job(8)
    assert cqueue.web.enqueue(late, max_queue=6) and late.shard == 1, "the one shard with room took it"


def test_a_worker_takes_its_batches_from_every_shard_in_turn(cqueue):
    for n in range(30):
        cqueue.web.enqueue(numbered_job(n), 1000)
    claimer = Claimer(cqueue.worker, "w", range(SHARDS), size=4, wait=0)
    claimer.registered.update(range(SHARDS))
    order = []
    for _ in range(6):
        shard, batch = claimer.claim(0)
        order.append(shard)
        cqueue.worker.finish_batch("w", [(Job.from_json(raw), {}) for raw in batch], [], 0, shard)
    assert sorted(order[:3]) == [0, 1, 2] and order[3:] == order[:3], "round robin: no shard waits for another"


def commands_served(queue: Queues) -> int:
    return sum(sum(int(v["calls"]) for v in node.info("commandstats").values()) for node in servers(queue.web))


def test_an_idle_worker_waits_in_redis_and_still_sees_a_job_on_any_shard_at_once(cqueue):
    claimer = Claimer(cqueue.worker, "idle", range(SHARDS), size=4, wait=0)
    claimer.registered.update(range(SHARDS))
    before, cpu, started = commands_served(cqueue), time.process_time(), time.monotonic()
    while time.monotonic() - started < 2.0:
        assert claimer.claim(0)[1] == []
    seconds = time.monotonic() - started
    per_second = (commands_served(cqueue) - before) / seconds
    # Per ROTATE_BLOCK: each shard's LLENs of the slot and of its LEVELS priority lists in one pipeline, then on the
    # last shard those again and one BLMOVE + the levels' LLENs; INFO aside.
    per_round = (1 + LEVELS) * (SHARDS + 1) + 1 + LEVELS
    assert per_second < per_round / ROTATE_BLOCK * 1.3, per_second
    assert (time.process_time() - cpu) / seconds < 0.15, "mostly waiting in Redis, not spinning"
    for shard in range(SHARDS):
        job = numbered_job(shard)
        cqueue.web._push(cqueue.shards[shard], [job.to_json()], 100)
        started = time.monotonic()
        got = claimer.claim(0)
        assert got[0] == shard and len(got[1]) == 1
        assert time.monotonic() - started < ROTATE_BLOCK + 0.15, "found within one blocking wait"
        cqueue.worker.finish_batch("idle", [], [], 0, shard)


def test_a_worker_pinned_to_a_shard_serves_only_that_shard(cluster, cqueue):
    flags = vars(parse_args(["--shards", "2,0"]))
    assert settings.load(env={"QUEUE_SHARDS": "3"}, dotenv=False, **flags).worker_shards == (0, 2)
    jobs = [numbered_job(n) for n in range(9)]
    for job in jobs:
        cqueue.web.enqueue(job, 100)
    mine = [job for job in jobs if job.shard == 1]
    config = worker_config(cluster.url, cqueue.name, QUEUE_SHARDS=SHARDS, WORKER_SHARDS=1)
    model = NumberedModel()
    claimed = {
        shard: REGISTRY.get_sample_value("worker_shard_jobs_total", {"shard": str(shard)}) or 0 for shard in (0, 1)
    }
    with RunningWorker(config, model) as running:
        wait_until(lambda: all(results_in(cqueue, mine)), 30, "the pinned shard's results")
        assert cqueue.inspect.depths() == [3, 0, 3]
        assert cqueue.inspect.worker_ids() == {running.worker.id}
        assert cqueue.redis.smembers(cqueue.shards[0].workers) == set(), "registered only where it serves"
    assert sum(model.seen.values()) == 3
    counted = {
        shard: REGISTRY.get_sample_value("worker_shard_jobs_total", {"shard": str(shard)}) or 0 for shard in (0, 1)
    }
    assert (counted[0] - claimed[0], counted[1] - claimed[1]) == (0, 3), "worker_shard_jobs_total counts per shard"


def results_in(queue: Queues, jobs: list[Job]) -> list[dict | None]:
    return [queue.web.take_result(job.origin, job.id, job.shard) for job in jobs]


def test_the_reaper_returns_a_dead_workers_jobs_in_each_shard(cqueue):
    for n in range(6):
        cqueue.web.enqueue(numbered_job(n), 100)
    cqueue.worker.heartbeat("doomed", 0.3)
    claimer = Claimer(cqueue.worker, "doomed", range(SHARDS), size=2, wait=0)
    claimer.registered.update(range(SHARDS))
    for slot in range(SHARDS):
        claimer.claim(slot)
    assert cqueue.inspect.depth() == 0 and len(cqueue.inspect.claimed("doomed")) == 6
    time.sleep(0.4)
    assert cqueue.worker.reap() == (3, 6, 0), "registered in three shards: reaped in each"
    assert cqueue.inspect.depths() == [2, 2, 2] and cqueue.inspect.claimed("doomed") == []


def test_results_in_every_shard_of_the_cluster_are_answered_once(cluster):
    """The in-process worker on the cluster: each job of every shard runs once and gets its own result."""
    queue = Queues.on(connect(cluster.url), spread_name("once"), shards=SHARDS)
    jobs = [numbered_job(n) for n in range(12)]
    for job in jobs:
        queue.web.enqueue(job, 100)
    model = NumberedModel()
    with RunningWorker(worker_config(cluster.url, queue.name, QUEUE_SHARDS=SHARDS), model):
        wait_until(lambda: all(results_in(queue, jobs)), 30, "every result")
    assert model.seen == Counter(range(12))
    assert [r["predictions"][0]["label"] for r in results_in(queue, jobs)] == [f"image-{n}" for n in range(12)]
    assert sorted(Counter(job.shard for job in jobs).values()) == [4, 4, 4]


# ---- real processes on the cluster --------------------------------------------------------------


@dataclass
class Stack:
    env: dict[str, str]
    worker: Worker
    web: WebServer
    queue: Queues


@pytest.fixture(scope="module")
def stack(cluster):
    env = server_env(
        cluster.url,
        spread_name("cstack"),
        QUEUE_SHARDS=SHARDS,
        BATCH_SIZE=4,
        BATCH_WAIT_MS=5,
        REQUEST_TIMEOUT=60,
        **FAST_REAPING,
    )
    worker = processes.start_worker(env)
    web = processes.start_web(env)
    yield Stack(env, worker, web, env_queue(env))
    web.stop()
    worker.stop()


def test_predictions_end_to_end_on_the_cluster(stack):
    data = sample_image_bytes()
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: post_image(stack.web.url, data), range(24)))
    assert [r.status_code for r in responses] == [200] * 24
    assert all(len(r.json()["predictions"]) == 5 for r in responses)
    ready = wait_until(lambda: ready_body(stack.web.url), 20, "notifications from every primary")
    assert ready["workers"] == 1
    text = requests.get(stack.web.url + "/metrics", timeout=10).text
    assert all(f'web_shard_queue_depth{{shard="{shard}"}}' in text for shard in range(SHARDS))


def ready_body(url: str) -> dict | None:
    body = requests.get(url + "/readyz", timeout=30).json()
    return body if body.get("ready") and body.get("wait_mode") == "notifications" else None


def test_kill_9_of_a_worker_under_load_on_the_cluster_loses_nothing(stack):
    victim = processes.start_worker(dict(stack.env, METRICS_PORT="0"))
    data = sample_image_bytes()
    try:
        with PublishedResults(stack.env["REDIS_URL"], stack.env["IMAGE_QUEUE"], SHARDS) as published:
            with ThreadPoolExecutor(60) as pool:
                futures = [pool.submit(post_image, stack.web.url, data) for _ in range(60)]
                freeze_holding_jobs(victim, stack.queue)
                victim.process.kill()
                victim.process.wait(30)
                responses = [future.result() for future in futures]
            counts = published.wait_for(60)
    finally:
        victim.stop()
    assert [r.status_code for r in responses] == [200] * 60
    assert len(counts) == 60 and max(counts.values()) == 1, "every job answered, none twice"


def test_a_stopped_primary_gets_its_shard_a_503_while_the_others_serve_and_all_recovers(stack, cluster):
    primary = node_of(cluster, stack.queue, 1)
    replica = replica_of(cluster, primary)
    replica.stop()  # no failover: the shard is simply gone
    primary.stop()
    data = sample_image_bytes()
    try:
        during = [post_image(stack.web.url, data, timeout=60) for _ in range(9)]
        ready = requests.get(stack.web.url + "/readyz", timeout=30)
        assert ready.status_code == 200, "the other shards serve: still ready"
        text = requests.get(stack.web.url + "/metrics", timeout=10).text
        assert 'web_shard_queue_depth{shard="1"}' not in text and 'web_shard_queue_depth{shard="0"}' in text
    finally:
        primary.start()
        replica.start()
    codes = Counter(r.status_code for r in during)
    assert set(codes) == {200, 503} and codes[200] >= 5, codes
    for response in during:
        if response.status_code == 503:
            assert "unavailable" in response.json()["error"] and response.headers["Retry-After"] == "1"
    wait_until(lambda: all(post_image(stack.web.url, data).status_code == 200 for _ in range(6)), 90, "recovery")
    wait_until(lambda: ready_body(stack.web.url), 30, "notifications again on every primary")
    assert stack.worker.process.poll() is None and stack.web.process.poll() is None, "no restart"
    # The warning is what an operator reads to find the primary that is down: it is the feature here (that the
    # other shards were served is asserted on the answers above).
    assert "cannot claim from shard 1" in stack.worker.log, "the worker said which shard it left alone"


def test_a_failover_under_load_loses_no_acknowledged_job(stack, cluster):
    """CLUSTER FAILOVER on a replica: the replica catches up, then takes over. Requests go on meanwhile; each
    is answered or refused with a 503 at once, never left to time out (a job acknowledged, then lost)."""
    shard = 2
    primary = node_of(cluster, stack.queue, shard)
    replica = replica_of(cluster, primary)

    def failover() -> None:
        with redis.Redis(port=replica.port) as client:
            client.cluster("failover")
        wait_until(lambda: node_of(cluster, stack.queue, shard).port == replica.port, 20, "the replica to take over")

    responses = under_load(stack.web.url, 16, failover)
    codes = Counter(r.status_code for r in responses)
    assert set(codes) <= {200, 503} and codes[200] >= 0.9 * len(responses), codes
    assert all(len(r.json()["predictions"]) == 5 for r in responses if r.status_code == 200)
    wait_until(lambda: all(post_image(stack.web.url).status_code == 200 for _ in range(6)), 60, "serving")
    wait_until(lambda: ready_body(stack.web.url), 30, "notifications from the new primary")
    assert stack.worker.process.poll() is None and stack.web.process.poll() is None


def under_load(url: str, threads: int, action) -> list[requests.Response]:
    """Responses of `threads` clients sending requests back to back from 1 s before `action` to 2 s after it."""
    data, stop, responses = sample_image_bytes(), threading.Event(), []

    def client() -> None:
        while not stop.is_set():
            responses.append(post_image(url, data))

    pool = [threading.Thread(target=client) for _ in range(threads)]
    for thread in pool:
        thread.start()
    try:
        time.sleep(1.0)
        action()
        time.sleep(2.0)
    finally:
        stop.set()
        for thread in pool:
            thread.join(120)
    return responses


def test_the_benchmarks_cluster_mix_spreads_jobs_evenly_and_answers_them_all(cluster):
    """`make bench` phase 11's client loop, briefly: what it counts per shard is what it claimed and answered."""
    from tools.load import cluster_mix

    name = spread_name("bench")
    per_shard = cluster_mix(cluster.url, name, 0.3, numbered_job(0).to_json())
    assert sum(per_shard) % 32 == 0 and max(per_shard) - min(per_shard) <= 1
    assert Queues.on(connect(cluster.url), name, shards=SHARDS).inspect.depths() == [0, 0, 0]


def test_a_resharding_under_load_moves_a_shard_and_every_request_is_answered(stack, cluster):
    """Shard 0's slot moves to another primary (SETSLOT IMPORTING / MIGRATING, MIGRATE of each key, SETSLOT NODE)
    while requests go on: commands on moved keys follow ASK, scripts and moves whose keys are split between the
    nodes get TRYAGAIN and are retried; the listener follows the new slot map."""
    source = node_of(cluster, stack.queue, 0)
    target = next(node for s in range(1, SHARDS) if (node := node_of(cluster, stack.queue, s)) is not source)
    slot = key_slot(stack.queue.shards[0].queue.encode())
    moved = []
    responses = under_load(stack.web.url, 8, lambda: moved.append(migrate_slot(cluster, slot, source, target)))
    codes = Counter(r.status_code for r in responses)
    assert moved and moved[0] > 0, "keys were moved while requests ran"
    assert set(codes) <= {200, 503} and codes[200] >= 0.9 * len(responses), codes
    assert node_of(cluster, stack.queue, 0) is target
    wait_until(lambda: all(post_image(stack.web.url).status_code == 200 for _ in range(6)), 60, "serving")
    wait_until(lambda: ready_body(stack.web.url), 30, "notifications, shard 0 now on its new primary")
    assert stack.worker.process.poll() is None and stack.web.process.poll() is None


def migrate_slot(cluster: LocalCluster, slot: int, source: LocalRedis, target: LocalRedis) -> int:
    """Move one slot between primaries, key by key, as `redis-cli --cluster reshard` does; slowly (a pause between
    keys), so that requests run while the slot is split between the two. Returns the keys moved."""
    with redis.Redis(port=source.port, decode_responses=True) as src, redis.Redis(port=target.port) as dst:
        source_id = src.execute_command("CLUSTER", "MYID")
        target_id = dst.execute_command("CLUSTER", "MYID")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        moved = 0
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            moved += 1
            time.sleep(0.05)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    wait_until(cluster.healthy, 20, "every node to agree on the new owner")
    return moved


def test_a_submitted_job_on_the_cluster_is_found_by_its_id_alone(cqueue):
    """POST /jobs on a cluster: the ticket says the shard, so another web process finds status and result."""
    job = numbered_job(7)
    job.origin = SUBMITTED
    assert cqueue.web.submit(job, 100)
    node = cqueue.redis.get_nodes()[-1]  # another web process, which may know the cluster by another node
    elsewhere = Queues.on(connect(f"redis://{node.host}:{node.port}/0"), cqueue.name, result_ttl=60, shards=SHARDS)
    assert elsewhere.web.job_status(job.id) == {"status": "queued"}
    raws = cqueue.worker.claim_batch("w", 4, 0, 0, shard=job.shard)
    assert cqueue.worker.take_tickets([Job.from_json(raws[0])], job.shard) == set()
    assert elsewhere.web.job_status(job.id) == {"status": "running"}
    cqueue.worker.finish_batch("w", [(job, {"success": True, "predictions": []})], [], 0, job.shard)
    assert elsewhere.web.job_status(job.id) == {"status": "done", "predictions": []}
    assert elsewhere.web.cancel_submitted(job.id) == 0
