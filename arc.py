"""The paper's method, the same for every ARC family, top to bottom: the settings (Config), the
split, the data, the model and AdamW, the learning rate, checkpoints (a plain dict), the training
loop (`train`, after the helpers it calls) and evaluation (exact match of the query's answer).
A "step" is an optimizer step; the answer's y_1..y_T are its answer steps. A Config reaches the
method checked (`check`) and naming a device, not "auto": run.py's make_run sees to both."""

import bisect
import functools
import math
import os
import pathlib
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from gpt import GPT, GPTConfig
from tasks import make_batch, require

# ----------------------------------------------------------------------------- the settings
def setting(default, doc, **flag):
    """A Config field: its default, its one-line meaning (the --help), and argparse extras."""
    return field(default=default, metadata=dict(doc=doc, **flag))

@dataclass
class Config:
    """Every setting of a run; the defaults are the CPU recipe (docs/recipe.md)."""
    # the split
    n_train_tasks: str = setting("3dlogd", "training tasks: an integer, or a multiple of D ln D")
    n_test_tasks: int = setting(200, "unseen test tasks, drawn first (fewer in a small universe)")
    missing_coordinate: tuple = setting(None, "no training task has theta_C = V (C: a step from 1)",
                                        metavar=("C", "V"))
    missing_pair: tuple = setting(None, "no training task uses both options A and B",
                                  metavar=("A", "B"))
    seed: int = setting(0, "seed of the split, the data and the model")
    # the data
    context_length: int = setting(20, "N: examples a sample, of one task; the last is the query")
    cot: bool = setting(True, "chain of thought: every step y_1..y_T; --no-cot: y_T only")
    n_train_total: int = setting(None, "a fixed dataset of this many samples (else fresh ones)")
    input_curriculum: float = setting(0.0, "this share of the steps raises the inputs' difficulty")
    # the model
    n_layers: int = setting(3, "transformer blocks (paper: 3)")
    n_heads: int = setting(4, "attention heads per block (paper: 1)")
    width: int = setting(128, "embedding width (paper: 192)")
    position: str = setting("broadcast", "absolute: GPT-2's (paper); broadcast: packed inputs",
                            choices=("absolute", "broadcast"))
    embedding_std: float = setting(0.3, "initial std of the embeddings (paper: 0.02)")
    token_shift: bool = setting(True, "every position also sees a map of the previous one")
    rotary: bool = setting(False, "rotary positions, periodic in an example (scaling experiment)")
    dropout: float = setting(0.0, "on embeddings, attention and residual branches (paper: 0.1)")
    # the optimization
    lr: float = setting(1e-3, "peak AdamW learning rate (paper: 8e-5)")
    min_lr: float = setting(1e-5, "the cosine decay's floor (paper: 1e-6)")
    warmup_steps: int = setting(100, "linear warmup to lr over this many steps")
    steps: int = setting(None, "optimizer steps, decayed over; default: by rule (fit-accuracy)")
    fit_accuracy: float = setting(0.95, "by rule: lr holds until the training tasks reach this")
    decay_fraction: float = setting(0.5, "by rule: then decays over this share of the steps so far")
    max_steps: int = setting(60000, "by rule: the most steps; the decay starts in time for them")
    schedule_steps: int = setting(None, "the cosine's length if longer than --steps (paper)")
    batch_size: int = setting(8, "samples per step (paper: 64)")
    adam_beta2: float = setting(0.95, "AdamW's beta2 (paper: 0.999)")
    weight_decay: float = setting(0.1, "AdamW's, on matrices and embeddings (paper: 0.01)")
    decay_all: bool = setting(False, "weight decay on biases and LayerNorm gains too (paper)")
    grad_clip: float = setting(1.0, "gradient norm clipping; 0: none (paper)")
    # the evaluation
    eval_every: int = setting(500, "steps between progress evaluations")
    eval_samples: int = setting(2000, "final evaluation: at least this many fresh samples a group")
    target_accuracy: float = setting(None, "stop once unseen-task exact match reaches this")
    # the machine
    device: str = setting("auto", "cpu, cuda, cuda:N, mps, or auto (the best available)")
    precision: str = setting("auto", "auto: fp32, TF32 matmuls on CUDA; bf16: autocast",
                             choices=("auto", "fp32", "bf16"))
    compile: bool = setting(False, "torch.compile the training step's model")

