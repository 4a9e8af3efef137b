"""`rto <stage> [--config FILE] [--key value ...]`: one subcommand per pipeline stage.

Each stage's options are generated from its config dataclass, so `rto <stage> --help` lists
every key with its type, default and help, and a YAML file uses the same dotted names as
nested sections. Imports of torch and transformers happen only when a stage runs.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import sys
from typing import Any

from rto import __version__
from rto.commands import STAGES, TASK_STAGES, Stage, find_stage, run_stage
from rto.config import core
from rto.errors import ConfigError, RtoError


def _help_text(tp: Any, default: Any, meta: dict[str, Any]) -> str:
    parts = [f"[{core.type_name(tp)}, default: {default!r}]"]
    if meta.get("choices"):
        parts.append("{" + ", ".join(map(str, meta["choices"])) + "}")
    text = meta.get("help", "")
    if meta.get("paper"):
        text += f" (paper: {meta['paper']})"
    parts.append(text)
    return " ".join(parts).replace("%", "%%")


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML file of config values (command-line options override it).",
    )
    groups: dict[str, Any] = {}
    for key, tp, default, meta in core.iter_leaves(cls):
        section_name = key.split(".")[0] if "." in key else ""
        group = groups.get(section_name)
        if group is None:
            title = f"{section_name} options" if section_name else "options"
            group = groups[section_name] = parser.add_argument_group(title)
        kwargs: dict[str, Any] = {
            "dest": f"cfg:{key}",
            "default": argparse.SUPPRESS,
            "metavar": "V",
        }
        if tp is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        group.add_argument(f"--{key}", help=_help_text(tp, default, meta), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rto",
        description="RLHF with token-level rewards: SFT -> reward model -> DPO -> RTO/PPO -> evaluation.",
        epilog="Run `rto <stage> --help` for a stage's options. Docs: README.md",
    )
    parser.add_argument("--version", action="version", version=f"rto {__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="<stage>")
    task = sub.add_parser("task", help="Write a built-in task's data and base model (offline).")
    task_sub = task.add_subparsers(dest="task_name", metavar="<task>")
    for name, stage in TASK_STAGES.items():
        p = task_sub.add_parser(name, help=stage.help, description=stage.help)
        add_config_options(p, stage.config_class())
    for stage in STAGES:
        p = sub.add_parser(stage.name, help=stage.help, description=stage.help)
        add_config_options(p, stage.config_class())
    pipe = sub.add_parser(
        "pipeline",
        help="Run the stages a recipe lists, skipping those already done.",
        description=PIPELINE_HELP,
    )
    pipe.add_argument(
        "--config", required=True, metavar="FILE", help="Recipe YAML, or a built-in recipe name."
    )
    _add_pipeline_options(pipe)
    demo = sub.add_parser(
        "demo",
        help="The whole pipeline on the built-in sentiment task (offline, CPU).",
        description=DEMO_HELP,
    )
    demo.add_argument(
        "--full",
        action="store_true",
        help="Run the larger recipe (sentiment_full) instead of the quick one.",
    )
    _add_pipeline_options(demo)
    from rto.study import add_parser as add_study_parser

    add_study_parser(sub)
    ref = sub.add_parser(
        "reference",
        help="Write the config reference (every option of every stage) as Markdown.",
        description="Write docs/config.md from the options' own metadata (types, defaults, "
        "ranges, choices, paper symbols).",
    )
    ref.add_argument("--out", metavar="FILE", default="docs/config.md",
                     help="Where to write it (default: docs/config.md; - for standard output).")  # fmt: skip
    ref.add_argument("--check", action="store_true",
                     help="Write nothing; exit 1 if FILE differs from what the code gives.")  # fmt: skip
    return parser


def run_reference(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rto.files import write_atomic
    from rto.reference import config_reference

    text = config_reference()
    if args.out == "-":
        print(text, end="")
        return 0
    path = Path(args.out)
    if args.check:
        current = path.read_text() if path.is_file() else ""
        if current == text:
            print(f"[rto] {path} is current")
            return 0
        print(f"[rto] {path} is stale: run `rto reference --out {path}`", file=sys.stderr)
        return 1
    write_atomic(path, text)
    print(f"[rto] wrote {path}")
    return 0


PIPELINE_HELP = (
    "Run the stages a recipe lists, in order, each stage's outputs feeding the next. A stage whose output is complete "
    "and was made with the same config and inputs is skipped; a changed stage reruns with every stage that reads from "
    "it; an interrupted stage resumes from its last checkpoint."
)
DEMO_HELP = (
    "The pipeline on the built-in sentiment task: task -> sft -> pairs -> rm -> dpo -> rl (ppo, rto) -> eval -> "
    "report. Writes results.json, results.md and plots into OUT/report. About 5 minutes on 2 CPU cores (--full: 11 to 14)."
)


def _add_pipeline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", metavar="DIR", help="Root folder of the run (default: the recipe's `out`)."
    )
    p.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="Rerun STAGE and what reads from it.",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE.KEY=VALUE",
        help="Override one config value.",
    )
    p.add_argument(
        "--generate.backend",
        dest="generate_backend",
        choices=["hf", "vllm"],
        default=None,
        help="Generate with this backend in every stage that samples (pairs, rl, eval, held-out samples); "
        "the demo then writes into runs/demo_vllm.",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="Check every stage's config (keys, types, ranges, placeholders) and print the plan; "
        "load no model, read no data, write nothing.",
    )


def run_pipeline(args: argparse.Namespace) -> int:
    from rto import pipeline

    if args.stage == "demo":
        recipe = "sentiment_full" if args.full else "sentiment_quick"
        out = args.out or ("runs/demo_full" if args.full else "runs/demo")
        if args.generate_backend == "vllm" and not args.out:
            out += "_vllm"
    else:
        recipe, out = args.config, args.out
    backend = args.generate_backend
    if args.check:
        planned, resolved = pipeline.plan(recipe, out=out, overrides=args.set, backend=backend)
        print(
            f"[rto] {resolved['recipe']}: {len(planned)} stages, every config checked; would write into {resolved['out']}"
        )
        for p in planned:
            after = f" (after {', '.join(p.deps)})" if p.deps else ""
            preset = getattr(p.config, "preset", None)
            print(
                f"  {p.name}: rto {('task ' + p.task) if p.task else p.kind}"
                f"{f' --preset {preset}' if preset else ''}{after}"
            )
        return 0
    pipeline.run(recipe, out=out, force=args.force, overrides=args.set, backend=backend)
    if args.stage == "demo":
        from pathlib import Path

        report = Path(out) / "report"
        print(
            f"\n[rto] demo finished: {report / 'results.md'}, {report / 'results.json'}, plots in {report}",
            flush=True,
        )
    return 0


def _suggest_unknown(unknown: list[str], cls: type) -> ConfigError:
    keys = [k for k, *_ in core.iter_leaves(cls)]
    flag = next((u for u in unknown if u.startswith("--")), unknown[0])
    name = flag.lstrip("-").split("=")[0]
    renamed = core.renamed_key(cls, name)
    if renamed is not None:  # an option of an earlier version: the one to use instead
        return core.renamed_error(name, renamed[0], renamed[1], dashes="--")
    close = difflib.get_close_matches(name, keys, n=3)
    hint = f" Did you mean {', '.join('--' + c for c in close)}?" if close else ""
    return ConfigError(f"unknown option {flag}.{hint} See the list with --help.")


def load_config(stage: Stage, args: argparse.Namespace, unknown: list[str]) -> Any:
    cls = stage.config_class()
    if unknown:
        raise _suggest_unknown(unknown, cls)
    cli_values = {k[len("cfg:") :]: v for k, v in vars(args).items() if k.startswith("cfg:")}
    file_values = core.load_yaml(args.config) if args.config else None
    return core.build(cls, file_values=file_values, file_name=args.config, cli_values=cli_values)


# What the file system refuses (not a bug in rto): said in one line, without a traceback.
FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def file_system_error(exc: OSError, cfg: Any = None) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        out = getattr(cfg, "out", None)
        return disk_full_error(where or (f" while writing into {out}" if out else ""), cfg)
    return f"{exc.strerror}{where}; check the permissions of that path, or choose another one"


def disk_full_error(where: str, cfg: Any = None) -> str:
    """A full disk while a stage wrote into its --out (`cfg.out`): what to do, and for a training
    stage the checkpoint that --resume continues from."""
    if cfg is None or not hasattr(cfg, "resume"):
        return (
            f"the disk is full{where}; free space, then rerun the command (a training stage with "
            "--resume continues from its last complete checkpoint)"
        )
    from pathlib import Path

    from rto.engine.checkpoint import Checkpoints

    done = Checkpoints(Path(cfg.out), None, 1).complete()
    start = (
        f"it continues from {done[-1][1]}, the last complete checkpoint, which is intact"
        if done
        else "no checkpoint was written yet, so it starts from the beginning"
    )
    return f"the disk is full{where}; free space there, then rerun the same command with --resume: {start}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if not args.stage:
        parser.print_help()
        return 0
    cfg = None  # the stage's config, once loaded: where a full disk was written to
    try:
        if args.stage == "reference":
            if unknown:
                raise ConfigError(f"unknown option {unknown[0]}; see rto reference --help")
            return run_reference(args)
        if args.stage == "study":
            if unknown:
                raise ConfigError(f"unknown option {unknown[0]}; see rto study --help")
            from rto.study import main as study_main

            return study_main(args)
        if args.stage in ("pipeline", "demo"):
            if unknown:
                raise ConfigError(f"unknown option {unknown[0]}; see rto {args.stage} --help")
            return run_pipeline(args)
        if args.stage == "task" and not args.task_name:
            parser.parse_args(["task", "--help"])
        task = args.task_name if args.stage == "task" else None
        cfg = load_config(find_stage(args.stage, task), args, unknown)
        run_stage(args.stage, cfg, task)
        return 0
    except RtoError as exc:
        print(f"rto {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in FILE_SYSTEM_ERRORS:
            raise
        print(f"rto {args.stage}: error: {file_system_error(exc, cfg)}", file=sys.stderr)
        return 2
    except Exception as exc:  # torch.save and safetensors report a full disk without OSError
        from rto.engine.checkpoint import disk_full

        if not disk_full(exc):  # by its text only: any other error keeps its traceback
            raise
        out = getattr(cfg, "out", None) or getattr(args, "out", None)
        where = f" while writing into {out}" if out else ""
        print(f"rto {args.stage}: error: {disk_full_error(where, cfg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"rto {args.stage}: interrupted; continue with the same command and --resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
