"""pia_torch: PIA, the Personalized Image Animator, in readable PyTorch.

This is not a framework; it is readable PyTorch you are expected to fork.

Axis letters used in every docstring and einops pattern:
    b  batch (videos)          f  frames            c  channels
    h, w  latent height/width  n  tokens            l  text tokens
    nh attention heads         d  head dim
Video tensors are (b, c, f, h, w); inside the UNet frames are folded into the batch as (b f).
"""

__version__ = "0.1.0"

from pia_torch.config import MotionConfig, UNetConfig, VAEConfig
from pia_torch.loading import MotionAdapter
from pia_torch.long_video import Keyframe
from pia_torch.models.unet import UNet
from pia_torch.models.vae import AutoencoderKL
from pia_torch.pipeline import PIAPipeline, PIAPipelineOutput
from pia_torch.schedulers import SAMPLERS, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

__all__ = [
    "SAMPLERS",
    "AutoencoderKL",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "Keyframe",
    "MotionAdapter",
    "MotionConfig",
    "PIAPipeline",
    "PIAPipelineOutput",
    "UNet",
    "UNetConfig",
    "VAEConfig",
]
