"""Benchmark: ``python -m attention_lens.bench`` prints medians and peak memory.

The suites, one module each (``__main__`` runs those the flags name): ``prompt`` (1, 2),
``weights`` (3, with ``--transformer-lens``), ``graph``, ``heads``, ``patching``, ``circuit``,
``flow`` (``--page-flow``, ``--soak``) and ``real_model`` (``--real-model``); ``measure``
holds the timing and memory helpers they share. ``load`` is the load, fault and soak test of
the lab server (``python -m attention_lens.bench.load``). Nothing in the runtime imports this
package; the models and texts it shares with the tests live in ``model.shapes`` and
``model.texts``.

By default it runs these, then the graph, heads and patching suites:

1. Every per-prompt analysis on a 128-token prompt with the shipped two-layer model, with
   the forward pass cached by the :class:`~attention_lens.registry.Registry` (and the cost
   of a second page's analysis on the same prompt, reusing that forward pass).
2. Every weight analysis of the shipped model.
3. The weight analyses (OV/QK SVD, full-OV eigenvalues and copying scores, composition)
   of a random model of GPT-2-small shape built from our own ModelConfig (no training),
   next to a naive dense computation timed on a few heads or pairs and extrapolated.

Timings are medians of ``--reps`` runs. Memory, from two extra runs: the peak of
Python/numpy allocations (tracemalloc; torch's allocator is not traced) and the peak
growth of the resident set size sampled every millisecond (torch included; memory the
allocator kept from earlier runs is reused and not counted again).
"""
