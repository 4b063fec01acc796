"""Shared pieces of the experiment binaries: user-facing errors, atomic output, prompt files,
the device mesh (``--mesh``) and multi-host start-up (``--distributed``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Callable

# jax logs at INFO that it found no TPU on every CPU run; keep the binaries' output readable.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


class UserError(Exception):
    """A problem with the user's input: printed as one clear line, no traceback, exit code 2."""


class Interrupted(BaseException):
    """SIGTERM (SIGINT is Python's KeyboardInterrupt): stop cleanly, write nothing partial."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# Exit statuses of every binary: 0 done, 1 a result that is wrong (a losslessness bug, a failed
# peer), 2 bad input (flags, files, prompts: one line on stderr, nothing written), 128 + signal
# number when interrupted (130 for Ctrl-C, 143 for SIGTERM).
EXIT_BAD_INPUT = 2


def parse_flags(argv):
    """absl's flag parser for ``app.run(main, flags_parser=common.parse_flags)``: a bad flag
    (unknown, malformed, out of range) is one ``error:`` line and exit status 2, like every
    other input error (absl alone prints a usage dump and exits 1)."""
    from absl import flags
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e} (see --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _raise_interrupted(signum, frame):
    del frame
    raise Interrupted(signum)


# An exception raised while the interpreter runs a garbage-collection callback or a __del__
# (jax registers one) is printed as "Exception ignored in ..." and DROPPED, so a Ctrl-C or
# SIGTERM landing there would be lost (seen: a run went on to the end). Such a dropped
# interruption is raised again from a SIGALRM a moment later, and nothing is printed for it.
_DROPPED: list = []


def _keep_dropped_interruptions(unraisable, default=sys.unraisablehook):
    import signal
    if isinstance(unraisable.exc_value, (KeyboardInterrupt, Interrupted)):
        _DROPPED.append(getattr(unraisable.exc_value, "signum", signal.SIGINT))
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        return
    default(unraisable)


def _raise_dropped(signum, frame):
    del signum, frame
    if _DROPPED:
        sig = _DROPPED.pop()
        import signal
        raise KeyboardInterrupt if sig == signal.SIGINT else Interrupted(sig)


def start(argv, quiet: bool = True) -> None:
    """The start of every binary's ``main``: no positional arguments (absl's usage error
    otherwise), absl logging at WARNING unless ``--verbosity`` was given (``quiet``), and
    SIGTERM turned into a clean stop (:func:`user_errors` reports it)."""
    import signal

    from absl import app, flags, logging as absl_logging
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if quiet and not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGALRM, _raise_dropped)
    sys.unraisablehook = _keep_dropped_interruptions


@contextlib.contextmanager
def user_errors():
    """Turns input errors into one ``error:`` line and exit status 2, and an interruption
    (Ctrl-C, SIGTERM) into one line and 128 + the signal number: never a traceback. Output
    files are written atomically at the end, so an interrupted run leaves none."""
    import signal

    from specjax.cache import CacheCapacityError
    try:
        yield
    except (UserError, ValueError, CacheCapacityError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except (KeyboardInterrupt, Interrupted) as e:
        # Training stops between steps and saves first (specjax.train.TrainingInterrupted).
        signum = getattr(e, "signum", signal.SIGINT)
        step = getattr(e, "step", None)
        resume = (f"; checkpoint saved at step {step}, rerun the same command to resume"
                  if step is not None else "")
        print(f"interrupted ({signal.Signals(signum).name}): stopped, no output written{resume}",
              file=sys.stderr)
        sys.exit(128 + signum)


def write_json_atomic(path: str, obj) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically: a reader never sees a half-written file,
    and a failure leaves no partial output."""
    from specjax.files import write_text_atomic
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_outputs(FLAGS, result, markdown: Callable[[], str]) -> None:
    """Writes ``result`` to ``--output_json`` and ``markdown()`` to ``--output_md`` (each only
    when given; atomically, checked at the start by :func:`check_outputs`)."""
    from specjax.files import write_text_atomic
    if FLAGS.output_json:
        write_json_atomic(FLAGS.output_json, result)
    if FLAGS.output_md:
        write_text_atomic(FLAGS.output_md, markdown())


