"""A traced JAX inference function -> an ONNX graph (opset 18), read from its jaxpr.

The function is traced once at a concrete batch; the graph's batch dimension is dynamic. Every
value computed from the input is emitted as ONNX nodes; everything else (weights, index arrays,
broadcast biases) is evaluated at export time and stored as initializers.

Layout. The traced program is NHWC (Flax); ONNX's ``Conv`` is NCHW. Each emitted tensor carries
a permutation ``perm`` (its physical layout is ``transpose(logical, perm)``): a convolution's
output is NCHW and every layout-agnostic op after it (elementwise ops, slices, reductions,
concatenations, stacks and the reshapes that keep grouped axes together) works in that layout
with its axes renumbered, so the graph transposes only where a layout really changes (the input,
and a reshape that would mix axes).

Peepholes: ``max(x, 0)`` is ``Relu`` and ``min``/``max`` against a scalar is ``Clip`` (runtimes
fuse both into the conv before them), and a conv followed by the addition of a per-channel
constant takes it as its bias. Depthwise convolutions are grouped ``Conv`` nodes; no custom ops.

A primitive outside the supported set raises ``NotImplementedError`` naming it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

OPSET = 18
_TRACE_BATCH = 2     # a batch of 2 keeps the batch axis apart from broadcast (size-1) axes
_NCHW = (0, 3, 1, 2)  # the physical layout of an NHWC value that ONNX's Conv reads and writes


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """A value computed from the input: an ONNX tensor name, its logical (traced) shape and
    the permutation from logical to physical axes."""
    name: str
    shape: Tuple[int, ...]
    perm: Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Const:
    """A value known at export time. ``array`` may hold size-1 axes where ``shape`` is larger
    (an unmaterialised broadcast)."""
    array: np.ndarray
    shape: Tuple[int, ...]

    def full(self) -> np.ndarray:
        return np.broadcast_to(self.array, self.shape)


class _Graph:
    def __init__(self):
        import onnx
        self.onnx = onnx
        self.nodes: List[Any] = []
        self.initializers: List[Any] = []
        self._count = 0
        self._transposed: Dict[Tuple[str, Tuple[int, ...]], str] = {}

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f'{hint}_{self._count}'

    def const(self, array: np.ndarray, hint: str = 'const') -> str:
        name = self.fresh(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.asarray(list(values), np.int64), 'ints')

    def node(self, op: str, inputs: Sequence[str], **attrs) -> str:
        out = self.fresh(op.lower())
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def layout(self, t: _Tensor, perm: Tuple[int, ...]) -> str:
        """``t``'s data in the physical layout ``perm``."""
        if t.perm == perm:
            return t.name
        key = (t.name, perm)
        if key not in self._transposed:
            self._transposed[key] = self.node('Transpose', [t.name], perm=[t.perm.index(p) for p in perm])
        return self._transposed[key]


def _identity(rank: int) -> Tuple[int, ...]:
    return tuple(range(rank))


def _batch_free(c: _Const, rank: int) -> np.ndarray:
    """``c``'s array, which must not vary along the batch axis (the graph's batch is dynamic)."""
    a = np.asarray(c.array)
    if a.ndim == rank and rank > 0 and a.shape[0] != 1:
        raise NotImplementedError('ONNX export: a constant with a batch axis meets a value computed '
                                  'from the input (the exported batch is dynamic)')
    return a


def _const_operand(g: _Graph, c: _Const, rank: int, perm: Tuple[int, ...], dtype) -> str:
    """A constant operand of an elementwise op on a tensor of ``rank`` in layout ``perm``:
    NumPy-broadcast to that rank (size-1 axes stay size 1), then permuted."""
    a = _batch_free(c, rank).astype(dtype)
    a = a.reshape((1,) * (rank - a.ndim) + a.shape)
    return g.const(np.transpose(a, perm))


