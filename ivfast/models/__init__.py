"""Model building blocks: encoder, predictor, diffusion decoder, teacher.

The composed models and helpers the training loop calls are importable from here (lazily, so
``import ivfast.models`` stays cheap): ``build_model``, ``Stage1Model``, ``Stage2Model``,
``load_stage1_weights``, ``param_groups`` (``ivfast.models.epd``), ``flops_per_clip``
(``ivfast.models.flops``), ``attention``, ``used_backends`` (``ivfast.models.attention``) and
``load_encoder``, ``convert_release_state_dict`` (``ivfast.models.release_weights``: an encoder from
an ivfast checkpoint or the authors' released weights).
"""
import importlib

_EXPORTS = {
    "build_model": "epd", "Stage1Model": "epd", "Stage2Model": "epd", "load_stage1_weights": "epd",
    "param_groups": "epd", "flops_per_clip": "flops", "used_backends": "attention",
    "load_encoder": "release_weights", "convert_release_state_dict": "release_weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
