"""Sharded runs against single-device runs on 8 simulated CPU devices, and mesh/rules errors.

XLA fixes the CPU device count when JAX starts, so the `case_*` functions run in a fresh subprocess
(`python tests/test_sharding.py NAME[,NAME...]`) with `--xla_force_host_platform_device_count=8` (and
LLVM optimisation off, which halves compile time; reference and sharded runs share the flags). All
cases share one subprocess (one start-up instead of four); each runs in its own `try`, and each test
asserts on its own case's section of the output.
"""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pyllama_jax.model.config import preset
from pyllama_jax.sharding import mesh as pm
from pyllama_jax.sharding import rules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DEVICES = 8
MESHES = [(1, 1, 8), (1, 2, 4), (2, 1, 4), (8, 1, 1)]
CONFIG = preset("tiny", n_heads=8, n_kv_heads=8)  # heads, kv_heads, mlp, vocab all divide by 8
# 4-bit, groupsize 16: every row-parallel input (128, 256) splits 8 ways at group and word boundaries
QCONFIG = preset("tiny", dim=128, n_heads=8, n_kv_heads=8, hidden_dim=256, n_layers=1)
RTOL = 1e-5


CASES = ("dense", "quantized", "bad_mesh", "smollm2")


def run_cases(names: tuple[str, ...], timeout: int) -> subprocess.CompletedProcess:
    """Run `case_<name>` for each name, in order, in one subprocess with 8 CPU devices."""
    flags = f"--xla_force_host_platform_device_count={N_DEVICES} --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags,
               JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, os.path.abspath(__file__), ",".join(names)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cases() -> subprocess.CompletedProcess:
    return run_cases(CASES, timeout=300 * 3 + 400)


def run_case(proc: subprocess.CompletedProcess, name: str) -> str:
    """Case `name`'s section of the shared run's output; fail with it (and stderr) unless it passed."""
    section = proc.stdout.split(f"==== case {name}\n", 1)[-1].split("\n==== case ", 1)[0]
    assert f"==== passed {name}" in section, \
        f"case {name} failed (rc {proc.returncode}):\n{section[-6000:]}\n{proc.stderr[-6000:]}"
    return section


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


# ---- tests in this process (no devices needed) -------------------------------------------------

def test_rules_table_gives_megatron_layout():
    assert rules.logical_to_spec(("embed", "heads")) == P("fsdp", "tensor")  # column-parallel q
    assert rules.logical_to_spec(("mlp", "embed")) == P("tensor", "fsdp")  # row-parallel down
    assert rules.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")  # vocab-parallel
    # activations: batch takes data and fsdp, so the model dimension stays whole
    assert rules.logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    # a batch of 1 cannot split over data=2: that axis is dropped, the head axis kept
    mesh_shape = {"data": 2, "fsdp": 1, "tensor": 4}
    assert rules.fit_spec(("batch", "length", "kv_heads", "head_dim"), (1, 16, 8, 8), mesh_shape) == \
        P("fsdp", None, "tensor", None)
    with pytest.raises(ValueError, match="logical axis 'experts' has no rule"):
        rules.logical_to_spec(("experts",))


def test_mesh_shape_resolution():
    assert pm.resolve_shape((1, 1, -1), 8) == (1, 1, 8)
    assert pm.resolve_shape((2, -1, 2), 8) == (2, 2, 2)
    assert pm.resolve_shape((1, 1, 2), 8) == (1, 1, 2)  # a subset of the devices
    with pytest.raises(ValueError, match="requests 16 devices but only 8 are present"):
        pm.resolve_shape((2, 1, 8), 8)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        pm.resolve_shape((-1, 1, -1), 8)
    with pytest.raises(ValueError, match="do not divide evenly by 3"):
        pm.resolve_shape((1, 3, -1), 8)
    with pytest.raises(ValueError, match="mesh.fsdp must be a positive integer"):
        pm.resolve_shape((1, 0, 1), 8)


def test_more_devices_than_present_is_an_error():
    n = len(jax.devices())
    with pytest.raises(ValueError, match=f"requests {2 * n} devices but only {n} are present"):
        pm.make_mesh(tensor=2 * n)


