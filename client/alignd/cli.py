"""The ``alignd`` command line.

``alignd serve ROLE`` runs a service, ``alignd models`` prepares and lists the bundled models,
``alignd demo`` runs the main job. Server-side commands import ``alignd_server`` lazily, so the
SDK alone (without the ``serve`` extra) still gives ``alignd models list`` and ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from alignd import __version__
from alignd.models import list_models

ROLES = ("generation", "reward", "reference", "trainer")


def _server_import_error(err: ImportError) -> SystemExit:
    return SystemExit(
        f"this command needs the server packages ({err.name} is missing): "
        "pip install 'alignd[serve]'"
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from alignd_server.launch import main as serve_main
    except ImportError as err:
        raise _server_import_error(err) from err
    return serve_main(args.role, args.flags)


def _cmd_models_prepare(args: argparse.Namespace) -> int:
    try:
        from alignd_server.common.prepare import prepare_models
    except ImportError as err:
        raise _server_import_error(err) from err
    prepare_models(args.names or None, home=args.home, force=args.force, progress=print)
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    entries = list_models(home=args.home)
    width = max(len(e.name) for e in entries)
    for entry in entries:
        state = "prepared" if entry.prepared else "not prepared"
        print(f"{entry.name:<{width}}  {entry.path}  ({state})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from alignd.demo import run_demo

    return run_demo(home=args.home)


def build_parser() -> argparse.ArgumentParser:
    """The ``alignd`` argument parser."""
    parser = argparse.ArgumentParser(prog="alignd", description="RLHF as a platform.")
    parser.add_argument("--version", action="version", version=f"alignd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run a service (alignd serve ROLE --help lists its flags)",
        add_help=False,
    )
    serve.add_argument("role", choices=ROLES)
    serve.add_argument("flags", nargs=argparse.REMAINDER, help="flags of the service")
    serve.set_defaults(func=_cmd_serve)

    models = commands.add_parser("models", help="prepare and list the bundled models")
    model_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    prepare = model_commands.add_parser("prepare", help="convert the bundled models into the cache")
    prepare.add_argument("names", nargs="*", help="models to prepare (default: all)")
    prepare.add_argument("--force", action="store_true", help="prepare again even if present")
    prepare.add_argument("--home", default=None, help="cache directory (default $ALIGND_HOME)")
    prepare.set_defaults(func=_cmd_models_prepare)
    listing = model_commands.add_parser("list", help="print each bundled model and its path")
    listing.add_argument("--home", default=None, help="cache directory (default $ALIGND_HOME)")
    listing.set_defaults(func=_cmd_models_list)

    demo = commands.add_parser("demo", help="run the main job end to end on local services")
    demo.add_argument("--home", default=None, help="cache directory (default $ALIGND_HOME)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``alignd`` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["serve"] and len(argv) >= 2 and argv[1] in ROLES:
        # Everything after the role belongs to the service's own parser (including --help).
        args = argparse.Namespace(role=argv[1], flags=argv[2:], func=_cmd_serve)
    else:
        args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
