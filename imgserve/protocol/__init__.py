"""The Redis protocol between web servers and model workers: keys, job format, scripts, operations.

The servers call this package and never spell a Redis key. One concern per module:

    keys.py           every key name (declared once, per shard) and what each key holds
    connection.py     the client (plain or cluster, detected), which never resends a command; REDIS_UNAVAILABLE
    job.py            the job's wire format (JSON), parsed as untrusted input; dead-letter metadata
    scripts.py        the Lua scripts, each documenting its KEYS and ARGV
    queue.py          QueueBase: what the roles share (client, each shard's keys, limits); read_result
    web_queue.py      WebQueue: what a web process does (enqueue or submit, hold, take results, cancel)
    worker_queue.py   WorkerQueue: what a worker does (heartbeat, claim, publish and acknowledge, release, reap)
    inspector.py      QueueInspector: read-only views (depths, live workers and their models, dead letters)
    claim.py          Claimer: how a worker takes batches from its shards in turn
    priority.py       the priority levels (high, normal, low) and FairShare, the weighted fair share of a claim
    notifications.py  keyspace notifications for result keys: turned on per server, probed, their channels
    listener.py       ResultListener: how a waiting request learns that its result is there
    backoff.py        Backoff and retry: the delays between attempts while Redis is unavailable

The rule that loses nothing, in each shard: a job is in the shard's queue (the list of the priority level it
names), in one batch slot (processing list) of one worker in that shard, or in the shard's dead letters. Every
move between the queue and a processing list is one atomic server-side step (BLMOVE, LMOVE or a Lua script)
within the shard's hash slot. A batch leaves its processing list only after its results are written, so a crash
at any point loses nothing: the reaper of each shard returns the processing lists of a worker whose heartbeat
there expired to the head of the shard's queue, each job to its own level's list. A result that cannot be
written (for any reason but Redis being unavailable) dead-letters its job alone and the rest are published; a
batch that still cannot be published goes back to the queue, and until it has, its slot is never claimed into
(acknowledging a batch deletes the whole slot). The reaper takes each dead worker on its own, so one it cannot
reap holds up none of the others.
An id or origin becomes part of a key only as the web mints it (job.py RULES; the Lua scripts check the same).

Replays. A command whose reply is lost may have run. The client never resends by itself; each
operation on the job path is either idempotent, and then retried once, or recovers another way:

    command                          idempotent   after a lost reply
    LPUSH job (enqueue)              no           pushed again in MULTI with an LREM of the first copy
    LLENs, LMOVE, BLMOVE (claim)     no           not resent; the slot is released (RELEASE, no attempt
                                                  counted) before anything is claimed into it again
    SET result EX (publish)          yes          resent: the same value again
    DEL slot, or the ACK script      yes          resent: deletes nothing more; ACK (a batch with dead
      (acknowledge)                               letters) writes them only while the slot exists
    RELEASE, REAP scripts            yes          resent: find nothing left to move
    GETEX result PX (take result)    yes          resent: the same value, kept 2 s after the first read
    LREM job (cancel)                yes          resent
    SET heartbeat PX + SADD          yes          resent
    SET ticket EX (submit)           yes          resent
    SET ticket XX GET (take)         yes          resent: finds the ticket it set (running), not cancelled
    CANCEL script                    yes          resent: finds no ticket, and the client hears 404
    HOLD script (MAX_QUEUE_PER_KEY)  yes          resent: the ids are counted once (a set); a replay may find
                                                  the key full and answer 429, and the ids are then released
    ZREM owner ids (release hold)    yes          resent; a lost one leaves ids counted until their deadline
"""

from .claim import Claimer
from .connection import REDIS_UNAVAILABLE, connect
from .inspector import QueueInspector
from .job import DeadLetter, Job, JobError, error_result, job_metadata
from .keys import SLOTS, SUBMITTED, Keys
from .listener import ResultListener, ResultTimeout
from .web_queue import WebQueue
from .worker_queue import WorkerQueue

__all__ = [
    "REDIS_UNAVAILABLE",
    "SLOTS",
    "SUBMITTED",
    "Claimer",
    "DeadLetter",
    "Job",
    "JobError",
    "Keys",
    "QueueInspector",
    "ResultListener",
    "ResultTimeout",
    "WebQueue",
    "WorkerQueue",
    "connect",
    "error_result",
    "job_metadata",
]
