"""report.html for `evaluate` and `predict`: one self-contained page to look at a run.

Plots are inline SVG drawn with matplotlib (its object API, no global pyplot state); overlays
are relative links to the PNGs the run wrote next to the page, loaded lazily, so the page stays
small however many images there are. No server, no network: it opens from disk. The only
script sorts and pages the predict table.
"""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._version import __version__

#: Overlays shown per category in an evaluate report (misses and false alarms first); the rest
#: are in the overlays folder.
GALLERY_MAX = 48
#: Rows per page of the predict table.
PAGE_ROWS = 100
#: Points kept of a curve (enough for a plot a few hundred pixels wide).
CURVE_POINTS = 2000
#: Colours of the plots (the browser test looks for them in a screenshot).
CURVE_COLOUR = "#1f77b4"
GOOD_COLOUR = "#2ca02c"
DEFECT_COLOUR = "#d62728"


@dataclass
class CategoryResult:
    """What the evaluate report shows of one category at one coreset ratio."""

    method: str
    category: str
    metrics: dict[str, float]            # percent, as results.csv
    timings: dict[str, float]            # seconds per stage, as timings.csv
    names: list[str]                     # test images, e.g. "crack/003"
    scores: list[float]
    labels: list[bool]                   # True: defective
    threshold: float | None
    threshold_source: str
    overlays: list[str | None] = field(default_factory=list)  # paths relative to the report
    pro_curve: tuple[np.ndarray, np.ndarray] | None = None       # (FPR, PRO), thinned


def thin(x: np.ndarray, y: np.ndarray, points: int = CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most `points` points of a curve, first and last kept."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) <= points:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, points).round().astype(int))
    return x[keep], y[keep]


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of the image scores at every distinct threshold, from (0, 0) to (1, 1)."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last = np.r_[scores[1:] != scores[:-1], True]  # the last of each tie group
    tp, fp = np.cumsum(labels)[last], np.cumsum(~labels)[last]
    tpr = tp / max(int(labels.sum()), 1)
    fpr = fp / max(int((~labels).sum()), 1)
    return np.r_[0.0, fpr], np.r_[0.0, tpr]


# ------------------------------------------------------------------ plots (inline SVG)
def _svg(figure) -> str:
    from matplotlib.backends.backend_svg import FigureCanvasSVG

    buffer = io.StringIO()
    FigureCanvasSVG(figure).print_svg(buffer)
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML prologue: the SVG sits inside HTML


def _figure():
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.6, 2.8), dpi=100, layout="constrained")
    return figure, figure.add_subplot()