AT_LEAST_ONE = """context_length n_layers n_heads width batch_size eval_every eval_samples
    n_test_tasks max_steps steps schedule_steps n_train_total""".split()  # unless None (not set)
CHECKS = [  # (what must hold, in the settings' names; the error otherwise)
    ("width % n_heads == 0", "width {width} is not divisible by n-heads {n_heads}"),
    ("0 < lr < inf", "lr must be positive and finite, got {lr}"),
    ("0 <= min_lr <= lr", "min-lr must be in [0, lr], got {min_lr}"),
    ("0 <= weight_decay < inf", "weight-decay must not be negative, and finite: {weight_decay}"),
    ("0 < embedding_std < inf", "embedding-std must be positive and finite, got {embedding_std}"),
    ("warmup_steps >= 0", "warmup-steps must not be negative, got {warmup_steps}"),
    ("0 <= seed < 2**63", "seed must be in 0..2**63-1, got {seed}"),
    ("not token_shift or position == 'broadcast'", "token-shift needs --position broadcast"),
    ("0 <= dropout < 1", "dropout must be in [0, 1), got {dropout}"),
    ("0 <= adam_beta2 < 1", "adam-beta2 must be in [0, 1), got {adam_beta2}"),
    ("0 <= grad_clip < inf", "grad-clip must be 0 (none) or positive, got {grad_clip}"),
    ("0 < fit_accuracy <= 1", "fit-accuracy must be in (0, 1], got {fit_accuracy}"),
    ("0 < decay_fraction < inf", "decay-fraction must be positive and finite: {decay_fraction}"),
    ("steps or not (input_curriculum or schedule_steps)",
     "input-curriculum and schedule-steps are fractions of a fixed length: give --steps"),
    ("not schedule_steps or schedule_steps >= (steps or 0)", "schedule-steps must be >= steps"),
    ("target_accuracy is None or 0 <= target_accuracy <= 1", "target-accuracy must be in [0, 1]"),
    ("0 <= input_curriculum <= 1", "input-curriculum must be a fraction in [0, 1]"),
    ("n_train_total is None or not input_curriculum",
     "input-curriculum draws fresh inputs at every step: it cannot be used with n-train-total"),
    ("precision != 'bf16' or device.split(':')[0] in ('cpu', 'cuda')",
     "bf16 autocast is supported here on cpu and cuda, not {device}"),
]

def check(cfg):
    """Refuse settings that no run can have, with the first rule they break."""
    settings = asdict(cfg)
    for name in (n for n in AT_LEAST_ONE if settings[n] is not None and settings[n] < 1):
        raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {settings[name]}")
    for rule, error in CHECKS:
        if not eval(rule, {"inf": math.inf}, settings):
            raise ValueError(error.format(**settings))

# ----------------------------------------------------------------------------- the split
def parse_task_count(spec, n_options):
    """A positive integer ("46") or a multiple of D ln D ("3dlogd", "dlogd", "0.5dlogd")."""
    text = str(spec).strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d*)?)?\s*\*?\s*dlogd", text)
    count = round(float(match.group(1) or 1) * n_options * math.log(n_options)) if match else (
        int(text) if re.fullmatch(r"[+-]?\d+", text) else 0)
    if count < 1:
        raise ValueError("training task count must be a positive integer or a multiple of dlogd "
                         f"such as 3dlogd, got {spec!r}")
    return count

@dataclass
class TaskSplit:
    train: np.ndarray  # (n_train, T), in rank order
    test: np.ndarray  # (n_test, T), in the order drawn
    test_excluded: np.ndarray  # (n_test,) bool: out of distribution under the exclusion
    uncovered: list  # the (step, option) pairs some task uses but no training task does
    test_uncovered: np.ndarray  # (n_test,) int: how many uncovered pairs each test task uses
    n_total: int
    # unseen exact match if exact where every (step, option) pair was trained and a coin flip at
    # each untrained one (parity's answers are bits; with more values, guessing scores less)
    ceiling: float

def random_below(rng, n):
    """A uniform integer in 0..n-1, of any size (Python integers), from rng's random bytes."""
    n_bytes = (n.bit_length() + 7) // 8
    while True:
        r = int.from_bytes(rng.bytes(n_bytes), "little") >> (8 * n_bytes - n.bit_length())
        if r < n:
            return r

