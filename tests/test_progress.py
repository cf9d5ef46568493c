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

    bar = progress.lightning_bar()
    bar._trainer = SimpleNamespace(max_epochs=max_epochs)  # what the bar reads of its trainer
    assert bar._get_train_description(3).strip() == expected
