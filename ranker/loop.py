"""The one training loop: the ranker (ranker.train), the retrieval teacher / student (ranker.retrieval.fit) and item
alignment (pipelines.encoder.alignment) all train through :func:`fit_loop`.

The loop owns what every model shares:

- **stepping**: epochs of batches, ``zero_grad`` / ``backward`` / (gradient all-reduce) / (clip) / ``step`` over the
  model's optimizers, a learning-rate schedule, ``max_steps`` counted over every run of a resumed job;
- **evaluation and early stopping with best-restore**: after each epoch the model's ``evaluate`` may judge it
  (a score, higher is better); a :class:`Selection` keeps the best epoch's weights (a snapshot), stops after
  ``patience`` judged epochs without a higher score, and loads the chosen weights at the end;
- **checkpoints**: it decides when to write (every ``save_every`` steps inside an epoch, every epoch end, once more
  after the final restore) and hands the model's :class:`Checkpointer` the :class:`LoopState` to store; every rank
  calls it (a writer may gather shards), the writer decides which rank writes. Writers store tensors only
  (safetensors or ``torch.save`` of tensors, read back with ``weights_only=True``) through feature_store.io's
  atomic writes;
- **resume**: a run continues from any position a checkpoint recorded (epoch, batch inside it, steps so far):
  load the checkpoint into the model, optimizers and RNG (the writer's format knows how) and pass its LoopState;
  with a batch order that is a function of (seed, epoch), the resumed run retraces the uninterrupted one;
- **data-parallel reduce**: ``average_gradients`` all-reduces gradients (mean over ranks) before each step, for
  models that are not wrapped by DDP / DistributedModelParallel (those reduce in backward themselves);
  :func:`all_reduce_mean` averages metrics the same way;
- **progress**: a tqdm bar on a terminal, otherwise an INFO line at least every 30 s (rank 0 only).

What a model brings is a :class:`TrainTask`: its epoch's batches, the loss of one batch, the evaluation, and
snapshot / restore of its weights.

Example (a model with one optimizer, judged on validation AUC)::

    class Task:
        def batches(self, epoch): return np.array_split(rng_for(epoch).permutation(n), n_batches)
        def loss(self, batch): return model(batch)
        def evaluate(self, epoch, state, complete):
            auc = valid_auc(model)
            return Evaluation(score=auc, row={"epoch": epoch, "valid_auc": auc})
        def snapshot(self): return copy.deepcopy(model.state_dict())
        def restore(self, snap): model.load_state_dict(snap)

    run = fit_loop(Task(), LoopConfig(epochs=10, patience=2), Updates([torch.optim.Adam(model.parameters())]),
                   Selection(patience=2))
    run.selection.best_epoch, run.state.history
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    """How long to train and how to report it.

    Args:
        epochs: the last epoch is ``epochs - 1`` (a resumed run may raise it).
        max_steps: stop after this many optimizer steps in total, steps of earlier runs of a resumed job included
            (None or 0: no cap).
        save_every: also checkpoint every this many steps inside an epoch (epoch ends always checkpoint); 0: never.
        desc: names the run in progress lines.
        total_steps: the progress bar's length (None: unknown).
        progress: a tqdm bar when stderr is a terminal (otherwise, and with progress off, a log line at least every
            ``heartbeat_s`` seconds).
        is_main: this process reports (rank 0).
        log_every: also log the loss every this many steps (0: never).
        heartbeat_s: seconds between progress log lines when there is no bar (None: feature_store.progress.EVERY_S,
            30 s).
    """

    epochs: int
    max_steps: Optional[int] = None
    save_every: int = 0
    desc: str = "train"
    total_steps: Optional[int] = None
    progress: bool = True
    is_main: bool = True
    log_every: int = 0
    heartbeat_s: Optional[float] = None


@dataclass
class Updates:
    """The optimizer step of every batch.

    Args:
        optimizers: stepped in order after ``backward`` (optimizers applied in backward, e.g. TorchRec's fused
            embedding optimizer, are not listed).
        params: the tensors ``grad_clip`` and ``average_gradients`` act on.
        grad_clip: max total gradient norm (0: no clipping).
        average_gradients: all-reduce each gradient and divide by the world size before the step (data parallel
            without a DDP wrapper).
        lr_at: step -> learning rate; each param group gets ``lr_at(step) * group.get("lr_scale", 1.0)`` before
            the step (None: the optimizers' own rates).
    """

    optimizers: Sequence[torch.optim.Optimizer]
    params: Sequence[torch.Tensor] = ()
    grad_clip: float = 0.0
    average_gradients: bool = False
    lr_at: Optional[Callable[[int], float]] = None

    def apply(self, loss: torch.Tensor, step: int) -> None:
        """One optimizer step on ``loss`` (a scalar with gradient); ``step`` is the number of steps before it."""
        if self.lr_at is not None:
            rate = self.lr_at(step)
            for opt in self.optimizers:
                for group in opt.param_groups:
                    group["lr"] = rate * group.get("lr_scale", 1.0)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.average_gradients:
            average_gradients(self.params)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        for opt in self.optimizers:
            opt.step()


@dataclass
class LoopState:
    """Where a run stands; checkpoint writers store it, a resumed run starts from it.

    ``epoch`` / ``batch``: the next batch to train (``batch`` indexes ``TrainTask.batches(epoch)``); ``step``:
    optimizer steps so far, earlier runs included; ``resumed_from``: ``step`` when this run started;
    ``epochs_run``: epochs ended (an epoch cut short by ``max_steps`` counts); ``losses``: every step's loss
    (those of earlier runs when the checkpoint kept them); ``epoch_losses``: the current epoch's losses of this
    run; ``history``: the rows of ended epochs (``Evaluation.row``); ``epoch_seconds``: training seconds of each
    epoch (evaluation excluded); ``stopped``: patience ran out.
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    resumed_from: int = 0
    epochs_run: int = 0
    losses: list = field(default_factory=list)
    epoch_losses: list = field(default_factory=list)
    history: list = field(default_factory=list)
    epoch_seconds: list = field(default_factory=list)
    stopped: bool = False

    def __post_init__(self):
        self.resumed_from = self.step
        self.epochs_run = max(self.epochs_run, self.epoch)

    @property
    def steps_this_run(self) -> int:
        return self.step - self.resumed_from

    def reached(self, max_steps: Optional[int]) -> bool:
        """Whether ``max_steps`` (None / 0: no cap) steps are done."""
        return bool(max_steps) and self.step >= max_steps


@dataclass
class Evaluation:
    """What ``TrainTask.evaluate`` returns for one epoch.

    Args:
        score: higher is better (None: the epoch only adds a history row, nothing is judged).
        row: the epoch's history row (the selection may annotate it).
        detail: whatever the selection rule needs besides the score (e.g. per-query ranks for a paired test).
    """

    score: Optional[float]
    row: dict
    detail: Any = None


class TrainTask(Protocol):
    """What one model brings to :func:`fit_loop`."""

    def batches(self, epoch: int) -> Sequence:
        """The epoch's batches in order (called once at the epoch's start, also when a resumed run starts inside
        it: the order must be a function of the epoch); a None entry is skipped without a step."""

    def loss(self, batch) -> torch.Tensor:
        """The scalar training loss of one batch, with gradient."""

    def evaluate(self, epoch: int, state: LoopState, complete: bool) -> Optional[Evaluation]:
        """Judge the epoch that just ended (``complete``: all its batches ran); None adds no history row."""

    def snapshot(self) -> Any:
        """A copy of the weights (this rank's part), for best-restore."""

    def restore(self, snapshot: Any) -> None:
        """Load a snapshot back."""


class Checkpointer(Protocol):
    """A checkpoint writer in the model's own format; every rank calls ``save`` (it may gather shards)."""

    def save(self, state: LoopState, selection: Optional["Selection"], event: str) -> Optional[Path]:
        """Write a checkpoint; ``event`` is "step" (mid-epoch), "epoch" (an epoch ended) or "final" (the chosen
        weights were restored after training). Returns the path written, None when nothing was written here."""


class Selection:
    """Early stopping with best-restore: the epoch with the highest score wins.

    ``offer`` judges one epoch: a score above the best so far makes it the best (its weights are snapshotted);
    otherwise one more epoch without improvement, and ``patience`` of them in a row stop training (patience None or
    0: never). ``restore`` loads the best epoch's weights at the end. The starting point can be given: a baseline
    score (an epoch must beat it), its epoch label and its snapshot (restored when no epoch beats it).

    Args:
        patience: judged epochs without a higher score before stopping.
        best_score / best_epoch / snapshot: the baseline, or the best so far of a resumed run.
        since_best: judged epochs since the best (a resumed run's count).
    """

    def __init__(self, patience: Optional[int], best_score: float = -math.inf, best_epoch: Optional[int] = None,
                 snapshot: Any = None, since_best: int = 0):
        self.patience = patience
        self.best_score, self.best_epoch, self.snapshot = best_score, best_epoch, snapshot
        self.since_best = since_best
        self.best: Optional[Evaluation] = None  # the best epoch's evaluation (None: the baseline)
        self.improved = False  # the last offer set a new best

    def offer(self, epoch: int, evaluation: Evaluation, snapshot: Callable[[], Any]) -> bool:
        """Judge one epoch (``snapshot()`` copies its weights); returns True when patience ran out."""
        stop = self.count(epoch, evaluation.score)
        if self.improved:
            self.best, self.snapshot = evaluation, snapshot()
        return stop

    def count(self, epoch: int, score: float) -> bool:
        """Early stopping alone: a higher score than the best so far resets the count, anything else adds one;
        returns True when ``patience`` epochs in a row did not improve (sets ``improved``)."""
        self.improved = score > self.best_score
        if self.improved:
            self.best_score, self.best_epoch, self.since_best = score, epoch, 0
            return False
        self.since_best += 1
        return bool(self.patience) and self.since_best >= self.patience

    def restore(self, task: TrainTask, state: LoopState) -> bool:
        """Load the chosen weights into the model; returns whether any were loaded."""
        if self.snapshot is None:
            return False
        task.restore(self.snapshot)
        return True


@dataclass
class LoopRun:
    """What :func:`fit_loop` returns: the final state, the selection (best epoch, score) and the last checkpoint
    written (or the one the run resumed from when it wrote none)."""

    state: LoopState
    selection: Optional[Selection]
    checkpoint: Optional[Path]
    restored: bool


def fit_loop(task: TrainTask, cfg: LoopConfig, updates: Updates, selection: Optional[Selection] = None,
             checkpointer: Optional[Checkpointer] = None, state: Optional[LoopState] = None,
             checkpoint: Optional[Path] = None) -> LoopRun:
    """Train ``task`` from ``state`` (a fresh run when None) until ``cfg.epochs``, ``cfg.max_steps`` or the
    selection's patience; then restore the selected weights.

    Args:
        task: the model (:class:`TrainTask`).
        cfg: :class:`LoopConfig`.
        updates: the optimizer step (:class:`Updates`).
        selection: early stopping and best-restore (None: every epoch's row is kept, nothing is judged or restored).
        checkpointer: the checkpoint writer (None: nothing is written).
        state: where a resumed run continues (its weights, optimizers and RNG already loaded).
        checkpoint: the checkpoint ``state`` came from (returned when this run writes none).
    Returns:
        :class:`LoopRun`.
    """
    state = state if state is not None else LoopState()
    progress = _Progress(cfg, state.step)
    saver = _Saver(checkpointer, state, selection, checkpoint)
    try:
        while state.epoch < cfg.epochs and not state.stopped and not state.reached(cfg.max_steps):
            complete = _train_epoch(task, cfg, updates, state, progress, saver)
            ended = state.epoch
            state.epochs_run = ended + 1
            if complete:
                state.epoch, state.batch = ended + 1, 0
            evaluation = task.evaluate(ended, state, complete)
            if evaluation is not None:
                if evaluation.score is not None and selection is not None:
                    state.stopped = selection.offer(ended, evaluation, task.snapshot)
                state.history.append(evaluation.row)
            saver("epoch")
            if not complete:
                break  # max_steps ended it
    finally:
        progress.close()
    restored = selection.restore(task, state) if selection is not None else False
    if restored:
        saver("final")  # the checkpoint others load holds the weights that ship
    return LoopRun(state=state, selection=selection, checkpoint=saver.last, restored=restored)


class _Saver:
    """Calls the checkpointer (when there is one) and remembers the last path written."""

    def __init__(self, checkpointer: Optional[Checkpointer], state: LoopState, selection: Optional[Selection],
                 last: Optional[Path]):
        self.checkpointer, self.state, self.selection, self.last = checkpointer, state, selection, last

    def __call__(self, event: str) -> None:
        if self.checkpointer is not None:
            self.last = self.checkpointer.save(self.state, self.selection, event) or self.last


def _train_epoch(task: TrainTask, cfg: LoopConfig, updates: Updates, state: LoopState, progress: "_Progress",
                 save: "_Saver") -> bool:
    """Train the batches of ``state.epoch`` from ``state.batch`` on; returns whether the epoch ran to its end."""
    batches = task.batches(state.epoch)
    state.epoch_losses = []
    start = time.perf_counter()
    for index in range(state.batch, len(batches)):
        if state.reached(cfg.max_steps):
            break
        state.batch = index + 1
        if batches[index] is None:
            continue
        loss = task.loss(batches[index])
        updates.apply(loss, state.step)
        state.step += 1
        value = float(loss.detach())
        state.losses.append(value)
        state.epoch_losses.append(value)
        progress.step(state)
        if cfg.save_every and state.step % cfg.save_every == 0 and state.batch < len(batches):
            save("step")
    state.epoch_seconds.append(time.perf_counter() - start)
    return state.batch >= len(batches)


class _Progress:
    """The loop's one progress call site: ``feature_store.progress.Progress`` (a tqdm bar on a terminal, otherwise a
    line at least every ``heartbeat_s`` seconds; rank 0 only), plus the loss every ``log_every`` steps."""

    def __init__(self, cfg: LoopConfig, initial: int):
        from feature_store.progress import Progress

        self.cfg = cfg
        self.bar = Progress(cfg.desc, cfg.total_steps, unit="step", initial=initial, enabled=cfg.is_main,
                            bar=None if cfg.progress else False, every_s=cfg.heartbeat_s, logger=log)

    def step(self, state: LoopState) -> None:
        if not self.cfg.is_main:
            return
        recent = state.losses[-20:]
        self.bar.update(1, epoch=state.epoch, loss=sum(recent) / len(recent))
        every = self.cfg.log_every
        if every and state.step % every == 0:
            window = state.losses[-every:]
            log.info("%s epoch %d step %d/%s loss %.4f (mean of last %d: %.4f)", self.cfg.desc, state.epoch,
                     state.step, self.cfg.total_steps or "?", state.losses[-1], every, sum(window) / len(window))

    def close(self) -> None:
        self.bar.close()


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Data parallel without a DDP wrapper: every gradient becomes its mean over the ranks (a no-op in one
    process)."""
    world = _world()
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


def all_reduce_mean(values: dict) -> dict:
    """{name: float} averaged over the ranks (every rank must call it; the identity in one process)."""
    if _world() == 1 or not values:
        return dict(values)
    names = sorted(values)
    t = torch.tensor([float(values[k]) for k in names], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return {k: float(v) / _world() for k, v in zip(names, t.tolist())}


def rng_state(ctx) -> Optional[dict]:
    """Every rank's torch RNG state (dropout draws from it), stacked on rank 0: {"torch": (world, S) uint8,
    "cuda": (world, S') uint8 on GPU}; None on other ranks. Every rank must call it (``ctx``: a
    ranker.distributed.DistContext)."""
    local = {"torch": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        local["cuda"] = torch.cuda.get_rng_state(ctx.device).cpu()
    gathered = [local]
    if ctx.distributed:
        gathered = [None] * ctx.world_size
        torch.distributed.all_gather_object(gathered, local)
    return {k: torch.stack([g[k] for g in gathered]) for k in local} if ctx.is_main else None


def set_rng_state(state: Optional[dict], ctx) -> None:
    """Inverse of :func:`rng_state`: each rank takes its own row (row 0, with a warning, when the world size
    changed)."""
    if not state:
        return
    rows = state["torch"]
    row = ctx.rank if rows.shape[0] == ctx.world_size else 0
    if rows.shape[0] != ctx.world_size and ctx.is_main:
        log.warning("resume: checkpoint RNG state is from %d rank(s), this run has %d: random draws will differ "
                    "from an uninterrupted run", rows.shape[0], ctx.world_size)
    torch.set_rng_state(rows[row].clone())
    if "cuda" in state and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][min(row, state["cuda"].shape[0] - 1)].clone(), ctx.device)