def check_outputs(FLAGS, *files: str, dirs: tuple[str, ...] = ()) -> None:
    """Checks the output paths the flags ``files`` (files) and ``dirs`` (directories) name,
    before any work: refused with the flag and the path when they could not be written."""
    from specjax.files import check_writable, check_writable_dir
    for flag in files:
        if FLAGS[flag].value:
            check_writable(FLAGS[flag].value, f"--{flag}")
    for flag in dirs:
        if FLAGS[flag].value:
            check_writable_dir(FLAGS[flag].value, f"--{flag}")


def run_training(FLAGS, state, step_fn, get_batch, frozen, meta: dict, eval_fn, log_fn):
    """The training binaries' loop (``specjax.train.train_resumable``) driven by their shared
    flags (``--steps``, ``--ckpt_dir``, ``--ckpt_every``, ``--eval_every``, ``--progress``): a
    resumed run says so on stderr, a checkpoint of another run is a :class:`UserError`.

    Returns:
      ``(state, start_step, wall_s)``.
    """
    import time

    from specjax import train
    t = time.time()
    try:
        state, start = train.train_resumable(
            state, step_fn, get_batch, frozen, FLAGS.steps, FLAGS.ckpt_dir, FLAGS.ckpt_every,
            meta, on_resume=lambda step: print(f"resumed from {FLAGS.ckpt_dir} at step {step}",
                                               file=sys.stderr, flush=True),
            eval_fn=eval_fn, eval_every=FLAGS.eval_every or FLAGS.steps, log_fn=log_fn,
            progress=FLAGS.progress)
    except train.TrainCheckpointError as e:
        raise UserError(str(e)) from None
    return state, start, time.time() - t


def corpus_weights(given, num_dirs: int):
    """The per-directory repeat counts of a ``--corpus_weights`` list (None when empty);
    UserError unless there is one whole number >= 0 per directory, not all 0."""
    if not given:
        return None
    try:
        repeats = [int(w) for w in given]
    except ValueError:
        raise UserError(f"--corpus_weights={','.join(given)}: give whole numbers, one per "
                        "--corpus_dir") from None
    if len(repeats) != num_dirs or min(repeats) < 0 or not any(repeats):
        raise UserError(f"--corpus_weights gives {len(repeats)} weights for {num_dirs} "
                        "--corpus_dir entries: give one whole number >= 0 per directory, not "
                        "all 0")
    return repeats


def corpus_dirs(value: str) -> list[str]:
    """The directories of a ``--corpus_dir`` flag (comma-separated), each checked to hold a
    complete corpus before any slow load (UserError: what is wrong and how to build one)."""
    from drafters import corpus as corpus_lib
    dirs = [d for d in value.split(",") if d]
    for d in dirs:
        try:
            corpus_lib.read_manifest(d)
        except corpus_lib.CorpusError as e:
            raise UserError(str(e)) from None
    return dirs


def corpus_build_start(FLAGS, check=None):
    """The checks every binary that builds a drafter's file from a corpus makes first, before
    any slow load (UserError each): ``--corpus_dir`` given, ``--output`` writable, the model
    known (``check(config)`` then runs, e.g. on option values against its vocabulary), the
    corpus directories complete. Returns ``(config, dirs, name)``: the model's config, the
    directories, and the name its shipped files go under."""
    from experiments import method_flags
    from models import registry as models
    if not FLAGS.corpus_dir:
        raise UserError("--corpus_dir is required (a corpus from build_corpus)")
    check_outputs(FLAGS, "output")
    config = method_flags.model_config(FLAGS)  # an unknown or malformed model, first
    if check is not None:
        check(config)
    return config, corpus_dirs(FLAGS.corpus_dir), models.model_name(FLAGS.model)


