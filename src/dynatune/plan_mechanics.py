"""Plan mechanics: what applying a plan does to a model.

One implementation for the engine (`Tuner.apply`) and the memory model's activation probe, so
the probe measures the model exactly as the engine trains it:
- only the plan's parameters require grad (a frozen linear saves no input for backward);
- a probed block's output requires grad, so backward reaches it but not its weights;
- a tied input embedding's output is detached, so backward does not run down to the lookup;
- an exit swaps the block list for a truncated one (exited blocks neither run nor save anything)
  and sets the config's layer count to match;
- activation checkpointing is torch's non-reentrant checkpoint, with embedding outputs left as
  they are (transformers' enable_input_require_grads would put every block on the backward path).
"""
from __future__ import annotations

from torch import nn

from .errors import DynatuneError
from .plan import Plan
from .signals import first_tensor
from .units import Units, get_submodule, unwrap_peft


def grad_param_names(units: Units, plan: Plan) -> set[str]:
    """The parameters that get a gradient under `plan`: updated units and those probed by parameter."""
    return set(units.param_names(plan.update | plan.probe_params))


def require_grad_only(params: dict[str, nn.Parameter], wanted: set[str]) -> None:
    """requires_grad on the `wanted` parameters of `params`; the others drop their gradient."""
    for n, p in params.items():
        p.requires_grad_(n in wanted)
        if n not in wanted:
            p.grad = None  # units that left free their gradient now


def add_plan_hooks(model: nn.Module, units: Units, blocks: nn.ModuleList, plan: Plan) -> list:
    """The forward hooks `plan` needs (probed block outputs, a detached tied input); returns their handles."""
    probed = [units[name] for name in plan.probe]
    for unit in probed:  # before any hook goes on: a refused plan leaves none behind
        if unit.kind != "block":
            raise DynatuneError(f"only blocks can be probed at their output, not {unit.name}.")
    # prepend: signal hooks on the same block (ActivationGradNorm) must see the output
    # already requiring grad, or the probed block reports nothing
    hooks = [blocks[unit.depth].register_forward_hook(_output_requires_grad, prepend=True) for unit in probed]
    if plan.detach_tied_input:
        emb = model.get_input_embeddings()
        hooks.append(emb.register_forward_hook(lambda m, a, out: out.detach()))
    return hooks


def _output_requires_grad(mod, args, out):
    """A probed block's output requires grad, so backward reaches it (not its weights)."""
    t = first_tensor(out)
    if t is not None and not t.requires_grad:
        t.requires_grad_(True)


class BlockStack:
    """A model's block list, which an exit truncates: keeps the full list and the config's layer count."""

    def __init__(self, model: nn.Module, blocks_path: str):
        parent_path, _, self._attr = blocks_path.rpartition(".")
        self._parent = get_submodule(model, parent_path) if parent_path else model
        self.full: nn.ModuleList = getattr(self._parent, self._attr)
        self._config = getattr(model, "config", None)
        self.num_layers = getattr(self._config, "num_hidden_layers", None)
        self.layer_types = getattr(self._config, "layer_types", None)

    @property
    def running(self) -> nn.ModuleList:
        """The blocks the forward runs now (all of them, or those below the exit)."""
        return getattr(self._parent, self._attr)

    def set_exit(self, exit_depth: int | None) -> None:
        """Run blocks 0 .. exit_depth - 1 only (None: all of them)."""
        n = len(self.full)
        e = n if exit_depth is None else exit_depth
        if len(self.running) == e:
            return
        setattr(self._parent, self._attr, self.full if e == n else nn.ModuleList(list(self.full)[:e]))
        if self._config is not None and self.num_layers is not None:
            # a model saved after an exit must load with e blocks: its config says so
            self._config.num_hidden_layers = e if e < n else self.num_layers
            if self.layer_types is not None:
                self._config.layer_types = list(self.layer_types)[:e] if e < n else self.layer_types


def input_grad_hooks_on(model: nn.Module) -> bool:
    """Whether transformers' enable_input_require_grads hooks are on anywhere in `model` (the
    embedding output then requires grad, so backward runs down through every block)."""
    return any(getattr(m, "_require_grads_hooks", None) or getattr(m, "_require_grads_hook", None) is not None
               for m in model.modules())


def remove_input_grad_hooks(model: nn.Module) -> None:
    """Undo enable_input_require_grads everywhere in `model` (a PeftModel and its base alike)."""
    for m in model.modules():
        hooks = list(getattr(m, "_require_grads_hooks", None) or [])
        single = getattr(m, "_require_grads_hook", None)
        if single is not None and single not in hooks:
            hooks.append(single)
        for h in hooks:
            h.remove()
        if hasattr(m, "_require_grads_hooks"):
            m._require_grads_hooks = []
        if hasattr(m, "_require_grads_hook"):
            del m._require_grads_hook


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of every block with torch's non-reentrant checkpoint.

    Non-reentrant checkpointing gives a frozen block's parameters no special needs: a block whose
    input does not require grad still back-propagates into its own trainable weights, so the
    embedding output need not require grad. transformers turns enable_input_require_grads on
    with checkpointing all the same; it is turned off again here, so backward still stops at the
    lowest unit the plan trains.
    """
    inner = unwrap_peft(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise DynatuneError(f"{type(inner).__name__} does not support activation checkpointing in transformers; "
                            "set gradient_checkpointing=false.")
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before activation_checkpointing_enable
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    remove_input_grad_hooks(model)