_UNARY = {'logistic': 'Sigmoid', 'neg': 'Neg', 'exp': 'Exp', 'log': 'Log', 'tanh': 'Tanh',
          'abs': 'Abs', 'sqrt': 'Sqrt', 'erf': 'Erf', 'floor': 'Floor', 'ceil': 'Ceil',
          'sign': 'Sign', 'sin': 'Sin', 'cos': 'Cos'}
_BINARY = {'add': 'Add', 'sub': 'Sub', 'mul': 'Mul', 'div': 'Div', 'max': 'Max', 'min': 'Min',
           'pow': 'Pow'}
_REDUCE = {'reduce_sum': 'ReduceSum', 'reduce_max': 'ReduceMax', 'reduce_min': 'ReduceMin',
           'reduce_prod': 'ReduceProd'}
_IDENTITY = {'copy', 'copy_p', 'optimization_barrier', 'reduce_precision'}
_CALLS = ('jaxpr', 'call_jaxpr', 'fun_jaxpr')


def _sub_jaxpr(eqn) -> Optional[Tuple[Any, Sequence[Any]]]:
    for key in _CALLS:
        if key in eqn.params:
            j = eqn.params[key]
            if hasattr(j, 'jaxpr') and hasattr(j, 'consts'):
                return j.jaxpr, j.consts
            if hasattr(j, 'eqns'):
                return j, ()
    return None


