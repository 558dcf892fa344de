"""Pipeline executor: loss and gradients of every schedule against the single-device run of the
same MLP stack, the one reduction after the loop, memory flat in m for 1F1B, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sciscale_jax.memory import compiled_memory
from sciscale_jax.parallel import ParallelConfig, make_mesh
from sciscale_jax.parallel.pipeline import pipeline_value_and_grad

D_IN, D, D_OUT, LAYERS = 5, 6, 3, 2


def first_fn(w, b):
    return jnp.tanh(b["x"] @ w)


def stage_fn(w, h, b=None):
    for i in range(w["w"].shape[0]):
        h = h + jnp.tanh(h @ w["w"][i] + w["b"][i])
    return h


def last_fn(w, h, b):
    return jnp.sum((h @ w - b["y"]) ** 2) / 7.0


def reference(params, batch):
    """The whole model on one device, one batch, plain Python loop over stages."""
    h = first_fn(params["first"], batch)
    for s in range(params["stages"]["w"].shape[0]):
        h = stage_fn(jax.tree.map(lambda x: x[s], params["stages"]), h, batch)
    return last_fn(params["last"], h, batch)


def problem(stages, batch_size, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    params = {"first": normal(D_IN, D) * 0.5,
              "stages": {"w": normal(stages, LAYERS, D, D) * 0.3, "b": normal(stages, LAYERS, D) * 0.1},
              "last": normal(D, D_OUT) * 0.5}
    batch = {"x": normal(batch_size, D_IN), "y": normal(batch_size, D_OUT)}
    return params, batch


def check(schedule, p, m, v=1, data=1, rows_per_mb=3):
    mesh = make_mesh(ParallelConfig(pipeline=p, data=data), jax.devices()[:p * data])
    params, batch = problem(p * v, m * data * rows_per_mb)
    fn = jax.jit(pipeline_value_and_grad(first_fn, stage_fn, last_fn, mesh=mesh, schedule=schedule,
                                         microbatches=m, virtual_stages=v))
    loss, grads = fn(params, batch)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference))(params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))


@pytest.mark.parametrize("schedule,p,m,v,data", [
    ("gpipe", 4, 5, 1, 1),         # m not a multiple of p
    ("1f1b", 2, 3, 1, 2),          # data x pipeline
    ("interleaved", 2, 4, 2, 2),   # v = 2, data x pipeline
    ("zbh1", 4, 6, 1, 1),
])
def test_matches_single_device(schedule, p, m, v, data):
    check(schedule, p, m, v, data)


@pytest.mark.slow
@pytest.mark.parametrize("schedule,p,m,v,data", [
    ("gpipe", 8, 8, 1, 1), ("1f1b", 8, 3, 1, 1), ("1f1b", 4, 6, 1, 2), ("interleaved", 4, 8, 2, 2),
    ("interleaved", 8, 8, 2, 1), ("zbh1", 8, 9, 1, 1), ("zbh1", 2, 5, 1, 4), ("gpipe", 2, 7, 1, 4),
])
def test_matches_single_device_more(schedule, p, m, v, data):
    check(schedule, p, m, v, data)


def _while_bodies(hlo: str):
    """The text of every while-loop body computation in an HLO module."""
    bodies = set()
    for line in hlo.splitlines():
        if " while(" in line and "body=" in line:
            bodies.add(line.split("body=")[1].split(",")[0].split("}")[0].strip().lstrip("%"))
    blocks, name, cur = {}, None, []
    for line in hlo.splitlines():
        head = line.split(" (")[0].split()
        if line and not line.startswith(" ") and head and head[-1].lstrip("%") in bodies:
            name, cur = head[-1].lstrip("%"), []
        elif name and line.startswith("}"):
            blocks[name], name = "\n".join(cur), None
        elif name:
            cur.append(line)
    return blocks


def test_one_reduction_after_the_loop():
    """Replicated params differentiated per microbatch must not all-reduce inside the tick loop."""
    mesh = make_mesh(ParallelConfig(pipeline=2, data=2), jax.devices()[:4])
    params, batch = problem(2, 24)
    fn = jax.jit(pipeline_value_and_grad(first_fn, stage_fn, last_fn, mesh=mesh, schedule="1f1b", microbatches=4))
    hlo = fn.lower(params, batch).compile().as_text()
    bodies = _while_bodies(hlo)
    assert bodies, "expected the tick loop as a while loop"
    assert "all-reduce" in hlo  # the reduction after the loop
    assert all("all-reduce" not in b for b in bodies.values())
    assert any("collective-permute" in b for b in bodies.values())


def test_1f1b_memory_flat_in_m_gpipe_grows():
    """Fixed microbatch size: 1F1B's stash is bounded by p, GPipe's holds every microbatch."""
    mesh = make_mesh(ParallelConfig(pipeline=2), jax.devices()[:2])
    temp = {}
    for schedule in ("gpipe", "1f1b"):
        for m in (4, 16):
            params, batch = problem(2, m * 64)
            fn = jax.jit(pipeline_value_and_grad(first_fn, stage_fn, last_fn, mesh=mesh, schedule=schedule,
                                                 microbatches=m))
            temp[schedule, m] = compiled_memory(fn, params, batch).temp_bytes
    act = 64 * D * 4  # one microbatch activation, float32
    assert temp["1f1b", 16] <= temp["1f1b", 4] + act
    assert temp["gpipe", 16] >= temp["gpipe", 4] + 10 * act


@pytest.mark.parametrize("kwargs,batch_size,match", [
    (dict(schedule="1f1b", microbatches=5), 12, "microbatches=5 does not divide the batch size 12"),
    (dict(schedule="fifo", microbatches=2), 12, "unknown pipeline schedule 'fifo'"),
    (dict(schedule="interleaved", microbatches=3, virtual_stages=2), 12, "microbatches=3, stages=2"),
])
def test_bad_input(kwargs, batch_size, match):
    mesh = make_mesh(ParallelConfig(pipeline=2, data=2), jax.devices()[:4])
    params, batch = problem(2 * kwargs.get("virtual_stages", 1), batch_size)
    with pytest.raises(ValueError, match=match):
        fn = pipeline_value_and_grad(first_fn, stage_fn, last_fn, mesh=mesh, **kwargs)
        fn(params, batch)


def test_bad_input_stage_count_and_data_split():
    mesh = make_mesh(ParallelConfig(pipeline=2, data=2), jax.devices()[:4])
    fn = pipeline_value_and_grad(first_fn, stage_fn, last_fn, mesh=mesh, schedule="1f1b", microbatches=2)
    params, batch = problem(3, 8)
    with pytest.raises(ValueError, match="leading axis of stages x virtual stages = 2"):
        fn(params, batch)
    params, batch = problem(2, 6)
    with pytest.raises(ValueError, match="microbatch size 3 .* not divisible by the data-parallel size 2"):
        fn(params, batch)


def test_device_layout_sharded_stages():
    """Stage params in device order, split over the pipeline axis: same loss and gradients."""
    from sciscale_jax.parallel.pipeline import from_device_layout, to_device_layout
    p, v, m = 2, 2, 4
    mesh = make_mesh(ParallelConfig(pipeline=p), jax.devices()[:p])
    params, batch = problem(p * v, m * 2)
    stages = to_device_layout(params["stages"], p, v)
    np.testing.assert_array_equal(stages["w"][1], params["stages"]["w"][2])  # device 0 chunk 1 = stage 2
    np.testing.assert_array_equal(from_device_layout(stages, p, v)["w"], params["stages"]["w"])
    sharded = {**params, "stages": jax.device_put(stages, jax.sharding.NamedSharding(mesh, jax.P("pipeline")))}
    fn = jax.jit(pipeline_value_and_grad(first_fn, stage_fn, last_fn, mesh=mesh, schedule="interleaved",
                                         microbatches=m, virtual_stages=v, stage_layout="device"))
    loss, grads = fn(sharded, batch)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference))(params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves({**grads, "stages": from_device_layout(grads["stages"], p, v)}),
                    jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))


def test_float64_under_x64():
    """With x64 on and float64 inputs the pipeline is exact to float64 rounding."""
    with jax.enable_x64(True):
        mesh = make_mesh(ParallelConfig(pipeline=2), jax.devices()[:2])
        params, batch = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), problem(2, 6))
        fn = jax.jit(pipeline_value_and_grad(first_fn, stage_fn, last_fn, mesh=mesh, schedule="zbh1", microbatches=3))
        loss, grads = fn(params, batch)
        ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference))(params, batch)
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            assert g.dtype == jnp.float64
            np.testing.assert_allclose(g, r, rtol=1e-11, atol=1e-12)


def test_tensor_data_pipeline_mesh():
    """pipeline=2 x data=2 x tensor=2: the tensor axis stays automatic (GSPMD) inside the shard_map;
    parameters split over it keep their sharding and the result equals the single-device run."""
    from jax.sharding import NamedSharding
    mesh = make_mesh(ParallelConfig(pipeline=2, data=2, tensor=2))
    params, batch = problem(2, 16)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference))(params, batch)
    spec = {"first": jax.P(None, "tensor"), "last": jax.P("tensor", None),
            "stages": {"w": jax.P("pipeline", None, None, "tensor"), "b": jax.P("pipeline", None, "tensor")}}
    params = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), spec))
    fn = jax.jit(pipeline_value_and_grad(first_fn, stage_fn, last_fn, mesh=mesh, schedule="1f1b", microbatches=4))
    loss, grads = fn(params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert "tensor" in tuple(g.sharding.spec)
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))


def test_data_sharded_batch_moves_no_rows():
    """A batch split over data in blocks feeds the strided microbatches without an all-to-all."""
    mesh = make_mesh(ParallelConfig(pipeline=2, data=4))
    params, batch = problem(2, 32)
    batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.P("data")))
    fn = jax.jit(pipeline_value_and_grad(first_fn, stage_fn, last_fn, mesh=mesh, schedule="gpipe", microbatches=4))
    hlo = fn.lower(params, batch).compile().as_text()
    assert "all-to-all" not in hlo and "all-gather" not in hlo


def test_fsdp_inside_stages_gathers_per_use_and_reduce_scatters():
    """pipeline=2 x data=2 x fsdp=2 with parameters split over fsdp (and first's over data x fsdp):
    the loss and gradients equal one device's; gradients come back split as ``grad_specs`` asks
    (further over data: ZeRO-2 style); inside the tick loop parameters are all-gathered and
    weight gradients reduce-scattered (per use), with no all-reduce."""
    from jax.sharding import PartitionSpec as P

    mesh = make_mesh(ParallelConfig(pipeline=2, data=2, fsdp=2), jax.devices()[:8])
    rng = np.random.default_rng(3)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    width = 8
    params = {"first": normal(D_IN, width) * 0.5,
              "stages": {"w": normal(2, LAYERS, width, width) * 0.3, "b": normal(2, LAYERS, width) * 0.1},
              "last": normal(width, D_OUT) * 0.5}
    batch = {"x": normal(16, D_IN), "y": normal(16, D_OUT)}
    param_specs = {"first": P(None, ("data", "fsdp")), "stages": {"w": P(None, "fsdp", None), "b": P()},
                   "last": P("fsdp", None)}
    grad_specs = {"first": P(None, ("data", "fsdp")), "stages": {"w": P(None, "fsdp", "data"), "b": P(None, "data")},
                  "last": P(("fsdp", "data"), None)}
    fn = jax.jit(pipeline_value_and_grad(first_fn, stage_fn, last_fn, mesh=mesh, schedule="1f1b", microbatches=2,
                                         param_specs=param_specs, grad_specs=grad_specs))
    compiled = fn.lower(params, batch).compile()
    loss, grads = compiled(params, batch)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference))(params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))
    specs = jax.tree.map(lambda s: s.spec, compiled.output_shardings[1])
    assert specs["first"] == P(None, ("data", "fsdp"))
    assert specs["last"] == P(("fsdp", "data"))
    assert specs["stages"]["w"] == P("pipeline", None, "fsdp", "data")
    assert specs["stages"]["b"] == P("pipeline", None, "data")
    entry, inner = _entry_and_others(compiled.as_text())
    assert "all-gather" in inner and "all-gather" not in entry  # gathered in the ticks, not once up front
    assert "reduce-scatter" in inner and "reduce-scatter" in entry  # per backward; b's once after the loop
    assert "all-reduce" not in inner


def _entry_and_others(hlo: str):
    """(the ENTRY computation's text, every other computation's text) of an HLO module."""
    entry, others, cur, in_entry = [], [], None, False
    for line in hlo.splitlines():
        if line and not line.startswith((" ", "}")) and line.rstrip().endswith("{"):
            in_entry, cur = line.startswith("ENTRY"), []
        elif line.startswith("}") and cur is not None:
            (entry if in_entry else others).append("\n".join(cur))
            cur = None
        elif cur is not None:
            cur.append(line)
    return "\n".join(entry), "\n".join(others)
