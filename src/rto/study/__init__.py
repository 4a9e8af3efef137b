"""`rto study SPEC.yaml`: a pre-registered, multi-seed comparison run from one file. spec.py reads
and checks the file; runs.py runs one `rto pipeline` per seed and reads the evaluations;
claims.py reads each claim per seed and decides its rule; report.py writes the page."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from rto.errors import ConfigError, DataError
from rto.files import read_json, replace_marked, write_atomic, write_json

HELP = """Run a comparison declared in one study file: every arm over every seed (and condition),
each seed's shared stages trained once, then one evaluation and the claims read by the rules
registered in the file. Finished runs are reused (a rerun resumes). Writes RESULTS/NAME.md,
NAME.json and the reward-KL plots; --readme also the README block between the file's markers.
The study file's format: docs/guide.md, "Compare methods fairly"."""


def add_parser(sub: Any) -> None:
    from rto.study.claims import REFERENCE

    p = sub.add_parser("study", help="Run a pre-registered multi-seed comparison from one file.",
                       description=HELP, epilog=REFERENCE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("spec", metavar="SPEC", help="The study file (YAML).")
    p.add_argument("--workers", type=int, default=1,
                   help="Seeds run side by side, one thread each (default 1: one seed at a time, every core).")  # fmt: skip
    p.add_argument("--runs", metavar="DIR", help="Where the runs go (default: runs/study/NAME).")
    p.add_argument("--results", metavar="DIR",
                   help="Where the report goes (default: results/ beside the study file).")  # fmt: skip
    p.add_argument("--report-only", action="store_true",
                   help="Rewrite the report from its json (claims read again; no run).")  # fmt: skip
    p.add_argument("--check", action="store_true",
                   help="Check the study file and print what it would run; run nothing.")  # fmt: skip
    p.add_argument("--readme", action="store_true",
                   help="Also write the README block named by the file's 'readme' key.")  # fmt: skip


def relative(path: Path) -> str:
    """A path as a page shows it: relative to the working directory where it lies below it (no
    machine paths on a page), else its name."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.name


def main(args: argparse.Namespace) -> int:
    from rto.study import claims, report, runs
    from rto.study import spec as spec_mod

    spec = spec_mod.load(args.spec)
    results_dir = Path(args.results) if args.results else spec.path.parent / "results"
    runs_dir = Path(args.runs) if args.runs else Path("runs") / "study" / spec.name
    saved = results_dir / f"{spec.name}.json"
    if args.readme and not spec.readme:
        raise ConfigError(f"--readme: study file {spec.path} has no 'readme' key ({{file, start, end}})")  # fmt: skip
    if not args.report_only:  # every stage's config checked before any run
        recipe, _ = runs.seed_recipe(spec, spec.seeds[0], runs_dir / f"seed{spec.seeds[0]}")
        runs.check_recipe(spec, recipe)
    if args.check:
        trained = [n for n, s in recipe["stages"].items() if s.get("stage") not in ("task", "eval")]
        print(f"[rto] study {spec.name}: {len(spec.all_arms())} arms x {len(spec.seeds)} seeds"
              f"{f' x {len(spec.conditions)} conditions' if len(spec.conditions) > 1 else ''}; "
              f"{len(trained)} stages to train per seed; {len(spec.claims)} claims; the file is valid")  # fmt: skip
        return 0
    if args.report_only:
        if not saved.is_file():
            raise DataError(f"--report-only: {saved} does not exist; run `rto study {args.spec}` first")  # fmt: skip
        previous = read_json(saved)
        results = {k: previous[k] for k in ("per_seed", "curves", "recorded", "environment", "cpu_hours",
                                             "command", "notes") if k in previous}  # fmt: skip
    else:
        rows = runs.run_all(spec, runs_dir, args.workers)
        failed = [r["seed"] for r in rows if r["exit"]]
        if failed:
            logs = ", ".join(str(runs.seed_folder(runs_dir, s) / "log.txt") for s in failed)
            raise DataError(f"study {spec.name}: seed(s) {', '.join(map(str, failed))} failed (logs: {logs}); "
                            "fix the cause and rerun the same command: finished runs are reused")  # fmt: skip
        results = runs.collect(spec, runs_dir)
        if saved.is_file():  # readings written into the results by hand stay
            previous = read_json(saved)
            for key in ("recorded", "notes"):
                if key in previous:
                    results[key] = previous[key]
        results["command"] = f"rto study {relative(spec.path)}" + f" --workers {args.workers}" * (
            args.workers > 1
        )
    if not any(results["per_seed"].values()):
        raise DataError(f"study {spec.name}: no finished evaluation under {runs_dir}")
    results["spec"] = relative(spec.path)
    results["seeds"] = spec.seeds
    reader = claims.Reader(results, spec.all_frontiers(), spec.seeds)
    results["claims"] = claims.judge(spec.claims, spec.amendments, reader)
    results_dir.mkdir(parents=True, exist_ok=True)
    files = report.plots(results, spec.all_frontiers(), results_dir, spec.name)
    write_json(saved, claims.jsonable(results))
    write_atomic(results_dir / f"{spec.name}.md", report.markdown(spec, results, files))
    if args.readme:
        readme = spec.path.parent / spec.readme["file"]
        page = os.path.relpath(results_dir / f"{spec.name}.md", readme.parent)
        block = report.readme_block(spec, results, Path(page).as_posix())
        write_atomic(readme, replace_marked(readme.read_text(), spec.readme["start"],
                                                  spec.readme["end"], block, str(readme)))  # fmt: skip
    for c in results["claims"]:
        print(f"{report.VERDICT_TEXT[c['verdict']].strip('*')}: {c['claim']}")
    print(f"[rto] study {spec.name}: wrote {results_dir / (spec.name + '.md')}")
    return 0
