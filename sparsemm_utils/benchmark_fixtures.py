"""Small local stand-ins for step 05's hub benchmarks, in exactly their hub layout and schema.

The hub is unreachable here (docs/design.md, "The offline world"), so every loader of
:mod:`sparsemm_utils.benchmarks` is tested on ``data/fixtures/<benchmark>/``: a folder laid out
like a download of the hub dataset (``README.md`` whose YAML header carries ``dataset_info`` and
``configs`` with the hub's data-file paths, and the parquet shards under those paths), holding a
few rows with the hub's features in the hub's column order (:data:`HUB_FEATURES`, read from the
dataset cards; see :mod:`sparsemm_utils.benchmarks` for the sources). ``datasets.load_dataset(<folder>,
name=<config>, split=<split>)`` reads a fixture as it reads the real download.

The rows are NOT real data: short questions about small images with the answer drawn on them
(Pillow's default font), plus, in every fixture, rows the loader must skip and count: one
without an image and one without answers (DocVQA also has one whose image bytes are not an
image; GQA's image-less row names an ``imageId`` that its images config lacks).

Known simplifications: TextCaps' features are the TextCaps 0.1 annotation fields grouped per
image (``caption_str`` a list, which is how lmms-eval reads it); they could not be checked against
the hub card here. GQA's nested ``annotations`` and ``semantic`` columns are left out (their
exact hub types could not be checked; nothing reads them).

Rebuild: ``python -c "from sparsemm_utils.benchmark_fixtures import build_all_fixtures as b; b()"``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw, ImageFont

import datasets
from datasets import Features, List, Value

from .benchmarks import BENCHMARKS, get_benchmark
from .runs import repo_root

__all__ = ["FIXTURES_DIR", "HUB_FEATURES", "fixture_dir", "fixture_rows", "build_fixture", "build_all_fixtures"]

FIXTURES_DIR: Path = repo_root() / "data" / "fixtures"

_S = Value("string")
#: The hub datasets' features, in the hub's column order: {benchmark: {config: Features}}
#: (config ``None`` = the hub's ``default`` config).
HUB_FEATURES: Mapping[str, Mapping[str | None, Features]] = {
    "docvqa": {
        "DocVQA": Features(
            {
                "questionId": _S, "question": _S, "question_types": List(_S), "image": datasets.Image(),
                "docId": Value("int64"), "ucsf_document_id": _S, "ucsf_document_page_no": _S,
                "answers": List(_S), "data_split": _S,
            }
        )
    },
    "textvqa": {
        None: Features(
            {
                "image_id": _S, "question_id": Value("int32"), "question": _S, "question_tokens": List(_S),
                "image": datasets.Image(), "image_width": Value("int32"), "image_height": Value("int32"),
                "flickr_original_url": _S, "flickr_300k_url": _S, "answers": List(_S), "image_classes": List(_S),
                "set_name": _S, "ocr_tokens": List(_S),
            }
        )
    },
    "ocrbench": {
        None: Features(
            {"dataset": _S, "question": _S, "question_type": _S, "answer": List(_S), "image": datasets.Image()}
        )
    },
    "chartqa": {None: Features({"type": _S, "question": _S, "answer": _S, "image": datasets.Image()})},
    "mmbench": {
        "en": Features(
            {
                "index": Value("int64"), "question": _S, "hint": _S, "answer": _S, "A": _S, "B": _S, "C": _S,
                "D": _S, "category": _S, "image": datasets.Image(), "source": _S, "L2-category": _S,
                "comment": _S, "split": _S,
            }
        )
    },
    "gqa": {
        "testdev_balanced_instructions": Features(
            {
                "id": _S, "imageId": _S, "question": _S, "answer": _S, "fullAnswer": _S,
                "isBalanced": Value("bool"), "groups": {"global": _S, "local": _S}, "entailed": List(_S),
                "equivalent": List(_S), "types": {"structural": _S, "semantic": _S, "detailed": _S},
                "semanticStr": _S,
            }
        ),
        "testdev_balanced_images": Features({"id": _S, "image": datasets.Image()}),
    },
    "vqav2": {
        None: Features(
            {
                "question_type": _S, "multiple_choice_answer": _S,
                "answers": List({"answer": _S, "answer_confidence": _S, "answer_id": Value("int64")}),
                "image_id": Value("int64"), "answer_type": _S, "question_id": Value("int64"), "question": _S,
                "image": datasets.Image(),
            }
        )
    },
    "textcaps": {
        None: Features(
            {
                "question_id": _S, "question": _S, "image": datasets.Image(), "image_id": _S,
                "image_classes": List(_S), "flickr_original_url": _S, "flickr_300k_url": _S,
                "image_width": Value("int64"), "image_height": Value("int64"), "set_name": _S, "image_name": _S,
                "image_path": _S, "caption_id": List(Value("int64")), "caption_str": List(_S),
                "caption_tokens": List(List(_S)), "reference_strs": List(_S), "reference_tokens": List(List(_S)),
            }
        )
    },
}  # fmt: skip


def fixture_dir(name: str) -> Path:
    """``data/fixtures/<benchmark>``."""
    return FIXTURES_DIR / get_benchmark(name).name


# --------------------------------------------------------------------------------------------
# images


def _png(lines: Sequence[str], size: tuple[int, int] = (200, 96), background: str = "white") -> dict[str, Any]:
    """A small PNG with ``lines`` of text drawn top-left, as a datasets.Image cell."""
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    for i, line in enumerate(lines):
        draw.text((8, 8 + 20 * i), line, fill="black", font=font)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return {"bytes": buf.getvalue(), "path": None}


_NOT_AN_IMAGE = {"bytes": b"this is not an image file", "path": None}


# --------------------------------------------------------------------------------------------
# rows, per benchmark and config


def _docvqa() -> dict[str | None, list[dict[str, Any]]]:
    def row(qid: str, question: str, answers: list[str], image: Any, doc: int) -> dict[str, Any]:
        return {
            "questionId": qid, "question": question, "question_types": ["form"], "image": image, "docId": doc,
            "ucsf_document_id": f"fx{doc:04d}", "ucsf_document_page_no": "1", "answers": answers,
            "data_split": "val",
        }  # fmt: skip

    memo = _png(["MEMO  No. 4711", "To: R. J. Smith", "Date: May 3, 1998"])
    invoice = _png(["INVOICE", "Total: $1,250.00", "Due: 06/30/99"])
    return {
        "DocVQA": [
            row("57344", "What is the memo number?", ["4711", "No. 4711"], memo, 1),
            row("57345", "To whom is the memo addressed?", ["R. J. Smith"], memo, 1),
            row("57346", "What is the total?", ["$1,250.00", "1,250.00"], invoice, 2),
            row("57347", "What is the due date?", [], invoice, 2),  # no answers: skipped
            row("57348", "What is the title?", ["INVOICE"], None, 3),  # no image: skipped
            row("57349", "Who signed it?", ["nobody"], _NOT_AN_IMAGE, 4),  # unreadable: skipped
        ]
    }


def _textvqa() -> dict[str | None, list[dict[str, Any]]]:
    def row(qid: int, question: str, answers: list[str], image: Any, image_id: str) -> dict[str, Any]:
        return {
            "image_id": image_id, "question_id": qid, "question": question,
            "question_tokens": question.rstrip("?").split(), "image": image, "image_width": 200,
            "image_height": 96, "flickr_original_url": "", "flickr_300k_url": "", "answers": answers,
            "image_classes": ["Signage"], "set_name": "val", "ocr_tokens": ["STOP", "SALE"],
        }  # fmt: skip

    sign = _png(["STOP", "SALE 50%"], background="lightyellow")
    stop = ["stop"] * 8 + ["stop sign", "Stop"]
    return {
        None: [
            row(34602, "what does the red sign say?", stop, sign, "fx0001"),
            row(34603, "What does 'SALE' mean here, 'SALE' or 'OFF'?", ["sale"] * 10, sign, "fx0001"),
            row(34604, "how much is the discount?", ["50%"] * 7 + ["50"] * 3, sign, "fx0001"),
            row(34605, "what brand is this?", [], sign, "fx0001"),  # no answers
            row(34606, "what time is it?", ["3:15"] * 10, None, "fx0002"),  # no image
        ]
    }


def _ocrbench() -> dict[str | None, list[dict[str, Any]]]:
    def row(dataset: str, question: str, qtype: str, answer: list[str], image: Any) -> dict[str, Any]:
        return {"dataset": dataset, "question": question, "question_type": qtype, "answer": answer, "image": image}

    return {
        None: [
            row("IIIT5K", "what is written in the image?", "Regular Text Recognition", ["CENTRAL"], _png(["CENTRAL"])),
            row(
                "HME100k",
                "Please write out the expression of the formula in the image using LaTeX format. ",
                "Handwritten Mathematical Expression Recognition",
                ["x ^ { 2 } + 1"],
                _png(["x^2 + 1"]),
            ),
            row("docVQA", " What is the date? ", "Doc-oriented VQA", ["May 3, 1998", "05/03/1998"], _png(["Date: May 3, 1998"])),
            row("FUNSD", "What is the name?", "Key Information Extraction", [], _png(["Name: A. Lee"])),  # no answers
            row("IC13_857", "what is written in the image?", "Irregular Text Recognition", ["OPEN"], None),  # no image
        ]
    }


def _chartqa() -> dict[str | None, list[dict[str, Any]]]:
    def row(kind: str, question: str, answer: str | None, image: Any) -> dict[str, Any]:
        return {"type": kind, "question": question, "answer": answer, "image": image}

    chart = _png(["Sales 2019: 42", "Sales 2020: 57", "Share: 12%"])
    return {
        None: [
            row("human_test", "What were the sales in 2019?", "42", chart),
            row("augmented_test", "What is the share?", "12%", chart),
            row("human_test", "Which year had higher sales?", "2020", chart),
            row("augmented_test", "What is the average?", None, chart),  # no answers
            row("human_test", "What is the title?", "Sales", None),  # no image
        ]
    }


def _mmbench() -> dict[str | None, list[dict[str, Any]]]:
    def row(index: int, question: str, hint: str | None, answer: str | None, options: Sequence[str | None], image: Any) -> dict[str, Any]:
        a, b, c, d = options
        return {
            "index": index, "question": question, "hint": hint, "answer": answer, "A": a, "B": b, "C": c, "D": d,
            "category": "ocr", "image": image, "source": "fixture", "L2-category": "fine-grained perception",
            "comment": None, "split": "dev",
        }  # fmt: skip

    return {
        "en": [
            row(0, "Which word is written in the image?", None, "B", ("CAT", "DOG", "BIRD", "FISH"), _png(["DOG"])),
            row(1, "What colour is the text?", "The background is white.", "A", ("black", "red", None, None), _png(["ink"])),
            row(2, "Which number is shown?", "nan", "C", ("1", "2", "3", "nan"), _png(["3"])),
            row(3, "Which letter is shown?", None, None, ("X", "Y", "Z", None), _png(["Y"])),  # no answers
            row(4, "Which shape is shown?", None, "A", ("circle", "square", None, None), None),  # no image
        ]
    }


def _gqa() -> dict[str | None, list[dict[str, Any]]]:
    def row(qid: str, image_id: str, question: str, answer: str | None, full: str) -> dict[str, Any]:
        return {
            "id": qid, "imageId": image_id, "question": question, "answer": answer, "fullAnswer": full,
            "isBalanced": True, "groups": {"global": None, "local": "10c-fixture"}, "entailed": [], "equivalent": [qid],
            "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"},
            "semanticStr": "select: text ->verify color: black",
        }  # fmt: skip

    return {
        "testdev_balanced_instructions": [
            row("20968379", "n161313", "Is the text black?", "yes", "Yes, the text is black."),
            row("20968380", "n161313", "What word is written?", "apple", "The word is apple."),
            row("20968381", "n235859", "Is there a number?", "no", "No, there is no number."),
            row("20968382", "n235859", "What color is the background?", None, "The background is white."),  # no answers
            row("20968383", "n999999", "Is it raining?", "no", "No, it is not raining."),  # imageId absent: no image
        ],
        "testdev_balanced_images": [
            {"id": "n161313", "image": _png(["apple"])},
            {"id": "n235859", "image": _png(["no digits here"])},
        ],
    }


def _vqav2() -> dict[str | None, list[dict[str, Any]]]:
    def answers(values: Sequence[str]) -> list[dict[str, Any]]:
        return [{"answer": v, "answer_confidence": "yes", "answer_id": i + 1} for i, v in enumerate(values)]

    def row(qid: int, question: str, values: Sequence[str] | None, image: Any, kind: str) -> dict[str, Any]:
        return {
            "question_type": "what is", "multiple_choice_answer": values[0] if values else "",
            "answers": None if values is None else answers(values), "image_id": qid // 1000, "answer_type": kind,
            "question_id": qid, "question": question, "image": image,
        }  # fmt: skip

    card = _png(["2 apples", "on a table"])
    return {
        None: [
            row(262148000, "How many apples are there?", ["2"] * 6 + ["two"] * 3 + ["3"], card, "number"),
            row(262148001, "Is this a table?", ["yes"] * 10, card, "yes/no"),
            row(262148002, "What fruit is this?", ["apples"] * 5 + ["apple"] * 4 + ["fruit"], card, "other"),
            row(262148003, "What color is the table?", None, card, "other"),  # no answers
            row(262148004, "Is it daytime?", ["yes"] * 10, None, "yes/no"),  # no image
        ]
    }


def _textcaps() -> dict[str | None, list[dict[str, Any]]]:
    def row(image_id: str, captions: Sequence[str] | None, image: Any) -> dict[str, Any]:
        captions = list(captions or [])
        return {
            "question_id": f"{image_id}_0", "question": "", "image": image, "image_id": image_id,
            "image_classes": ["Poster"], "flickr_original_url": "", "flickr_300k_url": "", "image_width": 200,
            "image_height": 96, "set_name": "val", "image_name": image_id, "image_path": f"train/{image_id}.jpg",
            "caption_id": list(range(len(captions))), "caption_str": captions,
            "caption_tokens": [c.lower().split() for c in captions], "reference_strs": captions,
            "reference_tokens": [c.lower().split() for c in captions],
        }  # fmt: skip

    return {
        None: [
            row("0a1b2c3d4e5f6a7b", ["A sign that says OPEN.", "a red open sign", "An OPEN sign in a window."], _png(["OPEN"])),
            row("1b2c3d4e5f6a7b8c", ["A bottle of Coca-Cola.", "a coke bottle", "The bottle's label reads Coca-Cola."],
                _png(["Coca-Cola"])),
            row("2c3d4e5f6a7b8c9d", ["A clock showing 12:30.", "an old clock", "The clock reads 12:30 pm."], _png(["12:30"])),
            row("3d4e5f6a7b8c9d0e", None, _png(["no captions"])),  # no answers
            row("4e5f6a7b8c9d0e1f", ["A book titled WAR."], None),  # no image
        ]
    }


_ROWS = {
    "docvqa": _docvqa,
    "textvqa": _textvqa,
    "ocrbench": _ocrbench,
    "chartqa": _chartqa,
    "mmbench": _mmbench,
    "gqa": _gqa,
    "vqav2": _vqav2,
    "textcaps": _textcaps,
}


def fixture_rows(name: str) -> dict[str | None, list[dict[str, Any]]]:
    """The fixture's rows of benchmark ``name``, per config (None = the default config)."""
    spec = get_benchmark(name)
    if spec.name not in _ROWS:
        raise ValueError(f"benchmark {spec.name!r} has no hub fixture (it is built locally); fixtures exist for {sorted(_ROWS)}")
    return _ROWS[spec.name]()


