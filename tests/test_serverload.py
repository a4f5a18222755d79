"""The server's load gauges: reading them, and the pool they size (on a fake clock)."""

from __future__ import annotations

import asyncio

import pytest

from batchq.live.concurrency import REGROW, AdaptiveLimit, Pool
from batchq.live.serverload import Load, follow, metrics_url, parse, shares

VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="a"} 12.0
vllm:num_requests_running{engine="0",model_name="b"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="a"} 5.0
vllm:num_requests_waiting{engine="0",model_name="b"} 0.0
vllm:num_requests_running_total{model_name="a"} 999.0
vllm:iteration_tokens_total_bucket{le="1.0",model_name="a"} 3.0
"""


def test_a_vllm_page_sums_its_models() -> None:
    assert parse(VLLM_PAGE) == Load("vLLM", running=15, waiting=5)


@pytest.mark.parametrize(
    ("page", "load"),
    [
        ("llamacpp:requests_processing 1\nllamacpp:requests_deferred 3\n", Load("llama.cpp", 1, 3)),
        ('sglang:num_running_reqs{tp_rank="0"} 7\nsglang:num_queue_reqs 0\n', Load("SGLang", 7, 0)),
        ("tgi_batch_current_size 4 1700000000\ntgi_queue_size 2e1\n", Load("TGI", 4, 20)),
        (
            'vllm:num_requests_running{model_name="a}b"} 2\nvllm:num_requests_waiting 1\n',
            Load("vLLM", 2, 1),
        ),
        (  # OpenMetrics: an exemplar after the value
            'vllm:num_requests_running{m="a"} 5 # {trace_id="x"} 99\nvllm:num_requests_waiting 0\n',
            Load("vLLM", 5, 0),
        ),
        (
            "llamacpp:requests_processing\t2\nllamacpp:requests_deferred\t0\n",
            Load("llama.cpp", 2, 0),
        ),
    ],
)
def test_each_server_s_gauges(page: str, load: Load) -> None:
    assert parse(page) == load


@pytest.mark.parametrize(
    "page",
    [
        "<html><body>404 Not Found</body></html>",
        "vllm:num_requests_running 3\n",  # no waiting count: nothing to judge by
        "vllm:num_requests_running inf\nvllm:num_requests_waiting 0\n",
        "vllm:num_requests_running NaN\nvllm:num_requests_waiting 0\n",
        "vllm:num_requests_running -4\nvllm:num_requests_waiting 0\n",
        "vllm:num_requests_running\nvllm:num_requests_waiting 0\n",
        # Each value finite, their sum past a float's range.
        'vllm:num_requests_running{e="0"} 1e308\nvllm:num_requests_running{e="1"} 1e308\n'
        "vllm:num_requests_waiting 0\n",
        "litellm_requests_total 40\n",  # a proxy's own metrics
        "",
    ],
)
def test_a_page_without_both_gauges_is_none(page: str) -> None:
    assert parse(page) is None


@pytest.mark.parametrize(
    ("base", "metrics"),
    [
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/metrics"),
        ("http://gpu:8000/v1/", "http://gpu:8000/metrics"),
        ("http://gpu:8080", "http://gpu:8080/metrics"),
        ("https://host/llm/v1", "https://host/llm/metrics"),
        (
            "https://dashscope.aliyuncs.com/compatible-mode/v1",
            "https://dashscope.aliyuncs.com/compatible-mode/metrics",
        ),
    ],
)
def test_the_gauges_are_beside_the_api(base: str, metrics: str) -> None:
    assert metrics_url(base) == metrics


# --- The pool they size, on a fake clock --------------------------------------------------


def test_none_waiting_and_all_running_doubles_the_pool_each_reading() -> None:
    limit = AdaptiveLimit(ceiling=1024)
    seen = []
    for now in range(10):
        limit.reported(running=limit.limit, waiting=0, in_flight=limit.limit, now=now)
        seen.append(limit.limit)
    assert seen == [8, 16, 32, 64, 128, 256, 512, 1024, 1024, 1024]


def test_requests_still_on_their_way_are_not_room() -> None:
    limit = AdaptiveLimit(ceiling=1024)
    limit.reported(running=2, waiting=0, in_flight=4, now=0.0)  # two not arrived yet
    assert limit.limit == 4
    limit.reported(running=2, waiting=0, in_flight=2, now=0.1)  # the pool is not full
    assert limit.limit == 4


def test_what_is_not_at_the_server_yet_or_any_more_does_not_hold_the_pool_back() -> None:
    # A client-bound loop (an answer of four waits for it) or a server far away (one of four
    # on the wire): the server never runs all of ours, yet it has room.
    limit = AdaptiveLimit(ceiling=1024)
    limit.reported(running=3, waiting=0, in_flight=4, now=0.0)
    assert limit.limit == 8
    limit.reported(running=4, waiting=0, in_flight=8, now=0.05)  # the step is on its way
    assert limit.limit == 8
    limit.reported(running=6, waiting=0, in_flight=8, now=0.1)  # and there
    assert limit.limit == 16


def test_a_full_batch_shrinks_the_pool_to_the_share_that_runs() -> None:
    limit = AdaptiveLimit(ceiling=1024, initial=512)
    limit.reported(running=200, waiting=312, in_flight=512, now=0.0)
    assert limit.limit == 512  # still admitting (it ran none before): no verdict yet
    limit.reported(running=256, waiting=256, in_flight=512, now=0.05)
    assert limit.limit == 512  # what it runs grew: a burst being admitted, not a full batch
    limit.reported(running=256, waiting=256, in_flight=512, now=0.1)
    assert (limit.limit, limit.batch) == (256, 256)  # it stopped growing with requests waiting


def test_a_waiting_count_while_the_batch_fills_is_no_ceiling() -> None:
    # vLLM admits a burst over a few steps (its prefill budget): some wait while it runs more.
    limit = AdaptiveLimit(ceiling=1024)
    for now, running in enumerate((3, 4)):
        limit.reported(running=running, waiting=4 - running, in_flight=4, now=now)
    assert (limit.limit, limit.batch) == (8, None)  # 4 of 4 running: room, doubled


def test_a_server_running_none_is_no_verdict() -> None:
    limit = AdaptiveLimit(ceiling=1024, initial=8)
    for now in range(5):  # starting, or between two steps
        limit.reported(running=0, waiting=8, in_flight=8, now=now)
    assert (limit.limit, limit.batch) == (8, None)


def test_other_clients_queue_does_not_starve_ours() -> None:
    limit = AdaptiveLimit(ceiling=1024, initial=64)
    for now in range(20):  # 64 of ours may all be among the 256 it runs: the queue is theirs
        limit.reported(running=256, waiting=5000, in_flight=64, now=now)
    assert limit.limit == 64


def test_below_a_batch_it_ran_the_pool_grows_back_to_it() -> None:
    limit = AdaptiveLimit(ceiling=1024, initial=300)
    limit.reported(running=250, waiting=50, in_flight=300, now=0.0)
    limit.reported(running=256, waiting=44, in_flight=300, now=0.1)
    limit.reported(running=256, waiting=44, in_flight=300, now=0.2)
    assert (limit.limit, limit.batch) == (256, 256)
    limit.reported(running=100, waiting=0, in_flight=256, now=0.3)  # not all ours arrived
    assert limit.limit == 256
    limit.reported(running=130, waiting=0, in_flight=256, now=0.4)  # it runs fewer: room
    assert limit.limit == 256 + 256 - 130


def test_at_the_known_batch_the_pool_grows_an_eighth_every_regrow_seconds() -> None:
    limit = AdaptiveLimit(ceiling=1024, initial=256)
    limit.reported(running=256, waiting=10, in_flight=266, now=0.0)
    limit.reported(running=256, waiting=10, in_flight=266, now=0.1)
    assert (limit.limit, limit.batch) == (256, 256)
    limit.reported(running=256, waiting=0, in_flight=256, now=0.25)
    assert limit.limit == 256 + 256 // 8  # the batch may have grown
    limit.reported(running=288, waiting=0, in_flight=288, now=0.5)
    assert (limit.limit, limit.batch) == (288, 288)  # it did; not again before REGROW seconds
    limit.reported(running=288, waiting=0, in_flight=288, now=0.25 + REGROW)
    assert limit.limit == 288 + 288 // 8


def test_a_server_of_one_slot_is_sent_one_request_at_a_time() -> None:
    limit = AdaptiveLimit(ceiling=1024)
    limit.reported(running=1, waiting=3, in_flight=4, now=0.0)
    limit.reported(running=1, waiting=3, in_flight=4, now=0.05)
    assert limit.limit == 1
    for now in range(1, 60):  # a minute of readings: it never queues another behind the slot
        limit.reported(running=1, waiting=0, in_flight=1, now=now)
        assert limit.limit == 1


def answer_window(limit: AdaptiveLimit, latency: float, start: float, n: int = 400) -> float:
    """``n`` answers of ``latency`` s, one every 10 ms from ``start``; returns the end."""
    now = start
    for _ in range(n):
        limit.sent(limit.limit, now)
        limit.answered(latency, overload=False, now=now)
        now += 0.01
    return now


def test_while_the_gauges_speak_windows_of_answers_move_nothing() -> None:
    limit = AdaptiveLimit(ceiling=1024, initial=64)
    limit.reported(running=60, waiting=4, in_flight=64, now=0.0)
    limit.reported(running=60, waiting=4, in_flight=64, now=0.05)
    assert limit.limit == 60
    end = answer_window(limit, 0.2, start=0.0)
    answer_window(limit, 2.0, start=end)  # a queue, to probing's eyes
    assert limit.limit == 60


def test_when_the_gauges_go_probing_sizes_the_pool_again() -> None:
    limit = AdaptiveLimit(ceiling=1024, initial=64)
    limit.reported(running=64, waiting=0, in_flight=64, now=0.0)
    assert limit.limit == 128
    limit.unreported()
    end = answer_window(limit, 0.2, start=0.0)
    answer_window(limit, 2.0, start=end)
    assert limit.limit < 128  # it saw the queue, and shed some of it


def test_under_a_pace_the_gauges_cap_what_it_asks_for() -> None:
    limit = AdaptiveLimit(ceiling=1024, initial=64)
    limit.reported(running=40, waiting=24, in_flight=64, now=0.0)
    limit.reported(running=40, waiting=24, in_flight=64, now=0.05)
    assert limit.under_pace(100.0, allowance=500) == 40
    assert limit.under_pace(100.0, allowance=30) == 30


def test_under_a_pace_the_gate_follows_a_reading_at_once() -> None:
    # Not at the next resize: the doubling needs the pool full, so each waited for a tick and
    # 16 -> 1,024 took 1.4 s against 0.4 s unpaced (capacity_sim, --rpm at 3x, 1,024 slots).
    pool = Pool("auto", 1024)
    pool.resize(1000.0, now=0.0)  # Little's law asks for 16 before any answer
    assert pool.gate.limit == 16
    for _ in range(16):
        pool.sent(0.0)
    pool.reported(running=16, waiting=0, now=0.05)
    assert pool.gate.limit == 16  # the allowance still caps it
    pool.resize(1000.0, now=0.2)  # a slow first answer: Little's law asks for more
    assert pool.gate.limit == 32
    for _ in range(16):
        pool.sent(0.2)
    pool.reported(running=32, waiting=0, now=0.25)
    assert pool.gate.limit == 64


# --- Following a server ------------------------------------------------------------------


class Scripted:
    """Hands out readings from a list, as a LoadReader would from a server."""

    def __init__(self, *readings: Load | Exception | None) -> None:
        self.readings = list(readings)
        self.closed = False

    async def read(self) -> Load | None:
        reading = self.readings.pop(0)
        if isinstance(reading, Exception):
            raise reading
        return reading

    async def close(self) -> None:
        self.closed = True


def follow_all(reader: Scripted, pool: Pool) -> list[str]:
    found: list[str] = []
    clock = iter(range(1000))
    asyncio.run(follow(reader, [pool], lambda: float(next(clock)), found.append))
    return found


def test_a_server_without_gauges_is_asked_once() -> None:
    pool = Pool("auto", 1024)
    reader = Scripted(None)
    assert follow_all(reader, pool) == []
    assert not pool.adaptive.told and reader.closed


def test_gauges_that_stop_answering_hand_the_pool_back_to_probing() -> None:
    pool = Pool("auto", 1024)
    load = Load("vLLM", running=0, waiting=2)
    reader = Scripted(load, OSError("reset"), load, None, TimeoutError(), OSError())
    assert follow_all(reader, pool) == ["vLLM"]
    assert reader.readings == []  # one good reading between failures starts the count anew
    assert not pool.adaptive.told


def test_under_a_pace_losing_the_gauges_keeps_the_pool_little_s_law_asks() -> None:
    limit = AdaptiveLimit(ceiling=1024, initial=200)
    assert limit.under_pace(100.0, allowance=300) == 16  # the paced opening's first step
    limit.reported(running=250, waiting=0, in_flight=250, now=0.0)
    limit.unreported()
    assert limit.under_pace(100.0, allowance=300) == 300  # not from 16 again


# --- Several deployments on one server ---------------------------------------------------


@pytest.mark.parametrize(
    ("load", "in_flight", "parts"),
    [
        (Load("vLLM", 20, 12), [16, 16], [(10, 6), (10, 6)]),
        (Load("vLLM", 20, 3), [13, 7], [(13, 2), (7, 2)]),  # what waits is rounded up
        # 7.1, 1.4 and 1.4: the one request left over goes to a larger remainder, the first.
        (Load("vLLM", 10, 0), [5, 1, 1], [(7, 0), (2, 0), (1, 0)]),
        (Load("vLLM", 7, 1), [3, 0], [(7, 1), (0, 0)]),  # none out: none of the load is its
        (Load("vLLM", 5, 2), [0, 0], [(3, 1), (2, 1)]),  # none out at all: equal parts
    ],
)
def test_a_reading_is_split_as_the_pools_have_requests_out(
    load: Load, in_flight: list[int], parts: list[tuple[int, int]]
) -> None:
    assert shares(load, in_flight) == [Load("vLLM", r, w) for r, w in parts]


class Full(Scripted):
    """A server whose clients fill their pools to the gate before each reading, as the
    workers do while lines are pending."""

    def __init__(self, pools: list[Pool], *readings: Load | None) -> None:
        super().__init__(*readings)
        self.pools = pools

    async def read(self) -> Load | None:
        for pool in self.pools:
            while pool.in_flight < pool.gate.limit:
                pool.sent(0.0)
        return await super().read()


def follow_full(pools: list[Pool], *readings: Load) -> None:
    clock = iter(range(1000))
    reader = Full(pools, *readings, None, None, None)  # the gauges go: the pools keep their size
    asyncio.run(follow(reader, pools, lambda: float(next(clock)), lambda server: None))


# A 20-slot server: 4 + 4 of ours, then 8 + 8, run with none waiting; at 16 + 16, 20 run and
# 12 wait, and again at the next reading: it is full.
FILLING = (Load("vLLM", 8, 0), Load("vLLM", 16, 0), Load("vLLM", 20, 12), Load("vLLM", 20, 12))


def test_deployments_on_one_server_shrink_together_to_its_batch() -> None:
    pools = [Pool("auto", 1024), Pool("auto", 1024)]
    follow_full(pools, *FILLING)
    assert [pool.gate.limit for pool in pools] == [10, 10]  # 20 in all, as one pool's would be


def test_a_reader_each_taking_every_reading_whole_held_a_queue() -> None:
    # What the above replaces. Neither pool has more of its own out (16) than the server runs
    # (20), so neither shrinks: 32 for 20 slots, 12 of them queued, reading after reading.
    pools = [Pool("auto", 1024), Pool("auto", 1024)]
    for pool in pools:
        follow_full([pool], *FILLING)
    assert [pool.gate.limit for pool in pools] == [16, 16]


def test_a_fixed_pool_on_the_same_server_counts_in_the_split_and_is_left_alone() -> None:
    auto, fixed = Pool("auto", 1024), Pool(16, 1024)
    follow_full([auto, fixed], Load("vLLM", 20, 0), Load("vLLM", 20, 12), Load("vLLM", 20, 12))
    # 8 of ours and 16 of its (4 and 16 at the first reading, which doubled ours): 24 out for
    # 20 slots. Ours is a third of the load: 7 run and 4 wait, so ours shrinks to 5.
    assert (auto.gate.limit, fixed.gate.limit) == (5, 16)
