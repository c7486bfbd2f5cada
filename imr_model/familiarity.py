"""Does an input look like the IMR items a model was trained on? Three cheap checks, one warning each.

Every prediction carries ``warnings`` (`inference.ItemPrediction.warnings`, the REST item, ``imr score``
rows, the pyfunc ``warnings`` column): empty when the input looks like an IMR item, else one string
per check that fired, starting with the check's name and a colon:

* ``structure:`` (needs no profile) the item was not parsed from a letter (a bare text that
  `letters.parse_text` rejected, an item dict, a table or pyfunc row) and its text (request,
  rationale, case summary) has no structural cue of an IMR item (`has_imr_structure`): a guideline
  citation (MTUS, ACOEM, ODG, Official Disability Guidelines, "guideline", evidence-based) or
  medical-necessity wording ("medically necessary", medical necessity, utilization review, IMR),
  or else review wording ("not recommended", "is supported", certified, UR, upheld/overturned) or a
  treatment-request shape ("request for", "#60", "x 6", "12 sessions") *together with* a clinical
  word (patient, treatment, therapy, surgery, medication, MRI, injection, pain, 50mg ...). Items
  parsed from a letter have the letter's structure by construction and skip this check.
* ``distance:`` the item's embedding lies farther outside the training items' principal subspace
  than held-out training items do. Embedding: the mean-pooled encoder states of each of the item's
  main-view windows (exactly the vectors the guideline head reads), averaged over the item's windows
  and L2-normalised. Distance: the norm of what is left of (embedding − training mean) after
  projecting out the top `components` principal directions of the training embeddings (at most
  `MAX_COMPONENTS`, and n/10). Threshold: the `QUANTILE` (99.5th percentile) of the training items'
  *out-of-fold* distances (each fold's distances to a mean and subspace fit on the other `FOLDS` − 1
  folds, grouped by letter; in-sample distances are optimistic) times `DISTANCE_MARGIN`.
* ``length:`` the item's main-view text has fewer words (whitespace-separated) than the shortest
  training item.

The ``distance`` and ``length`` checks read the *reference profile* (`ReferenceProfile`) that
training stores beside the weights as ``reference_profile.json``: the mean and principal directions
of the training embeddings (aggregate second-moment statistics), the distance threshold and
quantiles, and word-count quantiles: statistics only, never a text, a token or a per-item vector.
Version 2 adds ``drift``, the batch drift reference (`imr_model.drift`: per-letter quantile sketches,
coordinate moments); a version-1 profile still loads, with ``drift`` None.
Models saved before profiles existed skip those two checks; their predictions on inputs that were
not parsed from a letter (where the missing checks matter) carry one ``profile:`` warning saying
so, and `inference.Predictor.metadata` reports ``familiarity.profile = false``. Letters scored with
such a model get no warning for it: parsed items have the letter's structure, and a warning on every
row of every scored letter would be noise.

On the shared letters (the default recipe, 179 training items, 16 directions) the 79 held-out items'
distances reached 1.05× the out-of-fold 99.5th percentile (the DMHC Findings 1.10×, synthetic demo items
1.08×) and 16 junk texts started at 1.29× it; `DISTANCE_MARGIN` = 1.25 was chosen between them after
seeing those numbers (docs/model.md, "Input warnings").

Cost: the embeddings come from the forward pass the prediction already does (forward pre-hooks on
the network and its guideline head capture the guideline head's input; `capture_window_vectors`),
so the torch backend pays only the bookkeeping. The ONNX session returns logits only; with
``backend="onnx"`` the torch encoder is run once more for the embeddings (`window_vectors`), by
default only for items not parsed from a letter (`inference.Predictor.onnx_distance`).
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from imr_model import modeling

PROFILE_FILE = "reference_profile.json"
PROFILE_FORMAT = "imr-reference-profile"
PROFILE_VERSION = 2  # 2 adds the drift reference (`drift`, read by imr_model.drift); version 1 still loads
READABLE_VERSIONS = (1, 2)
QUANTILE = 0.995  # of the training items' out-of-fold distances ...
DISTANCE_MARGIN = 1.25  # ... times this is the distance threshold
MAX_COMPONENTS = 16  # principal directions projected out (and at most n_items / 10)
FOLDS = 5
REPORTED_QUANTILES = (0.0, 0.005, 0.01, 0.05, 0.5, 0.95, 0.99, 0.995, 1.0)
EMBEDDING = "mean-pooled encoder states per main-view window, averaged over the item's windows, L2-normalised"
METRIC = "norm of (embedding - mean) outside the top principal directions"

STRUCTURE, DISTANCE, LENGTH, PROFILE = "structure", "distance", "length", "profile"
CHECKS = (STRUCTURE, DISTANCE, LENGTH)

# --------------------------------------------------------------------------- (a) structure cues

_CUES = {
    "citation": r"\bmtus\b|\bacoem\b|\bodg\b|official\s+disability|guidelines?\b|medical\s+treatment\s+utilization"
                r"|evidence[-\s]based",
    "necessity": r"medically\s+(?:necessary|indicated|appropriate|reasonable)|medical\s+necessity|utilization\s+review"
                 r"|independent\s+medical\s+review|\bIMR\b",
    "review": r"\bnot\s+(?:medically\s+)?(?:necessary|recommended|supported|indicated|warranted|certified|approved)\b"
              r"|\b(?:is|are|was|were|be)\s+(?:recommended|supported|indicated|warranted)\b"
              r"|\b(?:non-?)?certif(?:y|ied|ication)\b|\bUR\b|\bupheld\b|\boverturned\b",
    "request": r"\brequest(?:s|ed)?\s+(?:for|of)\b|\b(?:prescription|refill)\s+(?:for|of)\b|#\s?\d+\b|\bx\s?\d+\b"
               r"|\b\d+\s+(?:sessions?|visits?|treatments?|tablets?|capsules?|units?)\b",
    "clinical": r"\bpatient|injured\s+worker|claimant|\bdiagnos|\btreat|therap|surg|medication|prescri|\bmedical\b"
                r"|\d\s*(?:mg|mcg|ml)\b|\bmg\b|\bMRI\b|\bCT\b|x-?rays?|\bEMG|injection|\bpain\b|physician|provider"
                r"|clinical|symptom|examination|chiropract|acupunct|orthop|lumbar|cervical|\bdrug|opioid|rehabilitat"
                r"|\bbrace\b|spasm",
}
_CUE_RE = {name: re.compile(p, re.I) for name, p in _CUES.items()}


def structure_cues(text: str) -> list[str]:
    """Names of the cue families (`citation`, `necessity`, `review`, `request`, `clinical`) found in `text`."""
    return [name for name, p in _CUE_RE.items() if p.search(text or "")]


def has_imr_structure(text: str) -> bool:
    """A citation or necessity cue, or a review or request cue together with a clinical one."""
    found = set(structure_cues(text))
    return bool(found & {"citation", "necessity"}) or (bool(found & {"review", "request"}) and "clinical" in found)


def record_text(record: Mapping) -> str:
    """All the text of an item record that the structure check reads (request, rationale, case summary, text)."""
    return "\n".join(str(record.get(k) or "") for k in ("request", "rationale", "case_summary", "text"))


#: Fields only `Letter.item_records` gives a record: their presence marks an item parsed from a letter.
LETTER_RECORD_FIELDS = ("decision", "maximus_guideline", "case_number")


def is_letter_record(record: Mapping) -> bool:
    """True for an item record parsed from a letter (it has the `Letter.item_records` fields a letter states)."""
    return all(k in record for k in LETTER_RECORD_FIELDS)


def word_count(text: str) -> int:
    """Whitespace-separated words of a model input."""
    return len(text.split())


# --------------------------------------------------------------------------- (b, c) the reference profile


@dataclass(frozen=True)
class ReferenceProfile:
    """Statistics of a model's training items: what `check` compares a new item with. No texts, no tokens."""

    mean: np.ndarray  # (H,) mean of the training items' unit embeddings
    components: np.ndarray  # (k, H) orthonormal principal directions projected out
    distance_threshold: float
    min_words: int
    n_items: int
    distance_quantiles: dict[str, float] = field(default_factory=dict)  # of the out-of-fold distances
    word_quantiles: dict[str, float] = field(default_factory=dict)
    quantile: float = QUANTILE
    margin: float = DISTANCE_MARGIN
    drift: dict | None = None  # the batch drift reference (`imr_model.drift.fit_reference`); None in version-1 files

    @property
    def hidden_size(self) -> int:
        return int(self.mean.shape[0])

    def distances(self, item_vectors: np.ndarray) -> np.ndarray:
        """Distances (N,) of item embeddings (N, H) from the training subspace (`residual_norms`)."""
        return residual_norms(item_vectors, self.mean, self.components)

    def coordinates(self, item_vectors: np.ndarray) -> np.ndarray:
        """Coordinates (N, k) of item embeddings (N, H) on the principal directions, about the training mean."""
        return (_unit(np.asarray(item_vectors, dtype=np.float64)) - self.mean) @ self.components.T

    def to_dict(self) -> dict:
        out = {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "n_items": self.n_items,
            "embedding": EMBEDDING,
            "distance": {
                "metric": METRIC,
                "quantile": self.quantile,
                "margin": self.margin,
                "threshold": self.distance_threshold,
                "out_of_fold_quantiles": self.distance_quantiles,
            },
            "length": {"unit": "words", "min": self.min_words, "training_quantiles": self.word_quantiles},
            "mean": _floats(self.mean),
            "components": [_floats(row) for row in self.components],
        }
        if self.drift is not None:
            out["drift"] = self.drift
        return out

    @classmethod
    def from_dict(cls, record: Mapping) -> "ReferenceProfile":
        if (not isinstance(record, Mapping) or record.get("format") != PROFILE_FORMAT
                or record.get("version") not in READABLE_VERSIONS):  # fmt: skip
            got = (record.get("format"), record.get("version")) if isinstance(record, Mapping) else type(record).__name__
            raise ValueError(f"not a version-{'/'.join(map(str, READABLE_VERSIONS))} {PROFILE_FORMAT} record (got {got!r})")
        d, n = record["distance"], record["length"]
        mean = np.asarray(record["mean"], dtype=np.float64)
        components = np.asarray(record["components"], dtype=np.float64).reshape(-1, mean.shape[0])
        if not (np.isfinite(mean).all() and np.isfinite(components).all() and np.isfinite(float(d["threshold"]))):
            raise ValueError(f"{PROFILE_FORMAT} record holds non-finite numbers")
        return cls(mean=mean, components=components, distance_threshold=float(d["threshold"]), min_words=int(n["min"]),
                   n_items=int(record["n_items"]),
                   distance_quantiles={k: float(v) for k, v in d.get("out_of_fold_quantiles", {}).items()},
                   word_quantiles={k: float(v) for k, v in n.get("training_quantiles", {}).items()},
                   quantile=float(d.get("quantile", QUANTILE)), margin=float(d.get("margin", DISTANCE_MARGIN)),
                   drift=dict(record["drift"]) if isinstance(record.get("drift"), Mapping) else None)  # fmt: skip


