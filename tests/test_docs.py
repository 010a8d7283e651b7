"""The documentation stays true: links resolve, flags exist, the demo table is the trainer's, the README is short.

Fast (no training): the only subprocesses are one `--help` per command-line entry point and per repository
script whose flags the pages show.

Rules for `--flags` (README.md and docs/*.md):
* a command that runs `dihn_dist.X` (`python -m dihn_dist.X ...`, `torchrun ... -m dihn_dist.X ...`, or an
  inline code span starting with the bare name, e.g. `export --append-to OLD`): every flag after it must be
  in `python -m dihn_dist.X --help`;
* a command that runs a repository script (`launch/NAME.sh`, `tests/.../NAME.py`): every flag after it must
  be in the script's `--help` (a launch script that execs a Python script: that script's), or, for a shell
  script that parses its own arguments, appear in the script's text;
* any other flag (prose, or before the command, like torchrun's own): in at least one entry point's `--help`,
  or in EXTERNAL_FLAGS (torchrun, Slurm, TensorBoard), or in SCRIPT_FLAGS (checked against that script).
"""
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README] + sorted((REPO / "docs").glob("*.md"))
CLIS = ("train", "prepare", "evaluate", "retrieve", "export", "convergence")
README_MAX_LINES = 220

# Flags of other programs the pages may name in prose or before the command they belong to.
EXTERNAL_FLAGS = {
    # torchrun
    "--nproc_per_node", "--nnodes", "--standalone", "--rdzv_backend", "--rdzv_endpoint",
    # sbatch / srun / squeue / scancel
    "--nodes", "--gpus-per-node", "--time", "--partition", "--account", "--signal", "--requeue",
    "--open-mode", "--chdir", "--cpus-per-task", "--kill-on-bad-exit", "--me", "--batch",
    # tensorboard
    "--logdir",
}
# Flags of repository scripts that the pages name in prose, each checked against its script's --help.
SCRIPT_FLAGS = {
    "--skip-generate": "tests/bench/bench_scale.py",
    "--skip-prepare": "tests/bench/bench_scale.py",
    "--fresh-run": "tests/bench/bench_scale.py",
    "--threads": "tests/bench/bench_serving.py",
}

FENCE = re.compile(r"^(```|~~~)")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CLI_MODULE = re.compile(r"(?<![\w.])dihn_dist\.(" + "|".join(CLIS) + r")(?=\s|$)")
CLI_BARE = re.compile(r"^(" + "|".join(CLIS) + r")(?=\s)")
SCRIPT = re.compile(r"(?<![\w/.])((?:launch|tests)/[\w/]+\.(?:sh|py))(?=\s|$)")
COMMAND_SEPARATOR = re.compile(r"\s(?:&&|\|\||\|)\s|;\s")


def flags_in(text: str):
    return [flag.rstrip("-") for flag in FLAG.findall(text)]


def help_flags(argv) -> set:
    env = dict(os.environ, COLUMNS="1000", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(argv)} failed: {done.stderr[-2000:]}"
    return set(flags_in(done.stdout))


@pytest.fixture(scope="module")
def cli_flags():
    """Each entry point's --help, run once."""
    return {name: help_flags([sys.executable, "-m", f"dihn_dist.{name}", "--help"]) for name in CLIS}


class ScriptFlags:
    """A repository script's flags, each script read once: a Python script with argparse: its --help; a launch
    script that execs a Python script or passes "$@" to `python -m dihn_dist.X`: that one's; otherwise the
    flags written in the script's text. Nothing else is run (some scripts start services)."""

    def __init__(self, cli_flags):
        self.cli_flags = cli_flags
        self.cache = {}

    def __call__(self, script: str) -> set:
        if script not in self.cache:
            path = REPO / script
            assert path.is_file(), f"{script} does not exist"
            text = path.read_text().replace("\\\n", " ")
            target = re.search(r"exec python \S*?(tests/[\w/]+\.py)", text)
            passes_on = re.search(r"-m dihn_dist\.(" + "|".join(CLIS) + r")\b[^\n]*\"\$@\"", text)
            if path.suffix == ".py" and "argparse" in text:
                self.cache[script] = help_flags([sys.executable, str(path), "--help"])
            elif target:
                self.cache[script] = self(target.group(1))
            elif passes_on:
                self.cache[script] = set(flags_in(text)) | self.cli_flags[passes_on.group(1)]
            else:
                self.cache[script] = set(flags_in(text))
        return self.cache[script]


@pytest.fixture(scope="module")
def script_flags(cli_flags):
    return ScriptFlags(cli_flags)


def split_page(text: str):
    """(prose with fenced blocks blanked, [code lines of fenced and indented blocks])."""
    prose, code, fenced, language = [], [], False, ""
    pending = ""
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            language = line.strip()[3:].strip() if fenced else ""
            prose.append("")
            continue
        if fenced or (line.startswith("    ") and not line.lstrip().startswith(("*", "-", "|"))):
            if fenced and language not in ("", "bash", "sh", "console", "text"):
                prose.append("")
                continue
            pending += line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
            else:
                code.append(pending)
                pending = ""
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), code


