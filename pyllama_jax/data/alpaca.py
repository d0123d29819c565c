"""Instruction-tuning data in the Stanford Alpaca format, tokenized for causal-LM fine-tuning.

Sources: a JSON list or JSONL of `{instruction, input, output}` records, Alpaca's seed tasks
(`{instruction, instances: [{input, output}]}`), or a Hugging Face `datasets` name. Each example
becomes `prompt + response + EOS`; only response tokens carry a loss. Examples are laid out in
fixed-length rows, one per row (padding) or several per row (packing, with segment ids that keep
attention within each example), and batches are drawn in an order fixed by the seed and the step.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Iterable, Sequence

import numpy as np

from pyllama_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Stanford Alpaca's templates (train.py, PROMPT_DICT); the response follows "### Response:".
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
TEMPLATES = ("alpaca", "chat")
IGNORE = -1  # target id of positions without a loss


class DataError(ValueError):
    """A data file or record that cannot be used, named with its line."""


@dataclasses.dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    output: str


@dataclasses.dataclass
class Rows:
    """Fixed-length training rows: `tokens`, next-token `targets` (IGNORE = no loss), `segment_ids`
    (1, 2, ... per packed example; 0 = padding), all `[n, seq_len]` int32."""

    tokens: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens[index], "targets": self.targets[index],
                "segment_ids": self.segment_ids[index]}


@dataclasses.dataclass
class TokenStats:
    """What tokenization kept, cut and dropped."""

    examples: int = 0  # examples that made it into rows
    truncated: int = 0  # longer than seq_len, cut to fit
    dropped: int = 0  # longer than seq_len and dropped (or nothing left to learn after the cut)
    loss_tokens: int = 0  # response tokens that carry a loss


# --- loading -------------------------------------------------------------------------------------

def load_examples(source: str, on_error: str = "raise") -> list[Example]:
    """Examples from a `.json` list, a JSONL file or a `datasets` name.

    Malformed lines or records are reported with their line (or index); `on_error="raise"` stops
    with all of them listed, `on_error="skip"` logs them and keeps the rest.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error={on_error!r}; expected 'raise' or 'skip'")
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        records = _read_json_list(path) if path.endswith(".json") else _read_jsonl(path)
    elif source.startswith((".", "/", "~")) or source.endswith((".json", ".jsonl")):
        if os.path.isdir(path):
            raise IsADirectoryError(f"{source}: is a directory; expected a .json or .jsonl file of "
                                    "Alpaca records")
        raise FileNotFoundError(f"data file not found: {source}")
    else:
        records = _read_hf_dataset(source)
    examples: list[Example] = []
    problems: list[str] = []
    for where, record in records:
        if isinstance(record, Exception):
            problems.append(f"{where}: {record}")
            continue
        try:
            examples.extend(_examples_of(record))
        except DataError as e:
            problems.append(f"{where}: {e}")
    if problems:
        head = f"{source}: {len(problems)} malformed record(s)"
        if on_error == "raise":
            raise DataError(head + ":\n  " + "\n  ".join(problems[:20]) +
                            ("\n  ..." if len(problems) > 20 else "") + "\n(set data.on_error='skip' to skip them)")
        log.warning("%s skipped:\n  %s", head, "\n  ".join(problems))
    if not examples:
        raise DataError(f"{source}: no usable examples")
    return examples


def _read_jsonl(path: str) -> Iterable[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {n}", DataError(f"invalid JSON ({e.msg} at column {e.colno})")


def _read_json_list(path: str) -> Iterable[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg} "
                            "(a .json file must hold one list of records; use .jsonl for one per line)") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return ((f"record {i}", r) for i, r in enumerate(data))


