"""The docs equal the code: the flag tables are what the parsers say, every relative link resolves inside the
repository, and every command in a ```bash block parses (the main and submitit scripts through their own parsers,
the tools and examples against their --help)."""
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

import main_finetune
import main_linprobe
import main_pretrain
from tools import doc_tables
from util.config import parse_with_config
from util.submit import add_launcher_args

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "configs" / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
MAIN = {"main_pretrain.py": main_pretrain, "main_finetune.py": main_finetune, "main_linprobe.py": main_linprobe}


def test_the_flag_tables_are_generated_from_the_code():
    """A knob's default, range, choices or help changed in the code alone makes this fail (tools/doc_tables.py
    rewrites the tables); each method's guide has its table."""
    assert not doc_tables.stale(), "run python tools/doc_tables.py"
    tables = {(path.name, match.group(3)) for path in DOCS for match in doc_tables.BLOCK.finditer(path.read_text())}
    assert {("mi_mae.md", "MI-MAE (models mi_mae_*)"), ("m_mae.md", "U-MAE and M-MAE (models u_mae_*, m_mae_*)"),
            ("cmae.md", "CMAE (Mao) (models cmae_*)")} <= tables


def test_a_changed_default_makes_its_table_stale(monkeypatch):
    import models_mi_mae
    table = doc_tables.table("main_pretrain.py", "MI-MAE (models mi_mae_*)")
    knob = next(k for k in models_mi_mae.MI_MAE_KNOBS if k.name == "v_steps")
    monkeypatch.setitem(knob.__dict__, "default", knob.default + 1)  # a frozen dataclass: as if edited in the file
    assert doc_tables.table("main_pretrain.py", "MI-MAE (models mi_mae_*)") != table


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # not inside code blocks
    return re.findall(r"\[[^\]]+\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(path):
    for target in links(path):
        if re.match(r"^[a-z]+://|^mailto:|^#", target):
            continue
        file = (path.parent / target.split("#")[0]).resolve()
        assert file.is_relative_to(ROOT), f"{target} leaves the repository"
        assert file.exists(), f"{target} does not exist"


def commands(path: Path) -> list[list[str]]:
    """The python/torchrun commands of the file's ```bash blocks, continuation lines joined, comments dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # environment assignments
                words = words[1:]
            if words and words[0] in ("python", "torchrun"):
                found.append(words)
    return found


def script_and_args(words: list[str]) -> tuple[str, list[str]]:
    """('main_pretrain.py', its arguments) from `python X ...` or `torchrun [its flags] X ...`; `...` dropped."""
    index = next(i for i, word in enumerate(words) if word.endswith(".py") or word == "-m")
    if words[index] == "-m":
        return words[index + 1], [w for w in words[index + 2:] if w != "..."]
    return words[index], [w for w in words[index + 1:] if w != "..."]


@cache
def help_text(script: str) -> str:
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{script} --help failed: {result.stderr[-1500:]}"
    return result.stdout


DOC_COMMANDS = [(path, words) for path in DOCS for words in commands(path)]


def test_the_docs_have_commands():
    assert len(DOC_COMMANDS) > 40


@pytest.mark.parametrize("path,words", DOC_COMMANDS, ids=lambda v: v.name if isinstance(v, Path) else " ".join(v)[:60])
def test_every_documented_command_parses(path, words):
    script, argv = script_and_args(words)
    if "MIM_METHODS" in " ".join(words) or "toy_mae" in " ".join(argv):  # a plugin's flags: tests/test_new_method.py
        return
    name = Path(script).name
    if name in MAIN or name.startswith("submitit_"):
        module = MAIN[name] if name in MAIN else MAIN["main_" + name.removeprefix("submitit_")]
        parser = module.get_args_parser()
        if name.startswith("submitit_"):
            add_launcher_args(parser)
        parse_with_config(parser, [str(ROOT / a) if a.startswith("configs/") else a for a in argv])
        return
    assert (ROOT / script).is_file() or script in ("torch.distributed.run",), f"{script}: no such script"
    if script.endswith(".py") and not script.startswith("tests/"):
        known = set(re.findall(r"--[a-z][a-z0-9_-]*", help_text(script)))
        used = {a.split("=")[0] for a in argv if a.startswith("--")}
        assert used <= known, f"{script}: {sorted(used - known)} not in its --help"
