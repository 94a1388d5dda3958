"""The ``pyro-vae`` command. Strings become objects here and nowhere else.

``parser`` holds the options; each command is a module of its own (``train``, ``compare``, ``evaluate``,
``sample``, ``diagnose``) with a ``command(args)``; ``runs`` turns a run spec into objects and
``experiment`` runs one (build, train, evaluate, plot).
"""
from __future__ import annotations

import importlib
import sys

from pyro_vae.cli.parser import build_parser
from pyro_vae.errors import UserError
from pyro_vae.training import distributed
from pyro_vae.training.fit import Interrupted


def _rank_tag() -> str:
    try:
        world = distributed.from_env()
    except UserError:
        return ""
    return f" [rank {world.rank}]" if world.active else ""


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        # each command's module is imported only when it runs: `pyro-vae --help` stays fast
        importlib.import_module(f"pyro_vae.cli.{args.command}").command(args)
    except UserError as e:
        print(f"pyro-vae{_rank_tag()}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"pyro-vae: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("pyro-vae: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.finish()
    return 0
