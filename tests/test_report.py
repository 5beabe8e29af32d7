"""Plots: units.png has a row for every unit (frozen ones too), memory.png's legend stays off the
budget line, and step axes have integer ticks."""
import json

import matplotlib

matplotlib.use("Agg")

from dynatune import report
from dynatune.loop import fit
from dynatune.methods import build_method

from tiny import causal_lm, collate, lm_examples, loop_cfg


def topk_run(tmp_path):
    cfg = loop_cfg(max_steps=5, max_length=12, budget="0.9", margin=0.03)
    t, _ = fit(causal_lm("llama"), build_method("topk", seed=0, k=1), lm_examples(20, seq=12), collate, cfg,
               out_dir=tmp_path)
    t.close_hooks()
    return t


def test_units_plot_has_every_unit_frozen_ones_too(one_thread, tmp_path):
    t = topk_run(tmp_path)
    log = report.read_log(tmp_path)
    units, grid = report.units_grid(tmp_path, log)
    assert units == [u.name for u in sorted(t.units, key=lambda u: report.unit_sort_key(u.name))]
    assert len(units) == len(list(t.units)) == 6      # embedding (tied with the head), block.0-3, norm
    updated = {u for r in log for u in r["update"]}
    for i, u in enumerate(units):
        assert grid[i].sum() == sum(u in r["update"] for r in log)
    frozen = [u for u in units if u not in updated]
    assert frozen and {"embedding", "block.0"} <= set(frozen)   # top-1 leaves the bottom of the model frozen
    fig = report.units_figure(tmp_path, log)
    labels = [lab.get_text() for lab in fig.axes[0].get_yticklabels()]
    assert labels == [f"{u} (frozen)" if u in frozen else u for u in units]
    # a run without units.json (older runs) still plots the units that updated
    (tmp_path / "units.json").unlink()
    assert report.units_grid(tmp_path, log)[0] == sorted(updated, key=report.unit_sort_key)


def test_memory_legend_is_outside_the_axes_and_steps_are_integers(one_thread, tmp_path):
    topk_run(tmp_path)
    log = report.read_log(tmp_path)
    assert log[0]["budget_bytes"] > 0
    fig = report.memory_figure(tmp_path, log)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert "budget" in [t.get_text() for t in legend.get_texts()]
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1   # nothing inside the plot is covered
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    paths = report.plot_run(tmp_path)
    assert {p.name for p in paths} >= {"loss.png", "memory.png", "units.png"}


def test_a_lora_run_where_every_unit_always_updates_is_drawn_full(one_thread, tmp_path):
    """Every adapter updates at every step: the grid is all ones, which imshow's automatic colour
    scale (vmin == vmax) used to draw in the colormap's lowest colour, white: an empty-looking plot."""
    cfg = loop_cfg(max_steps=3, max_length=12)
    t, _ = fit(causal_lm("llama"), build_method("lora", seed=0, r=2), lm_examples(12, seq=12), collate, cfg,
               out_dir=tmp_path)
    t.close_hooks()
    log = report.read_log(tmp_path)
    units, grid = report.units_grid(tmp_path, log)
    assert len(units) == 28 and grid.min() == 1.0          # 4 blocks x 7 adapted linears, all updating
    image = report.units_figure(tmp_path, log).axes[0].get_images()[0]
    assert image.norm(1.0) == 1.0 and image.norm(0.0) == 0.0  # an update is the darkest green, never white
