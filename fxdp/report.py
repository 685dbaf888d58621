"""CompatibilityReport: the result of ``fxdp.check`` as text, JSON and an SVG picture.

The picture is drawn here (no graphviz): nodes are placed in layers by longest
path from the inputs (a Sugiyama-style layering), ordered within a layer by the
mean position of their parents, and coloured by the worst finding at the node.
"""
from __future__ import annotations

import html
import json
import os
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

from .errors import UnsupportedModelError

__all__ = ["Finding", "LayerInfo", "CompatibilityReport"]

_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass
class Finding:
    """One problem (or note) about the model, located in the user's code."""

    severity: str  # "error" (breaks DP), "warning" (not proven safe), "info"
    code: str  # kind: "batch-reduction", "batch-norm", "batch-index", "state-update", "untraceable", ...
    op: str  # the op as fxdp sees it (".mean()", "torch.matmul", "bn")
    node: str  # graph node name
    module: str  # module path ("" is the model itself)
    file: Optional[str]  # user source file of the op
    line: Optional[int]
    source: Optional[str]  # the code on that line
    problem: str
    fix: str
    ignored: bool = False

    @property
    def location(self) -> str:
        if self.file is None:
            return "-"
        return f"{os.path.basename(self.file)}:{self.line}"

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["location"] = self.location
        return d

    def __str__(self) -> str:
        where = f"module '{self.module}', " if self.module else ""
        at = f" at {self.file}:{self.line}" if self.file else ""
        return f"[{self.severity}] {where}{self.op}{at}: {self.problem}. Fix: {self.fix}"


