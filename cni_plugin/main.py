"""Entry point of the `tortie` CNI binary: environment + stdin in, result or error JSON
out on stdout, exit status 0 or 1.  Nothing else is ever written to stdout."""
from __future__ import annotations

import json
import logging
import os
import sys
import time

from . import commands, versions
from .config import parse_config, parse_env, parse_version_request, peek_version
from .errors import INTERNAL, IO_FAILURE, CNIError
from .logsetup import configure
from .result import Result

log = logging.getLogger("tortie.cni")


def run(environ: dict[str, str], stdin: bytes) -> tuple[int, str]:
    """The whole plugin as a function: (exit status, stdout text)."""
    version = peek_version(stdin)
    try:
        env = parse_env(environ)
        if env.command == "VERSION":
            return 0, json.dumps(commands.cmd_version(parse_version_request(stdin)))
        conf = parse_config(stdin, env.command)
        version = conf.cni_version
        configure(conf.log_file_path, conf.log_level)
        started = time.monotonic()
        raw_args = environ.get("CNI_ARGS", "")
        try:
            out = _dispatch(env.command, conf, env, raw_args)
        except CNIError as e:
            log.error("%s %s/%s -> error %d: %s %s", env.command, env.container_id, env.ifname,
                      e.code, e.msg, e.details)
            raise
        log.info("%s %s/%s ok in %.1f ms", env.command, env.container_id, env.ifname,
                 (time.monotonic() - started) * 1000)
        if isinstance(out, Result):
            return 0, json.dumps(out.to_dict(conf.cni_version))
        return 0, ""
    except CNIError as e:
        return 1, e.to_json(version)
    except Exception as e:  # a bug: still a CNI error, never a bare traceback on stdout
        log.exception("unexpected failure")
        return 1, CNIError(INTERNAL, f"internal error: {type(e).__name__}: {e}").to_json(version)


def _dispatch(command: str, conf, env, raw_args: str):
    if command == "ADD":
        return commands.cmd_add(conf, env, raw_args)
    if command == "DEL":
        return commands.cmd_del(conf, env, raw_args)
    if command == "CHECK":
        return commands.cmd_check(conf, env, raw_args)
    if command == "STATUS":
        return commands.cmd_status(conf, env)
    if command == "GC":
        return commands.cmd_gc(conf, env)
    raise AssertionError(command)  # parse_env admits nothing else


def validate_conflist_main() -> None:
    """`tortie --validate-conflist < conflist`: what the install script runs before a
    conflist may land in /etc/cni/net.d. Exit 0 when valid, 1 with the reason."""
    from .config import validate_conflist

    try:
        types = validate_conflist(sys.stdin.buffer.read())
    except CNIError as e:
        sys.stderr.write(f"invalid conflist: {e.msg}{' (' + e.details + ')' if e.details else ''}\n")
        sys.exit(1)
    sys.stdout.write(f"valid conflist: {' -> '.join(types)}\n")
    sys.exit(0)


def main() -> None:
    if sys.argv[1:] == ["--validate-conflist"]:
        validate_conflist_main()
    try:
        stdin = sys.stdin.buffer.read() if sys.stdin is not None else b""
    except OSError as e:
        print(CNIError(IO_FAILURE, f"cannot read the network config from stdin: {e}")
              .to_json(versions.LATEST))
        sys.exit(1)
    status, out = run(dict(os.environ), stdin)
    if out:
        sys.stdout.write(out + "\n")
    sys.stdout.flush()
    sys.exit(status)


if __name__ == "__main__":
    main()
