"""The search loop on Ray: long-lived trial workers, a grid or Optuna's TPE.

Ray core, not Ray Tune: a trial is one merge and one evaluation (no
intermediate results for a scheduler to act on), and what matters is that each
worker opens the inputs once and keeps them memory-mapped across trials. So the
driver starts one actor per trial slot (``--cpus-per-trial`` /
``--gpus-per-trial`` of the cluster's resources), keeps every actor busy, and
alone owns ``trials.jsonl``: each finished trial is appended as one line in one
write, which keeps the file valid through Ctrl-C and makes ``--resume`` a matter
of reading it back. Points come from the exhaustive grid of a small space or
from Optuna's TPE sampler (ask/tell), with the order encoded as one continuous
priority key per variant (the variants sorted by key, highest first).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from circuit_merge_plugin.search import outputs
from circuit_merge_plugin.search.evaluation import EvalSpec
from circuit_merge_plugin.search.space import (
    Point,
    Recipe,
    SearchInputError,
    Space,
    merge_seed,
    resolve_model_paths,
    starting_point,
    trial_recipe,
)

PRIORITY = "priority."
#: Object store of a local Ray: trials never use it (inputs are memory-mapped).
LOCAL_OBJECT_STORE = 128 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    out: str
    trials: int
    seed: int
    address: Optional[str]
    cpus_per_trial: float
    gpus_per_trial: float
    resume: bool
    quiet: bool = False


class SearchFailed(Exception):
    """Every trial failed (exit 1)."""


# ---------------------------------------------------------------- points


class Proposer:
    """Hands out the next points: the unfinished grid, or TPE's suggestions."""

    def __init__(self, space: Space, recipe: Recipe, settings: Settings, done: List[dict]):
        self.space = space
        self.done_keys = {record["key"]: record for record in done}
        size = space.size()
        self.exhaustive = size is not None and size <= settings.trials
        self.budget = max(0, settings.trials - len(done)) if not self.exhaustive else None
        self._pending: Dict[str, Any] = {}
        if self.exhaustive:
            self._grid = (p for p in space.points() if p.key() not in self.done_keys)
            self.total = size
            return
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        self.distributions = {
            f"{PRIORITY}{k}": FloatDistribution(0.0, 1.0) for k in range(1, len(space.variants) + 1)
        }
        for dimension in space.dimensions:
            self.distributions[dimension.name] = (
                CategoricalDistribution(list(dimension.values))
                if dimension.discrete
                else FloatDistribution(dimension.low, dimension.high)
            )
        self.study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.TPESampler(seed=settings.seed)
        )
        for record in done:
            point = record_point(record)
            if not space.contains(point):
                continue
            state = optuna.trial.TrialState.COMPLETE if record.get("score") is not None else optuna.trial.TrialState.FAIL
            self.study.add_trial(
                optuna.trial.create_trial(
                    params=self.encode(point),
                    distributions=self.distributions,
                    value=record.get("score"),
                    state=state,
                )
            )
        start = starting_point(recipe, space)
        if start is not None and not done:
            self.study.enqueue_trial(self.encode(start))
        self.total = settings.trials

    def encode(self, point: Point) -> Dict[str, Any]:
        n = len(self.space.variants)
        rank = {label: r for r, label in enumerate(point.order)}
        params = {
            f"{PRIORITY}{k}": 1.0 - (rank[label] + 0.5) / n
            for k, label in enumerate(self.space.variants, 1)
        }
        for dimension in self.space.dimensions:
            params[dimension.name] = point.values[dimension.name]
        return params

    def decode(self, params: Dict[str, Any]) -> Point:
        keys = [(-params[f"{PRIORITY}{k}"], k) for k in range(1, len(self.space.variants) + 1)]
        order = tuple(self.space.variants[k - 1] for _, k in sorted(keys))
        values = dict(self.space.fixed)
        for dimension in self.space.dimensions:
            value = params[dimension.name]
            values[dimension.name] = value if dimension.discrete else float(value)
        return Point(order, values)

    def next(self) -> Optional[Tuple[Any, Point]]:
        """``(handle, point)``, or None when the grid or the budget is used up."""
        if self.exhaustive:
            point = next(self._grid, None)
            return None if point is None else (None, point)
        for _ in range(1000):
            if self.budget <= 0:
                return None
            trial = self.study.ask(self.distributions)
            point = self.decode(trial.params)
            previous = self.done_keys.get(point.key())
            if previous is None:
                self.budget -= 1
                return trial, point
            # The same point again: its result is known, no need to merge it twice.
            self.tell(trial, previous.get("score"))
        return None

    def tell(self, handle: Any, score: Optional[float]) -> None:
        if handle is None:
            return
        import optuna

        if score is None:
            self.study.tell(handle, state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(handle, score)

    def record(self, record: dict) -> None:
        self.done_keys[record["key"]] = record


def record_point(record: dict) -> Point:
    return Point(tuple(record["order"]), dict(record["values"]))


# ---------------------------------------------------------------- Ray


def check_reachable(address: str) -> None:
    """One-line error for an address nothing listens on (Ray's own retries take minutes)."""
    if address == "auto":
        return
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise SearchInputError(f"--address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as error:
        raise SearchInputError(
            f"--address {address}: cannot reach a Ray cluster there ({error.strerror or error})"
        ) from None


def start_ray(address: Optional[str]) -> Tuple[Any, Optional[str]]:
    """``(ray module, local temp dir or None)``: a local Ray, or the cluster at ``address``."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if address is not None:
        check_reachable(address)
    import ray

    if address is not None:
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        except Exception as error:  # noqa: BLE001 - one line naming the address
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise SearchInputError(f"--address {address}: cannot join a Ray cluster ({first})") from None
        return ray, None
    temp_dir = tempfile.mkdtemp(prefix="cm-ray-", dir="/tmp")
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch CUDA: CPUs only
        gpus = 0
    ray.init(
        num_cpus=os.cpu_count() or 1,
        num_gpus=gpus,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        object_store_memory=LOCAL_OBJECT_STORE,
        _temp_dir=temp_dir,
    )
    return ray, temp_dir


def worker_count(ray, settings: Settings, limit: int) -> int:
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    count = math.floor(cpus / settings.cpus_per_trial + 1e-9) if settings.cpus_per_trial > 0 else limit
    if settings.gpus_per_trial > 0:
        count = min(count, math.floor(gpus / settings.gpus_per_trial + 1e-9))
        if count < 1:
            raise SearchInputError(
                f"--gpus-per-trial {settings.gpus_per_trial:g}: the cluster has {gpus:g} GPU(s)"
            )
    if count < 1:
        raise SearchInputError(
            f"--cpus-per-trial {settings.cpus_per_trial:g}: the cluster has {cpus:g} CPU(s)"
        )
    return max(1, min(count, limit))


def _make_workers(ray, eval_spec: EvalSpec, settings: Settings, count: int) -> List[Any]:
    @ray.remote
    class SearchWorker:
        def __init__(self, spec, threads, use_gpu):
            from circuit_merge_plugin.search.trial import TrialRunner

            try:  # Ctrl-C in a terminal reaches the whole process group: the driver stops us
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            except ValueError:  # not the main thread of the worker
                pass

            self.runner = TrialRunner(spec, device="cuda" if use_gpu else "cpu", threads=threads)

        def ready(self):
            return self.runner.where

        def run(self, recipe):
            return self.runner.run(recipe)

    threads = max(1, int(settings.cpus_per_trial)) if settings.cpus_per_trial else None
    cls = SearchWorker.options(num_cpus=settings.cpus_per_trial, num_gpus=settings.gpus_per_trial,
                               max_concurrency=1)
    workers = [cls.remote(eval_spec, threads, settings.gpus_per_trial > 0) for _ in range(count)]
    try:
        ray.get([w.ready.remote() for w in workers])
    except Exception as error:  # noqa: BLE001 - e.g. the eval does not import on a node
        cause = getattr(error, "cause", None) or error
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
        raise SearchInputError(f"a search worker could not start: {first}") from None
    return workers


# ---------------------------------------------------------------- the loop


def run(recipe: Recipe, space: Space, eval_spec: EvalSpec, settings: Settings,
        previous: List[dict], echo: Callable[[str], None]) -> Tuple[List[dict], bool]:
    """Run the search; returns ``(all trial records, interrupted)``.

    ``previous`` are the records read back for ``--resume``. The output
    directory is created only once the workers are up.
    """
    proposer = Proposer(space, recipe, settings, previous)
    engine = "exhaustive grid" if proposer.exhaustive else "Optuna TPE"
    todo = (
        sum(1 for p in space.points() if p.key() not in proposer.done_keys)
        if proposer.exhaustive else proposer.budget
    )
    records = list(previous)
    if todo == 0:
        echo(f"nothing to run: {len(previous)} trial(s) already in {settings.out}")
        return records, False
    resolve = resolve_model_paths(recipe)
    ray, temp_dir = start_ray(settings.address)
    workers: List[Any] = []
    interrupted = False
    previous_handler = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, on_term)
        workers = _make_workers(ray, eval_spec, settings, worker_count(ray, settings, todo))
        os.makedirs(settings.out, exist_ok=True)
        for line in space.describe():
            echo(f"space: {line}")
        echo(f"search: {engine}, {todo} trial(s) to run on {len(workers)} worker(s)")
        log = outputs.TrialLog(settings.out)
        number = max((r["trial"] for r in records), default=0)
        running: Dict[Any, Tuple[Any, int, Point, Any, float]] = {}
        idle = list(workers)
        best = outputs.best_record(records)
        finished = 0
        while True:
            while idle:
                proposal = proposer.next()
                if proposal is None:
                    break
                handle, point = proposal
                number += 1
                worker = idle.pop()
                seed = merge_seed(recipe, point, settings.seed)
                ref = worker.run.remote(trial_recipe(recipe, point, settings.seed, resolve=resolve))
                running[ref] = (worker, number, point, handle, seed)
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            worker, trial_number, point, handle, seed = running.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as error:  # noqa: BLE001 - a worker died: the trial failed
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                result = {"error": f"worker failed: {first[:300]}"}
            record = outputs.make_record(recipe, point, seed, trial_number, engine, result)
            log.append(record)
            records.append(record)
            proposer.record(record)
            proposer.tell(handle, record["score"])
            idle.append(worker)
            finished += 1
            if record["score"] is not None and (best is None or record["score"] > best["score"]):
                best = record
            echo(outputs.progress_line(record, finished, todo, best))
            outputs.write_summary(settings.out, recipe, records, settings, resolve, charts=False)
    except KeyboardInterrupt:
        interrupted = True
        echo("interrupted: stopping the workers; finished trials are kept")
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        for worker in workers:
            try:
                ray.kill(worker)
            except Exception:  # noqa: BLE001 - already gone
                pass
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
    return records, interrupted
