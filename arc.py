"""Task splits, training and evaluation, the same for every ARC family.

Data flows one way: a family's tasks are split into training and unseen test tasks,
`tasks.make_batch` turns tasks into token batches, the model is trained on the answer
tokens, and `evaluate` scores the query of fresh samples. Results are plain dicts.
"""

import bisect
import json
import math
import os
import re
import resource
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from gpt import GPT, GPTConfig
from tasks import make_batch


# ----------------------------------------------------------------------------- splits

def parse_task_count(spec, n_options):
    """An integer ("46") or a multiple of D ln D ("3dlogd", "dlogd", "0.5dlogd")."""
    text = str(spec).strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d*)?)?\s*\*?\s*dlogd", text)
    if match:
        count = round(float(match.group(1) or 1) * n_options * math.log(n_options))
    elif re.fullmatch(r"[+-]?\d+", text):
        count = int(text)
    else:
        raise ValueError(f"training task count must be an integer or a multiple of dlogd such as 3dlogd, got {spec!r}")
    if count < 1:
        raise ValueError(f"training task count must be at least 1, got {spec!r} = {count}")
    return count


@dataclass
class Exclusion:
    """Training tasks the paper's Section 5.1 withholds; positions are 1-based as in the paper."""

    missing_coordinate: tuple = None  # (c, v): no training task has theta_c = v
    missing_pair: tuple = None  # (a, b): no training task contains both a and b

    def check(self, n_options, n_steps):
        if self.missing_coordinate is not None:
            c, v = self.missing_coordinate
            if not 1 <= c <= n_steps:
                raise ValueError(f"missing-coordinate position must be in 1..{n_steps}, got {c}")
            if not 0 <= v < n_options:
                raise ValueError(f"missing-coordinate value must be in 0..{n_options - 1}, got {v}")
        if self.missing_pair is not None:
            a, b = self.missing_pair
            if a == b:
                raise ValueError(f"missing-pair needs two different values, got {a} {b}")
            for value in (a, b):
                if not 0 <= value < n_options:
                    raise ValueError(f"missing-pair values must be in 0..{n_options - 1}, got {value}")
            if n_steps < 2:
                raise ValueError("missing-pair needs tasks of at least 2 steps: with 1, no task contains two values")

    def any(self):
        return self.missing_coordinate is not None or self.missing_pair is not None

    def excludes(self, tasks):
        """Bool array (n,): which tasks (n, T) the exclusion removes from training."""
        removed = np.zeros(len(tasks), dtype=bool)
        if self.missing_coordinate is not None:
            c, v = self.missing_coordinate
            removed |= tasks[:, c - 1] == v
        if self.missing_pair is not None:
            a, b = self.missing_pair
            removed |= (tasks == a).any(axis=1) & (tasks == b).any(axis=1)
        return removed

    def n_excluded(self, universe):
        """How many tasks of the universe it removes, counted (not listed) by inclusion and exclusion."""
        fixed = None if self.missing_coordinate is None else (self.missing_coordinate[0] - 1, self.missing_coordinate[1])

        def containing_pair(fixed):  # tasks (with theta_c = v if fixed) that use both options of the pair
            a, b = self.missing_pair
            return sum(sign * universe.count(fixed, avoid) for sign, avoid in ((1, ()), (-1, {a}), (-1, {b}), (1, {a, b})))

        if self.missing_pair is None:
            return 0 if fixed is None else universe.count(fixed)
        if fixed is None:
            return containing_pair(None)
        return universe.count(fixed) + containing_pair(None) - containing_pair(fixed)


@dataclass
class TaskSplit:
    train: np.ndarray  # (n_train, T), in rank order
    test: np.ndarray  # (n_test, T), in the order drawn
    test_excluded: np.ndarray  # (n_test,) bool: out of distribution under the exclusion
    uncovered: list  # the (step, option) pairs some task uses but no training task does
    test_uncovered: np.ndarray  # (n_test,) bool: the test task uses an uncovered pair
    n_total: int


MAX_REJECTION_DRAWS = 10**7  # a split that would need more draws than this is refused, not attempted


def random_below(rng, n):
    """A uniform integer in 0..n-1, of any size (Python integers), from rng's random bytes."""
    n_bytes = (n.bit_length() + 7) // 8
    while True:
        r = int.from_bytes(rng.bytes(n_bytes), "little") >> (8 * n_bytes - n.bit_length())
        if r < n:
            return r


def uniform_ranks(rng, n, count):
    """count distinct integers of 0..n-1, uniformly, in the order drawn. numpy's choice uses Floyd's
    algorithm when count is small against n (else it permutes n, which is then at most 50 count), so
    the cost grows with count, not n; past int64, rejection does the same."""
    if n < 2**63:
        return [int(r) for r in rng.choice(n, count, replace=False)]
    drawn = {}  # a dict keeps the draw order
    while len(drawn) < count:
        drawn[random_below(rng, n)] = None
    return list(drawn)


