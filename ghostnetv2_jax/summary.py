"""Parameter and multiply-accumulate counts.

MACs are counted the way PyTorch profilers (thop, fvcore, timm's tables) count them: for every
convolution ``N*Ho*Wo*Cout * kh*kw*Cin/groups`` and for every matmul ``output size * contracted
size``; pooling, BN, activations and resizes are free. They are read off the traced program (the
jaxpr) of the model with XLA's depthwise convolution, so they follow whatever the model does; a
layer with per-platform forms counts its costliest.

A GhostNetV3 model counts the parameters of its training form (timm's count) and the MACs of its
deploy form (``runtime.reparameterize``: GhostNetV2's network), the network that runs inference.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
import numpy as np

from ghostnetv2_jax.models.registry import create_model


def count_params(variables: Dict[str, Any]) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(variables['params'])))


def _count_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == 'conv_general_dilated':
            lhs, rhs = (v.aval for v in eqn.invars[:2])
            out = eqn.outvars[0].aval
            dn = eqn.params['dimension_numbers']
            k_spatial = math.prod(rhs.shape[i] for i in dn.rhs_spec[2:])
            cin_per_group = rhs.shape[dn.rhs_spec[1]]
            total += math.prod(out.shape) * k_spatial * cin_per_group
        elif name == 'dot_general':
            (lhs_contract, _), _ = eqn.params['dimension_numbers']
            lhs = eqn.invars[0].aval
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[i] for i in lhs_contract)
        if name == 'cond':   # per-platform forms of one layer (nn.platform): count one of them
            total += max(_count_macs(b.jaxpr) for b in eqn.params['branches'])
            continue
        for sub in jax_core.jaxprs_in_params(eqn.params):
            total += _count_macs(sub)
    return total


def count_macs(model, variables, input_size: Tuple[int, int] = (224, 224)) -> int:
    """MACs of one image through ``model`` (depthwise convs counted as XLA convolutions)."""
    model = model.clone(depthwise_impl='xla')
    x = jnp.zeros((1, *input_size, 3), jnp.float32)
    return _count_macs(jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x).jaxpr)


def summarize(name: str, input_size: Tuple[int, int] = (224, 224), **overrides) -> Dict[str, Any]:
    """Parameters and MACs of a registered model; for GhostNetV3 also ``deploy_params``, and
    ``macs`` is its deploy form's."""
    model = create_model(name, **overrides)
    x = jnp.zeros((1, *input_size, 3), jnp.float32)
    shapes = lambda m: jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x))
    variables = shapes(model)
    out = dict(model=name, input_size=tuple(input_size), params=count_params(variables))
    if model.num_conv_branches:   # the inference network: reparameterize's output
        model = model.clone(num_conv_branches=0, fold_bn=True)
        variables = shapes(model)
        out['deploy_params'] = count_params(variables)
    out['macs'] = count_macs(model, variables, input_size)
    return out
