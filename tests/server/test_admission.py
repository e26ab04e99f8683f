"""server.admission: the in-flight bound, tickets and deadlines (the API every front end calls)."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.admission import DEADLINE_SHARE, Admission, Ticket
from server.errors import Overloaded, RequestTimeout


def test_admits_up_to_the_limit_then_refuses_with_retry_after() -> None:
    admission = Admission(limit=2, timeout_s=10)
    with admission.admit(), admission.admit():
        assert admission.in_flight == 2
        with pytest.raises(Overloaded) as refused, admission.admit():
            pass
        assert refused.value.status == 503 and refused.value.headers() == {"Retry-After": "1"}
        assert refused.value.code == "overloaded" and admission.in_flight == 2
    assert admission.in_flight == 0
    with admission.admit():  # released: admitted again
        assert admission.in_flight == 1


def test_the_bound_is_what_the_engines_finish_within_the_deadline_share() -> None:
    admission = Admission(limit=256, timeout_s=0.2)
    assert admission.bound() == 256  # no rate measured yet: the limit
    admission.rate = lambda: 60.0  # images/s
    expected = int(60 * 0.2 * DEADLINE_SHARE)
    assert 1 <= expected < 256 and admission.bound() == expected
    tickets = [admission.acquire() for _ in range(expected)]
    assert isinstance(admission.acquire_or_refusal(), Overloaded) and admission.in_flight == expected
    with pytest.raises(Overloaded) as refused:
        admission.acquire()
    assert "200 ms deadline at 60 img/s" in refused.value.detail and refused.value.status == 503
    tickets.pop().release()
    ticket = admission.acquire_or_refusal()  # one slot free again: taken
    assert isinstance(ticket, Ticket) and admission.in_flight == expected
    ticket.release()
    admission.rate = lambda: 1e6  # a fast engine: the configured limit is the bound
    assert admission.bound() == 256
    admission.rate = lambda: 0.1  # an engine too slow for the deadline still gets one image at a time
    assert admission.bound() == 1


def test_a_ticket_is_released_once_even_on_errors() -> None:
    admission = Admission(limit=1, timeout_s=10)
    with pytest.raises(ValueError), admission.admit() as ticket:
        raise ValueError("the request failed")
    ticket.release()
    assert admission.in_flight == 0


def test_a_batch_reserves_its_images_and_a_lone_batch_always_fits() -> None:
    admission = Admission(limit=4, timeout_s=10)
    with admission.admit() as ticket:
        ticket.reserve(10)  # alone in the server: admitted although over the bound
        assert admission.in_flight == 10
    with admission.admit(), admission.admit() as second:
        with pytest.raises(Overloaded):
            second.reserve(4)  # 1 + 4 > 4 with another request in flight
        second.reserve(3)
        assert admission.in_flight == 4
    assert admission.in_flight == 0


def test_the_clients_deadline_is_never_longer_than_the_servers() -> None:
    admission = Admission(limit=8, timeout_s=0.5)
    with admission.admit(timeout_ms=100) as short, admission.admit(timeout_ms=60_000) as capped:
        assert short.timeout_s == pytest.approx(0.1) and capped.timeout_s == 0.5
        capped.shorten(200)
        capped.shorten(None)
        capped.shorten(10_000)  # longer: ignored
        assert capped.timeout_s == pytest.approx(0.2)
        assert capped.deadline == pytest.approx(capped.arrived_at + 0.2)


def test_check_and_wait_answer_timeout_at_the_deadline_and_cancel_the_work() -> None:
    admission = Admission(limit=8, timeout_s=10)

    async def scenario() -> None:
        with admission.admit(timeout_ms=50) as ticket:
            work = asyncio.get_running_loop().create_future()
            started = time.perf_counter()
            with pytest.raises(RequestTimeout, match="before inference"):
                await ticket.wait(work, "inference")
            assert 0.04 < time.perf_counter() - started < 1.0
            assert work.cancelled()  # the batcher skips a cancelled future: the image is dropped
            with pytest.raises(RequestTimeout, match="before encoding"):
                ticket.check("encoding")

    asyncio.run(scenario())


def test_an_untracked_ticket_holds_nothing() -> None:
    admission = Admission(limit=1, timeout_s=2)
    arrived = time.perf_counter() - 1
    ticket = admission.untracked(arrived)
    assert ticket.deadline == pytest.approx(arrived + 2) and admission.in_flight == 0
    ticket.release()
    assert admission.in_flight == 0
    with admission.admit():
        pass


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        Admission(limit=0, timeout_s=1)
    with pytest.raises(ValueError):
        Admission(limit=1, timeout_s=0)
