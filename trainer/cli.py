"""Command line of the offline pipelines: `python -m trainer <command> ...`."""
from __future__ import annotations

import argparse
import logging

from . import demo, workflows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="ComfyUI-MoLE offline pipelines")
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(commands.add_parser("demo", help=demo.__doc__.splitlines()[0]))
    workflows.add_arguments(commands.add_parser("workflows", help="rewrite workflows/ (UI format and API twins) "
                                                "from the node definitions of a real ComfyUI"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.run(args)
