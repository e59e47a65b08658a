"""For developers: time training, evaluation and data generation (`bench`), and check a GPU machine
in at most 5 minutes (`gpu-check`): the CUDA tests, the CPU default, the benchmark, a scaling row
and a paper-preset run, each under a time limit, into one JSON rewritten after each stage.

    python .ci/gpu_check.py bench [--device cpu] [--out FILE]
    python .ci/gpu_check.py gpu-check [--out FOLDER]
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import arc  # noqa: E402  (the project's modules, from the repository root)
import run  # noqa: E402
from tasks import make_batch  # noqa: E402

def benchmark(family, cfg, repeats=5, precisions=("fp32", "bf16")):
    """Training (in each precision), evaluation and data generation, timed."""
    device, generator = torch.device(cfg.device), torch.Generator(cfg.device).manual_seed(0)
    sync = lambda: device.type == "cuda" and torch.cuda.synchronize(device)

    def timed(fn):  # seconds per call after a warm-up call, waiting for the device at the ends
        fn(), sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return (time.perf_counter() - start) / repeats

    model = arc.build_model(family, cfg).to(device)
    optimizer, positions = arc.make_optimizer(model, cfg), arc.loss_positions(family, cfg, device)
    tasks = torch.as_tensor(family.universe.tuples(
        [r % family.universe.size for r in range(cfg.batch_size)]), device=device)
    batch = make_batch(family, tasks, cfg.context_length, cfg.cot, generator)
    step = {p: timed(lambda: arc.train_step(model, optimizer, batch.tokens, positions,
                                            cfg.grad_clip, p)) for p in precisions}
    evaluation = timed(lambda: arc.score(model, family, tasks, cfg, generator, 256))
    tasks = tasks.repeat(1024 // len(tasks) + 1, 1)[:1024]
    data = timed(lambda: make_batch(family, tasks, cfg.context_length, cfg.cot, generator))
    return dict(tokens_per_sample=batch.tokens.size(1), batch_size=cfg.batch_size,
                n_parameters=model.n_params, train_step_seconds=step,
                eval_samples_per_second=256 / evaluation, data_samples_per_second=1024 / data)

def run_bench(device="auto", out=None):
    """Training, evaluation and data speed at the paper's shapes and at the CPU default's."""
    runs = {name: run.make_run("parity", dict(overrides, device=device))[:2]
            for name, overrides in (("paper", dict(run.PAPER, d=15, k=3)), ("cpu_default", {}))}
    results = dict(device=runs["paper"][1].device, torch=torch.__version__,
                   threads=torch.get_num_threads())
    for name, (family, cfg) in runs.items():
        if cfg.device.startswith("cuda"):
            torch.set_float32_matmul_precision("high")  # as training has it
        r = results[name] = benchmark(family, cfg)
        print(f"{name}: {r['tokens_per_sample']} tokens x batch {r['batch_size']}, "
              f"{r['n_parameters'] / 1e6:.2f}M parameters; ms per training step: "
              + ", ".join(f"{p} {s * 1e3:.1f}" for p, s in r["train_step_seconds"].items())
              + f"; evaluation {r['eval_samples_per_second']:,.0f} samples/s; data "
              f"{r['data_samples_per_second']:,.0f} samples/s", flush=True)
    if out:
        arc.atomic_write(out, json.dumps(results, indent=1))
    return results

def gpu_check(out="out/gpu-check"):
    """The stages, each with a time limit, OUT/gpu-check.json rewritten after each (so that a
    cut-off check still reports)."""
    if not torch.cuda.is_available():
        raise ValueError("no CUDA GPU here: gpu-check checks and times one")
    out = os.path.abspath(out)
    path, python = os.path.join(out, "run.json"), sys.executable
    parity = lambda overrides: [python, "run.py", "parity", *run.words(overrides, "--"),
                                "--out", path]
    stages = [("CUDA tests", [python, "-m", "pytest", "-q", "-rs", "-k", "cuda"], 75),
              ("python run.py", parity({}), 75),
              ("benchmark", [python, os.path.abspath(__file__), "bench", "--out", path], 45),
              ("scaling row (10, 5)", parity(run.EXPERIMENTS["scaling"]["cpu"][0][1]), 60),
              ("paper preset", parity(dict(run.PAPER, d=15, k=3, steps=2000, eval_every=1000)),
               45)]
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, stages={})
    for stage, command, limit in stages:
        start = time.time()
        os.path.exists(path) and os.remove(path)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=ROOT)
            outcome = dict(exit=done.returncode, output=(done.stdout + done.stderr)[-1500:])
        except subprocess.TimeoutExpired as cut:
            outcome = dict(exit=f"cut off after {limit} s", output=str(cut.stdout)[-1500:])
        outcome["seconds"] = round(time.time() - start, 1)
        if os.path.exists(path):  # the stage's results, less their long lists and tables
            outcome["result"] = {k: v for k, v in json.load(open(path)).items() if k in (
                "unseen_tasks", "paper") or not isinstance(v, (list, dict))}
        report["stages"][stage] = outcome
        arc.atomic_write(os.path.join(out, "gpu-check.json"), json.dumps(report, indent=1))
        print(f"{stage}: exit {outcome['exit']} in {outcome['seconds']} s", flush=True)

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="time training, evaluation and data generation")
    bench.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps, or auto")
    bench.add_argument("--out", help="also write the figures to this JSON")
    commands.add_parser("gpu-check", help="check and time a GPU in at most 5 minutes").add_argument(
        "--out", default="out/gpu-check", help="folder of gpu-check.json and its runs")
    args = parser.parse_args(argv)
    try:
        run_bench(args.device, args.out) if args.command == "bench" else gpu_check(args.out)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")

if __name__ == "__main__":
    main()
