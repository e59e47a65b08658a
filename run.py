"""Reproduce the paper's ARC task-generalization experiments from the command line.

    python run.py                      # the CPU default: sparse parity, CoT, minutes on a laptop
    python run.py parity --no-cot      # the same, answer-only in-context learning
    python run.py parity --help        # every knob, with its meaning in the paper

Every run prints progress, ends with a table, and writes a JSON file of results.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable

import numpy as np
import torch

from arc import (POSITIONS, Checkpoint, Exclusion, Interrupted, TrainConfig, atomic_write, benchmark, check_memory,
                 coverage, flag_name, parse_task_count, read_checkpoint, run_split, save_json, split_tasks)
from tasks import ARITHMETIC_OPS, LANGUAGES, Arithmetic, SparseParity, Translation



def log(line):
    print(line, flush=True)  # flushed, so a run logging to a file can be followed as it goes


@dataclass
class Family:
    add_args: Callable  # adds the family's own flags to its subcommand
    build: Callable  # parsed flags -> the ARCFamily
    preset: dict  # the family's CPU preset: the TrainConfig fields (and common flags) where it departs from the recipe


def add_parity_args(parser):
    parser.add_argument("--d", type=int, default=7, help="input length: x is uniform in {0,1}^d; D = d options per step")
    parser.add_argument("--k", type=int, default=3,
                        help="secret coordinates per task: the answer is the parity of k bits; T = k steps")
    parser.add_argument("--unsorted", action=argparse.BooleanOptionalAction, default=True,
                        help="tasks are ordered k-tuples (d!/(d-k)! tasks) instead of the paper's sorted ones "
                             "(C(d,k)); the chain of thought follows the tuple's order")


def build_parity(args):
    return SparseParity(args.d, args.k, unsorted=args.unsorted)


def add_arithmetic_args(parser):
    parser.add_argument("--modulus", type=int, default=10, help="p: inputs and answers are residues mod p")
    parser.add_argument("--ops", nargs="+", default=["add", "sub", "mul"], metavar="OP",
                        help=f"the D operations a step chooses from, of: {' '.join(ARITHMETIC_OPS)}")
    parser.add_argument("--steps-per-task", type=int, default=6, help="T: operations applied one after another")


def build_arithmetic(args):
    return Arithmetic(tuple(args.ops), args.steps_per_task, args.modulus)


def add_translation_args(parser):
    parser.add_argument("--languages", type=int, default=6,
                        help=f"D: a step translates into one of the first D of {', '.join(LANGUAGES)}")
    parser.add_argument("--steps-per-task", type=int, default=6,
                        help="T: languages per task (repeats allowed); the query shows step 1, the model writes 2..T")


def build_translation(args):
    return Translation(args.languages, args.steps_per_task)


# `python run.py` is `python run.py parity`: the CPU default is TrainConfig's recipe on parity's own defaults,
# ordered 3-tuples of 7 coordinates, trained on 3 d ln d = 41 of the 210 tasks (every (step, option) pair
# covered). Each other family's preset names the fields where it departs from the recipe.
FAMILIES = {
    "parity": Family(add_parity_args, build_parity, {}),
    # Arithmetic (docs/recipe.md): no weight decay, 12 examples, and an input curriculum, without which add and
    # sub are never told apart in context: small operands first, where they move y_t in opposite directions.
    "arithmetic": Family(add_arithmetic_args, build_arithmetic,
                         dict(n_train_tasks="72", context_length=12, weight_decay=0.0, input_curriculum=0.6, steps=12000)),
    # Translation is learned by a plain two-layer GPT-2 in a few hundred steps.
    "translation": Family(add_translation_args, build_translation,
                          dict(n_train_tasks="40", context_length=4, n_layer=2, position="absolute", embedding_std=0.02,
                               token_shift=False, weight_decay=0.0, lr=3e-3, batch_size=32, steps=800, eval_every=500)),
}


def add_common_args(parser):
    d = TrainConfig()  # the one source of every default below; a family's preset overrides some
    parser.add_argument("--n-train-tasks", default="3dlogd",
                        help="training tasks, drawn after the unseen test tasks: an integer or a multiple of "
                             "D ln D such as 3dlogd (the paper's claim: about D ln D suffice with CoT)")
    parser.add_argument("--n-test-tasks", type=int, default=200,
                        help="unseen test tasks, drawn first (fewer when the universe is small)")
    parser.add_argument("--context-length", type=int, default=d.context_length,
                        help="N: in-context examples per sample, all of one task; the last is the query")
    parser.add_argument("--no-cot", action="store_true",
                        help="answer-only in-context learning: only the final answer y_T, no intermediate steps")
    parser.add_argument("--missing-coordinate", type=int, nargs=2, metavar=("C", "V"),
                        help="no training task has theta_C = V (C is a 1-based step, V an option): paper Section 5.1")
    parser.add_argument("--missing-pair", type=int, nargs=2, metavar=("A", "B"),
                        help="no training task contains both options A and B: paper Section 5.1")
    parser.add_argument("--n-layers", dest="n_layer", metavar="N", type=int, default=d.n_layer, help="transformer blocks (paper: 3)")
    parser.add_argument("--n-heads", dest="n_head", metavar="N", type=int, default=d.n_head, help="attention heads per block (paper: 1)")
    parser.add_argument("--width", dest="n_embd", metavar="WIDTH", type=int, default=d.n_embd, help="embedding width (paper: 192)")
    parser.add_argument("--position", choices=POSITIONS, default=d.position,
                        help="absolute: GPT-2's learned absolute positions (the paper's); broadcast: each example's input "
                             "x enters as one position (a learned embedding per coordinate and value, summed) and is "
                             "added, through a learned map, to the example's answer positions (docs/recipe.md)")
    parser.add_argument("--embedding-std", type=float, default=d.embedding_std,
                        help="initial std of the token, position and input embeddings (GPT-2 and the paper: 0.02); "
                             "with --position broadcast, 0.3 or 1.0 let the in-context circuit form where 0.02 "
                             "stays on the plateau (docs/recipe.md)")
    parser.add_argument("--token-shift", action=argparse.BooleanOptionalAction, default=d.token_shift,
                        help="every position also gets a learned map of the previous position's embedding, so an "
                             "answer step meets the step before it in one vector (not in the paper's GPT-2)")
    parser.add_argument("--dropout", type=float, default=d.dropout,
                        help="dropout on embeddings, attention weights and residual branches (GPT-2 and the paper: 0.1)")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate (paper: 8e-5)")
    parser.add_argument("--min-lr", type=float, default=d.min_lr, help="the cosine schedule's floor (paper: 1e-6)")
    parser.add_argument("--adam-beta2", type=float, default=d.adam_beta2, help="AdamW's beta2 (paper: 0.999)")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay,
                        help="AdamW weight decay on matrices and embeddings (paper: 0.01 on every parameter)")
    parser.add_argument("--decay-all", action=argparse.BooleanOptionalAction, default=d.decay_all,
                        help="weight decay on every parameter, biases and LayerNorm gains too (paper)")
    parser.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient norm clipping; 0: none (paper)")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup, then cosine decay")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per step (paper: 64)")
    parser.add_argument("--steps", type=int, default=d.steps,
                        help="optimizer steps, the lr decaying over them; default: by rule, the lr held until the "
                             "training tasks reach --fit-accuracy, then decayed over --decay-fraction of the steps so far")
    parser.add_argument("--fit-accuracy", type=float, default=d.fit_accuracy,
                        help="by rule: training-task exact match at a progress check that ends the hold")
    parser.add_argument("--decay-fraction", type=float, default=d.decay_fraction,
                        help="by rule: the decay's length, as a fraction of the steps before it")
    parser.add_argument("--max-steps", type=int, default=d.max_steps,
                        help="by rule: the most steps; the decay starts in time to end by then")
    parser.add_argument("--schedule-steps", type=int, default=d.schedule_steps,
                        help="length of the cosine decay (default: --steps), which training may stop before")
    parser.add_argument("--target-accuracy", type=float, default=d.target_accuracy,
                        help="stop once a progress evaluation's unseen-task exact match reaches this; the final "
                             "score is then taken on fresh samples, and the JSON records when it was reached")
    parser.add_argument("--n-train-total", type=int, default=None,
                        help="train on a fixed dataset of this many samples split evenly across the training "
                             "tasks, each once an epoch in a new order (the paper's setup), instead of fresh samples")
    parser.add_argument("--input-curriculum", type=float, default=d.input_curriculum,
                        help="if > 0: this fraction of the steps raises the inputs from the family's easiest (held for the "
                             "curriculum's first 30%%) to its true distribution (arithmetic: small operands first; evaluation always uses "
                             "the true one)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step's model")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=d.precision,
                        help="bf16: autocast matmuls to bf16 (weights stay fp32); auto: fp32, with TF32 matmuls on "
                             "CUDA (the recipe was measured in fp32; see `python run.py bench` for bf16's speed)")
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between progress evaluations")
    parser.add_argument("--eval-samples", type=int, default=d.eval_samples,
                        help="fresh samples per task group in the final evaluation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task split, the data and the model")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps, or auto (the best available)")
    parser.add_argument("--out", help="results JSON file (default: out/<family>-<time>.json)")
    parser.add_argument("--save", help="checkpoint file, written atomically every few minutes and at the end")
    parser.add_argument("--resume", help="continue from this checkpoint (same flags as the run that wrote it)")


def resolve_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda, cuda:N, mps or auto")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise ValueError(f"device {name!r} is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA devices")
    return name


def train_config(args):
    """The TrainConfig the parsed flags describe."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["cot"] = not args.no_cot
    values["device"] = resolve_device(args.device)
    cfg = TrainConfig(**values)
    cfg.check()
    return cfg


