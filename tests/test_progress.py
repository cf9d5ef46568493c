import importlib.util
import warnings

import pytest
import rich.console

from selfsup import progress


def test_a_bar_prints_its_final_line_off_a_terminal_and_nothing_when_disabled(capsys):
    with progress.make_progress() as bar:
        task = bar.add_task("decoding my_images/train", total=30)
        bar.advance(task, 30)
    out = capsys.readouterr().out
    assert "decoding my_images/train" in out and "30/30" in out
    with progress.make_progress(enabled=False) as bar:
        bar.add_task("hidden", total=1)
    assert capsys.readouterr().out == ""


def test_in_a_notebook_without_ipywidgets_bars_print_plainly_and_never_warn(monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(rich.console, "_is_jupyter", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ipywidgets" else find_spec(name, *a))
    assert progress.notebook_without_widgets()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rich's 'install "ipywidgets" for Jupyter support' would raise here
        with progress.make_progress() as bar:
            assert not bar.console.is_jupyter and not bar.console.is_terminal
            task = bar.add_task("extract rotation-convnet_small val (360 images)", total=360)
            bar.advance(task, 360)
    assert "extract rotation-convnet_small val (360 images)" in capsys.readouterr().out
    assert progress.lightning_bar()._console_kwargs == {"force_jupyter": False, "force_terminal": False}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # with ipywidgets: rich's own widget
    assert not progress.notebook_without_widgets() and progress.console_kwargs() == {}


@pytest.mark.parametrize(("max_epochs", "expected"), [(10, "Epoch 3/9"), (-1, "Epoch 3"), (None, "Epoch 3")])
def test_training_bar_names_the_last_epoch_only_when_there_is_one(max_epochs, expected):
    from types import SimpleNamespace

    bar = progress.lightning_bar(plain=False)
    bar._trainer = SimpleNamespace(max_epochs=max_epochs)  # what the bar reads of its trainer
    assert bar._get_train_description(3).strip() == expected


def _recording_progress(record: list):
    """A stand-in for make_progress that draws on a forced 120-column terminal and keeps each console."""
    import io

    def make(*columns, enabled=True, transient=False, console=None):
        console = rich.console.Console(file=io.StringIO(), force_terminal=True, color_system=None, width=120)
        record.append(console)
        return progress.Progress(*(columns or progress.COLUMNS), console=console, disable=not enabled)

    return make


def test_sweep_bar_counts_fits(monkeypatch):
    import numpy as np

    from selfsup.eval import label_efficiency

    consoles: list = []
    monkeypatch.setattr(label_efficiency, "make_progress", _recording_progress(consoles))
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(2), 6)
    x = (rng.normal(size=(12, 4)) + y[:, None]).astype(np.float32)
    label_efficiency.label_efficiency_sweep({"enc": (x, y, x, y)}, ks=(1, None), seeds=(0,), methods=("knn",))
    text = consoles[0].file.getvalue()
    assert "2/2 fits" in text  # k=1 and all, one kNN fit each


def test_fine_tune_bar_counts_steps(monkeypatch):
    import numpy as np
    import torch

    from selfsup.data.datasets import load_dataset
    from selfsup.eval import finetune
    from selfsup.ssl.backbone import Backbone
    from selfsup.ssl.module import ImageEncoder

    consoles: list = []
    monkeypatch.setattr(progress, "make_progress", _recording_progress(consoles))
    torch.manual_seed(0)
    train = load_dataset("digits", "train", image_size=8)
    finetune.train_classifier(ImageEncoder(Backbone("convnet_small")), train, load_dataset("digits", "val", image_size=8),
                              np.arange(20), 10, steps=3, batch_size=8, accelerator="cpu", progress="fine-tune enc")
    text = consoles[0].file.getvalue()
    assert "fine-tune enc" in text and "3/3 steps" in text


def test_off_a_terminal_a_transient_bar_prints_nothing_not_an_empty_line(capsys):
    with progress.make_progress(transient=True) as bar:
        task = bar.add_task("label efficiency", total=3)
        bar.advance(task, 3)
    print("after")
    assert capsys.readouterr().out == "after\n"
    # a lasting bar still prints its one final line, and no blank one
    with progress.make_progress() as bar:
        task = bar.add_task("extract", total=2)
        bar.advance(task, 2)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("extract") and "2/2" in out


def test_off_a_terminal_a_bar_prints_a_line_every_10_percent_with_rate_and_time_left():
    import io

    clock = [0.0]
    out = io.StringIO()
    console = rich.console.Console(file=out, width=200)  # a file: not a terminal
    with progress.LoggedProgress(*progress.COLUMNS, console=console, get_time=lambda: clock[0]) as bar:
        task = bar.add_task("probe L2 search", total=50)
        for _ in range(50):
            clock[0] += 2.0
            bar.advance(task)
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("probe L2 search:")]
    assert len(lines) == 9  # 10%, 20%, ..., 90%; then rich's final line
    assert lines[0] == "probe L2 search: 5/50 (10%), 0.5/s, 0:00:10 elapsed, 0:01:30 left"
    # slow and without a total: a line a minute
    out.truncate(0)
    with progress.LoggedProgress(console=console, get_time=lambda: clock[0]) as bar:
        task = bar.add_task("steps", total=None)
        for _ in range(5):
            clock[0] += 30.0
            bar.advance(task)
    assert sum("steps: " in ln for ln in out.getvalue().splitlines()) == 2


def test_off_a_terminal_training_prints_lines_with_its_metrics():
    import io
    from types import SimpleNamespace

    out = io.StringIO()
    bar = progress.lightning_bar(plain=True)
    assert isinstance(bar, progress.LineProgressBar)
    bar.console = rich.console.Console(file=out, width=200)
    bar.get_metrics = lambda trainer, module: {"loss": 1.25, "v_num": 0}
    trainer = SimpleNamespace(estimated_stepping_batches=20, max_epochs=2, current_epoch=0, is_global_zero=True,
                              global_step=0)
    bar.on_train_start(trainer, None)
    for step in range(1, 21):
        trainer.global_step = step
        bar.on_train_batch_end(trainer, None, None, None, step)
    lines = out.getvalue().splitlines()
    assert len(lines) == 9 and lines[0].startswith("Epoch 0/1 steps: 2/20 (10%)") and lines[0].endswith("loss 1.25")
