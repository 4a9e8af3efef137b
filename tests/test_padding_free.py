"""Padding-free and chunked passes give the numbers of the padded full-logit pass.

On the built-in Llama, a GPT-2 and a Qwen2 (the test tasks' base models, float32), every layout
(packed rows, chunked output layer, both) against the padded pass with the model's own output
layer (what rto did before): log-probs and entropies on prompts left-padded and responses
right-padded (the RL layout) and on right-padded rows (SFT and DPO), values and reward-model
scores, all within 1e-5, and so are the gradients they give. A fixed-seed RL run (ppo, rto,
rto_grpo) gives its padded run's first iteration. Chunking holds no (tokens x vocabulary)
tensor whole, and an architecture that does not read packed rows correctly is padded, saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rto.config.sections import ModelSection
from rto.models import packing
from rto.models.forward import (
    PADDED,
    Layout,
    Runner,
    TokenScorer,
    chunked_logprobs,
    response_logprobs,
    run_op,
    token_logprobs,
)
from rto.models.load import load_causal_lm, load_sequence_scorer
from rto.models.packing import pack

from conftest import rl_args, rto_ok

LAYOUTS = [Layout(True, 0), Layout(False, 4), Layout(True, 4), Layout(True, 256)]
TASKS = ["tiny_task", "gpt2_task", "qwen2_task"]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def rl_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Five prompts of 1 to 7 tokens left-padded to 7, responses of 1 to 6 right-padded to 6."""
    gen = torch.Generator().manual_seed(seed)
    p_len, r_len = [7, 1, 4, 6, 2], [6, 3, 1, 5, 2]
    prompt = torch.randint(5, 300, (5, 7), generator=gen)
    response = torch.randint(5, 300, (5, 6), generator=gen)
    prompt_mask = torch.stack([torch.arange(7) >= 7 - n for n in p_len]).long()
    response_mask = torch.stack([torch.arange(6) < n for n in r_len]).long()
    return {"prompt_ids": prompt * prompt_mask, "prompt_mask": prompt_mask,
            "response_ids": response * response_mask, "response_mask": response_mask}  # fmt: skip


def right_padded(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [9, 3, 12, 6]
    ids = torch.randint(5, 300, (4, 12), generator=gen)
    mask = torch.stack([torch.arange(12) < n for n in lengths]).long()
    return ids * mask, mask


def grads(loss: torch.Tensor, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))


def same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if a[name] is None:
            assert b[name] is None, name
        else:
            close(b[name], a[name])


@pytest.fixture(scope="module", params=TASKS)
def base(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(request.param) / "base_model")


