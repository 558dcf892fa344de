"""Multi-process runs on jax.distributed: 2 processes x 4 CPU devices on localhost (gloo collectives).

References are independent of the multi-process code: the 1-process x 8-device run of the same
configuration (this pytest process, 8 devices from conftest), the global batch built by the
data source in one process, and numpy sums of it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from sciscale_jax import cli
from sciscale_jax.parallel import multihost
from sciscale_jax.train import Checkpointer, train
from sciscale_jax.train.step import TrainState

TINY = ["--layers", "1", "--heads", "2", "--embed-dim", "16", "--mlp-dim", "32", "--seq-len", "24",
        "--batch-size", "8", "--eval-every", "1000", "--log-every", "1", "--no-progress", "--keep", "3",
        "--save-every", "2", "--seed", "5", "--mesh", "data=2,fsdp=2,tensor=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def _launch(argv_of, n: int = 2, devices: int = 4):
    """Start ``n`` processes of ``argv_of(process_id, port)``, each seeing ``devices`` CPU devices."""
    port = _free_port()
    return [subprocess.Popen(argv_of(i, port), env=_env(devices), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(n)]


def _wait(procs, timeout=600) -> list[str]:
    deadline, outs = time.time() + timeout, []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1, deadline - time.time()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _sciscale(out, *args, n=2, process_args=True):
    def argv(i, port):
        dist = ["--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                "--process-id", str(i), "--distributed-timeout", "120"] if process_args else []
        return [sys.executable, "-m", "sciscale_jax.cli", "train", "protein-mlm", "--out", str(out), *TINY,
                *args, *dist]
    return argv


def _losses(run_dir) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r and "val_loss" not in r]


def _single(out, *args):
    """The same run in this process: 1 process x 8 devices, same mesh."""
    recipe, model_cfg, train_cfg = cli.build_configs(["protein-mlm", *TINY, *args])
    return train(recipe, model_cfg, train_cfg, out, progress=False, log=lambda *_: None,
                 resume=(out / "checkpoints").exists())


def _restore(run_dir, like, step=None):
    """Restore ``run_dir``'s checkpoint in this one process onto the shardings of state ``like``."""
    return Checkpointer(run_dir).restore(like, step)


def _same(a, b, rtol=1e-6, atol=1e-7):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


