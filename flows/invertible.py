"""Training memory that does not grow with depth: gradients through the inverse (``memory: invertible``).

A flow step is a bijection, so autograd does not have to keep its activations: backward can rebuild the
step's input from its output with the step's inverse, recompute the step with gradients on, and
back-propagate through that (i-RevNet, Jacobsen et al. 2018; memcnn's InvertibleCheckpointFunction;
openai/glow used gradient checkpointing instead). ``FlowLevel`` is a level ``Compose(squeeze, K steps)``
whose ``memory`` attribute picks what a training forward keeps:

- ``standard``: plain autograd, every step's activations (O(K) per level).
- ``invertible``: each step runs under ``_InvertibleStep``, a custom ``torch.autograd.Function`` that
  takes the step's parameters as explicit inputs (so DDP's gradient hooks fire as usual) and keeps
  only the level's output (and its squeezed input, to measure the rebuild's drift). Backward walks
  the steps in reverse; a shared ``_Tape`` hands each step the input the step after it has rebuilt.
  Kept for backward per level: its output (O(1) in K); during
  backward, one step's recomputation at a time.
- ``checkpoint``: ``torch.utils.checkpoint`` around the whole level: keeps the level's input and
  recomputes the K steps from it in backward (peak about one level's activations instead of all L).

Costs and exactness (docs/model.md, "Memory modes", has the measurements):
- Each step's inverse is taken per layer in reverse. A coupling's net runs once in backward, not twice:
  the inverse runs it on the unchanged half with gradients on, and the recomputed forward reuses that
  output (the unchanged half is the net's input in both directions). ActNorm and the 1x1 conv are
  inverted and recomputed separately (cheap). So a step costs forward + net + backward, about 4/3 of
  standard in convolutions (1.3-1.5x measured on a CPU, docs/benchmarks.md).
- Reconstruction never crosses a level boundary: the level's output is what the split consumes, is
  kept, and the rebuild of each level starts from it. Drift is bounded by K steps, not L*K.
- Under autocast, everything that is inverted numerically runs in float32 in this mode: ActNorm, the
  1x1 conv and the coupling's affine algebra; only the coupling nets' convolutions use the low
  precision (most of the compute). A net's output is never inverted, only recomputed from the
  unchanged half. (A bf16 1x1 conv loses ~2^-8 relative per step, a bf16 shift * scale ~2^-9 |shift|;
  at depth 48 rebuilt inputs would be off by 0.07-5 instead of 1e-3-6e-3.)
- Forward hooks (LCMA measures the couplings with them) run once per training forward, in the forward
  pass, with gradients enabled as in standard mode; the inverse and the recomputation in backward run
  with the step's hooks suppressed, so nothing is measured twice. Global module hooks are not
  suppressed.
- Without gradients (evaluation, sampling, ``initialize_actnorm``) every mode is the plain forward.
"""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from flows.actnorm import ActNorm
from flows.bijection import Bijection, Compose
from flows.config import MEMORY_MODES
from flows.coupling import AdditiveCoupling, AffineCoupling
from flows.invconv import InvConv1x1

# Layers whose inverse is computed (not recomputed): under autocast they run in float32 in invertible
# mode, so that rebuilding an input from a bf16-rounded output does not lose 8 bits per step.
FULL_PRECISION_LAYERS = (ActNorm, InvConv1x1)
# Layers y = (x_a, g(x_b; net(x_a))) whose net reads the unchanged half once in forward and inverse.
COUPLING_LAYERS = (AffineCoupling, AdditiveCoupling)
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")


