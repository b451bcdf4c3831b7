"""`vllm-hass` command line: convert, inspect, vocab, setup-cpu, train, bench, demo.

Each subcommand lives beside the code it drives and exposes
`add_parser(subparsers)`; the parser sets `func`. Imports are lazy so that
`vllm-hass inspect` does not pay for importing vLLM or transformers. Before a
command runs, the optional modules it needs are looked up (vllm_hass/extras.py):
a missing one is one line naming the extra to install, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vllm_hass import extras
from vllm_hass.errors import UserError

SUBCOMMANDS = {
    "convert": "vllm_hass.converters.cli",
    "inspect": "vllm_hass.converters.cli",
    "vocab": "vllm_hass.vocab_cli",
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
            err = (extras.missing_extra(e) if isinstance(e, ModuleNotFoundError) else None) \
                or UserError(str(e))
            for name in (k for k, v in SUBCOMMANDS.items() if v == module):
                p = sub.add_parser(name, help=f"(unavailable: {err})", add_help=False)
                p.add_argument("rest", nargs=argparse.REMAINDER)
                p.set_defaults(func=lambda args, err=err: _raise(err))
            continue
        mod.add_parser(sub)
    return parser


def _raise(e: Exception):
    raise e


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        extras.check(args)
        try:
            rc = args.func(args)
        except ModuleNotFoundError as e:  # an optional import the check did not foresee
            err = extras.missing_extra(e)
            if err is None:
                raise
            raise err from e
    except UserError as e:
        print(f"vllm-hass {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
