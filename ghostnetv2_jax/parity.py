"""Side-by-side comparison with the PyTorch reference (timm), stage by stage.

torch and timm are imported lazily: they are development requirements, not runtime ones.
A freshly initialised network has BN mean 0 / var 1 / scale 1 / bias 0 and tiny logits, which
hides conversion bugs (a swapped mean and bias, a missing transpose of a symmetric kernel...), so
the reference's BN statistics and affine parameters are randomised and its classifier is scaled
until the logits are of order 10.

A GhostNetV3 model is compared in both forms: the training form (parallel branches) in eval mode,
and the deploy form (``runtime.reparameterize``) against timm's re-parameterised model
(``timm.utils.model.reparameterize_model``, what ``GhostNet.convert_to_deploy`` calls).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ghostnetv2_jax import convert
from ghostnetv2_jax.models.ghostnet import GhostBottleneck, GhostBottleneckV3
from ghostnetv2_jax.models.registry import create_model
from ghostnetv2_jax.runtime.deploy import reparameterize

DEFAULT_TOLERANCE = 1e-4   # max |flax - torch| / max |torch logit|


def timm_model(name: str, seed: int = 0, checkpoint: Optional[str] = None, use_ema: bool = False,
               logit_scale: float = 10.0, **timm_kwargs):
    """The timm reference in eval mode: seeded random weights with randomised BN statistics and
    affine parameters (classifier scaled to logits ~``logit_scale``), or a checkpoint's weights."""
    import timm
    import torch
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **timm_kwargs)
    if checkpoint:
        sd = convert.load_state_dict(checkpoint, use_ema=use_ema)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    else:
        randomize_(model, seed, logit_scale)
    return model.eval()


def randomize_(model, seed: int = 0, logit_scale: float = 10.0) -> None:
    """Give every BatchNorm random running statistics and affine parameters, in place, then scale
    the classifier so the largest |logit| on a random batch is ``logit_scale``."""
    import torch
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
        classifier = getattr(model, 'classifier', None)
        if isinstance(classifier, torch.nn.Linear):
            was_training = model.training
            model.eval()
            x = torch.randn(2, 3, 224, 224, generator=g)
            peak = model(x).abs().max().item()
            classifier.weight.mul_(logit_scale / max(peak, 1e-12))
            classifier.bias.mul_(logit_scale / max(peak, 1e-12))
            model.train(was_training)


def torch_stage_outputs(model, x_nchw) -> Tuple[List[np.ndarray], np.ndarray]:
    """(NHWC output of every stage ``blocks[i]``, logits) from the timm model."""
    import torch
    outs: List[Any] = []
    hooks = [stage.register_forward_hook(lambda _m, _i, o: outs.append(o)) for stage in model.blocks]
    try:
        with torch.no_grad():
            logits = model(x_nchw)
    finally:
        for h in hooks:
            h.remove()
    return [o.permute(0, 2, 3, 1).numpy() for o in outs], logits.numpy()


def flax_stage_outputs(model, variables, x_nhwc) -> Tuple[List[np.ndarray], np.ndarray]:
    """(output of the last bottleneck of each stage, logits) from the Flax model. The final 1x1
    stage is inline in the Flax model, so it is checked through the logits."""
    capture = lambda mdl, method: isinstance(mdl, (GhostBottleneck, GhostBottleneckV3)) and method == '__call__'
    apply = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=capture, mutable=['intermediates']))
    logits, state = apply(variables, x_nhwc)
    inter = state['intermediates']
    last = {}
    for name in inter:                              # blocks_{stage}_{index}
        _, stage, idx = name.split('_')
        if int(idx) >= last.get(int(stage), (-1, None))[0]:
            last[int(stage)] = (int(idx), name)
    stages = [np.asarray(inter[last[s][1]]['__call__'][0]) for s in sorted(last)]
    return stages, np.asarray(logits)


@dataclasses.dataclass
class Report:
    model: str
    input_shape: Tuple[int, ...]
    stage_diffs: List[float]
    logit_diff: float
    logit_scale: float
    form: str = 'eval'    # 'eval', or 'deploy': GhostNetV3 re-parameterised on both sides

    @property
    def relative(self) -> float:
        return self.logit_diff / max(self.logit_scale, 1e-12)

    def lines(self) -> List[str]:
        form = '' if self.form == 'eval' else f'  {self.form} form'
        rows = [f'{self.model}{form}  input {self.input_shape}  (max abs diff, flax vs timm)']
        rows += [f'  stage {i}: {d:.3e}' for i, d in enumerate(self.stage_diffs)]
        rows.append(f'  logits : {self.logit_diff:.3e}  (max |logit| {self.logit_scale:.2f}, '
                    f'relative {self.relative:.3e})')
        return rows


def timm_deploy_model(torch_model):
    """timm's deploy form of ``torch_model`` (a copy): GhostNetV3's branches re-parameterised.
    ``GhostNet.convert_to_deploy()`` calls this with ``inplace=False`` and drops the result, so
    it leaves the model as it was; the function itself returns the deploy form."""
    from timm.utils.model import reparameterize_model
    return reparameterize_model(torch_model, inplace=False).eval()


def compare(name: str, torch_model, images_nhwc: np.ndarray, deploy: bool = False, **overrides) -> Report:
    """Convert ``torch_model``'s weights, run both models on the same images, diff every stage.
    ``deploy``: compare GhostNetV3's deploy forms (``reparameterize`` against timm's)."""
    import torch
    variables = convert.torch_to_flax(torch_model.state_dict(), name, **overrides)
    model = create_model(name, **overrides)
    if deploy:
        model, variables = reparameterize(model, variables)
        torch_model = timm_deploy_model(torch_model)
    t_stages, t_logits = torch_stage_outputs(torch_model, torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy()))
    f_stages, f_logits = flax_stage_outputs(model, variables, jnp.asarray(images_nhwc))
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(f_stages, t_stages)]
    return Report(name, tuple(images_nhwc.shape), diffs, float(np.max(np.abs(f_logits - t_logits))),
                  float(np.max(np.abs(t_logits))), 'deploy' if deploy else 'eval')


def run(name: str, checkpoint: Optional[str] = None, sizes: Sequence[Tuple[int, int]] = ((224, 224),),
        batch: int = 2, seed: int = 0, tolerance: float = DEFAULT_TOLERANCE, use_ema: bool = False,
        depthwise_impl: str = 'auto') -> bool:
    """Print the parity report for ``name`` at each size (a GhostNetV3 in its training and its
    deploy form); True when every comparison is within tolerance."""
    ref = timm_model(name, seed=seed, checkpoint=checkpoint, use_ema=use_ema)
    forms = (False, True) if create_model(name).num_conv_branches else (False,)
    rng = np.random.default_rng(seed)
    ok = True
    for h, w in sizes:
        images = rng.standard_normal((batch, h, w, 3)).astype(np.float32)
        for deploy in forms:
            report = compare(name, ref, images, deploy=deploy, depthwise_impl=depthwise_impl)
            print('\n'.join(report.lines()))
            passed = report.relative <= tolerance
            print(f'  {"PASS" if passed else "FAIL"} (tolerance {tolerance:g} relative)')
            ok &= passed
    return ok
