"""RefusalGate (server.connections): refusals are answered at a bounded rate, in order, without spinning."""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop

from server.connections import RefusalGate


async def answer_times(gate: RefusalGate, count: int) -> list[float]:
    """Hand the gate `count` answers at once; the loop time each was sent, in the order they were handed in."""
    loop = asyncio.get_running_loop()
    sent: list[float] = []
    done = loop.create_future()

    def answer() -> None:
        sent.append(loop.time())
        if len(sent) == count:
            done.set_result(None)

    for _ in range(count):
        gate.send(answer, loop)
    await asyncio.wait_for(done, 10)
    return sent


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_answers_go_out_at_the_rate_first_come_first_served(run) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    sent = run(answer_times(RefusalGate(per_second=200), 21))
    elapsed = time.monotonic() - started
    assert sent == sorted(sent)
    # the first at once, then one every 5 ms: 100 ms for the other 20 (timers fire late, never early)
    assert sent[-1] - sent[0] >= 0.1 - RefusalGate.TICK_S - 0.002, sent
    assert elapsed < 1.0


def test_an_idle_gate_answers_at_once() -> None:
    async def go() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        gate = RefusalGate(per_second=10)
        calls = []
        gate.send(lambda: calls.append(1), loop)
        immediate = len(calls)
        await asyncio.sleep(0.15)  # longer than the interval: the next is due at once too
        gate.send(lambda: calls.append(2), loop)
        return immediate, len(calls)

    assert asyncio.run(go()) == (1, 2)


def test_a_gate_with_answers_waiting_does_not_spin_the_loop() -> None:
    """Waiting answers cost no CPU: the loop sleeps until the next turn (timers of >= 1 ms; a shorter one
    fires at once under libuv, and the loop would spin at 100%)."""
    cpu_started, wall_started = time.process_time(), time.monotonic()
    uvloop.run(answer_times(RefusalGate(per_second=4000), 800))  # 200 ms of turns
    cpu, wall = time.process_time() - cpu_started, time.monotonic() - wall_started
    assert wall >= 0.19
    assert cpu < 0.5 * wall, f"{cpu * 1000:.0f} ms of CPU in {wall * 1000:.0f} ms"


def test_the_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="> 0"):
        RefusalGate(per_second=0)