def print_table(results):
    log(f"\n{'task group':<28}{'tasks':>6}{'generated':>11}{'teacher-forced':>16}   per step (generated)")
    for group in ("train_tasks", "unseen_tasks", "unseen_in_distribution", "unseen_out_of_distribution",
                  "unseen_covered", "unseen_uncovered"):
        if group in results:
            r = results[group]
            steps = " ".join(f"{p:.3f}" for p in r["per_step"])
            log(f"{group.replace('_', ' '):<28}{len(r['per_task']):>6}{r['exact_match_generated']:>11.3f}"
                f"{r['exact_match_teacher_forced']:>16.3f}   {steps}")


def prepare_run(args):
    """Everything a run needs before training, checked: the family, training config, exclusion and split."""
    family = FAMILIES[args.family].build(args)
    cfg = train_config(args)
    exclusion = Exclusion(tuple(args.missing_coordinate) if args.missing_coordinate else None,
                          tuple(args.missing_pair) if args.missing_pair else None)
    exclusion.check(family.n_options, family.n_steps)
    if exclusion.any() and not exclusion.n_excluded(family.universe):
        raise ValueError("the exclusion removes no task of this family: nothing would be out of distribution")
    n_train = parse_task_count(args.n_train_tasks, family.n_options)
    if args.n_test_tasks < 1:
        raise ValueError(f"n-test-tasks must be at least 1, got {args.n_test_tasks}")
    if args.resume and not os.path.isfile(args.resume):
        raise ValueError(f"--resume file {args.resume} does not exist")
    split = split_tasks(family.universe, n_train, args.seed, exclusion, max_test=args.n_test_tasks)
    if cfg.n_train_total is not None and cfg.n_train_total < len(split.train):
        raise ValueError(f"n-train-total {cfg.n_train_total} is fewer than one sample for each of the "
                         f"{len(split.train)} training tasks")
    check_memory(family, cfg)
    outputs = {flag: getattr(args, flag) for flag in ("out", "save", "resume") if getattr(args, flag)}
    checkpoint = args.save or args.resume  # where checkpoints are written
    if args.out and checkpoint and os.path.abspath(args.out) == os.path.abspath(checkpoint):
        raise ValueError("--out names the checkpoint file: the results would overwrite it")
    for flag, path in outputs.items():
        check_writable(path, flag)
    for path in outputs.values():  # every check passed: only now make the folders
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return family, cfg, exclusion, split


