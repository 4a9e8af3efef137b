"""Where does RTO's token reward pay? PPO against RTO at equal KL as responses get longer, as the
reward model gets noisier, and with the gold reward itself as the sentence reward (issue 14).

    python benchmarks/token_reward_study.py --workers 2     # the study, 3 seeds
    python benchmarks/token_reward_study.py --smoke         # every part at toy size (minutes)
    python benchmarks/token_reward_study.py --report-only   # re-aggregate finished runs
    python benchmarks/token_reward_study.py --estimate      # time shortened stages, predict the
                                                            # study's wall time on this machine

The design (units, conditions, the claims and the rules that decide them, written down before any
run of the study) is in token_reward_design.py, the report in token_reward_report.py and the
time estimate in token_reward_estimate.py; this script runs the units and calls them.

Units in one folder reuse its finished stages (same configs, same fingerprints) and run one after
another; folders run side by side (--workers), each pipeline in its own process with one thread,
so an interrupted study resumes where it stopped and a rerun repeats the numbers on the same
machine type. The task is the same for every seed (seed 0); the seed changes all trained on it.

The reward-model-share arm with the DPO model on the same share (unit rm_same), beside the
study's arm (the DPO model on all pairs) from its report, in a report of its own:

    python benchmarks/token_reward_study.py --units short rm_same --stem token_reward_rm_share \
        --earlier benchmarks/results/token_reward_study.json --workers 3

The report says whether the earlier report's all-pairs runs are repeated to the last digit (then
its rm_data arm stands for today's code; add `rm_data` to --units to run that arm again here).

Outputs: benchmarks/results/token_reward_study.{json,md} (or STEM.{json,md}) and three plots
beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import token_reward_estimate
import token_reward_report as report
from bench_common import run_pipeline_timed
from token_reward_design import FULL, SMOKE, UNITS, Size, jobs, recipe_for, unit_folder

ROOT = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- running the units


def run_chain(
    chain: list[tuple[int, str]], runs: Path, size: Size
) -> list[tuple[int, str, int, float]]:
    """Run a chain's units in order; each invocation's wall and CPU seconds are added as a line
    to time_UNIT.jsonl in its folder (a resumed or extended unit has several; their sum is the
    unit's cost, to check the estimate against)."""
    done = []
    for seed, unit in chain:
        folder = unit_folder(runs, seed, unit)
        load = os.getloadavg()[0]
        code, secs, cpu = run_pipeline_timed(recipe_for(unit, seed, folder, size),
                                             folder / f"recipe_{unit}.yaml", folder / f"log_{unit}.txt")  # fmt: skip
        with open(folder / f"time_{unit}.jsonl", "a") as times:
            times.write(json.dumps({"exit": code, "wall_s": round(secs, 1), "cpu_s": round(cpu, 1),
                                    "load_average_before": load, "load_average_after": os.getloadavg()[0],
                                    "ended": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")  # fmt: skip
        done.append((seed, unit, code, secs))
        print(f"seed {seed} {unit}: exit {code} after {secs / 60:.1f} min, {cpu / 60:.1f} min of "
              f"CPU (log: {folder / f'log_{unit}.txt'})", flush=True)  # fmt: skip
        if code:
            break  # the next unit in this folder would redo the failed stage's work
    return done


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", help="Seeds (default 0 1 2; --smoke: 0).")
    ap.add_argument(
        "--workers", type=int, default=2, help="Pipelines run at once (one thread each)."
    )
    ap.add_argument(
        "--units",
        nargs="+",
        default=list(UNITS),
        choices=UNITS,
        help="Run only these units (the report reads whatever has finished).",
    )
    ap.add_argument("--runs", default=None, help="Where the runs go (kept for resuming).")
    ap.add_argument("--results", default=None, help="Where the report goes.")
    ap.add_argument("--report-only", action="store_true", help="Only aggregate finished runs.")
    ap.add_argument(
        "--stem",
        default="token_reward_study",
        help="Name of the report's files (token_reward_rm_share for the reward-model-share units).",
    )
    ap.add_argument(
        "--earlier",
        default=None,
        help="An earlier report (json) whose reward-model-share arm is shown beside, labelled.",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="Toy sizes, one seed, runs and report under benchmarks/_runs/token_reward_smoke.",
    )
    ap.add_argument(
        "--estimate",
        action="store_true",
        help="Time shortened stages of every kind and predict the study's wall time.",
    )
    args = ap.parse_args(argv)  # fmt: skip
    size = SMOKE if args.smoke else FULL
    name = "token_reward_smoke" if args.smoke else "token_reward"
    runs = Path(args.runs or ROOT / "_runs" / name)
    results = Path(args.results or (runs / "report" if args.smoke else ROOT / "results"))
    seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    if args.estimate:
        token_reward_estimate.main(runs.parent / "token_reward_estimate", seeds, args.workers,
                                   results / "token_reward_study_estimate.json")  # fmt: skip
        return
    units = list(args.units)
    minutes = None
    if not args.report_only:
        began = time.time()
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            done = [d for chain in pool.map(lambda c: run_chain(c, runs, size), jobs(seeds, units))
                    for d in chain]  # fmt: skip
        minutes = round((time.time() - began) / 60, 1)
        if any(code for *_, code, _ in done):
            raise SystemExit("some units failed; rerun the same command to resume them")
    command = "python benchmarks/token_reward_study.py" + (
        " --smoke" if args.smoke else " --seeds " + " ".join(map(str, seeds))
    )
    if set(units) != set(UNITS):
        command += " --units " + " ".join(units)
    if args.stem != "token_reward_study":
        command += f" --stem {args.stem}"
    earlier = Path(args.earlier) if args.earlier else None
    if earlier:
        command += f" --earlier {args.earlier}"
    res = report.build(runs, seeds, command, minutes, earlier)
    report.write(res, results, args.stem)
    if args.stem == report.RM_SHARE_STEM and results.resolve() == (ROOT / "results").resolve():
        report.README.write_text(report.readme_with(res, report.README.read_text()))
    for c in res["claims"]:
        print(f"{c['verdict'].upper()}: {c['claim']} -- {c['evidence']}")


if __name__ == "__main__":
    main()
