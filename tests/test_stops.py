"""Nothing lost: one live run per directory (the lock), clean stops on SIGINT / SIGTERM (the step
is saved, exit 130 / 143, one line, no traceback, the rerun continues bit for bit), a second
signal stops at once, ranks agree on the step they stop at, timed checkpoints, and drivers that
forward a signal to their child run once."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint
from engine.stops import RunDirBusy, RunLock, Stopped, run_child
from engine.trainer import CurriculumTrainer
from pretrain.main import main

from test_pretrain import images, tiny_overrides  # noqa: F401  (images: a fixture)

ROOT = Path(__file__).resolve().parents[1]


def tiny(data, out, *extra):
    """14 optimizer steps in 10 etpp stages (16 / 24 / 32 px), stage ends at steps 3, 6, 7, ..."""
    return tiny_overrides(data, out, "train.keep_last=0", *extra)


def steps_logged(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def latest(run_dir):
    return load_checkpoint(os.path.join(run_dir, "checkpoints", "checkpoint-latest.pth"))


# ---- the lock -----------------------------------------------------------------------------------
def test_lock_names_its_holder_and_is_taken_over_from_a_dead_process(tmp_path):
    lock = RunLock(str(tmp_path), "python -m pretrain ...").acquire()
    with pytest.raises(RunDirBusy, match=rf"in use by a live run \(pid {os.getpid()} on {socket.gethostname()}"):
        RunLock(str(tmp_path)).acquire()                         # another open file: the flock conflicts
    assert "python -m pretrain" in RunLock.holder(str(tmp_path))
    lock.release()
    assert RunLock.holder(str(tmp_path)) is None
    again = RunLock(str(tmp_path)).acquire()
    assert again.notice == ""                                    # released cleanly: nothing to report
    again.release()
    # a holder that died (no flock held, its record never released) is taken over with a notice
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 999999999, "host": socket.gethostname(),
                                                   "started": "2026-01-01T00:00:00", "command": "old"}))
    taken = RunLock(str(tmp_path)).acquire()
    assert "took over" in taken.notice and "pid 999999999" in taken.notice
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    taken.release()


def test_a_second_run_into_a_live_runs_directory_exits_2_and_writes_nothing(images, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from engine.stops import RunLock; RunLock(sys.argv[1], 'the first run').acquire(); "
        "print('held', flush=True); time.sleep(120)"), str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(tiny(images, out)) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by a live run (pid {holder.pid} on {socket.gethostname()}" in err
        assert "the first run" in err and "Traceback" not in err
        assert sorted(os.listdir(out)) == ["run.lock"]           # no log.txt, config, metrics or checkpoints
        assert main([*tiny(images, out), "--dry-run"]) == 0       # a dry run writes nothing, says who holds it
        assert f"a live run holds {out} (pid {holder.pid}" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (killed: its record was never released): the next run takes over, says so
    assert main(tiny(images, out, "train.max_steps=1")) == 0
    assert f"took over {out}/run.lock from a run that is gone (pid {holder.pid}" in capsys.readouterr().out


# ---- signals in the training loop ---------------------------------------------------------------
def signal_after_step(monkeypatch, step, *signums):
    """Deliver ``signums`` to this process right after optimizer step ``step`` (1-based) trains."""
    train_step = CurriculumTrainer._train_step

    def patched(self, it, info):
        images = train_step(self, it, info)
        if self.step == step - 1:                      # the counter moves on after _train_step returns
            for s in signums:
                os.kill(os.getpid(), s)
                time.sleep(0.01)                       # separate deliveries (signals do not queue)
        return images

    monkeypatch.setattr(CurriculumTrainer, "_train_step", patched)


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    assert main(tiny(images, out)) == 0
    return out


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_the_step_and_the_rerun_continues_bit_for_bit(images, uninterrupted, tmp_path, capsys,
                                                                     monkeypatch, signum, code):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        signal_after_step(m, 4, signum)                 # inside the second stage (steps 3-6)
        assert main(tiny(images, out)) == code
    captured = capsys.readouterr()
    assert "\nstopped at step 4 of 14; run the same command to resume\n" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert f"{signal.Signals(signum).name}: saving step 4, then stopping" in captured.out
    assert "checkpoints: at every stage end and the last step, every 10 min of training" in captured.out
    assert latest(out)["step"] == 4 and steps_logged(out) == [1, 2, 3, 4]
    assert "stopped: stopped at step 4 of 14" in (out / "log.txt").read_text()
    assert json.loads((out / "run.lock").read_text())["released"]        # released on the way out

    assert main(tiny(images, out)) == 0
    assert f"resumed from {out}/checkpoints/checkpoint-latest.pth at step 4/14" in capsys.readouterr().out
    full, resumed = latest(uninterrupted), latest(out)
    assert resumed["step"] == full["step"] == 14
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    losses = {r["step"]: r["loss"] for r in map(json.loads, (uninterrupted / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    again = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "loss" in r}
    assert again == losses


def test_a_second_signal_stops_at_once(images, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    signal_after_step(monkeypatch, 5, signal.SIGINT, signal.SIGINT)
    assert main(tiny(images, out)) == 130
    err = capsys.readouterr().err
    assert "stopped at once (SIGINT)" in err and "run the same command" in err and "Traceback" not in err
    assert latest(out)["step"] == 3                                       # the stage end before it, nothing after


def test_timed_checkpoints_and_the_policy_line(images, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny(images, out, "train.max_steps=2", "train.save_every_minutes=1e-9")) == 0
    assert "every 1e-09 min of training (train.save_every_minutes)" in capsys.readouterr().out
    assert sorted(os.listdir(out / "checkpoints")) == [               # the first stage ends at step 3
        "checkpoint-00000001.pth", "checkpoint-00000002.pth", "checkpoint-latest.pth"]
    assert main(tiny(images, tmp_path / "bad", "train.save_every_minutes=-1")) == 2
    assert "train.save_every_minutes must be >= 0" in capsys.readouterr().err


# ---- from the outside, as a user does it --------------------------------------------------------
def _wait_for_steps(run_dir, proc, n, timeout=240):
    t0 = time.time()
    while len(steps_logged(run_dir)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "the run logged no steps"
        time.sleep(0.1)


def test_ctrl_c_from_a_terminal_stops_cleanly_and_the_rerun_resumes(images, tmp_path):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does: data-loader workers get
    it too), then the same command again."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain", *tiny(images, out, "curriculum.epochs=400", "data.num_workers=2")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for_steps(out, proc, 3)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr + stdout
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped at step ") and last.endswith("; run the same command to resume"), last
    stopped = int(last.split()[3])
    assert latest(out)["step"] == stopped >= max(steps_logged(out))
    r = subprocess.run([*cmd, f"train.max_steps={stopped + 1}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from {out}/checkpoints/checkpoint-latest.pth at step {stopped}/" in r.stdout


def test_the_nproc_wrapper_stops_without_torchruns_traceback(images, tmp_path):
    out = tmp_path / "run"
    # (the wrapper's default config is the demo's: no demo set, no kNN folders, the patch's multiples)
    over = tiny(images, out, "curriculum.epochs=400", "data.demo=false", "curriculum.multiple_of=8",
                "curriculum.baseline_epochs=null", "eval.knn.train=''", "eval.knn.val=''")
    proc = subprocess.Popen(["bash", "tools/pretrain.sh", "--nproc", "2", *over],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_steps(out, proc, 3)
    os.killpg(proc.pid, signal.SIGINT)                   # the terminal's Ctrl-C: torchrun forwards it once
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr + stdout and "SignalException" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("stopped at step ")


def test_ranks_agree_on_the_step_when_one_rank_gets_sigterm(images, tmp_path):
    """Two gloo processes; SIGTERM reaches rank 1 only. Both stop after the same step, one
    checkpoint of it is written, both exit 143 and rank 0 says where it stopped."""
    out = tmp_path / "ddp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "pretrain", *tiny(images, out, "curriculum.epochs=400")]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True,
                              env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
             for r in range(2)]
    try:
        _wait_for_steps(out, procs[0], 3)
        procs[1].send_signal(signal.SIGTERM)
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [143, 143], results[0][1][-2000:] + results[1][1][-2000:]
    assert not any("Traceback" in o + e for o, e in results)
    last = results[0][1].strip().splitlines()[-1]
    assert last.startswith("stopped at step "), last
    assert "stopped at step" not in results[1][1]                          # one line, from rank 0
    assert latest(out)["step"] == int(last.split()[3])
    assert "SIGTERM: saving step" in results[0][0]                          # rank 0 learnt it from rank 1


# ---- drivers (study, evaluation) ------------------------------------------------------------------
CHILD = """
import signal, sys, time
got = []
signal.signal(signal.SIGINT, lambda s, f: got.append(s))
open(sys.argv[1], "w").write("ready")
while not got:
    time.sleep(0.01)
time.sleep(0.5)                      # a second forwarded signal would arrive now
open(sys.argv[1], "w").write(str(len(got)))
sys.exit(130)
"""


def test_run_child_forwards_a_signal_once_and_reports_the_stop(tmp_path):
    flag = tmp_path / "flag"

    def interrupt_when_ready():
        while not flag.exists() or flag.read_text() != "ready":
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)           # a terminal's Ctrl-C reaches the driver only

    threading.Thread(target=interrupt_when_ready, daemon=True).start()
    with open(tmp_path / "child.log", "w") as log, pytest.raises(Stopped) as e:
        run_child([sys.executable, "-c", CHILD, str(flag)], log, "arm 'x' seed 0")
    assert e.value.exit_code == 130
    assert "stopped during arm 'x' seed 0: it stopped on SIGINT and saved its last step" in str(e.value)
    assert flag.read_text() == "1"                     # the child got exactly one signal
    with open(tmp_path / "ok.log", "w") as log:        # and a child that just ends returns its code
        assert run_child([sys.executable, "-c", "import sys; sys.exit(3)"], log, "x") == 3
