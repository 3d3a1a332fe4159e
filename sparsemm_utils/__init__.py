"""sparsemm_utils: the tested library behind the SparseMM reproduction notebooks.

One module per stage of the study (see docs/design.md):

- ``runs``           run folders, step folders, the missing-upstream error
- ``pipeline``       the registry of steps and their papermill execution
- ``models``         loading supported MLLMs (Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT)
- ``random_models``  tiny random-weight models of the same classes, built offline
- ``tiny_reader``    step 00: the tiny reader, a small Qwen2-VL trained here to read the documents
- ``documents``      step 01: synthetic OCR documents and the SynthDoG adapter
- ``patch_mapping``  step 02: OCR boxes -> visual-token positions
"""

__version__ = "0.1.0"
