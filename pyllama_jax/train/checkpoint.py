"""Orbax checkpoints of a fine-tuning run: trainable parameters, optimizer state and step.

Each checkpoint also records the run's configuration; resuming under a different one (another
model, LoRA rank, data, seed, ...) stops with the fields that differ instead of a shape error
deep inside orbax. Saves are synchronous and committed by rename, so a run killed at any moment
resumes from its last complete checkpoint.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
    """The checkpoint folder was written by a run with another configuration."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """`field: saved -> current` for every field that differs between two nested config dicts."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k}: {a.get(k, '<absent>')!r} there, {b.get(k, '<absent>')!r} here"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class Checkpointer:
    """Save every `save_every` steps into `directory`, keeping the last `keep` checkpoints."""

    def __init__(self, directory: str, save_every: int, keep: int, run_config: dict):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        self.run_config, self.save_every = run_config, max(save_every, 1)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, force: bool = False) -> bool:
        """Save if `step` is a multiple of `save_every` (or `force`); returns whether it saved."""
        if (step % self.save_every and not force) or step in self.manager.all_steps():
            return False
        return self.manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            run=ocp.args.JsonSave({"step": step, "config": self.run_config})))

    def restore(self, params: Any, opt_state: Any) -> tuple[int, Any, Any] | None:
        """`(step, params, opt_state)` of the latest checkpoint, placed like the given templates;
        None when the folder has no checkpoint."""
        step = self.latest_step()
        if step is None:
            return None
        run = self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore())).run
        diffs = config_differences(run.get("config", {}), self.run_config)
        if diffs:
            raise CheckpointMismatch(
                f"{self.directory} holds checkpoints of a run with another configuration:\n  "
                + "\n  ".join(diffs[:20]) + "\nUse a new train.workdir, or restore those settings to resume.")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
        state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
        return step, state["params"], state["opt_state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
