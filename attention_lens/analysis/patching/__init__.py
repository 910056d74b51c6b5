"""Activation patching, attribution patching and path patching on a clean/corrupted pair.

Activation patching (Meng et al. 2022; Wang et al. 2022; Heimersheim & Nanda 2024): run
one prompt (the *base* run), replace one activation by its value on the other prompt (the
*source* run) and read a metric on the final logits. Denoising patches clean activations into
the corrupted run; noising patches corrupted activations into the clean run. The grids equal
TransformerLens' ``patching.get_act_patch_*`` (which compute denoising).

Exactness makes this fast. A patch at layer l and position p changes nothing before layer l
and nothing at positions < p; positions after the metric's position never matter; the last
layer needs only the metric's query row; a patch that replaces an activation by an identical
value changes nothing. So every patched run starts from the cached base run at the patch,
recomputes only rows >= p of layers >= l (batched over patches), and computes logits at the
metric position only.

Attribution patching (Nanda 2023) estimates each cell as base metric + (a_source − a_base) ·
∂m/∂a, with the gradient taken on the base run (one forward and one backward pass).

Path patching (Wang et al. 2022) sends one head's output, taken from the source run, only
into a receiver head's query, key or value input, and recomputes the network from the
receiver on; its direct effect sends it only into the final residual stream. Two variants
(``mlps``) say what happens between sender and receiver:

- ``"recomputed"`` (the default; Wang et al., as ARENA's IOI code implements it): the sender's
  output from the source run, every other attention head frozen at its base-run value, the
  MLPs in between recomputed on the patched residual stream; the receiver reads that stream.
- ``"frozen"``: only the sender's change is added to the receiver's input; every other
  component, the MLPs too, keeps its base value.

They agree on attention-only models (there is nothing to recompute).

The package, by idea: :mod:`.terms` (granularities, metrics, the metric itself), :mod:`.pairs`
(a pair's tokens, sets of pairs from CSV/JSON), :mod:`.results`, :mod:`.runs` (cached
activations), :mod:`.engine` (the patched forward), :mod:`.prepare` (a validated pair with its
runs), :mod:`.grids` (activation and attribution patching), :mod:`.paths` (path patching),
:mod:`.examples` (the page's default example and filled-in boxes) and :mod:`.policy`.
"""

from .engine import _Dense, _Engine, _first_difference, _first_row, _Single, _State
from .examples import (
    DEFAULT_CLEAN,
    DEFAULT_CORRECT,
    DEFAULT_CORRUPTED,
    DEFAULT_WRONG,
    REPLACEMENTS,
    SHORT_SENTENCE,
    corrupt_one_token,
    default_answers,
    default_fits,
    pair_predictions,
    short_default,
)
from .grids import (
    ROW_BUDGET,
    _attribution,
    _chunks,
    _correlation,
    _exact_grid,
    _grid,
    _run_batch,
    activation_patching,
    patching_over_pairs,
    strongest_cells,
)
from .pairs import (
    MAX_PAIR_FILE_CHARS,
    MAX_PAIRS,
    PAIR_FIELDS,
    PairInput,
    Prompt,
    PromptPair,
    _prompt_ids,
    pair_tokens,
    parse_pairs,
)
from .paths import (
    MAX_TABLE_HEADS,
    _norm_scale,
    _path_from_sender,
    _receiver_batch,
    _recomputed_stream,
    path_patching,
    path_patching_table,
)
from .policy import PATCHING, PATH_PATCHING, grid_cells, grid_gflop, path_gflop
from .prepare import _Setup
from .results import PairSetPatching, PatchingGrid, PathPatching, PathPatchingTable
from .runs import _RUNS, RUN_CACHE_BYTES, _Run, _run
from .terms import (
    COMPONENTS,
    DIRECTIONS,
    GRANULARITIES,
    GRANULARITY_LABELS,
    GRID_AXES,
    METRIC_LABELS,
    METRICS,
    MLP_MODE_LABELS,
    MLP_MODES,
    Direction,
    Granularity,
    LnMode,
    Metric,
    MetricKind,
    MlpMode,
    ProgressFn,
    _check_choice,
    _check_position,
)

__all__ = [
    "COMPONENTS", "DEFAULT_CLEAN", "DEFAULT_CORRECT", "DEFAULT_CORRUPTED", "DEFAULT_WRONG",
    "DIRECTIONS", "GRANULARITIES", "GRANULARITY_LABELS", "GRID_AXES", "MAX_PAIRS",
    "MAX_PAIR_FILE_CHARS", "MAX_TABLE_HEADS", "METRICS",
    "METRIC_LABELS", "MLP_MODES", "MLP_MODE_LABELS", "REPLACEMENTS", "ROW_BUDGET",
    "RUN_CACHE_BYTES", "SHORT_SENTENCE", "Direction", "Granularity", "LnMode", "Metric",
    "MetricKind", "MlpMode", "PAIR_FIELDS", "PATCHING", "PATH_PATCHING", "PairInput", "grid_cells", "grid_gflop",
    "path_gflop", "PairSetPatching", "PatchingGrid", "PathPatching",
    "PathPatchingTable", "ProgressFn", "Prompt", "PromptPair", "activation_patching",
    "corrupt_one_token", "default_answers", "default_fits", "pair_predictions", "pair_tokens",
    "parse_pairs", "path_patching", "path_patching_table", "patching_over_pairs",
    "short_default", "strongest_cells",
    # used by the circuit analyses, the bench and the tests
    "_Dense", "_Engine", "_RUNS", "_Run", "_Setup", "_Single", "_State", "_attribution",
    "_check_choice", "_check_position", "_chunks", "_correlation", "_exact_grid",
    "_first_difference", "_first_row", "_grid", "_norm_scale",
    "_path_from_sender", "_prompt_ids", "_receiver_batch", "_recomputed_stream", "_run",
    "_run_batch",
]
