"""The backend's pid file beside its log, and who holds a port: a babysitter restart finds no orphan.

The babysitter writes `<log name>.pid` when it starts a backend and removes it when the backend is
gone. A babysitter that was killed (kill -9) leaves it behind; the next one ends that backend's
process group before it starts its own, and names whoever else holds the port.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from pathlib import Path


def start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, from /proc), or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            rest = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if rest[0] == b"Z":
        return None
    return int(rest[19])


def _pgid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def command_line(pid: int) -> str:
    """The command line of `pid` as one string ("" if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def write_pid_file(path: str, pid: int, argv: tuple[str, ...]) -> None:
    """Record the backend just started (its pid is also its process group)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"pid": pid, "start": start_ticks(pid), "argv": list(argv)}, fh)


def remove_pid_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def leftover_group(path: str) -> tuple[int, list[int]] | None:
    """The backend a previous babysitter left running: (its pid, the live pids of its group)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        pid, start = int(data["pid"]), data.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if start is None:
        return None
    leader = start_ticks(pid)
    if leader is not None and leader != start and _pgid(pid) == pid:
        return None  # the pid, and with it the group id, belongs to someone else now
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        other = int(entry)
        if _pgid(other) != pid:
            continue
        # Same group id and started no earlier than the recorded backend: one of its processes
        # (a pid and its group id are reused only after all of them are gone).
        ticks = start_ticks(other)
        if ticks is not None and ticks >= start and (other != pid or ticks == start):
            members.append(other)
    return (pid, sorted(members)) if members else None


async def end_leftover(path: str, timeout: float = 5.0) -> str | None:
    """End the group a previous babysitter left behind (TERM, then KILL); what was ended, or None."""
    found = leftover_group(path) if os.path.exists(path) else None
    if found is None:
        remove_pid_file(path)
        return None
    pid, members = found
    what = ", ".join(f"pid {m} ({command_line(m) or '?'})" for m in members)
    for sig in (signal.SIGTERM, signal.SIGCONT):
        for m in members:
            try:
                os.kill(m, sig)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = asyncio.get_running_loop().time() + timeout
    while any(start_ticks(m) is not None for m in members):
        if asyncio.get_running_loop().time() >= deadline:
            for m in members:
                try:
                    os.kill(m, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            break
        await asyncio.sleep(0.05)
    remove_pid_file(path)
    return f"ended the backend a previous babysitter left running (group {pid}): {what}"


def port_in_use(host: str, port: int) -> bool:
    """True if something accepts connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as fh:
                next(fh, None)
                for line in fh:
                    cols = line.split()
                    if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(cols[9])
        except OSError:
            continue
    return inodes


def port_holder(port: int) -> str:
    """Who listens on `port`: "pid N (command line)", or why it cannot be told."""
    inodes = _listening_inodes(port)
    if not inodes:
        return "an unknown process"
    wanted = {f"socket:[{i}]" for i in inodes}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in wanted:
                    return f"pid {entry} ({command_line(int(entry)) or '?'})"
            except OSError:
                continue
    return "a process this user cannot see (another user's?)"
