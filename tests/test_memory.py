"""compiled_memory reports exactly what XLA's memory analysis says; tree_bytes counts bytes."""

import jax
import jax.numpy as jnp
import numpy as np

from sciscale_jax.memory import compiled_memory, tree_bytes


def _mlp(w1, w2, x):
    return jnp.tanh(jnp.tanh(x @ w1) @ w2).sum()


def test_report_equals_compiled_memory_analysis():
    args = (jnp.ones((64, 256)), jnp.ones((256, 32)), jnp.ones((128, 64)))
    fn = jax.grad(_mlp, argnums=(0, 1))
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    report = compiled_memory(fn, *args)
    assert report.argument_bytes == analysis.argument_size_in_bytes == 4 * (64 * 256 + 256 * 32 + 128 * 64)
    assert report.output_bytes == analysis.output_size_in_bytes
    # the two gradient arrays, plus XLA's small tuple index table
    assert 0 <= report.output_bytes - 4 * (64 * 256 + 256 * 32) <= 64
    assert report.temp_bytes == analysis.temp_size_in_bytes
    assert report.peak_bytes == (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                                 + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    assert "peak" in report.format() and "MiB" in report.format()
    assert report.host_argument_bytes == analysis.host_argument_size_in_bytes
    assert report.host_output_bytes == analysis.host_output_size_in_bytes
    assert "host arguments" not in report.format()  # shown only when something lives on the host


def test_host_bytes_are_reported_but_not_in_the_device_peak():
    """Offloaded state (pinned host arguments, as a GPU compile reports them) shows in the
    report's text and leaves the device peak alone."""
    from sciscale_jax.memory import MemoryReport
    device = MemoryReport(argument_bytes=100, output_bytes=40, temp_bytes=60, alias_bytes=30)
    offloaded = MemoryReport(argument_bytes=100, output_bytes=40, temp_bytes=60, alias_bytes=30,
                             host_argument_bytes=2 * 2**20, host_output_bytes=2**20)
    assert offloaded.peak_bytes == device.peak_bytes == 170
    text = offloaded.format()
    assert "host arguments" in text and "2.00 MiB" in text and "host outputs" in text and "1.00 MiB" in text


def test_donation_shows_as_alias_and_lowers_peak():
    x = jax.ShapeDtypeStruct((512, 512), jnp.float32)
    plain = compiled_memory(lambda a: a * 2.0, x)
    donated = compiled_memory(jax.jit(lambda a: a * 2.0, donate_argnums=0), x)
    assert plain.alias_bytes == 0
    assert donated.alias_bytes == 512 * 512 * 4
    assert donated.peak_bytes == plain.peak_bytes - 512 * 512 * 4


def test_per_device_figures_under_sharding():
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    x = jax.ShapeDtypeStruct((8 * 1024,), jnp.float32, sharding=sharding)
    report = compiled_memory(jax.jit(lambda a: a + 1.0), x)
    assert report.argument_bytes == 1024 * 4  # one device's shard


def test_tree_bytes():
    tree = {"a": np.zeros((3, 5), np.float32), "b": [jnp.zeros(7, jnp.bfloat16), jnp.zeros((), jnp.int32)],
            "c": jax.ShapeDtypeStruct((2, 2), jnp.float16)}
    assert tree_bytes(tree) == 3 * 5 * 4 + 7 * 2 + 4 + 2 * 2 * 2
