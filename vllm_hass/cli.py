"""`vllm-hass` command line: convert, inspect, setup-cpu, train, bench, demo.

Each subcommand lives beside the code it drives and exposes
`add_parser(subparsers)`; the parser sets `func`. Imports are lazy so that
`vllm-hass inspect` does not pay for importing vLLM or transformers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vllm_hass.errors import UserError

SUBCOMMANDS = {
    "convert": "vllm_hass.converters.cli",
    "inspect": "vllm_hass.converters.cli",
    "setup-cpu": "vllm_hass.cpu_alias",
    "train": "vllm_hass.train.cli",
    "bench": "vllm_hass.bench.cli",
    "demo": "vllm_hass.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-hass", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    seen: set[str] = set()
    for module in SUBCOMMANDS.values():
        if module in seen:
            continue
        seen.add(module)
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # a subcommand whose optional deps are missing
            name = next(k for k, v in SUBCOMMANDS.items() if v == module)
            p = sub.add_parser(name, help=f"(unavailable: {e})")
            p.set_defaults(func=lambda args, e=e: _raise(UserError(str(e))))
            continue
        mod.add_parser(sub)
    return parser


def _raise(e: Exception):
    raise e


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"vllm-hass {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