def uniform_ranks(rng, n, count):
    """count distinct integers of 0..n-1, uniformly, in the order drawn, at a cost that grows with
    count, not n: numpy's Floyd algorithm within int64, rejection past it."""
    if n < 2**63:
        return [int(r) for r in rng.choice(n, count, replace=False)]
    drawn = {}  # a dict keeps the draw order
    while len(drawn) < count:
        drawn[random_below(rng, n)] = None
    return list(drawn)

def nth_untaken(positions, taken):
    """For each j of positions, the j-th (0-based) non-negative integer that is not in taken."""
    # below the i-th smallest taken integer t_i lie t_i - i untaken ones; the j-th untaken one is
    # j plus the count of taken integers below it: those with at most j untaken ones below them
    untaken_below = [t - i for i, t in enumerate(sorted(taken))]
    return [j + bisect.bisect_right(untaken_below, j) for j in positions]

def split_tasks(universe, n_train, seed, exclusion=None, max_test=200):
    """Up to max_test test tasks first, uniformly; then n_train training tasks, uniformly from the
    rest that the exclusion allows. The universe is never listed: ranks are drawn, then unranked."""
    n_total = universe.size
    if n_train >= n_total:
        raise ValueError(f"asked for {n_train} training tasks but only {n_total} tasks exist, "
                         "leaving none to test")
    rng = np.random.default_rng(seed)
    n_test = min(max_test, n_total - n_train)
    test_ranks = uniform_ranks(rng, n_total, n_test)
    test = universe.tuples(test_ranks)
    if exclusion is None:
        test_excluded = np.zeros(n_test, dtype=bool)
        train_ranks = nth_untaken(uniform_ranks(rng, n_total - n_test, n_train), test_ranks)
    else:
        test_excluded = exclusion.excludes(test)
        train_ranks = exclusion.draw(universe, rng, n_train, test_ranks, test_excluded)
    train = universe.tuples(sorted(train_ranks))
    # The (step, option) pairs that some task uses but no training task does (sorted tuples make
    # some rare: theta_1 = d-k is in one task only), and how many of them each test task uses.
    pairs = lambda task: {(t + 1, o) for t, o in enumerate(task)}  # steps 1-based
    possible = {(t + 1, o) for t in range(universe.k) for o in universe.options(t)}
    uncovered = sorted(possible.difference(*map(pairs, train.tolist())))
    missed = set(uncovered)
    test_uncovered = np.array([len(pairs(t) & missed) for t in test.tolist()], dtype=np.int64)
    return TaskSplit(train, test, test_excluded, uncovered, test_uncovered, n_total,
                     float(np.mean(0.5 ** test_uncovered)))

MAX_REJECTION_DRAWS = 10**7  # an exclusion that would need more draws than this is refused

@dataclass
class Exclusion:
    """Training tasks the paper's Section 5.1 withholds; positions are 1-based as in the paper."""
    missing_coordinate: tuple = None  # (c, v): no training task has theta_c = v
    missing_pair: tuple = None  # (a, b): no training task contains both a and b

    def excludes(self, tasks):
        """Bool array (n,): which tasks (n, T) the exclusion removes from training."""
        # -1 is no option: in place of an exclusion not asked for, it removes nothing
        (c, v), (a, b) = self.missing_coordinate or (1, -1), self.missing_pair or (-1, -1)
        return (tasks[:, c - 1] == v) | ((tasks == a).any(axis=1) & (tasks == b).any(axis=1))

    def n_excluded(self, universe):
        """How many tasks of the universe it removes, counted (never listed): |coordinate| +
        |pair| - |both|, and |pair| itself by inclusion and exclusion over the options avoided."""
        c, v = self.missing_coordinate or (None, None)
        fixed = None if c is None else (c - 1, v)
        a, b = self.missing_pair or (None, None)
        pair = lambda fixed: 0 if a is None else sum(
            sign * universe.count(fixed, avoid)
            for sign, avoid in ((1, ()), (-1, {a}), (-1, {b}), (1, {a, b})))
        return pair(None) if fixed is None else universe.count(fixed) + pair(None) - pair(fixed)

    def draw(self, universe, rng, n_train, test_ranks, test_excluded):
        """n_train training ranks by rejection: uniform over the tasks that are neither excluded
        nor test tasks, as long as those are not too rare."""
        n_total = universe.size
        n_allowed = n_total - self.n_excluded(universe) - int((~test_excluded).sum())
        if n_train * n_total > MAX_REJECTION_DRAWS * (n_allowed - n_train + 1):  # rare or none
            raise ValueError(f"the exclusion leaves {n_allowed} possible training tasks (of "
                             f"{n_total}, {len(test_ranks)} kept for testing): too few to draw "
                             f"{n_train} of them at random; ask for fewer or exclude less")
        taken, ranks = set(test_ranks), []
        while len(ranks) < n_train:
            rank = random_below(rng, n_total)
            if rank not in taken and not self.excludes(universe.tuples([rank]))[0]:
                taken.add(rank)
                ranks.append(rank)
        return ranks

