"""scan(workers=2) on a local Ray cluster on the CPU: the rows of one worker, a worker killed mid-point (its point
run again and marked), Ctrl-C (exit 130, every worker gone, the rows so far kept), and Ray named when missing."""

import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from extsub_kernels import scan
from extsub_kernels.cli.common import EXIT_SIGINT, EXIT_SIGTERM
from extsub_kernels.errors import InputError

from helpers import scan_until_rows

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
ROOT = Path(__file__).resolve().parents[1]
LAM = "0,0.5,1,2"  # 7 points over two methods


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance with 2 CPUs for the module (starting one takes ~15 s on a small machine)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def _kwargs(trained) -> dict:
    return dict(
        base=trained.base("llama"),
        keep=trained.eval_set("keep.jsonl"),
        forget=trained.eval_set("forget.jsonl"),
        truth=trained.eval_set("truth.jsonl"),
        prompts=trained.eval_set("prompts.txt"),
        max_new_tokens=16,
        lam=LAM,
    )


def _experts(trained) -> tuple:
    return trained.adapter("llama", "lora", "expert"), trained.adapter("llama", "lora", "anti")


@pytest.fixture(scope="module")
def one_worker(trained):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return scan(*_experts(trained), **_kwargs(trained), threads=1)


def _same_rows(got, expected) -> None:
    """The same points in the same order, every measure within float tolerance, the same continuations."""
    assert [(r.method, r.lam) for r in got] == [(r.method, r.lam) for r in expected]
    for a, b in zip(got, expected, strict=True):
        for name in ("keep_nll", "forget_nll", "truth_nll", "rep_4", "distinct_2", "mean_length", "end_rate"):
            assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-5, nan_ok=True), (a.method, a.lam, name)
    assert got.samples == expected.samples


def _worker_pids(task: str) -> list[int]:
    """Processes whose title is a Ray worker of the scan running `task` ("ray::_Worker.measure")."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith(task):
                found.append(int(pid))
    return found


def test_two_workers_give_the_rows_of_one_and_rerun_a_killed_workers_point(ray_cluster, trained, one_worker, tmp_path):
    """Two workers, one of them SIGKILLed while it measures a point: another measures that point, whose row says
    attempts 2; every row equals the one-worker scan's, in its order, in scan.json's format."""
    killed: list[int] = []

    def kill_one() -> None:
        deadline = time.monotonic() + 300
        while not killed and time.monotonic() < deadline:
            pids = _worker_pids("ray::_Worker.measure")
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    result = scan(*_experts(trained), **_kwargs(trained), workers=2, threads=2, out=tmp_path / "scan")
    killer.join(timeout=5)
    assert killed, "no worker was seen measuring a point"
    assert sorted(r.attempts for r in result) == [1] * (len(result) - 1) + [2]
    _same_rows(result, one_worker)
    assert result.setup["options"]["workers"] == 2 and result.setup["options"]["device"] == "cpu"
    assert {m: r.lam for m, r in result.recommendations.items()} == {
        m: r.lam for m, r in one_worker.recommendations.items()
    }
    data = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert data["status"] == "complete" and [r["lam"] for r in data["rows"]] == [r.lam for r in one_worker]
    assert list(data["rows"][0]) == list(one_worker.to_dict()["rows"][0])  # the rows of a one-device scan.json


@pytest.mark.parametrize(
    ("sent", "code", "what"),
    [(signal.SIGINT, EXIT_SIGINT, "interrupted"), (signal.SIGTERM, EXIT_SIGTERM, "terminated")],
)
def test_ctrl_c_or_sigterm_stops_every_worker_and_keeps_the_rows(trained, tmp_path, sent, code, what):
    psutil = pytest.importorskip("psutil")
    pytest.importorskip("ray")
    out = tmp_path / "scan"
    expert, anti = _experts(trained)
    kwargs = _kwargs(trained)
    args = [expert, anti, "--base", kwargs["base"], "--keep", kwargs["keep"], "--forget", kwargs["forget"]]
    args += ["--lam", "0:40:0.5", "--workers", "2", "--threads", "2", "--device", "cpu", "-o", out]
    proc = scan_until_rows(args, out)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any(c.cmdline()[:1] == ["ray::_Worker"] or "_Worker" in " ".join(c.cmdline()) for c in children)
    proc.send_signal(sent)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == code, err
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    data = json.loads((out / "scan.json").read_text())
    assert data["status"] == what and 2 <= data["measured"] < data["points"] == 161
    assert err.strip().splitlines()[-1].startswith(f"extsub-scan: error: {what} after {data['measured']} of 161")


def test_ray_missing_is_named_with_its_install_command(trained, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    for options in (dict(workers=2), dict(ray_address="auto")):
        with pytest.raises(
            InputError, match=r"with Ray, which is not installed; install with: pip install 'extsub\[ray\]'"
        ):
            scan(*_experts(trained), **_kwargs(trained), out=tmp_path / "scan", **options)
    assert not list(tmp_path.iterdir())


def test_a_cluster_address_where_nothing_listens_is_refused_at_once(trained, tmp_path):
    ray = pytest.importorskip("ray")
    ray.shutdown()  # a driver that starts Ray itself: the module's instance, if an earlier test left it up, is reused
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(InputError, match=rf"ray_address= 127\.0\.0\.1:{port}: nothing answers there"):
        scan(*_experts(trained), **_kwargs(trained), out=tmp_path / "scan", ray_address=f"127.0.0.1:{port}")
    assert time.monotonic() - started < 60 and not list(tmp_path.iterdir())


def test_one_worker_needs_no_ray(trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    result = scan(*_experts(trained), **(_kwargs(trained) | {"lam": "0,1", "prompts": None}), workers=1)
    assert len(result) == 3 and result.setup["options"]["workers"] == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(workers=0), r"workers= must be a positive integer, got 0"),
        (dict(workers=2, device="cuda:1"), r"device= cuda:1 names one device; with workers= each worker"),
    ],
)
def test_bad_worker_options(trained, options, message):
    with pytest.raises(InputError, match=message):
        scan(*_experts(trained), **_kwargs(trained), **options)