def test_mesh_must_divide_heads_and_kv_heads():
    with pytest.raises(ValueError, match=r"mesh.tensor=8 does not divide the model's n_heads=4"):
        rules.check_model(preset("tiny"), {"data": 1, "fsdp": 1, "tensor": 8})
    with pytest.raises(ValueError, match=r"mesh.tensor=4 does not divide the model's kv_heads=2"):
        rules.check_model(preset("tiny", n_heads=8), {"data": 1, "fsdp": 1, "tensor": 4})
    with pytest.raises(ValueError, match=r"mesh.fsdp=3 does not divide the model's dim=64"):
        rules.check_model(CONFIG, {"data": 1, "fsdp": 3, "tensor": 1})
    rules.check_model(CONFIG, {"data": 2, "fsdp": 2, "tensor": 8})  # all divide


def _abstract_quantized(config, bits: int, groupsize: int):
    """The shapes of `config`'s model with every block linear packed to `bits` (no memory)."""
    import jax.numpy as jnp
    from flax import nnx

    from pyllama_jax.model.llama import Llama
    from pyllama_jax.model.packing import QuantWeight, group_index
    from pyllama_jax.model.qlinear import LAYER_LINEARS, get_module, replace_linear

    def build():
        model = Llama(config, nnx.Rngs(0))
        for layer in model.layers:
            for path in LAYER_LINEARS:
                n_in, n_out = get_module(layer, path).kernel.shape
                groups = n_in // groupsize
                qw = QuantWeight(jnp.zeros((n_in * bits // 32, n_out), jnp.int32), jnp.zeros((groups, n_out)),
                                 jnp.zeros((groups, n_out * bits // 32), jnp.int32),
                                 jnp.asarray(group_index(n_in, groupsize)), bits, groupsize, n_in)
                replace_linear(layer, path, qw)
        return model

    return nnx.eval_shape(build)


@pytest.mark.parametrize("name,preset_name", [("13b_4bit", "llama-13b"), ("65b_4bit", "llama-65b")])
def test_shipped_configs_layouts_fit_their_models(name, preset_name):
    """The mesh of each shipped config can split its (abstract) 4-bit model; one size up cannot."""
    import importlib.util

    from pyllama_jax.model import place

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    model = _abstract_quantized(preset(preset_name, n_layers=1), c.quant.wbits, c.quant.groupsize)
    mesh_shape = {"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor}
    place.check_layout(model, mesh_shape)
    place.check_layout(model, dict(mesh_shape, tensor=4))  # 13b: the documented --config.mesh.tensor=4
    with pytest.raises(ValueError, match=r"layers.0.mlp.down \(4-bit, groupsize 128\): its \d+ quantization "
                                         r"groups cannot be split 8 ways"):
        place.check_layout(model, dict(mesh_shape, tensor=8))


def test_quantized_groups_must_split_at_shard_boundaries():
    from pyllama_jax.model import place

    coarse = _abstract_quantized(QCONFIG, 4, 32)  # attn.o: 128 inputs = 4 groups of 32
    with pytest.raises(ValueError, match=r"layers.0.attn.o \(4-bit, groupsize 32\): its 4 quantization "
                                         r"groups cannot be split 8 ways along its 128 inputs"):
        place.check_layout(coarse, {"data": 1, "fsdp": 1, "tensor": 8})
    place.check_layout(coarse, {"data": 1, "fsdp": 2, "tensor": 4})  # 4 ways: one group per shard


def test_quantized_base_of_a_lora_adapter_shards_like_its_layer():
    from flax import nnx

    from pyllama_jax.model.qlinear import get_module, set_linear
    from pyllama_jax.model import place
    from pyllama_jax.train.lora import LoRALinear

    model = _abstract_quantized(QCONFIG, 4, 16)
    base = get_module(model, "layers.0.mlp.down")
    set_linear(model, "layers.0.mlp.down", LoRALinear(base, (256, 128), ("mlp", "embed"), 2, 4.0, 0.0,
                                                      rngs=nnx.Rngs(0)))
    place.check_layout(model, {"data": 1, "fsdp": 2, "tensor": 4})
    assert base.qweight.get_metadata()["logical_axes"] == ("mlp", "embed")  # row-parallel, as dense down
    assert base.g_idx.get_metadata()["logical_axes"] == ("mlp",)


# ---- tests on 8 simulated devices --------------------------------------------------------------

def test_dense_logits_and_generation_match_single_device(cases):
    out = run_case(cases, "dense")
    assert out.count("ok mesh") == len(MESHES), out


def test_quantized_logits_and_generation_match_single_device(cases):
    out = run_case(cases, "quantized")
    assert out.count("ok mesh") == len(MESHES), out


def test_sharded_loading_rejects_a_mesh_that_does_not_divide_heads(cases):
    run_case(cases, "bad_mesh")


def test_real_model_sharded_matches_single_device(cases):
    assert "ok smollm2" in run_case(cases, "smollm2")


# ---- the cases ----------------------------------------------------------------------------------

def _generate(gen, prompts, max_new_tokens: int = 12) -> list[list[int]]:
    """Greedy tokens per row through `Generator.stream` (token-id prompts need no vocabulary)."""
    from pyllama_jax.generate import SamplingConfig

    rows: list[list[int]] = [[] for _ in prompts]
    for step in gen.stream(prompts, SamplingConfig(max_new_tokens=max_new_tokens)):
        for row, tok in zip(rows, step):
            row.append(tok)
    return rows


def _check_cache_is_sharded(gen, config, mesh, shape: tuple[int, int, int]) -> None:
    """Run the generator's own greedy prefill and decode programs (as compiled by `_generate`: batch 8,
    prompt bucket 16, cache 32) and inspect the cache they return."""
    import jax.numpy as jnp

    from pyllama_jax.model import place

    b, length = 8, 32
    cache = place.create_cache(config, b, length, mesh)
    knobs = (jnp.zeros(b), jnp.zeros(b, jnp.int32), jnp.ones(b))
    tokens, lengths = jnp.ones((b, 16), jnp.int32), jnp.full((b,), 16, jnp.int32)
    nxt, cache = gen._prefill[True](gen.state, tokens, lengths, cache, jax.random.key(0), *knobs)
    nxt, cache = gen._decode[True](gen.state, cache, jnp.asarray(np.asarray(nxt)), lengths, jax.random.key(1), *knobs)
    data, fsdp, tensor = shape
    want = (b // (data * fsdp), length, config.kv_heads // tensor, config.head_dim)
    for arr in cache.k + cache.v:
        shards = arr.addressable_shards
        assert len(shards) == N_DEVICES
        assert {s.data.shape for s in shards} == {want}, (shape, [s.data.shape for s in shards])
        assert len({str(s.index) for s in shards}) == N_DEVICES  # every device holds a different part


def _compare(model, config, sharded_fn, check=lambda model, shape: None) -> None:
    """Logits and greedy generation of `sharded_fn(mesh)` against `model` on one device, per mesh."""
    from pyllama_jax.api import Model
    from pyllama_jax.generate import Generator
    from pyllama_jax.tokenizer import Tokenizer

    assert jax.device_count() == N_DEVICES
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (8, 24))
    mask = np.ones_like(ids)
    mask[1, 20:] = mask[5, 9:] = 0  # right padding in two rows
    ref_logits = np.asarray(Model(model, None).logits(ids, mask))
    prompts = [list(ids[i, : 3 + i]) for i in range(8)]  # lengths 3..10
    no_vocab = Tokenizer(None, "ids", None, None, False)
    ref_tokens = _generate(Generator(model, no_vocab), prompts)
    for shape in MESHES:
        mesh = pm.make_mesh(*shape)
        sharded = sharded_fn(mesh)
        check(sharded, shape)
        err = rel_err(Model(sharded, None, mesh=mesh).logits(ids, mask), ref_logits)
        assert err < RTOL, (shape, err)
        gen = Generator(sharded, no_vocab, mesh)
        tokens = _generate(gen, prompts)
        assert tokens == ref_tokens, (shape, tokens, ref_tokens)
        _check_cache_is_sharded(gen, config, mesh, shape)
        print(f"ok mesh {shape}: logits rel err {err:.2e}, {sum(map(len, tokens))} greedy tokens equal")


def case_dense() -> None:
    from pyllama_jax.model.llama import init_model
    from pyllama_jax.model.params import build_model, named_tensors
    from pyllama_jax.model import place

    def check(sharded, shape):
        q = sharded.layers[0].attn.q.kernel[...]
        assert q.sharding.spec == P("fsdp", "tensor")
        assert q.addressable_shards[0].data.shape == (CONFIG.dim // shape[1], CONFIG.dim // shape[2])

    model = init_model(CONFIG, seed=1)
    _compare(model, CONFIG, lambda mesh: build_model(CONFIG, named_tensors(model), "random tiny",
                                                     place.placer(CONFIG, mesh)), check)


def case_quantized() -> None:
    from pyllama_jax.api import Model
    from pyllama_jax.model.llama import init_model
    from pyllama_jax.quant.calibrate import quantize_rtn
    from pyllama_jax.quant.rtn import QuantSpec
    from pyllama_jax.model import place

    c, bits, gs = QCONFIG, 4, 16

    def check(sharded, shape):
        _, fsdp, tensor = shape
        o, q = sharded.layers[0].attn.o, sharded.layers[0].attn.q  # row- and column-parallel
        want = {  # (array, shape of each device's part)
            "o.qweight": (o.qweight, (c.dim * bits // 32 // tensor, c.dim // fsdp)),
            "o.scales": (o.scales, (c.dim // gs // tensor, c.dim // fsdp)),
            "o.qzeros": (o.qzeros, (c.dim // gs // tensor, c.dim * bits // 32 // fsdp)),
            "o.g_idx": (o.g_idx, (c.dim // tensor,)),
            "q.qweight": (q.qweight, (c.dim * bits // 32 // fsdp, c.dim // tensor)),
            "q.qzeros": (q.qzeros, (c.dim // gs // fsdp, c.dim * bits // 32 // tensor)),
        }
        for name, (var, part) in want.items():
            assert {s.data.shape for s in var[...].addressable_shards} == {part}, (name, shape)
        # the jitted entry points read the same layout from the annotated logical axes
        assert o.qweight.get_metadata()["logical_axes"] == ("heads", "embed")
        assert q.qzeros.get_metadata()["logical_axes"] == ("embed", "heads")

    import tempfile

    import pyllama_jax as pj
    from pyllama_jax.convert.save import save_quantized

    model = quantize_rtn(init_model(c, seed=2), QuantSpec(bits=bits, groupsize=gs))
    folder = os.path.join(tempfile.mkdtemp(), "q4")
    save_quantized(model, folder, {"recipe": {"wbits": bits, "groupsize": gs}})
    # the saved checkpoint streams straight onto each mesh, every device reading only its part
    _compare(model, c, lambda mesh: pj.load(folder, mesh=mesh).module, check)

    per_row = quantize_rtn(init_model(c, seed=3), QuantSpec(bits=bits, groupsize=-1))
    mesh = pm.make_mesh(1, 2, 4)
    sharded = place.shard(per_row, mesh)  # one group: scales/zeros replicated along the input
    assert sharded.layers[0].mlp.down.scales[...].sharding.spec == P(None, "fsdp")
    err = rel_err(Model(sharded, None, mesh=mesh).logits(np.arange(32)[None] * 7 % 256),
                  Model(per_row, None).logits(np.arange(32)[None] * 7 % 256))
    assert err < RTOL, err


def case_bad_mesh() -> None:
    from pyllama_jax.model.llama import init_model
    from pyllama_jax.model.params import build_model, named_tensors
    from pyllama_jax.model import place

    config = preset("tiny")  # 4 heads, 2 kv heads
    with pytest.raises(ValueError, match="mesh.tensor=8 does not divide the model's n_heads=4"):
        place.placer(config, pm.make_mesh(1, 1, 8))
    with pytest.raises(ValueError, match="mesh.tensor=4 does not divide the model's kv_heads=2"):
        place.placer(config.replace(n_heads=8, dim=128), pm.make_mesh(2, 1, 4))
    with pytest.raises(ValueError, match="requests 16 devices but only 8 are present"):
        pm.make_mesh(2, 1, 8)
    mesh = pm.make_mesh(1, 4, 2)  # divides heads, kv_heads, mlp, vocab and dim: loads
    model = build_model(config, named_tensors(init_model(config)), "tiny", place.placer(config, mesh))
    assert model.layers[0].mlp.down.kernel[...].sharding.spec == P("tensor", "fsdp")


def case_smollm2() -> None:
    import pyllama_jax as pj

    ref = pj.load("smollm2-135m")
    ids = ref.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    ref_logits = np.asarray(ref.logits(ids))
    del ref
    mesh = pm.make_mesh(1, 2, 3)  # SmolLM2 has 9 heads and 3 kv heads: tensor=3
    sharded = pj.load("smollm2-135m", mesh=mesh)
    assert sharded.module.embed[...].sharding.spec == P("tensor", "fsdp")
    assert sharded.module.layers[0].attn.k.kernel[...].addressable_shards[0].data.shape == (576 // 2, 192 // 3)
    err = rel_err(sharded.logits(ids), ref_logits)
    assert err < RTOL, err
    print(f"ok smollm2 on {pm.describe(mesh)}: rel err {err:.2e}")


if __name__ == "__main__":
    import traceback

    failed = False
    for case in sys.argv[1].split(","):
        print(f"==== case {case}", flush=True)
        try:
            globals()["case_" + case]()
        except BaseException:  # reported in this case's section; the next case still runs
            traceback.print_exc(file=sys.stdout)
            print(f"==== failed {case}", flush=True)
            failed = True
        else:
            print(f"==== passed {case}", flush=True)
    sys.exit(1 if failed else 0)
