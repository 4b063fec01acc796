"""The Mosaic TPU ``pallas_call`` of the tree-attention kernel (body in ``body.py``).

Imports only the kernel body; the public API (the package ``__init__``) imports this module on
first use of the ``"tpu"`` layout. Differences from the generic (interpret / Triton) call in
``generic.py``:

* ``lengths`` is a scalar-prefetch operand: it lives in SMEM and the index maps read it.
* The K/V index maps clamp the split index to the last split that holds a committed slot, so
  grid steps past ``lengths[b]`` map to the block already in VMEM and Pallas issues no new DMA;
  the kernel body computes nothing there (its block loop count is 0).
* Splits are sized by :func:`body.plan` to ~2k slots so that one split of K and V,
  double-buffered, fits the default scoped VMEM.

Untested on TPU hardware (no TPU in this project); it runs in interpret mode on CPU in the tests.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from specjax.kernels.tree_attention.body import BlockSizes, Plan, bind, kernel_body, split_results


def _tpu_kernel(lengths_ref, *refs, **kw):
    kernel_body(lengths_ref[pl.program_id(0)], *refs, **kw)


def call_tpu(lengths, q, k, v, kn, vn, vis, p: Plan, sizes: BlockSizes, scale: float,
             interpret=False):
    """Same operands and results as :func:`generic.call_generic` (``sizes`` is unused)."""
    del sizes
    b, kh, _, d = q.shape

    def kv_map(i, h, r, j, lengths_ref):
        last = jnp.maximum((lengths_ref[i] + p.split_size - 1) // p.split_size, 1) - 1
        return i, h, jnp.minimum(j, last), 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, kh, p.rows // p.block_r, p.num_splits),
        in_specs=[
            pl.BlockSpec((None, None, p.block_r, d), lambda i, h, r, j, n: (i, h, r, 0)),
            pl.BlockSpec((None, None, p.split_size, d), kv_map),
            pl.BlockSpec((None, None, p.split_size, d), kv_map),
            pl.BlockSpec((None, None, p.nodes, d), lambda i, h, r, j, n: (i, h, 0, 0)),
            pl.BlockSpec((None, None, p.nodes, d), lambda i, h, r, j, n: (i, h, 0, 0)),
            pl.BlockSpec((None, p.block_r, p.nodes), lambda i, h, r, j, n: (i, r, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, p.block_r, d),
                         lambda i, h, r, j, n: (i, h, j, r, 0)),
            pl.BlockSpec((None, None, None, p.block_r, 1),
                         lambda i, h, r, j, n: (i, h, j, r, 0)),
            pl.BlockSpec((None, None, None, p.block_r, 1),
                         lambda i, h, r, j, n: (i, h, j, r, 0)),
        ],
    )
    return pl.pallas_call(
        bind(_tpu_kernel, p, scale, interpret), grid_spec=grid_spec,
        out_shape=split_results(b, kh, d, p), interpret=interpret,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",) * 4),
        name="tree_attention_tpu",
    )(lengths, q, k, v, kn, vn, vis)
