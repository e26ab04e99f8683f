"""RefusalGate (server.connections): refused connections are read again a few per turn of the event loop."""

from __future__ import annotations

import asyncio

from server.connections import RefusalGate


class Flow:
    """The two calls the gate makes on uvicorn's FlowControl, recorded with the loop turn they came in."""

    def __init__(self, turn: list[int]) -> None:
        self.turn = turn
        self.read_paused = False
        self.resumed_at_turn: int | None = None

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        self.read_paused = False
        self.resumed_at_turn = self.turn[0]


def test_the_gate_lets_per_turn_connections_through_each_turn_first_come_first_served() -> None:
    turn = [0]

    async def run() -> list[Flow]:
        loop = asyncio.get_running_loop()
        gate = RefusalGate(per_turn=3)
        flows = [Flow(turn) for _ in range(8)]
        for flow in flows:
            gate.hold(flow, loop)  # type: ignore[arg-type]
            assert flow.read_paused
        for turn[0] in range(1, 6):
            await asyncio.sleep(0)  # one turn of the loop
        return flows

    flows = asyncio.run(run())
    assert not any(flow.read_paused for flow in flows)
    assert [flow.resumed_at_turn for flow in flows] == [1, 1, 1, 2, 2, 2, 3, 3]