def split_for(family, cfg):
    """The split a run's settings ask for, checked."""
    exclusion, coordinate, pair = None, cfg.missing_coordinate, cfg.missing_pair
    if coordinate or pair:
        (c, v), (a, b) = coordinate or (1, -1), pair or (-1, -1)  # -1: none, as in excludes
        T, last = family.n_steps, family.n_options - 1
        require([(1 <= c <= T, f"missing-coordinate position must be in 1..{T}, got {c}"),
                 (not coordinate or 0 <= v <= last,
                  f"missing-coordinate value must be in 0..{last}, got {v}"),
                 (not pair or a != b, f"missing-pair needs two different values, got {a} {b}"),
                 (not pair or 0 <= min(a, b) <= max(a, b) <= last,
                  f"missing-pair values must be in 0..{last}, got {a} {b}"),
                 (not pair or T >= 2, "missing-pair needs tasks of at least 2 steps")])
        exclusion = Exclusion(coordinate, pair)
        if not exclusion.n_excluded(family.universe):
            raise ValueError("the exclusion removes no task of this family: nothing would be out "
                             "of distribution")
    n_train = parse_task_count(cfg.n_train_tasks, family.n_options)
    return split_tasks(family.universe, n_train, cfg.seed, exclusion, cfg.n_test_tasks)

# ----------------------------------------------------------------------------- the data
def loss_positions(family, cfg, device):
    """Positions p whose next token p+1 is an answer token: where the loss is taken."""
    # The mask depends on neither task nor sample: one probe on the CPU, moved to the device once.
    probe = make_batch(family, torch.zeros((1, family.n_steps), dtype=torch.long),
                       cfg.context_length, cfg.cot, torch.Generator())
    return probe.answer_mask[1:].nonzero().squeeze(1).to(device)

def difficulty_at(step, cfg):
    """The inputs' difficulty (ARCFamily.sample) at step: 1, but in an input curriculum the easiest
    for its first 30% (where each answer step's operation shows), then a ramp to 1."""
    length = cfg.input_curriculum * (cfg.steps or 0)
    return 1.0 if step >= length else max(0.0, (step / length - 0.3) / 0.7)

def fixed_dataset(family, train_tasks, cfg, device):
    """The authors' setup: n_train_total samples split evenly across the training tasks, drawn on
    the CPU from the seed, so that a resume on another device finds the same dataset."""
    per_task = max(1, cfg.n_train_total // len(train_tasks))
    tasks = torch.as_tensor(train_tasks).repeat_interleave(per_task, dim=0)
    return make_batch(family, tasks, cfg.context_length, cfg.cot,
                      torch.Generator().manual_seed(cfg.seed)).tokens.to(device)

def get_batch(step, family, train_tasks, dataset, cfg, generator):
    """Step's batch: fresh samples of uniformly drawn training tasks, or the fixed dataset's rows,
    each once an epoch in an order drawn from the seed and the epoch, so a resume finds it too."""
    if dataset is None:
        picks = torch.randint(0, len(train_tasks), (cfg.batch_size,), generator=generator,
                              device=train_tasks.device)
        return make_batch(family, train_tasks[picks], cfg.context_length, cfg.cot, generator,
                          difficulty_at(step, cfg)).tokens
    epoch, index = divmod(step, max(1, len(dataset) // cfg.batch_size))
    order = epoch_order(len(dataset), cfg.seed, epoch, dataset.device)
    return dataset[order[index * cfg.batch_size:(index + 1) * cfg.batch_size]]

@functools.lru_cache(maxsize=1)  # drawn once an epoch, not at every step
def epoch_order(n, seed, epoch, device):
    seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])
    return torch.randperm(n, device=device, generator=torch.Generator(device).manual_seed(seed))

# ----------------------------------------------------------------------------- model and optimizer
def build_model(family, cfg):
    """The GPT for this family's sequences: cfg's model settings, and the family's example shape."""
    example_len, packed = family.example_len(cfg.cot), cfg.position == "broadcast"
    return GPT(GPTConfig(
        vocab_size=family.vocab_size, block_size=cfg.context_length * example_len,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, n_embd=cfg.width, dropout=cfg.dropout,
        embedding_std=cfg.embedding_std, example_len=example_len, rotary=cfg.rotary,
        token_shift=cfg.token_shift, input_len=family.input_len if packed else 0))

def make_optimizer(model, cfg, fused=None):
    """AdamW, decaying matrices and embeddings as nanoGPT (with decay_all, every parameter, as the
    authors); fused (one kernel for all parameters) on CUDA by default."""
    fused = next(model.parameters()).device.type == "cuda" if fused is None else fused
    decayed = lambda p: cfg.decay_all or p.dim() >= 2
    groups = [dict(params=[p for p in model.parameters() if decayed(p) == on],
                   weight_decay=cfg.weight_decay if on else 0.0) for on in (True, False)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), fused=fused)

