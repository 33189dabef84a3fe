"""Run train.py (or finetune.py) so that it pauses right after a chosen optimizer step until a signal
arrives: a test then sends the signal (`kill`, `scancel --signal`) and the preemption lands at exactly
that step on any machine, however fast or loaded.

    python -m tests.pause_at_step --step 4 --signal USR1 train.py ARGS...

When the pause starts, every rank prints ``paused at step K, waiting for SIG...`` (flushed), which is
what the test waits for before it signals. The signal is then handled by the run's own handlers.
"""

from __future__ import annotations

import argparse
import runpy
import signal
import sys
import time

from lightning.pytorch.callbacks import Callback

import cheaplunch.runner as runner

PAUSE_MESSAGE = "paused at step {step}, waiting for {name}"


class PauseAtStep(Callback):
    """Blocks at the end of the batch that completes optimizer step `step` until `signum` arrives; the
    run's own handler for it is called as usual."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum
        self.done = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.done or trainer.global_step != self.step:
            return
        self.done = True
        arrived = []
        previous = signal.getsignal(self.signum)

        def on_signal(signum, frame):
            arrived.append(signum)
            if callable(previous):
                previous(signum, frame)

        signal.signal(self.signum, on_signal)
        print(PAUSE_MESSAGE.format(step=self.step, name=signal.Signals(self.signum).name), flush=True)
        while not arrived:
            time.sleep(0.05)
        signal.signal(self.signum, previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", type=int, required=True, help="optimizer step after which to pause")
    parser.add_argument("--signal", default="TERM", help="signal name without SIG: TERM, USR1, INT")
    parser.add_argument("script", help="train.py or finetune.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    opts = parser.parse_args()
    pause = PauseAtStep(opts.step, getattr(signal, f"SIG{opts.signal.upper()}"))
    standard_callbacks = runner.standard_callbacks

    def with_pause(*args, **kwargs):
        # first in the list: the pause ends before the checkpoint callback looks for the signal
        return [pause, *standard_callbacks(*args, **kwargs)]

    runner.standard_callbacks = with_pause
    sys.argv = [opts.script, *opts.args]
    runpy.run_path(opts.script, run_name="__main__")


if __name__ == "__main__":
    main()
