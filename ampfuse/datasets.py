"""CMU-MOSEI-shaped sentiment data: a synthetic set with a planted non-text signal, and a loader
for the widely used aligned-feature pickle layout.

A split is a dict: ``text`` (list of sentences), ``audio`` (list of (words, 74) arrays),
``visual`` (list of (words, 35) arrays), ``labels`` (sentiment in [-3, 3]); row i of a feature
array belongs to word i of the sentence. ``to_tensors`` tokenizes and spreads each word's
features over its sub-word tokens, giving token-aligned (N, T, d) tensors.
"""

import pickle

import numpy as np
import torch

AUDIO_SIZE, VISUAL_SIZE = 74, 35
_POSITIVE = ["good", "great", "excellent", "wonderful", "amazing", "nice", "enjoyable", "brilliant", "lovely"]
_NEGATIVE = ["bad", "terrible", "awful", "boring", "horrible", "poor", "disappointing", "dull", "weak"]
_FILLER = ["the", "movie", "was", "really", "quite", "story", "acting", "and", "it", "film", "plot", "i", "think",
           "honestly", "overall", "scenes", "music", "characters", "ending", "very", "so", "just", "this"]


def synthetic_split(n: int, seed: int, tone_scale: float = 1.5):
    """Sentences whose label is text polarity + a "tone" that only audio and visual features carry.

    Text polarity: 0.8 * (#positive - #negative words), clipped to [-2, 2]. Tone t ~ U(-1, 1) is
    written into every word's audio features along a fixed direction (and, weaker, the visual
    ones), under noise. label = clip(polarity + tone_scale * t, -3, 3): a text-only model cannot
    recover the tone part, so multimodal models must beat it on MAE."""
    rng = np.random.default_rng(seed)
    directions = np.random.default_rng(1234)  # the same planted directions in every split
    audio_dir = directions.standard_normal(AUDIO_SIZE)
    visual_dir = directions.standard_normal(VISUAL_SIZE)
    audio_dir /= np.linalg.norm(audio_dir) / 3.0
    visual_dir /= np.linalg.norm(visual_dir) / 2.0
    split = {"text": [], "audio": [], "visual": [], "labels": []}
    for _ in range(n):
        n_pos, n_neg = rng.integers(0, 3), rng.integers(0, 3)
        words = list(rng.choice(_FILLER, size=rng.integers(5, 10)))
        for word in [*rng.choice(_POSITIVE, n_pos), *rng.choice(_NEGATIVE, n_neg)]:
            words.insert(int(rng.integers(0, len(words) + 1)), str(word))
        polarity = float(np.clip(0.8 * (n_pos - n_neg), -2, 2))
        tone = rng.uniform(-1, 1)
        L = len(words)
        split["text"].append(" ".join(words))
        split["audio"].append((rng.standard_normal((L, AUDIO_SIZE)) + tone * audio_dir).astype(np.float32))
        split["visual"].append((rng.standard_normal((L, VISUAL_SIZE)) + tone * visual_dir).astype(np.float32))
        split["labels"].append(float(np.clip(polarity + tone_scale * tone, -3, 3)))
    split["labels"] = np.asarray(split["labels"], dtype=np.float32)
    return split


def synthetic_dataset(train: int = 1500, valid: int = 300, test: int = 300, seed: int = 0):
    return {"train": synthetic_split(train, seed), "valid": synthetic_split(valid, seed + 1),
            "test": synthetic_split(test, seed + 2)}


_SPLITS = ("train", "valid", "test")
_KEYS = {"text": ("raw_text",), "audio": ("audio",), "visual": ("vision", "visual"),
         "labels": ("regression_labels", "labels")}


def load_pickle(path: str):
    """Reads aligned CMU-MOSI/MOSEI features in the widely used pickle layout:
    ``{"train"|"valid"|"test": {"raw_text": [N], "audio": (N, L, 74), "vision": (N, L, 35),
    "regression_labels": (N,)}}``, feature row i aligned to word i (rows past the sentence's
    words are padding). Raises ValueError naming what is missing or misshaped."""
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        raise ValueError(f"{path} is not a readable pickle: {exc}") from exc
    if not isinstance(data, dict) or any(s not in data for s in _SPLITS):
        raise ValueError(f"{path}: expected a dict with splits {_SPLITS}, got "
                         f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    out = {}
    for split in _SPLITS:
        raw = data[split]
        fields = {}
        for field, keys in _KEYS.items():
            key = next((k for k in keys if k in raw), None)
            if key is None:
                raise ValueError(f"{path}: split {split!r} has no {' or '.join(map(repr, keys))}")
            fields[field] = raw[key]
        n = len(fields["text"])
        labels = np.asarray(fields["labels"], dtype=np.float32).reshape(-1)
        if labels.shape[0] != n:
            raise ValueError(f"{path}: split {split!r} has {n} texts but {labels.shape[0]} labels")
        for name, size in (("audio", AUDIO_SIZE), ("visual", VISUAL_SIZE)):
            feats = np.asarray(fields[name], dtype=np.float32)
            if feats.ndim != 3 or feats.shape[0] != n or feats.shape[2] != size:
                raise ValueError(f"{path}: split {split!r} {name} must have shape ({n}, L, {size}), "
                                 f"got {feats.shape}")
            fields[name] = [np.nan_to_num(f) for f in feats]
        fields["text"] = [str(t) for t in fields["text"]]
        fields["labels"] = np.clip(labels, -3, 3)
        out[split] = fields
    return out


def to_tensors(split, tokenizer, max_length: int = 64):
    """Tokenizes a split; spreads word features over sub-word tokens (special and padding tokens
    get zeros). Returns input_ids, attention_mask, audio (N, T, 74), visual (N, T, 35), labels."""
    enc = tokenizer([t.split() for t in split["text"]], is_split_into_words=True, padding=True,
                    truncation=True, max_length=max_length, return_tensors="pt")
    N, T = enc["input_ids"].shape
    features = {name: np.zeros((N, T, size), dtype=np.float32)
                for name, size in (("audio", AUDIO_SIZE), ("visual", VISUAL_SIZE))}
    for i in range(N):
        for t, word in enumerate(enc.word_ids(i)):
            if word is None:
                continue
            for name in features:
                rows = split[name][i]
                if word < rows.shape[0]:
                    features[name][i, t] = rows[word]
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "audio": torch.from_numpy(features["audio"]), "visual": torch.from_numpy(features["visual"]),
            "labels": torch.as_tensor(split["labels"], dtype=torch.float32)}
