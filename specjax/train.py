"""Generic training for small drafter modules: optimizer, jitted step, checkpoints, resume.

Nothing here knows about a particular drafter; a caller supplies

* ``loss_fn(params, batch, frozen) -> (loss, metrics)``: a pure function of the trainable
  params, one batch (a pytree of arrays) and ``frozen`` inputs (e.g. the target's params, which
  are never differentiated, updated or stored);
* ``get_batch(step) -> batch``: a deterministic function of the step number (see
  :func:`batch_indices`), so a run resumed from a checkpoint sees exactly the batches an
  uninterrupted run would have seen.

Usage::

    tx = make_optimizer(lr=1e-3, warmup=50, total_steps=1000)
    state = TrainState.create(params, tx)
    step_fn = make_train_step(loss_fn, tx)
    with Checkpointer(ckpt_dir, every=100, meta={"drafter": "medusa"}) as ckpt:
        state = ckpt.restore_or(state)
        state = train_loop(state, step_fn, get_batch, frozen, num_steps=1000, checkpointer=ckpt)

A checkpoint holds the whole :class:`TrainState` (step, params, optimizer state) plus a JSON
``meta`` dict; restoring checks both against the current run and raises
:class:`TrainCheckpointError` with a readable message on any mismatch or damage.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct


class TrainCheckpointError(ValueError):
    """A training checkpoint that does not fit this run, or that cannot be read."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped :func:`train_loop` between two steps, after the state was
    checkpointed; ``signum`` says which signal. A rerun with the same checkpointer resumes."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"signal {signum} at step {step}")
        self.signum, self.step = signum, step


class _DeferredInterrupts:
    """Holds SIGINT / SIGTERM until the current step ends (a second signal stops at once).

    A signal that lands inside an Orbax save or a jitted step would leave a traceback from a
    worker thread and perhaps a half-written step directory; deferring it to the step boundary
    lets :func:`train_loop` save a complete checkpoint first. Only in the main thread (signal
    handlers cannot be set elsewhere); a no-op otherwise."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # the second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        import signal
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@struct.dataclass
class TrainState:
    """Everything a training run carries from step to step.

    Attributes:
      step: int32[] number of optimizer updates applied so far.
      params: the trainable parameters.
      opt_state: the optax state of ``tx``.
    """

    step: jax.Array
    params: Any
    opt_state: Any

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation) -> "TrainState":
        params = jax.tree.map(jnp.asarray, params)
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def make_schedule(lr: float, warmup: int, total_steps: int, final_fraction: float = 0.1):
    """Linear warmup from 0 to ``lr`` over ``warmup`` steps, then cosine decay to
    ``final_fraction * lr`` at ``total_steps``."""
    if lr <= 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    if warmup < 0 or total_steps < 1:
        raise ValueError(f"need warmup >= 0 and total_steps >= 1, got {warmup}, {total_steps}")
    warmup = min(warmup, total_steps)
    decay_steps = max(total_steps, warmup + 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_steps,
                                              end_value=lr * final_fraction)


def make_optimizer(lr: float, warmup: int, total_steps: int, weight_decay: float = 0.0,
                   clip_norm: float = 1.0, b1: float = 0.9, b2: float = 0.95
                   ) -> optax.GradientTransformation:
    """AdamW with warmup-cosine learning rate and global-norm gradient clipping."""
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(make_schedule(lr, warmup, total_steps), b1=b1, b2=b2,
                                   weight_decay=weight_decay))


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, donate: bool = True):
    """A jitted ``step(state, batch, frozen) -> (state, metrics)``.

    ``metrics`` holds ``loss``, ``grad_norm`` and whatever ``loss_fn`` returned. The incoming
    state's buffers are donated (do not reuse the argument after the call); ``frozen`` gets no
    gradient (it is wrapped in ``stop_gradient``) and is never donated.
    """

    def step(state: TrainState, batch, frozen):
        frozen = jax.lax.stop_gradient(frozen)

        def objective(params):
            return loss_fn(params, batch, frozen)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> np.ndarray:
    """Example indices of batch ``step``: a pure function of ``(seed, step)``.

    Epoch ``e = step * batch_size // num_examples`` uses its own permutation, so every example
    is seen once per epoch; resuming at any step reproduces the same order.
    """
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need num_examples >= 1 and batch_size >= 1, got {num_examples}, "
                         f"{batch_size}")
    start = step * batch_size
    out = np.empty(batch_size, np.int64)
    filled = 0
    while filled < batch_size:
        epoch, offset = divmod(start + filled, num_examples)
        perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
        take = min(batch_size - filled, num_examples - offset)
        out[filled:filled + take] = perm[offset:offset + take]
        filled += take
    return out


class Checkpointer:
    """Orbax ``CheckpointManager`` for :class:`TrainState` plus a JSON ``meta`` dict.

    Args:
      directory: where step directories go (created).
      every: save every ``every`` steps (:meth:`maybe_save`); 0 disables periodic saves.
      meta: JSON-able description of the run (drafter type, sizes, ...). Restoring a checkpoint
        whose ``meta`` differs raises :class:`TrainCheckpointError`.
      max_to_keep: newest checkpoints kept.
    """

    def __init__(self, directory: str | os.PathLike, every: int = 0,
                 meta: Optional[Mapping] = None, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        self.every = int(every)
        self.meta = dict(meta or {})
        os.makedirs(self.directory, exist_ok=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                 create=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def save(self, state: TrainState, force: bool = True) -> int:
        """Writes ``state`` under its step number (blocking until it is on disk)."""
        step = int(state.step)
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(self.meta)), force=force)
        self._manager.wait_until_finished()
        return step

    def maybe_save(self, state: TrainState) -> bool:
        step = int(state.step)
        if self.every and step % self.every == 0 and step != self.latest_step():
            self.save(state)
            return True
        return False

    def restore(self, like: TrainState, step: Optional[int] = None) -> TrainState:
        """The checkpoint at ``step`` (default: the latest), shaped like ``like``.

        Raises:
          FileNotFoundError: no checkpoint in the directory.
          TrainCheckpointError: different ``meta``, a different tree / shape, or unreadable.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        where = os.path.join(self.directory, str(step))
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for damaged files
            raise TrainCheckpointError(
                f"checkpoint {where} is unreadable (damaged or not a specjax training "
                f"checkpoint): {type(e).__name__}: {e}; delete it or pick another --ckpt_dir"
            ) from None
        if dict(meta) != self.meta:
            diff = sorted(k for k in set(meta) | set(self.meta) if meta.get(k) != self.meta.get(k))
            raise TrainCheckpointError(
                f"checkpoint {where} was written by a different run configuration (differs in "
                f"{', '.join(diff)}: checkpoint {[meta.get(k) for k in diff]}, this run "
                f"{[self.meta.get(k) for k in diff]}); use another --ckpt_dir or the same flags")
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype), like)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as e:
            raise TrainCheckpointError(
                f"checkpoint {where} does not fit this run's parameters or is damaged: "
                f"{type(e).__name__}: {str(e)[:500]}") from None
        got = jax.tree.map(np.shape, restored)
        want = jax.tree.map(np.shape, like)
        if got != want:
            raise TrainCheckpointError(f"checkpoint {where} has shapes {got}, this run {want}")
        return restored

    def restore_or(self, state: TrainState) -> TrainState:
        """The latest checkpoint if there is one, else ``state`` unchanged."""
        if self.latest_step() is None:
            return state
        return self.restore(state)


