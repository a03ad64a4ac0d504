#!/usr/bin/env python3
"""Run every benchmark on this machine and write a dated report with a plot.

Each comparison is side by side in the same run (upstream llama-bench and llama-server from the
same build; llama-cpp-python when ``--llama-cpp-python PYTHON`` names an interpreter that has it, and its
absence reported otherwise). Writes
``benchmarks/results/<date>.md`` (our figure, the peer's, the ratio) and ``<date>.png``
(tokens/s against concurrent streams; time-to-first-token bars). Needs the ``bench`` extra.

    python benchmarks/run_all.py [--quick] [--llama-cpp-python PYTHON]
                                               (--quick: fewer repetitions, finishes in minutes)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

import bench_stream  # its report rows


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores, {system}, Python {platform.python_version()}"


def run(script: str, *args: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, str(HERE / script), *args, "--json", out.name], check=True)
        return json.loads(Path(out.name).read_text())


def write_report(stream: dict, server: dict, quick: bool) -> tuple[Path, Path]:
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.date.today().isoformat()
    report, plot = RESULTS / f"{stamp}.md", RESULTS / f"{stamp}.png"
    lines = [f"# Benchmarks, {stamp}{' (quick)' if quick else ''}", "",
             (f"Machine: {machine()}. Model: SmolLM2-135M-Instruct Q4_1, {stream['threads']} threads. "
              "Upstream tools are built from the same pinned llama.cpp, in the same build, and run in the same "
              "session as mullama."), "",
             "## Streaming (benchmarks/bench_stream.py)", "",
             "| measure | mullama | upstream / reference | ratio | goal |", "| --- | ---: | ---: | ---: | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in bench_stream.table_rows(stream)]
    if not stream.get("llama_cpp_python"):
        lines += ["", "llama-cpp-python was not measured (no --llama-cpp-python interpreter given)."]
    lines += ["", (f"## Server (benchmarks/bench_server.py): {server['parallel']} slots, {server['tokens']} tokens "
                   "per stream, streaming clients"), "",
              ("| clients | aggregate tok/s mullama | llama-server | ratio | per-stream tok/s mullama | llama-server |"
               " TTFT median ms mullama | llama-server | TTFT p95 ms mullama | llama-server | complete |"),
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mine, peer in zip(server["mullama"], server["llama-server"]):
        lines.append(f"| {mine['clients']} | {mine['aggregate_tps']:.1f} | {peer['aggregate_tps']:.1f} | "
                     f"**{mine['aggregate_tps'] / peer['aggregate_tps']:.3f}** | {mine['per_stream_tps']:.1f} | "
                     f"{peer['per_stream_tps']:.1f} | {mine['ttft_median_ms']:.1f} | {peer['ttft_median_ms']:.1f} | "
                     f"{mine['ttft_p95_ms']:.1f} | {peer['ttft_p95_ms']:.1f} | "
                     f"{mine['complete']}/{mine['clients']} vs {peer['complete']}/{peer['clients']} |")
    lines += ["", f"![plot]({plot.name})", ""]
    report.write_text("\n".join(lines))
    draw(stream, server, plot)
    return report, plot


def draw(stream: dict, server: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, color in (("mullama", "tab:blue"), ("llama-server", "tab:orange")):
        rows = server[name]
        clients = [r["clients"] for r in rows]
        left.plot(clients, [r["aggregate_tps"] for r in rows], "o-", color=color, label=f"{name} aggregate")
        left.plot(clients, [r["per_stream_tps"] for r in rows], "s--", color=color, alpha=0.6,
                  label=f"{name} per stream")
    left.set_xlabel("concurrent streams")
    left.set_ylabel("tokens/s")
    left.set_title(f"Server, {server['parallel']} slots")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    labels = ["fresh context\n5-token prompt", "same prompt\nagain"]
    ours = [stream["ttft_fresh_ms"], stream["ttft_again_ms"]]
    theirs = [stream["upstream_pp5_ms"], 1000 / stream["upstream_tg"]]
    x = range(len(labels))
    right.bar([i - 0.2 for i in x], ours, width=0.4, color="tab:blue", label="mullama TTFT")
    right.bar([i + 0.2 for i in x], theirs, width=0.4, color="tab:orange",
              label="upstream (pp5 eval / one decode step)")
    right.set_xticks(list(x), labels)
    right.set_ylabel("ms")
    right.set_title("Time to first token")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def redraw(stamp: str) -> None:
    """Draw the plot again from a saved report's figures (``<stamp>.json``)."""
    data = json.loads((RESULTS / f"{stamp}.json").read_text())
    draw(data["stream"], data["server"], RESULTS / f"{stamp}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions: a few minutes")
    parser.add_argument("--llama-cpp-python", metavar="PYTHON", help="an interpreter with llama-cpp-python installed")
    args = parser.parse_args(argv)
    stream_args = ["--reps", "3"] if args.quick else ["--reps", "7"]
    if args.llama_cpp_python:
        stream_args += ["--llama-cpp-python", args.llama_cpp_python]
    server_args = ["--clients", "1,4,8", "--tokens", "128", "--reps", "1" if args.quick else "5"]
    stream = run("bench_stream.py", *stream_args)
    server = run("bench_server.py", *server_args)
    report, plot = write_report(stream, server, args.quick)
    (RESULTS / f"{report.stem}.json").write_text(json.dumps({"stream": stream, "server": server}, indent=2))
    print(report.read_text())
    print(f"wrote {report} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
