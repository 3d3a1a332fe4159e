"""sparsemm_utils: the tested library behind the SparseMM reproduction notebooks.

One module per stage of the study (see docs/design.md):

- ``runs``             run folders, step folders, the missing-upstream error
- ``pipeline``         the registry of steps and their papermill execution
- ``models``           loading supported MLLMs (Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT)
- ``random_models``    tiny random-weight models of the same classes, built offline
- ``tiny_reader``      step 00: the tiny reader, a small Qwen2-VL trained here to read the documents
- ``steps``            one module per notebook: its config, outputs (typed artifacts) and findings
- ``page_generator``   synthetic OCR pages (config, fonts, layout, drawing)
- ``document_dataset`` the step-01 dataset: schema, save/load, validation, statistics
- ``synthdog``         the original data (``nnethercott/synthdog-en-detection``) in that schema
- ``patch_mapping``    OCR boxes -> visual-token positions (the rule of step 02)
"""

__version__ = "0.1.0"