def check_text(text: str, what: str) -> str:
    """``text`` if it is valid Unicode text; UserError naming ``what`` and the first bad byte
    otherwise (command-line bytes that are not UTF-8 arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF \
            else f"character U+{ord(bad):04X}"
        raise UserError(f"{what} is not valid UTF-8 text ({byte} at position {e.start}): pass "
                        "UTF-8 (e.g. convert with iconv -t UTF-8)") from None
    return text


def read_prompts_file(path: str) -> list[str]:
    """One prompt per non-empty line of a UTF-8 file; UserError naming the file (and line)
    when it is missing, a directory, not UTF-8 or empty."""
    if not os.path.exists(path):
        raise UserError(f"--prompts_file {path!r} does not exist")
    if os.path.isdir(path):
        raise UserError(f"--prompts_file {path!r} is a directory: give a text file with one "
                        "prompt per line")
    prompts = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise UserError(f"--prompts_file {path!r} line {number} is not valid UTF-8 "
                                f"(byte 0x{raw[e.start]:02x} at column {e.start + 1}): save "
                                "the file as UTF-8 (e.g. iconv -t UTF-8)") from None
            if line.strip():
                prompts.append(line)
    if not prompts:
        raise UserError(f"--prompts_file {path!r} has no non-empty lines")
    return prompts


# Device mesh / multi-host --------------------------------------------------------------------

# Environment variables that mark one process of a multi-process (multi-host) job, with the
# value that means "more than one process" (jax.distributed.initialize() reads them itself).
_MULTI_PROCESS_ENV = {
    "TPU_WORKER_HOSTNAMES": lambda v: len([h for h in v.split(",") if h.strip()]) > 1,  # TPU pod
    "MEGASCALE_NUM_SLICES": lambda v: v.strip() not in ("", "0", "1"),  # multislice TPU
    "SLURM_NTASKS": lambda v: v.strip().isdigit() and int(v) > 1,  # SLURM (GPU clusters)
    "OMPI_COMM_WORLD_SIZE": lambda v: v.strip().isdigit() and int(v) > 1,  # mpirun
    "JAX_COORDINATOR_ADDRESS": lambda v: bool(v.strip()),  # explicit jax coordinator
}


def define_mesh_flags(fv=None) -> None:
    """``--mesh`` and ``--distributed`` in ``fv`` (default: absl's global flags); call once per
    binary, next to its other flags."""
    from absl import flags
    fv = flags.FLAGS if fv is None else fv
    flags.DEFINE_string(
        "mesh", "auto",
        "Device mesh DATAxMODEL, e.g. 2x4: batch rows split 2 ways, tensor parallelism 4 ways "
        "(heads, MLP, vocabulary); DATA*MODEL devices of all hosts are used. 'auto': every "
        "device on MODEL when that divides the model's heads and MLP, else one device.",
        flag_values=fv)
    flags.DEFINE_enum(
        "distributed", "auto", ["auto", "on", "off"],
        "Call jax.distributed.initialize() (multi-host: Cloud TPU pod slices, SLURM, mpirun). "
        "'auto' does so when the environment shows a multi-process job.", flag_values=fv)


def multi_process_env(environ=None) -> bool:
    """Whether the environment is one process of a multi-process job."""
    environ = os.environ if environ is None else environ
    return any(name in environ and test(environ[name])
               for name, test in _MULTI_PROCESS_ENV.items())


def init_distributed(mode: str) -> bool:
    """``jax.distributed.initialize()`` for ``--distributed=on`` (or ``auto`` in a multi-process
    environment); must run before anything touches a JAX device. Returns whether it ran."""
    if mode == "off" or (mode == "auto" and not multi_process_env()):
        return False
    import jax
    try:
        jax.distributed.initialize()  # coordinator, process id and count from the environment
    except (RuntimeError, ValueError) as e:
        raise UserError(f"jax.distributed.initialize() failed ({e}): on a Cloud TPU VM run the "
                        "same command on every worker (gcloud ... ssh --worker=all); elsewhere "
                        "set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or "
                        "pass --distributed=off for one host") from None
    return True


def mesh_plan(mesh: str, config, batch_size: int | None = None):
    """The :class:`specjax.sharding.ShardingPlan` for ``--mesh`` on a model config, or None
    when it is one device (today's single-device path). Raises :class:`UserError` with what to
    do for a bad value, a mesh larger than the devices, a model axis that does not fit the
    model, or a data axis that does not divide ``batch_size``."""
    from specjax import sharding
    try:
        shape = (sharding.default_mesh_shape(config) if mesh.strip().lower() == "auto"
                 else sharding.parse_mesh(mesh))
        if shape == (1, 1):
            return None
        plan = sharding.plan_for_config(*shape, config)
        if batch_size is not None:
            plan.check_batch(batch_size)
    except ValueError as e:
        raise UserError(f"--mesh={mesh}: {e}") from None
    return plan


def place_on_mesh(loaded, plan):
    """``loaded`` with its params placed on the plan's mesh (one ``device_put``; the decoding
    loops never move them again). Unchanged without a plan."""
    if plan is None:
        return loaded
    import dataclasses
    return dataclasses.replace(loaded, params=plan.shard_params(loaded.params,
                                                                loaded.model.logical_axes()))
