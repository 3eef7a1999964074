"""What a checkpoint may contain before fairseq sees it: no pickled code, no config that fairseq
would evaluate.

``torch.load(weights_only=True)`` with a short allow-list stops pickled payloads, but fairseq
also *runs* strings from a checkpoint's ``cfg``: the saved ``cfg.model._name`` picks any
registered model (``transformer_lm`` evaluates ``character_filters``, ``fconv_lm`` its layer
specs), ``fairseq-validate`` sets up whatever ``cfg.task`` and ``cfg.criterion`` name (a legacy
task ``eval``s ``left_pad_source``, the ``ctc`` criterion ``wer_args``), argparse-era
``args`` are rebuilt through hydra overrides, ``${...}`` interpolations resolve when read, and
saved meters are rebuilt from class names. :func:`vet` accepts only what this plugin's own
checkpoints hold:

- ``args`` is absent or ``None`` (our models never write argparse-era checkpoints);
- ``cfg`` is plain data (dicts, lists, str, int, float, bool, None) with no ``${`` anywhere;
- ``cfg.model`` names a model in :data:`LOADABLE` ``["model"]`` and holds primitives only;
  ``cfg.task`` and ``cfg.criterion`` (when set) name entries of ``LOADABLE["task"]`` and
  ``LOADABLE["criterion"]``: classes known not to evaluate config strings;
- ``extra_state["metrics"]`` rebuilds only fairseq's own meter classes.

Anything else is refused in one line naming the file; ``FAIRSEQ_LONGMEM_TRUST_CHECKPOINTS=1``
loads a file the user trusts (full pickle, no vetting). The plugin's own tasks, models and
criteria join the allow-list with :func:`allow`.
"""

import argparse
from typing import Any, Dict, Iterator, List, Set, Tuple

import numpy as np

TRUST_ENV = "FAIRSEQ_LONGMEM_TRUST_CHECKPOINTS"

# Registered names, per registry, whose classes never evaluate strings from their config. A model
# name covers its archs (gpt2_lm covers gpt2_lm_tiny, ...). longmem_icl and longmem_suffix are
# tasks this plugin adds; they must keep to the rule too.
LOADABLE: Dict[str, Set[str]] = {
    "model": {"gpt2_lm", "longmem_gpt2", "llama_lm", "longmem_llama"},
    "task": {"language_modeling", "longmem_lm", "longmem_icl", "longmem_suffix"},
    "criterion": {"cross_entropy", "longmem_cross_entropy"},
}

_PRIMITIVES = (str, int, float, bool, type(None))


def safe_globals() -> List[Any]:
    """Types that ``torch.load(weights_only=True)`` may rebuild besides tensors and containers:
    argparse-era configs pickle a Namespace (unpickled only to be refused by :func:`vet` with a
    clear message), and metrics/iterator state may hold numpy scalars."""
    safe = [argparse.Namespace, np.dtype, np.ndarray]
    core = getattr(np, "_core", None) or getattr(np, "core")
    safe.append(core.multiarray.scalar)
    safe.append(core.multiarray._reconstruct)
    safe.extend(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool"))
    return safe


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds something that could run code when fairseq loads it."""


def allow(kind: str, name: str) -> None:
    """Let checkpoints name ``name`` in ``cfg.{kind}`` (kind: model, task or criterion). Only for
    classes that never ``eval`` or import anything their config names."""
    if kind not in LOADABLE:
        raise ValueError(f"allow(): kind {kind!r} is not one of {sorted(LOADABLE)}")
    LOADABLE[kind].add(name)


def _leaves(node: Any, path: str) -> Iterator[Tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            if not isinstance(k, str):
                yield f"{path} key", k
            else:
                yield from _leaves(v, f"{path}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, node


def _model_name(name: str):
    """The registered model behind ``name`` (a model or an arch name), as fairseq resolves it."""
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY, MODEL_REGISTRY

    if name in ARCH_MODEL_NAME_REGISTRY:
        return ARCH_MODEL_NAME_REGISTRY[name]
    return name if name in MODEL_REGISTRY else None


def _meter_classes() -> Set[str]:
    from fairseq.logging import meters

    return {
        n for n, v in vars(meters).items() if isinstance(v, type) and issubclass(v, meters.Meter)
    }


def _why_unsafe(state: Any) -> str:
    """What makes ``state`` unsafe to hand to fairseq, with what was expected; '' if nothing."""
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, expected a dict (a fairseq checkpoint)"
    if state.get("args") is not None:
        return ("is an argparse-era checkpoint (state['args'] is set), which fairseq rebuilds "
                "through config overrides; expected state['args'] = None as fairseq-longmem writes")
    cfg = state.get("cfg")
    if cfg is None:
        return "has no cfg, expected the hydra config fairseq-longmem writes"
    if not isinstance(cfg, dict):
        return f"has a cfg of type {type(cfg).__name__}, expected a dict of plain values"
    for path, value in _leaves(cfg, "cfg"):
        if not isinstance(value, _PRIMITIVES):
            return (f"has {path} of type {type(value).__name__}, expected plain values "
                    "(str, int, float, bool, None)")
        if isinstance(value, str) and "${" in value:
            return (f"has an interpolation in {path} ({value[:60]!r}), which would be resolved "
                    "on access; expected plain values")
    for kind, keys in (("model", ("_name", "arch")), ("task", ("_name", "task")),
                       ("criterion", ("_name", "criterion"))):
        section = cfg.get(kind)
        if section is None and kind == "criterion":
            continue
        if not isinstance(section, dict):
            return (f"has cfg.{kind} = {repr(section)[:60]}, expected a section naming one of "
                    f"{sorted(LOADABLE[kind])}")
        names = [section[k] for k in keys if section.get(k) is not None]
        if not names:
            return f"has no cfg.{kind}._name, expected one of {sorted(LOADABLE[kind])}"
        for name in names:
            resolved = name if kind != "model" or not isinstance(name, str) else _model_name(name)
            if not isinstance(name, str) or resolved not in LOADABLE[kind]:
                return (f"names {kind} {name!r}, expected one of {sorted(LOADABLE[kind])} "
                        f"(other {kind}s may evaluate strings from the file)")
    for key, value in cfg["model"].items():
        if not isinstance(value, _PRIMITIVES):
            return (f"has cfg.model.{key} of type {type(value).__name__}, expected plain values "
                    "(str, int, float, bool, None) in cfg.model")
    extra = state.get("extra_state") or {}
    metrics = (extra.get("metrics") if isinstance(extra, dict) else None) or {}
    if not isinstance(metrics, dict):
        return f"has extra_state.metrics of type {type(metrics).__name__}, expected a dict"
    known = _meter_classes()
    for agg, entries in metrics.items():
        for entry in entries if isinstance(entries, list) else [entries]:
            cls = entry[2] if isinstance(entry, (list, tuple)) and len(entry) == 4 else None
            if cls not in known:
                return (f"has a meter of class {cls!r} in extra_state.metrics[{agg!r}], "
                        f"expected one of fairseq's meters ({', '.join(sorted(known))})")
    return ""


def vet(state: Any, name: str) -> Any:
    """Return ``state`` if fairseq can load it without running code from it; otherwise raise
    :class:`UnsafeCheckpointError` with one line naming ``name``."""
    problem = _why_unsafe(state).replace("\n", "\\n")  # keys come from the file: keep one line
    if problem:
        raise UnsafeCheckpointError(
            f"checkpoint {name} {problem}. Refused, since loading it could run code from the "
            f"file; if you trust it, set {TRUST_ENV}=1 and retry"
        )
    return state
