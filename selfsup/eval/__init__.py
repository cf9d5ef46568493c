"""Evaluation: cached features, linear probe, kNN, label-efficiency sweeps, reports, the online probe.

Its names load on first use, so evaluating imports no Lightning: only the online probe
(:mod:`selfsup.eval.online`, a training callback) and distributed extraction need it.
"""

from typing import TYPE_CHECKING

from selfsup.lazy import lazy_exports

if TYPE_CHECKING:
    from selfsup.eval.features import Features, extract_features
    from selfsup.eval.knn import knn_classify, knn_predict, knn_scores
    from selfsup.eval.label_efficiency import label_efficiency_sweep, subset_from_file, subset_indices
    from selfsup.eval.linear import LinearClassifier, fit_logistic, linear_probe
    from selfsup.eval.online import FrozenEncoder, OnlineLinearProbe
    from selfsup.eval.report import plot_sweep, print_sweep_table, read_json, write_json
    from selfsup.eval.shard import Shard

_LAZY = {
    "Features": "selfsup.eval.features",
    "extract_features": "selfsup.eval.features",
    "knn_classify": "selfsup.eval.knn",
    "knn_predict": "selfsup.eval.knn",
    "knn_scores": "selfsup.eval.knn",
    "label_efficiency_sweep": "selfsup.eval.label_efficiency",
    "subset_from_file": "selfsup.eval.label_efficiency",
    "subset_indices": "selfsup.eval.label_efficiency",
    "LinearClassifier": "selfsup.eval.linear",
    "fit_logistic": "selfsup.eval.linear",
    "linear_probe": "selfsup.eval.linear",
    "FrozenEncoder": "selfsup.eval.online",
    "OnlineLinearProbe": "selfsup.eval.online",
    "plot_sweep": "selfsup.eval.report",
    "print_sweep_table": "selfsup.eval.report",
    "read_json": "selfsup.eval.report",
    "write_json": "selfsup.eval.report",
    "Shard": "selfsup.eval.shard",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)


__all__ = [
    "Features",
    "FrozenEncoder",
    "LinearClassifier",
    "OnlineLinearProbe",
    "Shard",
    "extract_features",
    "fit_logistic",
    "knn_classify",
    "knn_predict",
    "knn_scores",
    "label_efficiency_sweep",
    "linear_probe",
    "plot_sweep",
    "print_sweep_table",
    "read_json",
    "subset_from_file",
    "subset_indices",
    "write_json",
]
