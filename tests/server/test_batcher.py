"""The dynamic batcher on its own, with a small recording engine (these tests are about batching, not inference)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.batcher import BatcherConfig, DynamicBatcher, check_batch_output
from server.engines.base import EngineOutput
from server.errors import EngineError, NotReady, QueueFull, RequestTimeout
from server.metrics import Metrics, ModelMetrics

SIZE = (4, 4)
K = 3


def image(marker: int) -> np.ndarray:
    return np.full((*SIZE, 3), marker, dtype=np.uint8)


class RecordingEngine:
    """Answers image i with num_detections = its marker; records every batch's markers; optional gate/failure."""

    def __init__(self, delay_s: float = 0.0, fail_marker: int | None = None, drop_one: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.fail_marker = fail_marker
        self.drop_one = drop_one
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, images: np.ndarray) -> EngineOutput:
        markers = [int(m) for m in images[:, 0, 0, 0]]
        self.batches.append(markers)
        self.entered.set()
        self.gate.wait(10)
        time.sleep(self.delay_s)
        if self.fail_marker in markers:
            raise ValueError("boom")
        n = len(markers) - (1 if self.drop_one else 0)
        marker_arr = np.array(markers[:n], dtype=np.int32)
        return EngineOutput(
            num_detections=marker_arr,
            boxes=np.zeros((n, K, 4), np.float32),
            scores=np.repeat(marker_arr[:, None].astype(np.float32), K, axis=1),
            classes=np.zeros((n, K), np.int32),
        )


def make(engine: RecordingEngine, **config: object) -> tuple[DynamicBatcher, ModelMetrics]:
    metrics = Metrics(CollectorRegistry()).for_model("m")
    batcher = DynamicBatcher(engine, BatcherConfig(input_size=SIZE, **config), metrics)  # type: ignore[arg-type]
    return batcher, metrics


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_batches_close_at_max_batch_size_and_each_future_gets_its_own_result() -> None:
    engine = RecordingEngine()

    async def scenario() -> None:
        batcher, metrics = make(engine, max_batch_size=4, max_queue_delay_s=0.05)
        batcher.start()
        futures = [batcher.submit(image(i)) for i in range(10)]  # all queued before the loop looks
        results = await asyncio.gather(*futures)
        assert [r.num_detections for r in results] == list(range(10))
        assert [float(r.scores[0]) for r in results] == [float(i) for i in range(10)]
        assert [r.batch_size for r in results] == [4] * 8 + [2] * 2
        await batcher.stop()
        assert metrics.registry.get_sample_value("ssd_batch_size_count", {"model": "m"}) == 3
        assert metrics.registry.get_sample_value("ssd_batch_size_sum", {"model": "m"}) == 10
        assert metrics.registry.get_sample_value("ssd_images_processed_total", {"model": "m"}) == 10
        assert metrics.registry.get_sample_value("ssd_queue_wait_seconds_count", {"model": "m"}) == 10

    run(scenario())
    assert engine.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_an_open_batch_waits_for_announced_requests_up_to_the_delay() -> None:
    engine = RecordingEngine()
    delay = 0.2

    async def scenario() -> None:
        batcher, _ = make(engine, max_batch_size=8, max_queue_delay_s=delay)
        batcher.start()
        with batcher.incoming():  # a second request is being decoded
            first = batcher.submit(image(1))
            await asyncio.sleep(0.05)
            second = batcher.submit(image(2))
        with batcher.incoming():  # a third is announced but never arrives: the batch closes at the deadline
            a, b = await asyncio.gather(first, second)
        assert a.batch_size == b.batch_size == 2
        assert a.queue_s >= delay * 0.9

    run(scenario())
    assert engine.batches == [[1, 2]]


def test_a_lone_request_is_not_held_for_the_delay() -> None:
    engine = RecordingEngine()

    async def scenario() -> None:
        batcher, _ = make(engine, max_batch_size=8, max_queue_delay_s=5.0)
        batcher.start()
        started = time.perf_counter()
        result = await batcher.submit(image(7))
        assert time.perf_counter() - started < 1.0  # nothing else in flight: no reason to wait 5 s
        assert result.batch_size == 1

    run(scenario())


