"""Ray nodes started as an operator starts them (cluster/start_head.sh, cluster/start_worker.sh)
beside the suite's shared cluster, and a watch over the sockets of their processes.

Each node is `ray start --block` under the script: its own temp dir and free ports, stopped by
SIGTERM to that process (never `ray stop`: that ends every Ray process on the machine)."""
from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
RAY = ROOT / ".venv" / "bin" / "ray"


def free_ports(n: int) -> list[int]:
    """n distinct ports free on loopback right now (held open together so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def http_get(url: str, token: str | None = None) -> str | None:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def wait_for(condition, timeout_s: float, proc=None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the node exited ({proc.returncode}): {log.read_text()[-3000:] if log else ''}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s}s")
        time.sleep(0.25)


def node_env(tmp: Path, token: Path, **settings: str) -> dict[str, str]:
    """The scripts' environment: this one's minus any Ray setting of the suite's own cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "GEMINI_API_KEY"}
    env.update(BLOCK="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), **settings)
    return env


@dataclass
class Node:
    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, script: str, args: list[str], env: dict[str, str], log: Path) -> Node:
        with log.open("w") as f:
            proc = subprocess.Popen([str(ROOT / "cluster" / script), *args], env=env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        return cls(proc, log)

    def raylet(self) -> psutil.Process:
        return next(p for p in psutil.Process(self.proc.pid).children(recursive=True) if p.name() == "raylet")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


@dataclass
class SocketWatch:
    """Every listening socket (TCP LISTEN, UDP bound without a peer) and every remote address of
    the processes polled, gathered over repeated polls."""
    listening: dict[tuple[str, str, int], tuple[int, str]] = field(default_factory=dict)  # (proto, ip, port)
    peers: dict[str, tuple[int, str]] = field(default_factory=dict)  # remote ip -> (pid, process)
    polls: int = 0

    def poll(self, procs) -> list[tuple[int, str, list]]:
        """Records the sockets of procs; returns (pid, command line, connections) of each."""
        seen = []
        for p in procs:
            try:
                name = " ".join(p.cmdline())[:120] or p.name()
                conns = p.net_connections(kind="inet")
            except psutil.Error:
                continue
            for c in conns:
                udp = c.type == socket.SOCK_DGRAM
                if c.status == psutil.CONN_LISTEN or (udp and not c.raddr and c.laddr):
                    self.listening.setdefault(("udp" if udp else "tcp", c.laddr.ip, c.laddr.port), (p.pid, name))
                elif c.raddr:
                    self.peers.setdefault(c.raddr.ip, (p.pid, name))
            seen.append((p.pid, name, conns))
        self.polls += 1
        return seen

    def exposed(self) -> list[str]:
        """What listens or connects beyond the loopback range."""
        return ([f"listens {proto} {ip}:{port} pid {pid} {name}"
                 for (proto, ip, port), (pid, name) in self.listening.items() if not is_loopback(ip)]
                + [f"connects to {ip} pid {pid} {name}" for ip, (pid, name) in self.peers.items() if not is_loopback(ip)])

    def listing(self) -> str:
        return "\n".join(f"{proto} {ip}:{port} pid {pid} {name}"
                         for (proto, ip, port), (pid, name) in sorted(self.listening.items()))