class _Emitter:
    def __init__(self, g: _Graph):
        self.g = g
        # What some outputs were computed as, for the patterns that become one ONNX op:
        self.slices: Dict[str, Tuple[_Tensor, Tuple, Tuple, Tuple]] = {}   # -> (x, starts, limits, strides)
        self.sums: Dict[str, List[str]] = {}                             # -> the names added up
        self.repeats: Dict[str, Tuple[_Tensor, int, int]] = {}           # stack of k copies -> (x, axis, k)

    # ------------------------------------------------------------------ interpretation
    def run(self, jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> List[Any]:
        env: Dict[Any, Any] = {}

        def read(v):
            if isinstance(v, jax.extend.core.Literal):
                return _Const(np.asarray(v.val), tuple(v.aval.shape))
            return env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = _Const(np.asarray(c), tuple(np.shape(c)))
        for v, a in zip(jaxpr.invars, args):
            env[v] = a
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            sub = _sub_jaxpr(eqn)
            if sub is not None:
                outs = self.run(sub[0], sub[1], ins[len(ins) - len(sub[0].invars):])
            elif all(isinstance(x, _Const) for x in ins):
                outs = self.evaluate(eqn, ins)
            else:
                outs = self.emit(eqn, ins)
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def evaluate(self, eqn, ins: List[_Const]) -> List[_Const]:
        if eqn.primitive.name == 'broadcast_in_dim':   # keep the broadcast implicit
            array, out = np.asarray(ins[0].array), tuple(eqn.params['shape'])
            shape = [1] * len(out)
            for i, d in enumerate(eqn.params['broadcast_dimensions']):
                shape[d] = array.shape[i]
            return [_Const(array.reshape(shape), out)]
        with jax.ensure_compile_time_eval():
            outs = eqn.primitive.bind(*[jnp.asarray(c.full()) for c in ins], **eqn.params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        return [_Const(np.asarray(o), tuple(np.shape(o))) for o in outs]

    # ------------------------------------------------------------------ emission
    def emit(self, eqn, ins: List[Any]) -> List[_Tensor]:
        name = eqn.primitive.name
        out_shape = tuple(eqn.outvars[0].aval.shape)
        handler = getattr(self, f'_{name}', None)
        if name in _UNARY or name in ('rsqrt', 'integer_pow', 'square', 'convert_element_type') or name in _IDENTITY:
            return [self._unary(name, eqn, ins[0], out_shape)]
        if name in _BINARY:
            return [self._binary(name, ins, out_shape, eqn.outvars[0].aval.dtype)]
        if name in _REDUCE:
            return [self._reduce(_REDUCE[name], eqn, ins[0], out_shape)]
        if handler is None:
            raise NotImplementedError(f'ONNX export: primitive {name!r} on a value computed from '
                                      f'the input is not supported')
        return [handler(eqn, ins, out_shape)]

    def _unary(self, name, eqn, x: _Tensor, out_shape) -> _Tensor:
        g = self.g
        if name in _IDENTITY or (name == 'convert_element_type'
                                 and eqn.params['new_dtype'] == eqn.invars[0].aval.dtype):
            return x
        if name == 'convert_element_type':
            dtype = np.dtype(eqn.params['new_dtype'])
            to = g.onnx.helper.np_dtype_to_tensor_dtype(dtype)
            return _Tensor(g.node('Cast', [x.name], to=to), out_shape, x.perm)
        if name == 'rsqrt':
            return _Tensor(g.node('Reciprocal', [g.node('Sqrt', [x.name])]), out_shape, x.perm)
        if name == 'square' or (name == 'integer_pow' and eqn.params['y'] == 2):
            return _Tensor(g.node('Mul', [x.name, x.name]), out_shape, x.perm)
        if name == 'integer_pow':
            y = g.const(np.asarray(eqn.params['y'], eqn.invars[0].aval.dtype))
            return _Tensor(g.node('Pow', [x.name, y]), out_shape, x.perm)
        return _Tensor(g.node(_UNARY[name], [x.name]), out_shape, x.perm)

    def _binary(self, name, ins, out_shape, dtype) -> _Tensor:
        g = self.g
        rank = len(out_shape)
        tensors = [x for x in ins if isinstance(x, _Tensor)]
        # the layout of an operand of the full shape (the other may broadcast, e.g. an SE gate)
        perm = next((x.perm for x in tensors if x.shape == out_shape), _identity(rank))
        if name in ('max', 'min') and len(tensors) == 1:
            c = next(x for x in ins if isinstance(x, _Const))
            values = np.unique(np.asarray(c.array))
            if values.size == 1:
                x = g.layout(tensors[0], perm)
                if name == 'max' and values[0] == 0:
                    return _Tensor(g.node('Relu', [x]), out_shape, perm)
                bound = g.const(np.asarray(values[0], dtype))
                args = [x, bound] if name == 'max' else [x, '', bound]
                return _Tensor(g.node('Clip', args), out_shape, perm)
        if name == 'mul' and len(tensors) == 1:
            pooled = self._average_pool(tensors[0], next(x for x in ins if isinstance(x, _Const)), out_shape)
            if pooled is not None:
                return pooled
        names = [g.layout(x, perm) if isinstance(x, _Tensor) else _const_operand(g, x, rank, perm, dtype)
                 for x in ins]
        out = g.node(_BINARY[name], names)
        if name == 'add' and len(tensors) == 2 and all(x.perm == perm for x in tensors):
            self.sums[out] = [n for x in tensors for n in self.sums.get(x.name, [x.name])]
        return _Tensor(out, out_shape, perm)

    def _average_pool(self, t: _Tensor, c: _Const, out_shape) -> Optional[_Tensor]:
        """``(x[:, 0::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 0::2] + x[:, 1::2, 1::2]) * 0.25``
        (odd sizes floored) on an NCHW tensor is ``AveragePool`` 2x2 / 2."""
        leaves = self.sums.get(t.name, [])
        if len(leaves) != 4 or not np.all(np.asarray(c.array) == 0.25) or any(n not in self.slices for n in leaves):
            return None
        x = self.slices[leaves[0]][0]
        if len(x.shape) != 4 or x.perm[:2] != (0, 3):
            return None
        h, w = x.perm[2], x.perm[3]
        starts = set()
        for n in leaves:
            src, start, limit, stride = self.slices[n]
            ok = (src.name == x.name and stride == tuple(2 if d in (h, w) else 1 for d in range(4))
                  and all(start[d] == 0 and limit[d] == x.shape[d] for d in (0, 3))
                  and all(limit[d] == x.shape[d] // 2 * 2 for d in (h, w)))
            if not ok:
                return None
            starts.add((start[h], start[w]))
        if starts != {(0, 0), (0, 1), (1, 0), (1, 1)}:
            return None
        return _Tensor(self.g.node('AveragePool', [x.name], kernel_shape=[2, 2], strides=[2, 2]), out_shape, x.perm)

    def _reduce(self, op, eqn, x: _Tensor, out_shape) -> _Tensor:
        axes = tuple(eqn.params['axes'])
        kept = [d for d in range(len(x.shape)) if d not in axes]
        phys = [p for p in x.perm if p not in axes]
        out = self.g.node(op, [x.name, self.g.ints([x.perm.index(a) for a in axes])], keepdims=0)
        return _Tensor(out, out_shape, tuple(kept.index(p) for p in phys))

    def _conv_general_dilated(self, eqn, ins, out_shape) -> _Tensor:
        g, p = self.g, eqn.params
        x, w = ins
        if not isinstance(w, _Const):
            raise NotImplementedError('ONNX export: a convolution whose kernel is computed from the input')
        if any(d != 1 for d in (p['lhs_dilation'] or ())) or p['batch_group_count'] != 1:
            raise NotImplementedError('ONNX export: transposed or batch-grouped convolutions')
        dn = p['dimension_numbers']
        kernel = np.transpose(w.full(), dn.rhs_spec).astype(np.float32)     # OIHW
        pads = [lo for lo, _ in p['padding']] + [hi for _, hi in p['padding']]
        out = g.node('Conv', [g.layout(x, tuple(dn.lhs_spec)), g.const(kernel, 'kernel')],
                     strides=list(p['window_strides']), pads=pads,
                     dilations=list(p['rhs_dilation'] or (1,) * (kernel.ndim - 2)),
                     group=int(p['feature_group_count']), kernel_shape=list(kernel.shape[2:]))
        return _Tensor(out, out_shape, tuple(dn.out_spec))

    def _slice(self, eqn, ins, out_shape) -> _Tensor:
        (x,) = ins
        p = eqn.params
        strides = p['strides'] or (1,) * len(x.shape)
        axes = [d for d in range(len(x.shape))
                if (p['start_indices'][d], p['limit_indices'][d], strides[d]) != (0, x.shape[d], 1)]
        g = self.g
        if not axes:
            return x
        out = g.node('Slice', [x.name, g.ints([p['start_indices'][d] for d in axes]),
                               g.ints([p['limit_indices'][d] for d in axes]),
                               g.ints([x.perm.index(d) for d in axes]), g.ints([strides[d] for d in axes])])
        self.slices[out] = (x, tuple(p['start_indices']), tuple(p['limit_indices']), tuple(strides))
        return _Tensor(out, out_shape, x.perm)

    def _concatenate(self, eqn, ins, out_shape) -> _Tensor:
        g = self.g
        dim = eqn.params['dimension']
        perm = next(x for x in ins if isinstance(x, _Tensor)).perm
        if any(isinstance(x, _Const) for x in ins):
            raise NotImplementedError('ONNX export: a constant concatenated to a value computed from the '
                                      'input (the exported batch is dynamic)')
        names = [g.layout(x, perm) for x in ins]
        return _Tensor(g.node('Concat', names, axis=perm.index(dim)), out_shape, perm)

    def _stack(self, eqn, ins, out_shape) -> _Tensor:
        g = self.g
        axis = eqn.params['axis']
        x0 = next(x for x in ins if isinstance(x, _Tensor))
        shifted = [d + (d >= axis) for d in x0.perm]
        pos = 0 if axis == 0 else shifted.index(axis - 1) + 1
        perm = tuple(shifted[:pos] + [axis] + shifted[pos:])
        axes = g.ints([pos])
        if any(isinstance(x, _Const) for x in ins):
            raise NotImplementedError('ONNX export: a constant stacked with a value computed from the '
                                      'input (the exported batch is dynamic)')
        names = [g.node('Unsqueeze', [g.layout(x, x0.perm), axes]) for x in ins]
        out = g.node('Concat', names, axis=pos)
        if all(isinstance(x, _Tensor) and x.name == x0.name for x in ins):
            self.repeats[out] = (x0, axis, len(ins))
        return _Tensor(out, out_shape, perm)

    def _resize(self, x: _Tensor, axis: int, size: int, out_shape) -> _Tensor:
        """Nearest resizing of one spatial axis (PyTorch's ``floor(i * in / out)``)."""
        node = self.g.node('Resize', [x.name, '', '', self.g.ints([size])], axes=[x.perm.index(axis)],
                           mode='nearest', coordinate_transformation_mode='asymmetric', nearest_mode='floor')
        return _Tensor(node, out_shape, x.perm)

    def _reshape(self, eqn, ins, out_shape) -> _Tensor:
        if eqn.params.get('dimensions') is not None:
            raise NotImplementedError('ONNX export: reshape with dimensions')
        return self.reshape(ins[0], out_shape)

    def _squeeze(self, eqn, ins, out_shape) -> _Tensor:
        return self.reshape(ins[0], out_shape)

    def _expand_dims(self, eqn, ins, out_shape) -> _Tensor:
        return self.reshape(ins[0], out_shape)

    def reshape(self, x: _Tensor, out_shape) -> _Tensor:
        g = self.g
        if x.name in self.repeats:   # k copies stacked after an axis, merged into it: a nearest up-sampling
            src, axis, k = self.repeats[x.name]
            up = src.shape[:axis - 1] + (src.shape[axis - 1] * k,) + src.shape[axis:]
            if axis > 0 and tuple(out_shape) == up and len(src.shape) == 4 and src.perm.index(axis - 1) >= 2:
                return self._resize(src, axis - 1, up[axis - 1], out_shape)
        mapped = _reshape_layout(x.shape, x.perm, out_shape)
        if mapped is None:
            name, perm = g.layout(x, _identity(len(x.shape))), _identity(len(out_shape))
        else:
            name, perm = x.name, mapped
        target = [out_shape[d] for d in perm]
        target[perm.index(0)] = -1          # the batch axis stays dynamic
        return _Tensor(g.node('Reshape', [name, g.ints(target)]), out_shape, perm)

    def _broadcast_in_dim(self, eqn, ins, out_shape) -> _Tensor:
        x = ins[0]
        dims = tuple(eqn.params['broadcast_dimensions'])
        expanded = [1] * len(out_shape)
        for i, d in enumerate(dims):
            expanded[d] = x.shape[i]
        y = self.reshape(x, tuple(expanded)) if tuple(expanded) != x.shape else x
        if tuple(expanded) == out_shape:
            return y
        target = [1 if (d == 0 or expanded[d] != 1) else out_shape[d] for d in y.perm]
        return _Tensor(self.g.node('Expand', [y.name, self.g.ints(target)]), out_shape, y.perm)

    def _transpose(self, eqn, ins, out_shape) -> _Tensor:
        (x,) = ins
        p = tuple(eqn.params['permutation'])
        return _Tensor(x.name, out_shape, tuple(p.index(q) for q in x.perm))

    def _dot_general(self, eqn, ins, out_shape) -> _Tensor:
        g = self.g
        x, w = ins
        (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
        if not (isinstance(x, _Tensor) and isinstance(w, _Const)) or lb or rb or len(x.shape) != 2 \
                or w.array.ndim != 2 or tuple(lc) != (1,):
            raise NotImplementedError('ONNX export: dot_general other than features @ constant matrix')
        weight = w.full() if tuple(rc) == (0,) else w.full().T
        out = g.node('MatMul', [g.layout(x, (0, 1)), g.const(np.asarray(weight, np.float32), 'weight')])
        return _Tensor(out, out_shape, (0, 1))

    def _gather(self, eqn, ins, out_shape) -> _Tensor:
        g = self.g
        x, idx = ins
        dn = eqn.params['dimension_numbers']
        rank = len(x.shape)
        axis = dn.start_index_map[0] if len(dn.start_index_map) == 1 else None
        simple = (isinstance(x, _Tensor) and isinstance(idx, _Const) and axis is not None
                  and tuple(dn.collapsed_slice_dims) == (axis,) and not dn.operand_batching_dims
                  and tuple(dn.offset_dims) == tuple(d for d in range(rank) if d != axis)
                  and tuple(eqn.params['slice_sizes']) == tuple(1 if d == axis else s for d, s in enumerate(x.shape))
                  and idx.full().ndim == 2 and idx.full().shape[1] == 1)
        if not simple:
            raise NotImplementedError('ONNX export: gather other than a constant take along one axis')
        indices = idx.full().reshape(-1)
        n_in, n_out = x.shape[axis], out_shape[axis]
        nearest = np.minimum(np.floor(np.arange(n_out, dtype=np.float32) / np.float32(n_out / n_in)), n_in - 1)
        if rank == 4 and x.perm.index(axis) >= 2 and np.array_equal(indices, nearest.astype(indices.dtype)):
            return self._resize(x, axis, n_out, out_shape)
        indices = g.const(indices.astype(np.int64), 'indices')
        return _Tensor(g.node('Gather', [x.name, indices], axis=x.perm.index(axis)), out_shape, x.perm)


def _reshape_layout(in_shape, perm, out_shape) -> Optional[Tuple[int, ...]]:
    """The physical layout of ``reshape(x, out_shape)`` computed by reshaping ``x``'s physical
    data directly, or None where that would mix axes. Axes group between the shapes (each group
    of input axes has the product of a group of output axes); the reshape can stay in ``x``'s
    layout when each group's input axes are adjacent and in order physically."""
    nz_in = [d for d in range(len(in_shape)) if in_shape[d] != 1]
    nz_out = [d for d in range(len(out_shape)) if out_shape[d] != 1]
    groups, i, j = [], 0, 0
    while i < len(nz_in) and j < len(nz_out):
        gi, go = [nz_in[i]], [nz_out[j]]
        pi, po = in_shape[nz_in[i]], out_shape[nz_out[j]]
        while pi != po:
            if pi < po:
                i += 1
                if i == len(nz_in):
                    return None
                gi.append(nz_in[i])
                pi *= in_shape[nz_in[i]]
            else:
                j += 1
                if j == len(nz_out):
                    return None
                go.append(nz_out[j])
                po *= out_shape[nz_out[j]]
        groups.append((gi, go))
        i, j = i + 1, j + 1
    if i != len(nz_in) or j != len(nz_out) or not groups or 0 not in groups[0][1] and 0 in nz_out:
        return None
    where = {d: perm.index(d) for d in range(len(in_shape))}
    for gi, _ in groups:
        pos = [where[d] for d in gi]
        if pos != sorted(pos) or any(in_shape[perm[p]] != 1 for p in range(pos[0], pos[-1] + 1)
                                     if perm[p] not in gi):
            return None
    groups.sort(key=lambda grp: where[grp[0][0]])
    order = [d for _, go in groups for d in go]
    if len(out_shape) == 4 and [d for d in _NCHW if out_shape[d] != 1] == order:
        return _NCHW       # size-1 axes go anywhere: where a conv wants them
    for d in range(len(out_shape)):           # size-1 axes: after their logical predecessor
        if out_shape[d] == 1:
            order.insert(0 if d == 0 else order.index(d - 1) + 1, d)
    if order[0] != 0 and out_shape[0] != 1:
        return None
    return tuple(order)


def _index(g: _Graph):
    """(initializers by name, the number of uses of each tensor name, the node producing each)."""
    uses: Dict[str, int] = {}
    for n in g.nodes:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    return {t.name: t for t in g.initializers}, uses, {n.output[0]: n for n in g.nodes}


def _fuse_conv_bias(g: _Graph) -> None:
    """Conv -> Add(per-channel constant) becomes one Conv with a bias, where the Conv's output
    has no other consumer."""
    inits, uses, producer = _index(g)
    drop = set()
    for n in g.nodes:
        if n.op_type != 'Add' or len(n.input) != 2:
            continue
        a, b = n.input
        conv = producer.get(a)
        if conv is None or conv.op_type != 'Conv' or len(conv.input) != 2 or uses.get(a) != 1 or b not in inits:
            continue
        bias = g.onnx.numpy_helper.to_array(inits[b])
        channels = g.onnx.numpy_helper.to_array(inits[conv.input[1]]).shape[0]
        if bias.size != channels or bias.ndim < 3 or bias.shape[-3] != channels:
            continue   # not (.., C, 1, 1)
        conv.input.append(g.const(bias.reshape(-1).astype(np.float32), 'bias'))
        conv.output[0] = n.output[0]
        drop.add(id(n))
    g.nodes = [n for n in g.nodes if id(n) not in drop]
    used = {i for n in g.nodes for i in n.input}
    g.initializers = [t for t in g.initializers if t.name in used]


def _merge_resizes(g: _Graph) -> None:
    """Resize(axis a) -> Resize(axis b), the first used once: one Resize over both axes."""
    inits, uses, producer = _index(g)
    attr = lambda n, k: next(a for a in n.attribute if a.name == k)
    for n in g.nodes:
        first = producer.get(n.input[0]) if n.op_type == 'Resize' else None
        if first is None or first.op_type != 'Resize' or uses.get(first.output[0]) != 1:
            continue
        axes = list(attr(first, 'axes').ints) + list(attr(n, 'axes').ints)
        if len(set(axes)) != len(axes):
            continue
        sizes = np.concatenate([g.onnx.numpy_helper.to_array(inits[m.input[3]]) for m in (first, n)])
        order = np.argsort(axes)
        n.input[0], n.input[3] = first.input[0], g.ints(sizes[order])
        inits[n.input[3]] = g.initializers[-1]
        attr(n, 'axes').ints[:] = [axes[i] for i in order]


def _drop_unused(g: _Graph, outputs: Sequence[str]) -> None:
    live, kept = set(outputs), []
    for n in reversed(g.nodes):
        if any(o in live for o in n.output):
            kept.append(n)
            live.update(i for i in n.input if i)
    g.nodes = kept[::-1]
    g.initializers = [t for t in g.initializers if t.name in live]


def to_onnx(fn: Callable[[jax.Array], jax.Array], image_shape: Tuple[int, int, int], *,
            input_name: str = 'images', output_name: str = 'logits', doc: str = ''):
    """``fn`` (NHWC float32 images -> one array), traced at ``image_shape`` (H, W, C), as an
    ``onnx.ModelProto`` whose input is ``[batch, H, W, C]`` with a dynamic batch."""
    import onnx
    example = jax.ShapeDtypeStruct((_TRACE_BATCH,) + tuple(image_shape), jnp.float32)
    closed = jax.make_jaxpr(fn)(example)
    g = _Graph()
    rank = 1 + len(image_shape)
    (out,) = _Emitter(g).run(closed.jaxpr, closed.consts, [_Tensor(input_name, example.shape, _identity(rank))])
    if not isinstance(out, _Tensor):
        raise ValueError('ONNX export: the output does not depend on the input')
    final = g.layout(out, _identity(len(out.shape)))
    g.nodes.append(onnx.helper.make_node('Identity', [final], [output_name]))
    _drop_unused(g, [output_name])
    _fuse_conv_bias(g)
    _merge_resizes(g)
    _drop_unused(g, [output_name])
    dtype = onnx.TensorProto.FLOAT
    inp = onnx.helper.make_tensor_value_info(input_name, dtype, ['batch'] + list(image_shape))
    outp = onnx.helper.make_tensor_value_info(output_name, dtype, ['batch'] + list(out.shape[1:]))
    graph = onnx.helper.make_graph(g.nodes, 'ghostnet', [inp], [outp], g.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid('', OPSET)],
                                   producer_name='ghostnetv2_jax', doc_string=doc)
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model, full_check=True)
    return model
