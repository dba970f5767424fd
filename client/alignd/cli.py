"""The ``alignd`` command line.

``alignd serve ROLE`` runs a service, ``alignd models`` prepares and lists the bundled models,
``alignd demo`` runs the main job, ``alignd up`` / ``status`` / ``down`` start, inspect and stop
a local platform (the four services on loopback). Server-side commands import
``alignd_server`` lazily, so the SDK alone (without the ``serve`` extra) still gives
``alignd models list`` and ``--help``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

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

    if args.resume and args.output and Path(args.resume).resolve() != Path(args.output).resolve():
        message = "alignd demo: --resume DIR is the demo's output directory; drop --output"
        print(message, file=sys.stderr)
        return 2
    output = args.resume or args.output
    return run_demo(home=args.home, quick=args.quick, output=output, resume=bool(args.resume),
                    off_policy_steps=args.off_policy_steps)  # fmt: skip


def _resume_command(args: argparse.Namespace) -> str:
    """The ``alignd run`` command line that continues this run."""
    words = ["alignd", "run", args.config, "--resume"]
    if args.platform:
        words += ["--platform", args.platform]
    elif args.env:
        words.append("--env")
    elif args.dir:
        words += ["--dir", args.dir]
    if args.home:
        words += ["--home", args.home]
    return shlex.join(words)


def _cmd_run(args: argparse.Namespace) -> int:
    from alignd.jobs import ConfigError, JobFailed, RunDirectoryError, load_job_config, make_job
    from alignd.jobs.config import describe_config
    from alignd.platform import Platform, PlatformConfigError, default_directory

    if args.help_config:
        try:
            print(describe_config(args.help_config))
        except ConfigError as err:
            print(f"alignd run: {err}", file=sys.stderr)
            return 2
        return 0
    if not args.config:
        print("alignd run: a job config is needed (or --help-config KIND)", file=sys.stderr)
        return 2
    try:
        config = load_job_config(args.config)
        if args.platform:
            platform = Platform.from_yaml(args.platform)
        elif args.env:
            platform = Platform.from_env()
        else:
            platform = Platform.from_state(args.dir or default_directory(args.home))
    except (OSError, ConfigError, PlatformConfigError) as err:
        print(f"alignd run: {err}", file=sys.stderr)
        return 2
    with platform:
        try:
            job = make_job(config, platform, resume=args.resume)
        except RunDirectoryError as err:
            print(f"alignd run: {err}", file=sys.stderr)
            return 2
        try:
            rows = job.run_to_end()
        except JobFailed as err:
            print(f"alignd run: {err}; continue with: {_resume_command(args)}", file=sys.stderr)
            return 1
    print(f"{config.kind}: {len(rows)} steps; run directory {config.run_dir}")
    return 0


def _table(rows: Sequence[Sequence[object]]) -> str:
    """Rows as left-aligned columns two spaces apart (the first row is the header)."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _cmd_up(args: argparse.Namespace) -> int:
    from alignd.platform import STATE_FILE, Platform, PlatformConfigError

    models = {role: getattr(args, f"model_{role}") for role in ROLES}
    try:
        platform = Platform.local(
            args.dir,
            roles=args.roles,
            models={role: model for role, model in models.items() if model},
            home=args.home,
            token_file=args.token_file,
            storage_roots=args.storage_root,
            detach=True,
            ready_timeout=args.timeout,
        )
    except (OSError, RuntimeError, ValueError, PlatformConfigError) as err:
        print(f"alignd up: {err}", file=sys.stderr)
        return 1
    with platform:
        rows = [("ROLE", "TARGET", "PID", "MODEL", "LOG")]
        for role, p in platform.processes.items():
            rows.append((role, p.target, p.pid, p.model, p.log))
        print(_table(rows))
        print(
            f"state: {platform.directory / STATE_FILE}  (stop with: alignd down --dir "
            f"{platform.directory})"
        )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from alignd.platform import Platform, PlatformConfigError, default_directory

    try:
        if args.config:
            platform = Platform.from_yaml(args.config)
        else:
            platform = Platform.from_state(args.dir or default_directory(args.home))
    except (OSError, PlatformConfigError) as err:
        print(f"alignd status: {err}", file=sys.stderr)
        return 1
    with platform:
        statuses = platform.status(timeout=args.timeout)
    rows = [("ROLE", "TARGET", "HEALTH", "MODEL", "ENGINE", "WEIGHTS")]
    for s in statuses:
        version = "-" if s.weights_version is None else s.weights_version
        rows.append((s.role, s.target, s.health, s.model or "-", s.engine or "-", version))
    print(_table(rows))
    for s in statuses:
        if s.detail:
            print(f"{s.role} {s.target}: {s.detail}", file=sys.stderr)
    return 0 if all(s.serving for s in statuses) else 1


def _cmd_down(args: argparse.Namespace) -> int:
    from alignd.platform import default_directory, stop_local

    try:
        outcome = stop_local(args.dir or default_directory(args.home), timeout=args.timeout)
    except OSError as err:
        print(f"alignd down: {err}", file=sys.stderr)
        return 1
    print(_table([("ROLE", "RESULT"), *outcome.items()]))
    return 0


