"""The pictures of `crh web`, drawn on the server with matplotlib into PNG bytes.

* the model: log10 |rho| and the phase over the cells of the mesh, the
  electrodes marked, one panel each (stacked for a wide mesh, side by side
  for a deep one);
* the convergence: the data RMS of each iteration, with RMS = 1 (the data
  fitted to their errors) as a dashed line;
* CRMod's readings: the transfer resistance and the phase of every
  measurement of mod/volt.dat;
* a sipdir: the final models of its frequencies side by side, on one colour
  scale for the magnitude and one for the phase.

Only matplotlib's object interface and its Agg canvas are used (no pyplot,
no display, no global figure state).  Matplotlib is not thread-safe, so the
server's threads draw one picture at a time (:data:`_DRAWING`); a picture is
drawn once per result and then served from a cache (cache.py).
"""

from __future__ import annotations

import io
import math
import threading

import numpy as np

from cr_queue.web.formats import Convergence, Mesh, Readings

_DRAWING = threading.Lock()
DPI = 100


def _figure(width: float, height: float, *, layout: str | None = "constrained"):
    # Imported here: the web's start-up imports it once (server.py), the rest of cr_queue never.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def _png(figure, *, tight: bool = False) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight" if tight else None, pad_inches=0.1)
    return buffer.getvalue()


def model_png(
    mesh: Mesh,
    electrodes: np.ndarray | None,
    panels: list[tuple[str, np.ndarray, str]],
    *,
    title: str = "",
) -> bytes:
    """Each of ``panels`` (label, one value per cell, colour map) over the mesh, electrodes as black triangles."""
    from matplotlib.collections import PolyCollection

    x0, x1, z0, z1 = mesh.bounds()
    width, depth = max(x1 - x0, 1e-9), max(z1 - z0, 1e-9)
    stacked = width >= 1.5 * depth
    polygons = mesh.polygons()
    # Laid out by hand: matplotlib's constrained layout drew the figure twice and took half
    # the time of a 10,000-cell model (bench/web_100k.py).
    with _DRAWING:
        if stacked:
            panel_h = min(4.5, max(1.4, 8.0 * depth / width + 1.0))
            figure = _figure(9.0, panel_h * len(panels) + (0.4 if title else 0), layout=None)
            axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
        else:
            panel_w = min(5.0, max(2.2, 5.0 * width / depth + 1.4))
            figure = _figure(panel_w * len(panels), 5.5, layout=None)
            axes = figure.subplots(1, len(panels), squeeze=False)[0, :]
        figure.subplots_adjust(hspace=0.4, wspace=0.45)
        if title:
            figure.suptitle(title, fontsize=10)
        for ax, (label, values, cmap) in zip(axes, panels):
            cells = PolyCollection(polygons, array=values, cmap=cmap, edgecolors="face", linewidths=0.2)
            ax.add_collection(cells)
            ax.set_xlim(x0, x1)
            ax.set_ylim(z0, z1)
            ax.set_aspect("equal")
            ax.set_xlabel("x (m)")
            ax.set_ylabel("z (m)")
            if electrodes is not None and len(electrodes):
                ax.plot(electrodes[:, 0], electrodes[:, 1], "v", color="black", markersize=4, clip_on=False, label="electrodes")
            ax.set_title(label, fontsize=10)
            figure.colorbar(cells, ax=ax, fraction=0.04, pad=0.02)
        return _png(figure, tight=True)


def rms_png(convergence: Convergence) -> bytes:
    """The data RMS per iteration (main iterations, then the final phase improvement's)."""
    with _DRAWING:
        figure = _figure(6.0, 3.2)
        ax = figure.subplots()
        for kind, label, style in (("IT", "iterations", "o-"), ("PIT", "phase improvement", "s--")):
            points = [(it.number, it.rms) for it in convergence.iterations if it.kind == kind and it.rms is not None]
            if points:
                number, rms = zip(*points)
                ax.plot(number, rms, style, label=label)
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="RMS = 1")
        values = [it.rms for it in convergence.iterations if it.rms is not None and it.rms > 0]
        if values and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("data RMS")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        return _png(figure)


def volt_png(readings: Readings) -> bytes:
    """|R| (log scale) and the phase of each measurement, in volt.dat's order."""
    number = np.arange(1, readings.resistance.size + 1)
    with _DRAWING:
        figure = _figure(9.0, 4.6)
        top, bottom = figure.subplots(2, 1, sharex=True)
        magnitude = np.abs(readings.resistance)
        positive = magnitude > 0
        top.plot(number[positive], magnitude[positive], ".", markersize=3)
        if positive.any():
            top.set_yscale("log")
        top.set_ylabel("|R| (ohm)")
        top.grid(alpha=0.3)
        bottom.plot(number, readings.phase, ".", markersize=3, color="tab:red")
        bottom.set_ylabel("phase (mrad)")
        bottom.set_xlabel("measurement")
        bottom.xaxis.get_major_locator().set_params(integer=True)
        bottom.grid(alpha=0.3)
        return _png(figure)


def warm_up() -> None:
    """Import matplotlib and build its font cache: a server pays this at start, not on its first picture."""
    figure = _figure(1.0, 1.0)
    figure.text(0.5, 0.5, "x")
    _png(figure)


def frequencies_png(items: list[tuple[str, Mesh, np.ndarray | None, np.ndarray, np.ndarray | None]]) -> bytes:
    """A sipdir's final models side by side, lowest frequency first: every magnitude on one
    colour scale, every phase on another, so the frequencies can be compared at a glance.

    ``items``: (title, mesh, electrodes, log10 |rho|, phase or None) per frequency."""
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import Normalize

    columns = min(len(items), 4)
    rows = math.ceil(len(items) / columns)
    x0, x1, z0, z1 = items[0][1].bounds()
    panel_w = 3.2
    panel_h = min(3.2, max(1.0, panel_w * (z1 - z0) / max(x1 - x0, 1e-9) + 0.6))
    blocks = [("log10 |rho| (ohm m)", 3, "viridis")]
    if all(item[4] is not None for item in items):
        blocks.append(("phase (mrad)", 4, "plasma"))
    with _DRAWING:
        figure = _figure(panel_w * columns + 1.2, (panel_h * rows + 0.5) * len(blocks))
        for sub, (label, index, cmap) in zip(np.atleast_1d(figure.subfigures(len(blocks), 1)), blocks):
            values = [item[index] for item in items]
            scale = Normalize(min(float(v.min()) for v in values), max(float(v.max()) for v in values))
            axes = sub.subplots(rows, columns, squeeze=False)
            cells = None
            for ax, item, value in zip(axes.flat, items, values):
                title, mesh, electrodes = item[0], item[1], item[2]
                cells = PolyCollection(mesh.polygons(), array=value, cmap=cmap, norm=scale, edgecolors="face", linewidths=0.2)
                ax.add_collection(cells)
                bx0, bx1, bz0, bz1 = mesh.bounds()
                ax.set_xlim(bx0, bx1)
                ax.set_ylim(bz0, bz1)
                ax.set_aspect("equal")
                ax.set_title(title, fontsize=9)
                ax.tick_params(labelsize=7)
                if electrodes is not None and len(electrodes):
                    ax.plot(electrodes[:, 0], electrodes[:, 1], "v", color="black", markersize=2.5, clip_on=False)
            for ax in axes.flat[len(items):]:
                ax.set_axis_off()
            sub.colorbar(cells, ax=axes.ravel().tolist(), label=label, shrink=0.9)
        return _png(figure)
