"""The five exercises of the course (README, "Teaching with this repo").

Each is the step where a student learns most by rebuilding one function: the box -> token
mapping (02), the hit rule (03), the 3-part allocation and SnapKV's selection (04), ANLS (05).
The background text comes from the full notebooks (by heading); the task, the stub and the
questions live here. ``python -m sparsemm_utils.exercises build`` writes the notebooks.
"""

from __future__ import annotations

from .spec import Exercise

__all__ = ["EXERCISES", "exercise"]

MAP_BOX = Exercise(
    key="map_box",
    source="02_patch_mapping",
    title="From an OCR box to visual-token positions (Qwen2-VL)",
    minutes=(20, 30),
    build=(
        "`map_box(box, width, height, geometry)`: the positions of the visual tokens that cover an OCR box on "
        "Qwen2-VL, the rule of docs/method.md §3 that `QwenVLPatchMapper.map_box` implements."
    ),
    background=("## One image, six model types", "## The rule, drawn"),
    task="""\
## Your task

Write `map_box(box, width, height, geometry)`:

- `box = (x0, y0, x1, y1)`: the box in **original-image** pixels (floats, `x0 <= x1`, `y0 <= y1`);
- `width`, `height`: the original image size;
- `geometry`: a `QwenVLGeometry`; `geometry.resized_size(height, width)` returns `(H_r, W_r)`, the size
  the processor resizes the image to (multiples of 28). The LLM sees one token per 28 x 28 block of
  the resized image: `grid_h = H_r // 28` rows and `grid_w = W_r // 28` columns, row-major.

The rule (docs/method.md §3):

1. clip the box to the image `[0, W] x [0, H]`;
2. scale it to the resized image: x by `W_r / W`, y by `H_r / H`;
3. mark rows `floor(y0 / 28) .. floor(y1 / 28)` and columns `floor(x0 / 28) .. floor(x1 / 28)`,
   **both ends included**; an index that reaches `grid_h` (`grid_w`), a box touching the bottom
   (right) edge, is clipped to the last row (column);
4. return `row * grid_w + col` for every marked cell, sorted.

**Worked example.** A 280 x 140 image needs no resizing (`grid_h = 5`, `grid_w = 10`). The box
`(30, 10, 60, 40)` covers columns `30 // 28 = 1` to `60 // 28 = 2` and rows `0` to `40 // 28 = 1`:
positions `0*10+1, 0*10+2, 1*10+1, 1*10+2 = [1, 2, 11, 12]`.
""",
    function="map_box",
    stub='''\
import math

from sparsemm_utils.patch_mapping import QwenVLGeometry


def map_box(box, width, height, geometry=QwenVLGeometry()):
    """Positions (relative to the first image token) of the Qwen2-VL visual tokens under ``box``.

    box: (x0, y0, x1, y1) in original-image pixels; width, height: the original image size;
    geometry: the processor's resize rule. Returns a sorted list of ints (docs/method.md §3).
    """
    resized_height, resized_width = geometry.resized_size(height, width)
    grid_h, grid_w = resized_height // 28, resized_width // 28
    # YOUR CODE HERE: clip, scale, mark the rows and columns (inclusive), flatten row-major.
    raise NotImplementedError("map_box: write the rule, then run the check below")
''',
    config_class="MapBoxRunConfig",
    parameters=(("n_documents", 4),),
    on_run="map_box_on_run",
    on_run_intro="""\
## Your function on this run

Step 02 mapped every chunk box of the run's documents with the library. Below, your `map_box` maps the
same boxes with the run's own processor geometry; the table lists every chunk of the first
`n_documents` documents, and the figure draws the token cells of one chunk: the library's in blue,
yours in red, both in green (all green when you agree).
""",
    needs=("01_ocr_annotation", "02_patch_mapping"),
    runtime="a second (no model is loaded)",
    open_questions=(
        "The check's hand case 3 touches the right edge: what would go wrong in the flat index if the column "
        "were not clipped to `grid_w - 1`, and which token would be marked instead?",
        "In the run's table, how many tokens does a typical chunk cover? How many would a single character "
        "cover, and what does that mean for the `1/|R|` a hit is worth in step 03?",
        "Hand case 6 downscales the image: when the processor shrinks a page, do chunks cover more or fewer "
        "tokens, and could two neighbouring lines end up sharing a token row?",
    ),
)