# ----------------------------------------------------------------------------- the learning rate
# Warmup, then a cosine decay to min_lr. With cfg.steps the cosine spans them (or schedule_steps)
# and training ends there. Without, by rule: the lr holds until a progress check finds the
# training tasks fitted (decay_starts), and that check's step becomes progress's decay_start; the
# cosine then spans decay_fraction times the steps so far, and training ends with it (last_step).
# A run that reaches target_accuracy ends at that check.
def decay_starts(cfg, step, fit):
    """By rule, at the progress check of step while the lr holds (fit: the training tasks' exact
    match): whether the decay starts: fitted, or the last check whose decay ends by max_steps."""
    latest = max(1, math.floor(cfg.max_steps / (1 + cfg.decay_fraction) / cfg.eval_every))
    return fit >= cfg.fit_accuracy or step >= latest * cfg.eval_every

def cosine_span(cfg, decay_start):
    """The cosine's first and last step; by rule, None while the lr holds."""
    if cfg.steps:
        return cfg.warmup_steps, cfg.schedule_steps or cfg.steps
    if decay_start is not None:
        return decay_start, decay_start + max(1, round(cfg.decay_fraction * decay_start))
    return None

def learning_rate(step, cfg, decay_start=None):
    """Linear warmup, the held lr (by rule), then the cosine to min_lr."""
    span = cosine_span(cfg, decay_start)
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if span is None or step < span[0]:
        return cfg.lr
    done = min(1.0, (step - span[0]) / max(1, span[1] - span[0]))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * done))

def last_step(cfg, progress):
    """Where training ends: at cfg.steps, or by rule where the cosine ends (max_steps while the lr
    holds, and never after them); at once if a progress check reached the target."""
    if cfg.target_accuracy is not None and f"{cfg.target_accuracy}" in progress["milestones"]:
        return progress["step"]
    span = cosine_span(cfg, progress["decay_start"])
    return cfg.steps or min(cfg.max_steps, span[1] if span else cfg.max_steps)

# ----------------------------------------------------------------------------- a training step
def autocast(device, precision="auto"):
    """bf16 autocast (matmuls in bf16, weights and reductions in fp32) where asked, else fp32."""
    return torch.autocast(device.type if device.type in ("cpu", "cuda") else "cpu",
                          dtype=torch.bfloat16, enabled=precision == "bf16")

def train_step(model, optimizer, tokens, positions, grad_clip, precision="auto"):
    """One AdamW step on the answer tokens of every example of a batch. Returns the loss as a
    tensor: reading it (.item()) waits for the device, so callers do that only to log."""
    with autocast(tokens.device, precision):
        logits = model(tokens[:, :-1])[:, positions]
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, positions + 1].flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()