def residual_norms(item_vectors: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """||z - P^T P z|| for z = unit(vector) - mean: how far each embedding lies outside the subspace of P's rows."""
    z = _unit(np.asarray(item_vectors, dtype=np.float64)) - mean
    return np.linalg.norm(z - (z @ components.T) @ components, axis=1)


def principal_subspace(unit_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (H,), top-k principal directions (k, H)) of unit embeddings."""
    mean = unit_vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(unit_vectors - mean, full_matrices=False)
    return mean, vt[: min(k, len(vt))]


def n_components(n_items: int) -> int:
    """Principal directions for a profile of `n_items`: n/10, between 1 and `MAX_COMPONENTS`."""
    return max(1, min(MAX_COMPONENTS, n_items // 10))


def fit_profile(item_vectors: np.ndarray, word_counts: Sequence[int], groups: Sequence | None = None, *,
                quantile: float = QUANTILE, margin: float = DISTANCE_MARGIN, folds: int = FOLDS) -> ReferenceProfile:  # fmt: skip
    """The profile of training items from their embeddings (N, H), main-view word counts and letters (`groups`,
    items of one letter share a fold; None = every item its own group)."""
    X = np.asarray(item_vectors, dtype=np.float64)
    words = np.asarray(list(word_counts), dtype=np.float64)
    if X.ndim != 2 or len(X) < 2 or len(words) != len(X):
        raise ValueError(f"need (N, H) item vectors with N >= 2 and N word counts; got {X.shape} and {len(words)}")
    U = _unit(X)
    k = n_components(len(U))
    oof = out_of_fold_distances(U, groups, k, folds)
    mean, components = principal_subspace(U, k)
    return ReferenceProfile(
        mean=mean,
        components=components,
        distance_threshold=float(np.quantile(oof, quantile) * margin),
        min_words=int(words.min()),
        n_items=len(X),
        distance_quantiles=_quantiles(oof),
        word_quantiles=_quantiles(words),
        quantile=quantile,
        margin=margin,
    )


def out_of_fold_distances(item_vectors: np.ndarray, groups: Sequence | None, k: int, folds: int = FOLDS) -> np.ndarray:
    """Each item's distance from the mean and top-`k` subspace of the other folds' items (`fold_of`); in-sample
    distances when there is only one group."""
    U = _unit(np.asarray(item_vectors, dtype=np.float64))
    fold = fold_of(list(range(len(U))) if groups is None else list(groups), folds)
    oof = np.zeros(len(U))
    for f in np.unique(fold):
        test = fold == f
        if test.all():  # one group only: no held-out fold; in-sample distances
            return residual_norms(U, *principal_subspace(U, k))
        oof[test] = residual_norms(U[test], *principal_subspace(U[~test], k))
    return oof


def fold_of(groups: list, folds: int = FOLDS) -> np.ndarray:
    """Fold of each item: the distinct groups in a fixed shuffled order, dealt round-robin into `folds` folds."""
    distinct = list(dict.fromkeys(str(g) for g in groups))
    order = np.random.default_rng(0).permutation(len(distinct))
    fold_of_group = {distinct[j]: i % folds for i, j in enumerate(order)}
    return np.array([fold_of_group[str(g)] for g in groups])


def fit_classifier_profile(clf, texts: Sequence[str], windows=None, window_means=None, batch_size: int = 32,
                           groups: Sequence | None = None) -> ReferenceProfile:  # fmt: skip
    """The profile of a fitted classifier's training items (`texts`, in its model input); reuses the windows and
    their mean-pooled vectors when training already computed them (`IMRClassifier.window_vectors`)."""
    windows = clf.make_windows(list(texts)) if windows is None else windows
    means = window_vectors(clf, windows, batch_size) if window_means is None else np.asarray(window_means, dtype=np.float32)
    return fit_profile(item_vectors(windows, means, len(texts)), [word_count(t) for t in texts], groups)


def save_profile(profile: ReferenceProfile, model_dir: str | Path) -> Path:
    """Write `PROFILE_FILE` into a model directory; in a saved model directory (one with config.json) its SHA-256
    is recorded in config.json (`modeling.record_digest`), so loading the model checks it like the weights."""
    path = Path(model_dir) / PROFILE_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(profile.to_dict()), encoding="utf-8")
    os.replace(tmp, path)
    if (Path(model_dir) / modeling.CONFIG_FILE).is_file():
        modeling.record_digest(model_dir, PROFILE_FILE)
    return path


def load_profile(model_dir: str | Path) -> ReferenceProfile | None:
    """The model directory's profile, or None when it has none (a model saved before profiles existed)."""
    path = Path(model_dir) / PROFILE_FILE
    if not path.is_file():
        return None
    return ReferenceProfile.from_dict(json.loads(path.read_text(encoding="utf-8")))


# --------------------------------------------------------------------------- embeddings


def item_vectors(windows, window_means: np.ndarray, n_items: int) -> np.ndarray:
    """Item embeddings (N, H): the mean of each item's window vectors, L2-normalised."""
    means = np.asarray(window_means, dtype=np.float64)
    ids = windows.item_ids.numpy()
    out = np.zeros((n_items, means.shape[1]), dtype=np.float64)
    np.add.at(out, ids, means)
    counts = np.bincount(ids, minlength=n_items).astype(np.float64)
    return _unit(out / np.maximum(counts, 1.0)[:, None])


def window_vectors(clf, windows, batch_size: int = 32) -> np.ndarray:
    """Mean-pooled encoder states (W, H) of all windows with the torch encoder (an extra encoder pass)."""
    return clf.window_vectors(windows, batch_size)[1].numpy().astype(np.float32)


class _Capture:
    """What the hooks saw: window token ids → the guideline head's input (the window's mean-pooled states)."""

    def __init__(self):
        self.by_key: dict[bytes, np.ndarray] = {}
        self._pending: list[np.ndarray] = []

    def window_vectors(self, windows) -> np.ndarray:
        """(W, H) vectors of `windows`, looked up by their token ids; raises if a window was not run."""
        lengths = windows.attention_mask.sum(dim=1).tolist()
        ids = windows.input_ids.numpy()
        try:
            return np.stack([self.by_key[ids[i, :n].tobytes()] for i, n in enumerate(lengths)])
        except KeyError:
            raise RuntimeError("the forward pass did not run every window through the torch network "
                               "(a non-torch backend?); use familiarity.window_vectors") from None  # fmt: skip


@contextmanager
def capture_window_vectors(clf) -> Iterator[_Capture]:
    """Capture, during the block, the mean-pooled vector of every window the torch network runs.

    A forward pre-hook on the network records each batch's token ids; one on the guideline head records
    its input, the batch's mean-pooled states (dropout is the identity in eval mode). Windows are matched
    to vectors by their token ids, so the batching and deduplication of `forward_windows` do not matter.
    """
    cap = _Capture()

    def on_net(_module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        mask = args[1] if len(args) > 1 else kwargs["attention_mask"]
        ids, lengths = ids.detach().cpu().numpy(), mask.detach().sum(dim=1).cpu().tolist()
        cap._pending = [ids[i, :n].tobytes() for i, n in enumerate(lengths)]

    def on_head(_module, args):
        vectors = args[0].detach().float().cpu().numpy()
        if len(cap._pending) == len(vectors):
            cap.by_key.update(zip(cap._pending, vectors))
        cap._pending = []

    handles = [clf.net.register_forward_pre_hook(on_net, with_kwargs=True),
               clf.net.guideline_head.register_forward_pre_hook(on_head)]  # fmt: skip
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- the checks


def check(records: Sequence[Mapping], texts: Sequence[str], profile: ReferenceProfile | None,
          vectors: np.ndarray | None = None) -> list[tuple[str, ...]]:  # fmt: skip
    """The warnings of each item: `records` (item records), `texts` (their model inputs), `vectors` (their
    embeddings, `item_vectors`; None skips the distance check, a NaN row skips it for that item)."""
    out = []
    dist = profile.distances(vectors) if profile is not None and vectors is not None else None  # NaN: not computed
    for i, (record, text) in enumerate(zip(records, texts)):
        warnings = []
        letter = is_letter_record(record)
        if not letter and not has_imr_structure(record_text(record)):
            warnings.append(f"{STRUCTURE}: not a parsed IMR letter, and the text has no IMR item cues (no guideline "
                            "citation or medical-necessity wording; no review wording or treatment request with a "
                            "clinical word)")  # fmt: skip
        if profile is not None:
            if dist is not None and dist[i] > profile.distance_threshold:
                warnings.append(f"{DISTANCE}: far from the training items in the encoder's space (distance "
                                f"{dist[i]:.3f} from their principal subspace > threshold {profile.distance_threshold:.3f})")  # fmt: skip
            words = word_count(text)
            if words < profile.min_words:
                warnings.append(f"{LENGTH}: {words} words, shorter than any training item (min {profile.min_words})")
        elif not letter:
            warnings.append(f"{PROFILE}: this model has no reference profile (saved before {PROFILE_FILE} existed), "
                            "so the distance and length checks were not run")  # fmt: skip
        out.append(tuple(warnings))
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float32)]


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {f"p{q * 100:g}": float(np.quantile(values, q)) for q in REPORTED_QUANTILES}


# --------------------------------------------------------------------------- a fitted classifier's profile

PROFILE_ATTRIBUTE = "reference_profile"  # where training leaves the profile on the IMRClassifier until it is saved


def attach_profile(clf, profile: ReferenceProfile) -> None:
    """Keep `profile` on a fitted classifier (training does this) for `save_classifier_profile`."""
    setattr(clf, PROFILE_ATTRIBUTE, profile)


def save_classifier_profile(clf, model_dir: str | Path) -> Path | None:
    """Write the profile training attached to `clf` into `model_dir` (call right after `clf.save_pretrained`);
    None when `clf` has none."""
    profile = getattr(clf, PROFILE_ATTRIBUTE, None)
    return None if profile is None else save_profile(profile, model_dir)