def nth_untaken(positions, taken):
    """For each j of positions, the j-th (0-based) non-negative integer that is not in taken."""
    # below the i-th smallest taken integer t_i lie t_i - i untaken ones; the j-th untaken integer
    # is j plus the number of taken integers with fewer than j + 1 untaken below them
    untaken_below = [t - i for i, t in enumerate(sorted(taken))]
    return [j + bisect.bisect_right(untaken_below, j) for j in positions]


def split_tasks(universe, n_train, seed, exclusion=Exclusion(), max_test=200):
    """Up to max_test test tasks first, uniformly; then n_train training tasks, uniformly from the rest
    that the exclusion allows. The universe is never listed: ranks are drawn, then unranked."""
    n_total = universe.size
    if n_train >= n_total:
        raise ValueError(f"asked for {n_train} training tasks but only {n_total} tasks exist, leaving none to test")
    rng = np.random.default_rng(seed)
    n_test = min(max_test, n_total - n_train)
    test_ranks = uniform_ranks(rng, n_total, n_test)
    test = universe.tuples(test_ranks)
    test_excluded = exclusion.excludes(test)
    n_allowed = n_total - exclusion.n_excluded(universe) - int((~test_excluded).sum())
    if n_allowed < n_train:
        raise ValueError(
            f"the exclusion leaves {n_allowed} possible training tasks (of {n_total}, {n_test} kept for testing), "
            f"fewer than the {n_train} asked for")
    if not exclusion.any():
        train_ranks = nth_untaken(uniform_ranks(rng, n_total - n_test, n_train), test_ranks)
    else:  # by rejection: uniform over the allowed tasks, as long as they are not too rare to find
        if n_train * n_total > MAX_REJECTION_DRAWS * (n_allowed - n_train + 1):
            raise ValueError(f"the exclusion leaves {n_allowed} possible training tasks of {n_total}: too few to draw "
                             f"{n_train} of them at random; ask for fewer or exclude less")
        taken, train_ranks = set(test_ranks), []
        while len(train_ranks) < n_train:
            rank = random_below(rng, n_total)
            if rank not in taken and not exclusion.excludes(universe.tuples([rank]))[0]:
                taken.add(rank)
                train_ranks.append(rank)
    train = universe.tuples(sorted(train_ranks))
    uncovered = coverage(train, universe)
    return TaskSplit(train, test, test_excluded, uncovered, uses_any(test, uncovered), n_total)


def step_options(tasks):
    """The (step, option) pairs that tasks use, steps 1-based."""
    return {(t + 1, option) for task in np.asarray(tasks).tolist() for t, option in enumerate(task)}


def coverage(train_tasks, universe):
    """The (step, option) pairs that some task of the universe uses but no training task does: what
    the coupon-collector argument is about. Taken from the universe's rule, not a list of its tasks.
    (Sorted tuples make some pairs rare: theta_1 = d-k occurs in one task only, so a few dozen
    training tasks seldom cover every pair.)"""
    possible = {(t + 1, option) for t in range(universe.k) for option in universe.options(t)}
    return sorted(possible - step_options(train_tasks))


def uses_any(tasks, pairs):
    """Bool array (n,): which tasks (n, T) use one of the (step, option) pairs."""
    pairs = set(pairs)
    return np.array([bool(step_options([task]) & pairs) for task in np.asarray(tasks).tolist()], dtype=bool)


# ----------------------------------------------------------------------------- training

POSITIONS = ("absolute", "broadcast")  # GPT-2's positions, or the CPU recipe's packed inputs (gpt.PackedInputs)
FLAGS = {"n_layer": "n-layers", "n_head": "n-heads", "n_embd": "width"}  # fields whose flags have other names


def flag_name(field):
    """The command-line flag (without dashes) that sets a TrainConfig or run.py field."""
    return FLAGS.get(field, field.replace("_", "-"))


