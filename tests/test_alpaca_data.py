"""Alpaca data: formats, malformed input, prompt masking, truncation, padding vs packing, order."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from pyllama_jax.data import alpaca
from pyllama_jax.model.config import preset
from pyllama_jax.model.llama import init_model
from pyllama_jax.convert.random_weights import byte_tokenizer

TOK = byte_tokenizer()
RECORDS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi there"},
    {"instruction": "Name a colour.", "output": "blue"},
]


def _write_jsonl(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_json_and_seed_task_formats_give_the_same_examples(tmp_path):
    jsonl = _write_jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in RECORDS])
    (tmp_path / "a.json").write_text(json.dumps(RECORDS))
    seed = _write_jsonl(tmp_path / "seed.jsonl", [json.dumps(
        {"instruction": r["instruction"], "instances": [{"input": r.get("input", ""), "output": r["output"]}]})
        for r in RECORDS])
    expected = [alpaca.Example(r["instruction"], r.get("input", ""), r["output"]) for r in RECORDS]
    assert alpaca.load_examples(jsonl) == expected
    assert alpaca.load_examples(str(tmp_path / "a.json")) == expected
    assert alpaca.load_examples(seed) == expected


def test_real_seed_tasks_load_all_175(data_dir):
    examples = alpaca.load_examples(os.path.join(data_dir, "alpaca", "seed_tasks.jsonl"))
    assert len(examples) == 175
    assert examples[1] == alpaca.Example("What is the relation between the given pairs?",
                                         "Night : Day :: Right : Left",
                                         "The relation between the given pairs is that they are opposites.")


def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    lines = [json.dumps(RECORDS[0]), '{"instruction": "broken", "output": ', json.dumps(RECORDS[1]),
             json.dumps({"instruction": "no output"}), json.dumps({"instruction": 3, "output": "x"}),
             json.dumps(RECORDS[2])]
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(alpaca.DataError) as e:
        alpaca.load_examples(path)
    msg = str(e.value)
    assert "3 malformed" in msg and "line 2: invalid JSON" in msg
    assert "line 4: missing field 'output'" in msg and "line 5: field 'instruction' must be a string" in msg
    kept = alpaca.load_examples(path, on_error="skip")
    assert [x.instruction for x in kept] == [r["instruction"] for r in RECORDS]


def test_missing_file_and_bad_options_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        alpaca.load_examples(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="data.on_error"):
        alpaca.load_examples(str(tmp_path / "nope.jsonl"), on_error="ignore")


def test_directory_as_data_file_is_named_as_such(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"{tmp_path}: is a directory; expected a .json or .jsonl file"):
        alpaca.load_examples(str(tmp_path))


def test_alpaca_prompt_templates_match_stanford_alpaca():
    with_input = alpaca.prompt_text(alpaca.Example("Add.", "2 and 3", "5"), TOK)
    assert with_input == ("Below is an instruction that describes a task, paired with an input that provides "
                          "further context. Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:")
    assert alpaca.prompt_text(alpaca.Example("Say hi.", "", "hi"), TOK).endswith(
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:")


def test_chat_template_prompt_with_smollm2_tokenizer(smollm2):
    text = alpaca.prompt_text(alpaca.Example("Add.", "2 and 3", "5"), smollm2.tokenizer, "chat")
    assert text.endswith("<|im_start|>user\nAdd.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n")
    ids, targets = alpaca.tokenize_example(alpaca.Example("Add.", "2 and 3", "5"), smollm2.tokenizer, "chat")
    learned = ids[1:][targets[:-1] != alpaca.IGNORE]
    assert smollm2.tokenizer.decode(learned, skip_special=False) == "5<|im_end|>"


def test_only_the_response_and_eos_carry_loss():
    ex = alpaca.Example("Say hi.", "", "hi there")
    ids, targets = alpaca.tokenize_example(ex, TOK, "alpaca")
    prompt = TOK.encode(alpaca.prompt_text(ex, TOK))
    np.testing.assert_array_equal(ids, prompt + TOK.encode("hi there") + [TOK.eos_id])
    # Independently: position i predicts token i+1; only tokens after the prompt are learned.
    expected = [ids[i + 1] if i + 1 >= len(prompt) else -1 for i in range(len(ids) - 1)] + [-1]
    np.testing.assert_array_equal(targets, expected)


def test_overlong_examples_are_truncated_or_dropped_and_counted():
    short, long_ = alpaca.Example("Hi.", "", "ok"), alpaca.Example("Hi.", "", "x" * 200)
    n_prompt = len(TOK.encode(alpaca.prompt_text(short, TOK)))
    seq_len = n_prompt + 20
    seqs, stats = alpaca.tokenize([short, long_, long_], TOK, "alpaca", seq_len, "truncate")
    assert (stats.examples, stats.truncated, stats.dropped) == (3, 2, 0)
    assert [len(s[0]) for s in seqs] == [n_prompt + 3, seq_len, seq_len]
    assert seqs[1][1][-1] == TOK.encode("x")[0]  # the cut row still predicts its next real token
    _, stats = alpaca.tokenize([short, long_], TOK, "alpaca", seq_len, "drop")
    assert (stats.examples, stats.truncated, stats.dropped) == (1, 0, 1)
    _, stats = alpaca.tokenize([long_], TOK, "alpaca", n_prompt - 5, "truncate")  # prompt alone is too long
    assert (stats.examples, stats.dropped) == (0, 1)


def test_packing_keeps_examples_apart():
    """Logits of a packed row equal those of each example run alone (block-diagonal attention,
    positions restarting per example); padding rows hold one example each."""
    examples = [alpaca.Example(*r) for r in [("Hi.", "", "ok"), ("Add.", "1 2", "3"), ("Go.", "", "went")]]
    seqs, _ = alpaca.tokenize(examples, TOK, "alpaca", 800, "truncate")
    packed = alpaca.layout(seqs, 800, pack=True)
    padded = alpaca.layout(seqs, 800, pack=False)
    assert len(packed) == 1 and len(padded) == 3
    assert [int((packed.segment_ids[0] == s).sum()) for s in (1, 2, 3)] == [len(s[0]) for s in seqs]
    model = init_model(preset("tiny", vocab_size=TOK.vocab_size, max_seq_len=1024))
    logits, _ = model(jnp.asarray(packed.tokens), segment_ids=jnp.asarray(packed.segment_ids))
    at = 0
    for i, (ids, targets) in enumerate(seqs):
        alone, _ = model(jnp.asarray(ids)[None])
        np.testing.assert_allclose(logits[0, at:at + len(ids)], alone[0], atol=2e-5)
        np.testing.assert_array_equal(packed.targets[0, at:at + len(ids)], targets)
        np.testing.assert_array_equal(padded.tokens[i, :len(ids)], ids)
        at += len(ids)
    assert (packed.targets[0, at:] == alpaca.IGNORE).all() and (packed.segment_ids[0, at:] == 0).all()


def test_split_and_batch_order_are_fixed_by_the_seed():
    examples = [alpaca.Example(f"task {i}", "", str(i)) for i in range(20)]
    train, held = alpaca.split(examples, 4, seed=3)
    assert alpaca.split(examples, 4, seed=3) == (train, held)
    assert sorted(e.output for e in train + held) == sorted(e.output for e in examples) and len(held) == 4
    assert alpaca.split(examples, 4, seed=4)[1] != held
    seqs, _ = alpaca.tokenize(train, TOK, "alpaca", 256)
    rows = alpaca.layout(seqs, 256, pack=False)
    b = alpaca.Batches(rows, 4, seed=7)
    first_epoch = np.concatenate([b.indices(s) for s in range(4)]).tolist()
    assert len(rows) == 16 and sorted(first_epoch) == list(range(len(rows)))  # an epoch visits every row once
    assert b.indices(5).tolist() == alpaca.Batches(rows, 4, seed=7).indices(5).tolist()
    assert b.indices(0).tolist() != alpaca.Batches(rows, 4, seed=8).indices(0).tolist()
    assert b.indices(4).tolist() != b.indices(0).tolist()  # the next epoch is reshuffled
    np.testing.assert_array_equal(b.batch(2)["tokens"], rows.tokens[b.indices(2)])
