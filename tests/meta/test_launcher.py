"""The training entry point's launcher: bad options fail in the launching process, in one line with
exit status 2, before any worker starts; SIGINT/SIGTERM to the launcher stops every worker; the
per-step metrics (JSON lines, TensorBoard events, PNG) hold what the run did."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TINY = ["--layers", "1", "--hidden", "64", "--heads", "2", "--batch", "8", "--seq", "32"]


class _WorkersStarted(Exception):
    """Raised instead of starting training: the checks let the options through."""


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() in this process, with training replaced by an exception and the device fixed to the CPU
    (so the precision rules are those of a host without GPUs, wherever the test runs)."""
    from bmtrain.examples import launch

    def started(*args: object, **kwargs: object) -> None:
        raise _WorkersStarted

    monkeypatch.setattr(launch, "_run_workers", started)
    monkeypatch.setattr(launch, "run", started)
    monkeypatch.setattr(launch, "_device", lambda: torch.device("cpu"))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def _main_exit(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from bmtrain.examples.train import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    assert captured.out == ""
    code = exc.value.code
    assert isinstance(code, int)
    return code, captured.err


BAD = [  # (arguments, a piece of the message naming the rule)
    (["--nproc", "3", "--tp", "2"], r"number of processes \(3\) must be divisible by --tp x --pipe \(2 x 1 = 2\)"),
    (["--nproc", "4", "--tp", "2", "--pipe", "2", "--layers", "4", "--batch", "5"], r"--batch \(5\) must be divisible by --tp \(2\)"),
    (["--nproc", "2", "--pipe", "2", "--layers", "2", "--batch", "1", "--micro-batches", "4"],
     r"4 pipeline micro-batches .* at least 4 sequences per pipe group, got .* = 2"),
    (["--nproc", "2", "--micro-batches", "2"], r"--micro-batches \(2\) needs a pipeline"),
    (["--nproc", "2", "--hidden", "100", "--heads", "3"], r"--hidden \(100\) must be divisible by --heads \(3\)"),
    (["--nproc", "2", "--tp", "2", "--hidden", "96", "--heads", "3"], r"--heads \(3\) must be divisible by --tp \(2\)"),
    (["--nproc", "2", "--pipe", "2", "--layers", "1"], r"--layers \(1\) must be at least --pipe \(2\)"),
    (["--nproc", "2", "--model", "llama", "--heads", "5", "--hidden", "80"], r"--heads \(5\) must be divisible by llama's"),
    (["--nproc", "2", "--precision", "fp16"], r"--precision fp16 needs a GPU"),
    (["--nproc", "2", "--seq", "100000"], r"--seq \(100000\) must be below the corpus length"),
    (["--nproc", "2", "--model", "llama", "--tp", "2"], r"written without tensor-parallel layers"),
    (["--nproc", "0"], r"--nproc must be >= 1, got 0"),
    (["--nproc", "2", "--log-every", "0"], r"--log-every must be >= 1, got 0"),
    (["--model", "bert"], r"invalid choice: 'bert'"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_option_is_one_line_and_exit_2_before_any_worker(
    args: list[str], message: str, tmp_path: Path, no_training: None,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = _main_exit(args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("bmtrain-train: error: "), err
    assert re.search(message, err), err
    assert list(tmp_path.iterdir()) == []  # no checkpoint or metrics directory made


def test_good_options_pass_the_checks(no_training: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rules reject only what cannot run: these layouts reach the point of starting workers."""
    from bmtrain.examples.train import main

    monkeypatch.chdir(tmp_path)
    for args in (
        ["--nproc", "2"],
        ["--nproc", "4", "--tp", "2", "--pipe", "2", "--layers", "3", "--batch", "2", "--micro-batches", "2"],
        ["--nproc", "2", "--model", "llama", "--pipe", "2", "--precision", "bf16"],
    ):
        with pytest.raises(_WorkersStarted):
            main(args)


def test_an_existing_checkpoint_is_kept_unless_overwrite(
    no_training: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bmtrain.examples.train import main

    ckpt = tmp_path / "old.pt"
    ckpt.write_bytes(b"a previous run")
    code, err = _main_exit(["--nproc", "2", "--save", str(ckpt)], capsys)
    assert code == 2 and "exists: pass --overwrite" in err and err.count("\n") == 1, err
    with pytest.raises(_WorkersStarted):
        main(["--nproc", "2", "--save", str(ckpt), "--overwrite"])
    assert ckpt.read_bytes() == b"a previous run"  # still there when training would start

    metrics = tmp_path / "m"
    metrics.mkdir()
    (metrics / "metrics.jsonl").write_text("{}\n")
    code, err = _main_exit(["--nproc", "2", "--save", "", "--metrics-dir", str(metrics)], capsys)
    assert code == 2 and "holds a previous run's metrics (metrics.jsonl)" in err, err


def test_an_unwritable_save_path_fails_before_training(
    no_training: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = _main_exit(["--nproc", "2", "--save", str(blocker / "ckpt" / "x.pt")], capsys)
    assert code == 2 and "cannot be written" in err and "is not a directory" in err, err
    code, err = _main_exit(["--nproc", "2", "--save", "", "--metrics-dir", str(blocker)], capsys)
    assert code == 2 and "--metrics-dir" in err and "is a file" in err, err


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from bmtrain.examples.options import parse_options

    with pytest.raises(SystemExit) as exc:
        parse_options(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 0.003)" in out and "(default: checkpoints/{model}.pt)" in out and "(default: 10)" in out
    assert "(default: None)" not in out


def _env() -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path: gloo workers


def test_the_command_fails_fast_without_starting_workers(tmp_path: Path) -> None:
    """The real command: the layout error comes from the launching process (no worker's
    output, no files), on one line, with status 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "bmtrain.examples.train", "--nproc", "3", "--tp", "2"],
        capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""  # a worker would have printed the model line
    assert proc.stderr.count("\n") == 1 and "must be divisible by --tp x --pipe" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie has stopped: only its exit status is left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes through /proc")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_launcher_stops_every_worker(signum: int, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bmtrain.examples.train", "--nproc", "2", *TINY, "--steps", "100000",
         "--log-every", "1", "--save", "x.pt"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=_env(),
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # training has started once a step is reported
            lines.append(line)
            if line.startswith("step 2/"):
                break
        assert lines and lines[-1].startswith("step 2/"), "".join(lines)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        proc.send_signal(signum)
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "workers still running 10 s after the signal"
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name}: 2 workers ended" in err, err
    assert not (tmp_path / "x.pt").exists()  # stopped before the end: no checkpoint written
    records = [json.loads(line) for line in (tmp_path / "x-metrics" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records[:2]] == [1, 2]  # the steps done are on disk


def test_metrics_hold_every_step(tmp_path: Path) -> None:
    """A tiny run's metrics.jsonl has one record per step whose losses are those the run
    printed and whose learning rates are bmt's cosine schedule; the TensorBoard events hold the
    same values; the PNG is an image of the curves."""
    steps, warmup, lr = 6, 2, 3e-3
    proc = subprocess.run(
        [sys.executable, "-m", "bmtrain.examples.train", "--nproc", "2", *TINY, "--steps", str(steps),
         "--warmup", str(warmup), "--lr", str(lr), "--log-every", "2", "--save", "", "--metrics-dir", "m"],
        capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.findall(r"^step (\d+)/6 \|", out, re.M) == ["2", "4", "6"], out
    assert "metrics: m/metrics.jsonl, TensorBoard events (tensorboard --logdir m), m/curves.png" in out, out

    records = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    fields = {"step", "loss", "lr", "loss_scale", "grad_norm", "skipped", "tokens_per_s", "mfu", "memory_gib",
              "rss_gib", "elapsed_s"}
    assert all(set(r) == fields for r in records), records[0]
    first = re.search(r"^first loss: ([0-9.]+)$", out, re.M)
    final = re.search(r"^final loss: ([0-9.]+)$", out, re.M)
    assert first and final, out
    assert f"{records[0]['loss']:.4f}" == first.group(1) and f"{records[-1]['loss']:.4f}" == final.group(1)
    for r in records:
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["rss_gib"] > 0
        assert r["loss_scale"] == 1.0 and r["skipped"] is False
        assert r["mfu"] is None and r["memory_gib"] is None  # CPU: no peak FLOP/s, no CUDA memory
    assert all(b["elapsed_s"] > a["elapsed_s"] for a, b in zip(records[:-1], records[1:], strict=True))

    # the learning rates the steps used: bmt's Cosine on a plain torch optimizer, stepped alike
    import bmtrain as bmt

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = bmt.lr_scheduler.Cosine(opt, start_lr=lr, warmup_iter=warmup, end_iter=steps, num_iter=0)
    expected_lr = []
    for _ in range(steps):
        expected_lr.append(opt.param_groups[0]["lr"])
        sched.step()
    assert [r["lr"] for r in records] == pytest.approx(expected_lr, rel=1e-12, abs=0)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p for p in (tmp_path / "m").iterdir() if p.name.startswith("events.out.tfevents.")]
    assert len(events) == 1, events
    acc = EventAccumulator(str(tmp_path / "m"))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/loss_scale", "perf/tokens_per_s"} <= set(
        acc.Tags()["scalars"]
    )
    assert "perf/mfu" not in acc.Tags()["scalars"]  # unknown on CPU: left out, not written as 0
    tb_loss = acc.Scalars("train/loss")
    assert [e.step for e in tb_loss] == list(range(1, steps + 1))
    assert [e.value for e in tb_loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)  # stored as fp32

    from matplotlib.image import imread

    png = tmp_path / "m" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(png)
    assert image.shape[0] >= 200 and image.shape[1] >= 400 and image.std() > 0  # drawn, not blank


def test_missing_plot_packages_are_named(
    no_training: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explicit --metrics-dir without TensorBoard/matplotlib is an error saying what to install;
    the default metrics directory then gets metrics.jsonl only, with a note in the log."""
    from bmtrain.examples import checks, run_metrics
    from bmtrain.examples.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checks, "missing_plot_packages", lambda: ["tensorboard", "matplotlib"])
    code, err = _main_exit(["--nproc", "2", "--metrics-dir", "m"], capsys)
    assert code == 2 and "needs tensorboard and matplotlib" in err and "bmtrain[train]" in err, err
    with pytest.raises(_WorkersStarted):
        main(["--nproc", "2"])

    monkeypatch.setattr(run_metrics, "missing_plot_packages", lambda: ["tensorboard", "matplotlib"])
    writer = run_metrics.MetricsWriter(str(tmp_path / "w"), overwrite=False)
    note = writer.note()
    assert note is not None and "writing metrics.jsonl only" in note
    rec = run_metrics.StepRecord(1, 2.5, 1e-3, 1.0, math.inf, True, 100.0, None, None, 0.1, 0.5)
    writer.write(rec)
    assert writer.close() == [str(tmp_path / "w" / "metrics.jsonl")]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["metrics.jsonl"]
    line = json.loads((tmp_path / "w" / "metrics.jsonl").read_text())
    assert line["grad_norm"] is None and line["skipped"] is True  # inf is not JSON: null