# ----------------------------------------------------------------------------- checkpoints
def atomic_write(path, write):
    """Write a file, a text or by write(temporary path), via a temporary file renamed into place,
    so that a crash never leaves a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp) if callable(write) else pathlib.Path(tmp).write_text(write)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def save_checkpoint(path, model, optimizer, generator, progress, identity):
    """The run as a plain dict: weights, optimizer, random states, progress, and what it is."""
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), identity=identity,
                 generator=generator.get_state(), generator_device=generator.device.type,
                 torch_rng=torch.get_rng_state(), progress=progress)
    if generator.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(generator.device)
    atomic_write(path, lambda tmp: torch.save(state, tmp))

def read_checkpoint(path):
    """A checkpoint's dict, on the CPU (random states must stay there), or one clear error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, empty or foreign: torch raises many kinds
        raise ValueError(f"checkpoint {path} cannot be read ({type(error).__name__}); delete it "
                         "to start the run over")
    if not isinstance(state, dict) or not {"model", "optimizer", "generator", "generator_device",
                                           "torch_rng", "progress", "identity"} <= state.keys():
        raise ValueError(f"checkpoint {path} is not a checkpoint of this project; delete it to "
                         "start the run over")
    return state

def differences(saved, now, ignored=()):
    """The settings that differ between a saved run's identity and now's: {name: (saved, now)}.
    A setting newer than the saved run counts as its default."""
    saved = {**asdict(Config()), **saved}
    return {k: (saved.get(k), now.get(k)) for k in saved.keys() | now.keys()
            if k not in ignored and saved.get(k) != now.get(k)}

def load_checkpoint(path, identity, model, optimizer, generator, log):
    """Restore a run into model, optimizer and generator if it is the same run (identity: its
    settings and split; eval_samples, the device and at a fixed length eval_every may differ)."""
    state = read_checkpoint(path)
    # eval_every may change too, unless progress checks decide where training stops
    fixed_length = identity.get("steps") and identity.get("target_accuracy") is None
    ignored = ("eval_samples", "device") + (("eval_every",) if fixed_length else ())
    differing = differences(state["identity"], identity, ignored)
    if differing:
        raise ValueError(f"checkpoint {path} belongs to another run (saved, now): {differing}")
    model.load_state_dict(state["model"])
    fused = optimizer.param_groups[0]["fused"]  # as here, not as saved: a fused AdamW (CUDA)
    for group in state["optimizer"]["param_groups"]:  # needs its step counters on its device
        group["fused"] = fused
    optimizer.load_state_dict(state["optimizer"])
    step = state["progress"]["step"]
    if state["generator_device"] == generator.device.type:
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])  # dropout's masks
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], generator.device)
    else:  # each device type has its own generator: draw the rest of the data from a new seed
        generator.manual_seed(identity["seed"] + step)
        log(f"note: the checkpoint was written on {state['generator_device']}; the data from step "
            f"{step} on differ from an uninterrupted run's")
    log(f"resumed from {path} at step {step}")
    return state["progress"]

# ----------------------------------------------------------------------------- training
CHECKPOINT_SECONDS = 120  # a checkpoint at least this often: evaluations can be an hour apart
STATUS_SECONDS = 15  # a line of progress at least this often, for someone watching (status=...)

def init(family, split, cfg, device, log):
    """A fresh run's model, optimizer and data generator, from the seed, on device; logs them."""
    if device.type == "cuda":  # TF32 matmuls only where the precision allows them (process-wide)
        torch.set_float32_matmul_precision("high" if cfg.precision == "auto" else "highest")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    model = build_model(family, cfg).to(device)
    steps = (f"steps: {cfg.steps}, the lr decaying over them" if cfg.steps else
             f"steps by rule: lr {cfg.lr:g} held until the training tasks reach "
             f"{cfg.fit_accuracy} exact match (checked every {cfg.eval_every} steps), then "
             f"decayed over {cfg.decay_fraction:g} times the steps so far; at most {cfg.max_steps}")
    log(f"model: {model.n_params / 1e6:.2f}M parameters, "
        f"{model.config.block_size} tokens a sample, {len(split.train)} training tasks, "
        f"{len(split.test)} unseen tasks of {split.n_total}\n{steps}")
    return model, make_optimizer(model, cfg), generator

def speed(cfg, model, progress, window, now=None):
    """Tokens a second since the last progress check, and the time left at that speed."""
    seconds = (now or time.time()) - window["time"]
    seconds_per_step = seconds / max(1, progress["step"] - window["step"])
    left = (last_step(cfg, progress) - progress["step"]) * seconds_per_step
    bound = "at most " if cfg.steps is None and progress["decay_start"] is None else ""
    return (f"{cfg.batch_size * model.config.block_size / seconds_per_step:,.0f} tok/s | "
            f"{progress['wall_seconds']:.0f}s elapsed, ETA {bound}{left:.0f}s")

