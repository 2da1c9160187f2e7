"""The flag tables of the docs, generated from the parsers that `--help` prints (each method's knobs included).

A table lives between two markers in a markdown file:

    <!-- flags: main_pretrain.py "MI-MAE (models mi_mae_*)" -->
    ...generated...
    <!-- end flags -->

naming the script and the argument group (its --help title). `python tools/doc_tables.py` rewrites every table in
README.md, docs/ and configs/; `--check` lists the stale ones and exits 1 (tests/test_docs.py runs the check, so a
knob's default, range or help changed in the code alone fails the suite).
"""
import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import main_finetune  # noqa: E402
import main_linprobe  # noqa: E402
import main_pretrain  # noqa: E402

SCRIPTS = {"main_pretrain.py": main_pretrain, "main_finetune.py": main_finetune, "main_linprobe.py": main_linprobe}
BLOCK = re.compile(r'(<!-- flags: (\S+) "([^"]+)" -->\n)(.*?)(<!-- end flags -->)', re.S)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md")), ROOT / "configs" / "README.md"]


def cell(text) -> str:
    return str(text).replace("%%", "%").replace("|", "\\|").replace("\n", " ")


def allowed(action: argparse.Action) -> str:
    if action.choices:
        return ", ".join(str(c) for c in action.choices)
    if isinstance(action.metavar, str) and action.metavar.startswith("{"):  # a knob's choices (util.spec)
        return action.metavar.strip("{}").replace(",", ", ")
    if interval := re.search(r"; in ([\[(][^;]*[\])])$", action.help or ""):  # a knob's range
        return f"{getattr(action.type, '__name__', 'value')} in {interval.group(1)}"
    if action.nargs == 0:
        return "flag"
    type_name = getattr(action.type, "__name__", None) or type(action.default).__name__
    if type_name == "bool_flag":
        return "true, false"
    return {"NoneType": "value", "bool": "true, false", "open_unit_interval": "float in (0, 1)"}.get(type_name, type_name)


def table(script: str, group_title: str) -> str:
    parser = SCRIPTS[script].get_args_parser()
    groups = {group.title: group for group in parser._action_groups}
    if group_title not in groups:
        raise SystemExit(f"{script} has no argument group {group_title!r}; its groups: {', '.join(groups)}")
    rows = ["| flag | default | allowed | what it does |", "|---|---|---|---|"]
    for action in groups[group_title]._group_actions:
        flags = " ".join(f"`{flag}`" for flag in action.option_strings)
        default = "" if action.default in (None, "") else f"`{action.default}`"
        help_text = re.sub(r"; in [\[(][^;]*[\])]$", "", action.help or "")  # the range has its own column
        rows.append(f"| {flags} | {default} | {cell(allowed(action))} | {cell(help_text)} |")
    return "\n".join(rows) + "\n"


def rewrite(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + table(m.group(2), m.group(3)) + m.group(5), text)


def stale() -> list[str]:
    """'file: script "group"' for every table that differs from the code."""
    found = []
    for path in doc_files():
        text = path.read_text()
        for match in BLOCK.finditer(text):
            if match.group(4) != table(match.group(2), match.group(3)):
                found.append(f'{path.relative_to(ROOT)}: {match.group(2)} "{match.group(3)}"')
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="list the stale tables and exit 1 if any, writing nothing")
    args = parser.parse_args()
    if args.check:
        if found := stale():
            raise SystemExit("stale flag tables (run python tools/doc_tables.py):\n  " + "\n  ".join(found))
        print("every flag table matches the code")
        return
    for path in doc_files():
        text = path.read_text()
        if (new := rewrite(text)) != text:
            path.write_text(new)
            print(f"rewrote the flag tables of {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
