"""The documentation cannot drift from the code: generated reference pages, links, numbers and error lines.

- docs/reference/*.md equal what `spinlm.reference` generates from the config dataclasses and the CLI parser
  (regenerate with `python -m spinlm.reference`);
- README.md is a landing page of at most 120 lines; every link in it and in docs/ resolves (files and
  `#anchors`); every page is in mkdocs.yml's nav and every nav entry exists;
- every measured figure in the README is on a results page (the headline table: on the page its row links);
- the `spinlm: error: ...` lines on the troubleshooting page are messages the code can print;
- no internal issue numbers and no old command or package names;
- docs/results/plots.py draws every plot the results pages show.

`make docs` (mkdocs build --strict) checks links and anchors again on the built site.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import unicodedata
from pathlib import Path

import pytest
import yaml

from spinlm.config import config_reference
from spinlm.errors import SpinError
from spinlm.reference import REGENERATE, stale_pages

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
RESULTS = DOCS / "results"
MARKDOWN = sorted(DOCS.rglob("*.md"))
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def _prose(text: str) -> str:
    """`text` without fenced code blocks and inline code (links and numbers there are examples, not claims)."""
    text = re.sub(r"(?ms)^```.*?^```", "", text)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug of a heading (what mkdocs uses for `page.md#anchor`)."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    """Every anchor of a page: heading slugs and explicit `{#id}`s."""
    out = set()
    for line in re.sub(r"(?ms)^```.*?^```", "", page.read_text(encoding="utf-8")).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*$", line)
        if heading:
            explicit = re.search(r"\{#([^}]+)\}\s*$", heading.group(1))
            out.add(explicit.group(1) if explicit else _slug(heading.group(1)))
    return out


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+://", target):
            assert target.startswith("https://"), f"{page.name}: link {target} is not https"
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no such anchor)")
    return broken


# --- generated reference pages -----------------------------------------------------------------------------


def test_reference_pages_match_the_code() -> None:
    stale = stale_pages(DOCS / "reference")
    names = ", ".join(str(p.relative_to(REPO)) for p in stale)
    assert not stale, f"{names} differ from the code: regenerate with `{REGENERATE}`"


def test_config_reference_lists_every_key_spinlm_config_prints() -> None:
    page = (DOCS / "reference" / "config.md").read_text(encoding="utf-8")
    keys = [row[0] for row in config_reference()]
    assert "data.subset" in keys
    for key in keys:
        assert f"### `{key}` {{#{key}}}" in page, key


def test_cli_reference_holds_every_subcommand_help() -> None:
    from spinlm.cli import build_parser

    page = (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")
    for command in ("run", "generate", "train", "eval", "report", "config", "demo"):
        assert f"## `spinlm {command}`\n\n```text\nusage: spinlm {command} " in page
    assert build_parser().prog == "spinlm"


# --- README and links --------------------------------------------------------------------------------------


def test_readme_is_a_short_landing_page() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 120, f"README.md has {len(lines)} lines; keep it a landing page (<= 120)"
    text = "\n".join(lines)
    for needed in (
        "make demo",
        "make test",
        "pip install -e .",
        "spinlm demo --model smollm2",
        "## Results",
    ):
        assert needed in text


@pytest.mark.parametrize("page", [README, *MARKDOWN], ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves(page: Path) -> None:
    assert not _broken_links(page), f"{page.relative_to(REPO)}: broken links {_broken_links(page)}"


def test_links_that_do_not_resolve_are_found(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title here\n\n## Second `part`\n", encoding="utf-8")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#second-part) [bad](a.md#nope) [gone](c.md) `[code](x.md)` ![img](a.md)", encoding="utf-8"
    )
    assert _broken_links(page) == ["a.md#nope (no such anchor)", "c.md (no such file)"]


def test_every_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))

    def entries(node: object) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [e for item in node for e in entries(item)]
        if isinstance(node, dict):
            return [e for value in node.values() for e in entries(value)]
        return []

    nav = entries(config["nav"])
    pages = {str(p.relative_to(DOCS)) for p in MARKDOWN if not p.is_relative_to(DOCS / "bench")}  # data
    assert sorted(set(nav) - pages) == [], "nav entries without a page"
    assert sorted(pages - set(nav)) == [], "pages missing from the nav"
    assert len(nav) == len(set(nav))


# --- examples: every recipe snippet and `spinlm` command in the docs is valid --------------------------------

BASE = {"model": {"name_or_path": "sft_model"}, "data": {"path": "sft.jsonl"}}


def _blocks(language: str) -> list[tuple[Path, str]]:
    found = []
    for page in [README, *MARKDOWN]:
        text = page.read_text(encoding="utf-8")
        found += [(page, block) for block in re.findall(rf"(?ms)^```{language}\n(.*?)^```", text)]
    return found


def _validate(data: dict) -> None:
    from spinlm.config import SpinConfig, _deep_update, from_dict

    merged = json.loads(json.dumps(BASE))
    _deep_update(merged, data)
    from_dict(SpinConfig, merged)


def test_every_yaml_example_is_a_valid_recipe() -> None:
    blocks = _blocks("yaml")
    assert len(blocks) >= 5
    for page, block in blocks:
        try:
            _validate(yaml.safe_load(block))
        except SpinError as e:
            pytest.fail(f"{page.relative_to(REPO)}: {e}\n{block}")


def test_every_spinlm_command_in_the_docs_parses_and_its_overrides_validate() -> None:
    from spinlm.cli import build_parser
    from spinlm.config import apply_overrides

    commands = []
    for page, block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("spinlm "):
                commands.append((page, line))
    assert len(commands) >= 10
    for page, line in commands:
        try:
            args = build_parser().parse_args(shlex.split(line)[1:])
        except SystemExit:
            pytest.fail(f"{page.relative_to(REPO)}: `{line}` does not parse")
        overrides = getattr(args, "overrides", []) if args.command != "config" else []
        try:
            _validate(apply_overrides({}, overrides))
        except SpinError as e:
            pytest.fail(f"{page.relative_to(REPO)}: `{line}`: {e}")


# --- numbers -----------------------------------------------------------------------------------------------


def _results_text() -> str:
    return " ".join(p.read_text(encoding="utf-8") for p in RESULTS.glob("*.md")).replace("\n", " ")


def test_readme_headline_numbers_are_on_the_pages_they_link() -> None:
    text = README.read_text(encoding="utf-8")
    rows = [line for line in text.split("## Results", 1)[1].splitlines() if line.startswith("| ")]
    linked = 0
    for row in rows:
        target = LINK.search(row)
        if target is None:
            continue
        page = (REPO / target.group(1)).read_text(encoding="utf-8")
        cells = row.split("|")
        for number in NUMBER.findall(cells[2]):
            assert number in page, f"README's '{number}' is not on {target.group(1)}"
        linked += 1
    assert linked >= 5


def test_every_measured_figure_in_the_readme_is_on_a_results_page() -> None:
    unit = r"(?:min|s|h|GB|MB|tokens/s|pairs/s|%|×)(?![\w/])"
    figures = re.findall(rf"{NUMBER.pattern}\s?{unit}", _prose(README.read_text(encoding="utf-8")))
    assert figures, "the README quotes no measured figure?"
    results = re.sub(r"\*\*", "", _results_text())
    for figure in figures:
        assert figure in results, f"README's '{figure}' is on no results page"


def test_no_internal_issue_numbers_and_no_old_names() -> None:
    old = re.compile(
        r"(?<![\w-])spin (?:run|demo|generate|train|eval|config|report)\b|\bimport spin\b|python -m spin\b"
        r"|pip install \"?spin(?![\w-])|\bissues? \d+|the issue's",
        re.IGNORECASE,
    )
    for page in [README, *MARKDOWN]:
        hits = old.findall(page.read_text(encoding="utf-8"))
        assert not hits, f"{page.relative_to(REPO)}: {hits}"


# --- troubleshooting ---------------------------------------------------------------------------------------


def _template(node: ast.expr | None) -> str | None:
    """A regex for a message built by a str or f-string literal; values become `.+?`. None otherwise."""

    def literal(text: str) -> str:
        return re.escape(re.sub(r"\s+", " ", text))

    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return literal(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(
            literal(v.value) if isinstance(v, ast.Constant) and isinstance(v.value, str) else ".+?"
            for v in node.values
        )
    return None


def _error_patterns() -> list[re.Pattern[str]]:
    """Every `SpinError(message, hint=...)` the package raises, as the one line the CLI prints."""
    patterns = []
    for path in sorted((REPO / "src" / "spinlm").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (
                isinstance(node, ast.Call) and getattr(node.func, "id", None) == "SpinError" and node.args
            ):
                continue
            message = _template(node.args[0])
            hint_node = next((k.value for k in node.keywords if k.arg == "hint"), None)
            if message is None:
                continue
            hint = "" if hint_node is None else rf" \({_template(hint_node) or '.+?'}\)"
            patterns.append(re.compile(message + hint))
    return patterns


def test_troubleshooting_quotes_errors_the_code_prints() -> None:
    page = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    quoted = [
        line.removeprefix("spinlm: error: ")
        for line in page.splitlines()
        if line.startswith("spinlm: error: ")
    ]
    assert len(quoted) >= 25
    patterns = _error_patterns()
    for line in quoted:
        assert any(p.fullmatch(line) for p in patterns), f"no SpinError in src/spinlm prints: {line}"
    assert not any(p.fullmatch("spinlm fixed everything by itself") for p in patterns)


# --- plots -------------------------------------------------------------------------------------------------


def test_plot_script_draws_every_plot_the_results_pages_show(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("docs_plots", RESULTS / "plots.py")
    assert spec is not None and spec.loader is not None
    plots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plots)
    plots.main(["--out", str(tmp_path)])
    drawn = {p.name for p in tmp_path.glob("*.png")}
    shown = set(re.findall(r"!\[[^\]]*\]\(img/([\w-]+\.png)\)", _results_text()))
    assert shown and shown <= drawn
    assert drawn == {p.name for p in (RESULTS / "img").glob("*.png")}
