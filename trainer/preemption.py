"""SIGTERM and Ctrl-C during `fit`: stop at the step reached, save, say how to resume, exit.

While `fit` runs in the main thread, `SignalGuard` catches SIGTERM and SIGINT. The compiled
calls run in a worker thread, so the handler runs at once: it sets the Trainer's stop variable,
which the call in flight checks before every step, so the call ends after the step it is in.
`Interrupt` (an action) then lets the loop's final boundary log and save at that step, flushes
the events, prints one line naming the step and the command that resumes, and exits with the
conventional status, 128 + the signal's number. A second Ctrl-C aborts at once, saving nothing.

Under `MultiWorkerMirroredStrategy` SIGTERM is TensorFlow's own
`tf.distribute.experimental.PreemptionCheckpointHandler`'s, which makes every worker save at
the same step (see `Trainer`); SIGINT is left to Python there.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from termwise.trainer.loop import Action, LoopState


class SignalGuard:
    """Installs the handlers for the duration of `fit` (main thread only), then restores them.

    Args:
        on_stop: called (in the main thread) with the signal number on the first signal.
        signals: the signals to catch.
    """

    def __init__(self, on_stop, signals=(signal.SIGTERM, signal.SIGINT)):
        self.on_stop = on_stop
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict = {}

    @property
    def active(self) -> bool:
        return bool(self._previous)

    def _handle(self, signum, frame) -> None:
        del frame
        if self.received is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now, whatever it costs
                print("Interrupted again: aborting without saving.", file=sys.stderr, flush=True)
                os._exit(128 + signum)
            return
        self.received = signum
        self.on_stop(signum)

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class Interrupt(Action):
    """Ends the loop when a signal arrived; after the final boundary saved, exits.

    Args:
        guard: the `SignalGuard` of this `fit`.
        on_exit: called with (signal number, the step reached) before exiting: flushes events and
            prints the line that says where the run stopped and how to resume.
    """

    def __init__(self, guard: SignalGuard, on_exit):
        self.guard = guard
        self.on_exit = on_exit

    def after_call(self, loop: LoopState) -> None:
        if self.guard.received is not None:
            loop.request_stop(signal.Signals(self.guard.received).name)

    def end(self, loop: LoopState) -> None:
        if self.guard.received is not None:
            self.on_exit(self.guard.received, loop.step)
            sys.exit(128 + self.guard.received)


class CallThread:
    """Runs compiled calls in one daemon worker thread, so the main thread handles signals.

    A call's exception is re-raised in the caller. The thread is a daemon, so an abort does not
    wait for the call in flight.
    """

    def __init__(self):
        self._request = threading.Condition()
        self._job = None
        self._result = None
        self._thread: threading.Thread | None = None

    def _work(self) -> None:
        while True:
            with self._request:
                while self._job is None:
                    self._request.wait()
                job = self._job
            try:
                result = (True, job())
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
                result = (False, error)
            with self._request:
                self._job, self._result = None, result
                self._request.notify_all()

    def __call__(self, job, meanwhile=None):
        """Runs `job` on the worker and returns its result; `meanwhile`, if given, runs in the
        calling thread while the job runs (its error is raised after the job's own)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="termwise-call", daemon=True)
            self._thread.start()
        with self._request:
            self._job, self._result = job, None
            self._request.notify_all()
        failure = None
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException as error:  # noqa: BLE001 - raised once the job has finished
                failure = error
        with self._request:
            while self._result is None:
                self._request.wait()
            ok, value = self._result
            self._result = None
        if not ok:
            raise value
        if failure is not None:
            raise failure
        return value


class ClusterPreemption(Action):
    """Under `MultiWorkerMirroredStrategy`: TensorFlow's `PreemptionCheckpointHandler`.

    It watches SIGTERM on every worker and agrees with the others on the call after which all of
    them save (the Trainer's own `save`, numbered by the global step) and exit with 143 (128 +
    SIGTERM). The workers must run the same calls, so the Trainer runs fixed-size calls there.

    Args:
        strategy: the `MultiWorkerMirroredStrategy`.
        save: saves the Trainer's checkpoint.
        on_exit: called with the step reached before exiting (flush, one line).
    """

    def __init__(self, strategy, save, on_exit):
        import atexit
        import shutil
        import signal
        import tempfile

        import tensorflow as tf

        self._step = 0

        def exit_fn():
            on_exit(signal.SIGTERM, self._step)
            sys.exit(128 + signal.SIGTERM)

        config = tf.distribute.experimental.TerminationConfig(
            exit_fn=exit_fn, save_fn=lambda: save()
        )
        # The handler's own checkpoint (its call counter) is never written: `save_fn` saves the
        # Trainer's. Its directories are scratch, on this worker only.
        scratch = tempfile.mkdtemp(prefix="termwise-preemption-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        self.handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            strategy.cluster_resolver,
            tf.train.Checkpoint(),
            os.path.join(scratch, "handler", "checkpoint"),
            config,
        )

    def after_call(self, loop: LoopState) -> None:
        self._step = loop.step
        self.handler.save_checkpoint_if_preempted()
