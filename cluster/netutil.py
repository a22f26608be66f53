"""Network helpers for torch.distributed groups that must stay on one interface (loopback by default)."""

from __future__ import annotations

import datetime
import socket

import torch.distributed as dist


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (another process may still take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def loopback_interface() -> str:
    """The name of the interface holding 127.0.0.1 ("lo" on Linux), e.g. for GLOO_SOCKET_IFNAME."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addrs):
            return name
    return "lo"


def bound_tcp_store(host: str, port: int, *, is_master: bool, timeout_s: float) -> dist.TCPStore:
    """A TCPStore whose server listens on (host, port) only.

    Given a host, TCPStore still listens on all interfaces (torch 2.13), so the master binds the
    socket itself and hands it over through `master_listen_fd`; the store then owns the fd (we
    detach it: a Python-side close would pull it from under the store's event loop). Clients
    retry until the master appears or `timeout_s` passes, so they may start first. Also usable as
    `init_process_group(store=...)` for the learner's default group.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    if not is_master:
        return dist.TCPStore(host, port, None, False, timeout)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # allow a port left in TIME_WAIT
        s.bind((host, port))
        s.listen(128)
    except OSError:
        s.close()
        raise
    return dist.TCPStore(host, port, None, True, timeout, wait_for_workers=False,
                         master_listen_fd=s.detach(), use_libuv=True)