def test_batching_off_baseline_runs_every_image_alone() -> None:
    engine = RecordingEngine()

    async def scenario() -> None:
        batcher, _ = make(engine, max_batch_size=1, max_queue_delay_s=0.0)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(image(i)) for i in range(5)))
        assert [r.num_detections for r in results] == list(range(5))

    run(scenario())
    assert engine.batches == [[0], [1], [2], [3], [4]]


def test_instances_run_batches_side_by_side_and_the_queue_grows_meanwhile() -> None:
    """Two instances: while both hold a batch, the next requests wait in the queue and leave as one larger batch
    on whichever instance is free first; each instance is called with its own batches only."""
    first, second = RecordingEngine(), RecordingEngine()
    first.gate.clear()
    second.gate.clear()

    async def scenario() -> None:
        metrics = Metrics(CollectorRegistry()).for_model("m")
        config = BatcherConfig(input_size=SIZE, max_batch_size=8, max_queue_delay_s=0.0)
        batcher = DynamicBatcher([first, second], config, metrics)  # type: ignore[list-item]
        batcher.start()
        loop = asyncio.get_running_loop()
        a = batcher.submit(image(1))
        await loop.run_in_executor(None, first.entered.wait, 5)  # instance 0 first
        b = batcher.submit(image(2))
        await loop.run_in_executor(None, second.entered.wait, 5)  # the other one takes the next batch at once
        later = [batcher.submit(image(m)) for m in (3, 4, 5)]  # both busy: these wait together
        await asyncio.sleep(0.05)
        assert batcher.queue_depth == 3
        second.gate.set()
        results = await asyncio.gather(b, *later)
        assert [r.batch_size for r in results] == [1, 3, 3, 3]
        first.gate.set()
        assert (await a).num_detections == 1
        await batcher.stop()

    run(scenario())
    assert first.batches == [[1]] and second.batches == [[2], [3, 4, 5]]


def test_sequential_requests_all_run_on_the_first_instance() -> None:
    """At low load one warm instance does the work: the lowest free one takes each batch, not the one the loop
    happened to hold when the request arrived."""
    first, second = RecordingEngine(), RecordingEngine()

    async def scenario() -> None:
        config = BatcherConfig(input_size=SIZE, max_batch_size=8, max_queue_delay_s=0.0)
        batcher = DynamicBatcher([first, second], config)  # type: ignore[list-item]
        batcher.start()
        for marker in range(6):
            assert (await batcher.submit(image(marker))).num_detections == marker
        await batcher.stop()

    run(scenario())
    assert first.batches == [[m] for m in range(6)] and second.batches == []


def test_a_lone_image_takes_the_solo_path_and_any_other_work_the_plain_one() -> None:
    plain, solo = [RecordingEngine(), RecordingEngine()], [RecordingEngine(), RecordingEngine()]

    async def scenario() -> None:
        config = BatcherConfig(input_size=SIZE, max_batch_size=8, max_queue_delay_s=0.01)
        batcher = DynamicBatcher(plain, config, solo=solo)  # type: ignore[arg-type]
        batcher.start()
        assert (await batcher.submit(image(1))).num_detections == 1  # nothing else: solo
        await asyncio.gather(*(batcher.submit(image(m)) for m in (2, 3, 4)))  # a batch of three: plain
        with batcher.incoming():  # another request is being decoded: plain, and the batch closes at the delay
            assert (await batcher.submit(image(5))).num_detections == 5
        solo[0].gate.clear()
        solo[0].entered.clear()
        running = batcher.submit(image(6))  # alone when it starts: solo, on the first instance
        await asyncio.get_running_loop().run_in_executor(None, solo[0].entered.wait, 5)
        beside = batcher.submit(image(7))  # another batch is running: plain, on the second instance
        assert (await beside).num_detections == 7
        solo[0].gate.set()
        assert (await running).num_detections == 6
        assert (await batcher.submit(image(8))).num_detections == 8  # alone again
        await batcher.stop()

    run(scenario())
    assert solo[0].batches == [[1], [6], [8]] and solo[1].batches == []
    assert plain[0].batches == [[2, 3, 4], [5]] and plain[1].batches == [[7]]


def test_solo_paths_pair_up_with_instances() -> None:
    with pytest.raises(ValueError, match="1 engine instances but 2 solo paths"):
        DynamicBatcher(RecordingEngine(), BatcherConfig(input_size=SIZE), solo=[None, None])  # type: ignore[arg-type]


