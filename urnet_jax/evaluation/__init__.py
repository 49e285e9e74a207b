"""Evaluation of trained runs: metrics (Table 3), Grad-CAM, figures, Markdown reports, robustness.

    from urnet_jax.evaluation import classification_metrics, gradcam
    metrics = classification_metrics(labels, predictions, class_names)   # metrics.json dictionary
    heatmaps = gradcam(model, variables, images)                          # (N, H, W) in [0, 1]

`runner.evaluate_run(workdir)` does everything `evaluate.py --workdir` does.
"""

from urnet_jax.evaluation.gradcam import gradcam
from urnet_jax.evaluation.metrics import classification_metrics, confusion_matrix, metrics_from_confusion

__all__ = ["classification_metrics", "confusion_matrix", "gradcam", "metrics_from_confusion"]