def check_writable(path, flag):
    """Refuse, before training, an output file that could not be written: a folder, or a file below a
    file, or a place where the nearest existing folder takes no new file. Makes nothing."""
    if os.path.isdir(path):
        raise ValueError(f"--{flag} {path} is a folder: give a file name")
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--{flag} {path} cannot be written: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(f"--{flag} {path} cannot be written: {error.strerror} in {existing}")


def run_definition(args, split):
    """What defines a run beside its TrainConfig: the family, its own flags (d, k, ops, ...), the exclusion
    and the split. A checkpoint stores it, and a resume that would change it is refused."""
    parser = argparse.ArgumentParser()
    FAMILIES[args.family].add_args(parser)
    family_flags = {name: getattr(args, name) for name in vars(parser.parse_args([]))}
    return dict(family=args.family, **family_flags, missing_coordinate=args.missing_coordinate,
                missing_pair=args.missing_pair, train_tasks=split.train.tolist(), test_tasks=split.test.tolist())


def provenance(cfg):
    """What a result depends on beyond its flags: the settings as resolved, the code, torch and the machine."""
    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        commit, changed = git("rev-parse", "HEAD") or None, bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit, changed = None, None
    device = torch.device(cfg.device)
    precision = {"bf16": "bf16 autocast"}.get(cfg.precision, "fp32, TF32 matmuls" if device.type == "cuda" else "fp32")
    return dict(train_config=asdict(cfg), precision=precision, torch=torch.__version__, git_commit=commit,
                uncommitted_changes=changed, threads=torch.get_num_threads(),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type)


