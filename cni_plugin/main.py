"""Entry point of the `tortie` CNI binary: environment + stdin in, result or error JSON
out on stdout, exit status 0 or 1.  Nothing else is ever written to stdout.

The binary is a new process for every CNI call, so its imports are its latency: this
module and what it pulls in on the agent path stay within json, os, sys, time, _socket
and the plugin's own small modules (see podnet/records.py, logsetup.py)."""
from __future__ import annotations

import os
import sys
import time

from cni_plugin import agent_client, commands

from podnet import versions
from podnet import jsoncodec as json
from podnet.netconf import parse_config, parse_env, parse_version_request, peek_version, try_decode
from podnet.errors import INTERNAL, IO_FAILURE, CNIError
from podnet.logsetup import configure, enabled, get_logger
from podnet.result import Result

log = get_logger("tortie.cni")

# CLOCK_MONOTONIC when the entry script started (before any import) and when main()
# started (after them): the debug "timing" line puts them next to the agent round trip.
_entry_time = 0.0
_main_time = 0.0


def run(environ: dict[str, str], stdin: bytes) -> tuple[int, str]:
    """The whole plugin as a function: (exit status, stdout text)."""
    obj = try_decode(stdin) if stdin.strip() else None  # stdin is parsed once, here
    version = peek_version(obj)
    try:
        env = parse_env(environ)
        if env.command == "VERSION":
            return 0, json.dumps(commands.cmd_version(parse_version_request(stdin, obj)))
        conf = parse_config(stdin, env.command, obj)
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
        text = json.dumps(out.to_dict(conf.cni_version)) if isinstance(out, Result) else ""
        done = time.monotonic()
        log.info("%s %s/%s ok in %.1f ms", env.command, env.container_id, env.ifname, (done - started) * 1000)
        if enabled(10) and _entry_time:
            log.debug("timing %s %s/%s entry=%.6f main=%.6f sent=%.6f reply=%.6f done=%.6f", env.command,
                      env.container_id, env.ifname, _entry_time, _main_time,
                      agent_client.last_sent or started, agent_client.last_reply or started, done)
        return 0, text
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
    from podnet.netconf import validate_conflist

    try:
        types = validate_conflist(sys.stdin.buffer.read())
    except CNIError as e:
        sys.stderr.write(f"invalid conflist: {e.msg}{' (' + e.details + ')' if e.details else ''}\n")
        sys.exit(1)
    sys.stdout.write(f"valid conflist: {' -> '.join(types)}\n")
    sys.exit(0)


USAGE = """usage: tortie                        (run by a container runtime, not by hand)
       tortie --validate-conflist < CONFLIST
       tortie --help

tortie is a CNI plugin (CNI 0.3.0-1.1.0): the runtime runs it with CNI_COMMAND (ADD, DEL,
CHECK, VERSION, STATUS, GC), CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_PATH and CNI_ARGS
in the environment and the network config as JSON on stdin; it prints the result, or a CNI
error as JSON, on stdout. Logs go to the config's log_file_path (/var/log/tortie/cni.log).
Try:  echo '{"cniVersion":"1.1.0"}' | CNI_COMMAND=VERSION tortie
"""


def main(entry_time: float = 0.0) -> None:
    """`entry_time`: CLOCK_MONOTONIC at the very start of the entry script, if it took it."""
    global _entry_time, _main_time
    _entry_time, _main_time = entry_time, time.monotonic()
    if sys.argv[1:] == ["--validate-conflist"]:
        validate_conflist_main()
    if sys.argv[1:2] in (["--help"], ["-h"]):  # a person, not a runtime (which passes no arguments)
        sys.stdout.write(USAGE)
        sys.exit(0)
    try:
        stdin = sys.stdin.buffer.read() if sys.stdin is not None else b""
    except OSError as e:
        print(CNIError(IO_FAILURE, f"cannot read the network config from stdin: {e}")
              .to_json(versions.LATEST))
        sys.exit(1)
    status, out = run(dict(os.environ), stdin)
    try:
        if out:
            sys.stdout.write(out + "\n")
        sys.stdout.flush()
    except OSError:  # the runtime is gone (closed pipe): nobody is left to read a result
        status = 1
    # Everything is out (the log is written unbuffered, stdout is flushed), so the
    # interpreter's teardown would only free memory that exit frees anyway: ~3 ms a call.
    os._exit(status)


if __name__ == "__main__":
    main()
