"""Reproduce the paper's ARC task-generalization experiments from the command line.

    python run.py                        # the CPU default: sparse parity, CoT, minutes on a laptop
    python run.py --no-cot --steps 8000  # the same, answer-only in-context learning
    python run.py parity --help          # every setting, with its meaning in the paper
    python run.py scaling                # an experiment: its runs, then a summary

The method is arc.py; this file is what surrounds it: flags, presets, sweeps, summaries, reports.
"""

import argparse
import functools
import inspect
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, fields

import numpy as np
import torch

import arc
from arc import Config, Interrupted
from tasks import Arithmetic, SparseParity, Translation, require

log = functools.partial(print, flush=True)  # flushed: a run logging to a file can be followed

# ----------------------------------------------------------------------------- families and presets
# A family's flags are its constructor's keywords (tasks.py). A preset is a dict of overrides of
# Config's fields and the family's flags, checked by name (make_run).
FAMILIES = {"parity": SparseParity, "arithmetic": Arithmetic, "translation": Translation}
FAMILY_FLAGS = {name: {k: p.default for k, p in inspect.signature(family).parameters.items()}
                for name, family in FAMILIES.items()}
FIELDS = {f.name: f for f in fields(Config)}
PRESETS = {  # where each family departs from the recipe (docs/recipe.md)
    "parity": {},  # `python run.py`: 3 d ln d = 41 of the 210 ordered 3-tuples of 7 coordinates
    # no weight decay, 12 examples, an input curriculum (small operands first: Arithmetic.sample)
    "arithmetic": dict(n_train_tasks="72", context_length=12, weight_decay=0.0,
                       input_curriculum=0.6, steps=12000),
    # a two-layer GPT with GPT-2's learned positions learns translation in a few hundred steps
    "translation": dict(n_train_tasks="40", context_length=4, n_layers=2, position="absolute",
                        embedding_std=0.02, token_shift=False, weight_decay=0.0, lr=3e-3,
                        batch_size=32, steps=800, eval_every=500),
}

def make_run(name, overrides):
    """The family, Config and settings of `python run.py NAME` with overrides of its preset."""
    values = {**PRESETS[name], **overrides}
    unknown = sorted(values.keys() - FAMILY_FLAGS[name].keys() - FIELDS.keys())
    if unknown:
        raise ValueError(f"not a setting of {name}: {', '.join(unknown)}")
    flags = {k: values.get(k, v) for k, v in FAMILY_FLAGS[name].items()}
    family = FAMILIES[name](**flags)
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()
                    if k in FIELDS})
    # a device that exists here; auto: CUDA, else MPS, else the CPU
    cuda, mps, device = torch.cuda.is_available(), torch.backends.mps.is_available(), cfg.device
    if device == "auto":
        cfg.device = "cuda" if cuda else "mps" if mps else "cpu"
    elif not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto")
    elif not {"cpu": True, "cuda": cuda, "mps": mps}[torch.device(device).type]:
        raise ValueError(f"device {device!r} is not available on this machine")
    elif (torch.device(device).index or 0) >= max(1, torch.cuda.device_count()):
        raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} GPUs")
    arc.check(cfg)
    return family, cfg, dict(family=name, **flags)

# ----------------------------------------------------------------------------- one run
def check_writable(path, flag):
    """Refuse an output file that could not be written, before training. Makes nothing."""
    if os.path.isdir(path):
        raise ValueError(f"--{flag} {path} is a folder: give a file name")
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:  # a file where a folder should be fails too (Not a directory)
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise ValueError(f"--{flag} {path} cannot be written: {error.strerror} in {existing}")

