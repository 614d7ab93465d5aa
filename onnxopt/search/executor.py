"""Where search candidates run: this process, a pool of worker processes, or a Ray cluster.

Every executor is made with the ``payload`` (the model and the data, see
``onnxopt.search.worker``) and ships it to each worker once: a process pool passes it to
the workers' initializer, Ray puts it in the object store once and each actor reads it
when it starts; tasks then carry only a candidate's few fields. ``map`` runs a task of
``onnxopt.search.worker`` over items and gives the results in the order of the items.

- ``LocalExecutor(payload, workers)``: ``workers`` processes (spawned: onnxruntime's thread
  pools do not survive a fork); with 1, the tasks run in this process.
- ``RayExecutor(payload, workers, address)``: actors on the Ray cluster at ``address``
  (``auto`` or ``ray://host:port``), or on a local Ray instance started for the search when
  no address is given. Ray is an optional dependency: ``pip install 'onnxopt[ray]'``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Iterable

from onnxopt.errors import UsageError
from onnxopt.search import worker

logger = logging.getLogger(__name__)


def default_workers() -> int:
    """Worker processes by default: one per core, at most 4 (each holds the model)."""
    return max(1, min(4, os.cpu_count() or 1))


class LocalExecutor:
    """Tasks in ``workers`` spawned processes (or in this process for 1)."""

    name = "local"

    def __init__(self, payload: dict, workers: int | None = None):
        self.workers = workers or default_workers()
        self._pool = None
        self._state = None
        if self.workers <= 1:
            self._state = worker.WorkerState(payload)
        else:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=worker.initialize, initargs=(payload,))

    def map(self, task: str, items: Iterable[Any]) -> list[Any]:
        items = list(items)
        if self._pool is None:
            return [worker.call(task, item, self._state) for item in items]
        return list(self._pool.map(worker.call, [task] * len(items), items))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def describe(self) -> str:
        return f"{self.workers} local process(es)" if self._pool is not None else "this process"


class _RayWorker:
    """A Ray actor: one worker's state, made from the payload in the object store."""

    def __init__(self, payload: dict):
        self.state = worker.WorkerState(payload)

    def run(self, task: str, item: Any) -> Any:
        return worker.call(task, item, self.state)


class RayExecutor:
    """Tasks on ``workers`` Ray actors (see the module docstring)."""

    name = "ray"

    def __init__(self, payload: dict, workers: int | None = None, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise UsageError("--executor ray needs Ray: pip install 'onnxopt[ray]'") from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs: dict = {"ignore_reinit_error": True, "include_dashboard": False, "log_to_driver": False,
                            "logging_level": logging.WARNING}
            if address:
                kwargs["address"] = address
            else:  # a local instance: its workers import what this process imports
                kwargs["num_cpus"] = workers or default_workers()
                kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
            try:
                ray.init(**kwargs)
            except Exception as exc:  # noqa: BLE001  (a cluster that cannot be reached is the user's input)
                raise UsageError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {exc}") from None
            self._started = True
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        ref = ray.put(payload)  # once, in the object store
        actor = ray.remote(num_cpus=1)(_RayWorker)
        self._actors = [actor.remote(ref) for _ in range(self.workers)]
        self.address = address or "local"

    def map(self, task: str, items: Iterable[Any]) -> list[Any]:
        from ray.util import ActorPool

        items = list(items)
        pool = ActorPool(self._actors)
        return list(pool.map(lambda a, item: a.run.remote(task, item), items))

    def close(self) -> None:
        for a in self._actors:
            self._ray.kill(a)
        self._actors = []
        if self._started:
            self._ray.shutdown()
            self._started = False

    def describe(self) -> str:
        return f"{self.workers} Ray actor(s) on {self.address}"


def make_executor(kind: str, payload: dict, workers: int | None = None, address: str | None = None):
    if kind == "local":
        if address:
            raise UsageError("--ray-address needs --executor ray")
        return LocalExecutor(payload, workers)
    if kind == "ray":
        return RayExecutor(payload, workers, address)
    raise UsageError(f"unknown executor '{kind}' (local or ray)")
