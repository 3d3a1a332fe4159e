"""The tiny reader (notebook ``00_tiny_reader``): a small Qwen2-VL trained here, on CPU, to read the
synthetic documents.

No pretrained multimodal model can be downloaded in this project's world, and a random-weight
model has no visual heads (docs/design.md, "The offline world"). The default run therefore uses a
``Qwen2VLForConditionalGeneration`` of the real class and the real image geometry (14 px patches
merged 2 x 2, SparseMM's pixel bounds, docs/method.md §3) trained from scratch by this package to read
the grid documents of step 01 (:class:`~sparsemm_utils.reader_tasks.ReaderDocSpec`). The shipped
checkpoint lives in ``data/tiny_reader`` (``save_pretrained`` of model and processor, a model
card, the training logs) and loads with ``sparsemm_utils.models.load_model("data/tiny_reader")``.

Model (:class:`~.config.ReaderModelSpec`, :func:`~.model.build_reader`): text width 128, 4 layers, 8 query heads and 4 KV heads
(head_dim 16, M-RoPE sections [2, 3, 3]), MLP 512, ``rope_theta = 10``; vision tower depth 2,
width 64, 4 heads; the character-level tokenizer of :func:`~sparsemm_utils.random_models.build_char_tokenizer`.
``rope_theta = 10`` matters: with head_dim 16 and the usual 10^6 the width section's rotary
frequencies are ~10^-4 rad per token, so neighbouring columns are indistinguishable; at 10 they
are 0.13-0.24 rad (docs/tiny_reader.md).

Training (:class:`~.config.TrainConfig`, :func:`~.training.train_reader`), deterministic for a seed on CPU:

- data: every step renders fresh pages from the stream ``seed`` (document ``j`` of step ``s`` is
  ``render_document(cfg, s * batch_size + j)``); held-out pages come from other seeds
  (:data:`~sparsemm_utils.reader_tasks.HELDOUT_SEED` for the benchmark,
  :data:`~sparsemm_utils.reader_tasks.VALIDATION_SEED` for the monitor);
- tasks (:mod:`sparsemm_utils.reader_tasks`): ``ocr`` (the study's OCR prompt), ``line``
  ("Read line k."), ``value`` ("Value of KEY?"); one task per step (a batch then has similar
  lengths, so little padding), drawn with ``task_weights``; loss on the answer tokens only;
- curriculum (:mod:`.curriculum`): pages with ``easy_lines`` lines only for the first ``easy_until`` of the run, then
  the share of full pages ramps linearly to ``full_fraction`` at ``ramp_until``;
- auxiliary glyph loss: a linear head on the vision tower's merged output (the LLM's visual
  input embeddings) predicts the character drawn in each visual token (0 = none), weight
  ``aux_weight``;
- auxiliary position loss: a second linear head reads each visual token's hidden state after
  decoder layer ``position_layer`` and predicts its row and column in the merged grid, weight
  ``position_weight`` (:class:`~.model.AuxiliaryHeads` says why: a token that knows its row lets a
  question find a line by content);
- auxiliary pointer loss: a third linear head reads the hidden state after decoder layer
  ``pointer_layer`` at each answer step and predicts the row and column of the visual token the
  next answer character is drawn in, weight ``pointer_weight`` (the answer must stay on the line
  its key was found on); ``pointer_blanks`` extends it to the steps that emit a space, a line
  break or the end;
- auxiliary key pointer loss: a fourth linear head reads the hidden state after
  decoder layer ``key_layer`` at the prompt steps of a value question after the key and predicts
  the row and column of the key's last glyph, weight ``key_weight``. The heads are NOT part of
  the Qwen2-VL checkpoint: they are saved apart (``training/aux_head.safetensors``) and never
  used at inference;
- AdamW (betas 0.9/0.95, weight decay 0.05), linear warm-up then cosine decay to
  ``min_lr_ratio`` of the peak, gradient clipping 1.0, fp32 (bf16 autocast is slower on CPUs
  without native bf16);
- shared prefix: the tokens before the image (system prompt, ``<|vision_start|>``) are the same
  in every sequence, so they are run once per batch and their keys/values broadcast to the batch
  (exactly the same loss and gradients as running them per sequence, about a quarter less work).

Evaluation (:func:`~.accuracy.evaluate_reader`): greedy decoding with the full KV cache through the standard
path (:func:`sparsemm_utils.prompts.build_inputs`, ``model.generate``), batch 1; exact match and
character accuracy (``1 - sum of edit distances / sum of answer lengths``) per task.

A second stage (``init_from``) continues from a saved reader with a fresh optimizer (its model card
then lists every stage). The shipped reader is one run of the defaults of :class:`~.config.TrainConfig`
(its model card has the command, the training time and the measurements).

CLI (the shipped reader, every option spelled out though each is the default, then its measurement)::

    python -m sparsemm_utils.tiny_reader train --out data/tiny_reader --work-dir runs/tiny_reader_key/work \
        --no-resume --steps 6500 --lr 8e-4 --threads 2 --data-workers 0 --task-weights 0.28 0.2 0.52 \
        --position-weight 0.1 --position-start 0.1 --pointer-weight 0.6 --pointer-layer 3 \
        --pointer-start 0.1 --pointer-blanks --key-weight 0.3 --key-layer 2 --key-start 0.1 --eval-docs 200
    python -m sparsemm_utils.tiny_reader evaluate --model data/tiny_reader --docs 200
    python -m sparsemm_utils.tiny_reader card --model data/tiny_reader     # rebuild the model card

The modules, lowest first (each imports only those above it):

- :mod:`.config`: :class:`~.config.ReaderModelSpec`, :class:`~.config.TrainConfig`, the errors,
  :data:`~.config.DEFAULT_READER_DIR`, :func:`~.config.reader_doc_spec`;
- :mod:`.model`: :func:`~.model.build_reader`, the training-only :class:`~.model.AuxiliaryHeads`,
  :class:`~.model.linear_patch_embedding`;
- :mod:`.curriculum`: which pages and questions each training step sees;
- :mod:`.fast_pixels`, :mod:`.batches`: training batches (labels, pointers, ``collate``);
- :mod:`.losses`: :func:`~.losses.reader_losses`, the forward pass and every loss;
- :mod:`.training`: :func:`~.training.train_reader`, :func:`~.training.save_reader`,
  :func:`~.training.training_logs`;
- :mod:`.accuracy`: greedy reading of held-out pages and its summaries (no training code: steps
  05 and 07 use it);
- :mod:`.card`: the model card; :mod:`.cli` (``__main__``): the command line.

Notebook 00's parameters, outputs and findings are declared above this package, in the step
module :mod:`sparsemm_utils.steps.tiny_reader`.

The pages, questions and held-out streams (:data:`~sparsemm_utils.reader_tasks.HELDOUT_SEED`,
:func:`~sparsemm_utils.reader_tasks.heldout_documents`) live below this package, in
:mod:`sparsemm_utils.reader_tasks`, because the offline benchmark and the ablations read them
without the reader's training code. This ``__init__`` imports nothing, for the same reason.
"""
