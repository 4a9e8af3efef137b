"""A card (README.md) in every output folder: what was made, from what, with which settings,
the summary numbers, and how to load it. Written from the folder's own config.yaml and
summary.json, so it never says anything the run did not record. The YAML header is the Hugging
Face hub's model-card metadata, so a folder pushed with --push_to_hub shows it as its card."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from rto.files import read_json, write_atomic

CARD_FILE = "README.md"
WHAT = {
    "sft": "a causal LM fine-tuned on demonstrations (supervised fine-tuning)",
    "rm": "a Bradley-Terry reward model (sequence classifier with one output)",
    "dpo": "a policy trained with a direct preference loss",
    "rl": "a policy trained with online RL and token-level rewards",
    "pairs": "preference pairs sampled from a policy and labelled by a gold reward",
    "eval": "an evaluation of policies on held-out prompts",
    "report": "tables and plots of an evaluation",
    "task": "a built-in task: data and a base model",
}
MODEL_STAGES = {"sft", "dpo", "rl"}
# settings worth a line on the card, by stage (dotted config keys)
SETTINGS = {
    "sft": ["train.lr", "train.batch_size", "train.epochs", "train.max_steps", "data.max_length"],
    "rm": ["train.lr", "train.batch_size", "train.epochs", "train.max_steps", "data.max_length"],
    "dpo": ["loss", "beta", "alpha", "train.lr", "train.batch_size", "train.epochs", "train.max_steps"],
    "rl": ["preset", "rl.dpo_reward.scale", "rl.kl.coef", "rl.score.coef", "rl.advantage_estimator",
           "rl.rollout_batch_size", "train.lr", "rl.critic_lr", "train.max_steps", "generate.max_new_tokens"],
    "pairs": ["gold_reward", "num_samples", "annotator", "temperature", "generate.max_new_tokens"],
}  # fmt: skip
INPUTS = ["model.path", "model.gguf_file", "ref_model", "reward_model", "reward_fn", "dpo_model",
          "token_reward_fn", "critic_model", "data.path", "data.eval_path", "policies", "eval.prompts"]  # fmt: skip


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _is_hub_id(value: Any) -> bool:
    return (
        isinstance(value, str)
        and value.count("/") == 1
        and not value.startswith((".", "/", "~"))
        and not Path(value).exists()
    )


def _number(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _results(summary: dict[str, Any]) -> list[str]:
    keys = [
        k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    keys = [k for k in keys if "/" in k or k in ("steps", "iterations", "samples", "pairs_train")]
    keys = [k for k in keys if "/time/" not in k and not k.startswith("time/")]
    return [f"| {k} | {_number(summary[k])} |" for k in sorted(keys)]


def card_text(
    out: Path, config: dict[str, Any], summary: dict[str, Any], name: str | None = None
) -> str:
    """The card's markdown; `name` is how users load it (a hub repo id), default the folder."""
    stage = summary.get("stage", "?")
    base = _get(config, "model.path")
    tags = list(dict.fromkeys(["rto", "rlhf", stage, summary.get("preset") or stage]))
    meta: dict[str, Any] = {"library_name": "transformers", "tags": tags}
    if _is_hub_id(base):
        meta["base_model"] = base
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", ""]
    lines += [f"# {out.name}", "", f"Made by `rto {stage}`: {WHAT.get(stage, stage)}.", ""]
    inputs = [(k, _get(config, k)) for k in INPUTS if _get(config, k)]
    if inputs:
        lines += ["## Inputs", ""] + [f"- `{k}`: {v}" for k, v in inputs] + [""]
    settings = [
        (k, _get(config, k)) for k in SETTINGS.get(stage, []) if _get(config, k) is not None
    ]
    if settings:
        lines += ["## Key settings", ""] + [f"- `{k}`: {v}" for k, v in settings]
        lines += ["", "Every setting is in `config.yaml`.", ""]
    data = summary.get("data")
    if isinstance(data, dict):
        lines += ["## Data", ""]
        for split, report in data.items():
            if isinstance(report, dict) and "kept" in report:
                lines.append(f"- {split}: {report.get('source', '')}: kept {report['kept']} of "
                             f"{report.get('rows', '?')} rows")  # fmt: skip
        lines.append("")
    results = _results(summary)
    if results:
        lines += ["## Results", "", "| metric | value |", "|---|---|", *results, ""]
        lines += ["All numbers: `summary.json`; the training curves: `metrics.jsonl`.", ""]
    lines += _usage(out, stage, name or str(out))
    lines += ["## Reproduce", "", "```bash", f"rto {stage} --config config.yaml --out NEW_FOLDER",
              "```", ""]  # fmt: skip
    env = summary.get("environment") or {}
    if env:
        pkgs = env.get("packages", {})
        lines.append(
            f"Made on {env.get('cpu', '?')} ({', '.join(env.get('gpus', [])) or 'no GPU'}), "
            f"Python {env.get('python', '?')}, rto {pkgs.get('rto')}, torch {pkgs.get('torch')}, "
            f"transformers {pkgs.get('transformers')}."
        )
    return "\n".join(lines).rstrip() + "\n"


def _usage(out: Path, stage: str, name: str) -> list[str]:
    if (out / "adapter_config.json").is_file():
        code = ["from peft import AutoPeftModelForCausalLM",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{name}")']  # fmt: skip
    elif stage in MODEL_STAGES:
        code = ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'model = AutoModelForCausalLM.from_pretrained("{name}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{name}")']  # fmt: skip
    elif stage == "rm":
        code = ["from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                f'model = AutoModelForSequenceClassification.from_pretrained("{name}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
                "# the score of a prompt + reply is the output at its last token"]  # fmt: skip
    else:
        return []
    return ["## Use", "", "```python", *code, "```", ""]


def written_by_rto(path: Path) -> bool:
    """A README.md rto wrote (so it may be rewritten), not one of the user's."""
    try:
        return "Made by `rto " in path.read_text(encoding="utf-8", errors="replace")[:4000]
    except OSError:
        return False


def write_card(out: str | Path, name: str | None = None) -> None:
    """Write OUT/README.md from OUT/config.yaml and OUT/summary.json (whichever exist); a
    README.md that rto did not write is left alone."""
    out = Path(out)
    if (out / CARD_FILE).exists() and not written_by_rto(out / CARD_FILE):
        return
    summary = read_json(out / "summary.json") if (out / "summary.json").is_file() else {}
    config_path = out / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    write_atomic(out / CARD_FILE, card_text(out, config or {}, summary, name))


def push_to_hub(out: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload a finished output folder (model, tokenizer, config, summary, card; not checkpoints)
    to the hub repo `repo_id`; the card's usage lines name the repo. Returns the repo's URL."""
    from huggingface_hub import HfApi

    from rto.errors import RtoError

    out = Path(out)
    write_card(out, name=repo_id)
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(out),
            ignore_patterns=["checkpoints/*", "tensorboard/*", ".*"],
            commit_message=f"rto: upload {out.name}",
        )
    except Exception as exc:  # network, login, permissions: say what and how to retry
        raise RtoError(
            f"the run in {out} finished, but uploading it to the hub repo {repo_id} failed: "
            f"{type(exc).__name__}: {exc}. Log in with `huggingface-cli login` (or set HF_TOKEN) "
            f"and retry with `huggingface-cli upload {repo_id} {out} --exclude 'checkpoints/*'`"
        ) from None
    return f"https://huggingface.co/{repo_id}"
