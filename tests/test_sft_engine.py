"""SFT and the shared engine: it learns, it saves a plain Hugging Face model, a killed run resumes
to exactly the weights of an uninterrupted one, and non-finite losses stop the run clearly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rto.engine.schedule import lr_at

from conftest import rto, rto_ok, rto_subprocess, sft_args


def test_lr_schedule_warmup_cosine_floor() -> None:
    lrs = [lr_at(s, 100, 1.0, kind="cosine", warmup_ratio=0.03, min_ratio=0.1) for s in range(100)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # 3 warm-up steps
    assert lrs[3] == pytest.approx(1.0) and lrs[-1] == pytest.approx(
        0.1, abs=1e-3
    )  # peak, then the 10% floor
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # monotone decay
    assert lr_at(50, 100, 2.0, kind="constant", warmup_ratio=0.0, min_ratio=0.1) == 2.0


def test_sft_learns_and_reports(sft_model: Path) -> None:
    s = json.loads((sft_model / "summary.json").read_text())
    assert s["eval/perplexity"] < 0.25 * s["eval/unigram_perplexity"]
    assert (
        s["sample/fluency_rate"] >= 0.6
    )  # tiny model, 3 short epochs; the quick demo setting reaches >= 0.9
    assert -0.5 < s["sample/gold_reward_mean"] < 0.5
    # where it was made, so that results from two machines can be told apart
    assert s["environment"]["cpu_capability"] and s["environment"]["packages"]["transformers"]
    lines = [json.loads(x) for x in (sft_model / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, s["steps"] + 1))
    assert (sft_model / "config.yaml").exists() and (sft_model / "samples.jsonl").exists()


def test_saved_model_loads_with_plain_transformers(sft_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sft_model)
    tok = AutoTokenizer.from_pretrained(sft_model)
    ids = tok("the food was", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]


def test_rerun_with_saved_config_repeats_the_run(sft_model: Path, tmp_path: Path) -> None:
    import yaml

    cfg = yaml.safe_load((sft_model / "config.yaml").read_text())
    assert cfg["resume"] is False and cfg["train"]["adam_beta2"] == 0.95
    code = rto("sft", "--config", sft_model / "config.yaml")  # same out: refused, the run is kept
    assert code == 2


def test_existing_run_is_not_overwritten(
    sft_model: Path, tiny_task: Path, capsys: pytest.CaptureFixture
) -> None:
    before = (sft_model / "model.safetensors").read_bytes()
    base = tiny_task / "base_model"  # not sft_model itself: an --out that is model.path is refused
    code = rto("sft", "--out", sft_model, "--model.path", base, "--data.path", "x.jsonl")
    assert code == 2
    assert "already holds a finished sft run; pass --overwrite" in capsys.readouterr().err
    assert (sft_model / "model.safetensors").read_bytes() == before


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("fault", ["kill_after_step:7", "kill_during_save:8"])
def test_killed_run_resumes_to_identical_weights(
    tiny_task: Path, tmp_path: Path, fault: str
) -> None:
    common = ["--train.max_steps", "12", "--train.save_every", "4", "--data.max_rows", "400"]
    full = rto_subprocess(*sft_args(tiny_task, tmp_path / "full", *common))
    assert full.returncode == 0, full.stderr
    killed = rto_subprocess(
        *sft_args(tiny_task, tmp_path / "cut", *common), env={"RTO_FAULT": fault}
    )
    assert killed.returncode == -9  # SIGKILL, like kill -9
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert "step-4" in ckpts and not (tmp_path / "cut" / "summary.json").exists()
    if fault.startswith("kill_during_save"):
        assert (
            ".partial-step-8" in ckpts and "step-8" not in ckpts
        )  # the half-written one is not "latest"
    resumed = rto_subprocess(*sft_args(tiny_task, tmp_path / "cut", *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run ended with different weights"
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps[:12] == list(range(1, 13))  # each step logged once, none lost


def test_non_finite_losses_stop_with_a_clear_error(
    tiny_task: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = rto(*sft_args(tiny_task, tmp_path / "nan", "--train.lr", "1e30", "--train.max_steps", "30",
                         "--train.max_nonfinite", "3", "--train.grad_clip", "0", "--data.max_rows", "300"))  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "3 steps in a row" in err and "non-finite" in err and "lower train.lr" in err


def test_sft_on_chat_messages(tiny_task: Path, chat_task: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (tiny_task / "sft_train.jsonl").read_text().splitlines()][
        :200
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r["completion"].strip()},
                    ]
                }
            )
            + "\n"
            for r in rows
        )
    )
    out = tmp_path / "chat_sft"
    rto_ok("sft", "--out", out, "--model.path", chat_task / "base_model", "--data.path", data,
           "--train.batch_size", "16", "--train.micro_batch_size", "8", "--train.max_steps", "6",
           "--train.lr", "3e-3", "--log.progress", "false", "--data.max_length", "80",
           "--data.max_prompt_length", "32")  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 6 and math.isfinite(s["train/loss"]) and s["data"]["train"]["kept"] == 190


def test_gradient_checkpointing_gives_the_same_weights(tiny_task: Path, tmp_path: Path) -> None:
    common = ["--train.max_steps", "3", "--data.max_rows", "200"]
    rto_ok(*sft_args(tiny_task, tmp_path / "plain", *common))
    rto_ok(*sft_args(tiny_task, tmp_path / "gc", *common, "--model.gradient_checkpointing", "true"))
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "gc")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_trackers_get_the_numbers_of_metrics_jsonl_with_namespaced_tags(
    tiny_task: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TensorBoard (real) and wandb (a stand-in module recording its calls) through accelerate's
    tracker classes: every metrics.jsonl number at its step, tags namespaced (train/loss), the
    run's config as flat hyper-parameters."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fake = tmp_path / "fake_wandb"
    (fake / "wandb").mkdir(parents=True)
    (fake / "wandb" / "__init__.py").write_text(
        "calls = []\n"
        "class Config:\n"
        "    def update(self, values, allow_val_change=False): calls.append(('config', values))\n"
        "config = Config()\n"
        "class Run:\n"
        "    def log(self, values, step=None, **kw): calls.append(('log', step, values))\n"
        "    def finish(self): calls.append(('finish',))\n"
        "def init(**kwargs):\n"
        "    calls.append(('init', kwargs))\n"
        "    return Run()\n"
    )
    monkeypatch.syspath_prepend(str(fake))
    out = tmp_path / "tb"
    rto_ok(*sft_args(tiny_task, out, "--train.max_steps", "3", "--data.max_rows", "200",
                     "--log.report_to", "tensorboard,wandb", "--log.run_name", "mine",
                     "--log.project", "proj"))  # fmt: skip
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert len(losses) == 3

    events = EventAccumulator(str(out / "tensorboard" / "mine"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [step for step, _ in losses]
    assert [e.value for e in scalars] == pytest.approx([loss for _, loss in losses], rel=1e-6)
    assert "loss" not in events.Tags()["scalars"]

    import wandb

    init = next(c[1] for c in wandb.calls if c[0] == "init")
    assert init["project"] == "proj" and init["name"] == "mine"
    logged = [
        (c[1], c[2]["train/loss"]) for c in wandb.calls if c[0] == "log" and "train/loss" in c[2]
    ]
    assert logged == losses  # the very numbers metrics.jsonl holds
    config = next(c[1] for c in wandb.calls if c[0] == "config")
    assert config["train.max_steps"] == 3 and config["model.path"].endswith("base_model")
    assert wandb.calls[-1] == ("finish",)


def test_unknown_or_missing_trackers_are_refused_before_any_work(
    tiny_task: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import importlib.util

    code = rto(*sft_args(tiny_task, tmp_path / "a", "--log.report_to", "tensorbord"))
    assert code == 2 and "'log.report_to' has 'tensorbord'; choose from" in capsys.readouterr().err
    if importlib.util.find_spec("mlflow") is None:
        code = rto(*sft_args(tiny_task, tmp_path / "b", "--log.report_to", "mlflow"))
        err = capsys.readouterr().err
        assert (
            code == 2
            and "asks for mlflow, which is not installed: pip install 'rto[mlflow]'" in err
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_too_little_data_is_said_before_any_model_is_loaded(
    tiny_task: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The size check comes first: with a model folder that could not even be loaded, the user
    still hears about the data (loading a real model first can take minutes)."""
    import shutil

    model = tmp_path / "tokenizer_only"
    shutil.copytree(tiny_task / "base_model", model)
    (model / "model.safetensors").unlink()
    code = rto(*sft_args(tiny_task, tmp_path / "o", "--model.path", model, "--data.max_rows", "30",
                         "--train.batch_size", "64"))  # fmt: skip
    assert code == 2
    assert "only 30 training examples for train.batch_size 64" in capsys.readouterr().err
