"""Run main_pretrain.py's main() and save this rank's final weights to output_dir/rank<R>.pt (for tests)."""
import sys
from pathlib import Path

import torch

from main_pretrain import get_args_parser, main
from util.config import parse_with_config
from util.dist import read_launcher_env

if __name__ == "__main__":
    args = parse_with_config(get_args_parser(), sys.argv[1:])
    rank = read_launcher_env().rank
    model = main(args)
    torch.save(model.state_dict(), Path(args.output_dir) / f"rank{rank}.pt")
