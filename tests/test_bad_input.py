"""Bad input, as a new user gives it: every case runs one command through the CLI and must exit
with status 2 (or do the documented nothing), name what is wrong (file, line, key, function,
model), print no traceback, and change nothing on disk: the finished pipeline run and the
interrupted run beside it keep every file byte for byte (checked by hash), and a new --out is not
even created.

Almost every case fails before a model is trained, so the table takes seconds. Failures that need
a running model (non-finite weights, a reward model that scores NaN, a full disk) follow it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_TASK, rto

JUDGES = """
def raises(prompts, responses):
    raise ValueError("judge broke on purpose")

def returns_none(prompts, responses):
    return None

def returns_strings(prompts, responses):
    return ["good"] * len(responses)

def too_short(prompts, responses):
    return [0.5]

def returns_nan(prompts, responses):
    return [float("nan")] * len(responses)

def fluent_maybe(prompts, responses):
    return ["maybe"] * len(responses)
"""


@dataclass
class World:
    """The inputs of the table: the built-in task, a finished run, an interrupted run, and broken
    files of every kind."""

    task: Path
    finished: Path  # a finished sft run, made by `rto pipeline` (so it also holds pipeline.json)
    recipe: Path
    bad: Path  # broken data files and model folders
    classifier: Path  # a sequence-classification model (a reward model) with the task's tokenizer
    interrupted: Path  # an sft run stopped after its checkpoint of step 1 (CUT_SHORT)
    new: Path = Path()  # a fresh --out for this case; it must not exist after a failure

    @property
    def guarded(self) -> list[Path]:
        """The earlier runs no failed command may change: the whole pipeline folder (its
        pipeline.yaml too) and the interrupted run."""
        return [self.finished.parent, self.interrupted]

    @property
    def base(self) -> Path:
        return self.task / "base_model"

    def sft(self, out: Path, *extra: object) -> list:
        return ["sft", "--out", out, "--model.path", self.base, "--data.path", self.task / "sft_train.jsonl",
                "--data.max_rows", "64", "--train.batch_size", "16", "--train.micro_batch_size", "16",
                "--train.max_steps", "1", "--data.max_length", "96", "--data.max_prompt_length", "32",
                "--log.progress", "false", *extra]  # fmt: skip

    def preference(self, stage: str, out: Path, *extra: object) -> list:
        return [stage, "--out", out, "--model.path", self.base, "--data.path", self.bad / "pairs.jsonl",
                "--train.batch_size", "16", "--train.micro_batch_size", "16", "--train.max_steps", "1",
                "--data.max_length", "96", "--data.max_prompt_length", "32", "--log.progress", "false", *extra]  # fmt: skip

    def pairs(self, out: Path, *extra: object) -> list:
        return ["pairs", "--out", out, "--model.path", self.base, "--data.path", self.task / "prompts_train.jsonl",
                "--data.max_rows", "8", "--gold_reward", "sentiment", "--generate.max_new_tokens", "8",
                "--data.max_prompt_length", "32", "--log.progress", "false", *extra]  # fmt: skip

    def rl(self, out: Path, *extra: object) -> list:
        return ["rl", "--out", out, "--preset", "ppo", "--model.path", self.base, "--reward_model", self.classifier,
                "--data.path", self.task / "prompts_train.jsonl", "--rl.rollout_batch_size", "8",
                "--train.batch_size", "8", "--train.micro_batch_size", "8", "--train.max_steps", "1",
                "--generate.max_new_tokens", "8", "--rl.score.normalization", "none",
                "--data.max_prompt_length", "32", "--log.progress", "false", *extra]  # fmt: skip

    def eval(self, out: Path, *extra: object) -> list:
        return ["eval", "--out", out, "--policies", f"base={self.base}", "--eval.prompts",
                self.task / "prompts_eval.jsonl", "--eval.num_prompts", "8", "--generate.max_new_tokens", "8",
                "--data.max_prompt_length", "32", *extra]  # fmt: skip


CUT_SHORT = ("--train.max_steps", "3", "--train.save_every", "1")  # the interrupted run's steps


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def smaller_model(base: Path, out: Path) -> Path:
    """A causal LM of another shape with the base model's tokenizer: its weights do not fit a
    checkpoint of the base model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(base)
    config.hidden_size, config.intermediate_size = 32, 64
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def sequence_classifier(base: Path, out: Path, fill: float | None = None) -> Path:
    """The base model as a sequence classifier with one output (a reward model's shape)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = (
        tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    )
    if fill is not None:
        with torch.no_grad():
            model.score.weight.fill_(fill)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(tiny_task: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("bad_input")
    recipe = root / "recipe.yaml"
    sft_stage = {"stage": "sft", "model": {"path": str(tiny_task / "base_model")},
                 "data": {"path": str(tiny_task / "sft_train.jsonl"), "max_rows": 64, "max_length": 96,
                          "max_prompt_length": 32},
                 "train": {"batch_size": 16, "micro_batch_size": 16, "max_steps": 2}, "log": {"progress": False}}  # fmt: skip
    recipe.write_text(yaml.safe_dump({"out": str(root / "run"), "stages": {"sft": sft_stage}}))
    assert rto("pipeline", "--config", recipe) == 0
    bad = root / "bad"
    bad.mkdir()
    rows = [json.loads(x) for x in (tiny_task / "sft_train.jsonl").read_text().splitlines()[:65]]
    write_jsonl(bad / "pairs.jsonl", [{"prompt": a["prompt"], "chosen": a["completion"],
                                       "rejected": b["completion"]} for a, b in zip(rows, rows[1:])])  # fmt: skip
    good = "".join(json.dumps(r) + "\n" for r in rows[:2])
    (bad / "latin1.jsonl").write_bytes(
        (good + '{"prompt": "the caf\xe9 was", "completion": " good ."}\n').encode("latin-1")
    )
    (bad / "utf16.jsonl").write_bytes(good.encode("utf-16"))
    (bad / "latin1.csv").write_bytes("prompt\nthe caf\xe9 was\n".encode("latin-1"))
    (bad / "broken.jsonl").write_text(good + '{"prompt": "the food",\n')
    (bad / "empty.jsonl").write_text("")
    (bad / "data.txt").write_text("the food was good .\n")
    write_jsonl(bad / "null_prompt.jsonl", [rows[0], {"prompt": None, "completion": " good ."}])
    write_jsonl(bad / "no_columns.jsonl", [{"question": "q", "answer": "a"}])
    write_jsonl(bad / "not_objects.jsonl", [["the food was", " good ."]])
    write_jsonl(bad / "null_chosen.jsonl", [{"prompt": "a", "chosen": None, "rejected": "b"}] * 20)
    write_jsonl(bad / "no_rejected.jsonl", [{"prompt": "a", "chosen": "b"}] * 20)
    write_jsonl(bad / "number_chosen.jsonl", [{"prompt": "a", "chosen": 3, "rejected": "b"}] * 20)
    write_jsonl(bad / "null_prompts.jsonl", [{"prompt": "the food was"}] * 9 + [{"prompt": None}])
    (bad / "empty_model").mkdir()
    (bad / "no_tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        (bad / "no_tokenizer" / name).write_bytes((tiny_task / "base_model" / name).read_bytes())
    (bad / "no_config").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bad / "no_config" / name).write_bytes((tiny_task / "base_model" / name).read_bytes())
    (bad / "nan_lr.yaml").write_text("train:\n  lr: .nan\n")
    (bad / "utf16.yaml").write_bytes("train:\n  lr: 0.001\n".encode("utf-16"))
    (bad / "eval_run").mkdir()
    (bad / "eval_run" / "eval.json").write_text(
        json.dumps(
            {
                "methods": {"sft": {}},
                "win_rates": {},
                "win_rate_by": "gold",
                "baseline": "sft",
                "prompts": 1,
            }
        )
    )
    (bad / "rto_test_bad_judges.py").write_text(JUDGES)
    (bad / "rto_test_broken_judges.py").write_text("def f(prompts, responses)\n    return []\n")
    smaller_model(tiny_task / "base_model", bad / "smaller_model")
    classifier = sequence_classifier(tiny_task / "base_model", root / "classifier")
    w = World(tiny_task, root / "run" / "sft", recipe, bad, classifier, root / "cut")
    os.environ["RTO_FAULT"] = "disk_full_during_save:2"  # stops the run after step 2
    try:
        assert rto(*w.sft(w.interrupted, *CUT_SHORT)) == 2
    finally:
        del os.environ["RTO_FAULT"]
    assert [p.name for p in (w.interrupted / "checkpoints").iterdir()] == ["step-1"]
    return w


def R(w: World) -> Path:  # the finished run, as a command's --out
    return w.finished


def C(w: World, *extra: object) -> list:  # the interrupted run's command, continued
    return w.sft(w.interrupted, *CUT_SHORT, "--resume", *extra)


# (id, the command, what the message must say); w.new is a fresh --out, R(w) the finished run,
# C(w) continues the interrupted run.
CASES = [
    # ----------------------------------------------------------------- configs and non-finite values
    ("lr-inf", lambda w: w.sft(R(w), "--overwrite", "--train.lr", "inf"), ["'train.lr'", "finite", "inf"]),
    ("lr-nan-resume", lambda w: w.sft(R(w), "--resume", "--train.lr", "nan"), ["'train.lr'", "finite", "nan"]),
    ("lr-nan-yaml", lambda w: w.sft(w.new, "--config", w.bad / "nan_lr.yaml"), ["'train.lr'", "nan_lr.yaml"]),
    ("dpo-beta-inf", lambda w: w.preference("dpo", w.new, "--beta", "inf"), ["'beta'", "finite"]),
    ("rl-kl-nan", lambda w: w.rl(w.new, "--rl.kl.coef", "nan"), ["'rl.kl.coef'", "finite"]),
    ("rl-tis-without-vllm", lambda w: w.rl(w.new, "--rl.sampler.correction", "tis"),
     ["'rl.sampler.correction'", "generate.backend vllm"]),
    ("rl-tis-cap-below-one", lambda w: w.rl(w.new, "--rl.sampler.tis_cap", "0.5"), ["'rl.sampler.tis_cap'", "out of range"]),
    ("pairs-temperature-inf", lambda w: w.pairs(w.new, "--temperature", "1e999"), ["'temperature'", "finite"]),
    ("lr-negative", lambda w: w.sft(R(w), "--overwrite", "--train.lr", "-1"), ["'train.lr'", "out of range"]),
    ("unknown-option", lambda w: w.sft(R(w), "--overwrite", "--train.lrr", "1"), ["--train.lrr", "--train.lr"]),
    ("batch-zero", lambda w: w.sft(w.new, "--train.batch_size", "0"), ["'train.batch_size'", ">= 1"]),
    ("config-not-utf8", lambda w: w.sft(w.new, "--config", w.bad / "utf16.yaml"),
     ["config file", "utf16.yaml, line 1, byte 1", "not UTF-8", "UTF-16"]),
    # ----------------------------------------------------------------- output folders
    ("out-is-a-file", lambda w: w.sft(w.bad / "data.txt"), ["data.txt is a file, not a folder"]),
    ("out-under-a-file", lambda w: w.sft(w.bad / "data.txt" / "run"), ["data.txt is a file"]),
    ("finished-no-flag", lambda w: w.sft(R(w)), ["already holds a finished sft run", "--overwrite"]),
    ("finished-resume-changed", lambda w: w.sft(R(w), "--resume", "--train.max_steps", "1"),
     ["finished sft run made with another config", "train.max_steps: 2 -> 1", "--overwrite"]),
    ("finished-other-stage", lambda w: w.pairs(R(w)), ["already holds a finished sft run"]),
    ("finished-task", lambda w: ["task", "sentiment", "--out", R(w), *TINY_TASK], ["finished sft run"]),
    ("finished-eval", lambda w: w.eval(R(w)), ["already holds a finished sft run"]),
    ("interrupted-no-flag", lambda w: w.sft(w.interrupted, *CUT_SHORT),
     ["already holds an unfinished sft run; pass --resume to continue it, --overwrite"]),
    ("interrupted-resume-nan", lambda w: C(w, "--train.lr", "nan"), ["'train.lr'", "finite"]),
    # a --resume with a bad input used to rewrite config.yaml before failing
    ("interrupted-resume-typo", lambda w: C(w, "--data.path", w.bad / "sft_tarin.jsonl"),
     ["sft_tarin.jsonl does not exist"]),
    ("interrupted-resume-empty-model", lambda w: C(w, "--model.path", w.bad / "empty_model"),
     ["empty_model is empty"]),
    ("interrupted-resume-other-model", lambda w: C(w, "--model.path", w.bad / "smaller_model"),
     ["checkpoint", "step-1 does not fit this run", "--overwrite"]),
    ("interrupted-resume-other-stage", lambda w: w.preference("rm", w.interrupted, "--resume"),
     ["cannot continue", "another stage", "completion_only_loss"]),
    # an --out that is or holds an input of the run: refused with or without --overwrite
    ("out-is-model-path", lambda w: w.sft(R(w), "--overwrite", "--model.path", R(w)),
     ["run/sft is model.path (", "run/sft), an input of this run", "Choose another --out"]),
    ("out-is-model-path-no-flag", lambda w: w.sft(R(w), "--model.path", R(w)), ["is model.path", "an input"]),
    ("out-holds-data-path", lambda w: w.sft(R(w), "--overwrite", "--data.path", R(w) / "metrics.jsonl"),
     ["run/sft holds data.path (", "run/sft/metrics.jsonl), an input of this run", "Choose another --out"]),
    ("out-holds-model-path", lambda w: w.sft(R(w).parent, "--overwrite", "--model.path", R(w)),
     ["/run holds model.path (", "run/sft)"]),
    ("interrupted-resume-holds-data", lambda w: C(w, "--data.path", w.interrupted / "metrics.jsonl"),
     ["holds data.path", "metrics.jsonl"]),
    ("dpo-out-is-ref-model", lambda w: w.preference("dpo", R(w), "--overwrite", "--ref_model", R(w)),
     ["run/sft is ref_model (", "an input"]),
    ("rl-out-is-dpo-model", lambda w: w.rl(R(w), "--overwrite", "--preset", "rto", "--dpo_model", R(w)),
     ["run/sft is dpo_model (", "an input"]),
    ("rl-out-is-reference", lambda w: w.rl(R(w), "--overwrite", "--ref_model", R(w)), ["is ref_model"]),
    ("eval-out-is-a-policy", lambda w: w.eval(R(w), "--overwrite", "--policies", f"sft={R(w)}"),
     ["run/sft is policies (", "an input"]),
    ("report-out-is-eval", lambda w: ["report", "--out", R(w), "--overwrite", "--eval", R(w)], ["is eval"]),
    ("interrupted-overwrite-latin1", lambda w: w.sft(w.interrupted, "--overwrite", "--data.path", w.bad / "latin1.jsonl"),
     ["latin1.jsonl, line 3", "not UTF-8"]),
    # ----------------------------------------------------------------- data files
    ("latin1", lambda w: w.sft(R(w), "--overwrite", "--data.path", w.bad / "latin1.jsonl"),
     ["latin1.jsonl, line 3, byte 20", "not UTF-8", "Windows-1252", "iconv"]),
    ("utf16", lambda w: w.sft(w.new, "--data.path", w.bad / "utf16.jsonl"), ["utf16.jsonl, line 1", "UTF-16"]),
    ("latin1-csv-prompts", lambda w: w.pairs(R(w), "--overwrite", "--data.path", w.bad / "latin1.csv"),
     ["latin1.csv, line 2", "not UTF-8"]),
    ("broken-json", lambda w: w.sft(R(w), "--overwrite", "--data.path", w.bad / "broken.jsonl"),
     ["broken.jsonl, line 3", "not valid JSON"]),
    ("empty-file", lambda w: w.sft(w.new, "--data.path", w.bad / "empty.jsonl"), ["empty.jsonl is empty"]),
    ("typo-in-path", lambda w: w.sft(R(w), "--overwrite", "--data.path", w.bad / "sft_tarin.jsonl"),
     ["sft_tarin.jsonl does not exist"]),
    ("unknown-format", lambda w: w.sft(w.new, "--data.path", w.bad / "data.txt"), ["data.txt has an unknown format"]),
    ("prompt-null", lambda w: w.sft(R(w), "--overwrite", "--data.path", w.bad / "null_prompt.jsonl"),
     ["null_prompt.jsonl, line 2", "column 'prompt' is null"]),
    ("no-known-columns", lambda w: w.sft(w.new, "--data.path", w.bad / "no_columns.jsonl"),
     ["no_columns.jsonl", "answer, question", "{prompt, completion}"]),
    ("rows-not-objects", lambda w: w.sft(w.new, "--data.path", w.bad / "not_objects.jsonl"),
     ["not_objects.jsonl, line 1", "expected a JSON object"]),
    ("eval-path-typo", lambda w: w.sft(R(w), "--overwrite", "--data.eval_path", w.bad / "nope.jsonl"),
     ["nope.jsonl does not exist"]),
    ("too-little-data", lambda w: w.sft(R(w), "--overwrite", "--train.batch_size", "128"),
     ["only", "training examples for train.batch_size 128"]),
    ("rm-chosen-null", lambda w: w.preference("rm", R(w), "--overwrite", "--data.path", w.bad / "null_chosen.jsonl"),
     ["null_chosen.jsonl, line 1", "column 'chosen' is null"]),
    ("dpo-no-rejected", lambda w: w.preference("dpo", w.new, "--data.path", w.bad / "no_rejected.jsonl"),
     ["no_rejected.jsonl", "missing column 'rejected'"]),
    ("dpo-chosen-number", lambda w: w.preference("dpo", w.new, "--data.path", w.bad / "number_chosen.jsonl"),
     ["number_chosen.jsonl, line 1, column 'chosen'", "expected text, got int"]),
    ("rl-prompt-null", lambda w: w.rl(R(w), "--overwrite", "--data.path", w.bad / "null_prompts.jsonl"),
     ["null_prompts.jsonl, line 10", "column 'prompt' is null"]),
    ("rl-empty-prompts", lambda w: w.rl(w.new, "--data.path", w.bad / "empty.jsonl"), ["empty.jsonl is empty"]),
    ("eval-prompts-typo", lambda w: w.eval(R(w), "--overwrite", "--eval.prompts", w.bad / "nope.jsonl"),
     ["nope.jsonl does not exist"]),
    ("sft-eval-prompts-typo", lambda w: w.sft(R(w), "--overwrite", "--eval.prompts", w.bad / "nope.jsonl"),
     ["nope.jsonl does not exist"]),
    # ----------------------------------------------------------------- model folders
    ("empty-model-folder", lambda w: w.sft(R(w), "--overwrite", "--model.path", w.bad / "empty_model"),
     ["empty_model is empty"]),
    ("no-tokenizer-files", lambda w: w.sft(w.new, "--model.path", w.bad / "no_tokenizer"),
     ["no_tokenizer has no tokenizer files", "--model.tokenizer"]),
    ("no-config", lambda w: w.sft(w.new, "--model.path", w.bad / "no_config"), ["no_config has no config.json"]),
    ("model-path-typo", lambda w: w.sft(R(w), "--overwrite", "--model.path", w.bad / "nope"), ["nope does not exist"]),
    ("model-path-is-weights", lambda w: w.sft(w.new, "--model.path", w.base / "model.safetensors"),
     ["model.safetensors is a file"]),
    ("rm-no-tokenizer", lambda w: w.preference("rm", w.new, "--model.path", w.bad / "no_tokenizer"),
     ["no tokenizer files"]),
    ("classifier-as-policy", lambda w: w.rl(R(w), "--overwrite", "--model.path", w.classifier),
     ["policy", "classifier is a sequence classifier", "--reward_model"]),
    ("classifier-as-reference", lambda w: w.preference("dpo", w.new, "--ref_model", w.classifier),
     ["reference model", "sequence classifier"]),
    ("lm-as-reward-model", lambda w: w.rl(w.new, "--reward_model", w.base), ["reward model", "has no score head"]),
    ("reward-model-typo", lambda w: w.rl(R(w), "--overwrite", "--reward_model", w.bad / "rm"),
     ["the reward model path", "rm does not exist"]),
    ("empty-dpo-model", lambda w: w.rl(w.new, "--preset", "rto", "--dpo_model", w.bad / "empty_model"),
     ["empty_model is empty"]),
    ("eval-empty-policy", lambda w: w.eval(R(w), "--overwrite", "--policies", f"a={w.bad / 'empty_model'}"),
     ["empty_model is empty"]),
    # ----------------------------------------------------------------- judges
    ("judge-raises", lambda w: w.pairs(R(w), "--overwrite", "--gold_reward", "rto_test_bad_judges:raises"),
     ["'rto_test_bad_judges:raises' raised ValueError: judge broke on purpose", "rto_test_bad_judges.py:3"]),
    ("judge-returns-none", lambda w: w.pairs(w.new, "--gold_reward", "rto_test_bad_judges:returns_none"),
     ["'rto_test_bad_judges:returns_none' returned None"]),
    ("judge-returns-strings", lambda w: w.pairs(w.new, "--gold_reward", "rto_test_bad_judges:returns_strings"),
     ["returns_strings' returned 'good' (str) for response 0"]),
    ("judge-wrong-length", lambda w: w.pairs(w.new, "--gold_reward", "rto_test_bad_judges:too_short"),
     ["too_short' returned 1 values for 16 responses"]),
    ("judge-returns-nan", lambda w: w.pairs(w.new, "--gold_reward", "rto_test_bad_judges:returns_nan"),
     ["returns_nan' returned a non-finite value, nan, for response 0"]),
    ("judge-module-missing", lambda w: w.pairs(R(w), "--overwrite", "--gold_reward", "no_such_module:f"),
     ["'gold_reward'", "cannot import module 'no_such_module'"]),
    ("judge-function-missing", lambda w: w.pairs(w.new, "--gold_reward", "rto_test_bad_judges:nope"),
     ["has no function 'nope'"]),
    ("judge-syntax-error", lambda w: w.pairs(w.new, "--gold_reward", "rto_test_broken_judges:f"),
     ["importing module 'rto_test_broken_judges' raised SyntaxError"]),
    ("fluency-not-bool", lambda w: w.eval(R(w), "--overwrite", "--eval.fluency", "rto_test_bad_judges:fluent_maybe"),
     ["fluency check 'rto_test_bad_judges:fluent_maybe' returned 'maybe'"]),
    ("sft-judge-typo", lambda w: w.sft(R(w), "--overwrite", "--eval.gold_reward", "no_such_module:f",
                                        "--eval.prompts", w.task / "prompts_eval.jsonl"),
     ["'eval.gold_reward'", "no_such_module"]),
    # ----------------------------------------------------------------- report and pipeline
    ("report-no-eval", lambda w: ["report", "--out", w.new, "--eval", w.bad / "empty_model"],
     ["empty_model/eval.json does not exist"]),
    ("report-no-curve", lambda w: ["report", "--out", R(w), "--overwrite", "--eval", w.bad / "eval_run",
                                   "--curves", f"x={w.bad / 'empty_model'}"],
     ["'curves'", "empty_model has no metrics.jsonl"]),
    ("pipeline-typo", lambda w: ["pipeline", "--config", w.recipe, "--set", "sft.data.path=/nope/sft.jsonl"],
     ["/nope/sft.jsonl does not exist"]),
    ("pipeline-nan", lambda w: ["pipeline", "--config", w.recipe, "--set", "sft.train.lr=.nan"],
     ["'train.lr'", "finite", "stage sft"]),
    ("pipeline-input-in-own-out", lambda w: ["pipeline", "--config", w.recipe, "--set",
                                             "sft.data.path='{out}/sft/metrics.jsonl'"],
     ["running sft", "--out", "run/sft holds data.path ("]),
    ("pipeline-set-not-yaml", lambda w: ["pipeline", "--config", w.recipe, "--set", "sft.train.lr=["],
     ["--set 'sft.train.lr=['", "not valid YAML"]),
    ("pipeline-set-into-a-value", lambda w: ["pipeline", "--config", w.recipe, "--set", "sft.train.max_steps.x=1"],
     ["sft.train.max_steps is a value (2)"]),
]  # fmt: skip


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly_and_changes_nothing(
    case: tuple, world: World, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    _, command, says = case
    monkeypatch.syspath_prepend(str(world.bad))  # the judges' module, as a user's PYTHONPATH
    world.new = tmp_path / "new_run"
    before = [tree_hashes(run) for run in world.guarded]
    capsys.readouterr()
    code = rto(*command(world))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error: " in err and "Traceback" not in err
    for text in says:
        assert text in err, f"{text!r} not in: {err}"
    assert [tree_hashes(run) for run in world.guarded] == before, "a failed command changed a run"
    assert not world.new.exists(), "a failed command created its output folder"


def test_resuming_a_finished_run_with_its_config_does_nothing(
    world: World, capsys: pytest.CaptureFixture
) -> None:
    before = tree_hashes(world.finished)
    config = world.finished / "config.yaml"
    assert rto("sft", "--config", config, "--out", world.finished, "--resume") == 0
    assert rto("sft", "--config", config, "--resume", "--log.progress", "true") == 0
    err = capsys.readouterr().err
    assert err.count("already holds a finished sft run with this config; nothing to do") == 2
    assert tree_hashes(world.finished) == before


def test_overwrite_replaces_a_finished_run_but_not_the_users_readme(
    world: World, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(world.finished, copy)
    (copy / "README.md").write_text("my notes\n")
    summary = json.loads((copy / "summary.json").read_text())
    (copy / "summary.json").write_text(json.dumps({**summary, "old run": True}))
    assert rto("sft", "--config", copy / "config.yaml", "--out", copy, "--overwrite") == 0
    assert (copy / "README.md").read_text() == "my notes\n"
    assert "old run" not in json.loads((copy / "summary.json").read_text())


def test_an_out_folder_that_cannot_be_written_is_refused_first(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere; emulate the check it skips
        import rto.engine.run as run

        real = run.os.access
        monkeypatch.setattr(run.os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
    try:
        for out in (locked, locked / "run"):
            assert rto(*world.sft(out)) == 2
            err = capsys.readouterr().err
            assert f"--out {out} cannot be written" in err and "read-only" in err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_the_interrupted_run_still_resumes_exactly(world: World, tmp_path: Path) -> None:
    """After every failed command of the table, the interrupted run (stopped by a full disk
    while saving step 2) resumes from step 1 and ends with the weights of a run never stopped."""
    import shutil

    from safetensors.torch import load_file

    cut = tmp_path / "cut"
    shutil.copytree(world.interrupted, cut)
    assert rto(*world.sft(cut, *CUT_SHORT, "--resume")) == 0
    assert rto(*world.sft(tmp_path / "whole", *CUT_SHORT)) == 0
    a, b = (load_file(str(p / "model.safetensors")) for p in (cut, tmp_path / "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps[:3] == [1, 2, 3]


def test_a_failed_overwrite_keeps_the_pipeline_skipping_the_stage(
    world: World, capsys: pytest.CaptureFixture
) -> None:
    """The stage's pipeline.json is part of the run: a failed rerun leaves it, so the unchanged
    recipe still finds the stage done."""
    assert rto("pipeline", "--config", world.recipe, "--set", "sft.data.path=/nope/sft.jsonl") == 2
    assert rto("pipeline", "--config", world.recipe) == 0
    assert "sft is up to date, skipped" in capsys.readouterr().err


# ------------------------------------------------------------------ failures while a model runs


def test_non_finite_weights_are_never_saved_and_skipped_steps_log_their_loss(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A model whose weights are NaN (say, saved by a run that diverged) gives a NaN loss at
    every step, so every step is skipped. Before, a run shorter than train.max_nonfinite ended
    with exit 0, saved the NaN model again and logged a loss of 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "nan_model"
    model = AutoModelForCausalLM.from_pretrained(world.base)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(world.base).save_pretrained(broken)
    out = tmp_path / "o"
    assert rto(*world.sft(out, "--model.path", broken, "--train.max_steps", "3")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "after step 3 the model's weights hold NaN or inf" in err and "not saved" in err
    assert "weights were broken when loaded: check model.path" in err
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [1, 2, 3]
    assert all(r["loss"] == "nan" for r in rows)  # the loss it had, not 0
    for step in (1, 2, 3):  # the warning counts steps as metrics.jsonl does
        assert f"step {step}: non-finite loss or gradient; update skipped ({step} in a row)" in err
    assert "step 0:" not in err


def test_a_reward_model_that_scores_nan_is_named(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    nan_rm = sequence_classifier(world.base, tmp_path / "nan_rm", fill=float("nan"))
    assert rto(*world.rl(tmp_path / "o", "--reward_model", nan_rm)) == 2
    err = capsys.readouterr().err
    assert f"the reward model ({nan_rm}) scored 8 of 8 responses as NaN or inf" in err
    assert "not the learning rate" in err and "lower train.lr" not in err


@pytest.mark.parametrize("update", ["frozen", "online"])
def test_a_dpo_model_that_gives_nan_is_named_as_frozen_or_learning(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture, update: str
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    nan_dpo = tmp_path / "nan_dpo"
    model = AutoModelForCausalLM.from_pretrained(world.base)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    model.save_pretrained(nan_dpo)
    AutoTokenizer.from_pretrained(world.base).save_pretrained(nan_dpo)
    args = world.rl(tmp_path / "o", "--preset", "rto_rloo", "--rl.rollout_batch_size", "4",
                    "--dpo_model", nan_dpo, "--rl.online_dpo.enabled", str(update == "online"))  # fmt: skip
    assert rto(*args) == 2
    err = capsys.readouterr().err
    assert (
        f"the DPO model ({nan_dpo}) gave log-probabilities of 16 of 16 responses as NaN or inf"
        in err
    )
    if update == "online":
        assert "learns online" in err and "rl.online_dpo.lr" in err and "is frozen" not in err
    else:
        assert "is frozen" in err and "not the learning rate" in err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_a_full_disk_during_a_checkpoint_says_where_and_resumes(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "o"
    steps = ("--train.max_steps", "4", "--train.save_every", "1")
    monkeypatch.setenv("RTO_FAULT", "disk_full_during_save:3")
    assert rto(*world.sft(out, *steps)) == 2
    err = capsys.readouterr().err
    assert "could not write the checkpoint of step 3: the disk is full" in err
    assert str(out / "checkpoints" / ".partial-step-3") in err
    assert f"the last complete checkpoint, {out / 'checkpoints' / 'step-2'}, is intact" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    monkeypatch.delenv("RTO_FAULT")
    assert rto(*world.sft(out, *steps, "--resume")) == 0
    assert "resumed from" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


@contextmanager
def small_disk(folder: Path, size: int) -> Iterator[Path]:
    """A real file system of `size` bytes (a tmpfs) at `folder`, for as long as the block runs."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full disk needs root and mount (for a small tmpfs)")
    folder.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)  # fmt: skip
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield folder
    finally:  # lazily when a failed run still holds a file open there
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.parametrize("writing", ["checkpoint", "final model"])
def test_a_real_full_disk_says_where_and_resumes(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture, writing: str
) -> None:
    """A real full disk, not the simulated fault: torch's zip writer reports it as a
    RuntimeError ("unexpected pos") and safetensors as a SafetensorError, neither an OSError; the
    user still gets the message the fault gives. The disk holds one checkpoint (sized from the
    interrupted run's, of the same model) and a bit: the checkpoint of step 2, or the final model
    after the checkpoint of step 1, does not fit."""
    one = sum(p.stat().st_size for p in (world.interrupted / "checkpoints" / "step-1").iterdir())
    size = int(one * (1.5 if writing == "checkpoint" else 1.2)) + 64 * 1024
    steps = ("--train.max_steps", "3" if writing == "checkpoint" else "2", "--train.save_every", "1",
             "--train.keep_checkpoints", "1")  # fmt: skip
    with small_disk(tmp_path / "disk", size) as disk:
        out = disk / "o"
        capsys.readouterr()
        assert rto(*world.sft(out, *steps)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "RuntimeError" not in err and "SafetensorError" not in err
        step1 = out / "checkpoints" / "step-1"
        if writing == "checkpoint":
            assert "could not write the checkpoint of step 2: the disk is full" in err
            assert f"({out / 'checkpoints' / '.partial-step-2'})" in err
            assert f"the last complete checkpoint, {step1}, is intact" in err
        else:
            assert f"the disk is full while writing into {out}; free space there" in err
            assert f"--resume: it continues from {step1}, the last complete checkpoint" in err
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]  # no partial one
        moved = tmp_path / "o"  # space freed: the run, moved to a disk with room, resumes
        shutil.copytree(out, moved)
    assert rto(*world.sft(moved, *steps, "--resume")) == 0
    assert f"resumed from {moved / 'checkpoints' / 'step-1'} (step 1)" in capsys.readouterr().err
    assert json.loads((moved / "summary.json").read_text())["steps"] == int(steps[1])