@dataclass
class TrainConfig:
    """Every model and training setting of a run. The defaults are the CPU recipe (docs/recipe.md);
    run.py's family presets and experiments are overrides of these fields."""
    context_length: int = 20  # N: examples per sample, the last one is the query
    cot: bool = True
    n_layer: int = 3  # the model's settings carry GPTConfig's names
    n_head: int = 4
    n_embd: int = 128
    position: str = "broadcast"  # "absolute" (GPT-2) or "broadcast" (gpt.PackedInputs)
    embedding_std: float = 0.3  # initial std of the embeddings; GPT-2: 0.02
    token_shift: bool = True  # each position also sees its predecessor's embedding (gpt.PackedInputs)
    compile: bool = False  # torch.compile the training forward/backward
    precision: str = "auto"  # "fp32", "bf16" (autocast, fp32 weights), or "auto": fp32 (TF32 matmuls on CUDA)
    dropout: float = 0.0  # on embeddings, attention weights and residual branches (GPTConfig.dropout)
    lr: float = 1e-3
    min_lr: float = 1e-5  # the cosine schedule's floor
    warmup_steps: int = 100
    schedule_steps: int = None  # the cosine schedule's length (None: steps); training may stop before it ends
    adam_beta2: float = 0.95
    weight_decay: float = 0.1
    decay_all: bool = False  # weight decay on every parameter (torch's AdamW), not only matrices and embeddings
    grad_clip: float = 1.0  # 0: no clipping
    batch_size: int = 8
    steps: int = None  # optimizer steps, cosine-decayed over; None: by rule (fit_accuracy, decay_fraction)
    fit_accuracy: float = 0.95  # by rule: the lr holds until training tasks reach this exact match
    decay_fraction: float = 0.5  # by rule: then decays over this fraction of the steps taken so far
    max_steps: int = 60000  # by rule: at most this many steps (the decay starts in time to end by it)
    target_accuracy: float = None  # stop once a progress evaluation's unseen-task exact match reaches it
    n_train_total: int = None  # None: fresh samples every step; else a fixed dataset of this many samples
    # > 0: this fraction of the steps raises the inputs' difficulty (ARCFamily.sample) from the family's
    # easiest to its true distribution: the easiest for its first 30%, then a linear ramp
    input_curriculum: float = 0.0
    eval_every: int = 500  # steps between progress evaluations (and, by rule, fit checks)
    eval_samples: int = 2000  # samples per task group at the final evaluation
    seed: int = 0
    device: str = "cpu"
    checkpoint_every_seconds: float = 120.0

    def check(self):
        for name in ("context_length", "n_layer", "n_head", "n_embd", "batch_size", "steps", "eval_every", "eval_samples",
                     "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{flag_name(name)} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"width {self.n_embd} is not divisible by n-heads {self.n_head}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight-decay must not be negative, and finite, got {self.weight_decay}")
        if not 0 < self.embedding_std < math.inf:
            raise ValueError(f"embedding-std must be positive and finite, got {self.embedding_std}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup-steps must not be negative, got {self.warmup_steps}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in 0..2**63-1, got {self.seed}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}")
        if self.token_shift and self.position != "broadcast":
            raise ValueError("token-shift is part of the packed input encoding: it needs --position broadcast")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.precision == "bf16" and torch.device(self.device).type not in ("cpu", "cuda"):
            raise ValueError(f"bf16 autocast is supported here on cpu and cuda, not {self.device}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min-lr must be in [0, lr], got {self.min_lr}")
        if not 0 <= self.adam_beta2 < 1:
            raise ValueError(f"adam-beta2 must be in [0, 1), got {self.adam_beta2}")
        if not 0 <= self.grad_clip < math.inf:
            raise ValueError(f"grad-clip must be 0 (none) or positive, got {self.grad_clip}")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ValueError(f"schedule-steps must be at least 1, got {self.schedule_steps}")
        if self.target_accuracy is not None and not 0 <= self.target_accuracy <= 1:
            raise ValueError(f"target-accuracy must be in [0, 1], got {self.target_accuracy}")
        if not 0 <= self.input_curriculum <= 1:
            raise ValueError(f"input-curriculum must be a fraction of the steps in [0, 1], got {self.input_curriculum}")
        if self.n_train_total is not None and self.n_train_total < 1:
            raise ValueError(f"n-train-total must be at least 1, got {self.n_train_total}")
        if not 0 < self.fit_accuracy <= 1:
            raise ValueError(f"fit-accuracy must be in (0, 1], got {self.fit_accuracy}")
        if not 0 < self.decay_fraction < math.inf:
            raise ValueError(f"decay-fraction must be positive and finite, got {self.decay_fraction}")
        if self.steps is None and (self.input_curriculum or self.schedule_steps is not None):
            raise ValueError("input-curriculum and schedule-steps are fractions of a fixed length: give --steps")
        if self.n_train_total is not None and self.input_curriculum:
            raise ValueError("input-curriculum draws fresh inputs at every step: it cannot be used with n-train-total")


def memory_needed(family, cfg):
    """A rough upper estimate, in bytes, of what a run holds at once: the weights with their gradients
    and AdamW moments, a fixed dataset, and the larger of a training step's activations (kept for the
    backward pass) and an evaluation batch's (one layer at a time) with the scores it collects."""
    tokens = cfg.context_length * family.example_len(cfg.cot)
    width, layers, heads = cfg.n_embd, cfg.n_layer, cfg.n_head
    embeddings = (family.vocab_size * (1 + family.input_len) + tokens) * width
    weights = 16 * (12 * layers * width * width + embeddings)
    per_sample = 4 * (20 * tokens * width + 2 * heads * tokens * tokens)
    training = layers * cfg.batch_size * per_sample
    evaluation = min(500, max(1, EVAL_BATCH_TOKENS // tokens)) * per_sample + 16 * cfg.eval_samples * (tokens + 6)
    dataset = 8 * tokens * (cfg.n_train_total or 0)
    return weights + dataset + max(training, evaluation)


def memory_available(device):
    """Bytes of memory on the device: the GPU's for CUDA, the machine's for the CPU (and MPS, which shares it)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(family, cfg):
    """Refuse, before allocating anything, a run that cannot fit in the device's memory."""
    needed, available = memory_needed(family, cfg), memory_available(torch.device(cfg.device))
    if needed > available:
        raise ValueError(f"this run needs about {needed / 2**30:,.1f} GiB but {cfg.device} has {available / 2**30:,.1f} "
                         f"GiB: lower --width, --n-layers, --context-length, --batch-size, --n-train-total or --eval-samples")


def build_model(family, cfg):
    """The GPT for this family's sequences: cfg's model settings, and the family's example shape."""
    example_len = family.example_len(cfg.cot)
    model_settings = {f.name: getattr(cfg, f.name) for f in fields(GPTConfig) if hasattr(cfg, f.name)}
    return GPT(GPTConfig(vocab_size=family.vocab_size, block_size=cfg.context_length * example_len,
                         example_len=example_len, input_len=family.input_len if cfg.position == "broadcast" else 0,
                         **model_settings))


def decay_length(decay_start, cfg):
    """By rule: the steps of the decay that starts at decay_start."""
    return max(1, round(cfg.decay_fraction * decay_start))


def latest_decay_start(cfg):
    """By rule: the decay starts here at the latest (a fit check's step), so that the run ends by max_steps."""
    return max(1, math.floor(cfg.max_steps / (1 + cfg.decay_fraction) / cfg.eval_every)) * cfg.eval_every


def learning_rate(step, cfg, decay_start=None):
    """Linear warmup, then cosine decay to min_lr: over schedule_steps (or steps), or, by rule, held at
    lr until decay_start (when the training tasks were fitted) and decayed over decay_length after it."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.steps is None:
        if decay_start is None or step < decay_start:
            return cfg.lr
        progress = (step - decay_start) / decay_length(decay_start, cfg)
    else:
        progress = (step - cfg.warmup_steps) / max(1, (cfg.schedule_steps or cfg.steps) - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def curriculum_progress(step, fraction, steps, hold):
    """How far a curriculum over the first `fraction` of `steps` training steps is at step: 0 for
    its first `hold` share, then linear to 1 at its end; 1 after it, and without one."""
    length = fraction * steps
    if step >= length:
        return 1.0
    return max(0.0, (step / length - hold) / (1 - hold))


class TrainingData:
    """Training batches: fresh samples of uniformly drawn training tasks, or the rows of a fixed dataset
    (the authors' setup), each row once an epoch in a new order, the last partial batch dropped."""

    def __init__(self, family, train_tasks, cfg, generator):
        self.family, self.cfg, self.generator = family, cfg, generator
        self.tasks = torch.as_tensor(train_tasks, device=generator.device)
        self.dataset = None
        if cfg.n_train_total is not None:
            # n_train_total samples split evenly across the training tasks
            # drawn on the CPU from the seed, so that a resume on another device finds the same dataset
            per_task = max(1, cfg.n_train_total // len(train_tasks))
            tasks = torch.as_tensor(train_tasks).repeat_interleave(per_task, dim=0)
            self.dataset = make_batch(family, tasks, cfg.context_length, cfg.cot,
                                      torch.Generator().manual_seed(cfg.seed)).tokens.to(generator.device)
            self.steps_per_epoch = max(1, len(self.dataset) // cfg.batch_size)
            self.epoch, self.order = None, None

    def difficulty_at(self, step):
        """The inputs' difficulty at step (ARCFamily.sample): 1, but during an input curriculum."""
        # The easiest inputs first (for 30%), long enough for the step rules to be read off them, then
        # harder and harder ones, so that the reading has to sharpen rather than appear.
        if not self.cfg.input_curriculum:
            return 1.0
        return curriculum_progress(step, self.cfg.input_curriculum, self.cfg.steps, hold=0.3)

    def next_batch(self, step):
        if self.dataset is not None:
            epoch, index = divmod(step, self.steps_per_epoch)
            if epoch != self.epoch:  # an epoch's order follows from the seed and the epoch: a resume finds it again
                seed = int(np.random.SeedSequence([self.cfg.seed, epoch]).generate_state(1, np.uint64)[0])
                order_generator = torch.Generator(device=self.dataset.device).manual_seed(seed)
                self.order = torch.randperm(len(self.dataset), generator=order_generator, device=self.dataset.device)
                self.epoch = epoch
            return self.dataset[self.order[index * self.cfg.batch_size:(index + 1) * self.cfg.batch_size]]
        picks = torch.randint(0, len(self.tasks), (self.cfg.batch_size,), generator=self.generator,
                              device=self.tasks.device)
        return make_batch(self.family, self.tasks[picks], self.cfg.context_length, self.cfg.cot, self.generator,
                          self.difficulty_at(step)).tokens


def answer_positions(family, cfg, device):
    """Positions p whose next token p+1 is an answer token: where the loss is taken."""
    # The mask depends on neither the task nor the sample: one probe, on the CPU, moved to the device once.
    probe = make_batch(family, torch.zeros((1, family.n_steps), dtype=torch.long), cfg.context_length, cfg.cot,
                       torch.Generator())
    return probe.answer_mask[1:].nonzero().squeeze(1).to(device)


EVAL_BATCH_TOKENS = 2**17  # an evaluation batch holds at most 500 samples and about this many tokens


@torch.no_grad()
def score(model, family, tasks, cfg, generator, n_samples):
    """The query of fresh samples of tasks (n, T), n_samples spread evenly over the tasks, scored on the
    model's device. Returns (steps_right, teacher_forced): per sample, whether greedy decoding got each
    answer step right, and whether the argmax at every answer position given the true prefix was right."""
    model.eval()
    device = next(model.parameters()).device
    per_task = max(1, -(-n_samples // len(tasks)))
    batch_size = min(500, max(1, EVAL_BATCH_TOKENS // model.config.block_size))
    task_ids = torch.arange(len(tasks), device=device).repeat_interleave(per_task)
    all_tasks = torch.as_tensor(tasks, device=device)
    steps_right, teacher_forced = [], []
    for chunk in task_ids.split(batch_size):
        batch = make_batch(family, all_tasks[chunk], cfg.context_length, cfg.cot, generator)
        answer = batch.tokens[:, -batch.answer_len:]
        with autocast(device, cfg.precision):
            logits = model(batch.tokens[:, :-1])[:, -batch.answer_len:]
            generated = model.generate(batch.tokens[:, :-batch.answer_len], batch.answer_len)
        teacher_forced.append((logits.argmax(-1) == answer).all(1))
        steps_right.append((generated == answer).view(len(chunk), -1, batch.tokens_per_step).all(2))
    model.train()
    return torch.cat(steps_right), torch.cat(teacher_forced)


def evaluate(model, family, tasks, cfg, generator, n_samples):
    """score, as numbers. exact_match_generated: greedy decoding of the whole answer from the query's input;
    exact_match_teacher_forced: argmax at every answer position given the true prefix. For the whole
    answer the two are the same number (greedy decoding reproduces the true answer exactly when every
    teacher-forced argmax is right); both are kept as a check of the decoder. They differ per step:
    per_step: generated accuracy of each answer step; per_task: generated exact match per task."""
    steps_right, teacher_forced = score(model, family, tasks, cfg, generator, n_samples)
    steps_right = steps_right.float()
    generated = steps_right.all(1).float()
    return {
        "exact_match_generated": generated.mean().item(),
        "exact_match_teacher_forced": teacher_forced.float().mean().item(),
        "per_step": steps_right.mean(0).tolist(),
        "per_task": generated.view(len(tasks), -1).mean(1).tolist(),
        "n_samples": len(generated),
    }


def autocast(device, precision="auto"):
    """bf16 autocast (matmuls in bf16, weights and reductions in fp32) where asked. auto is fp32
    everywhere (with TF32 matmuls on CUDA, set by train): the recipe's learning was measured in fp32."""
    return torch.autocast(device.type if device.type in ("cpu", "cuda") else "cpu", dtype=torch.bfloat16,
                          enabled=precision == "bf16")


def atomic_write(path, write):
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json(path, data):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
    atomic_write(path, write)


@dataclass
class Checkpoint:
    path: str = None  # where to save (None: never)
    resume: str = None  # where to resume from (None: start fresh)
    run: dict = None  # what defines the run beside TrainConfig (family, its flags, the split): a resume must match


# Settings that change how a run is scored or where it runs, not what it trains: a resume may change them.
EVALUATION_ONLY = ("eval_samples", "eval_every", "device")


class Interrupted(Exception):
    """Training stopped on SIGINT or SIGTERM, after saving a checkpoint where it could."""

    def __init__(self, step, path, resume=None):
        self.step, self.path = step, path
        saved = f"checkpoint saved to {path}; resume with {resume or f'the same command and --resume {path}'}" if path \
            else "nothing saved (with --save FILE a run can be resumed)"
        super().__init__(f"interrupted at step {step}: {saved}")


def read_checkpoint(path, device="cpu"):
    """A checkpoint's contents, or one clear error if the file is not a checkpoint of this project."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as error:  # truncated, empty or foreign: torch raises many kinds
        raise ValueError(f"checkpoint {path} cannot be read ({type(error).__name__}); delete it to start the run over")
    needed = {"model", "optimizer", "generator", "torch_rng", "step", "wall_seconds", "history", "milestones", "config"}
    if not isinstance(state, dict) or not needed <= state.keys():
        raise ValueError(f"checkpoint {path} is not a checkpoint of this project; delete it to start the run over")
    return state


def make_optimizer(model, cfg):
    # As nanoGPT: weight decay on the matrices and embeddings, none on biases and LayerNorm gains; with
    # decay_all, on every parameter, as torch's AdamW does by default (the authors' setup).
    # fused: one kernel for all parameters on CUDA; on CPU, torch's loop over the parameters
    decayed = lambda p: cfg.decay_all or p.dim() >= 2
    groups = [dict(params=[p for p in model.parameters() if decayed(p)], weight_decay=cfg.weight_decay),
              dict(params=[p for p in model.parameters() if not decayed(p)], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.adam_beta2),
                             fused=next(model.parameters()).device.type == "cuda")


def train_step(model, optimizer, tokens, positions, grad_clip, precision="auto"):
    """One AdamW step on the answer tokens of a batch. Returns the loss as a tensor:
    reading it (.item()) would wait for the device, so callers do that only to log."""
    with autocast(tokens.device, precision):
        logits = model(tokens[:, :-1])[:, positions]
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, positions + 1].flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


def train(family, split, cfg, checkpoint=Checkpoint(), log=print, stop_after=None):
    """Train a fresh model (or resume one) on split.train. Returns (model, training statistics).

    stop_after: stop (and checkpoint) after this many steps, as a run killed there would have.
    """
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores: 10-bit mantissa inputs
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    model = build_model(family, cfg).to(device)
    optimizer = make_optimizer(model, cfg)
    data = TrainingData(family, split.train, cfg, generator)
    positions = answer_positions(family, cfg, device)
    # Evaluation and decoding keep the plain module: their shapes vary, which would recompile.
    step_model = torch.compile(model) if cfg.compile else model
    history, milestones, decay_start = [], {}, None
    start_step, elapsed_before = 0, 0.0
    if checkpoint.resume:
        state = read_checkpoint(checkpoint.resume, device)
        saved = {**asdict(TrainConfig()), **state["config"]}  # a setting newer than the checkpoint had its default
        # with a target, when progress evaluations happen decides where training stops
        ignored = EVALUATION_ONLY if cfg.target_accuracy is None else tuple(k for k in EVALUATION_ONLY if k != "eval_every")
        differing = {k: (saved.get(k), v) for k, v in asdict(cfg).items() if k not in ignored and saved.get(k) != v}
        saved_run, run = state.get("run") or {}, checkpoint.run or {}
        differing.update({k: "differs" for k in saved_run.keys() | run.keys() if saved_run.get(k) != run.get(k)})
        if differing:
            raise ValueError(f"checkpoint {checkpoint.resume} belongs to another run (saved, now): {differing}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["fused"] = device.type == "cuda"  # as make_optimizer sets it for this device
        start_step, elapsed_before = state["step"], state["wall_seconds"]
        if state.get("generator_device", "cpu") == device.type:
            generator.set_state(state["generator"].to(generator.get_state().device))
            torch.set_rng_state(state["torch_rng"])  # dropout's masks
            if device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"], device)
        else:  # each device type has its own generator state: draw the rest of the data from a new seed
            generator.manual_seed(cfg.seed + start_step)
            log(f"note: the checkpoint was written on {state['generator_device']}; the data from step {start_step} on "
                f"differ from an uninterrupted run's")
        history, milestones, decay_start = state["history"], state["milestones"], state.get("decay_start")
        log(f"resumed from {checkpoint.resume} at step {start_step}")

    def save(step, elapsed):
        if checkpoint.path:
            state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), generator=generator.get_state(),
                         generator_device=device.type, torch_rng=torch.get_rng_state(), step=step, wall_seconds=elapsed,
                         history=history, milestones=milestones, decay_start=decay_start, config=asdict(cfg),
                         run=checkpoint.run)
            if device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(device)
            atomic_write(checkpoint.path, lambda tmp: torch.save(state, tmp))

    stop_signals = []  # SIGINT or SIGTERM: save and stop after the step under way
    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous_handlers = {s: signal.signal(s, lambda signum, frame: stop_signals.append(signum)) for s in handled}

    log(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config.block_size} tokens per sample, "
        f"{len(split.train)} training tasks, {len(split.test)} unseen tasks of {split.n_total}")
    tokens_per_step = cfg.batch_size * model.config.block_size
    loss_sum = torch.zeros((), device=device)
    t0 = time.time() - elapsed_before
    last_log, last_log_step, last_save = time.time(), start_step, time.time()
    end_of = lambda start: start + decay_length(start, cfg)  # by rule, where a decay from start ends
    last_step = cfg.steps or (cfg.max_steps if decay_start is None else end_of(decay_start))
    log(f"steps: {cfg.steps}, the lr decaying over them" if cfg.steps else
        f"steps by rule: lr {cfg.lr:g} held until the training tasks reach {cfg.fit_accuracy} exact match (checked "
        f"every {cfg.eval_every} steps), then decayed over {cfg.decay_fraction:g} times the steps so far; "
        f"at most {cfg.max_steps} steps")
    if stop_after is not None:
        last_step = min(last_step, stop_after)
    target_reached = lambda: cfg.target_accuracy is not None and f"{cfg.target_accuracy}" in milestones
    if target_reached():  # a resume of a run that had reached its target: nothing left to train
        last_step = start_step
    try:
        step = start_step
        while step < last_step:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg, decay_start)
            loss_sum += train_step(step_model, optimizer, data.next_batch(step), positions, cfg.grad_clip, cfg.precision)
            done = step = step + 1
            if done % cfg.eval_every == 0 or done == (cfg.steps or decay_start and end_of(decay_start)):
                mean_loss = loss_sum.item() / (done - last_log_step)
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"training loss became {mean_loss} by step {done}; lower --lr")
                # A separate generator, so that progress evaluations never change the training data.
                quick = evaluate(model, family, split.test, cfg, torch.Generator(device=device).manual_seed(done), n_samples=256)
                now = time.time()
                tokens_per_second = tokens_per_step * (done - last_log_step) / (now - last_log)
                elapsed = now - t0
                unseen = quick["exact_match_generated"]
                record = dict(step=done, loss=mean_loss, unseen_exact_match=unseen, wall_seconds=elapsed)
                if cfg.steps is None and decay_start is None:  # by rule: are the training tasks fitted?
                    fit = evaluate(model, family, split.train, cfg, torch.Generator(device=device).manual_seed(done),
                                   n_samples=256)["exact_match_generated"]
                    record["train_exact_match"] = fit
                    if fit >= cfg.fit_accuracy or done >= latest_decay_start(cfg):
                        decay_start = done
                        last_step = end_of(done) if stop_after is None else min(end_of(done), stop_after)
                        log(f"training tasks at {fit:.3f} exact match by step {done}" +
                            ("" if fit >= cfg.fit_accuracy else f", short of {cfg.fit_accuracy}") +
                            f": the lr decays until step {end_of(done)}")
                history.append(record)
                goals = ["0.90", "0.98"] + ([f"{cfg.target_accuracy}"] if cfg.target_accuracy is not None else [])
                for goal in goals:
                    if unseen >= float(goal) and goal not in milestones:
                        milestones[goal] = dict(step=done, wall_seconds=elapsed)
                eta = elapsed / done * ((cfg.steps or end_of(decay_start or latest_decay_start(cfg))) - done)
                per_step = " ".join(f"{p:.2f}" for p in quick["per_step"])
                log(f"step {done:6d} | loss {mean_loss:.4f} | lr {learning_rate(step, cfg):.2e} | unseen exact match {unseen:.3f} "
                    f"(per step {per_step}) "
                    f"| {tokens_per_second:,.0f} tok/s | {elapsed:5.0f}s elapsed, ETA {eta:4.0f}s")
                loss_sum.zero_()
                last_log, last_log_step = time.time(), done
            if time.time() - last_save > cfg.checkpoint_every_seconds:  # evaluations can be half an hour apart
                save(done, time.time() - t0)
                last_save = time.time()
            if target_reached():
                last_step = done  # training ends here
            if stop_signals:
                save(done, time.time() - t0)
                raise Interrupted(done, checkpoint.path)
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    wall_seconds = time.time() - t0
    save(last_step, wall_seconds)
    return model, dict(
        steps=last_step, wall_seconds=wall_seconds,
        tokens_per_second=tokens_per_step * (last_step - start_step) / max(1e-9, wall_seconds - elapsed_before),
        history=history, time_to_accuracy=milestones, n_parameters=model.num_params())


def run_split(family, split, cfg, exclusion=Exclusion(), checkpoint=Checkpoint(), log=print):
    """Train, then score fresh samples of the training tasks and of the unseen tasks (and apart:
    under an exclusion, its in- and out-of-distribution unseen tasks; where training missed some
    (step, option) pairs, the unseen tasks whose every pair it covered and those that use one it missed)."""
    model, results = train(family, split, cfg, checkpoint, log)
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1)
    groups = {"train_tasks": split.train, "unseen_tasks": split.test}
    if exclusion.any():
        groups["unseen_in_distribution"] = split.test[~split.test_excluded]
        groups["unseen_out_of_distribution"] = split.test[split.test_excluded]
    if split.uncovered:  # what the theory expects to be solved, and what it does not
        groups["unseen_covered"] = split.test[~split.test_uncovered]
        groups["unseen_uncovered"] = split.test[split.test_uncovered]
    for name, tasks in groups.items():
        if len(tasks):
            results[name] = evaluate(model, family, tasks, cfg, generator, cfg.eval_samples)
    results["peak_memory_mb"] = peak_memory_mb(torch.device(cfg.device))
    return results


def peak_memory_mb(device):
    """The most memory this process has held so far: on CUDA the tensors' peak on the device,
    elsewhere the process's peak resident memory (KB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# ----------------------------------------------------------------------------- benchmark

def timed(fn, repeats, device):
    """Seconds per call of fn, after one warm-up call, waiting for the device at the ends only."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def matmul_peak(device, dtype, n=2048, repeats=5):
    """Measured FLOP/s of a square matmul: the device's practical peak, for MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, repeats, device)


class HFLogits(torch.nn.Module):
    """A Hugging Face causal LM seen as ids -> logits, so our train_step can drive it."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf_model = hf_model

    def forward(self, idx):
        return self.hf_model(idx).logits


def hf_gpt2_speedup(model, optimizer_cfg, tokens, positions, precision, rounds=3):
    """Our training step (in `precision`, and in fp32) against Hugging Face's GPT2LMHeadModel with eager
    attention in fp32 (the authors' stack), same shapes and optimizer, timed alternately in this
    process through the same train_step. None without transformers."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                                    n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    bos_token_id=None, eos_token_id=None, attn_implementation="eager")).to(tokens.device)
    ours = (model, make_optimizer(model, optimizer_cfg))
    steps = {"ours": (*ours, precision), "ours_fp32": (*ours, "fp32"),
             "hf": (HFLogits(hf), make_optimizer(hf, optimizer_cfg), "fp32")}
    seconds = {name: [] for name in steps}
    for _ in range(rounds):  # alternate, so that all see the same machine state
        for name, (net, optimizer, prec) in steps.items():
            seconds[name].append(timed(lambda: train_step(net, optimizer, tokens, positions, optimizer_cfg.grad_clip, prec),
                                       1, tokens.device))
    best = {name: min(s) for name, s in seconds.items()}
    return dict(hf_train_step_seconds=best["hf"], ours_train_step_seconds=best["ours"], ours_precision=precision,
                speedup_vs_hf=best["hf"] / best["ours"], ours_fp32_train_step_seconds=best["ours_fp32"],
                speedup_vs_hf_both_fp32=best["hf"] / best["ours_fp32"])


def benchmark(family, cfg, repeats=5, precisions=("fp32", "bf16")):
    """Training, decoding and data-generation speed of one configuration on cfg.device.
    Training is timed in each of precisions (bf16: autocast); the fastest is the headline."""
    device = torch.device(cfg.device)
    generator = torch.Generator(device=device).manual_seed(0)
    model = build_model(family, cfg).to(device)
    optimizer = make_optimizer(model, cfg)
    rng = np.random.default_rng(0)
    ranks = [random_below(rng, family.universe.size) for _ in range(cfg.batch_size)]
    tasks = torch.as_tensor(family.universe.tuples(ranks), device=device)
    batch = make_batch(family, tasks, cfg.context_length, cfg.cot, generator)
    positions = answer_positions(family, cfg, device)
    step_seconds = {precision: timed(lambda: train_step(model, optimizer, batch.tokens, positions, cfg.grad_clip, precision),
                                     repeats, device) for precision in precisions}
    precision = min(step_seconds, key=step_seconds.get)
    n_tokens = batch.tokens.size(0) * (batch.tokens.size(1) - 1)
    # Training FLOPs per token: 6 per weight (forward and backward) plus attention's
    # 6 * 2 * n_layer * T * width over the causal half of a T-token context.
    # Counted per position: with packed inputs the model sees fewer positions than tokens.
    seq = batch.tokens.size(1) - 1
    if model.packed is not None:
        seq = len(model.packed.layout(0, seq, device).slot_example)
    n_weights = sum(p.numel() for name, p in model.named_parameters()
                    if not name.startswith(("wpe", "packed.wpe", "packed.wte_input")))  # lookups, no matmul; wte is also the head
    flops_per_position = 6 * n_weights + 6 * cfg.n_layer * seq * cfg.n_embd
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {precision: matmul_peak(device, dtypes[precision]) for precision in precisions}
    achieved = flops_per_position * batch.tokens.size(0) * seq / step_seconds[precision]
    prefix = batch.tokens[:, :-batch.answer_len]
    model.eval()
    with autocast(device):
        cached = timed(lambda: model.generate(prefix, batch.answer_len), repeats, device)
        recomputed = timed(lambda: model.generate(prefix, batch.answer_len, use_cache=False), repeats, device)
        same = torch.equal(model.generate(prefix, batch.answer_len), model.generate(prefix, batch.answer_len, use_cache=False))
    data_batch = 1024
    data_tasks = tasks.repeat(data_batch // len(tasks) + 1, 1)[:data_batch]
    data_seconds = timed(lambda: make_batch(family, data_tasks, cfg.context_length, cfg.cot, generator), repeats, device)
    model.train()
    if model.packed is not None:
        hf_gpt2 = dict(skipped="Hugging Face's GPT-2 has no packed inputs to compare with")
    else:
        hf_gpt2 = hf_gpt2_speedup(model, cfg, batch.tokens, positions, precision) or dict(skipped="transformers is not installed")
    return dict(
        hf_gpt2=hf_gpt2, positions_per_sample=seq,
        tokens_per_sample=batch.tokens.size(1), batch_size=cfg.batch_size, n_parameters=model.num_params(),
        train_precision=precision, train_step_seconds=step_seconds[precision],
        train_step_seconds_by_precision=step_seconds, train_tokens_per_second=n_tokens / step_seconds[precision],
        achieved_flops=achieved, matmul_peak_flops=peaks[precision], matmul_peak_flops_by_precision=peaks,
        mfu=achieved / peaks[precision],
        generate_tokens_per_second=prefix.size(0) * batch.answer_len / cached,
        generate_speedup_vs_recompute=recomputed / cached, generate_cached_equals_recompute=same,
        data_samples_per_second=data_batch / data_seconds,
    )