def code_spans(prose: str):
    return [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]


def commands(line: str):
    """The shell commands of one code line, the comment of each given as its own prose."""
    line = re.sub(r"^\$\s+", "", line.strip())
    comment = ""
    match = re.search(r"(^|\s)#\s", line)
    if match:
        line, comment = line[:match.start()], line[match.end():]
    return [part for part in COMMAND_SEPARATOR.split(line) if part.strip()], comment


def github_slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    prose, _ = split_page(path.read_text())
    seen, result = {}, set()
    for line in prose.splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = github_slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_resolve(page):
    prose, _ = split_page(page.read_text())
    prose = re.sub(r"`[^`]+`", "", prose)
    bad = []
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (page.parent / file_part).resolve() if file_part else page
        if REPO not in path.parents and path != REPO:
            bad.append(f"{target}: outside the repository")
        elif not path.exists():
            bad.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            bad.append(f"{target}: no heading #{anchor} in {path.relative_to(REPO)}")
    assert not bad, f"{page.relative_to(REPO)}: broken links:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_flags_exist(page, cli_flags, script_flags):
    every_cli_flag = set().union(*cli_flags.values())
    bad = []

    def check_prose(text: str, where: str):
        for flag in flags_in(text):
            if flag in every_cli_flag or flag in EXTERNAL_FLAGS:
                continue
            if flag in SCRIPT_FLAGS:
                if flag not in script_flags(SCRIPT_FLAGS[flag]):
                    bad.append(f"{flag} ({where}): not in {SCRIPT_FLAGS[flag]} --help")
                continue
            bad.append(f"{flag} ({where}): no entry point's --help has it, nor the allow-lists")

    def check_code(line: str):
        parts, comment = commands(line)
        check_prose(comment, f"comment in: {line}")
        for part in parts:
            text = part.strip()
            cli = CLI_MODULE.search(text) or CLI_BARE.search(text)
            script = SCRIPT.search(text)
            owner = min((m for m in (cli, script) if m), key=lambda m: m.start(), default=None)
            if owner is None:
                check_prose(text, text)
                continue
            check_prose(text[:owner.start()], text)
            if owner is cli:
                known, name = cli_flags[cli.group(1)], f"python -m dihn_dist.{cli.group(1)} --help"
            else:
                known, name = None, f"{script.group(1)} --help"
            for flag in flags_in(text[owner.end():]):
                if known is None:
                    known = script_flags(script.group(1))
                if flag not in known:
                    bad.append(f"{flag} ({text}): not in {name}")

    prose, code = split_page(page.read_text())
    for line in code:
        check_code(line)
    for span in code_spans(prose):
        check_code(span)
    check_prose(re.sub(r"`[^`]+`", "", prose), "prose")
    assert not bad, f"{page.relative_to(REPO)}: unknown flags:\n" + "\n".join(bad)


def _print_table():
    try:
        from dihn_dist.training.reporting import print_table
    except ImportError:
        from dihn_dist.reporting import print_table
    return print_table


def _printed(results) -> list:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _print_table()(results)
    return out.getvalue().splitlines()


def _result(values, time_s):
    keys = ("map_all", "map_topk", "map_original_queries", "map_incremental_queries")
    return {"row": dict(zip(keys, values)), "train_time_s": time_s}


def readme_demo_table() -> list:
    text = README.read_text()
    section = text.split("## What the demo prints", 1)
    assert len(section) == 2, "README.md has no section 'What the demo prints'"
    block = re.search(r"```text\n(.*?)```", section[1], re.S)
    assert block, "README.md: no ```text block under 'What the demo prints'"
    return block.group(1).rstrip("\n").splitlines()


def test_readme_demo_table_is_the_trainers():
    """The header is the one print_table prints, and every row is formatted exactly as it formats it."""
    fake = {"original": _result((0.5, 0.5, 0.5, None), 1.0)}
    header = _printed(fake)[0]
    table = readme_demo_table()
    assert table[0] == header, f"README demo table header {table[0]!r}; the trainer prints {header!r}"
    titles = {}
    for stage in ("original", "incremental", "retrain"):
        titles[_printed({stage: _result((0.5, 0.5, 0.5, 0.5), 1.0)})[1][:16].rstrip()] = stage
    results = {}
    for line in table[1:]:
        title, fields = line[:16].rstrip(), line[16:].split()
        assert title in titles, f"README demo table row {title!r}: not a stage the trainer prints ({sorted(titles)})"
        assert len(fields) == 5, f"README demo table row {line!r}: expected 4 mAP columns and the time"
        values = [None if field == "-" else float(field) for field in fields[:4]]
        results[titles[title]] = _result(values, float(fields[4]))
    assert results, "README demo table has no rows"
    assert _printed(results) == table, "README demo table is not formatted as print_table formats it"
