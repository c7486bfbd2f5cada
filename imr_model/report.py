"""Self-contained HTML explanation of one letter: per item the predicted outcome, the calibrated
probability, guideline labels, the model's input text with each word shaded by its attribution, and
a top-k table.

The page has no scripts, fonts or images from elsewhere (inline CSS only), so it can be mailed or
archived and opens offline. It is rendered from `ItemPrediction.to_dict(include_text=True)` dicts so
it does not depend on a loaded model. Red shades push towards *Overturned* (or towards the named
guideline label), blue shades push away from it; opacity is |score| relative to the item's largest.
"""

from __future__ import annotations

import datetime as _dt
import html
from pathlib import Path
from typing import Iterable

from imr_model.inference import as_records, load_model

POSITIVE_RGB = (200, 30, 30)
NEGATIVE_RGB = (30, 90, 210)
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:20px}
header p{margin:2px 0;font-size:13px;color:#c9cfdb}
main{max-width:1100px;margin:0 auto;padding:20px}
section.item{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);margin:0 0 22px;padding:18px 22px}
section.item h2{font-size:17px;margin:0 0 10px}
.badge{display:inline-block;padding:3px 10px;border-radius:12px;font-weight:600;font-size:13px;color:#fff}
.badge.Overturned{background:#b42318}.badge.Upheld{background:#1f5fbf}
.prob{display:inline-block;width:220px;height:10px;background:#e3e6ec;border-radius:5px;vertical-align:middle;margin:0 8px}
.prob span{display:block;height:10px;border-radius:5px;background:#b42318}
.meta{font-size:13px;color:#4a5264;margin:8px 0}
.chip{display:inline-block;border:1px solid #c5cad6;border-radius:10px;padding:1px 8px;margin:2px 4px 2px 0;font-size:12px}
.chip.on{background:#fff4d6;border-color:#d9a400}
.text{line-height:1.9;font-size:14px;border-top:1px solid #eceef2;margin-top:12px;padding-top:10px}
.text .w{border-radius:3px;padding:1px 0}
table{border-collapse:collapse;font-size:13px;margin-top:12px}
th,td{border-bottom:1px solid #eceef2;padding:4px 10px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.legend span{display:inline-block;padding:1px 8px;margin-right:6px;border-radius:3px;font-size:12px}
.note{font-size:12px;color:#6b7385}
.warning{margin:.4em 0;padding:.3em .6em;border-left:4px solid #c77700;background:#fff6e5;font-size:13px}
"""


def render_report(
    predictions: Iterable[dict],
    *,
    letter_id: str,
    source: str = "",
    model_info: dict | None = None,
    top_k: int = 10,
) -> str:
    """Return the HTML page for one letter's item predictions (dicts from `ItemPrediction.to_dict`)."""
    items = list(predictions)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    model_info = model_info or {}
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    model_line = ", ".join(f"{k}: {v}" for k, v in model_info.items() if v not in (None, ""))
    head = (
        f"<header><h1>IMR prediction report: {_e(letter_id)}</h1>"
        f"<p>Source: {_e(Path(source).name if source else '—')} · {len(items)} item(s) · generated {_e(when)}</p>"
        f"<p>Model: {_e(model_line or 'unknown')}</p></header>"
    )
    legend = (
        '<p class="legend">'
        f'<span style="background:{_rgba(POSITIVE_RGB, 0.55)}">pushes towards the target</span>'
        f'<span style="background:{_rgba(NEGATIVE_RGB, 0.55)}">pushes away from it</span>'
        '<span class="note">Layer integrated gradients on the word embeddings; scores are in logit units.'
        + (" Only the item's last window is attributed (last pooling); words outside it stay unshaded."
           if model_info.get("pooling") == "last" else "")  # fmt: skip
        + " Each item says which of its windows were attributed; words outside them score 0.</span></p>"
    )
    body = "".join(_item_section(it, top_k) for it in items) or "<p>No items.</p>"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>IMR report {_e(letter_id)}</title><style>{_CSS}</style></head>"
        f"<body>{head}<main>{legend}{body}</main></body></html>"
    )


def write_report(path: str | Path, predictions: Iterable[dict], **kwargs) -> Path:
    """Render with `render_report` and write UTF-8 HTML to `path` (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(predictions, **kwargs), encoding="utf-8")
    return path


def _item_section(item: dict, top_k: int) -> str:
    p = float(item["p_overturned"])
    outcome = item["outcome"]
    stated = item.get("letter_decision")
    stated_html = f" · letter states: <b>{_e(stated)}</b>" if stated else ""
    labels = set(item.get("guideline_labels") or [])
    ranked = sorted((item.get("guidelines") or {}).items(), key=lambda kv: -kv[1])
    chips = "".join(
        f'<span class="chip{" on" if name in labels else ""}">{_e(name)} {prob:.2f}</span>'
        for name, prob in ranked[: max(len(labels), 6)]
    )
    attr = item.get("attributions")
    warnings = item.get("warnings") or []
    warning_html = "".join(f'<p class="warning">&#9888; {_e(w)}</p>' for w in warnings)
    return (
        f'<section class="item" id="item-{int(item["item_index"])}">'
        f'<h2>Item {int(item["item_index"])}: {_e(item.get("request") or "(no request title)")}</h2>'
        f'<div><span class="badge {_e(outcome)}">{_e(outcome)}</span>'
        f'<span class="prob" title="P(Overturned)"><span style="width:{p * 100:.1f}%"></span></span>'
        f"P(Overturned) = <b>{p:.3f}</b>{stated_html}</div>"
        + warning_html
        + f'<div class="meta">Predicted guideline labels: {_e(", ".join(sorted(labels)) or "none")}</div>'
        f'<div class="meta">{chips}</div>'
        + (_attribution_html(attr, top_k) if attr else '<p class="note">No attributions were computed.</p>')
        + "</section>"
    )


def _attribution_html(attr: dict, top_k: int) -> str:
    words = attr.get("words") or []
    text = attr.get("text")
    peak = max((abs(w["score"]) for w in words), default=0.0) or 1.0
    shaded = _shade(text, words, peak) if text is not None else " ".join(_word_span(w, peak) for w in words)
    top = sorted(words, key=lambda w: -abs(w["score"]))[:top_k]
    rows = "".join(
        f'<tr><td class="num">{i}</td><td>{_e(w["word"])}</td><td class="num">{w["score"]:+.4f}</td>'
        f'<td>{"towards" if w["score"] > 0 else "away"}</td><td class="num">{w["start"]}–{w["end"]}</td></tr>'
        for i, w in enumerate(top, 1)
    )
    info = (
        f'target: <b>{_e(attr.get("target", "outcome"))}</b> · text view: {_e(attr.get("text_view", ""))} · '
        f'n_steps: {attr.get("n_steps", "")} · convergence delta: {float(attr.get("delta", 0.0)):+.2e}'
    )
    return (
        f'<p class="note">{info}</p>{_windows_note(attr.get("windows") or [])}<div class="text">{shaded}</div>'
        f"<table><thead><tr><th>#</th><th>word</th><th>score</th><th>direction</th><th>chars</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def _windows_note(windows: list[dict]) -> str:
    """Which windows were attributed: their character spans, and what the windows left out carry."""
    if not windows:
        return ""
    done = [w for w in windows if w["attributed"]]
    spans = ", ".join(f'{w["start"]}–{w["end"]}' for w in done) or "none"
    skipped = [w for w in windows if not w["attributed"] and w["weight"] > 0]
    unweighted = sum(1 for w in windows if not w["attributed"] and w["weight"] == 0)
    parts = [f"attributed windows: {len(done)} of {len(windows)} (chars {spans})"]
    if unweighted:
        parts.append(f"{unweighted} not pooled into this target (weight 0: they contribute nothing)")
    if skipped:
        carried = sum(float(w["contribution"]) for w in skipped)
        parts.append(f"{len(skipped)} pooled but not attributed (coverage below 1): they carry {carried:+.4f} "
                     "logits their words do not show")  # fmt: skip
    return f'<p class="note windows">{_e("; ".join(parts))}</p>'


def _shade(text: str, words: list[dict], peak: float) -> str:
    """The text with each attributed word wrapped in a shaded span; the text between words kept as is."""
    out, pos = [], 0
    for w in sorted(words, key=lambda w: w["start"]):
        if w["start"] < pos:  # overlapping spans cannot be nested; keep the first
            continue
        out.append(_e(text[pos : w["start"]]))
        out.append(_word_span(w, peak, text[w["start"] : w["end"]]))
        pos = w["end"]
    out.append(_e(text[pos:]))
    return "".join(out)


def _word_span(w: dict, peak: float, shown: str | None = None) -> str:
    score = float(w["score"])
    alpha = min(1.0, abs(score) / peak) * 0.85
    rgb = POSITIVE_RGB if score > 0 else NEGATIVE_RGB
    return (
        f'<span class="w" data-score="{score:.6g}" title="{score:+.4f}" '
        f'style="background:{_rgba(rgb, alpha)}">{_e(shown if shown is not None else w["word"])}</span>'
    )


def _rgba(rgb: tuple[int, int, int], alpha: float) -> str:
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.3f})"


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def explain(
    letter,
    output: str | Path,
    *,
    model=None,
    target: str = "outcome",
    n_steps: int = 32,
    top_k: int = 10,
) -> Path:
    """Predict one letter (path or text) with attributions and write its report to `output` (`imr explain`)."""
    predictor = load_model(model)
    records = as_records(Path(letter) if isinstance(letter, str) and Path(letter).is_file() else letter)
    preds = predictor.predict_records(records, attributions=True, target=target, n_steps=n_steps)
    meta = predictor.metadata()
    info = {"uri": meta["uri"], "version": meta.get("version"), "text view": meta["text_view"], "pooling": meta["pooling"]}
    first = records[0]
    return write_report(
        output,
        [p.to_dict(include_text=True) for p in preds],
        letter_id=str(first.get("letter_id") or "text"),
        source=str(first.get("source") or ""),
        model_info=info,
        top_k=top_k,
    )