def progress_check(model, family, split, cfg, progress, window, lr):
    """Unseen-task exact match on at least 256 fresh samples, the same number for each task; by
    rule, while the lr holds, the training tasks', whose fit starts the decay; kept in progress,
    and returned as a line. Its generator is seeded by the step, apart from training's, so that
    evaluations never change what training sees."""
    step, loss = progress["step"], window["loss"].item() / (progress["step"] - window["step"])
    if not math.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss} by step {step}; lower --lr")
    trained = time.time()  # the speed is of training alone, not of this check's evaluation
    seeded = lambda: torch.Generator(device=cfg.device).manual_seed(step)
    unseen = evaluate(model, family, split.test, cfg, seeded(), 256)
    record = dict(step=step, loss=loss, unseen_exact_match=unseen["exact_match_generated"],
                  wall_seconds=progress["wall_seconds"])
    line = (f"step {step:6d} | loss {loss:.4f} | lr {lr:.2e} | unseen exact match "
            f"{record['unseen_exact_match']:.3f} (per step "
            + " ".join(f"{p:.2f}" for p in unseen["per_step"]) + ")")
    if cfg.steps is None and progress["decay_start"] is None:
        fit = evaluate(model, family, split.train, cfg, seeded(), 256)["exact_match_generated"]
        record["train_exact_match"] = fit
        line += f" | training tasks {fit:.3f}"
        if decay_starts(cfg, step, fit):
            progress["decay_start"] = step
            line += f", so the lr decays until step {last_step(cfg, progress)}"
    progress["history"].append(record)
    targets = [] if cfg.target_accuracy is None else [f"{cfg.target_accuracy}"]
    for goal in ["0.90", "0.98"] + targets:
        if record["unseen_exact_match"] >= float(goal) and goal not in progress["milestones"]:
            progress["milestones"][goal] = dict(step=step, wall_seconds=progress["wall_seconds"])
    line += " | " + speed(cfg, model, progress, window, trained)
    window.update(step=step, time=time.time())  # the next window starts
    window["loss"].zero_()
    return line

class Interrupted(Exception):
    """Training stopped on request (SIGINT, SIGTERM), after saving a checkpoint where it could."""
    def __init__(self, step, path, resume=None):
        self.step, self.path = step, path
        saved = (f"checkpoint saved to {path}; resume with "
                 f"{resume or f'the same command and --resume {path}'}" if path
                 else "nothing saved (with --save FILE a run can be resumed)")
        super().__init__(f"interrupted at step {step}: {saved}")

