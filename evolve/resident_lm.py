"""lm-eval's HF backend for a model scored again and again on the same requests.

A search scores every candidate on the same documents. Stock lm-eval tokenizes each request and
builds each padded batch anew on every call, then picks each request's answer apart in a Python
loop: on the demo's small models that was a quarter of a candidate's time, spent outside the
model's forward passes. `ResidentLM` keeps the tokenizations and, for log-likelihood requests, a
`LoglikelihoodPlan`: lm-eval's own batches (same order, same padding, found by running its
Collator once) with index tensors that read every request's answer out of a batch's log-softmax
in a few vectorized operations.

The answers are lm-eval's: the same forward passes on the same padded inputs, the same
log-softmax, the same greedy test; a continuation's log-likelihood is summed by `index_add_`
where lm-eval calls `sum()`, so it can differ in float32's last bit. It reads lm-eval 0.4's internals
(`Collator`, `_model_call`, `_loglikelihood_tokens`' arguments): tests/test_resident_lm.py compares its
answers with stock HFLM's, so an lm-eval that changes them fails there first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator

# ((context, continuation), context ids, continuation ids), as lm-eval's loglikelihood() hands them on
Request = tuple[tuple[str, str] | None, list[int], list[int]]


@dataclass(frozen=True)
class _Batch:
    """One model call and where each answer lies in its output.

    Answers are numbered in the order lm-eval computes them; (`rows`, `positions`, `tokens`) list
    every continuation token of every answer, `answer` saying whose it is. lm-eval tests greediness
    on the last positions of a request's window but reads log-probabilities from its first ones
    (the two differ only for continuations of different lengths sharing one model row); both sets
    of positions are kept to give its answers exactly."""

    inputs: torch.Tensor  # [batch, padded length] token ids, right-padded with 0 as lm-eval pads
    rows: torch.Tensor
    positions: torch.Tensor  # where the log-probability of each token is read
    greedy_positions: torch.Tensor  # where the argmax is compared with it
    tokens: torch.Tensor
    answer: torch.Tensor  # answer number within this batch, per token
    answers: int


class LoglikelihoodPlan:
    """lm-eval's `_loglikelihood_tokens` for a causal model, laid out once for a fixed list of requests."""

    def __init__(self, requests: list[Request], batch_size: int, max_length: int, group_by_contexts: bool,
                 device: Any):
        def longest_first(req: Request):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        def shared_prefix(req: Request):
            return req[-2] + req[-1][:-1]

        order = Collator(requests, sort_fn=longest_first, group_by="contexts" if group_by_contexts else None,
                         group_fn=shared_prefix)
        self.batches: list[_Batch] = []
        placeholder = torch.empty(1, 1, 1)
        for chunk in order.get_batched(n=batch_size, batch_fn=None):
            inputs: list[list[int]] = []
            rows: list[int] = []
            positions: list[int] = []
            greedy: list[int] = []
            tokens: list[int] = []
            answer: list[int] = []
            answers = 0
            for row, (request_str, context, continuation) in enumerate(chunk):
                if not context or not continuation or len(continuation) > max_length:
                    raise ValueError("empty context or continuation, or a continuation longer than the model")
                ids = (context + continuation)[-(max_length + 1):][:-1]
                inputs.append(ids)
                window_end = len(ids)
                window = len(continuation)
                for _, own, _ in order.get_cache(req_str=request_str, cxt_toks=context, cont_toks=continuation,
                                                 logits=placeholder):
                    n = len(own)
                    rows += [row] * n
                    positions += range(window_end - window, window_end - window + n)
                    greedy += range(window_end - n, window_end)
                    tokens += own
                    answer += [answers] * n
                    answers += 1
            width = max(len(ids) for ids in inputs)
            padded = torch.zeros(len(inputs), width, dtype=torch.long)
            for i, ids in enumerate(inputs):
                padded[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)

            def tensor(values: list[int]) -> torch.Tensor:
                return torch.tensor(values, dtype=torch.long, device=device)

            self.batches.append(_Batch(padded.to(device), tensor(rows), tensor(positions), tensor(greedy),
                                       tensor(tokens), tensor(answer), answers))
        self.original_order = order.get_original(list(range(sum(b.answers for b in self.batches))))

    def run(self, lm: HFLM) -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) per request, in the order the plan was built with."""
        computed: list[tuple[float, bool]] = []
        for b in self.batches:
            logprobs = F.log_softmax(lm._model_call(b.inputs), dim=-1, dtype=lm.softmax_dtype)
            picked = logprobs[b.rows, b.positions, b.tokens]
            sums = torch.zeros(b.answers, dtype=picked.dtype, device=picked.device).index_add_(0, b.answer, picked)
            missed = logprobs[b.rows, b.greedy_positions].argmax(dim=-1) != b.tokens
            misses = torch.zeros(b.answers, dtype=torch.long, device=picked.device).index_add_(0, b.answer,
                                                                                               missed.long())
            computed += zip(sums.tolist(), (misses == 0).tolist(), strict=True)
        return [computed[i] for i in self.original_order]


class ResidentLM(HFLM):
    """HFLM that remembers tokenizations and log-likelihood plans across calls.

    Only for a model whose tokenizer, maximum length and batch size stay fixed: one resident
    model updated in place between candidates. Anything it does not plan for (automatic batch
    sizes, seq2seq models, rolling log-likelihoods) goes to lm-eval's own code."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._encoded: dict[tuple, list[int]] = {}
        self._plans: dict[tuple, LoglikelihoodPlan] = {}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        key = (string, add_special_tokens, left_truncate_len, tuple(sorted(kwargs.items())))
        if key not in self._encoded:
            self._encoded[key] = super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        return list(self._encoded[key])  # callers may change the list they get

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        strings = tuple(r[0] for r in requests)
        plannable = (self.backend == "causal" and isinstance(self.batch_size, int) and override_bs is None
                     and None not in strings)
        if not plannable:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        if strings not in self._plans:
            self._plans[strings] = LoglikelihoodPlan(requests, self.batch_size, self.max_length,
                                                     bool(self.logits_cache), self.device)
        return self._plans[strings].run(self)