HIT_RULE = Exercise(
    key="hit_rule",
    source="03_head_scoring",
    title="The OCR hit rule: which heads look at what they read",
    minutes=(25, 40),
    build=(
        "`hit_rule(token_texts, chunk_texts, chunk_regions, attention_rows)`: one sample's visual-head scores "
        "s_n (layers x heads), the rule of docs/method.md §4 that step 03 applies to every document."
    ),
    background=(
        "## 1. Generate, and keep one attention row per head and token",
        "## 2. Match tokens to regions, score the heads",
    ),
    task="""\
## Your task

Write `hit_rule(token_texts, chunk_texts, chunk_regions, attention_rows)` returning `s`, an
`(L, H)` float array:

- `token_texts`: the T generated tokens' strings (the end-of-sequence token is already left out);
- `chunk_texts`: the C OCR chunks of the document; `chunk_regions[i]`: chunk i's region, the
  **absolute** key positions of its visual tokens (step 02's positions + the image's first position);
- `attention_rows[t]`: an `(L, H, N_t)` array, the attention of the query that produced token t
  over all its `N_t` keys (the prompt and the tokens generated before t).

The rule (docs/method.md §4), for every token t:

1. find the chunks whose text contains `token_texts[t]` as a substring (plain, case-sensitive `in`);
2. only when **exactly one** chunk matches, with region R, continue; otherwise skip the token;
3. for every layer l and head h: `j = argmax` of `attention_rows[t][l, h]` over **all** keys (text
   keys included); if `j` is in R, add `1 / |R|` to `s[l, h]`.

**Worked example.** Chunks `"cat"` (region {10, 11}) and `"Dog"` ({12, 13, 14}). Token `"ca"` matches
only `"cat"`: a head whose argmax is 11 gains 1/2. Token `"o"` matches only `"Dog"`, so a head pointing
at 13 gains 1/3; with a third chunk `"cot"` it would match two chunks and be skipped.
Token `"d"` matches nothing (`"Dog"` has a capital D).
""",
    function="hit_rule",
    stub='''\
import numpy as np


def hit_rule(token_texts, chunk_texts, chunk_regions, attention_rows):
    """s_n (L, H) of one sample: for each token matched to exactly one chunk (substring,
    case-sensitive), every head whose argmax over all keys lies in the chunk's region R gains 1/|R|
    (docs/method.md §4). attention_rows[t] is an (L, H, N_t) array."""
    layers, heads = np.asarray(attention_rows[0]).shape[:2]
    scores = np.zeros((layers, heads))
    # YOUR CODE HERE: match each token to a chunk, then score the heads whose argmax hits its region.
    raise NotImplementedError("hit_rule: write the rule, then run the check below")
''',
    config_class="HitRuleRunConfig",
    parameters=(("n_documents", 2), ("max_new_tokens", 48)),
    on_run="hit_rule_on_run",
    on_run_intro="""\
## Your function on this run

The rows the rule reads are not stored by step 03 (they are large), so the run's model generates again for
the first `n_documents` documents, keeping every row. Your `hit_rule` scores each generation and the table puts
it beside step 03's own scoring of the same generation; the figure shows the mean over these documents.
""",
    needs=("01_ocr_annotation", "02_patch_mapping"),
    runtime="a few seconds on the tiny model (one generation per document); a 7B model needs a GPU",
    open_questions=(
        "In the run's table, how many of the generated tokens were matched at all? What does the tokenizer "
        "(characters or words) do to the share of tokens the substring rule can use?",
        "In the figure, are the heads that score on these few documents the same as the top heads of step 03's "
        "`fig_head_heatmap.png` over all documents?",
        "Hand case 1 of the check has a head whose largest IMAGE weight is in the region but whose overall argmax "
        "is a text token. Why does the rule count that as a miss, and what would change if it did not?",
    ),
)

