"""``python -m zoo.train`` for tests/test_reliability.py, sending itself a signal at a fixed step.

``ZOO_TEST_SIGNAL=<NAME>:<N>`` (e.g. ``SIGTERM:2``): the process sends itself signal ``NAME`` when the training
step that follows ``N`` completed optimizer steps begins, so the test does not race a file poll against the steps.
"""
import os
import signal
import sys

from zoo.train import main
from zoo.training import ZooLightningModule

name, step = os.environ["ZOO_TEST_SIGNAL"].split(":")
original = ZooLightningModule.training_step


def training_step(self, batch, batch_idx):
    if self.trainer.global_step == int(step):
        os.kill(os.getpid(), getattr(signal, name))
    return original(self, batch, batch_idx)


ZooLightningModule.training_step = training_step
sys.exit(main())
