"""BGP passwords: from the node-local password files to the files BIRD includes.

The calc (bgp/config.py) only names, per session, the password file and the include file;
this reads each password file and writes `password "...";` into the include file (mode
0600, in a 0700 directory), so the password exists only in its own file, in the include
file and in BIRD's memory: never in the plan, the logs, /status or the metrics.  Problems
are reported by file path, never by content.
"""
from __future__ import annotations

import os
import tempfile

MAX_LEN = 80  # TCP_MD5SIG_MAXKEYLEN


def _password(path: str) -> tuple[str | None, str]:
    """(password, "") or (None, why it cannot be used)."""
    try:
        with open(path, encoding="utf-8") as f:
            pw = f.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        return None, f"password file {path} cannot be read: {getattr(e, 'strerror', None) or e}"
    if not pw:
        return None, f"password file {path} is empty"
    if len(pw) > MAX_LEN:
        return None, f"password in {path} is longer than {MAX_LEN} characters (the TCP MD5 limit)"
    if any(c in pw for c in '"\\') or not pw.isprintable():
        return None, f"password in {path} has a quote, a backslash or a control character, which BIRD cannot take"
    return pw, ""


def write_includes(wanted: dict[str, str], secrets_dir: str) -> tuple[bool, dict[str, str]]:
    """Make every include file of `wanted` (include path -> password file) hold the line for
    its password and remove include files no session uses.  Returns (whether any file
    changed, {include path: problem}).  A session whose password file is unusable gets an
    include without a password line: it stays down against a peer that expects one, and
    the problem says why."""
    os.makedirs(secrets_dir, mode=0o700, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    changed = False
    problems: dict[str, str] = {}
    for include, source in sorted(wanted.items()):
        pw, why = _password(source)
        if pw is None:
            problems[include] = why
            text = "# no usable password (see the agent's status)\n"
        else:
            text = f'password "{pw}";\n'
        try:
            with open(include, encoding="utf-8") as f:
                if f.read() == text:
                    continue
        except OSError:
            pass
        fd, tmp = tempfile.mkstemp(prefix=".pw-", dir=secrets_dir)  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, include)
        except BaseException:
            os.unlink(tmp)
            raise
        changed = True
    keep = {os.path.basename(p) for p in wanted}
    for name in os.listdir(secrets_dir):
        if name.endswith(".conf") and name not in keep:
            os.unlink(os.path.join(secrets_dir, name))
            changed = True
    return changed, problems


def md5_counters(netstat_path: str = "/proc/net/netstat") -> dict[str, int]:
    """The kernel's TCP MD5 counters of this namespace (TCPMD5NotFound: a segment without the
    signature a session expects; TCPMD5Failure: a wrong signature, i.e. another password)."""
    try:
        with open(netstat_path) as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    for head, vals in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            row = dict(zip(head.split()[1:], vals.split()[1:]))
            return {k: int(v) for k, v in row.items() if k.startswith("TCPMD5")}
    return {}
