"""Clean stops: a signal, the trainer's numerical stop or a bad volume under the strict policy end a run with a
checkpoint, a closed MLflow run and a documented exit code."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import torch.distributed as dist
from ignite.engine import Engine, Events

from voco.engine.checkpointing import AtomicCheckpointSaver
from voco.distributed import get_rank, is_distributed
from voco.errors import VolumeError, error_sentence
from voco.tracking import RunLogger

logger = logging.getLogger("voco.engine")

# Exit code of a run stopped by a bad volume under the strict policy (``bad_volumes="stop"``).
EXIT_BAD_DATA = 4


class GracefulStop:
    """Ends a run that is asked to stop cleanly: SIGTERM (a cluster's preemption), SIGINT (Ctrl-C), the trainer's
    numerical stop (`PretextTrainer.max_bad_steps`), or a bad volume under the strict policy (a `VolumeError` from
    the loader, also from inside a worker process: exit code `EXIT_BAD_DATA`, the run FAILED, no traceback).

    On the first SIGTERM/SIGINT the current step finishes; then a checkpoint of the state after that step is
    written (the newest, so resume takes it), the MLflow run is closed as KILLED (FAILED for a numerical stop), the
    engine ends without its COMPLETED handlers (no final validation or picture), and `exit_if_stopped` exits with
    128 + the signal number (143 for SIGTERM, 130 for SIGINT) or `EXIT_NON_FINITE`. A second signal ends the
    process at once (killed by that signal); the same signal again within `repeat_window_s` counts as the first,
    since process managers such as torchrun forward to their workers a signal the workers already got.

    Under torchrun every rank installs the handlers; the trainer's per-step all-reduce makes all ranks stop after
    the same step; rank 0 writes the checkpoint and the other ranks wait for it before exiting.
    Why our own: neither ignite nor MONAI handles signals (ignite's `Engine.terminate` is what stops the loop).

    Args:
        checkpoint_saver: the run's `AtomicCheckpointSaver` (None: stop without a checkpoint).
        repeat_window_s: seconds in which the same signal again is not a second request.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpoint_saver: AtomicCheckpointSaver | None = None, repeat_window_s: float = 2.0) -> None:
        self.checkpoint_saver, self.repeat_window_s = checkpoint_saver, repeat_window_s
        self.engine: Engine | None = None
        self._first: tuple[int, float] | None = None
        self._previous: dict[int, Any] = {}

    def attach(self, engine: Engine) -> None:
        self.engine = engine
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._stop_if_asked)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._stop_on_bad_data)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._fail_run)
        # first of the exception handlers: MONAI's (checkpoint saver, stats) re-raise and would skip the ones after
        handlers = engine._event_handlers[Events.EXCEPTION_RAISED]
        handlers.insert(0, handlers.pop())
        engine.add_event_handler(Events.TERMINATE, self._restore_handlers)
        engine.add_event_handler(Events.COMPLETED, self._restore_handlers)

    def _started(self, engine: Engine) -> None:
        self._first = None
        run = RunLogger(engine)
        if engine.state.iteration:  # resumed: one job is one MLflow run, also when it trains past a finished end
            run.continue_finished_run()
        run.mark_running()  # a resumed run continues the MLflow run that a stop closed
        if threading.current_thread() is not threading.main_thread():
            logger.warning("training runs outside the main thread: SIGTERM/SIGINT end it without a checkpoint")
            return
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _restore_handlers(self, engine: Engine) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Runs between two bytecodes of the main thread: only set a flag, and write with os.write (print could
        # re-enter a print the signal interrupted).
        name, now = signal.Signals(signum).name, time.monotonic()
        if self._first is None:
            self._first = (signum, now)
            self.engine.state.stop_requested = signum
            os.write(2, f"\nreceived {name}: stopping after this step with a checkpoint; send it again to stop "
                        f"at once.\n".encode())
        elif signum != self._first[0] or now - self._first[1] > self.repeat_window_s:
            os.write(2, f"\nreceived {name} while stopping: stopping at once, without a checkpoint.\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _fail_run(self, engine: Engine, error: BaseException) -> None:
        """Any other exception (in a step, a loader worker, validation, a handler) ends the MLflow run FAILED, so no
        crashed run stays RUNNING; the exception goes on (`_stop_on_bad_data` re-raises it)."""
        if not isinstance(error, VolumeError) and getattr(engine.state, "stop_reason", None) is None:
            RunLogger(engine).end("FAILED")
            self._restore_handlers(engine)

    def _stop_on_bad_data(self, engine: Engine, error: BaseException) -> None:
        """A bad volume under the strict policy: the same clean stop (checkpoint of the last step, run FAILED, a
        one-line message, `EXIT_BAD_DATA`); any other exception goes on as it came (ignite would swallow it)."""
        if not isinstance(error, VolumeError) or getattr(engine.state, "stop_reason", None) is not None:
            raise error
        print(f"stopping: {error_sentence(error)}", flush=True)
        engine.state.stop_reason, engine.state.exit_code = "bad volume", EXIT_BAD_DATA
        self._stop_if_asked(engine)

    def _stop_if_asked(self, engine: Engine) -> None:
        state = engine.state
        if getattr(state, "stop_reason", None) is None:
            return
        path = self.checkpoint_saver.save_now(engine) if self.checkpoint_saver is not None and state.iteration \
            else None
        if is_distributed() and state.stop_reason != "bad volume":  # a bad volume stops only the rank that read it
            dist.barrier()  # torchrun ends every rank at the first exit: rank 0 must have written the checkpoint
        RunLogger(engine).end("KILLED" if state.stop_reason in ("SIGTERM", "SIGINT") else "FAILED")
        if get_rank() == 0:
            where = f"the checkpoint {path}" if path is not None else "no checkpoint (no saver given)"
            print(f"stopped after step {state.iteration} ({state.stop_reason}) with {where}; run the same command "
                  f"to resume (exit code {state.exit_code}).", flush=True)
        engine.terminate(skip_completed=True)


def exit_if_stopped(trainer: Engine) -> None:
    """End the process with the exit code of an early stop (see `GracefulStop`); nothing after a complete run.
    The bundles call it last in ``finalize``."""
    code = getattr(trainer.state, "exit_code", None)
    if code:
        raise SystemExit(code)
