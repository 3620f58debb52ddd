"""Latency of the demo page's box query, image already cached (goal: <= 300 ms on a CPU).

A box query is what the page does when a box is drawn: CLOC's Prompter on the image's cached ViT
outputs and the top-5 labels of the vocabulary, plus the best CLIP baseline on the same box (which,
being a CLIP baseline, encodes a masked or cropped image per box), and the redrawn picture. This
script starts the page (``python -m cloc_demo.app``, one torch thread, no MLLM) on a free port,
opens a session with ``gradio_client`` as a browser would, picks the first test scene, then sends
``--repeats`` box queries, each with a new box, and prints:

* the round trip per query (request, queue, model, picture and answer), median and max;
* the model time the page itself reports per query (the "(N ms)" of its status line).

The app is run as a separate process (the benchmarks may not import the ``cloc_demo`` main job, and
a real server is what a user waits for). Usage, from the repository root after ``make demo``::

    .venv/bin/python benchmarks/app_latency.py
    .venv/bin/python benchmarks/app_latency.py --cloc DIR --clip DIR --data DIR --repeats 50

It exits 0 whenever it ran; it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_MS = 300.0


def start_app(args) -> tuple[subprocess.Popen, str]:
    """The page in a child process, and its URL (read from the line it prints)."""
    cmd = [sys.executable, "-m", "cloc_demo.app", "--cloc", args.cloc, "--clip", args.clip, "--mllm", "",
           "--data", args.data, "--port", "0", "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: list[str] = []

    def read():
        for line in proc.stdout:
            match = re.search(r"CLOC demo page: (\S+)", line)
            if match and not found:
                found.append(match.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + args.start_timeout
    while not found:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise SystemExit(f"the app did not start (exit code {proc.poll()}); run `{' '.join(cmd)}` to see why")
        time.sleep(0.2)
    return proc, found[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cloc", default="runs/demo/cloc")
    parser.add_argument("--clip", default="runs/demo/clip")
    parser.add_argument("--data", default="runs/demo/data", help="dataset folder whose first test scene is used")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the app (default 1)")
    parser.add_argument("--start-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    from gradio_client import Client

    proc, url = start_app(args)
    try:
        client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
        scene = client.predict("0", api_name="/pick_scene")
        status = scene[1]
        size = re.search(r"\((\d+) x (\d+) px\)", status)
        if size is None:
            raise SystemExit(f"no test scene in {args.data!r}: {status}")
        width, height = int(size.group(1)), int(size.group(2))
        rounds, model_ms = [], []
        for i in range(args.repeats + 1):
            frac = 0.25 + 0.25 * ((i * 7) % 10) / 10
            x1, y1 = (i % 5) / 5 * (1 - frac) * width, (i % 3) / 3 * (1 - frac) * height
            box = f"{x1:.1f}, {y1:.1f}, {x1 + frac * width:.1f}, {y1 + frac * height:.1f}"
            start = time.perf_counter()
            out = client.predict(box, api_name="/box")
            elapsed = (time.perf_counter() - start) * 1000
            reported = re.search(r"\((\d+) ms\)", out[1])
            if reported is None:
                raise SystemExit(f"the box query failed: {out[1]}")
            (rounds if i else []).append(elapsed)  # the first query also runs the image's ViT pass
            (model_ms if i else []).append(float(reported.group(1)))
            if not i:
                print(f"first box query of the image (includes its one ViT pass): {elapsed:.1f} ms round trip")
        median = statistics.median(rounds)
        print(f"image {width}x{height}, {args.threads} torch thread(s), load average {os.getloadavg()[0]:.2f}")
        print(f"box query, image cached: round trip median {median:.1f} ms, max {max(rounds):.1f} ms over "
              f"{len(rounds)} boxes; model time median {statistics.median(model_ms):.0f} ms")
        print(f"goal <= {GOAL_MS:.0f} ms: {'met' if median <= GOAL_MS else 'NOT met'}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
