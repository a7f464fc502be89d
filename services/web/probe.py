"""`python -m services.web.probe URL [--wait SECONDS]`: exit 0 once the URL answers 200.

The HTTP twin of services.common.health_probe, for scripts/stack.sh to wait for /readyz.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request


def ready(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--wait", type=float, default=0.0)
    args = p.parse_args()
    deadline = time.monotonic() + args.wait
    while not ready(args.url):
        if time.monotonic() >= deadline:
            print(f"{args.url}: not ready", file=sys.stderr)
            return 1
        time.sleep(0.3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
