"""Evaluation: cached features, linear probe, kNN, label-efficiency sweeps, reports, the online probe."""

from selfsup.eval.features import Features, extract_features
from selfsup.eval.knn import knn_classify, knn_predict, knn_scores
from selfsup.eval.label_efficiency import label_efficiency_sweep, subset_from_file, subset_indices
from selfsup.eval.linear import LinearClassifier, fit_logistic, linear_probe
from selfsup.eval.online import FrozenEncoder, OnlineLinearProbe
from selfsup.eval.report import plot_sweep, print_sweep_table, read_json, write_json
from selfsup.eval.shard import Shard

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
