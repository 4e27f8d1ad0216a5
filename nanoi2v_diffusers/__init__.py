"""nanoi2v_diffusers: image-to-video diffusion for Hugging Face diffusers.

Public names are imported lazily so that `import nanoi2v_diffusers` stays fast and a script that
needs only the dataset does not import the whole model stack.
"""

import importlib

__version__ = "0.1.0"

_LAZY_IMPORTS = {
    "AutoencoderKLNanoI2V": "nanoi2v_diffusers.models.autoencoder_kl_nanoi2v",
    "NanoI2VTransformer3DModel": "nanoi2v_diffusers.models.transformer_nanoi2v",
    "NanoI2VFlowMatchScheduler": "nanoi2v_diffusers.schedulers.scheduling_nanoi2v_flow_match",
    "NanoI2VPipeline": "nanoi2v_diffusers.pipelines.pipeline_nanoi2v",
    "NanoI2VCondition": "nanoi2v_diffusers.pipelines.pipeline_nanoi2v",
    "NanoI2VPipelineOutput": "nanoi2v_diffusers.pipelines.pipeline_nanoi2v",
}

__all__ = list(_LAZY_IMPORTS)


def __getattr__(name):
    if name in _LAZY_IMPORTS:
        return getattr(importlib.import_module(_LAZY_IMPORTS[name]), name)
    raise AttributeError(f"module 'nanoi2v_diffusers' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