def prepare(name, values, out=None, save=None, resume=None):
    """Everything a run needs before training, checked: family, Config, split and identity
    (what a checkpoint or a finished run must match: the settings and the split)."""
    family, cfg, flags = make_run(name, values)
    split = arc.split_for(family, cfg)
    if cfg.n_train_total is not None and cfg.n_train_total < len(split.train):
        raise ValueError(f"n-train-total {cfg.n_train_total} is fewer than one sample for each "
                         f"of the {len(split.train)} training tasks")
    # Memory, by a rough upper estimate: weights with gradients and AdamW moments, a fixed
    # dataset, and the larger of a training step's activations and an evaluation batch's (one
    # layer at a time) with the scores it collects.
    tokens, width = cfg.context_length * family.example_len(cfg.cot), cfg.width
    weights = 16 * (12 * cfg.n_layers * width**2
                    + (family.vocab_size * (1 + family.input_len) + tokens) * width)
    per_sample = 4 * (20 * tokens * width + 2 * cfg.n_heads * tokens * tokens)
    evaluation = (min(500, max(1, arc.EVAL_BATCH_TOKENS // tokens)) * per_sample
                  + 16 * cfg.eval_samples * (tokens + 6))
    needed = (weights + 8 * tokens * (cfg.n_train_total or 0)
              + max(cfg.n_layers * cfg.batch_size * per_sample, evaluation))
    available = (torch.cuda.mem_get_info(cfg.device)[1] if cfg.device.startswith("cuda")
                 else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if needed > available:
        raise ValueError(f"this run needs about {needed / 2**30:,.1f} GiB but {cfg.device} has "
                         f"{available / 2**30:,.1f} GiB: lower --width, --n-layers, "
                         "--context-length, --batch-size, --n-train-total or --eval-samples")
    if resume and not os.path.isfile(resume):
        raise ValueError(f"--resume file {resume} does not exist")
    if out and (save or resume) and os.path.abspath(out) == os.path.abspath(save or resume):
        raise ValueError("--out names the checkpoint file: the results would overwrite it")
    for flag, path in dict(out=out, save=save, resume=resume).items():
        path and check_writable(path, flag)
    identity = json.loads(json.dumps(dict(flags, **asdict(cfg), train_tasks=split.train.tolist(),
                                          test_tasks=split.test.tolist())))
    return family, cfg, split, identity

def run_one(name, values, out=None, save=None, resume=None):
    """One run: split, train, evaluate, write the results JSON, print its table; the results."""
    out = out or os.path.join("out", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    family, cfg, split, identity = prepare(name, values, out, save, resume)
    log(f"{name}: D={family.n_options}, T={family.n_steps}, {split.n_total} tasks, "
        f"{'CoT' if cfg.cot else 'answer only'}, device {cfg.device}, results to {out}")
    if split.uncovered:
        log(f"note: no training task has the (step, option) pairs {split.uncovered}; "
            f"{(split.test_uncovered > 0).sum()} of the {len(split.test)} unseen tasks use one; "
            f"the split's ceiling (a coin flip at each untrained step) is {split.ceiling:.3f}")
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, timeout=30,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    code = dict(git_commit=git("rev-parse", "HEAD") or None,  # read now: it may change meanwhile
                uncommitted_changes=bool(git("status", "--porcelain", "--untracked-files=no")))
    stop = []  # the signals that asked the run to stop: it checkpoints, then raises Interrupted
    handlers = {s: signal.signal(s, lambda signum, _: stop.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        model, results = arc.train(family, split, cfg, log, save or resume, resume, identity,
                                   lambda step: bool(stop), log if sys.stdout.isatty() else None)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    # what a result depends on beyond its settings: the code, torch, the machine, the memory
    cuda = cfg.device.startswith("cuda")
    precision = {"bf16": "bf16 autocast", "auto": "fp32, TF32 matmuls" if cuda else "fp32"}
    peak = (torch.cuda.max_memory_allocated(cfg.device) / 2**20 if cuda else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10))
    results = dict(
        config={k: v for k, v in identity.items() if k not in ("train_tasks", "test_tasks")},
        n_total_tasks=split.n_total, n_train_tasks=len(split.train), n_test_tasks=len(split.test),
        train_task_list=identity["train_tasks"], test_task_list=identity["test_tasks"],
        uncovered_step_options=split.uncovered, ceiling=split.ceiling,
        precision=precision.get(cfg.precision, "fp32"), torch=torch.__version__, **code,
        threads=torch.get_num_threads(),
        device_name=torch.cuda.get_device_name(cfg.device) if cuda else cfg.device,
        peak_memory_mb=peak, **results, **arc.final_evaluation(model, family, split, cfg))
    arc.atomic_write(out, json.dumps(results, indent=1))
    log(f"\n{'task group':<28}{'tasks':>6}{'exact match':>13}   per step")
    for group, r in results.items():
        if group.startswith(("train_tasks", "unseen_")):
            log(f"{group.replace('_', ' '):<28}{len(r['per_task']):>6}"
                f"{r['exact_match_generated']:>13.3f}  ", *(f"{p:.3f}" for p in r["per_step"]))
    log(f"\n{results['wall_seconds']:.0f}s, {results['tokens_per_second']:,.0f} training "
        f"tokens/s; results in {out}")
    return results

# ----------------------------------------------------------------------------- experiments
# The authors' setup, on sorted tuples: the cosine spans 8,000 epochs of a fixed 25,000-sample
# dataset (390 steps at batch 64), and a run stops at 1,000 epochs or where it reaches its target.
PAPER = dict(n_layers=3, n_heads=1, width=192, context_length=40, position="absolute",
             embedding_std=0.02, token_shift=False, dropout=0.1, lr=8e-5, min_lr=1e-6,
             adam_beta2=0.999, weight_decay=0.01, decay_all=True, grad_clip=0.0, warmup_steps=0,
             batch_size=64, n_train_total=25000, steps=390000, schedule_steps=3120000,
             eval_every=1950, tuples="sorted")
# The paper's scaling table: (d, k, training tasks, unseen-task exact match %), sorted tuples.
PAPER_SCALING = [(10, 5, 69, 98.51), (15, 7, 121, 99.12), (20, 10, 180, 98.67),
                 (25, 12, 241, 98.60), (30, 15, 306, 98.10)]
SCALING_ROWS = [("parity", dict(d=d, k=k, tuples="sorted", n_train_tasks=str(n), rotary=True))
                for d, k, n, _ in PAPER_SCALING]  # rotary: chains of 5 to 15 steps learn together
N_TASKS = ("0.5dlogd", "dlogd", "2dlogd", "3dlogd")
EXCLUSIONS = (dict(missing_coordinate=(2, 5)), dict(missing_pair=(4, 6)))  # paper Section 5.1
SELECTION = dict(d=10, k=3, tuples="sorted", n_train_tasks="2dlogd", n_test_tasks=60)
# An experiment is data: for each preset, its runs, each a family and the overrides of that
# family's preset that make it, under the paper's finding. run_experiment runs them all.
EXPERIMENTS = {
    "icl-vs-cot": dict(  # the paper's is Parity(10,2); on CPU the default's, both fixed steps
        finding="E1: answer-only in-context learning fails to generalize to unseen tasks; "
                "chain of thought does.",
        cpu=[("parity", dict(steps=8000, cot=cot)) for cot in (True, False)],
        paper=[("parity", dict(PAPER, d=10, k=2, n_train_tasks="20", cot=cot))
               for cot in (True, False)]),
    "n-tasks": dict(
        finding="E3: unseen-task accuracy rises steeply near D ln D training tasks.",
        cpu=[("parity", dict(d=10, k=3, tuples="sorted", n_train_tasks=n)) for n in N_TASKS],
        paper=[("parity", dict(PAPER, d=d, k=3, n_train_tasks=n)) for d in (10, 15, 20)
               for n in N_TASKS]),
    "scaling": dict(  # cpu: the table's first two rows; long: all five, a decay twice the hold
        finding="E2: at least 98% exact match on unseen tasks for every row of the table, "
                "from about 3 d ln d training tasks.",
        cpu=SCALING_ROWS[:2], long=[(f, dict(o, decay_fraction=2.0)) for f, o in SCALING_ROWS],
        paper=[("parity", dict(PAPER, d=d, k=k, n_train_tasks=str(n),
                               target_accuracy=round(acc / 100, 4)))
               for d, k, n, acc in PAPER_SCALING]),
    "task-selection": dict(  # 60 test tasks, half the universe; 2 d ln d = 46 training tasks
        finding="E4: a missing coordinate hurts the unseen tasks that use it (OOD); a missing "
                "pair need not.",
        cpu=[("parity", dict(SELECTION, **exclusion)) for exclusion in EXCLUSIONS],
        paper=[("parity", dict(PAPER, **SELECTION, **exclusion)) for exclusion in EXCLUSIONS]),
    "context-length": dict(  # the paper's N: 10-40 at d = 15, k = 3, 4; on CPU the default's
        finding="E5: a longer context is needed to identify the task.",
        cpu=[("parity", dict(context_length=n, steps=8000)) for n in (10, 20)],
        paper=[("parity", dict(PAPER, d=15, k=k, context_length=n))
               for k in (3, 4) for n in (10, 20, 30, 40)]),
    "families": dict(
        finding="E6, E7: arithmetic and multi-step translation also generalize exponentially "
                "with chain of thought.",
        cpu=[("arithmetic", {}), ("translation", {})]),
}

def words(overrides, dashes=""):
    """{"d": 10, "cot": False, "missing_pair": (4, 6)} -> d 10 no-cot missing-pair 4 6: the flags
    that set them, as a list (with dashes="--", as typed)."""
    out = []
    for name, value in overrides.items():
        flag = name.replace("_", "-")
        out += ([dashes + ("" if value else "no-") + flag] if isinstance(value, bool) else
                [dashes + flag, *map(str, value if isinstance(value, tuple) else [value])])
    return out

def experiment_runs(experiment, preset, seeds):
    """The runs, each (name, family, overrides, seed), in a fixed order: the unit of --list and
    --shard. A run's name is its family and what sets it apart from the preset's other runs."""
    runs = EXPERIMENTS[experiment][preset]
    shared = set.intersection(*(set(overrides.items()) for _, overrides in runs))
    own = lambda overrides: {k: v for k, v in overrides.items() if (k, v) not in shared}
    return [("_".join([family, *words(own(overrides)), f"seed{seed}"]), family, overrides, seed)
            for family, overrides in runs for seed in range(seeds)]

def run_experiment(experiment, preset="cpu", seeds=1, device="auto", out=None, shard=None,
                   list_runs=False):
    """The preset's runs (with shard I/N, every N-th from the I-th), skipping finished ones and
    resuming half-finished ones; then the summary of every finished run in the folder, so that
    shards run anywhere add up to one summary. Returns the finished runs' results."""
    out = out or os.path.join("out", experiment, preset)
    match = re.fullmatch(r"(\d+)/(\d+)", shard or "1/1")
    require([(match and 1 <= int(match.group(1)) <= int(match.group(2)),
              f"shard must be I/N with 1 <= I <= N, such as 2/4, got {shard!r}"),
             (seeds >= 1, f"seeds must be at least 1, got {seeds}")])
    runs = experiment_runs(experiment, preset, seeds)
    mine = runs[int(match.group(1)) - 1::int(match.group(2))]
    if list_runs:
        return print("\n".join(name for name, *_ in mine)) or []
    check_writable(os.path.join(out, "summary.json"), "out")
    for name, family, overrides, seed in runs:  # every run is checked before any trains
        identity = prepare(family, dict(overrides, seed=seed, device=device))[3]
        path = os.path.join(out, name + ".json")  # skipped below when finished: refuse a stale one
        saved = json.load(open(path)) if os.path.exists(path) else None
        differing = saved and arc.differences(  # the split's task lists stand for its task counts
            dict(saved["config"], train_tasks=saved["train_task_list"],
                 test_tasks=saved["test_task_list"]), identity,
            ignored=("device", "n_train_tasks", "n_test_tasks"))
        if differing:
            shown = {k: "another split" if k.endswith("tasks") else v for k, v in differing.items()}
            raise ValueError(f"{path} holds a run with other settings (saved, now): {shown}; "
                             "move it away or give another --out")
    for name, family, overrides, seed in mine:
        path = os.path.join(out, name)
        if os.path.exists(path + ".json"):
            log(f"== {name}: done before, skipped")
            continue
        resume = path + ".pt" if os.path.exists(path + ".pt") else None
        try:
            resume and arc.read_checkpoint(resume)
        except ValueError as error:
            os.replace(resume, resume + ".unreadable")
            log(f"note: {error}; set aside as {resume}.unreadable, and the run starts over")
            resume = None
        log(f"== {name}")
        try:
            run_one(family, dict(overrides, seed=seed, device=device), path + ".json",
                    path + ".pt", resume)
        except Interrupted as stop:  # an experiment resumes its runs by itself
            raise Interrupted(stop.step, stop.path, resume="the same command") from None
    return write_summary(experiment, preset, runs, out)

def over_seeds(values, digits=3):
    """A figure over seeds: the value for one seed, the mean and range for several."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "-"
    return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

def write_summary(experiment, preset, runs, out):
    """The folder's finished runs into summary.json and summary.md, with a plot; their results."""
    done = [(family, overrides, json.load(open(path))) for name, family, overrides, _ in runs
            if os.path.exists(path := os.path.join(out, name + ".json"))]
    if not done:
        return []
    arc.atomic_write(os.path.join(out, "summary.json"), json.dumps([r for *_, r in done], indent=1))
    lines = [f"# {experiment}, preset {preset}", "", f"Paper: {EXPERIMENTS[experiment]['finding']}",
             "", "| run | seeds | tasks train/all | unseen tasks | training tasks | unseen covered "
             "/ uncovered | ceiling | minutes | s/step | notes |", "|---" * 10 + "|"]
    groups = {}  # (family, overrides) -> the results of its seeds, in the experiment's order
    for family, overrides, result in done:
        groups.setdefault((family, tuple(overrides.items())), []).append(result)
    for (family, overrides), group in groups.items():
        first, config, notes = group[0], group[0]["config"], []
        match = lambda key: over_seeds([r[key]["exact_match_generated"] for r in group if key in r])
        if experiment == "n-tasks":
            universe = make_run(family, dict(overrides))[0].universe
            covered = np.mean([not arc.split_tasks(universe, first["n_train_tasks"], seed)
                               .uncovered for seed in range(200)])
            notes.append(f"P(every step option covered) = {covered:.2f}")
        if "unseen_out_of_distribution" in first:
            notes.append(f"ID {match('unseen_in_distribution')}, OOD "
                         f"{match('unseen_out_of_distribution')} "
                         f"({len(first['unseen_out_of_distribution']['per_task'])} tasks)")
        pairs = [tuple(p) for p in first["uncovered_step_options"]]
        notes += [f"uncovered (step, option) pairs, seed {config['seed']}: "
                  f"{pairs if len(pairs) <= 12 else len(pairs)}"] if pairs else []
        notes += [f"paper: {acc:.2f}%" for d, k, _, acc in PAPER_SCALING if experiment ==
                  "scaling" and (d, k) == (config.get("d"), config.get("k"))]
        covered = (f"{match('unseen_covered')} / {match('unseen_uncovered')} "
                   f"({len(first['unseen_uncovered']['per_task'])} of them)"
                   if "unseen_uncovered" in first else "all covered")
        lines.append(" | ".join([
            f"| {' '.join([family, *words(dict(overrides), '--')])}", str(len(group)),
            f"{first['n_train_tasks']}/{first['n_total_tasks']}", match("unseen_tasks"),
            match("train_tasks"), covered, over_seeds([r["ceiling"] for r in group]),
            over_seeds([r["wall_seconds"] / 60 for r in group], 1),
            over_seeds([r["wall_seconds"] / r["steps"] for r in group]), "; ".join(notes)]) + " |")
    lines += ["", plot(experiment, groups, out)]
    arc.atomic_write(os.path.join(out, "summary.md"), "\n".join(lines) + "\n")
    log("\n".join(lines))
    return [r for *_, r in done]

def plot(experiment, groups, out):
    """Each group's unseen exact match by step (seed 0) into OUT/summary.png; the summary's line."""
    try:  # a Figure, not pyplot: drawn for a file only, it needs no backend or screen
        import matplotlib.figure
    except ImportError:
        return "Plot skipped: matplotlib is not installed (it is optional: pip install matplotlib)."
    fig = matplotlib.figure.Figure(figsize=(7, 4.5), layout="tight")
    ax = fig.subplots()
    for (family, overrides), group in groups.items():
        history = group[0]["history"]
        ax.plot([h["step"] for h in history], [h["unseen_exact_match"] for h in history],
                marker=".", label=" ".join([family, *words(dict(overrides))]))
    ax.set(xlabel="training step", ylabel="generated exact match, unseen tasks (seed 0)",
           ylim=(0, 1.02), title=f"{experiment}: {EXPERIMENTS[experiment]['finding']}"[:90])
    ax.legend(fontsize=6)
    arc.atomic_write(os.path.join(out, "summary.png"),
                     lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return f"![{experiment}](summary.png)"

def run_all(preset, seeds=1, device="auto", out="out"):
    """Every experiment that has the preset (finished runs skipped), then one report of them."""
    report, seconds = os.path.join(out, f"report-{preset}.md"), 0.0
    check_writable(report, "out")
    sections = [f"# The paper's experiments, preset {preset}", ""]
    for experiment in (e for e, presets in EXPERIMENTS.items() if preset in presets):
        folder = os.path.join(experiment, preset)
        results = run_experiment(experiment, preset, seeds, device, os.path.join(out, folder))
        seconds += sum(r["wall_seconds"] for r in results)
        summary = open(os.path.join(out, folder, "summary.md")).read()
        sections += ["#" + summary.replace("](summary.png)", f"]({folder}/summary.png)"), ""]
    sections.append(f"Training time of all runs, added up: {seconds / 3600:.1f} hours.")
    arc.atomic_write(report, "\n".join(sections) + "\n")
    log(f"\nreport written to {report}")

# ----------------------------------------------------------------------------- the command line
FLAG_GROUPS = {"n_train_tasks": "the split", "context_length": "the data", "n_layers": "the model",
               "lr": "the optimization", "eval_every": "the evaluation", "device": "the machine"}
PRESET_HELP = dict(cpu="the CPU recipe at sizes a 2-core CPU runs in minutes to hours",
                   long="all five rows of the scaling table on the CPU recipe",
                   paper="the authors' sizes and hyperparameters (a GPU)")

def build_parser():
    # allow_abbrev=False: an abbreviation such as --d must never silently mean another flag
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="command")
    add = lambda name, help, **kw: commands.add_parser(name, help=help, allow_abbrev=False, **kw)
    for name in FAMILIES:  # the family's flags, then Config's fields, under headings
        sub = add(name, f"train and evaluate on the {name} family",
                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        group = sub.add_argument_group(f"the {name} family")
        for flag, default in FAMILY_FLAGS[name].items():
            many = isinstance(default, tuple)
            group.add_argument("--" + flag.replace("_", "-"), default=default,
                               nargs="+" if many else None, type=str if many else type(default),
                               help=FAMILIES[name].FLAGS[flag])
        for field in fields(Config):  # help: the field's doc; default: the family's preset
            if field.name in FLAG_GROUPS:
                group = sub.add_argument_group(FLAG_GROUPS[field.name])
            extra = {k: v for k, v in field.metadata.items() if k != "doc"} | (
                dict(action=argparse.BooleanOptionalAction) if field.type is bool else
                dict(type=int, nargs=2) if field.type is tuple else dict(type=field.type))
            group.add_argument("--" + field.name.replace("_", "-"), help=field.metadata["doc"],
                               default=PRESETS[name].get(field.name, field.default), **extra)
        group = sub.add_argument_group("the outputs")
        group.add_argument("--out", help="results JSON file (default: out/<family>-<time>.json)")
        group.add_argument("--save", help="checkpoint file, saved every two minutes and at the end")
        group.add_argument("--resume", help="continue from this checkpoint, of the same settings")
    for name in [*EXPERIMENTS, "all"]:
        every = name == "all"
        choices = [p for p in PRESET_HELP if every or p in EXPERIMENTS[name]]
        sub = add(name, "every experiment that has the preset, then one report" if every
                  else f"the paper's {name} experiment: every run of a preset, then a summary")
        sub.add_argument("--preset", choices=choices, default="cpu",
                         help="; ".join(f"{p}: {PRESET_HELP[p]}" for p in choices))
        sub.add_argument("--seeds", type=int, default=1, help="every run with seeds 0..N-1")
        sub.add_argument("--device", default="auto", help=FIELDS["device"].metadata["doc"])
        sub.add_argument("--out", default="out" if every else None, help=(
            "folder of every experiment's runs and the report (default: out)" if every else
            "folder of the runs' JSON, checkpoints and summary (default: out/EXPERIMENT/PRESET)"))
        if not every:
            sub.add_argument("--list", action="store_true", help="print each run's name, and stop")
            sub.add_argument("--shard", metavar="I/N", help="run only every N-th run from the "
                             "I-th; the summary covers every finished run in the folder")
    return parser

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["parity"] + argv  # `python run.py` is `python run.py parity`
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in FAMILIES:
            run_one(args.command, {k: v for k, v in vars(args).items() if k in FIELDS or k in
                                   FAMILY_FLAGS[args.command]}, args.out, args.save, args.resume)
        elif args.command in EXPERIMENTS:
            run_experiment(args.command, args.preset, args.seeds, args.device, args.out,
                           args.shard, args.list)
        else:
            run_all(args.preset, args.seeds, args.device, args.out)
    except (ValueError, FloatingPointError) as error:
        parser.exit(2, f"error: {error}\n")
    except (Interrupted, KeyboardInterrupt) as stop:  # Ctrl-C in training, or outside it
        parser.exit(130, f"{stop if isinstance(stop, Interrupted) else 'interrupted'}\n")
    except BrokenPipeError:  # the output's reader stopped (| head): exit quietly, as a pipe does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)

if __name__ == "__main__":
    main()