# A worker that joins a 2-process job and checks the mesh layout and one global batch.
WORKER = textwrap.dedent("""
    import sys, numpy as np
    from sciscale_jax.parallel import multihost
    multihost.initialize(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]), timeout_s=60)
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sciscale_jax.parallel import ParallelConfig, make_mesh

    class Source:  # a batch is a pure function of the step, as the recipes' sources are
        def batch(self, step):
            rng = np.random.default_rng([7, step])
            return {"x": rng.normal(size=(8, 6)).astype(np.float32), "y": rng.integers(0, 9, (8, 6, 3))}

    mesh = make_mesh(ParallelConfig(data=2, fsdp=2, tensor=2))
    procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
    data_axis = mesh.axis_names.index("data")
    assert (np.moveaxis(procs, data_axis, 0)[0] == 0).all() and (np.moveaxis(procs, data_axis, 0)[1] == 1).all()
    sh = {"x": NamedSharding(mesh, P(("data", "fsdp"), "tensor")), "y": NamedSharding(mesh, P(("data", "fsdp")))}
    shapes = {"x": (8, 6), "y": (8, 6, 3)}
    batch = multihost.global_batch(Source(), 3, sh, shapes)
    ref = Source().batch(3)
    assert len(batch["x"].addressable_shards) == 4
    for s in batch["x"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(s.data), ref["x"][s.index])
    sums = jax.jit(lambda b: (jnp.sum(b["x"].astype(jnp.float32) ** 2), jnp.sum(b["y"])))(batch)
    print("SUMS", float(sums[0]), int(sums[1]), flush=True)

    # a shipped source builds only this process's rows (batch_rows), equal to its full batch's rows
    from sciscale_jax.data.mlm import MLMBatches
    from sciscale_jax.data.protein import ProteinTokenizer
    tok, rng = ProteinTokenizer(), np.random.default_rng(3)
    enc = [np.concatenate([[tok.cls_id], rng.choice(tok.residue_ids, int(rng.integers(1, 30))), [tok.eos_id]])
           for _ in range(20)]
    mlm, calls = MLMBatches(enc, tok, batch_size=8, seq_len=12, seed=1), []
    mlm.batch_rows = lambda step, lo, hi, f=mlm.batch_rows: calls.append((lo, hi)) or f(step, lo, hi)
    full = MLMBatches(enc, tok, batch_size=8, seq_len=12, seed=1).batch(2)
    got = multihost.global_batch(mlm, 2, {k: sh["y"] for k in full}, {k: v.shape for k, v in full.items()})
    assert calls == [(4 * jax.process_index(), 4 * jax.process_index() + 4)], calls
    for k in full:
        for s in got[k].addressable_shards:
            np.testing.assert_array_equal(np.asarray(s.data), full[k][s.index])

    # every process writes its shards of a sharded state; the test restores it in one process
    from sciscale_jax.train.checkpoint import Checkpointer
    from sciscale_jax.train.step import TrainState
    w = np.random.default_rng(11).normal(size=(8, 6)).astype(np.float32)
    put = lambda value, sharding: jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])
    state = TrainState(put(np.array(3, np.int32), NamedSharding(mesh, P())), {"w": put(w, sh["x"])}, {},
                       {"mu": put(2 * w, NamedSharding(mesh, P(("data", "tensor"), "fsdp")))})
    ckpt = Checkpointer(sys.argv[3], keep=1, save_every=1, log=lambda *_: None)
    assert ckpt.save(state, force=True)
    ckpt.close()
    multihost.shutdown()
""")