def _add_platform_commands(commands: argparse._SubParsersAction) -> None:
    where = "platform directory (default $ALIGND_HOME/platform)"
    home = "alignd home (default $ALIGND_HOME)"
    up = commands.add_parser("up", help="start a local platform: the services on 127.0.0.1")
    up.add_argument("--dir", default=None, help=where)
    up.add_argument("--home", default=None, help=f"{home}; bundled models resolve there")
    up.add_argument(
        "--roles",
        nargs="+",
        choices=ROLES,
        default=list(ROLES),
        metavar="ROLE",
        help=f"services to start (default: all of {', '.join(ROLES)})",
    )
    for role in ROLES:
        up.add_argument(
            f"--model-{role}",
            default=None,
            metavar="MODEL",
            help=f"bundled model name or directory for {role}",
        )
    up.add_argument("--token-file", default=None, help="bearer tokens the services require")
    up.add_argument(
        "--storage-root",
        action="append",
        default=None,
        metavar="DIR",
        help="where trainer and generation may read and write the paths jobs send "
        "(checkpoints, run directories); repeat for several (default: the current directory)",
    )
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for SERVING")
    up.set_defaults(func=_cmd_up)

    status = commands.add_parser("status", help="health, model and weights of each service")
    source = status.add_mutually_exclusive_group()
    source.add_argument("--dir", default=None, help=f"local {where}")
    source.add_argument("--config", default=None, help="platform YAML (services, tls, token)")
    status.add_argument("--home", default=None, help=home)
    status.add_argument("--timeout", type=float, default=5.0, help="seconds per check")
    status.set_defaults(func=_cmd_status)

    down = commands.add_parser("down", help="stop the local platform (SIGTERM, then SIGKILL)")
    down.add_argument("--dir", default=None, help=where)
    down.add_argument("--home", default=None, help=home)
    down.add_argument("--timeout", type=float, default=30.0, help="seconds before SIGKILL")
    down.set_defaults(func=_cmd_down)


def _cmd_submit(args: argparse.Namespace) -> int:
    from alignd import kube
    from alignd.jobs import ConfigError, load_job_config

    try:
        config = load_job_config(args.config)
    except ConfigError as err:
        print(f"alignd submit: {err}", file=sys.stderr)
        return 2
    options = kube.SubmitOptions(
        release=args.release, namespace=args.namespace, image=args.image or "",
        claim=args.claim or "", mount_path=args.mount_path, auth_secret=args.auth_secret or "",
        tls_secret=args.tls_secret or "", service_account=args.service_account or "",
    )  # fmt: skip
    objects = kube.build_objects(config, options, kube.job_name(config))
    if args.dry_run:
        import yaml

        print(yaml.safe_dump_all(kube.to_manifests(objects), sort_keys=False), end="")
        return 0
    names = kube.submit(objects)
    print(f"created ConfigMap and Job {names[1]} in namespace {args.namespace}")
    return 0


def _add_submit_command(commands: argparse._SubParsersAction) -> None:
    submit = commands.add_parser("submit", help="run a job config in-cluster as a Kubernetes Job")
    submit.add_argument("config", help="job YAML")
    submit.add_argument("--release", required=True, help="Helm release of the services")
    submit.add_argument("--namespace", default="default", help="its namespace")
    submit.add_argument("--image", default=None, help="alignd image (default alignd:VERSION)")
    submit.add_argument("--claim", default=None, help="shared PVC (default RELEASE's home)")
    submit.add_argument("--mount-path", default="/var/lib/alignd", help="where it is mounted")
    submit.add_argument("--auth-secret", default=None, help="Secret holding the tokens")
    submit.add_argument("--tls-secret", default=None, help="Secret holding ca.crt")
    submit.add_argument("--service-account", default=None, help="the pod's service account")
    submit.add_argument("--dry-run", action="store_true", help="print the manifests only")
    submit.set_defaults(func=_cmd_submit)


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
    demo.add_argument("--quick", action="store_true", help="tiny models, a few minutes")
    demo.add_argument("--output", default=None, help="output directory (default ./alignd-demo)")
    demo.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the demo in DIR (its --output): finished jobs are kept, an interrupted "
        "one resumes from its last checkpoint",
    )
    demo.add_argument(
        "--off-policy-steps",
        type=int,
        default=0,
        choices=range(9),
        metavar="K",
        help="PPO generates the next K rounds while a round trains, with importance "
        "correction (0-8; default 0: synchronous rounds)",
    )
    demo.set_defaults(func=_cmd_demo)

    run = commands.add_parser("run", help="run a job config (sft, reward_model, dpo, ppo, grpo)")
    run.add_argument("config", nargs="?", help="job YAML")
    run.add_argument(
        "--help-config",
        metavar="KIND",
        default=None,
        help="print every field of a job kind's config (type, default, meaning) and exit",
    )
    run.add_argument("--resume", action="store_true", help="continue the run in its run_dir")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--platform", default=None, help="platform YAML (services, tls, token)")
    source.add_argument("--env", action="store_true", help="services from ALIGND_*_TARGET")
    source.add_argument("--dir", default=None, help="local platform directory (alignd up)")
    run.add_argument("--home", default=None, help="alignd home (default $ALIGND_HOME)")
    run.set_defaults(func=_cmd_run)
    _add_platform_commands(commands)
    _add_submit_command(commands)
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
