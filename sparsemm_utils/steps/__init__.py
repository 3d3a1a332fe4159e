"""The study's steps, one module per notebook with the notebook's name (docs/design.md).

Each module declares ``STEP`` (a :class:`~sparsemm_utils.artifacts.StepSpec`: notebook, inputs,
outputs), its ``Config`` (the notebook's validated parameters), ``write_outputs`` and
``findings``. Mechanism modules never import this package.
"""
