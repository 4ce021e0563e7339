"""``fedloom dashboard``: a live view of the run directories under one folder (needs fedloom[dashboard])."""

from __future__ import annotations

INSTALL = "the dashboard needs starlette and uvicorn: pip install 'fedloom[dashboard]'"


class DashboardUnavailable(ImportError):
    """starlette or uvicorn is not installed."""


def create_app(root, poll_s: float = 0.5):
    """The Starlette app serving the runs under ``root`` (see fedloom.dashboard.app)."""
    try:
        from fedloom.dashboard.app import create_app as create
    except ImportError as err:
        raise DashboardUnavailable(f"{INSTALL} ({err})") from err
    return create(root, poll_s)


def serve(root, host: str = "127.0.0.1", port: int = 8050, background: bool = False):
    """Serve the dashboard with uvicorn: blocking, or in a daemon thread (``background``), which is returned
    with the server as ``thread.server``."""
    try:
        import uvicorn
    except ImportError as err:
        raise DashboardUnavailable(f"{INSTALL} ({err})") from err
    server = uvicorn.Server(uvicorn.Config(create_app(root), host=host, port=port, log_level="warning"))
    if not background:
        server.run()
        return None
    import threading
    import time

    thread = threading.Thread(target=server.run, name="fedloom-dashboard", daemon=True)
    thread.server = server
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)  # bound (or failed, e.g. the port is taken) before the caller prints its URL
    return thread


def url(host: str, port: int) -> str:
    """The dashboard's address for ``host`` and ``port`` (an IPv6 host in brackets)."""
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