def curve_plot(x, y, xlabel: str, ylabel: str, title: str, diagonal: bool = False, xmax: float = 1.0) -> str:
    figure, ax = _figure()
    if diagonal:
        ax.plot([0, 1], [0, 1], color="#bbbbbb", linewidth=1, linestyle=":")
    ax.plot(x, y, color=CURVE_COLOUR, linewidth=2)
    ax.set(xlim=(0, xmax), ylim=(0, 1.02), xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    return _svg(figure)


def histogram_plot(scores, labels, threshold: float | None) -> str:
    """Scores of good (green) and defective (red) images, or of all images (labels None)."""
    scores = np.asarray(scores, dtype=float)
    figure, ax = _figure()
    bins = np.linspace(scores.min(), scores.max(), 31) if scores.max() > scores.min() else 10
    if labels is None:
        ax.hist(scores, bins=bins, color=CURVE_COLOUR, alpha=0.7, label=f"images ({len(scores)})")
        labels = np.zeros(0, dtype=bool)
    labels = np.asarray(labels, dtype=bool)
    if (~labels).any():
        ax.hist(scores[~labels], bins=bins, color=GOOD_COLOUR, alpha=0.6, label=f"good ({int((~labels).sum())})")
    if labels.any():
        ax.hist(scores[labels], bins=bins, color=DEFECT_COLOUR, alpha=0.6, label=f"defective ({int(labels.sum())})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.5, label="threshold")
    from matplotlib.ticker import EngFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # scores are often 5-digit numbers: keep labels apart
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set(xlabel="image score", ylabel="images", title="Score distributions")
    ax.legend(fontsize=7)
    return _svg(figure)


# ------------------------------------------------------------------ pages
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1180px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; } th, td { padding: .25em .7em; border-bottom: 1px solid #eee; text-align: left; }
th { background: #f5f5f5; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: flex; flex-wrap: wrap; gap: .5em; } .plots svg { max-width: 100%; height: auto; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: .6em; }
figure { margin: 0; border: 1px solid #ddd; padding: .3em; } figure img { width: 100%; height: auto; }
figcaption { font-size: 12px; } .bad { color: #b00; font-weight: 600; } .muted { color: #777; }
img.thumb { width: 96px; height: auto; } th.sort { cursor: pointer; } th.sort:after { content: " \\2195"; color: #999; }
"""


def _page(title: str, body: str, script: str = "") -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n"
            + (f"<script>{script}</script>\n" if script else "") + "</body></html>\n")


def _number(value: float, digits: int = 2) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _settings_table(settings: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in settings.items())
    return f"<table>{rows}<tr><th>patchcore_fast</th><td>{__version__}</td></tr></table>"


def gallery_order(scores, labels, threshold: float | None) -> list[int]:
    """Misses and false alarms at the threshold first (the worst first), then the rest by score."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    order = list(np.argsort(-scores, kind="stable"))
    if threshold is None:
        return order
    flagged = scores > threshold
    false_alarms = [i for i in order if flagged[i] and not labels[i]]
    misses = [i for i in reversed(order) if labels[i] and not flagged[i]]  # lowest-scored defect first
    wrong = set(false_alarms) | set(misses)
    return false_alarms + misses + [i for i in order if i not in wrong]


def _verdict(score: float, label: bool | None, threshold: float | None) -> str:
    if threshold is None:
        return ""
    flagged = score > threshold
    if label is None:
        return "anomalous" if flagged else "normal"
    if flagged and not label:
        return '<span class="bad">false alarm</span>'
    if label and not flagged:
        return '<span class="bad">missed</span>'
    return "caught" if label else "normal"


def evaluate_report(path: Path, results: list[CategoryResult], settings: dict) -> Path:
    """Writes the evaluate report to `path` (next to results.csv and the overlays)."""
    metric_names = (("image_auroc", "Image AUROC"), ("pixel_auroc", "Pixel AUROC"), ("pro", "PRO"), ("f1", "Image F1"))
    head = "".join(f"<th>{label}</th>" for _, label in metric_names)
    rows = "".join(
        f"<tr><td>{html.escape(r.method)}</td><td>{html.escape(r.category)}</td>"
        + "".join(f'<td class="n">{_number(r.metrics.get(key, math.nan))}</td>' for key, _ in metric_names) + "</tr>"
        for r in results)
    stages = list(dict.fromkeys(stage for r in results for stage, value in r.timings.items()
                                if isinstance(value, (int, float))))
    timing_rows = "".join(
        f"<tr><td>{html.escape(r.method)}</td><td>{html.escape(r.category)}</td>"
        + "".join(f'<td class="n">{_number(r.timings.get(s, math.nan))}</td>' for s in stages) + "</tr>"
        for r in results)
    body = [f"<h1>PatchCore evaluation</h1><p>{len(results)} result(s); metrics in percent, times in seconds.</p>",
            f"<table><tr><th>method</th><th>category</th>{head}</tr>{rows}</table>",
            "<h2>Timings</h2><table><tr><th>method</th><th>category</th>"
            + "".join(f"<th>{html.escape(s)}</th>" for s in stages) + f"</tr>{timing_rows}</table>"]
    for r in results:
        labels = np.asarray(r.labels, dtype=bool)
        plots = []
        if labels.any() and (~labels).any():
            fpr, tpr = roc_curve(r.scores, labels)
            plots.append(curve_plot(fpr, tpr, "false positive rate", "true positive rate",
                                    f"Image ROC (AUROC {_number(r.metrics.get('image_auroc'))})", diagonal=True))
        if r.pro_curve is not None:
            plots.append(curve_plot(*r.pro_curve, "false positive rate (pixels)", "per-region overlap",
                                    f"PRO up to FPR 0.3 ({_number(r.metrics.get('pro'))})", xmax=0.3))
        plots.append(histogram_plot(r.scores, labels, r.threshold))
        threshold = ("no threshold" if r.threshold is None
                     else f"threshold {r.threshold:.6g} ({html.escape(r.threshold_source)})")
        body.append(f'<h2 id="{html.escape(r.category)}-{html.escape(r.method)}">{html.escape(r.category)}, '
                    f"{html.escape(r.method)}</h2><p>{threshold}</p><div class=plots>{''.join(plots)}</div>")
        if any(r.overlays):
            order = [i for i in gallery_order(r.scores, labels, r.threshold) if r.overlays[i]]
            shown = order[:GALLERY_MAX]
            cards = "".join(
                f'<figure><a href="{html.escape(r.overlays[i])}"><img src="{html.escape(r.overlays[i])}" loading="lazy" '
                f'alt="{html.escape(r.names[i])}"></a><figcaption>{html.escape(r.names[i])}: score {r.scores[i]:.4g} '
                f"{_verdict(r.scores[i], bool(labels[i]), r.threshold)}</figcaption></figure>" for i in shown)
            more = (f'<p class="muted">{len(order) - len(shown)} more overlays in the overlays folder.</p>'
                    if len(order) > len(shown) else "")
            body.append(f"<h3>Overlays (misses and false alarms first)</h3><div class=gallery>{cards}</div>{more}")
    body.append("<h2>Settings</h2>" + _settings_table(settings))
    path = Path(path)
    path.write_text(_page("PatchCore evaluation", "\n".join(body)), encoding="utf-8")
    return path


SORT_AND_PAGE = """
const table = document.getElementById("images"), rows = Array.from(table.tBodies[0].rows);
const pageRows = %d; let page = 0;
function show() {
  const pages = Math.max(1, Math.ceil(rows.length / pageRows));
  page = Math.min(Math.max(page, 0), pages - 1);
  rows.forEach((row, i) => { row.hidden = Math.floor(i / pageRows) !== page; });
  document.getElementById("page").textContent = "page " + (page + 1) + " of " + pages;
}
document.querySelectorAll("th.sort").forEach((th) => th.addEventListener("click", () => {
  const column = th.cellIndex, descending = th.dataset.order !== "desc";
  th.dataset.order = descending ? "desc" : "asc";
  rows.sort((a, b) => {
    const x = a.cells[column].dataset.value, y = b.cells[column].dataset.value;
    const order = isNaN(x) ? x.localeCompare(y) : Number(x) - Number(y);
    return descending ? -order : order;
  });
  rows.forEach((row) => table.tBodies[0].appendChild(row));
  page = 0; show();
}));
document.getElementById("prev").addEventListener("click", () => { page -= 1; show(); });
document.getElementById("next").addEventListener("click", () => { page += 1; show(); });
show();
"""


def predict_report(path: Path, rows: list[tuple[str, float, str]], threshold: float | None, threshold_source: str,
                   settings: dict) -> Path:
    """Writes the predict report: rows are (image, score, overlay file relative to the report),
    listed highest score first, sortable by any column."""
    rows = sorted(rows, key=lambda r: -r[1])
    scores = np.array([r[1] for r in rows], dtype=float)
    flagged = None if threshold is None else int((scores > threshold).sum())
    summary = (f"{len(rows)} image(s); " + ("no threshold: scores only (fit with --calibrate, or a model with a "
               "threshold, for decisions)" if threshold is None else
               f"threshold {threshold:.6g} ({html.escape(threshold_source)}): {flagged} anomalous, "
               f"{len(rows) - flagged} normal; normalised score = score / threshold (1.0 at the threshold)"))
    normalised = threshold is not None and threshold > 0
    header = ('<tr><th>overlay</th><th class="sort">image</th><th class="sort">score</th>'
              + ('<th class="sort">normalised</th><th class="sort">decision</th>' if threshold is not None else "")
              + "</tr>")
    body_rows = []
    for source, score, overlay in rows:
        cells = [f'<td><a href="{html.escape(overlay)}"><img class="thumb" src="{html.escape(overlay)}" loading="lazy" '
                 f'alt=""></a></td>',
                 f'<td data-value="{html.escape(source)}">{html.escape(source)}</td>',
                 f'<td class="n" data-value="{score:.9g}">{score:.6g}</td>']
        if threshold is not None:
            ratio = score / threshold if normalised else math.nan
            decision = "anomalous" if score > threshold else "normal"
            cells.append(f'<td class="n" data-value="{ratio:.9g}">{_number(ratio, 3)}</td>')
            cells.append(f'<td data-value="{decision}">{decision}</td>')
        body_rows.append("<tr>" + "".join(cells) + "</tr>")
    plot = histogram_plot(scores, None, threshold) if len(rows) else ""
    body = (f"<h1>PatchCore predictions</h1><p>{summary}</p><div class=plots>{plot}</div>"
            f'<p><button id="prev">previous</button> <span id="page"></span> <button id="next">next</button> '
            f'<span class="muted">(click a column to sort)</span></p>'
            f'<table id="images"><thead>{header}</thead><tbody>{"".join(body_rows)}</tbody></table>'
            "<h2>Settings</h2>" + _settings_table(settings))
    path = Path(path)
    path.write_text(_page("PatchCore predictions", body, SORT_AND_PAGE % PAGE_ROWS), encoding="utf-8")
    return path
