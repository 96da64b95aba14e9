"""Tests for haframe_ext.training.runlog: the epoch line."""

from haframe_ext.training.runlog import epoch_line
from haframe_ext.train import TrainConfig


def test_the_epoch_line_states_top1_in_percent_for_train_and_val():
    """Issue 12: one unit per quantity (it printed 'acc 0.009 | val top1 1.0000')."""
    cfg = TrainConfig(method="cross-entropy", epochs=3)
    line = epoch_line(cfg, 2, 1.23456, 0.9, {"top1": 1.0, "hierdist@1": 2.5})
    assert line == "[cross-entropy] epoch 2/3 loss 1.2346 train top1 0.90% | val top1 1.00% hierdist@1 2.500"
    line = epoch_line(TrainConfig(epochs=3), 1, 1.0, None, {"top1": 50.0, "hierdist@1": 1.0})
    assert line == "[haframe] epoch 1/3 loss 1.0000 | val top1 50.00% hierdist@1 1.000"
