"""Figures of step 03 and the head explorer on synthetic data (no model)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from PIL import Image  # noqa: E402

from sparsemm_utils import head_scoring_rule as rule  # noqa: E402
from sparsemm_utils.head_explorer import (  # noqa: E402
    ExplorerDataError,
    ExplorerSample,
    HeadExplorer,
    running_interactively,
)
from sparsemm_utils.patch_mapping import QwenVLPatchMapper  # noqa: E402
from sparsemm_utils.plots import heads as ph  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


SCORES = np.array([[0.0, 0.1, 0.0], [0.9, 0.05, 0.3]])


def test_heatmap_outlines_the_top_heads():
    fig = ph.plot_head_heatmap(SCORES, annotate_top=2)
    ax = fig.axes[0]
    boxes = [(p.get_x(), p.get_y()) for p in ax.patches if isinstance(p, Rectangle) and p.get_edgecolor()[0] == 1.0]
    assert boxes == [(0, 1), (2, 1)]  # L1H0 (0.9) then L1H2 (0.3), drawn at (head, layer)


def test_heatmap_and_share_plots_accept_all_zero_scores():
    ph.plot_head_heatmap(np.zeros((2, 3)))
    fig = ph.plot_cumulative_share({"zeros": np.zeros((2, 3)), "some": SCORES})
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    share5, share10 = rule.top_share(SCORES, 0.05), rule.top_share(SCORES, 0.10)
    assert any("all scores zero" in label for label in labels)
    assert f"some (top 5%: {share5:.0%}, top 10%: {share10:.0%})" in labels


def test_cumulative_share_marks_are_read_off_the_curve():
    fig = ph.plot_cumulative_share(SCORES, marks=(0.5,), reference=None)
    ax = fig.axes[0]
    share = rule.top_share(SCORES, 0.5)
    assert [t.get_text() for t in ax.get_legend().get_texts()][1] == f"scores (top 50%: {share:.0%})"
    dots = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert len(dots) == 1 and dots[0].get_ydata()[0] == pytest.approx(share)


def _overlaps(texts, fig) -> list[tuple[str, str]]:
    renderer = fig.canvas.get_renderer()
    # the text's own box (an annotation's get_window_extent also covers its leader line)
    boxes = [(t.get_text(), Text.get_window_extent(t, renderer)) for t in texts if t.get_text()]
    return [(a, c) for i, (a, b) in enumerate(boxes) for c, d in boxes[i + 1 :] if b.overlaps(d)]


def test_cumulative_share_labels_do_not_pile_up():
    # four variants with shares within a few points of each other: the numbers sit in the legend
    curves = {name: SCORES + 0.01 * k for k, name in enumerate(["a", "b", "c", "d"])}
    fig = ph.plot_cumulative_share(curves)
    ax = fig.axes[0]
    assert not [t for t in ax.texts if "%" in t.get_text()]
    (top,) = ax.child_axes  # the 5% / 10% marks, labelled above the axes
    fig.canvas.draw()
    assert [t.get_text() for t in top.get_xticklabels()] == ["5%", "10%"]
    assert not _overlaps(top.get_xticklabels(), fig)


def test_mass_plot_names_heads_on_one_spot_without_overprinting():
    scores = np.array([[0.0, 0.1, 0.2, 0.3], [1.9, 1.9, 1.9, 0.4]])
    mass = np.array([[0.1, 0.2, 0.3, 0.4], [0.99, 0.99, 0.99, 0.5]])  # L1H0-L1H2 on one point
    fig = ph.plot_image_mass_vs_score(scores, mass, annotate_top=4)
    labels = [t for t in fig.axes[0].texts]
    assert [t.get_text() for t in labels] == ["#1 L1H0", "#2 L1H1", "#3 L1H2", "#4 L1H3"]
    assert not _overlaps(labels, fig)


def test_visual_vs_copy_plot_names_the_top_heads_of_both_without_overprinting():
    visual = np.array([[0.0, 0.1, 0.2, 0.3], [1.9, 1.9, 1.9, 0.4]])
    copy = np.array([[5.0, 0.0, 0.0, 4.0], [2.0, 2.0, 2.0, 0.0]])  # L1H0-L1H2 on one point again
    fig = ph.plot_visual_vs_copy_heads(visual, copy, annotate_top=2, fraction=0.25)
    scatter, left, _, right, _ = fig.axes  # the scatter, then each heatmap with its colour bar
    labels = [t.get_text() for t in scatter.texts]
    assert labels == ["L1H0 (V#1)", "L1H1 (V#2)", "L0H0 (T#1)", "L0H3 (T#2)"]
    assert not _overlaps(scatter.texts, fig)
    # top 25% of 8 heads = 2: the visual top two (L1H0, L1H1) and the copy top two (L0H0, L0H3) share none
    assert scatter.get_title().startswith("visual vs text-copy score per head: 0 of the top 2 of each are shared")
    assert [line.get_xdata()[0] for line in scatter.get_lines() if line.get_linestyle() == "--"][0] == 4.0
    assert (left.get_title(), right.get_title()) == ("visual score S", "text-copy score")
    assert fig.axes[4].get_ylabel() == "text-copy score (hits per document)"
    with pytest.raises(rule.HeadScoreShapeError, match="text-copy head scores"):
        ph.plot_visual_vs_copy_heads(visual, copy[:, :3])


QWEN = QwenVLPatchMapper()
IMAGE = Image.new("RGB", (280, 224), "white")  # resized to 280 x 224: a 8 x 10 grid of 80 tokens


def test_draw_image_attention_checks_the_length():
    fig, ax = plt.subplots()
    weights = np.zeros(QWEN.num_tokens(280, 224))
    weights[5] = 1.0
    ph.draw_image_attention(ax, IMAGE, QWEN, weights, region=[5, 6], title="x")
    assert len(ax.collections) == 2  # the attention cells and the region outline
    with pytest.raises(ValueError, match="one value per image token"):
        ph.draw_image_attention(ax, IMAGE, QWEN, np.zeros(3))


def test_token_reasons_and_mass_plots():
    fig = ph.plot_token_reasons({"a": {"matched": 3, "no_match": 2}, "b": {"matched": 0, "unaligned": 5}})
    assert fig.axes[0].get_legend() is not None
    ph.plot_image_mass_vs_score(SCORES, np.full(SCORES.shape, 0.5))
    with pytest.raises(ValueError, match="shape"):
        ph.plot_image_mass_vs_score(SCORES, np.zeros((3, 3)))


# ---------------------------------------------------------------------------- explorer


def explorer_sample(steps: int = 4) -> ExplorerSample:
    n = QWEN.num_tokens(280, 224)
    rng = np.random.default_rng(0)
    attention = rng.random((steps, 2, 3, n)).astype(np.float16)
    matches = [rule.TokenMatch(rule.MATCHED, np.array([12, 13])) if t % 2 == 0 else rule.TokenMatch(rule.NO_MATCH) for t in range(steps)]
    hits = np.zeros((steps, 2, 3), dtype=bool)
    hits[0, 1, 0] = True
    return ExplorerSample(
        doc_id=9, image=IMAGE, mapper=QWEN, image_attention=attention, token_texts=list("ABCD")[:steps],
        matches=matches, hits=hits, image_start=10,
    )


def test_explorer_titles_and_static_fallback():
    explorer = HeadExplorer([explorer_sample()], scores=SCORES)
    assert explorer.default_heads() == [(1, 0), (0, 0)]
    title = explorer.title(0, 1, 0, 0)
    assert "L1H0" in title and "token 0 'A'" in title and "|R|=2" in title and "HIT" in title
    assert explorer.samples[0].region(0).tolist() == [2, 3]  # absolute 12, 13 minus image start 10
    fig = explorer.show(interactive=False, max_steps=3)
    assert len(fig.axes) == 2 * 3  # best and worst head x 3 tokens
    assert explorer.first_matched_step(0) == 0
    assert len(explorer.compare_heads_figure(0, [(1, 0), (0, 1), (1, 2)]).axes) == 3
    with pytest.raises(IndexError, match="step 9"):
        explorer.figure(0, 0, 0, 9)


def test_explorer_widget_builds_and_redraws():
    pytest.importorskip("ipywidgets")
    explorer = HeadExplorer([explorer_sample(), explorer_sample(steps=2)], scores=SCORES)
    box = explorer.widget()
    controls = box.children[0].children + box.children[1].children
    picker, layer, head, play, step = controls
    step.value = 3
    picker.value = 1  # the second sample keeps 2 tokens: the stepper shrinks to fit
    assert step.max == 1 and step.value == 1
    layer.value, head.value = 0, 2


def test_explorer_errors():
    with pytest.raises(ExplorerDataError, match="explorer_samples"):
        HeadExplorer([])
    bad = explorer_sample()
    with pytest.raises(ExplorerDataError, match="image attention covers"):
        ExplorerSample(9, IMAGE, QWEN, bad.image_attention[..., :5], bad.token_texts, bad.matches, bad.hits, 10)
    with pytest.raises(ExplorerDataError, match="scores have shape"):
        HeadExplorer([bad], scores=np.zeros((3, 3)))


def test_running_interactively_is_false_headless(monkeypatch):
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    assert running_interactively() is False
    monkeypatch.setenv("JPY_SESSION_NAME", "nb.ipynb")
    assert running_interactively() is False  # no IPython kernel in a pytest process
