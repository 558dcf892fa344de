"""Interrupted and damaged runs resume to the state of an uninterrupted run, bit for bit.

A reference run (tiny model, 6 steps, checkpoints at 2, 4, 6) is trained once per module;
each test damages or interrupts a run and checks the resumed final state with
``assert_array_equal`` against the reference's step-6 checkpoint. Signals are sent from
inside the data pipeline (``batch(step)``) so they land at a known step; one CLI test sends
SIGINT from outside at a random moment.
"""

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from flax import nnx

from sciscale_jax import cli
from sciscale_jax.models import Transformer
from sciscale_jax.parallel import ParallelConfig, make_mesh
from sciscale_jax.recipes import get_recipe
from sciscale_jax.recipes.protein_mlm import ProteinMLMConfig
from sciscale_jax.train import Checkpointer, TrainConfig, build_optimizer, init_train_state, loop, train
from sciscale_jax.train.checkpoint import CheckpointError, check_run_dir
from sciscale_jax.train.rundir import RunLock, keep_schedule
from sciscale_jax.train.signals import RunInterrupted

# The recipe's own config class, as the CLI builds it, so a run started by `sciscale train` resumes here.
MODEL = ProteinMLMConfig(vocab_size=32, num_layers=1, num_heads=2, embed_dim=32, mlp_dim=64, max_len=64)
CFG = TrainConfig(steps=6, batch_size=4, seq_len=32, save_every=2, eval_every=3, log_every=1, warmup_steps=2,
                  seed=1)
RECIPE = get_recipe("protein-mlm")
CLI_ARGS = ["--layers", "1", "--embed-dim", "32", "--heads", "2", "--mlp-dim", "64", "--max-len", "64",
            "--seq-len", "32", "--batch-size", "4", "--save-every", "2", "--eval-every", "3", "--log-every", "1",
            "--warmup-steps", "2", "--seed", "1", "--no-progress"]


def _train(out, cfg=CFG, recipe=RECIPE, model=MODEL, **kw):
    return train(recipe, model, cfg, out, progress=False, log=kw.pop("log", lambda *_: None), **kw)


def _target(model=MODEL, cfg=CFG):
    return init_train_state(Transformer(model, rngs=nnx.Rngs(7)), build_optimizer(cfg))[1]


def _load(run_dir, step, model=MODEL, cfg=CFG):
    ckpt = Checkpointer(run_dir)
    try:
        return ckpt.restore(_target(model, cfg), step=step)
    finally:
        ckpt.close()


