"""Configs: YAML + command line, refused before any work with the key named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from rto.cli import build_parser, main
from rto.config import core
from rto.config.stages import RLConfig, SFTConfig
from rto.errors import ConfigError


def test_yaml_then_cli_precedence(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "out: x\nmodel: {path: m}\ndata: {path: d.jsonl}\ntrain: {lr: 0.001, batch_size: 32}\n"
    )
    cfg = core.build(
        SFTConfig, file_values=core.load_yaml(f), file_name=str(f), cli_values={"train.lr": "2e-4"}
    )
    assert cfg.train.lr == 2e-4  # command line wins
    assert cfg.train.batch_size == 32  # from the file
    assert cfg.train.adam_beta2 == 0.95  # default (paper)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"trian": {"lr": 1}}, "unknown config key 'trian'"),
        ({"train": {"lrr": 1}}, "Did you mean 'lr'"),
        ({"train": {"lr": "fast"}}, "config key 'train.lr' must be a number"),
        ({"train": {"batch_size": 2.5}}, "'train.batch_size' must be an integer"),
        ({"train": {"lr": -1.0}}, "'train.lr' = -1.0 is out of range"),
        (
            {"train": {"warmup_ratio": 1.5}},
            "'train.warmup_ratio' = 1.5 is out of range; it must be <= 1.0",
        ),
        (
            {"train": {"schedule": "step"}},
            "'train.schedule' = 'step' is not allowed; choose one of",
        ),
        ({"log": {"progress": "maybe"}}, "'log.progress' must be true or false"),
        ({"train": {"batch_size": 4, "micro_batch_size": 8}}, "must not exceed"),
        ({"model": {"path": ""}}, "config key 'model.path' is required"),
    ],
)
def test_bad_values_are_refused_with_the_key(values: dict, message: str, tmp_path: Path) -> None:
    base = {"out": str(tmp_path), "model": {"path": "m"}, "data": {"path": "d.jsonl"}}
    merged = yaml.safe_load(yaml.safe_dump(base))
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k].update(v)
        else:
            merged[k] = v
    with pytest.raises(ConfigError, match=re.escape(message)):
        core.build(SFTConfig, file_values=merged, file_name="c.yaml")


def test_cli_refuses_unknown_option_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["sft", "--out", str(tmp_path / "o"), "--train.lrate", "1e-3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown option --train.lrate" in err and "--train.lr" in err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_cli_wrong_type_names_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        [
            "sft",
            "--out",
            str(tmp_path / "o"),
            "--model.path",
            "m",
            "--data.path",
            "d.jsonl",
            "--train.epochs",
            "two",
        ]
    )
    assert code == 2
    assert "config key 'train.epochs' must be a number, got 'two'" in capsys.readouterr().err


def test_help_lists_every_option_with_type_and_default() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    text = sub.choices["sft"].format_help()
    for key, *_ in core.iter_leaves(SFTConfig):
        assert f"--{key}" in text, key
    assert "[float, default: 0.95]" in text  # adam_beta2 with its type and default
    assert "paper: 3% warm-up" in text


@pytest.mark.parametrize(
    ("stage", "unread"),
    [
        ("eval", ["--model.path", "--model.tokenizer", "--data.path", "--data.max_length",
                  "--data.eval_fraction", "--log.report_to", "--model.gradient_checkpointing"]),
        ("pairs", ["--data.max_length", "--data.eval_path", "--data.max_eval_rows",
                   "--model.gradient_checkpointing", "--log.report_to"]),
        ("rl", ["--data.max_length", "--data.eval_path", "--data.eval_fraction",
                "--data.max_eval_rows", "--log.tensorboard", "--log.wandb"]),
        ("report", ["--seed"]),
    ],
)  # fmt: skip
def test_a_stage_offers_no_option_it_does_not_read(stage: str, unread: list[str]) -> None:
    """What `rto eval --help` once listed and nothing read (the policies come from `policies`,
    only the prompts' rendering of `data`), and the like in the other stages."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    flags = {s for a in sub.choices[stage]._actions for s in a.option_strings}
    assert not flags & set(unread)
    assert "--data.max_prompt_length" in flags or stage == "report"


def test_top_level_help_lists_stages(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    for stage in ("task", "sft"):
        assert stage in out


def test_a_gguf_file_is_accepted_as_the_model_path_or_as_a_full_gguf_path(tmp_path) -> None:
    from rto.config.sections import ModelSection
    from rto.errors import ConfigError

    direct = ModelSection(path=str(tmp_path / "m.gguf"))
    direct.check()
    assert (direct.path, direct.gguf_file) == (str(tmp_path), "m.gguf")
    full = ModelSection(gguf_file=str(tmp_path / "m.gguf"))
    full.check()
    assert (full.path, full.gguf_file) == (str(tmp_path), "m.gguf")
    named = ModelSection(path=str(tmp_path), gguf_file="m.gguf")
    named.check()
    assert (named.path, named.gguf_file) == (str(tmp_path), "m.gguf")
    with pytest.raises(ConfigError, match="outside 'model.path'"):
        ModelSection(path="elsewhere", gguf_file=str(tmp_path / "m.gguf")).check()


@pytest.mark.parametrize(
    ("old", "value", "new"),
    [
        ("rl.dpo_reward_scale", "0.1", "rl.dpo_reward.scale"),
        ("rl.kl_coef", "0.2", "rl.kl.coef"),
        ("rl.token_reward_update", "online", "rl.online_dpo.enabled"),
        ("rl.token_reward_fn_clip", "0.5", "rl.token_reward_fn.clip"),
        ("rl.tis_cap", "3", "rl.sampler.tis_cap"),
        ("log.tensorboard", "true", "log.report_to"),
        ("log.wandb_project", "mine", "log.project"),
    ],
)
def test_a_key_of_an_earlier_version_is_refused_naming_the_new_one(
    old: str, value: str, new: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """No silent aliasing: an old key, in a config file, on the command line or in a pipeline's
    --set, stops the command with one line that names the key to use instead."""
    head, leaf = old.split(".")
    f = tmp_path / "config.yaml"
    f.write_text(f"{head}:\n  {leaf}: {value}\n")
    with pytest.raises(ConfigError) as caught:
        core.build(RLConfig, file_values=core.load_yaml(f), file_name=str(f), cli_values={})
    assert str(caught.value) == f"config key '{old}' (in {f}) was renamed: use '{new}'" + (
        " (true for online, false for frozen)" if leaf == "token_reward_update" else
        " (add tensorboard to the list)" if leaf == "tensorboard" else ""
    )  # fmt: skip
    assert main(["rl", f"--{old}", value, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"option '--{old}' was renamed: use '--{new}'" in err[0]
    assert main(["pipeline", "--config", "sentiment_quick", "--check", "--out", str(tmp_path / "p"),
                 "--set", f"rl_rto.{old}={value}"]) == 2  # fmt: skip
    assert f"config key '{old}'" in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_the_committed_config_reference_is_current(tmp_path: Path) -> None:
    """docs/config.md is what `rto reference` writes from the options' metadata: a new or
    changed option (help, default, range, choices, paper symbol) fails here until it is rerun."""
    from rto.cli import main
    from rto.commands import STAGES
    from rto.config import core
    from rto.reference import config_reference

    committed = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    text = config_reference()
    assert committed.read_text() == text, "docs/config.md is stale: run `rto reference`"
    for stage in STAGES:  # every option of every stage is there
        for key, *_ in core.iter_leaves(stage.config_class()):
            assert f"| `{key}` |" in text, (stage.name, key)
    assert main(["reference", "--check", "--out", str(committed)]) == 0
    stale = tmp_path / "config.md"
    stale.write_text(text.replace("Supervised fine-tuning", "Fine-tuning"))
    assert main(["reference", "--check", "--out", str(stale)]) == 1
    assert main(["reference", "--out", str(stale)]) == 0 and stale.read_text() == text
