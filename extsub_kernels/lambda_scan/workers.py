"""Where a scan's points run: `prepare` (BASE loaded once, the sets, the installer) and `measure_point` here, or
`spread` over Ray workers that each do the same (`scan(workers=, ray_address=)`; docs/design.md §8b).

The driver holds the queue: λ = 0 first (every row is relative to it), then the largest |λ| first (where
continuations run to max_new_tokens, the longest points), so the workers finish together. A worker that dies has
its point handed to another (the row counts the `attempts`)."""

import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from extsub_kernels._version import install_hint
from extsub_kernels.adapters.peft import owns_adapter_key
from extsub_kernels.engine.options import input_roles
from extsub_kernels.errors import InputError, MergeError
from extsub_kernels.io import ResolvedInput, resolve_input
from extsub_kernels.lambda_scan import rendering
from extsub_kernels.lambda_scan.evaluate import EvaluationSets, Evaluator
from extsub_kernels.lambda_scan.harness import Harness
from extsub_kernels.lambda_scan.installers import Installer, make_installer
from extsub_kernels.lambda_scan.model import check_threads, evaluation_dtype, load_model, load_tokenizer, torch_threads
from extsub_kernels.lambda_scan.results import EXPERT, ScanRow, sample_records
from extsub_kernels.merging import adapter_inputs

MAX_ATTEMPTS = 3  # a point whose worker dies this many times stops the scan: the point itself is the likely cause
Inputs = list[tuple[str, ResolvedInput]]


@dataclass(frozen=True)
class Recipe:
    """What loading and measuring needs, as values a Ray worker receives (the inputs' specs: BASE last)."""

    specs: tuple[str, ...]
    methods: tuple[str, ...]
    sets: dict[str, str | None]
    chat_template: str
    system: str | None
    harness: Harness | None
    batch_size: int
    max_new_tokens: int
    dtype: torch.dtype | None


def resolve(specs: Sequence[str], *, quiet: bool) -> Inputs:
    """(role, input) for EXPERT, the ANTIs and BASE (last)."""
    roles = (*input_roles(len(specs) - 2), "BASE")
    return [
        (role, resolve_input(spec, role=role, quiet=quiet, adapter_key=owns_adapter_key))
        for role, spec in zip(roles, specs, strict=True)
    ]


def prepare(
    recipe: Recipe, inputs: Inputs, device: torch.device, timing: dict, check: Callable | None = None
) -> tuple[Installer, Evaluator]:
    """Sets read, installer made (inputs validated, then `check`), BASE loaded and attached, examples checked against
    it; `timing` gets load_ and prepare_seconds. On the meta device (a spread scan's driver): no weight read."""
    start = time.perf_counter()
    base = inputs[-1][1]
    tokenizer = load_tokenizer(base)
    chat = rendering.chat_template(tokenizer, recipe.chat_template, recipe.system)
    sets = EvaluationSets.load(**recipe.sets, tokenizer=tokenizer, chat=chat)
    installer = make_installer(inputs, adapters=adapter_inputs(inputs), methods=recipe.methods, device=device)
    prepared = loaded = time.perf_counter()
    try:
        if check is not None:
            check(installer)
        model = load_model(base, device=device, dtype=evaluation_dtype(recipe.dtype, device, base))
        loaded = time.perf_counter()
        sets.check_fits(model, tokenizer, recipe.max_new_tokens if recipe.sets["prompts"] is not None else 0)
        if device.type != "meta":
            installer.attach(model, base.name)
    except BaseException:
        installer.close()
        raise
    timing["load_seconds"] = loaded - prepared
    timing["prepare_seconds"] = (prepared - start) + (time.perf_counter() - loaded)
    harness = replace(recipe.harness, _manager=None) if recipe.harness is not None else None
    return installer, Evaluator(sets, tokenizer, recipe.batch_size, recipe.max_new_tokens, device, harness)


def measure_point(
    installer: Installer, evaluator: Evaluator, method: str, lam: float, first_method: str
) -> tuple[ScanRow, list[dict]]:
    """Install (method, λ) and measure it: its row and samples. λ = 0 goes through the first method (all agree)."""
    start = time.perf_counter()
    installer.install(first_method if method == EXPERT else method, lam)
    if evaluator.device.type == "cuda":
        torch.cuda.synchronize(evaluator.device)
    merge_seconds = time.perf_counter() - start
    values, generations = evaluator.measure(installer.model)
    return ScanRow(method, lam, merge_seconds=merge_seconds, **values), sample_records(method, lam, generations)


class _Worker:
    """A Ray actor: loads BASE once on its device (its own GPU, or the CPU with `threads`), then measures points."""

    def __init__(self, recipe: Recipe, device: torch.device, threads: int | None):
        self.threads = check_threads(threads)
        self.timing: dict[str, float] = {}
        with torch_threads(self.threads):
            self.installer, self.evaluator = prepare(recipe, resolve(recipe.specs, quiet=True), device, self.timing)
        self.first = recipe.methods[0]

    def ready(self) -> tuple[float, str]:  # the seconds BASE took to load, and its dtype
        dtype = next(self.installer.model.parameters()).dtype
        return self.timing["load_seconds"], str(dtype).removeprefix("torch.")

    def measure(self, method: str, lam: float) -> tuple[ScanRow, list[dict]]:
        with torch_threads(self.threads):
            return measure_point(self.installer, self.evaluator, method, lam, self.first)