def train_loop(state: TrainState, step_fn, get_batch: Callable[[int], Any], frozen,
               num_steps: int, checkpointer: Optional[Checkpointer] = None,
               eval_fn: Optional[Callable[[TrainState], Mapping]] = None, eval_every: int = 0,
               log_fn: Optional[Callable[[int, Mapping], None]] = None,
               progress: bool = False, stop_after: Optional[int] = None) -> TrainState:
    """Runs ``step_fn`` from ``state.step`` up to ``num_steps``.

    Saves through ``checkpointer`` every ``checkpointer.every`` steps and at the end; calls
    ``eval_fn(state)`` every ``eval_every`` steps and ``log_fn(step, metrics)`` with the last
    step's metrics (floats) after each eval. ``stop_after`` ends the run early after that step
    (as an interruption would; for tests).

    Raises:
      TrainingInterrupted: SIGINT or SIGTERM arrived; the step in flight finished and (with a
        ``checkpointer``) was saved first, so rerunning resumes where this run stopped.
    """
    start = int(state.step)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_steps, initial=start, unit="step", dynamic_ncols=True)
    with _DeferredInterrupts() as interrupts:
        state = _run_steps(state, step_fn, get_batch, frozen, num_steps, checkpointer, eval_fn,
                           eval_every, log_fn, bar, stop_after, interrupts)
        if checkpointer is not None and int(state.step) != checkpointer.latest_step():
            checkpointer.save(state)
    if interrupts.signum is not None:
        raise TrainingInterrupted(interrupts.signum, int(state.step))
    return state


def train_resumable(state: TrainState, step_fn, get_batch: Callable[[int], Any], frozen,
                    num_steps: int, ckpt_dir: Optional[str] = None, ckpt_every: int = 0,
                    meta: Optional[Mapping] = None,
                    on_resume: Optional[Callable[[int], None]] = None, **loop_kwargs
                    ) -> tuple[TrainState, int]:
    """:func:`train_loop` with checkpoints in ``ckpt_dir`` (none when None): resumes from the
    newest one (``on_resume(step)`` is told), saves every ``ckpt_every`` steps and at the end,
    and closes the checkpointer however the run ends. ``loop_kwargs`` go to
    :func:`train_loop` (``eval_fn``, ``eval_every``, ``log_fn``, ``progress``).

    Returns:
      ``(state, start_step)``: the final state and the step this run started from.
    """
    ckpt = Checkpointer(ckpt_dir, ckpt_every, meta) if ckpt_dir else None
    start = int(state.step)
    try:
        if ckpt is not None:
            state = ckpt.restore_or(state)
            start = int(state.step)
            if start and on_resume is not None:
                on_resume(start)
        state = train_loop(state, step_fn, get_batch, frozen, num_steps, checkpointer=ckpt,
                           **loop_kwargs)
    finally:
        if ckpt is not None:
            ckpt.close()
    return state, start


def _run_steps(state, step_fn, get_batch, frozen, num_steps, checkpointer, eval_fn, eval_every,
               log_fn, bar, stop_after, interrupts):
    start = int(state.step)
    metrics = {}
    try:
        for step in range(start, num_steps):
            state, metrics = step_fn(state, get_batch(step), frozen)
            done = step + 1
            if bar is not None:
                bar.update(1)
                if done % 10 == 0 or done == num_steps:
                    bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
            if checkpointer is not None:
                checkpointer.maybe_save(state)
            if eval_fn is not None and eval_every and (done % eval_every == 0
                                                       or done == num_steps):
                logged = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
                logged.update(eval_fn(state))
                if log_fn is not None:
                    log_fn(done, logged)
            if interrupts.signum is not None or (stop_after is not None and done >= stop_after):
                break
    finally:
        if bar is not None:
            bar.close()
    return state