# --------------------------------------------------------------------------------------------
# writing


def _shard_path(pattern: str) -> str:
    """``"DocVQA/validation-*"`` -> ``"DocVQA/validation-00000-of-00001.parquet"``."""
    return pattern.replace("*", "00000-of-00001.parquet")


def _config_files(name: str) -> dict[str | None, tuple[str, str]]:
    """{config: (data-file pattern, split)} of a benchmark's fixture (its spec's hub paths)."""
    spec = get_benchmark(name)
    configs = [spec.config] if spec.images_config is None else [spec.config, spec.images_config]
    return {config: (pattern, spec.split) for config, pattern in zip(configs, spec.data_files, strict=True)}


def build_fixture(name: str, out_dir: str | Path | None = None) -> Path:
    """Write the fixture of benchmark ``name`` (default ``data/fixtures/<name>``) and return its folder."""
    spec = get_benchmark(name)
    out = Path(out_dir) if out_dir is not None else fixture_dir(spec.name)
    rows = fixture_rows(spec.name)
    features = HUB_FEATURES[spec.name]
    files = _config_files(spec.name)
    infos, configs = [], []
    for config, (pattern, split) in files.items():
        ds = datasets.Dataset.from_list(rows[config], features=features[config])
        target = out / _shard_path(pattern)
        target.parent.mkdir(parents=True, exist_ok=True)
        for old in target.parent.glob("*.parquet"):
            old.unlink()
        ds.to_parquet(str(target))
        info: dict[str, Any] = {"config_name": config or "default", "features": features[config]._to_yaml_list()}
        num_bytes = int(ds.data.nbytes)
        info["splits"] = [{"name": split, "num_bytes": num_bytes, "num_examples": len(ds)}]
        info["download_size"] = target.stat().st_size
        info["dataset_size"] = num_bytes
        infos.append(info)
        configs.append({"config_name": config or "default", "data_files": [{"split": split, "path": pattern}]})
    header = yaml.safe_dump({"dataset_info": infos, "configs": configs}, sort_keys=False, allow_unicode=True)
    body = (
        f"# Fixture in the schema of `{spec.hub_id}`\n\n"
        f"NOT real data: {sum(len(r) for r in rows.values())} synthetic rows written by "
        f"`sparsemm_utils.benchmark_fixtures` in the layout and schema of the hub dataset `{spec.hub_id}` "
        f"(lmms-eval task `{spec.task}`: config `{spec.config or 'default'}`, split `{spec.split}`, files "
        f"{', '.join(f'`{p}`' for p in spec.data_files)}). `sparsemm_utils.benchmarks.load_benchmark("
        f"'{spec.name}', source=<this folder>)` reads it exactly as it reads a download of the hub dataset. "
        f"Some rows lack an image or answers on purpose: the loader's tests check they are skipped and counted.\n\n"
        f"Rebuild: `python -c \"from sparsemm_utils.benchmark_fixtures import build_fixture as b; b('{spec.name}')\"`.\n"
    )
    (out / "README.md").write_text(f"---\n{header}---\n\n{body}", encoding="utf-8")
    return out


def build_all_fixtures(root: str | Path | None = None) -> list[Path]:
    """Write every benchmark fixture (under ``root``, default ``data/fixtures``)."""
    base = Path(root) if root is not None else FIXTURES_DIR
    return [build_fixture(name, base / name) for name in _ROWS if name in BENCHMARKS]
