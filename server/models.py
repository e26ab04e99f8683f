"""The served models: one Pipeline (engine + batcher + metadata) per model file, looked up by name.

A model is served under its file name without the suffix (`settings.model_name`); the first one given is the
default of /detect. Every front end (/detect, KServe v2 over HTTP and gRPC) finds its pipeline here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from server.admission import Admission
from server.engines.base import Engine
from server.errors import ModelNotFound
from server.metrics import Metrics
from server.pipeline import Pipeline
from server.settings import Settings, model_name


class ModelRegistry:
    def __init__(
        self, settings: Settings, metrics: Metrics, engine_factory: Callable[[], Engine] | None = None
    ) -> None:
        # One bound on the work in flight for the whole server, whichever model and front end a request uses.
        self.admission = Admission(settings.effective_max_in_flight, settings.request_timeout_ms / 1000.0)
        metrics.images_in_flight.set_function(lambda: self.admission.in_flight)
        self._pipelines: dict[str, Pipeline] = {}
        for file in settings.model:
            name = model_name(file)
            self._pipelines[name] = Pipeline(
                settings.for_model(file), metrics.for_model(name), engine_factory, admission=self.admission
            )
        self.default_name = model_name(settings.model_file)
        # The models share the machine: together they finish what each finishes alone, at most.
        self.admission.rate = lambda: sum(pipeline.engine_rate() for pipeline in self._pipelines.values())
        metrics.admission_bound.set_function(self.admission.bound)

    # ------------------------------------------------------------------------------------------ lookup

    @property
    def default(self) -> Pipeline:
        return self._pipelines[self.default_name]

    def get(self, name: str | None) -> Pipeline:
        """The pipeline serving `name` (None: the default); ModelNotFound for a name nobody serves."""
        if name is None:
            return self.default
        try:
            return self._pipelines[name]
        except KeyError:
            raise ModelNotFound(f"no model named {name!r}; served: {', '.join(self._pipelines)}") from None

    def items(self) -> Iterator[tuple[str, Pipeline]]:
        return iter(self._pipelines.items())

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def status(self) -> str:
        """failed if any model failed, ready when all are, else loading."""
        statuses = {pipeline.status for pipeline in self._pipelines.values()}
        if "failed" in statuses:
            return "failed"
        return "ready" if statuses == {"ready"} else "loading"

    @property
    def error(self) -> str | None:
        """The load errors; each prefixed with its model's name when there are several models."""
        failed = [(name, p.error) for name, p in self._pipelines.items() if p.error is not None]
        if len(self._pipelines) == 1:
            return failed[0][1] if failed else None
        return "; ".join(f"{name}: {error}" for name, error in failed) or None

    async def start(self) -> None:
        """Load every model at once (each has its own engine thread); never raises, like Pipeline.start."""
        await asyncio.gather(*(pipeline.start() for pipeline in self._pipelines.values()))

    async def stop(self) -> None:
        await asyncio.gather(*(pipeline.stop() for pipeline in self._pipelines.values()))
