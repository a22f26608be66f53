"""The loopback judge's capacity model: a schedule of capacity, processor sharing between the
requests in service, and shedding at shed_factor x capacity. Timing cases run on virtual time."""
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from reward import rubric
from reward.judge_server import LocalJudgeServer
from reward.stand_in_capacity import CapacitySchedule, SharedCapacity
from tests.reward.test_judge_server import OPENAI_PATH, PROMPT, STORY, openai_body, post
from tests.reward.virtual_time import run


def test_the_schedule_repeats_and_integrates():
    s = CapacitySchedule((48, 6, 24), 30.0)
    assert [s.at(t) for t in (0, 29.9, 30, 75, 90, 125)] == [48, 48, 6, 24, 48, 6]
    assert s.integral(0, 180) == 2 * (48 + 6 + 24) * 30
    assert s.integral(15, 45) == 48 * 15 + 6 * 15


def finish_times(levels, step_s, works, starts=None):
    async def go():
        loop = asyncio.get_running_loop()
        service = SharedCapacity(CapacitySchedule(levels, step_s), clock=loop.time)
        done = [None] * len(works)

        async def one(i, work, start):
            await asyncio.sleep(start)
            await service.serve(work)
            done[i] = round(loop.time(), 6)
        await asyncio.gather(*(one(i, w, s) for i, (w, s) in enumerate(zip(works, starts or [0] * len(works)))))
        return done
    return run(go())


def test_requests_in_service_share_the_capacity():
    assert finish_times((2,), 100, [1.0] * 4) == [2.0] * 4, "4 in service on 2: each at half speed"
    assert finish_times((2,), 100, [1.0] * 2) == [1.0] * 2, "within capacity: the base latency"
    assert finish_times((1,), 100, [1.0, 2.0]) == [2.0, 3.0], "alone again, the second goes at full speed"
    assert finish_times((1,), 100, [1.0, 1.0], starts=[0.0, 0.5]) == [1.5, 2.0]


def test_a_capacity_step_changes_the_speed_of_requests_already_in_service():
    assert finish_times((1, 4), 1.0, [1.0, 1.0]) == [1.5, 1.5]


def test_arrivals_beyond_the_shed_line_are_refused_429_and_503_in_turn():
    async def go():
        service = SharedCapacity(CapacitySchedule((2,), 100), 1.5, clock=asyncio.get_running_loop().time)
        served = [asyncio.ensure_future(service.serve(10.0)) for _ in range(3)]
        await asyncio.sleep(0)
        refusals = [service.shed() for _ in range(3)]
        for task in served:
            task.cancel()
        await asyncio.gather(*served, return_exceptions=True)
        return refusals, service.shed(), service.stats()
    refusals, after, stats = run(go())
    assert refusals == [429, 503, 429] and after is None, "3 >= 1.5 x 2 in service sheds; cancelled ones leave"
    assert (stats["shed_429"], stats["shed_503"], stats["in_service"]) == (2, 1, 0)


def test_the_loopback_server_sheds_and_reports_its_capacity():
    judge_request = rubric.build_judge_request(PROMPT, STORY)
    # two requests take the capacity for 5 s; the next two arrive while they are in service
    with LocalJudgeServer(latency_s=(5.0, 5.0), capacity=CapacitySchedule((2,), 60.0), shed_factor=1.0) as srv, \
            ThreadPoolExecutor(2) as pool:
        served = [pool.submit(post, srv, OPENAI_PATH, openai_body(judge_request), timeout=60) for _ in range(2)]
        while srv.stats()["capacity"]["in_service"] < 2:
            time.sleep(0.01)
        shed = [post(srv, OPENAI_PATH, openai_body(judge_request), timeout=60) for _ in range(2)]
        statuses = [f.result()[0] for f in served]
        stats = srv.stats()["capacity"]
    assert statuses == [200, 200] and [status for status, _, _ in shed] == [429, 503]
    assert shed[0][1]["Retry-After"] == "1" and "Retry-After" not in shed[1][1]
    assert (stats["served"], stats["shed_429"], stats["shed_503"], stats["capacity"]) == (2, 1, 1, 2)
    assert stats["capacity_s"] == pytest.approx(2 * stats["since_start_s"])
