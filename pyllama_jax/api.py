"""The small public facade: `load`, then `logits` and `generate` on the loaded model."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from pyllama_jax import tokenizer as tok
from pyllama_jax.generate import Generation, Generator, SamplingConfig
from pyllama_jax.model.config import ModelConfig
from pyllama_jax.model import place
from pyllama_jax.model.llama import Llama
from pyllama_jax.quant import driver
from pyllama_jax.quant.recipe import QuantRecipe, describe_quant, recipe_record
from pyllama_jax.sharding.rules import replicated, state_shardings


class Model:
    """A loaded model with its tokenizer."""

    def __init__(self, module: Llama, tokenizer: tok.Tokenizer | None, source: str = "",
                 mesh: Mesh | None = None, quant: dict[str, Any] | None = None):
        """`mesh`: the device mesh `module`'s weights are sharded on (None: one device); `quant`:
        what made a quantized model (a checkpoint's `recipe` and `made_from`)."""
        self.module, self.tokenizer, self.source, self.mesh, self.quant = module, tokenizer, source, mesh, quant
        self.config: ModelConfig = module.config
        self._generator: Generator | None = None
        self._graphdef: nnx.GraphDef | None = None
        self._refresh()

    def _refresh(self) -> None:
        """Split the module as it is now: one changed in place since (e.g. quantized: its graph differs)
        gets its programs made anew, so no compiled function or generator serves its old weights."""
        graphdef, self._state = nnx.split(self.module)
        if graphdef != self._graphdef:
            r = replicated(self.mesh)

            def logits(state, ids, mask):
                return nnx.merge(graphdef, state)(ids, attention_mask=mask)[0]

            self._graphdef, self._generator = graphdef, None
            self._logits = place.jit(logits, self.mesh, (state_shardings(self._state, self.mesh), r, r), r)

    def logits(self, token_ids: Any, attention_mask: Any | None = None) -> jax.Array:
        """Float32 logits `[batch, seq, vocab]` for token ids `[batch, seq]` (or `[seq]`)."""
        ids = jnp.asarray(token_ids, jnp.int32)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {ids.shape[1]} tokens exceeds the model's context of "
                             f"{self.config.max_seq_len}")
        if int(ids.max()) >= self.config.vocab_size or int(ids.min()) < 0:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        self._refresh()
        return self._logits(self._state, ids, mask)

    def describe(self) -> str:
        """What this model is, for labelling every figure: the recipe of a quantized one, the
        dtypes of a dense one, and where it came from."""
        c = self.config
        if self.quant is None:
            return f"{self.source}: dense, {c.param_dtype} weights, {c.dtype} compute"
        made_from = self.quant.get("made_from", {}).get("model")
        return f"{self.source}: {describe_quant(self.quant)}" + (f", made from {made_from}" if made_from else "")

    def save(self, path: str, format: str = "native", *, overwrite: bool = False, **options: Any) -> None:
        """Write this model as `native` (ours, dense or quantized), `hf` (dense), `gptq` (Hugging Face's
        GPTQ layout, quantized) or `gguf` (a `.gguf` file; `gguf_type="f32"|"f16"|"bf16"|"q8_0"|"q4_1"`);
        `dtype` picks native/hf storage. See `pyllama_jax.convert.save.save_model`."""
        from pyllama_jax.convert.save import save_model

        save_model(self.module, path, format, self.tokenizer, self.quant, overwrite=overwrite, **options)

    @property
    def generator(self) -> Generator:
        if self.tokenizer is None:
            raise ValueError(f"{self.source}: no tokenizer was found, so text generation is unavailable")
        self._refresh()  # drops a generator made for the module as it was before an in-place change
        if self._generator is None:
            self._generator = Generator(self.module, self.tokenizer, self.mesh)
        return self._generator

    def generate(self, prompts: str | Sequence[str | Sequence[int]], *, chat: bool = False,
                 on_text: Callable[[int, str], None] | None = None, **sampling: Any) -> Generation:
        """Generate for one prompt or a batch; `chat=True` wraps each prompt in the chat template.

        `sampling` takes the fields of `SamplingConfig` (max_new_tokens, temperature, top_k, ...).
        """
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        if chat:
            batch = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in batch]
        if "stop" in sampling:
            sampling["stop"] = tuple(sampling["stop"])
        return self.generator.generate(batch, SamplingConfig(**sampling), on_text)


def load(path_or_name: str, dtype: str | None = None, param_dtype: str | None = None,
         mesh: Mesh | None = None, kernel: str = "xla", kv_dtype: str | None = None) -> Model:
    """Load a model: a `.gguf` file, an HF, GPTQ or Meta folder, a native checkpoint (dense or
    quantized), or an embedded name.

    `dtype` is the compute dtype and `param_dtype` the storage dtype of the weights
    (float32, bfloat16 or float16; default float32 for dense formats, a native checkpoint's own;
    `"auto"`: the dtype the checkpoint stores its weights in, as transformers' `dtype="auto"`);
    `kv_dtype="int8"` stores the KV cache as int8 with per-position, per-head scales. With a
    `mesh` (`pyllama_jax.sharding.mesh.make_mesh`), each device receives only its shard as tensors
    stream in. A quantized checkpoint streams into a model declared with its packed shapes (never
    a dense placeholder); `kernel` picks its quantized matmul (`xla` or `pallas`).
    """
    from pyllama_jax.convert import open_checkpoint
    from pyllama_jax.model.llama import abstract_model
    from pyllama_jax.model.params import build_model

    overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype), ("kv_dtype", kv_dtype)) if v}
    ckpt = open_checkpoint(path_or_name, **overrides)
    target = abstract_model(ckpt.config)
    if ckpt.quant is not None:
        from pyllama_jax.model.qlinear import abstract_quantized, set_kernel

        set_kernel(abstract_quantized(target, ckpt.quant["layout"]), kernel)
    module = build_model(ckpt.config, ckpt.tensors, ckpt.source,
                         place.placer(ckpt.config, mesh, model=target) if mesh else None, model=target)
    return Model(module, ckpt.tokenizer, ckpt.source, mesh, ckpt.quant)


def quantize(model: Model, recipe: QuantRecipe = QuantRecipe(), resume_dir: str | None = None,
             batch_size: int = 8, **fields: Any) -> Model:
    """Quantize a loaded model's weights (`pj.load(...)`, changed in place); returns a fresh facade.

    `fields` override `recipe` (e.g. `wbits=3, groupsize=-1, calibration="wiki.train.raw"`).
    GPTQ samples its calibration windows from `recipe.calibration` with the model's tokenizer.
    """
    recipe = dataclasses.replace(recipe, **fields)
    module = driver.quantize(model.module, recipe, tokenizer=model.tokenizer, resume_dir=resume_dir,
                             batch_size=batch_size)
    return Model(module, model.tokenizer, model.source, quant={"recipe": recipe_record(recipe)})
