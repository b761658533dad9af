"""Throughput of `consistory batch`: images/s with 1 and with 2 model actors on one machine.

    python bench/batch_throughput.py --preset tiny --json bench/results/batch-tiny.json
    python bench/batch_throughput.py --preset full --device cuda --runs 1x1 2x1   # a node with 2 GPUs

Each run is a real batch on a local Ray: a JSONL spec of `--stories` stories of `--prompts`
prompts, written to a temporary directory, measured from the moment the first actor has its
model loaded to the end (model loading is reported apart). A run "AxT" is A actors of T torch
threads each; the default runs are 1x1 and 2x1. On a CPU the actors share the machine's cores
(each gets cores / A Ray CPUs), so the figures say how well stories run side by side on fixed
hardware, not what a second GPU would add. `--runs 1x2` adds one actor using both cores through
torch's threads; Ray runs actors at a lower priority (nice), so that run in particular is only
meaningful on an otherwise idle machine (its threads wait for each other at every op).

`--mode anchors --extend-batches 1 4` runs each shape with each `--extend-batch` (new images per
`generate_from_anchors` call), interleaved: what batching a story's new images gains.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from common import PROMPTS, add_common_args, device_name, report, resolve


def write_spec(path: Path, stories: int, prompts: int) -> None:
    lines = []
    for i in range(stories):
        texts = [PROMPTS[(i + j) % len(PROMPTS)] for j in range(prompts)]
        lines.append(json.dumps({"id": f"story-{i:03d}", "prompts": texts, "subjects": ["dog"], "seed": 100 * i}))
    path.write_text("\n".join(lines) + "\n")


def run(args: argparse.Namespace, actors: int, threads: int, extend: int, spec: Path, dest: Path, cpus: int) -> dict:
    from consistory.cli.main import build_parser
    from consistory_batch.runner import run_batch

    argv = ["batch", str(spec), "--out", str(dest), "--model", args.preset, "--steps", str(args.steps),
            "--height", str(args.height), "--width", str(args.width), "--actors", str(actors),
            "--device", "cuda" if args.device.startswith("cuda") else "cpu", "--mode", args.mode,
            "--extend-batch", str(extend), "--no-progress"]
    if not args.device.startswith("cuda"):
        argv += ["--cpus-per-actor", f"{cpus / actors:g}", "--torch-threads", str(threads)]
    if run_batch(build_parser().parse_args(argv)) != 0:
        raise SystemExit(f"the batch with {actors} actor(s) had failures; see {dest}/manifest.json")
    summary = json.loads((dest / "manifest.json").read_text())["summary"]
    return {
        "run": label(actors, threads, extend, args),
        "extend_batch": extend,
        "actors": actors,
        "threads_per_actor": threads,
        "images": summary["images"],
        "generating_s": summary["generating_s"],
        "images_per_s": summary["images_per_s"],
        "images_per_s_per_replica": summary["images_per_s_per_replica"],
        "load_s_per_actor": [r["load_s"] for r in summary["per_replica"]],
    }


def label(actors: int, threads: int, extend: int, args: argparse.Namespace) -> str:
    return f"{actors}x{threads}" + (f"_e{extend}" if len(args.extend_batches) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.set_defaults(preset="tiny")
    parser.add_argument("--stories", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=3, help="prompts per story (2 anchors + the rest)")
    parser.add_argument("--runs", nargs="+", metavar="AxT",
                        help="actors x torch threads per actor (default: 1x1 2x1)")
    parser.add_argument("--mode", choices=("story", "anchors"), default="story")
    parser.add_argument("--extend-batches", nargs="+", type=int, default=[4], metavar="N",
                        help="--mode anchors: new images per actor call, one run per value (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="batches per run, reported by their median (default 3)")
    args = resolve(parser.parse_args())

    import ray

    cpus = os.cpu_count() or 1
    shapes = [tuple(int(n) for n in text.lower().split("x")) for text in (args.runs or ["1x1", "2x1"])]
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
    figures: dict = {"device": device_name(args.device), "preset": args.preset, "size": f"{args.height}x{args.width}",
                     "steps": args.steps, "stories": args.stories, "prompts_per_story": args.prompts,
                     "mode": args.mode, "extend_batches": args.extend_batches, "cores": cpus}
    try:
        with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
            spec = Path(tmp) / "stories.jsonl"
            write_spec(spec, args.stories, args.prompts)
            # Interleaved (1x1, 2x1, 1x1, ...), so that a slow spell of a shared machine
            # falls on every run shape rather than on one.
            runs = [run(args, a, t, e, spec, Path(tmp) / f"out-{label(a, t, e, args)}-{r}", cpus)
                    for r in range(args.repeats) for a, t in shapes for e in args.extend_batches]
    finally:
        ray.shutdown()
    for a, t in shapes:
        for e in args.extend_batches:
            name = label(a, t, e, args)
            mine = [r for r in runs if r["run"] == name]
            rate = statistics.median(r["images_per_s"] for r in mine)
            figures[f"images_per_s_{name}"] = rate
            figures[f"images_per_s_per_replica_{name}"] = rate / a
            figures[f"load_s_{name}"] = statistics.median(max(r["load_s_per_actor"]) for r in mine)
        if len(args.extend_batches) > 1:
            low, high = min(args.extend_batches), max(args.extend_batches)
            figures[f"gain_e{high}_over_e{low}_{a}x{t}"] = (figures[f"images_per_s_{label(a, t, high, args)}"]
                                                          / figures[f"images_per_s_{label(a, t, low, args)}"])
    figures["runs"] = runs
    report({k: v for k, v in figures.items() if k != "runs"}, None)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
