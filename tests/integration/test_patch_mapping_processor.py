"""Step 02 against the real processors (tiny tokenizers, real image-processor geometry).

docs/method.md §3: "Every mapping must agree with the processor's own count of image tokens for the
same image." Only the processors are needed (no model forward), so these run in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sparsemm_utils import patch_mapping as pm
from sparsemm_utils import prompts
from sparsemm_utils.random_models import build_tiny_processor
from sparsemm_utils.steps.patch_mapping import REGIONS, Config, write_outputs

pytestmark = pytest.mark.slow

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "llava_next", "qwen3_vl", "llava_onevision", "internvl")
#: 1000 x 700 image, worked by hand in the unit tests (tests/unit/test_patch_mapping.py):
#: Qwen 25 x 36 = 900; LLaVA-NeXT 576 + 34 * 49 = 2242; Qwen3-VL 22 x 31 = 682 (32 px tokens);
#: LLaVA-OneVision 729 + 54 * 78 = 4941 (2 x 3 crops of 27, unpadded to 54 x 77); InternVL 3 x 2 tiles
#: + thumbnail = 7 * 256 = 1792.
HAND_COUNTS = {"qwen2_vl": 900, "qwen2_5_vl": 900, "llava_next": 2242, "qwen3_vl": 682, "llava_onevision": 4941, "internvl": 1792}


@pytest.fixture(scope="module")
def processors():
    return {mt: build_tiny_processor(mt) for mt in MODEL_TYPES}


def _span(processor, model_type: str, width: int, height: int) -> tuple[int, int, np.ndarray]:
    inputs = prompts.build_inputs(processor, Image.new("RGB", (width, height), "white"), prompts.OCR_PROMPT, model_type)
    ids = inputs["input_ids"][0].numpy()
    start, length = prompts.image_token_span(ids, processor.image_token_id)
    return start, length, ids


def test_geometry_from_the_tiny_processors(processors):
    assert pm.geometry_from_processor(processors["qwen2_vl"], "qwen2_vl") == pm.QwenVLGeometry(
        14, 2, 32 * 28 * 28, 16384 * 28 * 28
    )
    assert pm.geometry_from_processor(processors["qwen2_5_vl"], "qwen2_5_vl") == pm.QwenVLGeometry()
    assert pm.geometry_from_processor(processors["llava_next"], "llava_next") == pm.LlavaNextGeometry()
    assert pm.geometry_from_processor(processors["qwen3_vl"], "qwen3_vl") == pm.QwenVLGeometry(
        16, 2, 32 * 32 * 32, 16384 * 32 * 32
    )
    assert pm.geometry_from_processor(processors["llava_onevision"], "llava_onevision") == pm.LlavaOnevisionGeometry()
    assert pm.geometry_from_processor(processors["internvl"], "internvl") == pm.InternVLGeometry()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    model_type=st.sampled_from(("qwen3_vl", "llava_onevision", "internvl")),
    width=st.integers(1, 3000),
    height=st.integers(1, 3000),
)
def test_token_count_agrees_with_processor_up_to_large_images(processors, model_type, width, height):
    # large sides reach OneVision's anyres-max shrink (more than 9 crops' worth) and InternVL's 12 tiles;
    # tiny sides hit Qwen3-VL's min_pixels and extreme aspect ratios
    if max(width, height) / min(width, height) > 200:
        return  # Qwen's smart_resize refuses aspect ratios above 200 (tested in the unit tests)
    processor = processors[model_type]
    mapper = pm.mapper_from_processor(processor, model_type)
    _, length, _ = _span(processor, model_type, width, height)
    assert mapper.num_tokens(width, height) == length


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_hand_example_image_count_matches_processor(processors, model_type):
    _, length, _ = _span(processors[model_type], model_type, 1000, 700)
    assert length == HAND_COUNTS[model_type]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    model_type=st.sampled_from(MODEL_TYPES),
    width=st.integers(28, 1200),
    height=st.integers(28, 1200),
    data=st.data(),
)
def test_mapping_agrees_with_processor_over_sizes(processors, model_type, width, height, data):
    processor = processors[model_type]
    mapper = pm.mapper_from_processor(processor, model_type)
    start, length, ids = _span(processor, model_type, width, height)
    assert mapper.num_tokens(width, height) == length
    # an in-image box maps to >= 1 token, all inside the image span, none on a text token
    x0 = data.draw(st.floats(0, width))
    x1 = data.draw(st.floats(x0, width))
    y0 = data.draw(st.floats(0, height))
    y1 = data.draw(st.floats(y0, height))
    positions = mapper.map_box((x0, y0, x1, y1), width=width, height=height)
    assert positions.size >= 1
    absolute = start + positions
    assert absolute.min() >= start and absolute.max() < start + length
    assert np.all(ids[absolute] == processor.image_token_id)
    if model_type in ("llava_next", "llava_onevision"):
        assert not np.isin(positions, mapper.newline_positions(width, height)).any()
        assert positions.min() >= mapper.geometry.base_tokens


def test_map_documents_end_to_end(processors, tmp_path):
    docs = [
        {
            "doc_id": f"d{i}",
            "image": Image.new("RGB", size, "white"),
            "2_coord": [{"chunk": "AB CD", "coord": [[10.0, 10.0], [90.0, 30.0]]}],
            "char_coord": [
                {"char": "A", "coord": [[10.0, 10.0], [20.0, 30.0]], "chunk_index": 0},
                {"char": "Z", "coord": [[5000.0, 10.0], [5010.0, 30.0]], "chunk_index": 0},
            ],
        }
        for i, size in enumerate([(400, 300), (300, 500)])
    ]
    for model_type in MODEL_TYPES:
        processor = processors[model_type]
        records = pm.map_documents(docs, processor, model_type)
        assert [r["doc_id"] for r in records] == ["d0", "d1"]
        for record, doc in zip(records, docs):
            start, length, _ = _span(processor, model_type, *doc["image"].size)
            assert record["image_token_start"] == start and record["num_image_tokens"] == length
            assert record["chunks"][0]["positions"] and record["chars"][0]["positions"]
            assert set(record["chars"][0]["positions"]) <= set(record["chunks"][0]["positions"])
            assert record["chars"][1]["positions"] == [] and record["skipped"][0]["kind"] == "char"
        run_dir = tmp_path / model_type
        found = write_outputs(Config(run_dir=str(run_dir)), records, pm.mapper_from_processor(processor, model_type))
        assert REGIONS.read(run_dir) == records
        assert found[0].holds is True and found[0].n == len(docs)  # every document agrees with its processor


def test_map_documents_rejects_a_mapper_that_disagrees_with_the_processor(processors):
    docs = [{"doc_id": "d0", "image": Image.new("RGB", (1000, 700)), "2_coord": [], "char_coord": []}]
    small = pm.QwenVLPatchMapper(pm.QwenVLGeometry(min_pixels=56 * 56, max_pixels=100 * 28 * 28))
    with pytest.raises(pm.TokenCountMismatchError, match="expects 88 image tokens.*emitted 900"):
        pm.map_documents(docs, processors["qwen2_vl"], "qwen2_vl", small)
    with pytest.raises(pm.PatchMappingError, match="cannot map 'llava_next'"):
        pm.map_documents(docs, processors["llava_next"], "llava_next", small)


def test_compare_with_processors_reports_agreement(processors):
    rows = pm.compare_with_processors(Image.new("RGB", (1000, 700)), processors)
    assert [r["model_type"] for r in rows] == list(MODEL_TYPES)
    assert [r["mapping_tokens"] for r in rows] == [HAND_COUNTS[t] for t in MODEL_TYPES]
    assert all(r["agree"] and r["processor_tokens"] == r["mapping_tokens"] for r in rows)
    assert rows[2]["grid_h"] == 34 and rows[2]["grid_w"] == 48