ALLOCATION = Exercise(
    key="allocation",
    source="04_allocation",
    title="SparseMM's budget allocation: floor, pool and rounding",
    minutes=(20, 30),
    build=(
        "`allocate(head_scores, kv_heads, budget, window, ratio)`: the tokens each KV head may keep, "
        "SparseMM's 3-part allocation of docs/method.md §5 (`SparseMMAllocation.capacities`)."
    ),
    background=("## From scores to budgets (docs/method.md §5)",),
    task="""\
## Your task

Write `allocate(head_scores, kv_heads, budget, window=32, ratio=0.1)` returning the int caps, an
`(L, H_kv)` array (the window not included):

- `head_scores`: S, `(L, H)`, one visual score per **query** head (step 03);
- `kv_heads`: H_kv; query head h belongs to KV head `h // (H / H_kv)` (consecutive query heads share one);
- `budget` B counts the window: each KV head selects `b = B - window` tokens on average.

The rule (docs/method.md §5):

1. normalise over **all** heads of all layers: `s~ = S / sum(S)`;
2. GQA: **sum** `s~` over the query heads of each KV group: `sigma[l, g]`;
3. the uniform part `m = floor(ratio * b)` for every KV head, and the pool `P = (b - m) * L * H_kv`;
4. `cap[l, g] = round(sigma[l, g] * P + m)`, rounding half to even (numpy's `np.round`).

**Worked example.** One layer, two heads, two KV heads, S = [1, 3], B = 42, w = 32: b = 10, m = 1,
P = 18; s~ = [0.25, 0.75]; caps = round(5.5) = 6 and round(14.5) = 14.
""",
    function="allocate",
    stub='''\
import math

import numpy as np


def allocate(head_scores, kv_heads, budget, window=32, ratio=0.1):
    """SparseMM's caps (L, H_kv), window excluded (docs/method.md §5): global normalisation, GQA sum,
    floor m = floor(r * b), pool P = (b - m) * L * H_kv, cap = round(sigma * P + m) (half to even)."""
    scores = np.asarray(head_scores, dtype=float)
    layers, heads = scores.shape
    b = budget - window
    # YOUR CODE HERE
    raise NotImplementedError("allocate: write the rule, then run the check below")
''',
    config_class="AllocationRunConfig",
    parameters=(("budgets", [16, 32, 64]), ("window", 8), ("ratio", 0.1)),
    on_run="allocation_on_run",
    on_run_intro="""\
## Your function on this run

Step 03's head scores of the run's model, allocated by your function and by the library at each budget. The
table compares the totals and counts the KV heads whose caps differ; the figure shows both allocations at the
first budget, layers as rows and KV heads as columns.
""",
    needs=("03_head_scoring",),
    runtime="a second",
    open_questions=(
        "In the run's table, is the total of the caps exactly b x L x H_kv? By how much can rounding move it, "
        "and in which direction did it move here?",
        "In the figure, how many KV heads get only the floor m? Which layers hold the heads with the largest caps, "
        "and do they match step 03's strongest heads?",
        "Hand case 2 of the check is a GQA model: what would averaging (instead of summing) the scores of a group do "
        "to the total budget?",
    ),
)

SNAPKV_SELECTION = Exercise(
    key="snapkv_selection",
    source="04_allocation",
    title="SnapKV's selection: which prompt tokens a head keeps",
    minutes=(30, 45),
    build=(
        "`snapkv_select(query, key, caps, window, kernel_size)`: the prompt positions every KV head keeps at "
        "prefill, the token-selection rule of docs/method.md §5 (`snapkv_scores` + `topk_positions`)."
    ),
    background=("## From scores to budgets (docs/method.md §5)", "## The run's prompts"),
    task="""\
## Your task

Write `snapkv_select(query, key, caps, window, kernel_size=5)` returning H_kv sorted lists of positions:

- `query`: `(1, H, n, d)`, `key`: `(1, H_kv, n, d)`, float32 torch tensors, the prefill's states **after**
  RoPE; query head h reads KV head `h // (H / H_kv)`;
- `caps`: H_kv ints, the tokens each KV head selects (the window is kept on top);
- `window` w, `kernel_size` the (odd) pooling width.

The rule (docs/method.md §5, "Token selection inside a head"):

1. `A = softmax(Q[-w:] K^T / sqrt(d))` for every query head, in float32, with a **causal mask inside the
   window** (window query i, at position n - w + i, sees keys 0 .. n - w + i only);
2. average A over the w window queries and keep the key columns `0 .. n - w - 1`;
3. GQA: average over the query heads of each KV group;
4. smooth each KV head's scores with `avg_pool1d(kernel_size, stride 1, padding kernel_size // 2)`
   (the zero padding counts: `torch.nn.functional.avg_pool1d`);
5. keep the top-`cap` positions, then append the window `n - w .. n - 1`; a head with `cap >= n - w`
   keeps all n positions.

**Worked example.** One head, d = 1, n = 6, w = 2, keys `ln [1, 2, 1, 4, 1, 1]`, window queries 1 and 2:
query 4 weighs `[1, 2, 1, 4, 1] / 9`, query 5 `[1, 4, 1, 16, 1, 1] / 24`; their mean on keys 0..3 is
`[11, 28, 11, 80] / 144`, pooled (kernel 5) `[50, 130, 130, 119] / 720`: cap 2 keeps `[1, 2, 4, 5]`.
""",
    function="snapkv_select",
    stub='''\
import math

import torch
import torch.nn.functional as F


def snapkv_select(query, key, caps, window, kernel_size=5):
    """Prompt positions each KV head keeps (docs/method.md §5): window attention (causal inside the
    window), mean over window queries and over each KV group, avg-pooled, top-cap + the window.
    query (1, H, n, d), key (1, H_kv, n, d); returns H_kv sorted lists of ints."""
    _, heads, n, d = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    # YOUR CODE HERE
    raise NotImplementedError("snapkv_select: write the rule, then run the check below")
''',
    config_class="SnapKVRunConfig",
    parameters=(("doc_index", 0), ("budget", 16), ("window", 8), ("kernel_size", 5), ("ratio", 0.1)),
    on_run="snapkv_selection_on_run",
    on_run_intro="""\
## Your function on this run

The OCR prompt of one of the run's documents goes through the model once; every layer's post-RoPE queries and
keys are recorded, and each layer's KV heads select with SparseMM's caps at `budget` (from step 03's scores),
by your function and by the library. The figure shows every head's kept positions (green: both, blue: the
library only, red: yours only); the black line marks the start of the window.
""",
    needs=("01_ocr_annotation", "03_head_scoring"),
    runtime="a few seconds on the tiny model (one prefill)",
    open_questions=(
        "In the figure, where in the prompt do the kept positions cluster (system prompt, image tokens, the "
        "instruction)? Do heads with large caps keep a contiguous block or scattered tokens?",
        "Hand case 1 of the check: pooling changed which keys were kept. Why would smoothing help a head keep "
        "whole words or image patches rather than single tokens?",
        "The run's table marks near-ties: how many heads had one, and could a different float precision "
        "(bfloat16 on a GPU) change what they keep?",
    ),
)