def run_family(args):
    """One training run of one family: split, train, evaluate, write JSON. Returns the results."""
    args.out = out = args.out or os.path.join("out", f"{args.family}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    family, cfg, exclusion, split = prepare_run(args)
    log(f"{args.family}: D={family.n_options}, T={family.n_steps}, {split.n_total} tasks, "
        f"{'CoT' if cfg.cot else 'answer only'}, device {cfg.device}, results to {out}")
    if split.uncovered:
        log(f"note: no training task has the (step, option) pairs {split.uncovered}; {split.test_uncovered.sum()} of the "
            f"{len(split.test)} unseen tasks use one, and the ARC theory does not expect those to be solved")
    checkpoint = Checkpoint(path=args.save or args.resume, resume=args.resume, run=run_definition(args, split))
    results = run_split(family, split, cfg, exclusion, checkpoint, log)
    results = dict(config=vars(args), family=args.family, n_total_tasks=split.n_total, n_train_tasks=len(split.train),
                   n_test_tasks=len(split.test), train_task_list=split.train.tolist(),
                   test_task_list=split.test.tolist(), uncovered_step_options=split.uncovered, **provenance(cfg),
                   **results)
    save_json(out, results)
    print_table(results)
    log(f"\n{results['wall_seconds']:.0f}s, {results['tokens_per_second']:,.0f} training tokens/s; results in {out}")
    return results


def run_bench(args):
    """Training, decoding and data speed at the paper's shapes and at the CPU default's."""
    device = resolve_device(args.device)
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as training has it
    parity = build_parser().parse_args(["parity"])
    shapes = {
        "paper": (SparseParity(15, 3), TrainConfig(**PAPER_RECIPE, device=device)),
        "cpu_default": (build_parity(parity), train_config(parity)),
    }
    results = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads()}
    for name, (family, cfg) in shapes.items():
        cfg.device = device
        r = results[name] = benchmark(family, cfg)
        by_precision = ", ".join(f"{p} {s * 1e3:.1f}" for p, s in r["train_step_seconds_by_precision"].items())
        log(f"{name}: {r['tokens_per_sample']} tokens ({r['positions_per_sample']} positions) x batch {r['batch_size']}, "
            f"{r['n_parameters'] / 1e6:.2f}M parameters\n"
            f"  training   {r['train_step_seconds'] * 1e3:8.1f} ms/step ({r['train_precision']}; ms/step by precision: {by_precision})  "
            f"{r['train_tokens_per_second']:,.0f} tokens/s  {r['achieved_flops'] / 1e9:.1f} GFLOP/s = MFU {r['mfu']:.1%} "
            f"of a measured {r['matmul_peak_flops'] / 1e9:.0f} GFLOP/s {r['train_precision']} matmul\n"
            f"  generate   {r['generate_tokens_per_second']:12,.0f} answer tokens/s, {r['generate_speedup_vs_recompute']:.1f}x "
            f"recomputation (identical: {r['generate_cached_equals_recompute']})\n"
            f"  data       {r['data_samples_per_second']:12,.0f} samples/s")
        hf = r["hf_gpt2"]
        log(f"  HF GPT2LMHeadModel comparison skipped: {hf['skipped']}" if "skipped" in hf else
            f"  vs HF GPT2LMHeadModel (eager, fp32), alternating: {hf['hf_train_step_seconds']:.2f} s vs "
            f"{hf['ours_train_step_seconds']:.2f} s per step ({hf['ours_precision']}) = {hf['speedup_vs_hf']:.2f}x; "
            f"both fp32: {hf['speedup_vs_hf_both_fp32']:.2f}x")
    results.update({f"{key}": value for key, value in results["paper"].items()})  # paper shapes at top level
    if args.out:
        save_json(args.out, results)
        log(f"written to {args.out}")
    return results


# ----------------------------------------------------------------------------- experiments
# An experiment is data: for each preset, a list of runs, each a family and the fields (flags) where
# it departs from that family's preset. One driver (run_experiment) executes them all.

# The authors' setup (README: the paper preset): GPT-2 with dropout 0.1, AdamW (betas 0.9/0.999, weight decay
# 0.01 on every parameter, no clipping), cosine from 8e-5 to 1e-6 over 8,000 epochs of a fixed 25,000-sample
# dataset (390 steps each), batch 64. Those 3.1 million steps are cut to 1,000 epochs at most, and to fewer
# where a run reaches its target.
PAPER_RECIPE = dict(n_layer=3, n_head=1, n_embd=192, context_length=40, position="absolute", embedding_std=0.02,
                    token_shift=False, dropout=0.1, lr=8e-5, min_lr=1e-6, adam_beta2=0.999, weight_decay=0.01,
                    decay_all=True, grad_clip=0.0, warmup_steps=0, batch_size=64, n_train_total=25000, steps=390000,
                    schedule_steps=3120000, eval_every=1950)
PAPER_PARITY = dict(**PAPER_RECIPE, unsorted=False)  # the paper's tasks are sorted tuples
# The CPU presets run the recipe at the paper's sizes where a 2-core CPU allows (n-tasks, scaling,
# task-selection), elsewhere at the default's d = 7; docs/results.md gives each run's time.
# The paper's scaling table, (d, k, training tasks, unseen-task exact match %), sorted tuples; the CPU
# recipe learns the k steps one after another, so a row's steps grow with k.
PAPER_SCALING = [(10, 5, 69, 98.51), (15, 7, 121, 99.12), (20, 10, 180, 98.67), (25, 12, 241, 98.60), (30, 15, 306, 98.10)]
EXCLUSIONS = (dict(missing_coordinate=(2, 5)), dict(missing_pair=(4, 6)))  # paper Section 5.1