@pytest.mark.parametrize(
    ("failure", "said"),
    [
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"),
         "out of memory while loading the causal language model from"),
        (PermissionError(13, "Permission denied", "model.safetensors"),
         "Permission denied (model.safetensors); check the permissions of that path"),
        (ValueError("this checkpoint is broken"),
         "could not load the causal language model from"),
    ],
)  # fmt: skip
def test_a_model_that_fails_to_load_says_why_in_the_causes_words(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
    failure: Exception, said: str,
) -> None:  # fmt: skip
    """Running out of memory, or a file the user may not read, is not reported as a bad model;
    every loading error keeps its cause's words, and the command writes nothing."""
    import transformers

    def fail(*args: object, **kwargs: object) -> None:
        raise failure

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    out = tmp_path / "o"
    assert rto(*world.sft(out)) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err
    assert str(failure).split(":")[-1].strip() in err or isinstance(failure, PermissionError)
    if not isinstance(failure, ValueError):
        assert "could not load" not in err  # not blamed on the model
    assert not out.exists()


def test_judges_are_named_with_what_they_returned() -> None:
    """The checks behind the judge rows of the table, on values the CLI cannot easily produce."""
    from rto.errors import RtoError
    from rto.tasks import call_judge

    def judge(values):
        return lambda prompts, responses: values

    assert call_judge(judge([1, 0.5]), ["p", "q"], ["a", "b"], "m:f", "gold") == [1.0, 0.5]
    assert call_judge(judge([True, 0]), ["p", "q"], ["a", "b"], "m:f", "fluency") == [True, False]
    for values, says in ((iter([1.0]), "returned 1 values for 2"), ({"a": 1, "b": 2}, "(dict)"),
                         ([None, 1.0], "returned None (NoneType) for response 0"),
                         ([1.0, float("inf")], "returned a non-finite value, inf, for response 1")):  # fmt: skip
        with pytest.raises(RtoError, match=r"gold reward 'm:f' .*" + re.escape(says)):
            call_judge(judge(values), ["p", "q"], ["a", "b"], "m:f", "gold")
