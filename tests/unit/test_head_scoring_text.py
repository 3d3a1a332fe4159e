"""The generated text step 03 reports (``scoring_report.json``'s ``per_sample[].text``) on a
SentencePiece-style tokenizer, whose word pieces carry the "▁" boundary marker (LLaVA-NeXT's Llama
and Mistral tokenizers): decoded as a whole it keeps its spaces, where the per-token pieces joined
would lose them (docs/deviations.md, "The scoring report's text")."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sparsemm_utils.head_scoring_rule import GeneratedTokens, generated_tokens
from sparsemm_utils.steps import head_scoring as step03

VOCAB = {"<unk>": 0, "</s>": 1, "\u2581Total": 2, "\u2581due": 3, ":": 4, "\u258112": 5, ".50": 6}


@pytest.fixture(scope="module")
def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Llama's Metaspace pre-tokenizer and decoder: "▁" marks a word start."""
    backend = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def test_the_text_keeps_the_spaces_the_pieces_lose(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    ids = [2, 3, 4, 5, 6, 1]  # "Total due: 12.50" then end-of-sequence
    tokens = generated_tokens(tok, ids, "llava_next", stop_ids=[1])
    # each lone "▁word" piece decodes without its space: joined, the words run together
    assert "".join(p for p, s in zip(tokens.pieces, tokens.stop) if not s) == "Totaldue:12.50"
    assert tokens.text == "Total due: 12.50" == tok.decode(ids[:-1])
    # the rule's token strings are untouched: LLaVA's keep the marker (the original's tau_t)
    assert tokens.texts[:2] == ("\u2581Total", "\u2581due")


def test_the_scoring_report_shows_the_decoded_text(sentencepiece_tokenizer):
    tokens = generated_tokens(sentencepiece_tokenizer, [2, 3, 4, 5, 6, 1], "llava_next", stop_ids=[1])
    sample = SimpleNamespace(doc_id=3, tokens=tokens, stopped_at_eos=True, prompt_len=40, seconds=0.5)
    loaded = SimpleNamespace(model_type="llava_next", num_layers=2, num_heads=4, num_kv_heads=2)
    report = step03.build_report(step03.Config(max_new_tokens=8), loaded, [sample])
    assert report["per_sample"][0]["text"] == "Total due: 12.50"


def test_tokens_given_by_their_strings_join_them():
    assert GeneratedTokens.from_texts(["A", "B", " C", "</s>"], stop=[0, 0, 0, 1]).text == "AB C"
