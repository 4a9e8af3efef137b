"""Forward passes every stage shares: token log-probabilities and entropies of a causal LM, and
scores read from a sequence-classification model at every position or at the last real token.

Inputs come padded on either side (a row's real tokens are contiguous); a `Layout`
(models/packing.py) decides how the pass runs them:

    padded, full logits       the model's own forward on the padded rectangle, logits of every
                              position asked for at once: what rto did before
    padding-free              real tokens packed into rows, positions restarting per sequence
    chunked (logit_chunk > 0) the hidden states of the positions asked for go through the output
                              layer a chunk at a time, recomputed in backward: no (tokens x
                              vocabulary) tensor is ever held whole

Every layout gives the same numbers to float rounding (tests/test_padding_free.py). Results come
back in the padded layout the caller gave: (B, L) per token, 0 where nothing was asked.

A trained model runs under accelerate's wrapper (DDP, DeepSpeed, FSDP), whose forward must see
every use of its parameters. So a pass is an *op*, `op(model, *args)`, run by `run_op(model, op,
...)`: a plain model runs it directly; a `Runner` (what the supervised stages prepare), the RL
actor-critic and the shared base's roles run it inside their forward.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rto.models.packing import (
    PADDED,
    Layout,
    evaluating,
    pack,
    packs_correctly,
    position_ids,
    probe_rows,
)

__all__ = ["PADDED", "Layout", "position_ids"]


# --------------------------------------------------------------------------- running an op


class Runner(nn.Module):
    """A model whose passes are ops: `runner(op, *args)` is `op(model, *args)` inside forward,
    so that DDP, DeepSpeed and FSDP see the whole pass (output layer included) inside the
    forward of the module they wrap. The model is its submodule `model`."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, op: Any, *args: Any, **kwargs: Any) -> Any:
        return op(self.model, *args, **kwargs)