def _equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _steps(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its directory (checkpoints 2, 4, 6) and its final state."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = _train(out)
    assert result["steps"] == 6
    return out, result["state"]


def _copy(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    return out


def _signal_at(step_to_signal, signum, *, fill_disk=None):
    """The protein-mlm recipe, whose batch(step) sends ``signum`` to this process at that step (with
    ``prefetch=0``: built when the step starts)."""
    def build_data(cfg, model_cfg=None):
        data = RECIPE.build_data(cfg, model_cfg)
        inner = data.train

        class Train:
            def batch(self, step):
                if step == step_to_signal:
                    if fill_disk is not None:
                        fill_disk()
                    else:
                        os.kill(os.getpid(), signum)
                return inner.batch(step)
        return dataclasses.replace(data, train=Train())
    return dataclasses.replace(RECIPE, build_data=build_data)


# ------------------------------------------------------------------ damaged checkpoints

def _biggest_data_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)


DAMAGE = {
    "truncated": lambda d: (lambda f: f.write_bytes(f.read_bytes()[:40]))(_biggest_data_file(d / "6")),
    "zeroed": lambda d: (lambda f: f.write_bytes(bytes(f.stat().st_size)))(_biggest_data_file(d / "6")),
    "deleted_file": lambda d: _biggest_data_file(d / "6").unlink(),
    "deleted_default": lambda d: shutil.rmtree(d / "6" / "default"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_restore_falls_back_past_a_damaged_latest_checkpoint(reference, tmp_path, damage):
    out = _copy(reference, tmp_path)
    DAMAGE[damage](out / "checkpoints")
    (out / "checkpoints" / "999").mkdir()      # an empty stray folder named like a step
    (out / "checkpoints" / "notes").mkdir()    # not a checkpoint: ignored, left alone
    logged = []
    ckpt = Checkpointer(out, log=logged.append)
    restored = ckpt.restore(_target())
    ckpt.close()
    _equal(restored, _load(reference[0], 4))   # the newest good one
    assert int(restored.step) == 4
    names = _steps(out)
    assert "4" in names and "notes" in names and "6" not in names and "999" not in names
    assert any(n.startswith("6.damaged-") for n in names) and any(n.startswith("999.damaged-") for n in names)
    assert len(logged) == 2 and all("\n" not in line and "moved it to" in line for line in logged)
    assert logged[0].startswith("checkpoint 999 is damaged") and logged[1].startswith("checkpoint 6 is damaged")


def test_damaged_latest_checkpoint_resumes_bit_identical(reference, tmp_path):
    out = _copy(reference, tmp_path)
    DAMAGE["truncated"](out / "checkpoints")
    logged = []
    result = _train(out, resume=True, log=logged.append)
    assert any("checkpoint 6 is damaged" in line for line in logged)
    assert "resumed from step 4" in logged[-1]
    _equal(result["state"], reference[1])


def test_checkpoint_of_a_different_model_is_one_error_and_moves_nothing(reference, tmp_path):
    out = _copy(reference, tmp_path)
    bigger = dataclasses.replace(MODEL, embed_dim=64)
    ckpt = Checkpointer(out)
    with pytest.raises(ValueError, match=r"checkpoint .*/6 was saved by a different model or optimizer \(\d+ arrays"):
        ckpt.restore(_target(bigger))
    assert _steps(out) == ["2", "4", "6"]


# ------------------------------------------------------------------ kills

@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_resumes_bit_identical(reference, tmp_path):
    """A real SIGKILL after checkpoint 4's files are written, before Orbax renames its tmp folder."""
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal
        from orbax.checkpoint._src.path import atomicity
        real = atomicity.AtomicRenameTemporaryPath.finalize
        async def finalize(self, *a, **k):
            if os.path.basename(str(self.get())).startswith("4."):
                os.kill(os.getpid(), signal.SIGKILL)
            return await real(self, *a, **k)
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
        from sciscale_jax import cli
        cli.main(["train", "protein-mlm", "--out", {str(out)!r}, "--steps", "6", *{CLI_ARGS!r}])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = _steps(out)
    assert "2" in names and "4" not in names and any(".orbax-checkpoint-tmp" in n for n in names), names
    logged = []
    result = _train(out, resume=True, log=logged.append)
    assert "resumed from step 2" in logged[-1]
    assert not any(".orbax-checkpoint-tmp" in n for n in _steps(out))
    _equal(result["state"], reference[1])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_run_saves_stops_and_resumes_bit_identical(reference, tmp_path, signum):
    out = tmp_path / "run"
    # the signal's step (3) is no interval: the stop saves it; batches built when their step starts
    # (no --prefetch), so the signal sent by batch(2) arrives during step 2
    cfg = dataclasses.replace(CFG, save_every=4, prefetch=0)
    before = signal.getsignal(signal.SIGINT)  # (SIG_IGN where the suite runs in a background job)
    with pytest.raises(RunInterrupted) as exc:
        _train(out, cfg=cfg, recipe=_signal_at(2, signum))
    assert exc.value.exit_code == 128 + signum
    assert str(exc.value).startswith(f"stopped by {signal.Signals(signum).name} after step 3; checkpoint 3 saved")
    assert "\n" not in str(exc.value)
    assert _steps(out)[-1] == "3" and not any("tmp" in n for n in _steps(out))
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    with RunLock(out):  # the lock was released
        pass
    result = _train(out, cfg=cfg, resume=True)
    _equal(result["state"], reference[1])


def test_cli_sigint_from_outside_exits_130_with_one_line(tmp_path):
    """Fast kill test: Ctrl-C at a random moment of a long CLI run."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sciscale_jax.cli", "train", "protein-mlm", "--out", str(out),
                             "--steps", "100000", *CLI_ARGS, "--save-every", "5", "--log-every", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while not (out / "checkpoints" / "10").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stdout + stderr, stderr[-3000:]
    assert lines[0].startswith("sciscale: stopped by SIGINT after step ")
    stopped = int(lines[0].split("after step ")[1].split(";")[0])
    assert f"--resume --out {out}" in lines[0]
    names = _steps(out)
    assert str(stopped) in names and not any("tmp" in n for n in names)
    assert not (out / ".sciscale.lock").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax callbacks after the failure
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a tmpfs needs root")
def test_full_disk_keeps_earlier_checkpoints_and_resumes_bit_identical(reference, tmp_path, capfd):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mnt / "run"
        filler = mnt / "filler"

        def fill():  # leave 16 KiB: metrics lines fit, a checkpoint does not
            st = os.statvfs(mnt)
            filler.write_bytes(bytes(max(0, st.f_bavail * st.f_frsize - 16384)))

        capfd.readouterr()
        with pytest.raises(CheckpointError) as exc:
            _train(out, cfg=dataclasses.replace(CFG, prefetch=0), recipe=_signal_at(4, None, fill_disk=fill))
        message = str(exc.value)
        assert "\n" not in message and "could not write checkpoint 6" in message
        assert "no space left on device" in message and "earlier checkpoints kept: [1, 2, 4]" in message
        assert _steps(out) == ["1", "2", "4"]  # no tmp folder left behind
        assert "Traceback" not in capfd.readouterr().err
        filler.unlink()
        result = _train(out, resume=True)
        _equal(result["state"], reference[1])
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def _disk_full(reference, tmp_path):
    """(run with checkpoints 2 and 4, the state of 4, Orbax's finalize class, its real finalize and
    one raising ENOSPC) for simulating a full disk inside Orbax's write."""
    from orbax.checkpoint._src.path import atomicity
    out = _copy(reference, tmp_path)
    shutil.rmtree(out / "checkpoints" / "6")

    async def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    cls = atomicity.AtomicRenameTemporaryPath
    return out, _load(out, 4), cls, cls.finalize, full


def test_checkpoint_write_failure_removes_the_partial_folder(reference, tmp_path, monkeypatch):
    """ENOSPC raised inside Orbax's write (simulated): one line, tmp removed, earlier steps kept."""
    out, state, atomicity_cls, real, full = _disk_full(reference, tmp_path)
    monkeypatch.setattr(atomicity_cls, "finalize", full)
    ckpt = Checkpointer(out, save_every=1)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint 5 .*no space left on device.*\[2, 4\]"):
        ckpt.save(state._replace(step=jax.numpy.asarray(5, state.step.dtype)), force=True)
    monkeypatch.setattr(atomicity_cls, "finalize", real)
    assert _steps(out) == ["2", "4"]


def test_background_checkpoints_equal_the_synchronous_ones(reference, tmp_path):
    """--async-checkpoint: the state is copied at the save and written while the next steps run
    (and donate their input buffers): every checkpoint equals the synchronous run's."""
    out = tmp_path / "run"
    result = _train(out, cfg=dataclasses.replace(CFG, async_checkpoint=True))
    assert _steps(out) == ["2", "4", "6"] and not any("tmp" in n for n in _steps(out))
    for step in (2, 4, 6):
        _equal(_load(out, step), _load(reference[0], step))
    _equal(result["state"], reference[1])
    # resumed from checkpoint 4 with background writes: the same final state
    again = _copy(reference, tmp_path / "again")
    shutil.rmtree(again / "checkpoints" / "6")
    _equal(_train(again, cfg=dataclasses.replace(CFG, async_checkpoint=True), resume=True)["state"], reference[1])


def test_a_failed_background_write_is_one_line_at_the_next_save(reference, tmp_path, monkeypatch):
    """A background write that fails (ENOSPC inside Orbax's finalize, simulated) is reported by the
    next save that writes, or by close: one line naming its step, the partial folder removed,
    earlier checkpoints kept."""
    out, state, atomicity_cls, real, full = _disk_full(reference, tmp_path)
    at = lambda step: state._replace(step=jax.numpy.asarray(step, state.step.dtype))  # noqa: E731
    for finish in ("save", "close"):
        monkeypatch.setattr(atomicity_cls, "finalize", full)
        ckpt = Checkpointer(out, save_every=1, async_write=True)
        assert ckpt.save(at(5))  # returns once the state is copied; the write fails in the background
        with pytest.raises(CheckpointError, match=r"could not write checkpoint 5 .*no space left on device.*\[2, 4\]"):
            ckpt.save(at(6)) if finish == "save" else ckpt.close()
        monkeypatch.setattr(atomicity_cls, "finalize", real)
        assert _steps(out) == ["2", "4"], finish
        ckpt.close()  # nothing left to report
    ckpt = Checkpointer(out, save_every=1, async_write=True)
    assert not ckpt.save(at(4))  # not past the newest checkpoint: nothing written, nothing waited for
    assert ckpt.save(at(7))
    ckpt.close()
    assert _steps(out) == ["2", "4", "7"]
    _equal(_load(out, 7).params, state.params)


def test_interrupt_inside_a_checkpoint_write_removes_the_partial_folder(reference, tmp_path, monkeypatch):
    """A second Ctrl-C while Orbax writes: KeyboardInterrupt goes on, the tmp folder does not stay."""
    from orbax.checkpoint._src.path import atomicity
    out = _copy(reference, tmp_path)
    state = _load(out, 4)

    async def interrupted(self, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", interrupted)
    ckpt = Checkpointer(out, save_every=1)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(state._replace(step=jax.numpy.asarray(7, state.step.dtype)), force=True)
    assert _steps(out) == ["2", "4", "6"]


# ------------------------------------------------------------------ runs and directories

def test_second_run_on_a_locked_directory_is_refused_and_stale_locks_are_not(reference, tmp_path, capsys):
    out = _copy(reference, tmp_path)
    before = sorted(p.name for p in out.iterdir())
    with RunLock(out) as lock:
        lock.write_pid()
        rc = cli.main(["train", "protein-mlm", "--out", str(out), "--resume", "--steps", "6", *CLI_ARGS])
        err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert f"output directory {out} is in use by another run (pid {os.getpid()}" in err
    assert sorted(p.name for p in out.iterdir()) == before
    # A process that dies holding the lock leaves its pid file, but not the lock.
    code = f"from sciscale_jax.train.rundir import RunLock; import os, signal; l = RunLock({str(out)!r}).acquire(); " \
           "l.write_pid(); os.kill(os.getpid(), signal.SIGKILL)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    assert (out / ".sciscale.lock").exists()
    with RunLock(out):
        pass


def test_extending_a_run_keeps_its_schedule(reference, tmp_path):
    out = _copy(reference, tmp_path)
    longer = dataclasses.replace(CFG, steps=8)
    assert keep_schedule(out, longer, resume=True).schedule_steps == 6
    assert keep_schedule(out, longer, resume=False).schedule_steps == 0
    extended = _train(out, cfg=longer, resume=True)
    straight = _train(tmp_path / "straight", cfg=dataclasses.replace(CFG, steps=8, schedule_steps=6))
    _equal(extended["state"], straight["state"])
    saved = json.loads((out / "run_config.json").read_text())["train"]
    assert saved["steps"] == 8 and saved["schedule_steps"] == 6
    # Asking for another schedule length on resume is a different run: refused without force.
    config = json.loads((out / "run_config.json").read_text())
    config["train"]["schedule_steps"] = 8
    with pytest.raises(ValueError, match="train.schedule_steps: saved 6, now 8"):
        check_run_dir(out, config, resume=True)


def test_schedule_past_its_length_stays_at_the_final_rate():
    """One AdamW update at step t uses lr(t) of the warm-up + cosine of schedule_steps, written plainly."""
    import math
    cfg = TrainConfig(steps=900, schedule_steps=600, learning_rate=2e-3, warmup_steps=30, weight_decay=0.0,
                      grad_clip=0.0)

    def plain(t):  # end value lr * 0.1; constant after the schedule's end
        if t < 30:
            return 2e-3 * t / 30
        frac = min(t - 30, 570) / 570
        return 2e-4 + (2e-3 - 2e-4) * 0.5 * (1 + math.cos(math.pi * frac))

    params = {"w": jax.numpy.ones(3)}
    for t in (15, 300, 599, 600, 700, 899):
        tx = build_optimizer(cfg)
        state = jax.tree.map(lambda x: x + t if x.dtype == jax.numpy.int32 and x.ndim == 0 else x, tx.init(params))
        upd, _ = tx.update({"w": jax.numpy.full(3, 0.5)}, state, params)
        m, v = 0.1 * 0.5, 0.001 * 0.25  # Adam moments after one gradient 0.5, bias-corrected at count t + 1
        m_hat, v_hat = m / (1 - 0.9 ** (t + 1)), v / (1 - 0.999 ** (t + 1))
        np.testing.assert_allclose(np.asarray(upd["w"]), -plain(t) * m_hat / (math.sqrt(v_hat) + 1e-8), rtol=1e-4)


def test_resume_onto_a_mesh_smaller_than_the_devices(reference, tmp_path):
    mesh = make_mesh(ParallelConfig(data=4))
    assert mesh.devices.size == 4 and list(mesh.devices.flat) == jax.devices()[:4]
    out = _copy(reference, tmp_path)
    shutil.rmtree(out / "checkpoints" / "6")
    result = _train(out, cfg=dataclasses.replace(CFG, mesh="data=4"), resume=True)
    assert result["state"].params["embed"].sharding.mesh.size == 4
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6),
                 result["state"].params, reference[1].params)
    with pytest.raises(ValueError, match=r"data=3 has 3 devices but 8 devices are available; .*CUDA_VISIBLE_DEVICES"):
        make_mesh(ParallelConfig(data=3))


@pytest.mark.parametrize("mesh", ["", "data=2,fsdp=2"])
def test_resume_reads_the_checkpoint_without_initialising_a_state(reference, tmp_path, monkeypatch, mesh):
    """A resumed run reads its checkpoint straight onto the abstract state (shapes, dtypes,
    shardings): no initialisation runs first, so resuming needs no second copy of the state."""
    out = _copy(reference, tmp_path)
    shutil.rmtree(out / "checkpoints" / "6")

    def refuse(*_args, **_kw):
        raise AssertionError("a resumed run initialised a state")

    monkeypatch.setattr(loop, "init_train_state", refuse)
    monkeypatch.setattr(loop, "sharded_init", refuse)
    targets, restore = [], Checkpointer.restore
    monkeypatch.setattr(Checkpointer, "restore", lambda self, target, step=None: (
        targets.append(jax.tree.leaves(target)), restore(self, target, step))[1])
    result = _train(out, cfg=dataclasses.replace(CFG, mesh=mesh), resume=True)
    assert len(targets) == 1 and targets[0] and all(isinstance(x, jax.ShapeDtypeStruct) for x in targets[0])
    assert all(x.sharding is not None for x in targets[0])
    if not mesh:
        _equal(result["state"], reference[1])
    else:
        jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6),
                     result["state"].params, reference[1].params)