# ---------------------------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class _Autocast:
    """The autocast state of the forward pass, re-entered in backward (which runs on another thread)."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @classmethod
    def current(cls, x: Tensor) -> _Autocast:
        device_type = x.device.type
        return cls(device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    def __call__(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def for_layer(self, layer: nn.Module) -> contextlib.AbstractContextManager:
        """The precision rule of invertible mode under autocast: whatever is inverted numerically runs
        in float32. ActNorm and the 1x1 conv with autocast off; a coupling's net under autocast, but its
        output cast to float32, so the coupling's own algebra (shift * scale, the division of its
        inverse) is float32. Without the cast, bf16(shift * scale) makes forward and inverse disagree
        by ~2^-9 |shift| at every step."""
        if not self.enabled:
            return contextlib.nullcontext()
        if isinstance(layer, FULL_PRECISION_LAYERS):
            return torch.autocast(self.device_type, enabled=False)
        if isinstance(layer, COUPLING_LAYERS):
            run_net = layer.net.forward
            return _net_forward(layer.net, lambda x_a: run_net(x_a).float())
        return contextlib.nullcontext()

    def cast_for(self, layer: nn.Module, x: Tensor) -> Tensor:
        low = x.dtype in (torch.float16, torch.bfloat16)
        if self.enabled and low and isinstance(layer, FULL_PRECISION_LAYERS):
            return x.float()
        return x


def leaf_layers(step: nn.Module) -> list[nn.Module]:
    """The bijections a step applies in order, with nested ``Compose`` flattened."""
    if isinstance(step, Compose):
        return [leaf for layer in step.layers for leaf in leaf_layers(layer)]
    return [step]


@contextlib.contextmanager
def hooks_suppressed(module: nn.Module) -> Iterator[None]:
    """Run ``module`` and its submodules without their forward (pre-)hooks: backward's inverse and
    recomputation are not forward passes, and observers (LCMA's measurement) must see one per step.
    Handles registered earlier keep pointing at the original dicts, which are put back afterwards."""
    saved = []
    for m in module.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(m, name)
            if hooks:
                saved.append((m, name, hooks))
                setattr(m, name, OrderedDict())
    try:
        yield
    finally:
        for m, name, hooks in saved:
            setattr(m, name, hooks)


@contextlib.contextmanager
def _net_forward(net: nn.Module, forward: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Calls of ``net(...)`` go to ``forward`` (an instance attribute shadows the class's method)."""
    net.forward = forward
    try:
        yield
    finally:
        del net.forward


def _detached_forward(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``layer(x)`` with gradients enabled (so forward hooks see a training forward, as in standard
    mode) but nothing recorded: the input and the parameters enter detached."""
    params = {name: p.detach() for name, p in layer.named_parameters()}
    with torch.enable_grad():
        return functional_call(layer, params, (x.detach(),))


def _grad_pairs(outputs: tuple[Tensor, ...], grads: tuple[Tensor, ...]) -> tuple[list[Tensor], list[Tensor]]:
    kept = [(o, g) for o, g in zip(outputs, grads, strict=True) if o.requires_grad]
    return [o for o, _ in kept], [g for _, g in kept]


# ---------------------------------------------------------------------------------------- per layer
def forward_layers(step: nn.Module, x: Tensor, amp: _Autocast) -> tuple[Tensor, Tensor]:
    """The step's forward exactly as ``Compose`` computes it (same ops, same order), layer by layer
    under the invertible mode's precision rule, recording nothing."""
    log_det = x.new_zeros(x.shape[0])
    for layer in leaf_layers(step):
        with amp.for_layer(layer):
            x, ld = _detached_forward(layer, amp.cast_for(layer, x))
        log_det = log_det + ld
    return x, log_det


def inverse_layer(layer: nn.Module, y: Tensor, amp: _Autocast) -> Tensor:
    """The input of ``layer`` rebuilt from its output, as backward rebuilds it (no gradients)."""
    with torch.no_grad(), amp.for_layer(layer):
        return layer.inverse(amp.cast_for(layer, y))


def _layer_vjp(
    layer: nn.Module, y: Tensor, grad_y: Tensor, grad_ld: Tensor, amp: _Autocast, need_x: bool,
    param_grads: dict[int, Tensor], wanted: set[int],
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Rebuild the input x of ``layer`` from its output y, recompute y = layer(x) with gradients, and
    back-propagate (grad_y, grad_ld). Returns (x, dL/dx or None); parameter gradients go to
    ``param_grads`` (only for parameters whose id is in ``wanted``)."""
    params = [p for p in layer.parameters() if id(p) in wanted]
    extra: list[Tensor] = []
    if isinstance(layer, COUPLING_LAYERS):
        # One net evaluation serves both the inverse and the recomputation: the net's input is the
        # unchanged half, which is the same tensor in y and in x.
        run_net = layer.net.forward
        captured: list[tuple[Tensor, Tensor]] = []

        def net_once(x_a: Tensor) -> Tensor:
            assert not captured, "a coupling calls its net once per direction"
            a = x_a.detach().requires_grad_(need_x)
            with torch.enable_grad():
                h = run_net(a)
                captured.append((a, h.float() if amp.enabled else h))  # the precision rule (for_layer)
            return captured[0][1].detach()

        def net_again(x_a: Tensor) -> Tensor:
            assert x_a.shape == captured[0][0].shape, "the net reads the coupling's unchanged half"
            return captured[0][1]

        with torch.no_grad(), _net_forward(layer.net, net_once):
            x = layer.inverse(y)
        with torch.enable_grad(), _net_forward(layer.net, net_again):
            x_leaf = x.detach().requires_grad_(need_x)
            y2, ld2 = layer(x_leaf)
        if need_x:
            extra = [captured[0][0]]
    else:
        x = inverse_layer(layer, y, amp)
        with torch.enable_grad(), amp.for_layer(layer):
            x_leaf = x.detach().requires_grad_(need_x)
            y2, ld2 = layer(x_leaf)
    inputs = ([x_leaf] if need_x else []) + extra + params
    outputs, grad_outputs = _grad_pairs((y2, ld2), (grad_y, grad_ld))
    if not inputs or not outputs:
        return x, (torch.zeros_like(x) if need_x else None)
    grads = list(torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True))
    grad_x = None
    if need_x:
        grad_x = grads.pop(0)
        grad_x = torch.zeros_like(x) if grad_x is None else grad_x
        if extra:
            grad_a = grads.pop(0)
            if grad_a is not None:
                grad_x = grad_x.clone()
                grad_x[:, : grad_a.shape[1]] += grad_a
    for p, g in zip(params, grads, strict=True):
        if g is not None:
            param_grads[id(p)] = g
    return x, grad_x


# ---------------------------------------------------------------------------------------- the Function
class _Tape:
    """Shared by the steps of one level in one forward: backward's rebuilt input of the step that
    ran after, handed to the step before it (backward visits them strictly in reverse)."""

    def __init__(self) -> None:
        self.rebuilt: Tensor | None = None
        # After backward: max |x - x_rebuilt| over the run's input (a 0-dim tensor, so no device sync).
        self.error: Tensor | None = None

    def take(self) -> Tensor:
        if self.rebuilt is None:
            raise RuntimeError(
                "invertible flow step: no rebuilt output to start from; backward must run through the "
                "whole level (the level's output is what the rebuild starts from)"
            )
        y, self.rebuilt = self.rebuilt, None
        return y


class _InvertibleStep(torch.autograd.Function):
    """y, log_det = step(x), keeping only y of the level's last step (see the module doc).

    Inputs: step (the module), tape, is_first / is_last (position in the level), x, *step.parameters().
    """

    @staticmethod
    def forward(ctx, step, tape, is_first, is_last, x, *params):  # noqa: ANN001, ANN205
        amp = _Autocast.current(x)
        y, log_det = forward_layers(step, x, amp)
        ctx.step, ctx.tape, ctx.is_first, ctx.is_last, ctx.amp, ctx.x_dtype = (
            step, tape, is_first, is_last, amp, x.dtype
        )  # fmt: skip
        # The parameters are not saved (they are the module's, and saved-tensor hooks such as CPU
        # offloading would copy them every step); their versions stand in for autograd's check.
        ctx.versions = tuple(p._version for p in params)
        # The run's exact input (the squeeze's output: about one step's input, O(1) in K) is kept to
        # measure how far the rebuild drifted; the last step keeps the exact output it starts from.
        ctx.save_for_backward(*((x,) if is_first else ()), *((y,) if is_last else ()))
        return y, log_det

    @staticmethod
    def backward(ctx, grad_y, grad_ld):  # noqa: ANN001, ANN205
        params = tuple(ctx.step.parameters())  # the forward's inputs, in the same order
        if tuple(p._version for p in params) != ctx.versions:
            raise RuntimeError(
                "invertible flow step: a parameter was modified in place between forward and backward "
                "(an optimizer step before backward?); its gradient would be computed at the new value"
            )
        saved = ctx.saved_tensors
        y = saved[-1] if ctx.is_last else ctx.tape.take()
        wanted = {id(p) for p, need in zip(params, ctx.needs_input_grad[5:], strict=True) if need}
        param_grads: dict[int, Tensor] = {}
        layers = leaf_layers(ctx.step)
        with hooks_suppressed(ctx.step), ctx.amp():
            for i in reversed(range(len(layers))):
                need_x = i > 0 or ctx.needs_input_grad[4]
                y, grad_y = _layer_vjp(layers[i], y, grad_y, grad_ld, ctx.amp, need_x, param_grads, wanted)
        if ctx.is_first:
            ctx.tape.error = (y.detach().to(saved[0].dtype) - saved[0]).abs().max()
        else:
            ctx.tape.rebuilt = y.to(ctx.x_dtype)
        if grad_y is not None:
            grad_y = grad_y.to(ctx.x_dtype)
        return (None, None, None, None, grad_y, *(param_grads.get(id(p)) for p in params))


def invertible_forward(layers: list[nn.Module], x: Tensor, tapes: list[_Tape]) -> tuple[Tensor, Tensor]:
    """Compose's forward over ``layers`` with every layer that has parameters under
    ``_InvertibleStep``; parameter-free layers (the squeeze: a view, nothing kept) run plainly.
    ``tapes`` receives one tape per run of consecutive steps (their ``error`` is filled by backward)."""
    log_det = x.new_zeros(x.shape[0])
    has_params = [any(True for _ in layer.parameters()) for layer in layers]
    tape = _Tape()
    for i, layer in enumerate(layers):
        if not has_params[i]:
            x, ld = layer(x)
        else:
            is_first = i == 0 or not has_params[i - 1]
            is_last = i == len(layers) - 1 or not has_params[i + 1]
            if is_first:  # a run of invertible steps starts here
                tape = _Tape()
                tapes.append(tape)
            x, ld = _InvertibleStep.apply(layer, tape, is_first, is_last, x, *layer.parameters())
        log_det = log_det + ld
    return x, log_det


# ---------------------------------------------------------------------------------------- the level
class FlowLevel(Compose):
    """One level's bijections, ``Compose(squeeze, step_1, ..., step_K)``; ``memory`` (one of
    ``MEMORY_MODES``) decides what a forward with gradients keeps for backward. Same parameters,
    buffers and state_dict keys as a ``Compose``."""

    def __init__(self, *layers: Bijection, memory: str = "standard") -> None:
        super().__init__(*layers)
        self.memory = memory
        self._tapes: list[_Tape] = []

    def rebuild_error(self) -> Tensor | None:
        """After an invertible-mode backward: max |x - x_rebuilt| over the level's input (after the
        squeeze), i.e. how far the last backward's rebuild had drifted by the time it reached the
        level's first step (0-dim tensor); None before one, or in the other modes."""
        errors = [tape.error for tape in self._tapes if tape.error is not None]
        if self._memory != "invertible" or not errors:
            return None
        return torch.stack(errors).max()

    @property
    def memory(self) -> str:
        return self._memory

    @memory.setter
    def memory(self, mode: str) -> None:
        if mode not in MEMORY_MODES:
            raise ValueError(f"memory: unknown {mode!r}; choose one of {MEMORY_MODES}")
        self._memory = mode

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self._memory == "standard" or not torch.is_grad_enabled():
            return super().forward(x)
        if self._memory == "invertible":
            self._tapes = []
            return invertible_forward(list(self.layers), x, self._tapes)
        # checkpoint: recompute the level in backward from its input, with its hooks suppressed.
        return checkpoint(
            functools.partial(Compose.forward, self),
            x,
            use_reentrant=False,
            preserve_rng_state=False,  # flow steps draw no random numbers
            context_fn=lambda: (contextlib.nullcontext(), hooks_suppressed(self)),
        )


# ---------------------------------------------------------------------------------------- drift
@torch.no_grad()
def reconstruction_error(model: nn.Module, x: Tensor) -> list[float]:
    """Per level, max |x - x_rebuilt| over the level's input (after the squeeze), where x_rebuilt is
    what invertible mode's backward rebuilds from the level's output through the K step inverses, in
    the precision it uses (call under ``torch.autocast`` to measure bf16). ``model`` is a FlowModel,
    ``x`` a float batch in model space (B, C, H, W). Parameters and buffers are not changed (the EIW
    strategy's "last regulariser" is, as by any forward)."""
    with hooks_suppressed(model):  # nothing is measured (LCMA) by this diagnostic
        return _reconstruction_error(model, x)


def _reconstruction_error(model: nn.Module, x: Tensor) -> list[float]:
    errors = []
    for level, steps in enumerate(model.levels):
        layers = list(steps.layers)
        start = next(i for i, layer in enumerate(layers) if any(True for _ in layer.parameters()))
        for layer in layers[:start]:
            x, _ = layer(x)
        amp = _Autocast.current(x)
        level_input = x
        for layer in layers[start:]:
            x, _ = forward_layers(layer, x, amp)
        rebuilt = x
        with amp():
            for layer in reversed(layers[start:]):
                for leaf in reversed(leaf_layers(layer)):
                    rebuilt = inverse_layer(leaf, rebuilt, amp)
        errors.append((rebuilt.double() - level_input.double()).abs().max().item())
        if level < len(model.splits):
            split = model.splits[level]
            x = split(x)[0][:, : split.num_keep]
    return errors
