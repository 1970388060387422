"""Online serving in one call: start ``nanoflow serve`` (Llama-3-8B with dummy weights by
default; the dummy model has no tokenizer, so prompts go as token ids), run ``nanoflow bench
serve`` at several request rates, write one JSON with the device, command, date and each rate's
metrics, and stop the server.

Usage: python experiments/serve_bench.py [--model llama-3-8b] [--rates 4,16,inf] [--out DIR]
       python experiments/serve_bench.py --model builtin --num-prompts 8 --workload 32/16  (CPU)
Writes DIR/<gpu>/serve_bench/<model>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import add_out_argument, write_result

from nanoflow.measure import environment
from nanoflow.server.launch import ServerProcess


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--load-format", default=None, help="default: dummy, auto for 'builtin'")
    p.add_argument("--profile", default=None)
    p.add_argument("--workload", default="512/256")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--rates", default="4,16,inf", help="comma-separated request rates")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--budget", type=float, default=330.0, help="seconds for the whole run")
    add_out_argument(p)
    p.add_argument("server_args", nargs="*", help="extra `nanoflow serve` flags, after --")
    return p.parse_args()


def server_args(args: argparse.Namespace) -> list[str]:
    load_format = args.load_format or ("auto" if args.model == "builtin" else "dummy")
    out = [args.model, "--load-format", load_format, "--max-model-len", str(args.max_model_len)]
    if args.profile:
        out += ["--profile", str(Path(args.profile).resolve())]
    return out + args.server_args


def bench(url: str, args: argparse.Namespace, rate: str, folder: Path, timeout: float) -> dict:
    """One ``nanoflow bench serve`` run; its JSON record, or the failure if it had none."""
    out = folder / f"rate-{rate}.json"
    command = [
        sys.executable, "-m", "nanoflow.cli.main", "bench", "serve",
        "--base-url", url, "--workload", args.workload, "--num-prompts", str(args.num_prompts),
        "--request-rate", rate, "--output-json", str(out),
    ]  # fmt: skip
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            command,
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"request_rate": rate, "error": f"timed out after {timeout:.0f} s"}
    print(proc.stdout, end="", flush=True)
    if not out.is_file():
        return {"request_rate": rate, "error": proc.stderr[-2000:], "returncode": proc.returncode}
    record = json.loads(out.read_text())
    return {
        "request_rate": rate,
        "returncode": proc.returncode,
        "wall_s": time.perf_counter() - started,
        **record["result"],
    }


def main() -> int:
    args = parse_args()
    deadline = time.monotonic() + args.budget
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = {
        **environment(device),
        "experiment": "serve_bench",
        "model": args.model,
        "server_args": server_args(args),
        "workload": args.workload,
        "num_prompts": args.num_prompts,
        "rates": [],
    }
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        folder = Path(tmp)
        server = ServerProcess(server_args(args), log_path=folder / "server.log")
        try:
            server.start(timeout=args.startup_timeout)
            for rate in args.rates.split(","):
                print(f"# request rate {rate}", flush=True)
                left = deadline - time.monotonic() - 20  # keep time to stop the server
                if left < 10:
                    record["rates"].append({"request_rate": rate, "error": "out of time budget"})
                    continue
                record["rates"].append(bench(server.url, args, rate.strip(), folder, left))
        except RuntimeError as exc:
            record["error"] = str(exc)[-4000:]
        finally:
            record["server_exit_code"] = server.stop()
            record["server_log_tail"] = server.log()[-4000:]
    print(f"wrote {write_result(args.out, 'serve_bench', Path(args.model).name, record)}")
    ok = "error" not in record and all("error" not in r for r in record["rates"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
