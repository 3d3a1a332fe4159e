"""The curriculum: which pages and questions each training step of the reader sees.

Every function here is a pure function of the :class:`~.config.TrainConfig` and the step index,
so a step's samples are the same whoever builds them (the training process or a data worker) and
a resumed run sees the pages an uninterrupted one would have seen:

- :func:`easy_page_probability`: the share of easy pages (``easy_lines`` lines) at a step;
- :func:`step_task`: the one task of a step, drawn with ``task_weights``;
- :func:`step_samples`: the step's ``(page, question)`` pairs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sparsemm_utils.reader_tasks import TASK_TYPES, NoQuestionError, ReaderQuestion, draw_question, value_keys
from sparsemm_utils.tiny_reader.config import TinyReaderError, TrainConfig

__all__ = ["easy_page_probability", "step_task", "step_samples"]


def easy_page_probability(cfg: TrainConfig, step: int) -> float:
    """Probability that a training page of step ``step`` is an easy one (``easy_lines`` lines):
    1 until ``easy_until * steps``, then linear down to ``1 - full_fraction`` at
    ``ramp_until * steps``, constant afterwards."""
    a, b = cfg.easy_until * cfg.steps, cfg.ramp_until * cfg.steps
    floor = 1.0 - cfg.full_fraction
    if step < a:
        return 1.0
    if step >= b or b <= a:
        return floor
    return 1.0 + (floor - 1.0) * (step - a) / (b - a)


def step_task(cfg: TrainConfig, step: int) -> str:
    """The task of training step ``step``: drawn from ``task_weights`` with
    ``default_rng([seed, step, 1])``."""
    p = np.asarray(cfg.task_weights) / sum(cfg.task_weights)
    return TASK_TYPES[int(np.random.default_rng([cfg.seed, step, 1]).choice(len(TASK_TYPES), p=p))]


_ATTEMPT_STRIDE = 10**9  # index offset of the next page tried when a page cannot host the task


def step_samples(cfg: TrainConfig, step: int) -> list[tuple[dict[str, Any], ReaderQuestion]]:
    """The ``batch_size`` (page, question) pairs of training step ``step``, all of task
    :func:`step_task`. Sample ``j`` renders page ``step * batch_size + j`` of the stream
    ``cfg.seed`` (easy with probability :func:`easy_page_probability`, decided by
    ``default_rng([seed, index, 2])``), asks its question with ``default_rng([seed, index, 3])``,
    and moves on to page ``index + 10^9`` (then ``+ 2 * 10^9``, ...) when the page cannot host it.

    A ``value`` question on a full page must find two keys or more on it with probability
    ``cfg.value_multi_key`` (decided by ``default_rng([seed, index, 4])``); a page with fewer
    cannot host it. Pages are laid out first and drawn only once accepted (the same pages)."""
    task = step_task(cfg, step)
    p_easy = easy_page_probability(cfg, step)
    easy_spec = cfg.doc_spec.with_lines(cfg.easy_lines)
    out = []
    for j in range(cfg.batch_size):
        index = step * cfg.batch_size + j
        easy = np.random.default_rng([cfg.seed, index, 2]).random() < p_easy
        spec = easy_spec if easy else cfg.doc_spec
        min_keys = 2 if task == "value" and not easy and np.random.default_rng([cfg.seed, index, 4]).random() < cfg.value_multi_key else 1
        rng = np.random.default_rng([cfg.seed, index, 3])
        for attempt in range(64):
            page = index + attempt * _ATTEMPT_STRIDE
            layout = spec.layout(cfg.seed, page)
            text_only = layout.row(draw=False)  # pages are often turned down: draw only the one kept
            if min_keys > 1 and len(value_keys(text_only)) < min_keys:
                continue
            try:
                question = draw_question(text_only, task, rng)
            except NoQuestionError:
                continue
            out.append((layout.row(), question))
            break
        else:  # pragma: no cover - would need 64 pages in a row without a key-value line
            raise TinyReaderError(f"step {step}: 64 pages in a row cannot host a {task!r} question; check doc_spec")
    return out
