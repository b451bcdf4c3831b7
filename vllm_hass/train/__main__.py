"""`python -m vllm_hass.train ...` = `vllm-hass train ...` without loading the other subcommands."""

import argparse
import sys

from vllm_hass import extras
from vllm_hass.errors import UserError

from .cli import add_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_hass.train")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        extras.check(args)  # a missing optional module: one line naming the extra
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"vllm-hass train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
