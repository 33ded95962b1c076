"""A team's MLflow tracking server: PostgreSQL as the backend store, artifacts served by
the server itself, listening on 127.0.0.1 unless told otherwise.

    python scripts/tracking_server.py                       # local PostgreSQL under runs/
    python scripts/tracking_server.py --port 5000 --host 0.0.0.0
    python scripts/tracking_server.py --db postgresql://user:pass@dbhost/mlflow \\
        --artifacts s3://bucket/mlflow                      # an existing database and S3

Without --db it starts a PostgreSQL of its own (Debian's `postgresql` package: initdb,
pg_ctl) with its data in runs/postgres/ and its socket there too, on a free loopback
port, and creates the database `mlflow`. PostgreSQL refuses to run as root: as root, the
data folder belongs to the system user `gpucnn-pg` (made when missing) and the server runs
as that user through `runuser`. Then it runs `mlflow server` with that database and
`--serve-artifacts`, so a worker machine needs only HTTP access to the server. Every job
then logs with `tracking.uri=http://HOST:PORT`. Ctrl-C (or SIGTERM) stops both.

SQLAlchemy 2.1 picks psycopg 3 for a plain `postgresql://` URI; the server is given
`postgresql+psycopg2://`, the driver the `scale` extra installs (psycopg2-binary).
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DB_USER = "gpucnn-pg"  # the system user that owns a local PostgreSQL's data as root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program: on the PATH, else Debian's /usr/lib/postgresql/*/bin."""
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise SystemExit(
            f"tracking_server: {name} not found: install PostgreSQL (apt-get install "
            "postgresql) or give --db postgresql://..."
        )
    return found


def as_db_user(command: list[str]) -> list[str]:
    """The command as the unprivileged database user when we are root (PostgreSQL
    refuses root), else as is."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", DB_USER, "--", *command]


def ensure_db_user() -> None:
    if os.geteuid() != 0:
        return
    try:
        pwd.getpwnam(DB_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", DB_USER],
            check=True,
        )


class LocalPostgres:
    """A PostgreSQL server of our own in ``folder`` (data, socket, log)."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port = folder.resolve(), port
        self.data = self.folder / "data"

    def start(self) -> str:
        ensure_db_user()
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, DB_USER)
            reach = subprocess.run(as_db_user(["test", "-w", str(self.folder)]))
            if reach.returncode != 0:
                raise SystemExit(
                    f"tracking_server: PostgreSQL refuses to run as root, and the user "
                    f"{DB_USER} cannot reach {self.folder} (a parent folder is closed to "
                    "other users): give --folder under a path every user can enter, e.g. "
                    "/var/tmp/gpucnn-postgres"
                )
        if not (self.data / "PG_VERSION").is_file():
            _run(
                as_db_user(
                    [postgres_bin("initdb"), "-D", str(self.data), "-U", "mlflow", "-A", "trust"]
                ),
                "initdb",
            )
        options = f"-k {self.folder} -h 127.0.0.1 -p {self.port}"
        _run(
            as_db_user(
                [postgres_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "log")]
                + ["-o", options, "-w", "-t", "60", "start"]
            ),
            f"starting PostgreSQL (its log: {self.folder / 'log'})",
        )
        created = subprocess.run(
            as_db_user(
                [postgres_bin("createdb"), "-h", str(self.folder), "-p", str(self.port)]
                + ["-U", "mlflow", "mlflow"]
            ),
            capture_output=True,
            text=True,
        )
        if created.returncode != 0 and "already exists" not in created.stderr:
            raise SystemExit(f"tracking_server: createdb failed: {created.stderr.strip()}")
        return f"postgresql+psycopg2://mlflow@127.0.0.1:{self.port}/mlflow"

    def stop(self) -> None:
        subprocess.run(
            as_db_user([postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"]),
            capture_output=True,
        )


def _run(command: list[str], what: str) -> None:
    """Run ``command``; its failure is one line naming ``what`` and its last message."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise SystemExit(f"tracking_server: {what} failed: {message[-1] if message else ''}")


def with_psycopg2(uri: str) -> str:
    """``postgresql://`` with the psycopg2 driver named (SQLAlchemy 2.1 would pick
    psycopg 3, which the extra does not install)."""
    if uri.startswith("postgresql://") or uri.startswith("postgres://"):
        return "postgresql+psycopg2://" + uri.split("://", 1)[1]
    return uri


def wait_until_up(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"tracking_server: mlflow server exited ({process.returncode})")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise SystemExit(f"tracking_server: {url} did not answer within {seconds:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", help="an existing PostgreSQL database (postgresql://...)")
    parser.add_argument("--folder", default="runs/postgres", help="a local PostgreSQL's home")
    parser.add_argument("--artifacts", default="runs/server-artifacts", help="where artifacts go")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=4, help="the server's worker processes")
    args = parser.parse_args(argv)
    local = None if args.db else LocalPostgres(Path(args.folder), free_port())
    backend = with_psycopg2(args.db) if args.db else local.start()
    artifacts = args.artifacts
    if "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        artifacts = str(Path(artifacts).resolve())
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend,
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        str(args.workers),
    ]
    server = subprocess.Popen(command, start_new_session=True)
    url = f"http://{'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{args.port}"

    def stop(*_: object) -> None:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        if local is not None:
            local.stop()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        wait_until_up(url, server)
        print(f"tracking server: {url}  (use tracking.uri={url}; Ctrl-C stops it)", flush=True)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
