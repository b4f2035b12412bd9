"""The CNI spec versions tortie speaks, and comparisons between them."""
from __future__ import annotations

from podnet.errors import INCOMPATIBLE_VERSION, CNIError

# 0.1.0/0.2.0 had a different result shape (ip4/ip6 keys); no runtime of the last years
# sends them, so they are refused with code 1 rather than half-supported.
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"


def parse(version: str) -> tuple[int, int, int]:
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() and p.isascii() for p in parts):
        raise ValueError(f"{version!r} is not a MAJOR.MINOR.PATCH version")
    return int(parts[0]), int(parts[1]), int(parts[2])


def at_least(version: str, minimum: str) -> bool:
    return parse(version) >= parse(minimum)


def is_legacy(version: str) -> bool:
    """0.3.x and 0.4.0 results: ips carry "version", no 1.1 fields."""
    return parse(version) < (1, 0, 0)


def require_supported(version: str) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(INCOMPATIBLE_VERSION, f"incompatible CNI version {version!r}",
                       "tortie supports " + ", ".join(SUPPORTED_VERSIONS))


def require_at_least(version: str, minimum: str, command: str) -> None:
    if not at_least(version, minimum):
        raise CNIError(INCOMPATIBLE_VERSION,
                       f"config version {version} does not allow {command}",
                       f"{command} needs cniVersion {minimum} or later")