def import_ray() -> Any:
    """Ray, or an InputError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError(
            "workers= and ray_address= spread the points with Ray, which is not installed; install with: "
            f"pip install 'extsub[ray]' ({install_hint('ray')})",
            options=("workers", "ray_address"),
        ) from None
    return ray


def check_workers(workers: int | None, ray_address: str | None, device: str | torch.device) -> bool:
    """Whether the points spread over Ray workers (checking that Ray is there), or run here on one device."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InputError(f"workers= must be a positive integer, got {workers!r}", options=("workers",))
    if ray_address is None and (workers or 1) == 1:
        return False
    if str(device) not in ("auto", "cpu", "cuda"):
        why = "with workers= each worker takes a device of its own: give device='auto', 'cuda' or 'cpu'"
        raise InputError(f"device= {device} names one device; {why}", options=("device", "workers"))
    import_ray()
    return True


def connect(workers: int | None, ray_address: str | None, device: str, threads: int) -> dict[str, Any]:
    """Ray started (unless it is, or `ray_address` names a cluster) and the workers placed, before any file is
    written: {ray, started, gpu, n, each (threads per worker)}; an InputError where the cluster cannot hold them."""
    ray = import_ray()
    if ray_address:
        _check_answers(ray_address)
    started = not ray.is_initialized()
    if started:
        cores = len(os.sched_getaffinity(0))
        local = {} if ray_address else {"num_cpus": max(cores, workers or 1), "num_gpus": torch.cuda.device_count()}
        try:
            ray.init(address=ray_address, include_dashboard=False, logging_level="ERROR", log_to_driver=False, **local)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise InputError(f"ray_address= {ray_address}: no Ray cluster ({e})", options=("ray_address",)) from None
    try:
        resources = ray.cluster_resources()
        gpu = device != "cpu" and resources.get("GPU", 0) >= 1
        if device == "cuda" and not gpu:
            raise InputError("device='cuda' with workers=: the Ray cluster has no GPU", options=("workers",))
        slots = int(resources.get("GPU" if gpu else "CPU", 0))
        n = workers or (slots if gpu else len(ray.nodes()))
        if n > slots:
            what = f"{slots} {'GPU' if gpu else 'CPU'}s"
            raise InputError(f"workers={n}, but the Ray cluster has {what}", options=("workers",))
    except BaseException:
        if started:
            ray.shutdown()
        raise
    return dict(ray=ray, started=started, gpu=gpu, n=n, each=None if ray_address or gpu else max(1, threads // n))


def _check_answers(address: str) -> None:
    """A cluster address where nothing listens is refused in seconds (`ray.init` retries it for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local" or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise InputError(f"ray_address= {address}: nothing answers there ({why})", options=("ray_address",)) from None


def spread(
    cluster: dict[str, Any],
    recipe: Recipe,
    points: Sequence[tuple[str, float]],
    done: Callable[[int, ScanRow, list[dict]], None],
    options: dict[str, Any],
    timing: dict[str, Any],
) -> None:
    """Measure `points` on `connect`'s workers, calling `done(index, row, samples)` as each row arrives (any order);
    stop every worker on the way out (Ctrl-C too) and the Ray it started; workers and loads go to `options`/`timing`."""
    ray, gpu, n = cluster["ray"], cluster["gpu"], cluster["n"]
    actors: set[Any] = set()
    try:
        options |= {"workers": n, "device": "cuda" if gpu else "cpu"}
        loads = timing.setdefault("worker_load_seconds", [])
        worker = ray.remote(_Worker).options(num_gpus=1 if gpu else 0, num_cpus=0 if gpu else 1, max_restarts=0)
        queue = deque(sorted(range(len(points)), key=lambda i: (points[i][0] != EXPERT, -abs(points[i][1]))))
        attempts = [0] * len(points)
        busy: dict[Any, tuple[Any, int | None]] = {}  # in-flight call → (its worker, its point; None: loading)

        def start() -> None:
            actor = worker.remote(recipe, torch.device("cuda" if gpu else "cpu"), cluster["each"])
            actors.add(actor)
            busy[actor.ready.remote()] = (actor, None)

        for _ in range(n):
            start()
        while queue or any(index is not None for _, index in busy.values()):  # never wait for a load left unused
            (call,), _ = ray.wait(list(busy), num_returns=1)
            actor, index = busy.pop(call)
            try:
                answer = ray.get(call)
            except ray.exceptions.RayTaskError as e:  # the point raised: the scan fails as on one device
                raise e.cause if isinstance(e.cause, BaseException) else e from None
            except ray.exceptions.RayActorError as e:  # the worker died: its point goes to another
                actors.discard(actor)
                why = str(e).strip().splitlines()[-1]  # Ray's last line: the error, after its traceback
                if index is None:
                    raise MergeError(f"a scan worker could not start: {why}") from None
                attempts[index] += 1
                if attempts[index] >= MAX_ATTEMPTS:
                    method, lam = points[index]
                    raise MergeError(f"{method} λ={lam:g}: its worker died {MAX_ATTEMPTS} times; last: {why}") from None
                queue.appendleft(index)
                start()
                continue
            if index is None:
                loads.append(answer[0])
                options["dtype"], timing["load_seconds"] = answer[1], max(loads)
            else:
                row, samples = answer
                done(index, replace(row, attempts=attempts[index] + 1), samples)
            if queue:
                index = queue.popleft()
                busy[actor.measure.remote(*points[index])] = (actor, index)
    finally:
        for actor in actors:
            ray.kill(actor)
        if cluster["started"]:
            ray.shutdown()