def test_rl_log_probs_and_entropies_with_their_gradients(base: str) -> None:
    model = load_causal_lm(ModelSection(path=base))
    b = rl_batch()
    weights = torch.randn(b["response_mask"].shape, generator=torch.Generator().manual_seed(2))

    def loss(layout: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lp, ent = response_logprobs(
            model, *b.values(), temperature=0.7, layout=layout, entropy="grad"
        )
        return lp, ent, (lp * weights).sum() + (ent * weights).sum()

    lp, ent, total = loss(PADDED)
    reference = grads(total, model)
    assert (lp != 0).sum() == b["response_mask"].sum()  # every response token, nothing else
    for layout in LAYOUTS:
        lp2, ent2, total2 = loss(layout)
        close(lp2, lp)
        close(ent2, ent)
        same_grads(reference, grads(total2, model))


def test_sft_and_dpo_rows_right_padded(base: str) -> None:
    """The supervised stages' rows (right-padded, targets every token but the first) through a
    Runner, as the engine trains them."""
    runner = Runner(load_causal_lm(ModelSection(path=base)))
    ids, mask = right_padded()
    results = {}
    for layout in [PADDED, *LAYOUTS]:
        lp, _ = run_op(runner, token_logprobs, ids, mask, mask, layout)
        results[layout] = (lp, grads(lp.sum(), runner))
    lp, reference = results[PADDED]
    assert (lp != 0).sum() == mask.sum() - len(mask)
    for layout in LAYOUTS:
        close(results[layout][0], lp)
        same_grads(reference, results[layout][1])


def test_values_and_reward_model_scores(base: str) -> None:
    """A score head read at every position (the critic's values; the reward model reads the
    last real token), with left- and right-padded rows."""
    hf = load_sequence_scorer(ModelSection(path=base), base, trainable=True, require_head=False,
                              role="critic")  # fmt: skip
    b = rl_batch()
    ids = torch.cat([b["prompt_ids"], b["response_ids"]], 1)
    mask = torch.cat([b["prompt_mask"], b["response_mask"]], 1)
    padded = TokenScorer(hf, PADDED)
    values = padded(ids, mask)
    reference = grads((values * mask).sum(), padded)
    for layout in LAYOUTS:
        scorer = TokenScorer(hf, layout)
        got = scorer(ids, mask)
        close(got * mask, values * mask)
        assert (got[mask == 0] == 0).all() or not layout.padding_free
        same_grads(reference, grads((got * mask).sum(), scorer))


def test_chunks_hold_no_whole_vocabulary_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Log-probs of 40 positions over a vocabulary of 50, in chunks of 8: no tensor of 40 x 50
    (or more) is made, in the forward or the backward, and the numbers are the whole pass's."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 50, (40,))

    class OutputLayer:
        def __init__(self) -> None:
            self.head = head

        def __call__(self, h: torch.Tensor) -> torch.Tensor:
            out = self.head(h)
            assert out.shape[0] <= 8  # the output layer only ever sees a chunk
            return out

    whole = torch.log_softmax(head(hidden), -1).gather(1, targets[:, None]).squeeze(1)
    expected = torch.autograd.grad(whole.sum(), [hidden, head.weight])
    seen: list[int] = []

    def pack_hook(t: torch.Tensor) -> torch.Tensor:  # every tensor autograd keeps for backward
        seen.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        lp, ent = chunked_logprobs(hidden, targets, OutputLayer(), 8, entropy="value")
    got = torch.autograd.grad(lp.sum(), [hidden, head.weight])
    assert max(seen) < 40 * 50  # nothing vocabulary-sized for all positions was kept
    close(lp, whole)
    for a, b in zip(got, expected):
        close(a, b)
    assert ent.shape == (40,) and not ent.requires_grad


def test_an_architecture_that_misreads_packed_rows_is_padded_and_said(
    tiny_task: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body that lets packed sequences see each other (as one without the position-based
    mask would) fails the check once, is said once, and its passes stay padded (same numbers
    as the padded pass)."""
    model = load_causal_lm(ModelSection(path=str(tiny_task / "base_model")), trainable=False)
    body = model.model
    real_forward = body.forward

    def leaky(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if kwargs.get("attention_mask") is None:  # packed: attend across the whole row
            kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
            kwargs["position_ids"] = packing.position_ids(kwargs["attention_mask"])
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(body, "forward", leaky)
    monkeypatch.setattr(packing, "_CHECKED", {})
    b = rl_batch()
    with torch.no_grad():
        padded, _ = response_logprobs(model, *b.values(), layout=PADDED)
        for _ in range(2):
            got, _ = response_logprobs(model, *b.values(), layout=Layout(True, 4))
            close(got, padded)
    err = capsys.readouterr().err
    assert err.count("does not read packed rows as separate sequences") == 1
    assert "LlamaForCausalLM" in err and "model.padding_free has no effect on it" in err


def test_packing_puts_real_tokens_only_in_rows_as_wide_as_the_longest() -> None:
    b = rl_batch()
    ids = torch.cat([b["prompt_ids"], b["response_ids"]], 1)
    mask = torch.cat([b["prompt_mask"], b["response_mask"]], 1)
    p = pack(ids, mask)
    lengths = mask.sum(1).tolist()  # 13, 4, 5, 11, 4
    assert p.ids.shape == (3, 13)  # 13 | 11 + 2 of a 4 ... first fit, longest first
    assert len(p.src) == sum(lengths)
    assert torch.equal(p.ids.reshape(-1)[p.dst], ids.reshape(-1)[p.src])
    # positions restart at every sequence, and unpacking gives the padded layout back
    assert p.positions[0].tolist() == list(range(13))
    assert torch.equal(p.unpack(p.ids), ids * mask)


@pytest.mark.parametrize("preset", ["ppo", "rto", "rto_grpo"])
def test_a_fixed_seed_rl_run_gives_the_padded_runs_first_iteration(
    preset: str, tiny_task: Path, sft_model: Path, reward_model: Path, dpo_model: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The same seed, padded and padding-free chunked (the default): the same rollout, rewards
    and first update, to 1e-5 (the responses are sampled before any update, so they are equal)."""
    rows = {}
    for name, extra in (("padded", ["--model.padding_free", "false", "--model.logit_chunk", "0"]),
                        ("packed", ["--model.logit_chunk", "16"])):  # fmt: skip
        out = tmp_path / name
        rto_ok(*rl_args(tiny_task, sft_model, reward_model, dpo_model, out, "--preset", preset,
                        "--train.max_steps", "1", "--rl.rollout_batch_size", "16", *extra))  # fmt: skip
        rows[name] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][0]
    padded, packed = rows["padded"], rows["packed"]
    compared = [k for k in padded if k.startswith(("rollout/", "reward/", "policy/", "value/"))]
    assert {"rollout/score", "rollout/kl", "policy/loss", "policy/entropy"} <= set(compared)
    for k in compared:
        assert packed[k] == pytest.approx(padded[k], rel=1e-5, abs=1e-6), k


def test_soft_capped_tied_logits_give_the_same_numbers(capsys: pytest.CaptureFixture) -> None:
    """A tiny Gemma2 (tied embeddings, final-logit soft-capping, set low enough to bend these
    logits): the chunked output layer applies the cap as the model's forward does, so log-probs,
    entropies and gradients equal the model's own full-logit pass, and nothing is said."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          final_logit_softcapping=0.5, attn_implementation="eager")  # fmt: skip
    model = Gemma2ForCausalLM(config).float()
    assert model.config.tie_word_embeddings
    ids = torch.randint(5, 300, (2, 6))
    capped = model(ids).logits
    model.config.final_logit_softcapping = None
    assert (model(ids).logits - capped).abs().max() > 0.05  # the cap bends these logits
    model.config.final_logit_softcapping = 0.5
    b = rl_batch()

    def loss(layout: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lp, ent = response_logprobs(model, *b.values(), temperature=1.0, layout=layout, entropy="grad")
        return lp, ent, lp.sum() + ent.sum()

    lp, ent, total = loss(PADDED)
    reference = grads(total, model)
    for layout in (Layout(False, 4), Layout(True, 4)):
        lp2, ent2, total2 = loss(layout)
        close(lp2, lp)
        close(ent2, ent)
        same_grads(reference, grads(total2, model))
    assert "output layer does more" not in capsys.readouterr().err
