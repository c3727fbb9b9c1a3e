"""The standard CMU-MOSI/MOSEI sentiment metrics, for predictions and labels in [-3, 3]."""

import numpy as np


def _arrays(preds, labels):
    preds, labels = np.asarray(preds, dtype=np.float64).ravel(), np.asarray(labels, dtype=np.float64).ravel()
    if preds.shape != labels.shape or preds.size == 0:
        raise ValueError(f"preds and labels must be non-empty and of one length, got {preds.size} and {labels.size}")
    return preds, labels


def mae(preds, labels) -> float:
    preds, labels = _arrays(preds, labels)
    return float(np.abs(preds - labels).mean())


def pearson(preds, labels) -> float:
    """Pearson correlation; 0 when either side is constant."""
    preds, labels = _arrays(preds, labels)
    p, q = preds - preds.mean(), labels - labels.mean()
    denom = np.sqrt((p * p).sum() * (q * q).sum())
    return float((p * q).sum() / denom) if denom > 0 else 0.0


def binary_accuracy_f1(preds, labels):
    """Accuracy and weighted F1 of the non-negative (>= 0) vs negative (< 0) split."""
    preds, labels = _arrays(preds, labels)
    p, y = preds >= 0, labels >= 0
    accuracy = float((p == y).mean())
    f1 = 0.0
    for cls in (True, False):
        tp = np.sum(p & y if cls else ~p & ~y)
        fp = np.sum(p & ~y if cls else ~p & y)
        fn = np.sum(~p & y if cls else p & ~y)
        score = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0
        f1 += score * np.mean(y == cls)
    return accuracy, float(f1)


def accuracy_7(preds, labels) -> float:
    """Accuracy over the seven classes round(clip(x, -3, 3)) in {-3, ..., 3}."""
    preds, labels = _arrays(preds, labels)
    to_class = lambda x: np.round(np.clip(x, -3, 3))  # noqa: E731
    return float((to_class(preds) == to_class(labels)).mean())


def sentiment_metrics(preds, labels) -> dict:
    acc2, f1 = binary_accuracy_f1(preds, labels)
    return {"mae": mae(preds, labels), "corr": pearson(preds, labels), "acc2": acc2, "f1": f1,
            "acc7": accuracy_7(preds, labels)}
