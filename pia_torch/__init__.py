"""pia_torch: PIA, the Personalized Image Animator, in readable PyTorch.

This is not a framework; it is readable PyTorch you are expected to fork.

Axis letters used in every docstring and einops pattern:
    b  batch (videos)          f  frames            c  channels
    h, w  latent height/width  n  tokens            l  text tokens
    nh attention heads         d  head dim
Video tensors are (b, c, f, h, w); inside the UNet frames are folded into the batch as (b f).
"""

__version__ = "0.1.0"
