"""The fine-tuning job behind `scripts/finetune.py`: model, data, trainer, loop and export from one config."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
from jax.sharding import Mesh

import pyllama_jax as pj
from pyllama_jax.convert import hf, meta, native
from pyllama_jax.data import alpaca
from pyllama_jax.model.params import named_tensors
from pyllama_jax.sharding import mesh as mesh_lib
from pyllama_jax.model import place
from pyllama_jax.train import lora
from pyllama_jax.sections import from_section
from pyllama_jax.train.loop import LoopConfig, fit, resumable
from pyllama_jax.train.trainer import OptimConfig, Trainer

EXPORTERS = {"native": native.save, "hf": hf.save, "meta": meta.save}


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """What the job adds to the optimizer and the loop: LoRA adapters, and the export at the end."""

    lora: bool = True  # train LoRA adapters only (on a quantized base when quant.wbits > 0); False = full
    lora_rank: int = 8  # adapter rank r
    lora_alpha: float = 16.0  # adapter scale is alpha / r
    lora_dropout: float = 0.05  # dropout on the adapter's input
    lora_targets: tuple[str, ...] = ("attn.q", "attn.k", "attn.v", "attn.o")  # linears that get adapters
    export_format: str = resumable("")  # after training: "native", "hf" or "meta" (LoRA merged first); "" = none
    export_path: str = resumable("")  # where to export (default <workdir>/export)


TRAIN_SECTION = (OptimConfig, LoopConfig, FinetuneConfig)  # the dataclasses of the config's `train` section
# Fields that may change between a run and its resumption (they do not change what is trained).
RESUMABLE_FIELDS = frozenset(f.name for cls in TRAIN_SECTION for f in dataclasses.fields(cls)
                             if f.metadata.get("resumable"))


def load_model(c: ml_collections.ConfigDict, mesh: Mesh | None) -> pj.Model:
    """The job's model: `pj.load_from_config` (dense, `random:<preset>` included; or, for QLoRA,
    quantized: a saved quantized checkpoint or quantized now)."""
    if not c.train.lora and (c.quant.wbits or c.quant.load):
        raise ValueError(f"quant.wbits={c.quant.wbits} / quant.load={c.quant.load!r} with "
                         "train.lora=False: packed quantized weights cannot be fully fine-tuned; set "
                         "train.lora=True (QLoRA) or quant.wbits=0")
    return pj.load_from_config(c, mesh)


def run_config(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a checkpoint must have been trained with to be resumed under `c`."""
    d = c.to_dict()
    keep = ("model", "dtype", "param_dtype", "quant", "data", "train", "mesh")
    out = {k: d[k] for k in keep if k in d}
    out["train"] = {k: v for k, v in out["train"].items() if k not in RESUMABLE_FIELDS}
    return _jsonable(out)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def export(model: pj.Model, fmt: str, out: str) -> str:
    """Merge LoRA adapters into the weights (in place) and save as a native, HF or Meta checkpoint."""
    if fmt not in EXPORTERS:
        raise ValueError(f"train.export_format={fmt!r}; expected one of {sorted(EXPORTERS)} (or '' for none)")
    merged = lora.merge_lora(model.module)
    EXPORTERS[fmt](out, merged.config, named_tensors(merged), model.tokenizer, overwrite=True)
    return out


def finetune(c: ml_collections.ConfigDict) -> pj.Model:
    """Run the configured fine-tuning job; returns the trained model (adapters still separate)."""
    if not c.data.path:
        raise ValueError("data.path is empty: point it at an Alpaca JSON/JSONL file or a `datasets` name")
    mesh = mesh_lib.from_config(c.mesh)
    loaded = load_model(c, mesh)
    model, d = loaded.module, c.data
    t, job = from_section(LoopConfig, c.train), from_section(FinetuneConfig, c.train)
    if job.lora:
        lora.apply_lora(model, job.lora_targets, job.lora_rank, job.lora_alpha, job.lora_dropout, t.seed)
    if mesh is not None:
        model = place.shard(model, mesh)
    data = alpaca.prepare(d.path, loaded.tokenizer, seq_len=d.seq_len, template=d.template, pack=d.pack,
                          eval_size=d.eval_size, seed=t.seed, overlong=d.overlong, on_error=d.on_error)
    s = data.train_stats
    print(f"data: {len(data.train)} training rows of {d.seq_len} tokens from {s.examples} examples "
          f"({s.truncated} truncated, {s.dropped} dropped; {s.loss_tokens} response tokens carry the loss), "
          f"{data.held_out_stats.examples} held out ({data.held_out_stats.dropped} dropped)", flush=True)
    trainer = Trainer(model, from_section(OptimConfig, c.train), lora=job.lora, mesh=mesh)
    fit(trainer, data, loaded.tokenizer, t, run_config(c), d.template)
    trained = pj.Model(trainer.model(), loaded.tokenizer, loaded.source, mesh=mesh)
    if job.export_format:
        out = export(trained, job.export_format, job.export_path or os.path.join(t.workdir, "export"))
        print(f"exported {job.export_format} checkpoint to {out}", flush=True)
    return trained