def test_instances_and_executors_must_pair_up() -> None:
    from concurrent.futures import ThreadPoolExecutor

    config = BatcherConfig(input_size=SIZE)
    with pytest.raises(ValueError, match="at least one"):
        DynamicBatcher([], config)
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match="2 engine instances but 1 executors"):
            DynamicBatcher([RecordingEngine(), RecordingEngine()], config, executors=[pool])  # type: ignore[list-item]


def test_requests_left_waiting_past_the_timeout_never_reach_the_engine() -> None:
    engine = RecordingEngine()
    engine.gate.clear()

    async def scenario() -> None:
        batcher, _ = make(engine, max_batch_size=1, request_timeout_s=0.1)
        batcher.start()
        running = batcher.submit(image(1))
        await asyncio.get_running_loop().run_in_executor(None, engine.entered.wait, 5)
        late = batcher.submit(image(2))  # queued behind a batch that takes longer than the timeout
        await asyncio.sleep(0.3)
        engine.gate.set()
        assert (await running).num_detections == 1
        with pytest.raises(RequestTimeout):
            await late
        fresh = await batcher.submit(image(3))  # the server goes on normally
        assert fresh.num_detections == 3

    run(scenario())
    assert engine.batches == [[1], [3]]


def test_an_image_past_its_requests_deadline_never_joins_a_batch() -> None:
    engine = RecordingEngine()
    engine.gate.clear()

    async def scenario() -> None:
        batcher, _ = make(engine, max_batch_size=1, request_timeout_s=10)
        batcher.start()
        running = batcher.submit(image(1))
        await asyncio.get_running_loop().run_in_executor(None, engine.entered.wait, 5)
        late = batcher.submit(image(2), deadline=time.perf_counter() + 0.1)  # the request's own, shorter deadline
        on_time = batcher.submit(image(3), deadline=time.perf_counter() + 10)
        await asyncio.sleep(0.3)
        engine.gate.set()
        assert (await running).num_detections == 1
        with pytest.raises(RequestTimeout, match="deadline"):
            await late
        assert (await on_time).num_detections == 3

    run(scenario())
    assert engine.batches == [[1], [3]]


def test_a_batch_is_not_grown_past_what_ends_before_its_deadlines() -> None:
    engine = RecordingEngine(delay_s=0.1)  # 0.1 s a batch, whatever its size

    async def scenario() -> list[object]:
        batcher, _ = make(engine, max_batch_size=8, max_queue_delay_s=0.05, request_timeout_s=10)
        batcher.start()
        await batcher.submit(image(1))  # calibrates: 0.1 s per image
        deadline = time.perf_counter() + 0.25
        futures = [batcher.submit(image(marker), deadline=deadline) for marker in (2, 3, 4, 5)]
        return await asyncio.gather(*futures, return_exceptions=True)

    outcomes = run(scenario())
    assert engine.batches[:2] == [[1], [2, 3]]  # 2 x 0.1 s fit in 0.25 s; 4 images would not
    assert isinstance(outcomes[-1], RequestTimeout)  # could no longer finish in time: never inferred
    assert all(5 not in batch for batch in engine.batches)


def test_an_estimate_from_warm_up_applies_from_the_first_batch() -> None:
    engine = RecordingEngine()
    metrics = Metrics(CollectorRegistry()).for_model("m")
    config = BatcherConfig(input_size=SIZE, max_batch_size=8, request_timeout_s=10)
    batcher = DynamicBatcher(engine, config, metrics, per_image_s=0.5)  # measured at warm-up: 0.5 s per image
    assert batcher.engine_s_per_image == 0.5

    async def scenario() -> None:
        batcher.start()
        with pytest.raises(RequestTimeout, match="would pass before its inference ends"):
            await batcher.submit(image(1), deadline=time.perf_counter() + 0.2)
        await batcher.stop()

    run(scenario())
    assert engine.batches == []  # it could not finish in time, even as the first image: never inferred