def train(family, split, cfg, log=print, save=None, resume=None, identity=None, stop=None,
          status=None):
    """Train a fresh model (or resume a checkpoint of the same run: identity) on split.train.
    stop(step): True saves and stops; status gets a line every 15 s. Returns (model, stats)."""
    device = torch.device(cfg.device)
    model, optimizer, generator = init(family, split, cfg, device, log)
    tasks = torch.as_tensor(split.train, device=device)
    dataset = None if cfg.n_train_total is None else fixed_dataset(family, split.train, cfg, device)
    positions = loss_positions(family, cfg, device)
    step_model = torch.compile(model) if cfg.compile else model  # evaluation's shapes vary
    identity = identity or asdict(cfg)
    progress = dict(step=0, wall_seconds=0.0, history=[], milestones={}, decay_start=None)
    if resume:
        progress = load_checkpoint(resume, identity, model, optimizer, generator, log)
    step = first_step = progress["step"]
    began = saved = shown = time.time()  # saved, shown: the last checkpoint, status line
    t0 = began - progress["wall_seconds"]  # wall_seconds counts earlier processes' time too
    window = dict(step=step, time=began, loss=torch.zeros((), device=device))  # since a check
    while step < last_step(cfg, progress):
        # determine and set the learning rate
        lr = learning_rate(step, cfg, progress["decay_start"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        # forward, backward, update
        batch = get_batch(step, family, tasks, dataset, cfg, generator)
        window["loss"] += train_step(step_model, optimizer, batch, positions, cfg.grad_clip,
                                     cfg.precision)
        step = progress["step"] = step + 1
        progress["wall_seconds"] = time.time() - t0
        # evaluate (and by rule, check the fit that starts the decay); else a line every 15 s
        if step % cfg.eval_every == 0 or step == last_step(cfg, progress):
            log(progress_check(model, family, split, cfg, progress, window, lr))
        elif status and time.time() - shown > STATUS_SECONDS:
            status(f"step {step:6d} | loss {window['loss'].item() / (step - window['step']):.4f} | "
                   + speed(cfg, model, progress, window))
            shown = time.time()
        # checkpoint every two minutes, and before a stop
        stopping = stop is not None and stop(step)
        if save and (stopping or time.time() - saved > CHECKPOINT_SECONDS):
            save_checkpoint(save, model, optimizer, generator, progress, identity)
            saved = time.time()
        if stopping:
            raise Interrupted(step, save)
    if save:
        save_checkpoint(save, model, optimizer, generator, progress, identity)
    tokens = cfg.batch_size * model.config.block_size * (step - first_step)
    seconds = max(1e-9, time.time() - began)
    return model, dict(steps=step, wall_seconds=progress["wall_seconds"],
                       history=progress["history"], tokens_per_second=tokens / seconds,
                       time_to_accuracy=progress["milestones"], n_parameters=model.n_params)

# ----------------------------------------------------------------------------- evaluation
EVAL_BATCH_TOKENS = 2**17  # an evaluation batch: at most 500 samples and about this many tokens

@torch.no_grad()
def score(model, family, tasks, cfg, generator, n_samples):
    """Per fresh sample of tasks (n, T), n_samples spread evenly over the tasks, whether the model
    gets each answer step of the query right: every token of it the argmax, given the right tokens
    before it. Greedy decoding gets the whole answer right exactly when all of them are, so one
    forward pass gives its exact match, without generating."""
    model.eval()
    device = next(model.parameters()).device
    per_task = max(1, -(-n_samples // len(tasks)))
    batch_size = min(500, max(1, EVAL_BATCH_TOKENS // model.config.block_size))
    task_ids = torch.arange(len(tasks), device=device).repeat_interleave(per_task)
    all_tasks = torch.as_tensor(tasks, device=device)
    steps_right = []
    for chunk in task_ids.split(batch_size):
        batch = make_batch(family, all_tasks[chunk], cfg.context_length, cfg.cot, generator)
        with autocast(device, cfg.precision):
            # teacher forcing: the last answer_len positions (the query's separator and its
            # answer tokens but the last) predict the answer tokens, the right ones given
            logits = model(batch.tokens[:, :-1], n_last=batch.answer_len)
        right = logits.argmax(-1) == batch.tokens[:, -batch.answer_len:]
        steps_right.append(right.view(len(chunk), -1, batch.tokens_per_step).all(2))
    model.train()
    return torch.cat(steps_right)

def evaluate(model, family, tasks, cfg, generator, n_samples):
    """score, as numbers: exact match of the whole answer (greedy decoding's: "generated"), of
    each answer step (the steps before it given right), and per task."""
    steps_right = score(model, family, tasks, cfg, generator, n_samples)
    exact = steps_right.all(1).float()  # the whole answer right, as greedy decoding has it
    return dict(exact_match_generated=exact.mean().item(),
                per_step=steps_right.float().mean(0).tolist(),
                per_task=exact.view(len(tasks), -1).mean(1).tolist(), n_samples=len(exact))

def final_evaluation(model, family, split, cfg):
    """Training and unseen tasks; apart, the unseen tasks in and out of an exclusion's
    distribution, and those whose every (step, option) pair was trained and the others."""
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1)
    groups = {"train_tasks": split.train, "unseen_tasks": split.test}
    if cfg.missing_coordinate or cfg.missing_pair:
        groups["unseen_in_distribution"] = split.test[~split.test_excluded]
        groups["unseen_out_of_distribution"] = split.test[split.test_excluded]
    if split.uncovered:  # what the theory expects to be solved, and what it does not
        groups["unseen_covered"] = split.test[split.test_uncovered == 0]
        groups["unseen_uncovered"] = split.test[split.test_uncovered > 0]
    return {name: evaluate(model, family, tasks, cfg, generator, cfg.eval_samples)
            for name, tasks in groups.items() if len(tasks)}
