"""Text-copy heads (sparsemm_utils.text_heads) on models of the real classes: the tiny random
Qwen2-VL and LLaVA-NeXT and the tiny reader. Shapes, alignment on the real chat templates and
tokenizers, reproducibility, the query row (the visual capture's last-prompt-position row), and
step 03's outputs. A random model's scores are whatever they are: nothing is claimed about them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsemm_utils import attention_capture as ac
from sparsemm_utils import text_heads as th
from sparsemm_utils.head_scoring_capture import capture_documents, score_captures
from sparsemm_utils.head_scoring_files import load_head_scores
from sparsemm_utils.models import load_model, text_attention_implementation
from sparsemm_utils.page_generator import DocumentGeneratorConfig, generate_documents
from sparsemm_utils.patch_mapping import map_documents
from sparsemm_utils.steps import head_scoring as step03

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

MODELS = ("tiny-random/qwen2_vl", "tiny-random/llava_next", "data/tiny_reader")


@pytest.fixture(scope="module")
def models():
    return {name: load_model(name) for name in MODELS}


@pytest.fixture(scope="module")
def documents():
    config = DocumentGeneratorConfig(
        n_documents=3, seed=4, page_width_range=(224, 280), page_height_range=(112, 168), lines_per_page_range=(2, 3)
    )
    return generate_documents(config, progress=False)


@pytest.mark.parametrize("name", MODELS)
def test_shapes_alignment_and_reproducibility(models, documents, name):
    loaded = models[name]
    result = th.score_copy_documents(loaded, documents, 2, progress=False)
    assert result.sample_scores.shape == (2, loaded.num_layers, loaded.num_heads)
    assert result.doc_ids == [documents[0]["doc_id"], documents[1]["doc_id"]]
    for sample in result.samples:
        chat = sample.chat
        ids = chat.input_ids
        # the answer is the text again: a character-level vocabulary gives one token per character
        # in both copies, and every scored token points at the one source token of its id
        assert chat.answer_positions.size == chat.source_positions.size == len(chat.text)
        assert ids[chat.answer_positions].tolist() == ids[chat.source_positions].tolist()
        scored = chat.targets >= 0
        assert np.isin(chat.targets[scored], chat.source_positions).all()
        assert (ids[chat.targets[scored]] == ids[chat.answer_positions[scored]]).all()
        for t in np.flatnonzero(~scored):
            assert chat.reasons[t] == th.DUPLICATE
            assert (ids[chat.source_positions] == ids[chat.answer_positions[t]]).sum() > 1
        assert sample.argmax.shape == (chat.targets.size, loaded.num_layers, loaded.num_heads)
        assert (sample.argmax <= chat.query_positions[:, None, None]).all()  # causal: never a later key
        np.testing.assert_array_equal(sample.scores, sample.hits.sum(axis=0))
    again = th.score_copy_documents(loaded, documents, 2, progress=False)
    np.testing.assert_array_equal(again.sample_scores, result.sample_scores)
    assert text_attention_implementation(loaded.model) == "sdpa"  # eager only inside the pass


@pytest.mark.parametrize("name", ["tiny-random/qwen2_vl", "tiny-random/llava_next"])
def test_the_query_row_is_the_visual_captures_last_prompt_row(models, documents, name):
    """The row teacher forcing reads for answer token t is the row the visual rule reads for a
    generated token: the last query of a prompt that ends just before t (the streamed capture of
    step 03, sdpa, attending to every earlier position)."""
    loaded = models[name]
    text = th.page_text(documents[0])
    chat = th.build_copy_chat(loaded, text, doc_id=0)
    argmax = th.copy_argmax(loaded, chat)
    for t in (0, len(chat.answer_positions) // 2, len(chat.answer_positions) - 1):
        prefix = torch.as_tensor(chat.input_ids[: chat.answer_positions[t]])[None]
        inputs = {"input_ids": prefix, "attention_mask": torch.ones_like(prefix)}
        _, captured = ac.generate_with_rows(loaded, inputs, max_new_tokens=1, spec=ac.CaptureSpec(top_k=1))
        assert captured.key_lengths[0] == chat.answer_positions[t]  # keys 0 .. the query row itself
        np.testing.assert_array_equal(captured.argmax[0], argmax[t])


def test_the_chat_follows_the_templates(models):
    qwen = th.build_copy_chat(models["tiny-random/qwen2_vl"], "AB C\nDA", doc_id=1)
    tokens = models["tiny-random/qwen2_vl"].tokenizer.decode(qwen.input_ids.tolist())
    assert tokens.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nAB C\nDA")
    assert "Copy the text above exactly.<|im_end|>\n<|im_start|>assistant\nAB C\nDA<|im_end|>" in tokens
    # A occurs twice in the source: skipped both times; B, the space, C, the newline and D once
    assert qwen.reasons == (th.DUPLICATE, th.SCORED, th.SCORED, th.SCORED, th.SCORED, th.SCORED, th.DUPLICATE)
    assert qwen.targets[1:6].tolist() == qwen.source_positions[1:6].tolist()
    llava = th.build_copy_chat(models["tiny-random/llava_next"], "XY", doc_id=2)
    text = models["tiny-random/llava_next"].tokenizer.decode(llava.input_ids.tolist())
    assert "USER: XY\n\nCopy the text above exactly. ASSISTANT: XY" in text
    with pytest.raises(th.TextHeadsError, match="non-empty"):
        th.build_copy_chat(models["tiny-random/llava_next"], "  ")


def test_step03_writes_and_judges_the_text_scores(models, documents, tmp_path):
    loaded = models["tiny-random/qwen2_vl"]
    regions = map_documents(documents, loaded.processor, "qwen2_vl")
    cfg = step03.Config(run_dir=str(tmp_path), max_new_tokens=3, n_samples=2, explorer_samples=0, text_samples=2)
    samples = capture_documents(loaded, documents, regions, cfg, progress=False)
    result = score_captures(samples)
    text = th.score_copy_documents(loaded, documents, cfg.text_samples, progress=False)
    paths = step03.write_outputs(cfg, result, step03.build_report(cfg, loaded, samples), samples=samples, text=text)
    scores = load_head_scores(paths["text_head_scores.json"], shape=loaded)
    np.testing.assert_allclose(scores, text.scores)
    found = step03.FINDINGS.read(tmp_path)
    assert len(found) == 7
    assert found["holds"].tolist()[4:] == [None, None, None]  # random weights: cannot tell
    assert all("random weights" in line for line in found["this_run"].tolist()[4:])