def _read_hf_dataset(name: str) -> Iterable[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise FileNotFoundError(f"data.path={name!r} is not a file, and reading it as a Hugging Face "
                                "dataset needs `pip install datasets`") from e
    ds = datasets.load_dataset(name, split="train")
    return ((f"row {i}", dict(r)) for i, r in enumerate(ds))


def _examples_of(record: Any) -> list[Example]:
    """One Alpaca record, or one example per instance of a seed task."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    instruction = _text(record, "instruction")
    if "instances" in record:
        instances = record["instances"]
        if not isinstance(instances, list) or not instances:
            raise DataError("'instances' must be a non-empty list of {input, output} objects")
        return [Example(instruction, _text(i, "input", ""), _text(i, "output")) for i in instances]
    return [Example(instruction, _text(record, "input", ""), _text(record, "output"))]


def _text(record: Any, field: str, default: str | None = None) -> str:
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object with {field!r}, got {type(record).__name__}")
    value = record.get(field, default)
    if value is None:
        raise DataError(f"missing field {field!r}")
    if not isinstance(value, str):
        raise DataError(f"field {field!r} must be a string, got {type(value).__name__}")
    return value


def split(examples: Sequence[Example], eval_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Shuffle by `seed`, then hold out the first `eval_size` examples: (train, held_out)."""
    if not 0 <= eval_size < len(examples):
        raise ValueError(f"data.eval_size={eval_size} must be in [0, {len(examples)}) for "
                         f"{len(examples)} examples")
    order = np.random.default_rng(seed).permutation(len(examples))
    shuffled = [examples[i] for i in order]
    return shuffled[eval_size:], shuffled[:eval_size]


# --- prompts and tokens --------------------------------------------------------------------------

def prompt_text(example: Example, tokenizer: Tokenizer, template: str = "alpaca") -> str:
    """The prompt the model sees before the response: Alpaca's template or the chat template."""
    if template == "alpaca":
        fmt = PROMPT_INPUT if example.input else PROMPT_NO_INPUT
        return fmt.format(instruction=example.instruction, input=example.input)
    if template == "chat":
        content = example.instruction + (f"\n\n{example.input}" if example.input else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": content}])
    raise ValueError(f"data.template={template!r}; expected one of {TEMPLATES}")


def tokenize_example(example: Example, tokenizer: Tokenizer, template: str) -> tuple[np.ndarray, np.ndarray]:
    """`(ids, targets)`: ids of prompt + response + EOS; `targets[i] = ids[i + 1]` where that is a
    response token, IGNORE elsewhere (the prompt is masked out of the loss)."""
    prompt = tokenizer.encode(prompt_text(example, tokenizer, template))
    response = tokenizer.encode(example.output, bos=False, eos=True)
    ids = np.asarray(prompt + response, np.int32)
    targets = np.full(len(ids), IGNORE, np.int32)
    targets[len(prompt) - 1:-1] = ids[len(prompt):]
    return ids, targets


def tokenize(examples: Sequence[Example], tokenizer: Tokenizer, template: str, seq_len: int,
             overlong: str = "truncate") -> tuple[list[tuple[np.ndarray, np.ndarray]], TokenStats]:
    """Tokenized examples that fit `seq_len`: longer ones are cut (`overlong="truncate"`; dropped
    if no response token is left) or dropped (`"drop"`), and counted."""
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"data.overlong={overlong!r}; expected 'truncate' or 'drop'")
    out, stats = [], TokenStats()
    for example in examples:
        ids, targets = tokenize_example(example, tokenizer, template)
        if len(ids) > seq_len:
            ids, targets = ids[:seq_len], targets[:seq_len]
            if overlong == "drop" or not (targets != IGNORE).any():
                stats.dropped += 1
                continue
            stats.truncated += 1
        out.append((ids, targets))
        stats.examples += 1
        stats.loss_tokens += int((targets != IGNORE).sum())
    return out, stats


def layout(seqs: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pack: bool) -> Rows:
    """Put sequences into rows of `seq_len`: one per row, or packed greedily in order."""
    groups: list[list[tuple[np.ndarray, np.ndarray]]] = []
    used = seq_len + 1
    for seq in seqs:
        if not pack or used + len(seq[0]) > seq_len:
            groups.append([])
            used = 0
        groups[-1].append(seq)
        used += len(seq[0])
    shape = (len(groups), seq_len)
    rows = Rows(np.zeros(shape, np.int32), np.full(shape, IGNORE, np.int32), np.zeros(shape, np.int32))
    for r, group in enumerate(groups):
        at = 0
        for s, (ids, targets) in enumerate(group, 1):
            rows.tokens[r, at:at + len(ids)] = ids
            rows.targets[r, at:at + len(ids)] = targets
            rows.segment_ids[r, at:at + len(ids)] = s
            at += len(ids)
    return rows


@dataclasses.dataclass
class Dataset:
    """Everything a fine-tuning run reads: training and held-out rows, held-out examples (for
    sample generations) and what tokenization dropped or cut."""

    train: Rows
    held_out: Rows
    held_out_examples: list[Example]
    train_stats: TokenStats
    held_out_stats: TokenStats


def prepare(path: str, tokenizer: Tokenizer, *, seq_len: int, template: str = "alpaca", pack: bool = True,
            eval_size: int = 0, seed: int = 0, overlong: str = "truncate", on_error: str = "raise") -> Dataset:
    """Load, split, tokenize and lay out a data set (see the module docstring)."""
    train, held_out = split(load_examples(path, on_error), eval_size, seed)
    train_seqs, train_stats = tokenize(train, tokenizer, template, seq_len, overlong)
    held_seqs, held_stats = tokenize(held_out, tokenizer, template, seq_len, overlong)
    return Dataset(layout(train_seqs, seq_len, pack), layout(held_seqs, seq_len, pack), held_out,
                   train_stats, held_stats)


# --- batches -------------------------------------------------------------------------------------

class Batches:
    """Batches of rows in an order fixed by `seed`: epoch `e` visits the rows in the permutation
    `default_rng((seed, e))`, so the batch of any step can be recomputed (exact resumption)."""

    def __init__(self, rows: Rows, batch_size: int, seed: int):
        if len(rows) == 0:
            raise DataError("no training rows: every example was dropped (raise data.seq_len?)")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / len(self.rows)

    def indices(self, step: int) -> np.ndarray:
        n = len(self.rows)
        flat = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs = flat // n
        perms = {e: np.random.default_rng((self.seed, int(e))).permutation(n) for e in np.unique(epochs)}
        return np.array([perms[e][i % n] for e, i in zip(epochs, flat)])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return self.rows.take(self.indices(step))


def eval_batches(rows: Rows, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The held-out rows in order, in batches of `batch_size` (the last one padded with empty rows)."""
    out = []
    for start in range(0, len(rows), batch_size):
        index = np.arange(start, start + batch_size)
        batch = rows.take(np.minimum(index, len(rows) - 1))
        batch["targets"][index >= len(rows)] = IGNORE
        out.append(batch)
    return out
