"""The docs cannot drift from the code: the configuration reference is what its generator writes now, every relative
link in README.md and docs/*.md reaches a file (and a heading, for a Markdown anchor), and every `python launch.py`
command they quote (in shell code blocks, or in a code span: `launch.py train` names a command, `python launch.py train
...` is one to run) parses with launch.py's own parser and names real config keys with valid values."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

from pydantic import BaseModel

import launch
from core.config import REPO_ROOT, ConfigError
from toyworld.config import load_world_config

SHELLS = {"bash", "sh", "shell", "console", "zsh"}  # fenced blocks whose every line is a command
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"")
HTML_ANCHOR = re.compile(r"<a\b[^>]*?\b(?:id|name)=\"([^\"]+)\"")
# what a documented command leaves for the reader to fill in: <path>, $VAR or ${VAR}, "..."
PLACEHOLDER = re.compile(r"<[A-Za-z_][^<>\n]*>")
HOLE = "__PLACEHOLDER__"
FILL = "1"  # stands for a placeholder argument: a valid value for the string and numeric options alike


def doc_files(root: Path) -> list[Path]:
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def _split(text: str) -> tuple[str, list[tuple[int, str, str]]]:
    """(the prose with fenced blocks blanked, [(line number, fence language, line) of each fenced line])."""
    prose, fenced, fence = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = (match.group(1), match.group(2).lower())
        elif fence is not None and match and match.group(1).startswith(fence[0]) and not match.group(2):
            fence = None
        elif fence is not None:
            fenced.append((number, fence[1], line))
            prose.append("")
            continue
        prose.append("" if match else line)
    return "\n".join(prose), fenced


def _blank_code(prose: str) -> str:
    """The prose with its code spans blanked (their links are not links), newlines kept for line numbers."""
    return CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lowercased, without punctuation, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", re.sub(r"<[^>]+>", "", text).lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    """The anchors a link into `path` may name: its headings' (a repeated one gets -1, -2, ...) and <a id=...>'s."""
    prose, _ = _split(path.read_text())
    anchors: set[str] = set(HTML_ANCHOR.findall(prose))
    for heading in re.findall(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$", prose, re.MULTILINE):
        slug, n = _slug(heading), 0
        while (f"{slug}-{n}" if n else slug) in anchors:
            n += 1
        anchors.add(f"{slug}-{n}" if n else slug)
    return anchors


def link_problems(root: Path) -> list[str]:
    """'file:line: target: why' for each relative link, image or anchor that reaches nothing."""
    problems = []
    for doc in doc_files(root):
        prose = _blank_code(_split(doc.read_text())[0])
        for pattern in (LINK, REFERENCE, HTML_LINK):
            for match in pattern.finditer(prose):
                target = match.group(1)
                if not target or re.match(r"[A-Za-z][\w+.-]*:|//", target):  # a URL, mailto: and the like
                    continue
                path, _, anchor = unquote(target).partition("#")
                file = doc if not path else (root / path.lstrip("/") if path.startswith("/") else doc.parent / path)
                line = prose.count("\n", 0, match.start()) + 1
                where = f"{doc.relative_to(root)}:{line}: {target}"
                if not file.exists():
                    problems.append(f"{where}: no such file")
                elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                    problems.append(f"{where}: no heading with anchor #{anchor} in {file.name}")
    return problems


def _strip_comment(line: str) -> str:
    """The line without its shell comment (a `#` that starts a word, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def command_lines(doc: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each command line in the fenced shell blocks of `doc` (backslash continuations joined;
    `$ ` lines of other blocks) and of each inline code span that runs launch.py."""
    prose, fenced = _split(doc.read_text())
    pending: tuple[int, str] | None = None
    last = 0
    for number, lang, line in fenced:
        if pending is not None and number != last + 1:  # its block ended on a continuation
            yield pending
            pending = None
        last = number
        if pending is None:
            prompt = line.lstrip().startswith("$ ")
            if lang not in SHELLS and not prompt:
                continue
            pending, line = (number, ""), line.lstrip().removeprefix("$ ") if prompt else line
        line = _strip_comment(line).rstrip()
        continued = line.endswith("\\")
        pending = (pending[0], pending[1] + " " + line.removesuffix("\\"))
        if not continued:
            yield pending
            pending = None
    if pending is not None:
        yield pending
    for match in CODE_SPAN.finditer(prose):
        if "launch.py" in match.group(2):
            yield prose.count("\n", 0, match.start()) + 1, match.group(2).replace("\n", " ")


def launch_argv(command: str) -> list[str] | None:
    """The arguments a shell command line gives `python launch.py` (None when it does not run it), each placeholder
    argument as FILL and each placeholder value of a `key=value` as HOLE."""
    command = PLACEHOLDER.sub(HOLE, command)
    command = re.sub(r"(?<=\s)\[(--?[A-Za-z][^\[\]]*)\]", r"\1", command)  # a usage line's optional [--opt x]
    command = re.sub(r"\s\d+(?=>)", " ", command)  # the descriptor of a redirection (2>&1)
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    try:
        tokens = list(lexer)
    except ValueError:  # an unclosed quote: not a command line (prose in a code span)
        return None
    start = next((i + 1 for i in range(1, len(tokens)) if Path(tokens[i]).name == "launch.py"
                  and re.fullmatch(r"python[\d.]*", Path(tokens[i - 1]).name)), None)
    if start is None:
        return None
    argv = []
    for token in tokens[start:]:
        if set(token) <= set("();<>|&"):  # the pipe, redirection or list operator that ends the command
            break
        held = HOLE in token or "$" in token or "..." in token
        key, eq, _ = token.partition("=")
        if held and eq and not token.startswith("-") and not (HOLE in key or "$" in key or "..." in key):
            argv.append(f"{key}={HOLE}")
        elif held and token.startswith("--") and eq:
            argv += [key, FILL]
        else:
            argv.append(FILL if held else token)
    return argv if argv[:1] != [FILL] else None  # `launch.py <command>`: no command to check


def _has_key(section: BaseModel, parts: list[str]) -> bool:
    """Whether the config has the dotted key: a field of its sections, or a name under a mapping or an unset one."""
    node: object = section
    for part in parts:
        if not isinstance(node, BaseModel):
            return isinstance(node, dict) or node is None
        if part not in type(node).model_fields:
            return False
        node = getattr(node, part)
    return True


def argv_problem(argv: list[str], root: Path) -> str | None:
    """Why launch.py would refuse these arguments before it starts anything (None when it would not): the parser's
    error, or the config's, for the config the command names with its overrides (files are not checked)."""
    if "--config" in argv and argv[argv.index("--config") + 1:][:1] == [FILL]:  # a placeholder: check the default
        argv = argv[:argv.index("--config")] + argv[argv.index("--config") + 2:]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = launch.build_parser().parse_args(argv)
    except SystemExit as e:
        return None if e.code == 0 else err.getvalue().strip().splitlines()[-1]
    overrides = [o for o in launch.config_overrides(args) if not (o == FILL and FILL in argv)]
    held = [o.partition("=")[0] for o in overrides if o.endswith(f"={HOLE}")]
    config = args.config and (Path(args.config) if Path(args.config).is_absolute() else root / args.config)
    try:
        cfg = load_world_config(config, [o for o in overrides if not o.endswith(f"={HOLE}")])
    except ConfigError as e:
        return " ".join(str(e).split())
    unknown = [key for key in held if not _has_key(cfg, key.split("."))]
    return f"unknown config keys {', '.join(unknown)}" if unknown else None


def command_problems(root: Path) -> list[str]:
    """'file:line: command: why' for each quoted launch.py command that would not start."""
    problems = []
    for doc in doc_files(root):
        for line, command in sorted(command_lines(doc)):
            argv = launch_argv(command)
            if argv is not None and (why := argv_problem(argv, root)):
                problems.append(f"{doc.relative_to(root)}:{line}: {' '.join(command.split())}\n    {why}")
    return problems


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", REPO_ROOT / "docs" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_current():
    generator = _generator()
    assert generator.OUTPUT.is_file() and generator.OUTPUT.read_text() == generator.render(), (
        "docs/configuration.md differs from what docs/gen_config_reference.py writes from the schema now: run `make docs`")


def test_doc_links_reach_files_and_headings():
    problems = link_problems(REPO_ROOT)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_doc_commands_parse_and_name_real_keys():
    problems = command_problems(REPO_ROOT)
    assert not problems, "documented commands launch.py would refuse:\n" + "\n".join(problems)


def test_planted_mistakes_are_reported_with_file_and_line(tmp_path):
    (tmp_path / "configs").symlink_to(REPO_ROOT / "configs")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Two words\n")
    (tmp_path / "README.md").write_text("""\
# Title

See [the guide](docs/guide.md#two-words), [a heading](#title), [gone](docs/missing.md) and [bad](docs/guide.md#nope).
Run `python launch.py train learner.max_stepz=5` or `python launch.py plan [--config ...] [--gpu-gb 80] [--json]`.

```bash
python launch.py train --config configs/tiny.yaml \\
    learner.max_steps=200 stream.sink_size=3   # fine
python launch.py generate --prompt "..." --frames 0 > out.log
python launch.py score <video.mp4> --prompt "<what it shows>" --url $URL 2>&1 | tee score.json
python launch.py ode-init $W ode_init.init=<path> ode_init.lr=3e-4
python launch.py serve checkpoint.generator=$CKPT serve.presets.small=[64,64] stream.rope=sideways
python launch.py evaluate --config <your.yaml> --prompts <N> learner.nope=<x>
python launch.py <command> --help
pytest tests/test_launch.py
```

```
$ python launch.py plan --gpu-gb 80
python launch.py train --nonsense
```
""")
    assert link_problems(tmp_path) == ["README.md:3: docs/missing.md: no such file",
                                       "README.md:3: docs/guide.md#nope: no heading with anchor #nope in guide.md"]
    problems = command_problems(tmp_path)
    assert [p.split(": ")[0] for p in problems] == ["README.md:4", "README.md:9", "README.md:12", "README.md:13"]
    assert "learner.max_stepz: unknown key" in problems[0] and "--frames: must be >= 1" in problems[1]
    assert "stream.rope" in problems[2] and "unknown config keys learner.nope" in problems[3]
