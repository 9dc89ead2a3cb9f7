"""Runs the CUDA deepseek_topk kernel over the test module's case list (shapes x patterns),
nothing else, so compute-sanitizer sees only its launches and their inputs:

  compute-sanitizer --tool memcheck --kernel-name kns=w4afp8 python3 scripts/sanitize_deepseek_topk.py

(under pytest the sanitizer process itself crashed at the first 64-token case, after the
smaller ones had run clean). Checks the ids are in range and distinct per token."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import jax.numpy as jnp  # noqa: E402
import test_deepseek_topk as cases  # noqa: E402

import w4afp8_jax as w4  # noqa: E402

rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
for case in cases.CASES:
    m, e, n_group, topk_group, top_k, pattern = case.values
    logits, bias = cases.make_case(rng, m, e, pattern)
    for dtype in (jnp.float32, jnp.bfloat16):
        _, ids = w4.deepseek_topk(jnp.asarray(logits, dtype), None if bias is None else jnp.asarray(bias),
                                  top_k=top_k, n_group=n_group, topk_group=topk_group, implementation="cuda")
        ids = np.asarray(ids)
        assert ids.shape == (m, top_k) and np.all((ids >= 0) & (ids < e)), (m, e, pattern)
        assert all(len(set(row)) == top_k for row in ids.tolist()), (m, e, pattern)
print(f"{len(cases.CASES)} cases x 2 dtypes: ids in range and distinct")