def test_two_processes_build_a_hybrid_mesh_a_global_batch_and_a_checkpoint(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = _launch(lambda i, port: [sys.executable, str(script), str(port), str(i), str(tmp_path / "run")])
    outs = _wait(procs, timeout=180)
    assert [p.returncode for p in procs] == [0, 0], outs
    x = np.random.default_rng([7, 3]).normal(size=(8, 6)).astype(np.float32)
    y = np.random.default_rng([7, 3])
    y.normal(size=(8, 6))
    y_sum = int(y.integers(0, 9, (8, 6, 3)).sum())
    for out in outs:
        line = next(line for line in out.splitlines() if line.startswith("SUMS"))
        _, sq, total = line.split()
        assert float(sq) == pytest.approx(float(np.sum(x.astype(np.float64) ** 2)), rel=1e-5)
        assert int(total) == y_sum
    # the 2-process checkpoint in this one process, onto another layout (8 devices, rows over all of them)
    w = np.random.default_rng(11).normal(size=(8, 6)).astype(np.float32)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    like = TrainState(jax.numpy.zeros((), jax.numpy.int32), {"w": jax.device_put(np.zeros_like(w), rows)}, {},
                      {"mu": jax.device_put(np.zeros_like(w), rows)})
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["3"]
    got = Checkpointer(tmp_path / "run", log=lambda *_: None).restore(like)
    assert int(got.step) == 3 and got.params["w"].sharding == rows
    np.testing.assert_array_equal(np.asarray(got.params["w"]), w)
    np.testing.assert_array_equal(np.asarray(got.opt_state["mu"]), 2 * w)


def test_two_processes_evaluate_a_checkpoint_as_the_training_run_logged_it(tmp_path):
    """`sciscale eval --distributed --mesh`: each of 2 processes reads its devices' shards of a
    checkpoint written by a 1-process run and evaluates its rows; process 0 reports the figures
    the training loop logged."""
    run, target = tmp_path / "run", tmp_path / "eval.json"
    _single(run, "--steps", "2", "--batch-size", "32")  # 32 rows: a quarter of the evaluation calls of 8
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert logged["step"] == 2 and "val_loss" in logged

    def argv(i, port):
        return [sys.executable, "-m", "sciscale_jax.cli", "eval", str(run), "--mesh", "data=2,fsdp=2,tensor=2",
                "--json", str(target), "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                "2", "--process-id", str(i), "--distributed-timeout", "120"]

    procs = _launch(argv)
    outs = _wait(procs, timeout=300)
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    assert "checkpoint step 2" in outs[0] and "checkpoint step 2" not in outs[1]  # process 0 alone reports
    figures = json.loads(target.read_text())["validation"]
    assert figures.keys() == {k for k in logged if k.startswith("val_")}
    for name, value in figures.items():  # 1 process x 8 devices there, 2 x 4 here
        assert value == pytest.approx(logged[name], rel=1e-5, abs=1e-7), name
    assert cli.main(["eval", str(run), "--distributed"]) == 2  # refused before joining a job


def test_unreachable_coordinator_and_wrong_process_count_fail_with_one_line_in_time(tmp_path):
    port = _free_port()
    # process 1 of 2 with nobody serving the coordinator; then process 0 of a job of 3 that only it joins
    for pid, n, reason in ((1, 2, "nothing answers at"), (0, 3, "not all 3 processes joined")):
        argv = [sys.executable, "-m", "sciscale_jax.cli", "train", "protein-mlm", "--out", str(tmp_path / "x"),
                "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                "--process-id", str(pid), "--distributed-timeout", "3"]
        t0 = time.time()
        p = subprocess.run(argv, env=_env(2), capture_output=True, text=True, timeout=120)
        assert time.time() - t0 < 60
        assert p.returncode != 0
        err = [line for line in p.stderr.splitlines() if line.startswith("sciscale:")]
        assert len(err) == 1 and "could not join the jax.distributed job" in err[0] and "within 3 s" in err[0], \
            p.stderr[-2000:]
        assert reason in err[0]
    assert not (tmp_path / "x").exists()


def test_bad_distributed_arguments_are_refused():
    with pytest.raises(ValueError, match="missing num_processes, process_id"):
        multihost.initialize("localhost:1234")
    with pytest.raises(ValueError, match="must be host:port"):
        multihost.initialize("localhost", 2, 0)
    with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
        multihost.initialize("localhost:1234", 2, 2)
    assert cli.main(["train", "protein-mlm", "--coordinator", "localhost:1234"]) == 2
    assert not jax.distributed.is_initialized()


def test_process_split_keeps_tensor_axes_within_a_process():
    sizes = {"pipeline": 1, "data": 2, "fsdp": 4, "sequence": 1, "tensor": 2}
    assert multihost.process_split(sizes, 4) == {**{k: 1 for k in sizes}, "data": 2, "fsdp": 2}
    assert multihost.process_split({"data": 3, "pipeline": 2, "tensor": 4}, 6) == {"data": 3, "pipeline": 2,
                                                                                   "tensor": 1}
    with pytest.raises(ValueError, match="cannot span 4 processes.*factor 2 over"):
        multihost.process_split({"data": 2, "fsdp": 1, "tensor": 4}, 4)
    # one process: the layout is a plain reshape of the devices, and a process holds the whole batch
    devs = multihost.hybrid_devices({"data": 2, "fsdp": 2, "tensor": 2})
    assert [d.id for d in devs.flat] == [d.id for d in jax.devices()]
    mesh = jax.sharding.Mesh(devs, ("data", "fsdp", "tensor"))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    assert multihost.local_index(sh, (8, 5)) == (slice(0, 8), slice(0, 5))


@pytest.mark.slow
def test_two_processes_train_like_one_and_checkpoints_cross_process_counts(tmp_path):
    """2 x 4 devices train as 1 x 8 do (losses and state to 1e-6 relative); the 2-process
    checkpoint restores in 1 process; a 1-process checkpoint resumes in 2 processes."""
    steps = ["--steps", "4", "--schedule-steps", "4"]
    procs = _launch(_sciscale(tmp_path / "two", *steps))
    single = _single(tmp_path / "one", *steps)
    outs = _wait(procs)
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    assert "final train loss" in outs[0] and "final train loss" not in outs[1]  # process 0 alone reports
    two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(two) == len(one) == 4
    np.testing.assert_allclose(two, one, rtol=1e-6)
    saved = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    assert saved == sorted(p.name for p in (tmp_path / "one" / "checkpoints").iterdir()) and "4" in saved
    restored = _restore(tmp_path / "two", single["state"])  # written by 2 processes, read by 1
    assert int(restored.step) == 4
    _same(restored.params, single["state"].params)
    _same(restored.opt_state, single["state"].opt_state)
    # ... and onto another mesh in one process: a single device
    like = jax.device_put(single["state"], jax.devices()[0])
    _same(_restore(tmp_path / "two", like).params, single["state"].params)

    # 1 -> 2: stop a 1-process run at step 2, resume it in 2 processes, compare with the 4-step run
    _single(tmp_path / "one_then_two", "--steps", "2", "--schedule-steps", "4")
    procs = _launch(_sciscale(tmp_path / "one_then_two", "--steps", "4", "--schedule-steps", "4", "--resume"))
    outs = _wait(procs)
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    assert "resumed from step 2" in outs[0]
    np.testing.assert_allclose(_losses(tmp_path / "one_then_two"), one, rtol=1e-6)
    _same(_restore(tmp_path / "one_then_two", single["state"]).params, single["state"].params)


@pytest.mark.slow
@pytest.mark.parametrize("writes", [[], ["--async-checkpoint"]], ids=["blocking", "async"])
def test_resume_after_killing_one_process_continues_exactly(tmp_path, writes):
    """One of 2 processes killed while training (with --async-checkpoint, possibly while a
    checkpoint is being written in the background by both): the resume starts from the newest
    complete checkpoint and ends where an uninterrupted run ends."""
    args = ["--steps", "40", "--schedule-steps", "40", "--save-every", "4", *writes]
    full = _single(tmp_path / "full", *args)
    run = tmp_path / "killed"
    procs = _launch(_sciscale(run, *args))
    deadline = time.time() + 400
    while not (run / "checkpoints" / "4").is_dir() and time.time() < deadline and procs[0].poll() is None:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)  # one process dies; the launcher (Slurm, a Job) ends the other
    procs[1].wait()
    procs[0].kill()
    _wait(procs, timeout=60)
    ckpt = Checkpointer(run)
    interrupted = ckpt.latest_step()
    ckpt.close()
    assert interrupted is not None and 4 <= interrupted < 40
    procs = _launch(_sciscale(run, *args, "--resume"))
    outs = _wait(procs)
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    assert f"resumed from step {interrupted}" in outs[0]
    final = _restore(run, full["state"])
    assert int(final.step) == 40
    _same(final.params, full["state"].params)
    _same(final.opt_state, full["state"].opt_state)


@pytest.mark.slow  # ~200 s on 2 cores (four runs, each with the final evaluation); single-process
                  # adapters-only runs are tested in test_adapter_checkpoints.py
def test_two_processes_train_and_resume_an_adapters_only_lora_run(tmp_path):
    """A LoRA run from --init-from in 2 processes records the fingerprint a 1-process run records
    (the frozen weights as read, whatever the process count), writes its adapters alone, and
    resumes in 2 processes (the frozen weights read again) to the 1-process run's losses."""
    _single(tmp_path / "base", "--steps", "2")
    lora = ["--init-from", str(tmp_path / "base"), "--lora-rank", "2", "--schedule-steps", "4", "--lr", "1e-2"]
    one = _single(tmp_path / "one", *lora, "--steps", "4")
    for steps, resume in (("2", []), ("4", ["--resume"])):
        procs = _launch(_sciscale(tmp_path / "two", *lora, "--steps", steps, *resume))
        outs = _wait(procs)
        assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    record = lambda run: json.loads((run / "run_config.json").read_text())["frozen_weights"]  # noqa: E731
    assert record(tmp_path / "two") == record(tmp_path / "one")
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=1e-6)
    assert one["steps"] == 4 and len(_losses(tmp_path / "one")) == 4
