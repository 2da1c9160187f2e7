"""argparse stays the interface: `--config x.yaml` sets the parser's defaults, the command line overrides,
and the resolved arguments are written to `output_dir/args.yaml` (timm's scheme)."""
import argparse
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import yaml


def bool_flag(value: str) -> bool:
    """argparse type for `--flag true/false` (DINO's bool_flag)."""
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


# Keys of a preset that are not flags: `_base_` names a preset whose values this one extends (path relative to
# this file), `reference` records the published number the preset should reach (see configs/README.md).
BASE_KEY, REFERENCE_KEY = "_base_", "reference"
# Keys a run writes into its args.yaml about itself (the code version it ran); read back as a preset they are
# skipped, since the new run records its own.
RECORD_KEYS = ("code_version",)


def checked_value(parser: argparse.ArgumentParser, action: argparse.Action, value, where: str):
    """A YAML value checked and converted exactly as the same text on the command line would be (type,
    range, choices): argparse checks only what comes from the command line, never a default set from YAML.
    SystemExit names `where` (file and key), the value and what is allowed."""
    if value is None:
        if action.default is None:
            return None
        raise SystemExit(f"{where}: null is not allowed (default {action.default!r})")
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise SystemExit(f"{where}: expected true or false, got {value!r}")
        return value
    knob_convert = getattr(action.type, "knob_convert", None)
    try:
        if knob_convert is not None:  # a method's knob reads YAML's own types (no int 10.5 -> 10)
            return knob_convert(value)
        many = isinstance(value, list) and action.nargs not in (None, "?")
        texts = [_as_text(v) for v in value] if many else [_as_text(value)]
        return parser._get_values(action, texts)
    except (argparse.ArgumentError, argparse.ArgumentTypeError) as err:
        message = err.message if isinstance(err, argparse.ArgumentError) else str(err)
        raise SystemExit(f"{where}: {value!r} is not allowed: {message}") from None


def _as_text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def parse_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse `argv`; a `--config FILE` sets defaults first. Unknown YAML keys are an error naming them.

    A preset's `reference` block travels in `args.reference` (None without one), so the run's args.yaml says
    which published number it reproduces.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    values = load_config(known.config, parser) if known.config else {}
    reference = values.pop(REFERENCE_KEY, None)
    parser.set_defaults(**values)
    args = parser.parse_args(argv)
    args.config = known.config
    args.reference = reference
    return args


def load_config(path: str, parser: argparse.ArgumentParser, _seen: tuple[Path, ...] = ()) -> dict:
    """The preset's values over those of its `_base_` chain; checks keys against `parser`'s flags."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"--config: no such file: {path}")
    if file.resolve() in _seen:
        raise SystemExit(f"--config {path}: `{BASE_KEY}` chain loops back to this file")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise SystemExit(f"--config {path}: not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise SystemExit(f"--config {path}: expected a mapping of flag names to values")
    reference = values.get(REFERENCE_KEY)
    if reference is not None and not (isinstance(reference, dict) and isinstance(reference.get("value"), (int, float))):
        raise SystemExit(f"--config {path}: `{REFERENCE_KEY}` must be a mapping with a numeric `value` "
                         f"(and `metric`, `source`), got {reference!r}")
    actions = {action.dest: action for action in parser._actions}
    unknown = sorted(set(values) - set(actions) - {BASE_KEY, REFERENCE_KEY, *RECORD_KEYS})
    if unknown:
        raise SystemExit(f"--config {path}: unknown keys {unknown}; see --help for the flag names")
    for key in RECORD_KEYS:  # what a run recorded about itself (args.yaml); the new run records its own
        values.pop(key, None)
    for key, value in values.items():
        if key in actions:
            values[key] = checked_value(parser, actions[key], value, f"--config {path}: {key}")
    base = values.pop(BASE_KEY, None)
    if base is None:
        return values
    inherited = load_config(str(file.parent / base), parser, (*_seen, file.resolve()))
    return {**inherited, **values}


def save_args(args: argparse.Namespace, output_dir: str) -> None:
    """Write the resolved arguments to output_dir/args.yaml (plain types only)."""
    path = Path(output_dir) / "args.yaml"
    path.write_text(yaml.safe_dump(args_to_dict(args), sort_keys=True))


def args_to_dict(args: argparse.Namespace) -> dict:
    """A plain dict of the arguments, safe for YAML and for weights_only checkpoints."""
    plain = {}
    for key, value in vars(args).items():
        if isinstance(value, tuple):
            value = list(value)
        if value is None or isinstance(value, (bool, int, float, str, list, dict)):
            plain[key] = value
        else:
            plain[key] = str(value)
    return plain


def git_sha() -> str:
    """The code's commit (with '-dirty' if the tree has changes), or 'unknown' outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def command_line() -> str:
    return " ".join([Path(sys.executable).name] + sys.argv)