def cpu_scaling(rows):
    return [("parity", dict(d=d, k=k, unsorted=False, n_train_tasks=str(n))) for d, k, n, _ in rows]


EXPERIMENTS = {
    "icl-vs-cot": {  # E1: the paper's is Parity(10,2) with 45 tasks; on CPU, the CPU default's problem
        # the same fixed steps for both: answer only never fits its training tasks, so no rule would end it
        "cpu": [("parity", dict(steps=8000)), ("parity", dict(no_cot=True, steps=8000))],
        "paper": [("parity", dict(d=10, k=2, n_train_tasks="20", **PAPER_PARITY, **cot)) for cot in ({}, dict(no_cot=True))],
    },
    "n-tasks": {  # E3: unseen-task accuracy against the number of training tasks, around D ln D
        "cpu": [("parity", dict(d=10, k=3, unsorted=False, n_train_tasks=n)) for n in ("0.5dlogd", "dlogd", "2dlogd", "3dlogd")],
        "paper": [("parity", dict(d=d, k=3, n_train_tasks=n, **PAPER_PARITY))
                  for d in (10, 15, 20) for n in ("0.5dlogd", "dlogd", "2dlogd", "3dlogd")],
    },
    "scaling": {  # E2: the paper's table; cpu: its first two rows, long: all five
        "cpu": cpu_scaling(PAPER_SCALING[:2]),
        "long": cpu_scaling(PAPER_SCALING),
        "paper": [("parity", dict(d=d, k=k, n_train_tasks=str(n), **PAPER_PARITY, target_accuracy=round(accuracy / 100, 4)))
                  for d, k, n, accuracy in PAPER_SCALING],
    },
    "task-selection": {  # E4: paper Section 5.1, d = 10, k = 3, sorted. 60 test tasks, half the universe, hold
        # about half of the tasks an exclusion removes (10 of 20 for the coordinate, 4 of 8 for the pair);
        # 2 d ln d = 46 training tasks, which the allowed rest leaves on seeds 0-278 (279 is the first that fails).
        "cpu": [("parity", dict(d=10, k=3, unsorted=False, n_train_tasks="2dlogd", n_test_tasks=60, **exclusion))
                for exclusion in EXCLUSIONS],
        "paper": [("parity", dict(d=10, k=3, n_train_tasks="2dlogd", n_test_tasks=60, **exclusion, **PAPER_PARITY))
                  for exclusion in EXCLUSIONS],
    },
    "context-length": {  # E5: N in {10, 20, 30, 40} at d=15, k=3 and 4; on CPU, the default with N = 10 and 20
        # fixed steps: with N = 10 the training tasks are never fitted, and both get the same budget
        "cpu": [("parity", dict(context_length=n, steps=8000)) for n in (10, 20)],
        "paper": [("parity", dict(d=15, k=k, n_train_tasks="3dlogd", **{**PAPER_PARITY, "context_length": n}))
                  for k in (3, 4) for n in (10, 20, 30, 40)],
    },
    "families": {  # E6 and E7: arithmetic and multi-step translation at their presets
        "cpu": [("arithmetic", {}), ("translation", {})],
    },
}
# What the paper reports for each experiment, beside which `python run.py all` puts ours.
PAPER_FINDINGS = {
    "icl-vs-cot": "E1: answer-only in-context learning fails to generalize to unseen tasks; chain of thought does.",
    "n-tasks": "E3: unseen-task accuracy rises steeply near D ln D training tasks.",
    "scaling": "E2: at least 98% exact match on unseen tasks for every row of the table, from about 3 d ln d tasks.",
    "task-selection": "E4: a missing coordinate hurts the unseen tasks that use it (OOD); a missing pair need not.",
    "context-length": "E5: a longer context is needed to identify the task.",
    "families": "E6, E7: arithmetic and multi-step translation also generalize exponentially with chain of thought.",
}


def coverage_probability(family, n_train, n_test, trials=200):
    """P(n_train training tasks drawn by split_tasks cover every possible (step, option) pair), by simulation."""
    covered = sum(not split_tasks(family.universe, n_train, seed, max_test=n_test).uncovered for seed in range(trials))
    return covered / trials


def as_flags(fields, dashes="--"):
    """{"d": 10, "unsorted": False, "missing_pair": (4, 6)} -> ["--d", "10", "--no-unsorted", "--missing-pair", "4", "6"]:
    the flags that set these fields (with dashes="", the words of a run's name)."""
    words = []
    for name, value in fields.items():
        flag = flag_name(name)
        if isinstance(value, bool):
            words.append(dashes + ("" if value else "no-") + flag)
        else:
            words += [dashes + flag, *map(str, value if isinstance(value, tuple) else (value,))]
    return words


def run_args(parser, family, fields):
    """The parsed flags of `python run.py FAMILY` with these fields set, as one run of an experiment is."""
    args = parser.parse_args([family])
    assert fields.keys() <= vars(args).keys(), f"not a field of {family}: {fields.keys() - vars(args).keys()}"
    vars(args).update(fields)
    return args


