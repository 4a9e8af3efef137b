"""What a newcomer reads first stays true: the README's set-up commands are the ones CI runs,
its demo table is the one written from the committed demo results, and every example config in
examples/ passes the pipeline's check (`rto pipeline --config FILE --check`)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from conftest import rto

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
INSTALL = "python3 -m venv .venv && . .venv/bin/activate && ./install.sh && rto demo"
TESTS = ". .venv/bin/activate && python -m pytest"


def load_script(name: str):  # type: ignore[no-untyped-def]
    """A tools/ script as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_a_front_door_with_the_two_commands() -> None:
    assert len(README.splitlines()) <= 300
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert INSTALL in blocks[0] and TESTS in blocks[1]  # the first two commands a newcomer meets
    # CI runs what the README says: its install, then (beside it) only more extras, then its
    # test command
    ci = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    first = ci.index("./install.sh")
    tests = ci.index("python -m pytest -q", first)
    assert all(line.startswith("./install.sh ") for line in ci[first + 1 : tests] if line)


def test_the_readme_demo_table_is_the_committed_results(capsys: pytest.CaptureFixture) -> None:
    demo = load_script("demo_results")
    assert demo.main(["--check"]) == 0, capsys.readouterr().out
    table = demo.table(demo.json.loads(demo.SAVED.read_text())["methods"])
    assert table in README and table.count("\n") >= 5  # header, rule, sft, dpo, ppo, rto


def test_a_stale_demo_table_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo = load_script("demo_results")
    saved = demo.json.loads(demo.SAVED.read_text())
    saved["methods"]["rto"]["gold_reward_mean"] += (
        0.001  # what a code change that moves the demo does
    )
    page = tmp_path / "README.md"
    page.write_text(README)
    monkeypatch.setattr(demo, "PAGES", [page])
    assert demo.check(saved) == [str(page)]
    demo.write(saved)
    assert demo.check(saved) == []


@pytest.mark.parametrize(
    "example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_example_config_passes_the_check(
    example: Path, capsys: pytest.CaptureFixture
) -> None:
    assert rto("pipeline", "--config", example, "--check") == 0
    out = capsys.readouterr().out
    assert "every config checked" in out and " rto rl --preset rto" in out
    assert f"examples/{example.name}" in README  # the README points to it


def test_a_bad_example_is_refused_naming_its_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (ROOT / "examples" / "smollm2_cpu.yaml")
        .read_text()
        .replace(
            "max_new_tokens: 128, batch_size: 32}\nstages",
            "max_new_tokens: 128, batch_size: 0}\nstages",
        )
    )
    assert rto("pipeline", "--config", bad, "--check") == 2
    err = capsys.readouterr().err
    assert "generate.batch_size" in err and "stage ppo" in err
    assert not (tmp_path / "runs").exists()


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return out


@pytest.mark.parametrize(
    "page",
    [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_relative_link_reaches_a_file_and_heading(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{page.name}: " + "; ".join(broken)
