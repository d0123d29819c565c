"""lm-evaluation-harness drives pyllama-jax: the model `pyllama_jax` (importing this registers it).

    python -m pyllama_jax.eval.harness --model pyllama_jax --model_args path=smollm2-135m --tasks hellaswag
    --model_args path=smollm2-135m,wbits=4,groupsize=128,method=rtn     # quantized now (method=gptq: calibrated)
    --model_args path=/ckpt/smollm2-4bit                                  # a saved quantized checkpoint
    --model_args config=configs/smollm2_135m_4bit.py                      # a job config's model (`load_from_config`)

Scores come from `eval.scoring.Scorer` (one uncached forward per row, lengths bucketed to powers of
two); contexts longer than the window are left-truncated as lm-eval's HF model does, and
`loglikelihood_rolling` cuts a text into the same disjoint windows. Generation is the core
generator's (greedy unless `temperature` > 0), stopping at `until`.
"""
from __future__ import annotations

import importlib.util
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval lists its own models only while its registry is empty: first)
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from pyllama_jax.eval.scoring import Scorer

METHODS = ("rtn", "gptq")


def load_model(path: str = "smollm2-135m", config: str | None = None, wbits: int = 0, groupsize: int = 128,
               method: str = "rtn", dtype: str | None = None, **quant: Any) -> Any:
    """A `pj.Model` from lm-eval's model_args: `path` (anything `pj.load` takes), or `config` (a job
    config file); `wbits` > 0 quantizes it now with `method` (`quant` overrides other `QuantRecipe` fields)."""
    import pyllama_jax as pj

    if config:
        spec = importlib.util.spec_from_file_location("pyllama_job_config", config)
        if spec is None:
            raise FileNotFoundError(f"config={config}: no such config file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return pj.load_from_config(module.get_config())
    model = pj.load(path, dtype=dtype)
    if wbits:
        if method not in METHODS:
            raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
        model = pj.quantize(model, wbits=int(wbits), groupsize=int(groupsize), nearest=method == "rtn", **quant)
    return model


@register_model("pyllama_jax", "pyllama-jax")
class PyllamaLM(TemplateLM):
    """lm-eval's `LM` over a `pj.Model` (`model=`), or one loaded from model_args (see `load_model`)."""

    def __init__(self, model: Any = None, batch_size: int | str = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, token_budget: int = 4096, device: str | None = None,
                 max_batch_size: int | None = None, **model_args: Any):
        super().__init__()
        self.model = model if model is not None else load_model(**model_args)
        self.tokenizer = self.model.tokenizer
        self.batch_size = 8 if batch_size in ("auto", None) or str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length or self.model.config.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self.scorer = Scorer(self.model.module, self.model.mesh, token_budget, self.batch_size, self.batch_size)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """BOS if the tokenizer has one, else EOS (as lm-eval's HF model and remote tokenizer do)."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, bos=None if add_special_tokens else False)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of the continuation's logprobs, whether it is the greedy continuation) per request:
        `(context + continuation)[-(max_length + 1):]` scored, as HF's model feeds it (the last token
        is only a target)."""
        out = []
        step = self.batch_size * 8  # the scorer batches by length inside; this paces the progress bar
        for i in tqdm(range(0, len(requests), step), desc="loglikelihood", disable=disable_tqdm):
            chunk = requests[i:i + step]
            rows = [(context + continuation)[-(self.max_length + 1):] for _, context, continuation in chunk]
            for (key, _, continuation), row, s in zip(chunk, rows, self.scorer.score(rows, top=1)):
                n = min(len(continuation), len(row) - 1)
                answer = float(np.sum(s.logprobs[-n:], dtype=np.float64)), bool(s.greedy[-n:].all())
                out.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each text's total logprob over lm-eval's disjoint rolling windows of `max_length` tokens."""
        windows, owner = [], []
        for k, (text,) in enumerate(tqdm([r.args for r in requests], desc="rolling", disable=disable_tqdm)):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=True)):
            totals[k] += lp
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or `temperature` > 0) continuations, cut at the first `until` string; batches
        share generation settings, contexts are left-truncated to leave room for `max_gen_toks`."""
        groups: dict[str, list[int]] = {}
        for k, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(k)
        out = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", True) else 0.0
            room = max(1, self.max_length - max_new)
            for i in range(0, len(members), self.batch_size):
                batch = members[i:i + self.batch_size]
                prompts = [self.tok_encode(requests[k].args[0])[-room:] for k in batch]
                gen = self.model.generate(prompts, max_new_tokens=max_new, temperature=temperature,
                                          stop=tuple(until), seed=0)
                for k, text in zip(batch, gen.texts):
                    out[k] = min((text.split(u)[0] for u in until if u), key=len, default=text)
                    self.cache_hook.add_partial("generate_until", requests[k].args, out[k])
                bar.update(len(batch))
        return out
