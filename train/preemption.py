"""Graceful preemption: SIGTERM (what SLURM, Kubernetes and torchrun send before killing a job) or
SIGINT (Ctrl-C) lets every rank finish the current step, save a checkpoint together, and exit; a
second signal exits at once.

A signal may reach some ranks and not others, or reach them during different steps, so the ranks
agree on it once per step before anyone stops: all stop after the same step, and all take part in
the save. The training step carries the agreement in the all-reduce it does anyway (whether the
step's loss and gradient are finite: train/step.py), so a step has one collective that waits for
the host, not two; the SFT warm start's steps too. Between the stages before training (the
reference's log-probs, the first samples and eval) the ranks agree once per stage (agreed).
"""
import signal
import sys

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """Records the first SIGTERM/SIGINT while installed; the second one ends the process by the
    signal's default action (or KeyboardInterrupt for SIGINT)."""

    def __init__(self):
        self.received = None  # the first signal's number
        self.previous_handlers = {}

    def install(self):
        for signum in STOP_SIGNALS:
            self.previous_handlers[signum] = signal.signal(signum, self.handle)

    def restore(self):
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers = {}

    def handle(self, signum, frame):
        if self.received is not None:  # the second signal: exit at once
            self.restore()
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.received = signum
        print(f"received {signal.Signals(signum).name}: finishing this step, then saving a checkpoint and exiting "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    def local_signal(self) -> float:
        """This rank's part of the agreement: the signal number it received, or 0."""
        return float(self.received or 0)

    def agreed(self, device) -> int:
        """Collective: the signal number if any rank received one, else 0."""
        received = torch.tensor([self.local_signal()], device=device)
        dist.all_reduce(received, op=dist.ReduceOp.MAX)
        return int(received.item())