def _plain(model: Any) -> bool:
    """A Hugging Face model or a peft model around one (not a Runner, a wrapper or a role)."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) or (
        hasattr(model, "peft_config") and hasattr(model, "get_base_model")
    )


def run_op(model: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """`op(the model, *args)`: directly for a plain model (a frozen role), else through the
    forward of `model` (a Runner, accelerate's wrapper of one, or a callable role)."""
    if _plain(model):
        return op(model, *args, **kwargs)
    return model(op, *args, **kwargs)


def hf_of(model: Any) -> Any:
    """The Hugging Face model inside a peft model (its LoRA layers injected), or `model`."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_of(model: Any) -> Any:
    """The transformer body of a Hugging Face causal LM or sequence classifier (no output layer,
    no score head): both name it by base_model_prefix (`model`, GPT-2's `transformer`)."""
    return getattr(model, model.base_model_prefix)


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last 1 in each row of a 0/1 mask (0 for an all-zero row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).argmax(dim=1)


# --------------------------------------------------------------------------- log-probs


def gather_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / T)[targets], computed in float32 without a (B, L, V) log-softmax copy."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def causal_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  last: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(B, L, V) logits, or with `last` > 0 those of the last `last` positions only: the model
    applies its output layer (and whatever follows it, e.g. logit soft-capping) to those hidden
    states alone (transformers' `logits_to_keep`), so the (B, L, V) tensor is never made. A model
    whose forward does not take `logits_to_keep` gets the whole sequence's logits, sliced.
    `attention_mask` None: packed rows, whose `positions` restart per sequence."""
    if positions is None:
        positions = position_ids(attention_mask)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                  use_cache=False)  # fmt: skip
    if last > 0:
        # the slice also covers a forward that takes **kwargs and ignores logits_to_keep; a forward
        # without it raises TypeError where it binds its arguments, before its layers run
        try:
            return model(**kwargs, logits_to_keep=last).logits[:, -last:]
        except TypeError as e:
            if "logits_to_keep" not in str(e):
                raise
    logits = model(**kwargs).logits
    return logits[:, -last:] if last > 0 else logits


def token_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   target_mask: torch.Tensor, layout: Layout = PADDED, temperature: float = 1.0,
                   entropy: str = "none") -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(B, L) log p(token at [b, t] | the real tokens before it) where `target_mask` is 1, 0
    elsewhere, at `temperature`; with `entropy` "value" (no gradient) or "grad" also (B, L)
    entropies of those predicting distributions, else None. An op (see `run_op`): `model` is the
    causal LM (or a peft model around one). A target's prediction is read at the real token
    before it (a row's real tokens are contiguous, so: the column before)."""
    hf = hf_of(model)
    target_mask = target_mask.bool() & attention_mask.bool()
    target_mask[:, 0] = False  # the first column has nothing before it
    if not layout.padding_free and not layout.logit_chunk:
        return _padded_full(hf, input_ids, attention_mask, target_mask, temperature, entropy)
    b, length = input_ids.shape
    targets = target_mask.reshape(-1).nonzero().squeeze(-1)  # flat (b * L + t) of each target
    targets = targets[attention_mask.reshape(-1)[targets - 1].bool()]  # read at a real token
    predictors = targets - 1
    chunked = layout.logit_chunk > 0 and _head_matches(hf)
    packing = None
    if layout.padding_free and packs_correctly(backbone_of(hf), hf):
        packing = pack(input_ids, attention_mask)
        predictors = packing.packed_index()[predictors]
    tokens = input_ids.reshape(-1)[targets]
    if chunked:
        hidden = _hidden(hf, input_ids, attention_mask, packing)
        lp, ent = chunked_logprobs(hidden.reshape(-1, hidden.shape[-1])[predictors], tokens,
                                   _output_layer(hf), layout.logit_chunk, temperature, entropy)  # fmt: skip
    else:
        if packing is not None:
            logits = causal_logits(hf, packing.ids, None, positions=packing.positions)
        else:
            logits = causal_logits(hf, input_ids, attention_mask)
        picked = logits.reshape(-1, logits.shape[-1])[predictors]
        lp = gather_logprobs(picked, tokens, temperature)
        ent = _entropy(picked, temperature, entropy)
    return _scatter(lp, targets, b, length), None if ent is None else _scatter(
        ent, targets, b, length
    )


def response_logprobs(model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      response_ids: torch.Tensor, response_mask: torch.Tensor, temperature: float = 1.0,
                      layout: Layout = PADDED, entropy: str = "none") -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(B, T) log-prob of each response token (and its entropy, `entropy` "value" or "grad"),
    zero outside the response mask, for the RL layout: prompts left-padded to P columns,
    responses right-padded to T columns. An op (see `run_op`)."""
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    targets = torch.cat([torch.zeros_like(prompt_mask), response_mask], dim=1)
    lp, ent = token_logprobs(model, ids, mask, targets, layout, temperature, entropy)
    p = prompt_ids.shape[1]
    return lp[:, p:], None if ent is None else ent[:, p:]


def _padded_full(hf: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor,
                 temperature: float, entropy: str) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The padded layout with the model's own output layer: logits of every column from the
    first one that predicts a target on (transformers' logits_to_keep), as rto did before."""
    first = (
        int(target_mask.any(0).nonzero().min()) - 1 if target_mask.any() else input_ids.shape[1] - 1
    )
    logits = causal_logits(hf, input_ids, attention_mask, last=input_ids.shape[1] - first)[:, :-1]
    lp = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    lp = torch.cat(
        [lp[:, : first + 1], gather_logprobs(logits, input_ids[:, first + 1 :], temperature)], 1
    )
    lp = lp * target_mask
    ent = _entropy(logits, temperature, entropy)
    if ent is not None:
        ent = torch.cat([torch.zeros_like(lp[:, : first + 1]), ent], 1) * target_mask
    return lp, ent


def _entropy(logits: torch.Tensor, temperature: float, entropy: str) -> torch.Tensor | None:
    if entropy == "none":
        return None
    with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
        return entropy_from_logits(logits, temperature)


def _scatter(values: torch.Tensor, flat: torch.Tensor, b: int, length: int) -> torch.Tensor:
    """(N,) values at flat positions of a (B, L) batch, 0 elsewhere (differentiable)."""
    out = values.new_zeros(b * length).index_put((flat,), values.float())
    return out.reshape(b, length)


def _hidden(
    hf: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, packing: Any
) -> torch.Tensor:
    """The body's last hidden states: (R, W, H) of the packed rows, or (B, L, H) padded."""
    if packing is not None:
        return backbone_of(hf)(input_ids=packing.ids, attention_mask=None, position_ids=packing.positions,
                               use_cache=False).last_hidden_state  # fmt: skip
    return backbone_of(hf)(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state  # fmt: skip


# --------------------------------------------------------------------------- chunked output layer


class _OutputLayer:
    """A causal LM's output layer as its forward applies it: the output embeddings (tied or
    not), then the scaling or soft-capping some architectures add (Gemma's
    final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling)."""

    def __init__(self, hf: Any):
        self.head = hf.get_output_embeddings()
        config = hf.config
        self.scale = getattr(config, "logit_scale", None)
        self.divide = getattr(config, "logits_scaling", None)
        self.cap = getattr(config, "final_logit_softcapping", None)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.scale:
            logits = logits * self.scale
        if self.divide:
            logits = logits / self.divide
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


def _output_layer(hf: Any) -> _OutputLayer:
    return _OutputLayer(hf)


_HEAD_CHECKED: dict[tuple[str, str], bool] = {}


@torch.no_grad()
def _head_matches(hf: Any) -> bool:
    """Whether `_OutputLayer` on the body's hidden states gives the model's own logits, tried
    once per architecture (on `probe_rows`, the same on every process); one that does not is
    said once and keeps the model's own output layer (logits held whole)."""
    key = (type(hf).__name__, str(next(hf.parameters()).dtype))
    if key not in _HEAD_CHECKED:
        ids, mask = probe_rows(hf, next(hf.parameters()).device)
        with evaluating(hf):
            own = causal_logits(hf, ids, mask).float()
            ours = _OutputLayer(hf)(_hidden(hf, ids, mask, None)).float()
        real = mask.bool()
        gap = float((own[real] - ours[real]).abs().max())
        scale = float(own[real].abs().max()) + 1.0
        _HEAD_CHECKED[key] = gap <= (1e-4 if own.dtype == torch.float32 else 5e-2) * scale
        if not _HEAD_CHECKED[key]:
            print(f"[rto] {key[0]}: its output layer does more than rto's chunked log-probs apply "
                  f"(logits {gap:.3g} from its own); its log-probs come from its own output layer, "
                  "all positions at once (model.logit_chunk has no effect on it)", file=sys.stderr,
                  flush=True)  # fmt: skip
    return _HEAD_CHECKED[key]


def chunked_logprobs(hidden: torch.Tensor, targets: torch.Tensor, output_layer: Any, chunk: int,
                     temperature: float = 1.0, entropy: str = "none") -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(N,) log softmax(output_layer(hidden) / T)[targets] (and (N,) entropies), `chunk`
    positions at a time. With gradients, each chunk is a checkpoint: its logits are made in
    forward, used and freed, and made again in backward, so at most (chunk x vocabulary) logits
    exist at once, in the forward as in the backward."""
    lps, ents = [], []
    grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in output_layer.head.parameters())
    )
    n = len(hidden)
    rows = _rows_everywhere(n, output_layer.head)
    if rows > n:  # stand-ins, so that every process calls the output layer as often
        filler = hidden[:1].detach() if n else hidden.new_zeros(1, hidden.shape[-1])
        hidden = torch.cat([hidden, filler.expand(rows - n, -1)])
        targets = torch.cat([targets, targets.new_zeros(rows - n)])
    for start in range(0, len(hidden), chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if grad:
            lp, ent = checkpoint(
                _chunk, h, t, output_layer, temperature, entropy, use_reentrant=False
            )
        else:
            lp, ent = _chunk(h, t, output_layer, temperature, entropy)
        lps.append(lp)
        ents.append(ent)
    if not lps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, None if entropy == "none" else empty
    lp, ent = torch.cat(lps), None if entropy == "none" else torch.cat(ents)
    if rows > n:  # the stand-ins' results dropped, yet kept in the graph: their chunks' backward
        lp = lp[:n] + 0.0 * lp[n:].sum()  # recomputes the output layer as often everywhere
        ent = None if ent is None else ent[:n] + 0.0 * ent[n:].sum()
    return lp, ent


def _rows_everywhere(n: int, head: Any) -> int:
    """How many rows every process puts through the output layer: `n`, or under DeepSpeed ZeRO-3
    (where each call of a module gathers its weights from every process, a collective step)
    the most any process has, so that all make the same number of calls, forward and backward."""
    weight = getattr(head, "weight", None)
    if weight is None or not hasattr(weight, "ds_id"):
        return n
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return n
    most = torch.tensor([n], dtype=torch.long, device=weight.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return max(int(most), 1)


def _chunk(hidden: torch.Tensor, targets: torch.Tensor, output_layer: Any, temperature: float,
           entropy: str) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    logits = output_layer(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if entropy == "none":
        return lp, None
    with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
        ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return lp, ent


# --------------------------------------------------------------------------- scores


class TokenScorer(nn.Module):
    """A sequence-classification model (one output) read at every position: (B, L) scores.

    Reward models and critics both use it: the reward is the score at the last real token, the
    critic's values are the scores at every position. Wrapping the whole model in one module
    keeps DDP / DeepSpeed / FSDP wrapping correct (the forward goes through the wrapper), and
    its `layout` decides how the batch runs (padded or packed)."""

    def __init__(self, hf_model: Any, layout: Layout = PADDED):
        super().__init__()
        self.hf = hf_model  # a Hugging Face model, or a peft model around one (LoRA)
        self.layout = layout

    @property
    def model(self) -> Any:
        """The Hugging Face model (inside a peft model, its LoRA layers injected)."""
        return hf_of(self.hf)

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model = self.model
        return head_scores(
            backbone_of(model), model.score, input_ids, attention_mask, self.layout, model
        )


def head_scores(backbone: Any, head: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                layout: Layout = PADDED, model: Any = None) -> torch.Tensor:  # fmt: skip
    """(B, L) head(last hidden state) at every real position (0 at padding when packed), in
    float32. `model`: the Hugging Face model `backbone` belongs to (the packing check's key)."""
    head_dtype = next(head.parameters()).dtype  # a LoRA head trains in float32
    if layout.padding_free and packs_correctly(backbone, model or backbone):
        packing = pack(input_ids, attention_mask)
        hidden = backbone(input_ids=packing.ids, attention_mask=None, position_ids=packing.positions,
                          use_cache=False).last_hidden_state  # fmt: skip
        return packing.unpack(head(hidden.to(head_dtype)).squeeze(-1).float())
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state  # fmt: skip
    return head(hidden.to(head_dtype)).squeeze(-1).float()


def sequence_scores(
    scorer: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(B,) score at the last real token of each row, whatever the padding side."""
    scores = scorer(input_ids, attention_mask)
    idx = last_real_index(attention_mask)
    return scores.gather(1, idx.unsqueeze(1)).squeeze(1)
