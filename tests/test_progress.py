"""Progress a log file can hold: plain lines when stdout is not a terminal, no carriage-return frames."""

from __future__ import annotations

import io

import pytest
from lightning.pytorch.callbacks import TQDMProgressBar

from fusion_lightning.callbacks.progress import LineProgressBar, progress_bar
from fusion_lightning.config import compose_recipe
from fusion_lightning.fit import build, run


def test_the_default_progress_is_lines_without_a_terminal_and_a_bar_on_one(monkeypatch) -> None:
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert isinstance(progress_bar(), LineProgressBar)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert isinstance(progress_bar(refresh_rate=5), TQDMProgressBar)
    with pytest.raises(ValueError, match="interval must be > 0"):
        LineProgressBar(interval=0)


def test_a_fit_writes_one_line_per_epoch_and_per_interval(fast_overrides: list[str]) -> None:
    r = build(compose_recipe("router_mlp", fast_overrides))
    bars = [c for c in r.trainer.callbacks if isinstance(c, LineProgressBar)]
    assert len(bars) == 1  # pytest's captured stdout is not a terminal: the line printer, not TQDM
    bars[0].stream, bars[0].interval = io.StringIO(), 1e-9  # every step gets its line
    run(r)
    text = bars[0].stream.getvalue()
    assert "\r" not in text
    done = [line for line in text.splitlines() if " done: " in line]
    assert [line.split()[2] for line in done] == ["1/3", "2/3", "3/3"]
    assert "steps/s" in done[0] and "ETA" in done[0] and "val/loss" in done[0] and "ETA" not in done[-1]
    steps = [line for line in text.splitlines() if " step " in line and " done: " not in line]
    assert steps and "epoch ETA" in steps[0] and "train/loss" in text
