"""Calling the library's custom calls: shapes, attributes, batch partitioning and vmap.

Every custom call is independent per example (the kernel gradient and the BatchNorm sums are
returned per example and summed by the caller), so under a batch-sharded jit each device runs it
on its own examples: the sharding rules let the batch factor ``n`` be sharded and keep every
other dimension whole. The handlers are registered for the CPU platform only; lowering a program
that contains one for another platform fails, which is why the layers choose their form per
lowering platform (``ghostnetv2_jax.layers.platform``).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ghostnetv2_jax.kernels import build


class Target(NamedTuple):
    rule: str                   # Shardy sharding rule (einsum-like), operands -> result
    batched: Tuple[bool, ...]   # which operands carry the batch dimension first
    attrs: Tuple[str, ...]      # geometry attributes, in the order of ``static``

# A call is (target, static, out_tail): ``static`` the attribute values, ``out_tail`` the
# result's shape after its batch dimension, which is the first operand's (global or per device).


_GHOST = ('pad_top', 'pad_left', 'relu')
_STRIDED = _GHOST + ('dw_stride_h', 'dw_stride_w', 'dw_pad_top', 'dw_pad_left')
TARGETS = {
    'gnv2_depthwise_forward': Target('n h w c, i j k c -> n p q c', (True, False),
                                     ('stride_h', 'stride_w', 'pad_top', 'pad_left')),
    'gnv2_depthwise_grad_input': Target('n p q c, i j k c -> n h w c', (True, False),
                                        ('stride_h', 'stride_w', 'pad_top', 'pad_left')),
    'gnv2_depthwise_grad_kernel': Target('n h w c, n p q c -> n i j k c', (True, True),
                                         ('stride_h', 'stride_w', 'pad_top', 'pad_left')),
    'gnv2_ghost_module_after_primary': Target('n h w c, c, c, i j k c, c, c -> n h w d',
                                              (True,) + (False,) * 5, _GHOST),
    'gnv2_ghost_module_after_primary_gated': Target('n h w c, c, c, i j k c, c, c, n a b d -> n h w d',
                                                    (True,) + (False,) * 5 + (True,), _GHOST),
    'gnv2_ghost_module': Target('n h w e, a b e c, c, c, i j k c, c, c -> n h w d',
                                (True,) + (False,) * 6, _GHOST),
    'gnv2_ghost_module_gated': Target('n h w e, a b e c, c, c, i j k c, c, c, n u v d -> n h w d',
                                      (True,) + (False,) * 6 + (True,), _GHOST),
    'gnv2_ghost_module_strided': Target(
        'n h w e, a b e c, c, c, i j k c, c, c, f g l d, d, d -> n p q d', (True,) + (False,) * 9, _STRIDED),
    'gnv2_ghost_module_strided_gated': Target(
        'n h w e, a b e c, c, c, i j k c, c, c, n u v d, f g l d, d, d -> n p q d',
        (True,) + (False,) * 6 + (True,) + (False,) * 3, _STRIDED),
    'gnv2_stem_conv': Target('n h w c, i j c d, d, d -> n p q d', (True, False, False, False),
                             ('stride_h', 'stride_w', 'pad_top', 'pad_left', 'relu')),
    'gnv2_pointwise': Target('n h w c, c d, d -> n h w d', (True, False, False), ('relu',)),
    'gnv2_batchnorm_moments': Target('n h w c -> n t c', (True,), ()),
    'gnv2_batchnorm_grad_sums': Target('n h w c, n h w c, c -> n t c', (True, True, False), ()),
}
assert set(TARGETS) == set(build.HANDLERS)


def _ffi(target, static, out_tail, *operands):
    out = jax.ShapeDtypeStruct((operands[0].shape[0], *out_tail), jnp.float32)
    attrs = {name: np.int64(v) for name, v in zip(TARGETS[target].attrs, static)}
    return jax.ffi.ffi_call(target, out, vmap_method='sequential')(*operands, **attrs)


def _partitioned(target, static, out_tail):
    """The custom call under ``custom_partitioning``: per-device shapes, batch sharding only."""
    from jax.experimental.custom_partitioning import custom_partitioning
    from jax.sharding import NamedSharding, PartitionSpec
    spec = TARGETS[target]
    run = functools.partial(_ffi, target, static, out_tail)

    def batch_only(mesh, like, rank):   # ``like``'s sharding of dim 0, everything else whole
        dims = getattr(like, 'spec', None)
        return NamedSharding(mesh, PartitionSpec(dims[0] if dims else None, *([None] * (rank - 1))))

    def infer(mesh, arg_shapes, result_shape):
        return batch_only(mesh, arg_shapes[0].sharding, len(result_shape.shape))

    def partition(mesh, arg_shapes, result_shape):
        like = arg_shapes[0].sharding
        args = tuple(batch_only(mesh, like, len(a.shape)) if batched else NamedSharding(mesh, PartitionSpec())
                     for a, batched in zip(arg_shapes, spec.batched))
        return mesh, run, batch_only(mesh, like, len(result_shape.shape)), args

    call = custom_partitioning(run)
    # Every factor but n stays whole (c too where it mixes with d), listed in order of first
    # appearance: Shardy requires its special factors sorted.
    factors = spec.rule.replace(',', ' ').replace('->', ' ').split()
    keep_whole = tuple(dict.fromkeys(f for f in factors if f != 'n' and (f != 'c' or 'd' in factors)))
    call.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=spec.rule,
                       need_replication_factors=keep_whole)
    return call


@functools.lru_cache(maxsize=None)
def _op(target, static, out_tail):
    """``target`` for one geometry, partitionable and vmappable. Under vmap the mapped axis is
    folded into the batch axis when only batch-carrying operands are mapped (the custom calls are
    per example); otherwise (e.g. a mapped kernel) it runs once per element."""
    # One device has nothing to partition, and custom_partitioning's wrapper costs compile time.
    partitioned = (_partitioned(target, static, out_tail) if jax.device_count() > 1 else
                   functools.partial(_ffi, target, static, out_tail))
    batched = TARGETS[target].batched

    @jax.custom_batching.custom_vmap
    def op(*operands):
        return partitioned(*operands)

    @op.def_vmap
    def _rule(axis_size, in_mapped, *operands):
        lift = lambda v, mapped: v if mapped else jnp.broadcast_to(v, (axis_size, *v.shape))
        if any(m and not b for m, b in zip(in_mapped, batched)):
            return jax.lax.map(lambda ops: op(*ops), tuple(map(lift, operands, in_mapped))), True
        fold = lambda v: v.reshape(-1, *v.shape[2:])
        operands = [fold(lift(v, m)) if b else v for v, m, b in zip(operands, in_mapped, batched)]
        out = op(*operands)
        return out.reshape(axis_size, -1, *out.shape[1:]), True

    return op


def call(target: str, static: Tuple[int, ...], out_tail: Tuple[int, ...], *operands) -> jax.Array:
    """Custom call ``target`` on float32 ``operands``; the result is (N, *out_tail) float32."""
    if not build.load():
        raise RuntimeError(f'the native CPU kernels are unavailable: {build.load_error()}')
    return _op(target, tuple(static), tuple(out_tail))(*(o.astype(jnp.float32) for o in operands))
