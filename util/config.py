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


def parse_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse `argv`; a `--config FILE` sets defaults first. Unknown YAML keys are an error naming them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    args = parser.parse_args(argv)
    args.config = known.config
    return args


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"--config: no such file: {path}")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise SystemExit(f"--config {path}: not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise SystemExit(f"--config {path}: expected a mapping of flag names to values")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"--config {path}: unknown keys {unknown}; see --help for the flag names")
    return values


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
        if value is None or isinstance(value, (bool, int, float, str, list)):
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