def test_an_engine_failure_fails_only_its_batch() -> None:
    engine = RecordingEngine(fail_marker=13)

    async def scenario() -> None:
        batcher, metrics = make(engine, max_batch_size=2)
        batcher.start()
        bad = [batcher.submit(image(13)), batcher.submit(image(1))]
        outcomes = await asyncio.gather(*bad, return_exceptions=True)
        assert all(isinstance(o, EngineError) for o in outcomes)
        assert "boom" in str(outcomes[0])
        good = await asyncio.gather(batcher.submit(image(2)), batcher.submit(image(3)))
        assert [g.num_detections for g in good] == [2, 3]
        assert metrics.registry.get_sample_value("ssd_images_processed_total", {"model": "m"}) == 2

    run(scenario())


def test_a_wrong_number_of_results_fails_the_batch_loudly() -> None:
    engine = RecordingEngine(drop_one=True)

    async def scenario() -> None:
        batcher, _ = make(engine, max_batch_size=4)
        batcher.start()
        outcomes = await asyncio.gather(*(batcher.submit(image(i)) for i in range(3)), return_exceptions=True)
        assert all(isinstance(o, EngineError) for o in outcomes)
        assert "wrong number of images" in str(outcomes[0])

    run(scenario())


def test_a_full_queue_refuses_at_submit() -> None:
    engine = RecordingEngine()
    engine.gate.clear()

    async def scenario() -> None:
        batcher, metrics = make(engine, max_batch_size=1, max_queue_size=2)
        batcher.start()
        running = batcher.submit(image(0))
        await asyncio.get_running_loop().run_in_executor(None, engine.entered.wait, 5)
        queued = [batcher.submit(image(1)), batcher.submit(image(2))]
        assert metrics.registry.get_sample_value("ssd_queue_depth", {"model": "m"}) == 2
        with pytest.raises(QueueFull) as refused:
            batcher.submit(image(3))
        assert refused.value.headers() == {"Retry-After": "1"}
        engine.gate.set()
        results = await asyncio.gather(running, *queued)
        assert [r.num_detections for r in results] == [0, 1, 2]
        assert metrics.registry.get_sample_value("ssd_queue_depth", {"model": "m"}) == 0

    run(scenario())


def test_a_cancelled_request_is_skipped() -> None:
    engine = RecordingEngine()
    engine.gate.clear()

    async def scenario() -> None:
        batcher, _ = make(engine, max_batch_size=4)
        batcher.start()
        first = batcher.submit(image(1))
        await asyncio.get_running_loop().run_in_executor(None, engine.entered.wait, 5)
        gone = batcher.submit(image(2))
        kept = batcher.submit(image(3))
        gone.cancel()
        engine.gate.set()
        assert (await first).num_detections == 1
        assert (await kept).num_detections == 3

    run(scenario())
    assert engine.batches == [[1], [3]]


def test_stop_answers_what_still_waits() -> None:
    engine = RecordingEngine()
    engine.gate.clear()

    async def scenario() -> None:
        batcher, _ = make(engine, max_batch_size=1)
        batcher.start()
        running = batcher.submit(image(1))
        await asyncio.get_running_loop().run_in_executor(None, engine.entered.wait, 5)
        waiting = batcher.submit(image(2))
        engine.gate.set()
        await batcher.stop()
        with pytest.raises(NotReady):
            await waiting
        with pytest.raises(NotReady):
            batcher.submit(image(3))
        running.cancel()

    run(scenario())


def test_check_batch_output_names_what_is_wrong() -> None:
    good = EngineOutput(
        num_detections=np.zeros(2, np.int32),
        boxes=np.zeros((2, K, 4), np.float32),
        scores=np.zeros((2, K), np.float32),
        classes=np.zeros((2, K), np.int32),
    )
    check_batch_output(good, 2)
    with pytest.raises(RuntimeError, match="batch of 3"):
        check_batch_output(good, 3)
    bad_boxes = EngineOutput(good.num_detections, np.zeros((2, K), np.float32), good.scores, good.classes)
    with pytest.raises(RuntimeError, match="boxes: bad shape"):
        check_batch_output(bad_boxes, 2)


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        BatcherConfig(input_size=SIZE, max_batch_size=0)
    with pytest.raises(ValueError):
        BatcherConfig(input_size=SIZE, max_queue_delay_s=-1)
    BatcherConfig(input_size=SIZE, max_batch_size=1, max_queue_delay_s=0)  # the batching-off baseline is valid
