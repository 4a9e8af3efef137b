"""Do two runs of the same pipeline hold the same results, to the last digit?

    python tools/same_results.py RUN_A RUN_B

Walks every file of RUN_A (an `rto demo` / `rto pipeline` output folder, or one stage's) and
compares it with the same file in RUN_B:

    *.safetensors      byte for byte (else the tensors that differ are named)
    *.json, *.jsonl    parsed and compared value for value, every number exactly, after
                       dropping what measures the run rather than its results: wall-clock
                       times and speeds (keys under .../time/, *seconds*, *per_second*, eta), the
                       machine's description (environment), the run folder's own path, and
                       the pipeline's stage fingerprints (hashes of configs that hold that path)
    everything else    byte for byte, with RUN_A's path replaced by RUN_B's (config.yaml,
                       tokenizer files, results.md, generations ...); plots (*.png) are
                       skipped: they draw the same numbers, but their bytes depend on
                       matplotlib's build
A file in one run and not the other is a difference. Prints each difference and exits 1 if
there is any, 0 if the runs agree. Used to check that a refactor changes no number: run
`rto demo --out A` before and `rto demo --out B` after, on the same machine, then this.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

VOLATILE = re.compile(
    r"((^|/)time/|seconds|per_second|^eta$|^environment$|^started|^finished|^fingerprint$)"
)
SKIPPED_SUFFIXES = {".png"}


def _clean(value: Any, renames: list[tuple[str, str]]) -> Any:
    """`value` without volatile keys, each (old, new) path in `renames` replaced in strings."""
    if isinstance(value, dict):
        return {k: _clean(v, renames) for k, v in value.items() if not VOLATILE.search(str(k))}
    if isinstance(value, list):
        return [_clean(v, renames) for v in value]
    if isinstance(value, str):
        for old, new in renames:
            value = value.replace(old, new)
    return value


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    if type(a) is not type(b):
        return f"{where or 'value'}: {a!r} vs {b!r}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}{k}: only in {'B' if k not in a else 'A'}"
            found = _first_difference(a[k], b[k], f"{where}{k}.")
            if found:
                return found
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where or 'list'}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{where}[{i}].")
            if found:
                return found
        return None
    if a != a and b != b:  # NaN == NaN here: the same result
        return None
    return None if a == b else f"{where.rstrip('.') or 'value'}: {a!r} vs {b!r}"


def _parse(path: Path) -> Any:
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def _tensors_that_differ(a: Path, b: Path) -> list[str]:
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    names = sorted(set(ta) | set(tb))
    return [n for n in names if n not in ta or n not in tb or not torch.equal(ta[n], tb[n])]


def compare(run_a: Path, run_b: Path, renames: list[tuple[str, str]] | None = None) -> list[str]:
    """Every difference between the two runs' results, as lines to print. `renames`: more
    (path in A, path in B) pairs read as the same (two checkouts of rto, say)."""
    renames = [(str(run_a.resolve()), str(run_b.resolve())), (str(run_a), str(run_b)),
               *(renames or [])]  # fmt: skip
    files_a = {p.relative_to(run_a) for p in run_a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(run_b) for p in run_b.rglob("*") if p.is_file()}
    diffs = [f"{rel}: only in {run_a}" for rel in sorted(files_a - files_b)]
    diffs += [f"{rel}: only in {run_b}" for rel in sorted(files_b - files_a)]
    for rel in sorted(files_a & files_b):
        a, b = run_a / rel, run_b / rel
        if rel.suffix in SKIPPED_SUFFIXES:
            continue
        if rel.suffix == ".safetensors":
            if a.read_bytes() != b.read_bytes():
                diffs.append(f"{rel}: weights differ ({', '.join(_tensors_that_differ(a, b)[:5])})")
            continue
        if rel.suffix in (".json", ".jsonl"):
            try:
                va, vb = _parse(a), _parse(b)
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
            else:
                found = _first_difference(_clean(va, renames), _clean(vb, []))
                if found:
                    diffs.append(f"{rel}: {found}")
                continue
        da, db = a.read_bytes(), b.read_bytes()
        for old, new in renames:
            da = da.replace(old.encode(), new.encode())
        if da != db:
            diffs.append(f"{rel}: contents differ")
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                    help="Read path OLD in RUN_A's files as NEW (e.g. the two runs' rto checkouts, "
                    "which pipeline.yaml records as the recipe's folder).")  # fmt: skip
    args = ap.parse_args(argv)
    renames = [tuple(r.split("=", 1)) for r in args.rename if "=" in r]
    for run in (args.run_a, args.run_b):
        if not run.is_dir():
            print(f"same_results: {run} is not a folder", file=sys.stderr)
            return 2
    diffs = compare(args.run_a, args.run_b, renames)
    compared = sum(1 for p in args.run_a.rglob("*") if p.is_file())
    for line in diffs:
        print(line)
    verdict = "the same results" if not diffs else f"{len(diffs)} differences"
    print(f"same_results: {compared} files of {args.run_a} against {args.run_b}: {verdict}")
    return 1 if diffs else 0


if __name__ == "__main__":
    raise SystemExit(main())