ANLS = Exercise(
    key="anls",
    source="05_eval",
    title="ANLS, the DocVQA metric, as lmms-eval computes it",
    minutes=(15, 25),
    build=(
        "`anls(prediction, answers)`: the score of one question under ANLS (docs/method.md §6, `metrics.anls`), the "
        "metric of the paper's DocVQA numbers."
    ),
    background=("## 1. The benchmarks",),
    task="""\
## Your task

Write `anls(prediction, answers)` returning a float in [0, 1]:

1. normalise both strings: `" ".join(s.strip().lower().split())`;
2. for every ground truth g: `NL = levenshtein(norm(g), norm(prediction)) / max(len(g), len(prediction))`,
   with the lengths of the **raw** strings (as lmms-eval does), and `NL = 0` when that length is 0;
3. `q = 1 - min` over the answers of NL; `q = 0` when `q < 0.5` (exactly 0.5 is kept).

Write the Levenshtein distance yourself (insertions, deletions and substitutions cost 1), or import
`sparsemm_utils.metrics.levenshtein` if you want to focus on the rest.

**Worked example.** `anls("abcd", ["abce"])`: one substitution in 4 characters, NL = 0.25, q = 0.75.
`anls("abd", ["  abc  "])`: the normalised strings differ by 1, but the raw ground truth has 7 characters:
q = 1 - 1/7.
""",
    function="anls",
    stub='''\
def anls(prediction, answers):
    """ANLS of one question (docs/method.md §6): normalised Levenshtein over the raw lengths, the best
    answer, set to 0 below 0.5."""
    # YOUR CODE HERE
    raise NotImplementedError("anls: write the metric, then run the check below")
''',
    config_class="AnlsRunConfig",
    parameters=(("max_predictions", None),),
    on_run="anls_on_run",
    on_run_intro="""\
## Your function on this run

Step 05 scored every answer of the run's sweep; each prediction scored with ANLS is scored again by your
function. The table lists them; the figure redraws the accuracy-against-budget curves with your metric
(circles) over step 05's (lines).
""",
    needs=("05_eval",),
    runtime="a second",
    open_questions=(
        "In the run's table, how many predictions score exactly 0, and how many of those are near-misses that "
        "the 0.5 threshold cut off (look at their Levenshtein distance to the answer)?",
        "Hand case 7 of the check divides by the length of the raw strings. Could the model gain ANLS by padding "
        "its answers with spaces? Find the largest gain on one of the run's answers.",
        "In the figure, which method's curve falls first as the budget shrinks, and is the ordering the paper's "
        "(SparseMM above AdaKV, SnapKV and PyramidKV)?",
    ),
)

#: The exercises, in course order.
EXERCISES: tuple[Exercise, ...] = (MAP_BOX, HIT_RULE, ALLOCATION, SNAPKV_SELECTION, ANLS)


def exercise(key: str) -> Exercise:
    """The exercise named ``key`` (KeyError listing the known keys otherwise)."""
    for ex in EXERCISES:
        if ex.key == key:
            return ex
    raise KeyError(f"no exercise {key!r}; known: {[e.key for e in EXERCISES]}")