def own_fields(configurations):
    """For each configuration, the fields that set it apart from the others (those not shared by all)."""
    shared = set.intersection(*(set(fields.items()) for _, fields in configurations))
    return [{name: value for name, value in fields.items() if (name, value) not in shared} for _, fields in configurations]


def experiment_runs(args):
    """The experiment's runs, each (name, family, fields, seed), in a fixed order: the unit of --list and --shard.
    A run's name is its family and the fields that set it apart from the preset's other runs."""
    configurations = EXPERIMENTS[args.family][args.preset]
    return [("_".join([family, *as_flags(own, dashes=""), f"seed{seed}"]), family, fields, seed)
            for (family, fields), own in zip(configurations, own_fields(configurations)) for seed in range(args.seeds)]


def parse_shard(text):
    """'I/N' -> (I, N), 1 <= I <= N."""
    match = re.fullmatch(r"(\d+)/(\d+)", text or "1/1")
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ValueError(f"shard must be I/N with 1 <= I <= N, such as 2/4, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def check_finished_run(path, args):
    """Refuse a results file that the sweep would skip as done but that other settings made (a run of the
    same name from an earlier version of the preset, say): what is skipped must be the run asked for."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)["config"]
    now = json.loads(json.dumps(vars(args)))  # as the file holds them: tuples become lists
    differing = {k: (saved[k], v) for k, v in now.items()
                 if k in saved and k not in ("out", "save", "resume", "device") and saved[k] != v}
    if differing:
        raise ValueError(f"{path} holds a run with other settings (saved, now): {differing}; "
                         "move it away or give another --out")


def run_experiment(args):
    """Run the experiment's runs (with --shard I/N, every N-th from the I-th), skipping finished ones and
    resuming half-finished ones from their checkpoints; then summarise every run whose results exist in
    the folder (DIR/summary.json, DIR/summary.md), so that shards run anywhere add up to one summary."""
    out_dir = args.out or os.path.join("out", args.family, args.preset)
    if args.seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {args.seeds}")
    shard, n_shards = parse_shard(args.shard)
    runs = experiment_runs(args)
    if args.list:
        for name, *_ in runs[shard - 1::n_shards]:
            print(name)
        return []
    check_writable(os.path.join(out_dir, "summary.json"), "out")
    parser = build_parser()
    run_args_by_name = {}
    for name, family, fields, seed in runs:  # every run is checked before any trains or any folder is made
        run_args_by_name[name] = run_args(parser, family, dict(fields, seed=seed, device=args.device))
        prepare_run(run_args_by_name[name])
        check_finished_run(os.path.join(out_dir, name + ".json"), run_args_by_name[name])
    os.makedirs(out_dir, exist_ok=True)
    for name, *_ in runs[shard - 1::n_shards]:
        path = os.path.join(out_dir, name)
        if os.path.exists(path + ".json"):
            log(f"== {name}: done before, skipped")
            continue
        run = run_args_by_name[name]
        run.out, run.save = path + ".json", path + ".pt"
        if os.path.exists(path + ".pt"):
            try:
                read_checkpoint(path + ".pt")
                run.resume = path + ".pt"
            except ValueError as error:
                os.replace(path + ".pt", path + ".pt.unreadable")
                log(f"note: {error}; set aside as {path}.pt.unreadable, and the run starts over")
        log(f"== {name}")
        try:
            run_family(run)
        except Interrupted as interruption:  # an experiment resumes its runs by itself
            raise Interrupted(interruption.step, interruption.path, resume="the same command") from None
    results, groups = [], {}
    for name, family, fields, seed in runs:
        if os.path.exists(os.path.join(out_dir, name + ".json")):
            with open(os.path.join(out_dir, name + ".json")) as f:
                results.append(json.load(f))
            groups.setdefault((family, tuple(fields.items())), []).append(results[-1])
    if not results:
        return results
    save_json(os.path.join(out_dir, "summary.json"), results)
    lines = summary(args.family, args.preset, groups, parser)
    lines += ["", plot_experiment(args.family, groups, os.path.join(out_dir, "summary.png"))]
    def write_summary(tmp):
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
    atomic_write(os.path.join(out_dir, "summary.md"), write_summary)
    log("\n".join(lines))
    return results


def over_seeds(values, digits=3):
    """A figure over seeds: the value for one seed, the mean and range for several."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def summary(experiment, preset, groups, parser):
    """The experiment's table, a row per configuration (groups: (family, its fields) -> the results of its
    seeds), with the paper's finding above it."""
    lines = [f"# {experiment}, preset {preset}", "", f"Paper: {PAPER_FINDINGS[experiment]}", "",
             "| run | seeds | tasks train/all | unseen tasks | training tasks | unseen covered / uncovered | minutes "
             "| s/step | peak MB | notes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, group in groups.items():
        first = group[0]
        match = lambda name: [r[name]["exact_match_generated"] for r in group if name in r]
        family = FAMILIES[key[0]].build(run_args(parser, key[0], dict(key[1])))
        notes = []
        if experiment == "n-tasks":
            p = coverage_probability(family, first["n_train_tasks"], first["n_test_tasks"])
            notes.append(f"P(all step options covered) = {p:.2f}; D ln D = {family.n_options * np.log(family.n_options):.0f}")
        if "unseen_out_of_distribution" in first:
            notes.append(f"ID {over_seeds(match('unseen_in_distribution'))}, OOD {over_seeds(match('unseen_out_of_distribution'))} "
                         f"({len(first['unseen_out_of_distribution']['per_task'])} tasks)")
        uncovered = coverage(first["train_task_list"], family.universe)
        if uncovered:
            notes.append(f"uncovered (step, option) pairs (seed {first['config']['seed']}): "
                         f"{uncovered if len(uncovered) <= 12 else len(uncovered)}")
        if experiment == "scaling":
            notes += [f"paper: {acc:.2f}%" for d, k, _, acc in PAPER_SCALING if (d, k) == (first["config"]["d"], first["config"]["k"])]
        covered = (f"{over_seeds(match('unseen_covered'))} / {over_seeds(match('unseen_uncovered'))} "
                   f"({len(first['unseen_uncovered']['per_task'])} of them)") if "unseen_uncovered" in first else "all covered"
        minutes = over_seeds([r["wall_seconds"] / 60 for r in group], 1)
        per_step = over_seeds([r["wall_seconds"] / r["steps"] for r in group], 3)
        memory = over_seeds([r["peak_memory_mb"] for r in group if "peak_memory_mb" in r], 0)
        lines.append(f"| {' '.join([key[0], *as_flags(dict(key[1]))])} | {len(group)} | {first['n_train_tasks']}/{first['n_total_tasks']} | "
                     f"{over_seeds(match('unseen_tasks'))} | {over_seeds(match('train_tasks'))} | {covered} | "
                     f"{minutes} | {per_step} | {memory} | "
                     f"{'; '.join(notes)} |")
    return lines + ["", "Peak MB is the process's peak so far: a run of a sweep counts the runs before it in the same process."]


def run_all(args):
    """Every experiment that has the preset, one after another (finished runs are skipped), then
    one report: each experiment's table under the paper's finding, and its plot."""
    check_writable(os.path.join(args.out, f"report-{args.preset}.md"), "out")
    sections = [f"# The paper's experiments, preset {args.preset}", ""]
    seconds = 0.0
    for experiment, presets in EXPERIMENTS.items():
        if args.preset not in presets:
            continue
        folder = os.path.join(experiment, args.preset)
        runs = run_experiment(argparse.Namespace(family=experiment, preset=args.preset, seeds=args.seeds, device=args.device,
                                                 out=os.path.join(args.out, folder), list=False, shard=None))
        seconds += sum(r["wall_seconds"] for r in runs)
        with open(os.path.join(args.out, folder, "summary.md")) as f:
            sections += ["#" + f.read().replace("](summary.png)", f"]({folder}/summary.png)"), ""]
    sections.append(f"Training time of all runs, added up: {seconds / 3600:.1f} hours.")
    path = os.path.join(args.out, f"report-{args.preset}.md")
    def write_report(tmp):
        with open(tmp, "w") as f:
            f.write("\n".join(sections) + "\n")
    atomic_write(path, write_report)
    log(f"\nreport written to {path}")


def plot_experiment(experiment, groups, path):
    """Draw the experiment's figure into path, if matplotlib is installed. Returns a line for the summary."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no screen
        import matplotlib.pyplot as plt
    except ImportError:
        return "Plot skipped: matplotlib is not installed (it is optional: pip install matplotlib)."
    unseen = lambda r, group="unseen_tasks": r[group]["exact_match_generated"]
    # a run's label: what sets it apart from the others, or its family's preset
    labels = {key: " ".join(as_flags(own, dashes="")) or f"the {key[0]} preset"
              for key, own in zip(groups, own_fields([(family, dict(fields)) for family, fields in groups]))}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if experiment == "n-tasks":  # accuracy against training tasks, one line per d, with its D ln D mark
        by_d = {}
        for group in groups.values():
            by_d.setdefault(group[0]["config"]["d"], []).append(
                (group[0]["n_train_tasks"], np.mean([unseen(r) for r in group]), np.std([unseen(r) for r in group])))
        for d, points in sorted(by_d.items()):
            n, mean, std = zip(*sorted(points))
            line, *_ = ax.errorbar(n, mean, std, marker="o", capsize=3, label=f"d = {d}")
            ax.axvline(d * np.log(d), color=line.get_color(), linestyle="--", label=f"D ln D = {d * np.log(d):.0f}")
        ax.set_xlabel("training tasks")
    elif experiment == "scaling":  # unseen-task accuracy against d, beside the paper's table
        rows = sorted((g[0]["config"]["d"], np.mean([unseen(r) for r in g]),
                       np.mean([unseen(r, "unseen_covered") for r in g if "unseen_covered" in r] or [np.nan]))
                      for g in groups.values())
        d, overall, covered = zip(*rows)
        ax.plot(d, overall, "o-", label="ours: unseen tasks")
        ax.plot(d, covered, "s--", label="ours: unseen tasks whose every (step, option) pair was trained")
        ax.plot([row[0] for row in PAPER_SCALING], [row[3] / 100 for row in PAPER_SCALING], "k^", label="paper")
        ax.set_xlabel("d (k and the training tasks grow with it, as in the paper's table)")
    elif experiment in ("icl-vs-cot", "context-length"):  # unseen-task accuracy over training, one curve per run
        for key, group in groups.items():
            history = group[0]["history"]
            ax.plot([h["step"] for h in history], [h["unseen_exact_match"] for h in history], marker=".",
                    label=("answer only: " if group[0]["config"]["no_cot"] else "CoT: ") + labels[key])
        ax.set_xlabel("training step")
    else:  # bars: unseen tasks, and the in/out-of-distribution groups where an exclusion made them
        names = {"unseen_tasks": "all unseen", "unseen_in_distribution": "ID", "unseen_out_of_distribution": "OOD"}
        centres = []
        for i, (key, group) in enumerate(groups.items()):
            present = [n for n in names if n in group[0]]
            ax.bar([i + 0.25 * j for j in range(len(present))], [np.mean([unseen(r, n) for r in group]) for n in present],
                   width=0.25, color=["C0", "C2", "C3"][:len(present)])
            for j, n in enumerate(present):
                ax.text(i + 0.25 * j, 0.02, names[n], rotation=90, ha="center", va="bottom")
            centres.append(i + 0.125 * (len(present) - 1))
        ax.set_xticks(centres, [labels[key] for key in groups], fontsize=7)
    ax.set_ylabel("generated exact match, unseen tasks")
    ax.set_ylim(0, 1.02)
    ax.set_title(experiment)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return f"![{experiment}]({os.path.basename(path)})"


def build_parser():
    # allow_abbrev=False: an abbreviation such as --d must never silently mean another flag (--device)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="family", metavar="experiment")
    for name, family in FAMILIES.items():
        sub = commands.add_parser(name, help=f"train and evaluate on the {name} family", allow_abbrev=False,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        family.add_args(sub)
        add_common_args(sub)
        sub.set_defaults(**family.preset)
    presets = {"cpu": "the CPU recipe at sizes a 2-core CPU runs in minutes", "long": "all five rows of the "
               "scaling table on the CPU recipe (hours)", "paper": "the authors' sizes and hyperparameters (GPU)"}
    for name in [*EXPERIMENTS, "all"]:
        if name == "all":
            sub = commands.add_parser(name, help="every experiment that has the preset, then one report", allow_abbrev=False)
            choices = list(presets)
        else:
            sub = commands.add_parser(name, help=f"the paper's {name} experiment: every run of a preset, then a summary",
                                      allow_abbrev=False)
            choices = list(EXPERIMENTS[name])
        sub.add_argument("--preset", choices=choices, default="cpu",
                         help="; ".join(f"{preset}: {presets[preset]}" for preset in choices))
        sub.add_argument("--seeds", type=int, default=1, help="repeat every configuration with seeds 0..N-1")
        sub.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps, or auto")
        if name != "all":
            sub.add_argument("--list", action="store_true", help="print the name of every run, one a line, and stop")
            sub.add_argument("--shard", metavar="I/N", help="run only shard I of N (every N-th run from the I-th; "
                             "the shards partition the runs); the summary covers every run of the preset (and --seeds) "
                             "finished in the folder")
        sub.add_argument("--out", default="out" if name == "all" else None,
                         help="folder of every experiment's runs and the report" if name == "all" else
                         "folder for one JSON per run, checkpoints and the summary (default: out/EXPERIMENT/PRESET)")
    bench = commands.add_parser("bench", help="measure training, decoding and data-generation speed", allow_abbrev=False)
    bench.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps, or auto")
    bench.add_argument("--out", help="also write the numbers to this JSON file")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["parity"] + argv  # `python run.py` is `python run.py parity`
    args = parser.parse_args(argv)
    try:
        if args.family == "bench":
            run_bench(args)
        elif args.family in EXPERIMENTS:
            run_experiment(args)
        elif args.family == "all":
            run_all(args)
        else:
            run_family(args)
    except (ValueError, FloatingPointError) as error:
        parser.exit(2, f"error: {error}\n")
    except Interrupted as interruption:
        parser.exit(130, f"{interruption}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted\n")


if __name__ == "__main__":
    main()
