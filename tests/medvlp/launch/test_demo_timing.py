"""`make demo` splits its wall time into install, corpus, training and eval."""
from __future__ import annotations


import pytest

from medvlp.launch.demo import _timing_eval, wall_split


def test_wall_split_subtracts_eval_from_training() -> None:
    assert wall_split(100.0, 5.0, 30.0, 8.0) == ("wall time: install 100 s, corpus 5 s, training 22 s, eval 8 s; "
                                                 "total 135 s")
    assert wall_split(None, 5.0, 30.0, 8.0) == "wall time: corpus 5 s, training 22 s, eval 8 s; total 35 s"


def test_timing_eval_records_and_restores() -> None:
    import medvlp.pretrain.eval as pe

    inner, spent = pe.evaluate_for_training, []
    with _timing_eval(spent):
        assert pe.evaluate_for_training is not inner
        with pytest.raises((AttributeError, TypeError)):  # a bad call still counts its time and re-raises
            pe.evaluate_for_training(None, None)
    assert pe.evaluate_for_training is inner
    assert len(spent) == 1 and 0.0 <= spent[0] < 60.0
