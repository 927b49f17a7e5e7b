"""The systemd notify protocol (sd_notify(3)) without a library.

Only the master talks to systemd (``NotifyAccess=main``): children call
:func:`clear_environment` after fork so that neither they nor the subprocesses of task code
inherit the socket.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)

_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def notify(*fields: str) -> bool:
    """Send ``KEY=VALUE`` fields (``"READY=1"``, ``"STATUS=..."``) in one datagram.

    Returns True when sent; False without ``NOTIFY_SOCKET`` or when sending failed, which is
    logged at debug level only: a missing notification must never take the daemon down.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.debug("unsupported NOTIFY_SOCKET address %r", address)
        return False
    payload = "\n".join(fields).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, address)
    except OSError as exc:
        log.debug("sd_notify to %r failed: %s", address, exc)
        return False
    return True


def reloading() -> bool:
    """Announce a reload; systemd wants ``MONOTONIC_USEC`` with it, and ``READY=1`` after."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None if not ours."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2_000_000


def clear_environment() -> None:
    """Forget the notify socket and watchdog settings in this process and its future children."""
    for name in _ENV_VARS:
        os.environ.pop(name, None)
