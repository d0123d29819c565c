"""Our GGUF container reader against the `gguf` package's GGUFReader (the format's Python reference):
the same metadata values, tensor table and dequantized float32 values, bit for bit."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from pyllama_jax.convert.gguf_format import GGUFContainer
from pyllama_jax.convert.names import embedded_path


def assert_same_as_gguf(path: str) -> None:
    ours, ref = GGUFContainer(path), gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields.keys() == expected.keys()
    for key, value in expected.items():
        assert ours.fields[key] == value, key
        assert type(ours.fields[key]) is type(value), key
    assert [(t.name, t.shape, t.type_id) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type)) for t in ref.tensors]
    for mine, theirs in zip(ours.tensors, ref.tensors):
        want = dequantize(theirs.data, theirs.tensor_type).astype(np.float32)
        got = ours.tensor(mine)
        assert got.dtype == np.float32 and got.shape == tuple(int(d) for d in reversed(theirs.shape)), mine.name
        np.testing.assert_array_equal(got.reshape(-1), want.reshape(-1), err_msg=mine.name)


def test_embedded_smollm2_reads_as_the_gguf_package_reads_it():
    """The embedded file: 49k-token vocabulary, merges, chat template; Q4_1 matrices and F32 norms."""
    assert_same_as_gguf(embedded_path("smollm2-135m"))


def _write(path, tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]], alignment: int | None = None):
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2 ** 63 + 5)
    w.add_int64("t.i64", -(2 ** 62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.ints", [3, -1, 7])
    w.add_array("t.floats", [0.5, -2.25])
    w.add_array("t.strs", ["a", "", "ünï"])
    w.add_array("t.bools", [True, False])
    for name, (a, kind) in tensors.items():
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(name, a.astype(np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16))
        else:
            w.add_tensor(name, quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_and_block_type(tmp_path, alignment):
    rng = np.random.default_rng(0)
    q = gguf.GGMLQuantizationType
    tensors = {f"w.{k.name}": (rng.normal(size=(6, 64)).astype(np.float32), k)
               for k in (q.F32, q.F16, q.BF16, q.Q4_0, q.Q4_1, q.Q8_0, q.Q5_0)}  # Q5_0: the gguf fallback
    tensors["norm"] = (rng.normal(size=(64,)).astype(np.float32), q.F32)
    _write(tmp_path / "all.gguf", tensors, alignment)
    assert_same_as_gguf(str(tmp_path / "all.gguf"))


def test_damaged_files_name_the_file_and_what_is_wrong(tmp_path):
    rng = np.random.default_rng(1)
    _write(tmp_path / "ok.gguf", {"w": (rng.normal(size=(4, 32)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)})
    data = (tmp_path / "ok.gguf").read_bytes()
    cases = {"cut.gguf": (data[:-40], r"cut.gguf: tensor 'w' ends at byte \d+, past the file's \d+"),
             "head.gguf": (data[:40], r"head.gguf: truncated GGUF header"),
             "magic.gguf": (b"GGML" + data[4:], r"magic.gguf: not a GGUF file"),
             "v9.gguf": (data[:4] + (9).to_bytes(4, "little") + data[8:], r"v9.gguf: GGUF version 9 is not supported"),
             "big.gguf": (data[:4] + (3).to_bytes(4, "big") + data[8:], r"big.gguf: a big-endian GGUF file")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            GGUFContainer(tmp_path / name)