@dataclass
class LayerInfo:
    """One parameter: how its per-sample gradient will be computed, and its cost."""

    name: str
    module: str
    shape: List[int]
    numel: int
    dtype: str
    trainable: bool
    rule: str  # per-sample rule name, "functorch fallback (...)", "frozen", "unused"
    grad_sample_bytes: int  # per-sample gradient memory at the report's batch size
    rewrite: Optional[str] = None  # "BatchNorm2d -> GroupNorm" when privatize replaces its module
    bookkeeping: Optional[str] = None  # how grad_sample_mode="bk" computes its norm and clipped sum

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@dataclass
class CompatibilityReport:
    """Static DP-compatibility report of a model (see ``fxdp.check``)."""

    model: str
    findings: List[Finding]
    layers: List[LayerInfo]
    rewrites: List[Dict[str, Any]] = field(default_factory=list)
    ignored: List[Finding] = field(default_factory=list)
    batch_dim: Any = 0  # an int, or one per positional input (None: no batch dimension)
    batch_size: int = 0
    example_batch_size: int = 0
    graph: Dict[str, Any] = field(default_factory=dict, repr=False)
    seconds: float = 0.0

    # -- structured access -------------------------------------------------------------
    @property
    def ok(self) -> bool:
        """True when no finding breaks differential privacy."""
        return not self.errors

    @property
    def errors(self) -> List[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> List[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def infos(self) -> List[Finding]:
        return [f for f in self.findings if f.severity == "info"]

    @property
    def grad_sample_bytes(self) -> int:
        return sum(layer.grad_sample_bytes for layer in self.layers)

    def raise_if_errors(self) -> "CompatibilityReport":
        """Raise ``fxdp.UnsupportedModelError`` listing the errors; return self if none."""
        if self.errors:
            lines = [f"fxdp.check: {len(self.errors)} problem(s) in {self.model} break differential privacy:"]
            lines += [f"  - {f}" for f in self.errors]
            raise UnsupportedModelError("\n".join(lines))
        return self

    def to_dict(self, graph: bool = False) -> Dict[str, Any]:
        d: Dict[str, Any] = {
            "model": self.model,
            "ok": self.ok,
            "summary": {"errors": len(self.errors), "warnings": len(self.warnings), "infos": len(self.infos),
                        "ignored": len(self.ignored)},
            "batch_dim": self.batch_dim,
            "batch_size": self.batch_size,
            "example_batch_size": self.example_batch_size,
            "findings": [f.to_dict() for f in self.findings],
            "ignored": [f.to_dict() for f in self.ignored],
            "layers": [layer.to_dict() for layer in self.layers],
            "grad_sample_bytes": self.grad_sample_bytes,
            "rewrites": list(self.rewrites),
            "seconds": round(self.seconds, 4),
        }
        if graph:
            d["graph"] = self.graph
        return d

    def to_json(self, indent: Optional[int] = 2, graph: bool = False) -> str:
        return json.dumps(self.to_dict(graph=graph), indent=indent, default=str)

    # -- text ------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"CompatibilityReport(model={self.model!r}, ok={self.ok}, errors={len(self.errors)}, "
                f"warnings={len(self.warnings)}, layers={len(self.layers)})")

    def __str__(self) -> str:
        return self.to_text()

    def to_text(self, width: int = 110) -> str:
        status = "OK" if self.ok else "NOT COMPATIBLE"
        out = [
            f"fxdp.check: {self.model}: {status} ({_count(len(self.errors), 'error')}, "
            f"{_count(len(self.warnings), 'warning')}, {_count(len(self.infos), 'note')}"
            + (f", {len(self.ignored)} ignored" if self.ignored else "") + ")",
            f"  {_batch_dims_text(self.batch_dim)}; per-sample gradient memory at batch size {self.batch_size}: "
            f"{_bytes(self.grad_sample_bytes)}",
        ]
        if self.findings or self.ignored:
            out += ["", "Findings"]
            out += _findings_table(self.findings + self.ignored, width)
        if self.layers:
            out += ["", f"Layers (per-sample gradients at batch size {self.batch_size})"]
            rows = [["parameter", "shape", "per-sample rule", "grad_sample", "note"]]
            for lay in self.layers:
                note = []
                if lay.rewrite:
                    note.append(f"rewrite: {lay.rewrite}")
                rows.append([lay.name, "[" + ", ".join(map(str, lay.shape)) + "]", lay.rule,
                             _bytes(lay.grad_sample_bytes) if lay.trainable else "-", "; ".join(note)])
            out += _table(rows, width)
            plans = [lay for lay in self.layers if lay.bookkeeping]
            if plans:
                out += ["", "Book-keeping (grad_sample_mode='bk', the default of make_private): norms and clipped sums"]
                for lay in plans:
                    out += textwrap.wrap(f"  {lay.name}: {lay.bookkeeping}", width, subsequent_indent="      ")
        if self.rewrites:
            out += ["", "Rewrites applied by fxdp.privatize"]
            for r in self.rewrites:
                head = f"  {r.get('path') or '<root>'}: {r.get('original')} -> {r.get('replacement')}: "
                out += textwrap.wrap(head + str(r.get("reason")), width, subsequent_indent="      ")
        return "\n".join(out)

    # -- picture -----------------------------------------------------------------------------
    def render(self, path: Union[str, os.PathLike, None] = None) -> str:
        """An SVG picture of the graph, offending nodes highlighted; written to
        ``path`` when given (``.svg``). Returns the SVG text."""
        svg = render_svg(self)
        if path is not None:
            p = os.fspath(path)
            if not p.lower().endswith(".svg"):
                raise ValueError(f"render writes SVG; give a path ending in .svg, got {p!r}")
            with open(p, "w", encoding="utf-8") as fh:
                fh.write(svg)
        return svg


def _batch_dims_text(batch_dim: Any) -> str:
    if isinstance(batch_dim, int):
        return f"batch dimension {batch_dim}"
    return "batch dimension of each input " + ", ".join("none" if d is None else str(d) for d in batch_dim)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _table(rows: List[List[str]], width: int) -> List[str]:
    ncol = len(rows[0])
    widths = [max(len(r[i]) for r in rows) for i in range(ncol)]
    # the last column takes what is left
    fixed = sum(widths[:-1]) + 2 * ncol
    widths[-1] = max(10, min(widths[-1], width - fixed))
    out = []
    for k, r in enumerate(rows):
        cells = [r[i].ljust(widths[i]) for i in range(ncol - 1)]
        last = textwrap.wrap(r[-1], widths[-1]) or [""]
        out.append(("  " + "  ".join(cells + [last[0]])).rstrip())
        pad = "  " + " " * (sum(widths[:-1]) + 2 * (ncol - 1))
        out += [pad + x for x in last[1:]]
        if k == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out


def _findings_table(findings: Sequence[Finding], width: int) -> List[str]:
    rows = [["severity", "op", "module", "location"]]
    for f in findings:
        rows.append([("ignored " if f.ignored else "") + f.severity, _short(f.op, 28), f.module or "<root>",
                     f.location])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    indent = "  " + " " * (sum(widths) + 2 * 4)
    text_w = max(30, width - len(indent))
    out = ["  " + "  ".join(rows[0][i].ljust(widths[i]) for i in range(4)) + "  problem / fix"]
    out.append("  " + "  ".join("-" * w for w in widths) + "  " + "-" * min(text_w, 40))
    for f, r in zip(findings, rows[1:]):
        head = "  " + "  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  "
        lines = textwrap.wrap(f.problem, text_w) or [""]
        if f.source:
            lines += textwrap.wrap("> " + f.source.strip(), text_w)
        lines += textwrap.wrap("fix: " + f.fix, text_w)
        out.append(head + lines[0])
        out += [indent + x for x in lines[1:]]
    return out


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


# --- SVG -------------------------------------------------------------------------------------

_COLORS = {"error": ("#fde2e1", "#c62828"), "warning": ("#fff4d6", "#b26a00"), "info": ("#e3efff", "#1f5fbf"),
           "rewrite": ("#e3efff", "#1f5fbf"), "ok": ("#eef6ee", "#4a7a4a"), "io": ("#f1f1f1", "#555555")}


def render_svg(report: CompatibilityReport) -> str:
    g = report.graph or {"nodes": [], "edges": []}
    nodes = g.get("nodes", [])
    edges = g.get("edges", [])
    alias = g.get("alias", {})
    worst: Dict[str, str] = {}
    notes: Dict[str, List[str]] = {}
    for f in report.findings:
        key = alias.get(f.node, f.node)
        cur = worst.get(key)
        if cur is None or _SEVERITY_ORDER[f.severity] < _SEVERITY_ORDER[cur]:
            worst[key] = f.severity
        notes.setdefault(key, []).append(f"{f.severity}: {f.problem}")
    ids = {n["name"]: i for i, n in enumerate(nodes)}
    parents: Dict[int, List[int]] = {i: [] for i in range(len(nodes))}
    for a, b in edges:
        if a in ids and b in ids:
            parents[ids[b]].append(ids[a])
    layer = [0] * len(nodes)
    for i in range(len(nodes)):  # nodes are in topological (graph) order
        layer[i] = 1 + max((layer[p] for p in parents[i]), default=-1)
    by_layer: Dict[int, List[int]] = {}
    for i, L in enumerate(layer):
        by_layer.setdefault(L, []).append(i)
    pos: Dict[int, float] = {}
    for L in sorted(by_layer):
        row = by_layer[L]
        row.sort(key=lambda i: (sum(pos.get(p, 0) for p in parents[i]) / len(parents[i])) if parents[i] else i)
        for k, i in enumerate(row):
            pos[i] = k
    box_w, box_h, gap_x, gap_y, margin = 200, 54, 28, 34, 20
    max_row = max((len(r) for r in by_layer.values()), default=1)
    width = max(640, margin * 2 + max_row * (box_w + gap_x) + 120)
    header = 88
    height = header + margin + (max(by_layer, default=0) + 1) * (box_h + gap_y) + 20
    xy: Dict[int, tuple] = {}
    for L, row in by_layer.items():
        row_w = len(row) * (box_w + gap_x) - gap_x
        x0 = (width - 120 - row_w) / 2
        for k, i in enumerate(sorted(row, key=lambda i: pos[i])):
            xy[i] = (x0 + k * (box_w + gap_x), header + margin + L * (box_h + gap_y))
    e = html.escape
    codes: Dict[str, str] = {}
    for f in report.findings:
        key = alias.get(f.node, f.node)
        if f.severity == worst.get(key):
            codes.setdefault(key, f"{f.severity}: {f.code}")
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#888"/></marker></defs>',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{margin}" y="28" font-size="18" font-weight="bold">{e(report.model)}: '
        f'{"OK" if report.ok else "NOT COMPATIBLE"}</text>',
        f'<text x="{margin}" y="48" font-size="12" fill="#444">{_count(len(report.errors), "error")}, '
        f'{_count(len(report.warnings), "warning")}; {e(_batch_dims_text(report.batch_dim))}; B = batch size; hover a '
        'node for details</text>',
    ]
    lx = float(margin)
    for sev, label in [("error", "breaks DP (mixes samples)"), ("warning", "not proven safe"),
                       ("rewrite", "rewritten by privatize"), ("ok", "per-sample")]:
        fill, stroke = _COLORS[sev]
        parts.append(f'<rect x="{lx}" y="60" width="14" height="14" rx="3" fill="{fill}" stroke="{stroke}"/>'
                     f'<text x="{lx + 19}" y="71" font-size="11">{label}</text>')
        lx += 19 + 6.3 * len(label) + 18
    for a, b in edges:
        if a not in ids or b not in ids:
            continue
        (x1, y1), (x2, y2) = xy[ids[a]], xy[ids[b]]
        sx, sy, tx, ty = x1 + box_w / 2, y1 + box_h, x2 + box_w / 2, y2
        span = layer[ids[b]] - layer[ids[a]]
        if span > 1 and abs(sx - tx) < box_w:  # skip connection: bend around the boxes in between
            bx = max(sx, tx) + box_w / 2 + 34 + 8 * (span % 3)
            parts.append(f'<path d="M {sx + box_w / 4:.1f} {sy:.1f} C {bx:.1f} {sy + 20:.1f}, {bx:.1f} {ty - 20:.1f}, '
                         f'{tx + box_w / 4:.1f} {ty:.1f}" fill="none" stroke="#999" stroke-width="1.2" '
                         'marker-end="url(#arrow)"/>')
            continue
        my = (sy + ty) / 2
        parts.append(f'<path d="M {sx:.1f} {sy:.1f} C {sx:.1f} {my:.1f}, {tx:.1f} {my:.1f}, {tx:.1f} {ty:.1f}" '
                     'fill="none" stroke="#999" stroke-width="1.2" marker-end="url(#arrow)"/>')
    for i, n in enumerate(nodes):
        x, y = xy[i]
        sev = worst.get(n["name"]) or ("io" if n.get("kind") in ("placeholder", "output") else
                                       "rewrite" if n.get("kind") == "group" else "ok")
        fill, stroke = _COLORS[sev]
        sw = 2.5 if sev == "error" else 1.2
        tip = "\n".join([n["name"], n.get("label", ""), n.get("shape", "")] + notes.get(n["name"], []))
        parts.append(f'<g><title>{e(tip)}</title>'
                     f'<rect x="{x:.1f}" y="{y:.1f}" width="{box_w}" height="{box_h}" rx="7" fill="{fill}" '
                     f'stroke="{stroke}" stroke-width="{sw}"/>')
        parts.append(f'<text x="{x + 8:.1f}" y="{y + 16:.1f}" font-size="12" font-weight="bold" fill="{stroke}">'
                     f'{e(_short(n.get("label", n["name"]), 26))}</text>')
        sub = n.get("shape", "")
        if n.get("module") and n["module"] not in n.get("label", ""):
            sub = f'{_short(n["module"], 16)}  {sub}'
        parts.append(f'<text x="{x + 8:.1f}" y="{y + 31:.1f}" font-size="10.5" fill="#333">{e(_short(sub, 34))}'
                     '</text>')
        if n["name"] in codes:
            parts.append(f'<text x="{x + 8:.1f}" y="{y + 46:.1f}" font-size="10.5" font-style="italic" '
                         f'fill="{stroke}">{e(_short(codes[n["name"]], 34))}</text>')
        parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts)
