"""An interactive explorer of one head's attention over the image, token by token (step 03).

In JupyterLab, :meth:`HeadExplorer.show` displays ipywidgets controls: layer and head sliders, a
sample picker and a token stepper (slider + play button); the panel redraws the chosen head's
attention over the image for the chosen generated token, with that token's region (docs/method.md
§4) outlined and whether the head hit it. Headless (papermill, CI, an exported HTML page) there is
no widget frontend, so :meth:`HeadExplorer.show` falls back to a static figure: a grid of the
first tokens for a few heads (by default the best visual head and the worst).

The data are the image attention rows kept by the capture (``CapturedAttention.image_attention``,
(T', L, H, n_img) for the first T' tokens of the first samples: step 03's Config's
``explorer_samples`` and ``explorer_tokens``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from .head_scoring_capture import HeadScoringResult, SampleCapture
from .head_scoring_rule import TokenMatch
from .patch_mapping import PatchMapper, mapper_from_processor
from .plots.heads import draw_image_attention, plot_heads_on_image

__all__ = [
    "ExplorerDataError",
    "ExplorerSample",
    "explorer_samples",
    "running_interactively",
    "HeadExplorer",
]


class ExplorerDataError(ValueError):
    """The explorer was given no samples with image attention, or inconsistent arrays."""


@dataclass
class ExplorerSample:
    """What the explorer draws for one sample.

    ``image_attention`` (T', L, H, n_img) float: attention of each head on each image token (relative
    positions) for the first T' generated tokens; ``token_texts`` and ``matches`` (T'): each
    token's string and :class:`~sparsemm_utils.head_scoring_rule.TokenMatch`; ``hits`` (T', L, H) bool;
    ``image_start``: absolute position of the first image token (to turn regions relative).
    """

    doc_id: Any
    image: Image.Image
    mapper: PatchMapper
    image_attention: np.ndarray
    token_texts: Sequence[str]
    matches: Sequence[TokenMatch]
    hits: np.ndarray
    image_start: int

    def __post_init__(self) -> None:
        steps = self.image_attention.shape[0]
        if self.image_attention.ndim != 4:
            raise ExplorerDataError(f"image_attention must be (tokens, layers, heads, image tokens), got {self.image_attention.shape}")
        if len(self.token_texts) < steps or len(self.matches) < steps or self.hits.shape[0] < steps:
            raise ExplorerDataError(
                f"doc {self.doc_id!r}: {steps} tokens of image attention but only {len(self.token_texts)} texts, "
                f"{len(self.matches)} matches, {self.hits.shape[0]} hit rows"
            )
        width, height = self.image.size
        n = self.mapper.num_tokens(width, height)
        if self.image_attention.shape[-1] != n:
            raise ExplorerDataError(
                f"doc {self.doc_id!r}: image attention covers {self.image_attention.shape[-1]} tokens but the mapping "
                f"gives {n} for a {width}x{height} image"
            )

    @property
    def num_steps(self) -> int:
        return int(self.image_attention.shape[0])

    def region(self, step: int) -> np.ndarray:
        """The region of token ``step`` relative to the first image token (empty when skipped)."""
        return self.matches[step].region - self.image_start


def explorer_samples(
    samples: Sequence[SampleCapture],
    result: HeadScoringResult,
    documents: Sequence[Mapping[str, Any]],
    processor: Any,
    model_type: str,
) -> list[ExplorerSample]:
    """:class:`ExplorerSample` for every captured sample that kept image attention.

    ``documents`` must hold the samples' documents in the same order (the images); ``result``
    gives the matches and hits of the variant to show; the mapper is rebuilt from ``processor``
    with each record's mapping variant.
    """
    out = []
    for n, sample in enumerate(samples):
        attention = sample.captured.image_attention
        if attention is None or attention.shape[0] == 0:
            continue
        doc = documents[n]
        if doc.get("doc_id") != sample.doc_id:
            raise ExplorerDataError(f"documents[{n}] is doc {doc.get('doc_id')!r}, the sample is doc {sample.doc_id!r}")
        mapper = mapper_from_processor(processor, model_type, sample.record.get("variant", "fidelity"))
        steps = attention.shape[0]
        out.append(
            ExplorerSample(
                doc_id=sample.doc_id,
                image=doc["image"],
                mapper=mapper,
                image_attention=attention,
                token_texts=list(sample.tokens.texts[:steps]),
                matches=list(result.matches[n][:steps]),
                hits=result.hits[n][:steps],
                image_start=int(sample.record["image_token_start"]),
            )
        )
    return out


def running_interactively() -> bool:
    """True inside a Jupyter frontend session (JupyterLab/Notebook set ``JPY_SESSION_NAME`` for
    the kernels they start) with ipywidgets installed; False under papermill/nbclient, plain
    Python and CI, where widgets would not render."""
    if not os.environ.get("JPY_SESSION_NAME"):
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _token_label(text: str) -> str:
    return repr(text)[1:-1] if text else "''"


class HeadExplorer:
    """Browse a head's attention over the image, generated token by generated token.

    ``samples``: :class:`ExplorerSample` (from :func:`explorer_samples`); ``scores`` (L, H)
    optional, shown in the titles.
    """

    def __init__(self, samples: Sequence[ExplorerSample], scores: np.ndarray | None = None):
        if not samples:
            raise ExplorerDataError(
                "no sample kept image attention: capture with step 03's Config.explorer_samples >= 1 and "
                "explorer_tokens >= 1"
            )
        shapes = {s.image_attention.shape[1:3] for s in samples}
        if len(shapes) != 1:
            raise ExplorerDataError(f"samples disagree on (layers, heads): {sorted(shapes)}")
        self.samples = list(samples)
        self.layers, self.heads = next(iter(shapes))
        self.scores = None if scores is None else np.asarray(scores, dtype=np.float64)
        if self.scores is not None and self.scores.shape != (self.layers, self.heads):
            raise ExplorerDataError(f"scores have shape {self.scores.shape}, the samples ({self.layers}, {self.heads})")

    def _check(self, sample_index: int, layer: int, head: int, step: int) -> ExplorerSample:
        if not 0 <= sample_index < len(self.samples):
            raise IndexError(f"sample_index {sample_index} outside 0..{len(self.samples) - 1}")
        if not (0 <= layer < self.layers and 0 <= head < self.heads):
            raise IndexError(f"head L{layer}H{head} outside {self.layers} layers x {self.heads} heads")
        sample = self.samples[sample_index]
        if not 0 <= step < sample.num_steps:
            raise IndexError(f"step {step} outside the {sample.num_steps} tokens kept for doc {sample.doc_id!r}")
        return sample

    def title(self, sample_index: int, layer: int, head: int, step: int) -> str:
        """Panel title: head (and score), token, match reason, region size, hit or not."""
        sample = self._check(sample_index, layer, head, step)
        match = sample.matches[step]
        head_label = f"L{layer}H{head}" + (f" (S={self.scores[layer, head]:.3g})" if self.scores is not None else "")
        status = f"{match.reason}"
        if match.matched:
            status += f", |R|={match.region.size}, {'HIT' if sample.hits[step, layer, head] else 'miss'}"
        return f"{head_label} doc {sample.doc_id}, token {step} '{_token_label(sample.token_texts[step])}': {status}"

    def draw(self, ax: Axes, sample_index: int, layer: int, head: int, step: int) -> Axes:
        """Draw one panel: head (layer, head) at token ``step`` of sample ``sample_index``."""
        sample = self._check(sample_index, layer, head, step)
        weights = sample.image_attention[step, layer, head].astype(np.float64)
        return draw_image_attention(
            ax, sample.image, sample.mapper, weights, region=sample.region(step),
            title=self.title(sample_index, layer, head, step) + f"\nmass on image {weights.sum():.2f}",
        )

    def figure(self, sample_index: int = 0, layer: int = 0, head: int = 0, step: int = 0, *, size: float = 5.0) -> Figure:
        """One panel as a figure."""
        sample = self._check(sample_index, layer, head, step)
        width, height = sample.image.size
        fig, ax = plt.subplots(figsize=(size, size * height / width + 0.8))
        self.draw(ax, sample_index, layer, head, step)
        fig.tight_layout()
        return fig

    def default_heads(self) -> list[tuple[int, int]]:
        """The best and the worst head by score (the first two heads without scores)."""
        if self.scores is None or not self.scores.sum() > 0:
            return [(0, 0), (self.layers - 1, self.heads - 1)]
        best = np.unravel_index(int(np.argmax(self.scores)), self.scores.shape)
        worst = np.unravel_index(int(np.argmin(self.scores)), self.scores.shape)
        return [(int(best[0]), int(best[1])), (int(worst[0]), int(worst[1]))]

    def static_figure(
        self,
        sample_index: int = 0,
        heads: Sequence[tuple[int, int]] | None = None,
        steps: Sequence[int] | None = None,
        *,
        max_steps: int = 6,
        panel_size: float = 3.0,
    ) -> Figure:
        """The headless fallback: rows = ``heads`` (default :meth:`default_heads`), columns =
        ``steps`` (default: the first ``max_steps`` tokens, matched ones first)."""
        sample = self._check(sample_index, 0, 0, 0)
        heads = list(heads) if heads is not None else self.default_heads()
        if steps is None:
            matched = [t for t in range(sample.num_steps) if sample.matches[t].matched]
            rest = [t for t in range(sample.num_steps) if not sample.matches[t].matched]
            steps = sorted((matched + rest)[:max_steps])
        steps = list(steps)
        width, height = sample.image.size
        fig, axes = plt.subplots(
            len(heads), len(steps), figsize=(panel_size * len(steps), (panel_size * height / width + 0.7) * len(heads)),
            squeeze=False,
        )
        for row, (layer, head) in enumerate(heads):
            for col, step in enumerate(steps):
                self.draw(axes[row, col], sample_index, layer, head, step)
                axes[row, col].title.set_fontsize(7)
        fig.tight_layout()
        return fig

    def first_matched_step(self, sample_index: int = 0) -> int:
        """The first kept token of a sample that was matched (0 when none was)."""
        sample = self._check(sample_index, 0, 0, 0)
        return next((t for t in range(sample.num_steps) if sample.matches[t].matched), 0)

    def compare_heads_figure(
        self, sample_index: int = 0, heads: Sequence[tuple[int, int]] | None = None, step: int | None = None
    ) -> Figure:
        """Several heads side by side at one token (default: the first matched token), the token's
        region outlined: e.g. the top visual heads beside a non-visual one."""
        heads = list(heads) if heads is not None else self.default_heads()
        step = self.first_matched_step(sample_index) if step is None else step
        sample = self._check(sample_index, heads[0][0], heads[0][1], step)
        weights = {}
        for layer, head in heads:
            self._check(sample_index, layer, head, step)
            score = f" S={self.scores[layer, head]:.3g}" if self.scores is not None else ""
            hit = ""
            if sample.matches[step].matched:
                hit = " HIT" if sample.hits[step, layer, head] else " miss"
            weights[f"L{layer}H{head}{score}{hit}"] = sample.image_attention[step, layer, head]
        match = sample.matches[step]
        return plot_heads_on_image(
            sample.image, sample.mapper, weights, region=sample.region(step),
            suptitle=f"doc {sample.doc_id}, token {step} '{_token_label(sample.token_texts[step])}' ({match.reason}"
            + (f", region of {match.region.size} tokens in cyan)" if match.matched else ")"),
        )

    def widget(self) -> Any:
        """The ipywidgets explorer (layer / head sliders, sample picker, token stepper)."""
        import ipywidgets as widgets
        from IPython.display import display

        best = self.default_heads()[0]
        sample_picker = widgets.Dropdown(
            options=[(f"doc {s.doc_id}", i) for i, s in enumerate(self.samples)], value=0, description="sample"
        )
        layer = widgets.IntSlider(value=best[0], min=0, max=self.layers - 1, description="layer")
        head = widgets.IntSlider(value=best[1], min=0, max=self.heads - 1, description="head")
        step = widgets.IntSlider(value=0, min=0, max=self.samples[0].num_steps - 1, description="token")
        play = widgets.Play(value=0, min=0, max=step.max, interval=600, description="play")
        widgets.jslink((play, "value"), (step, "value"))
        output = widgets.Output()

        def on_sample(change: Mapping[str, Any]) -> None:
            last = self.samples[change["new"]].num_steps - 1
            step.value = min(step.value, last)
            step.max = play.max = last

        def redraw(*_: Any) -> None:
            with output:
                output.clear_output(wait=True)
                fig = self.figure(sample_picker.value, layer.value, head.value, step.value)
                display(fig)
                plt.close(fig)

        sample_picker.observe(on_sample, names="value")
        for control in (sample_picker, layer, head, step):
            control.observe(redraw, names="value")
        redraw()
        return widgets.VBox([widgets.HBox([sample_picker, layer, head]), widgets.HBox([play, step]), output])

    def show(self, *, interactive: bool | None = None, **static_kwargs: Any) -> Any:
        """The widget in a Jupyter frontend (``interactive=None``: :func:`running_interactively`),
        else :meth:`static_figure` (``static_kwargs`` passed on). Returns what was shown."""
        if interactive is None:
            interactive = running_interactively()
        if interactive:
            from IPython.display import display

            box = self.widget()
            display(box)
            return box
        return self.static_figure(**static_kwargs)
